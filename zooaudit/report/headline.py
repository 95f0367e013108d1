"""The headline numbers of a run, per model, for the summary page: worst-group accuracy with
its bootstrap CI, the largest significant disparity with its CI and adjusted p, linear CKA to
the previous night per compare layer beside its shuffled-sample control, PCA explained
variance at k; the regression events fired tonight; what changed since the previous tag
(:func:`zooaudit.versions.diff_versions`, the ``zooaudit diff`` content).

Everything here is read from committed results and commit metadata; the CKA to the
previous night is the number the flow's regression check computed (``drift``), not a
metric of the report's own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .. import layout, versions
from .page import badge, esc, fmt


@dataclass
class Night:
    """The run's facts beside its results.

    ``regressions``: the ``zooaudit.audit.regression`` events fired (dicts: model, metric,
    dataset, payload); ``drift``: ``{model: {ds_key: {"previous": snapshot, "cka": {layer: v},
    "control": {layer: v}}}}``; ``diffs``: ``{model: (previous tag, VersionDiff) | None}``."""

    regressions: list = field(default_factory=list)
    drift: dict = field(default_factory=dict)
    diffs: dict = field(default_factory=dict)
    compare_layers: list = field(default_factory=list)

    def regressions_of(self, model: str) -> list[dict]:
        return [r for r in self.regressions if r["model"] == model]

    def drift_of(self, model: str, ds_key: str) -> dict | None:
        return (self.drift.get(model) or {}).get(ds_key)

    def diff_of(self, model: str):
        return self.diffs.get(model)


def previous_tag(repo) -> str | None:
    """The most recent tag of a repository (by the time of the snapshot it names; ties by name)
    that names an earlier version than the tip of ``main``: a report rendered after the night's
    own tag compares with the night before, as one rendered before it does."""
    tip = repo.lookup_branch("main")
    tags = [t for t in repo.list_tags() if repo.lookup_tag(t) != tip]
    if not tags:
        return None
    return max(tags, key=lambda t: (repo.lookup_snapshot(repo.lookup_tag(t)).written_at, t))


def diff_since_previous_tag(repo):
    """``(tag, VersionDiff from that tag to main)``, or None when the repository has no tag."""
    tag = previous_tag(repo)
    return None if tag is None else (tag, versions.diff_versions(repo, tag, "main"))


# -- the numbers ------------------------------------------------------------------------------------


def _ci_of(ds, name: str, var: str, coord: str):
    if var in ds and name in ds[coord].values:
        lo, hi = ds[var].sel({coord: name}).values
        return float(lo), float(hi)
    return None


def worst_group(ctx_open, ref, result) -> dict | None:
    """The lowest worst-group accuracy over the attributes of one bias result, with its CI."""
    best = None
    for attr, s in (result.summary or {}).items():
        if not isinstance(s, dict) or "worst_group_accuracy" not in s:
            continue
        if best is not None and s["worst_group_accuracy"] >= best["value"]:
            continue
        ds = ctx_open(layout.bias_group(ref.ds_key, attr))
        ci = _ci_of(ds, s["worst_group"], "accuracy_ci", "group") or _ci_of(ds, s["worst_group"], "cell_accuracy_ci",
                                                                            "cell")
        best = {"value": s["worst_group_accuracy"], "ci": ci, "attribute": attr, "group": s["worst_group"],
                "level": ds.attrs.get("ci", 0.95)}
    return best


def largest_disparity(ctx_open, ref, result) -> dict | None:
    """The flagged (significant after correction) disparity of largest |difference|, with its CI;
    None when the result has disparities but none is significant, {} when it has none at all."""
    found, any_disp = None, False
    for attr, s in (result.summary or {}).items():
        if not isinstance(s, dict):
            continue
        for metric, d in (s.get("disparities") or {}).items():
            any_disp = True
            if d["flagged"] and (found is None or abs(d["difference"]) > abs(found["value"])):
                ds = ctx_open(layout.bias_group(ref.ds_key, attr))
                found = {"value": d["difference"], "p": d["p_adjusted"], "metric": metric, "attribute": attr,
                         "ci": _ci_of(ds, metric, "disparity_difference_ci", "metric")}
    return found if found is not None or not any_disp else None


def _ci(ci) -> str:
    return f" <span class='ctl'>[{fmt(ci[0])}, {fmt(ci[1])}]</span>" if ci else ""


def worst_group_cell(items: list[tuple[str, dict]]) -> tuple[str, float]:
    if not items:
        return "<span class='ctl'>no group attributes</span>", math.inf
    ds, w = min(items, key=lambda kv: kv[1]["value"])
    return (f"<span class='num'>{fmt(w['value'])}</span>{_ci(w['ci'])}<br><span class='ctl'>{esc(w['attribute'])}: "
            f"{esc(w['group'])} · {w['level']:.0%} bootstrap CI · {esc(ds)}</span>", w["value"])


def disparity_cell(items: list[tuple[str, dict | None]]) -> tuple[str, float]:
    found = [(ds, d) for ds, d in items if d]
    if not items:
        return "<span class='ctl'>–</span>", -1.0
    if not found:
        return "<span class='ctl'>none significant</span>", 0.0
    ds, d = max(found, key=lambda kv: abs(kv[1]["value"]))
    return (f"<span class='num'>{fmt(d['value'])}</span>{_ci(d['ci'])}<br><span class='ctl'>{esc(d['metric'])} "
            f"({esc(d['attribute'])}), adjusted p {fmt(d['p'], 4)} · {esc(ds)}</span>", abs(d["value"]))


def drift_cell(night: Night, model: str, refs, results) -> tuple[str, float]:
    """CKA to the previous night for the compare layers (all layers when none is audited)."""
    parts, low = [], math.inf
    for ref in refs:
        act = next((r for r in results if r.stage == "activations" and r.dataset == ref.ds_key), None)
        d = night.drift_of(model, ref.ds_key)
        if act is not None and act.skipped:
            parts.append(f"<span class='ctl'>{esc(ref.dataset.name)}: unchanged (cache hit)</span>")
            low = min(low, 1.0)
            continue
        if not d or not d.get("cka"):
            parts.append(f"<span class='ctl'>{esc(ref.dataset.name)}: first audit</span>")
            continue
        layers = [l for l in night.compare_layers if l in d["cka"]] or list(d["cka"])
        for layer in layers:
            v, c = d["cka"][layer], (d.get("control") or {}).get(layer)
            low = min(low, v)
            parts.append(f"{esc(layer)} <span class='num'>{fmt(v, 4)}</span> <span class='ctl'>(control "
                         f"{fmt(c)}) · {esc(ref.dataset.name)}</span>")
    return "<br>".join(parts) or "–", (low if math.isfinite(low) else 2.0)


def explained_variance_cell(night: Night, refs, results) -> tuple[str, float]:
    parts, first = [], None
    for ref in refs:
        f = next((r for r in results if r.stage == "factorize" and r.dataset == ref.ds_key), None)
        if f is None:
            continue
        ev, ks = (f.summary or {}).get("explained_variance", {}), (f.summary or {}).get("k", {})
        layers = [l for l in night.compare_layers if f"{l}/pca" in ev] or \
            [t.split("/")[0] for t in ev if t.endswith("/pca")][:1]
        for layer in layers:
            v = ev[f"{layer}/pca"]
            if isinstance(v, str):
                continue
            first = v if first is None else first
            parts.append(f"{esc(layer)} k={ks.get(layer, '?')}: <span class='num'>{fmt(v)}</span> "
                         f"<span class='ctl'>(PCA; no control) · {esc(ref.dataset.name)}</span>")
    return "<br>".join(parts) or "–", (first if first is not None else -1.0)


# -- regressions and changes ---------------------------------------------------------------------


def regression_badge(reg: dict) -> str:
    p = reg.get("payload") or {}
    if p.get("kind") == "cka_drop":
        text = f"CKA drop {p.get('layer')}: {p.get('cka', float('nan')):.6f}"
    elif p.get("kind") == "bias":
        text = f"bias worse: {p.get('attribute')} {p.get('disparity')}"
    elif p.get("kind") == "attribution":
        text = (f"background share up: {p.get('layer')} {p.get('method')} {fmt(p.get('previous'))} → "
                f"{fmt(p.get('current'))}")
    else:
        text = reg["metric"]
    return badge(text)


def regressions_html(regs: list[dict]) -> str:
    if not regs:
        return ""
    def shown(k, v):   # snapshot ids cut to 12 characters, as elsewhere on the pages
        return esc(str(v)[:12]) if "snapshot" in k and v else esc(v)

    rows = "".join(f"<li>{regression_badge(r)} <code>{esc(r['metric'])}</code> on {esc(r['dataset'])}: "
                   + ", ".join(f"{esc(k)} {shown(k, v)}" for k, v in (r.get("payload") or {}).items()
                               if k not in ("kind",)) + "</li>" for r in regs)
    return f"<p>Regression events fired tonight (<code>zooaudit.audit.regression</code>):</p><ul>{rows}</ul>"


def _moved_items(c, limit: int) -> str:
    items = "".join(
        f"<li><code>{esc(n)}</code>: {fmt(a, 4)} → {fmt(b, 4)}"
        + (f" <span class='ctl'>({b - a:+.3g})</span>" if a is not None and b is not None else "") + "</li>"
        for n, (a, b) in list(c.metrics.items())[:limit])
    if len(c.metrics) > limit:
        items += f"<li class='ctl'>… {len(c.metrics) - limit} more</li>"
    return items


def _largest_move(c) -> str:
    moved = [(abs(b - a), n, a, b) for n, (a, b) in c.metrics.items() if a is not None and b is not None]
    if not moved:
        return ""
    _, n, a, b = max(moved)
    return f"; largest: <code>{esc(n)}</code> {fmt(a)} → {fmt(b)}"


def changes_html(diff, *, full: bool = False, limit: int = 40) -> str:
    """``zooaudit diff <previous tag> main`` as HTML: changed stages and the metrics that moved.
    Compact (the summary's cell: one line per stage, the list folded in a ``<details>``) unless
    ``full`` (the model page: every moved metric, cache keys, arrays)."""
    if diff is None:
        return "<span class='ctl'>no earlier tag</span>"
    tag, d = diff
    if not d.stages:
        return f"<span class='ctl'>no stage changed since {esc(tag)}</span>"
    items = []
    for c in d.stages:
        head = f"<b>{esc(c.status)}</b> {esc(c.stage)} <span class='ctl'>{esc(c.dataset)}</span>"
        keys = f" <span class='ctl'>{esc(c.cache_key_a)} → {esc(c.cache_key_b)}</span>" if full else ""
        if c.status in ("added", "removed") or not c.metrics:
            what = "" if c.status in ("added", "removed") else ": new result, no headline metric moved"
            items.append(f"<li>{head}{what}{keys}</li>")
        else:
            items.append(f"<li><details><summary>{head}: {len(c.metrics)} metrics moved{_largest_move(c)}{keys}"
                         f"</summary><ul class='changes'>{_moved_items(c, limit)}</ul></details></li>")
    arrays = ""
    if full:
        arrays = "".join(f"<details class='ctl'><summary>arrays {k}: {len(v)}</summary>{esc(', '.join(v[:40]))}"
                         f"{' …' if len(v) > 40 else ''}</details>" for k, v in d.arrays.items() if v)
    return (f"<div>since <code>{esc(tag)}</code> <span class='ctl'>(<code>zooaudit diff MODEL {esc(tag)} main</code>)"
            f"</span>:<ul class='changes'>{''.join(items)}</ul>{arrays}</div>")


# -- the summary's columns -------------------------------------------------------------------------


def _bias_results(audit):
    return [(ref, next((r for r in audit.results if r.stage == "bias" and r.dataset == ref.ds_key), None))
            for ref in audit.refs]


def _opener(ref, res):
    return lambda group: ref.repository.open(group, res.snapshot).load()


def worst_group_column(audit, night: Night) -> tuple[str, float]:
    return worst_group_cell([(ref.dataset.name, w) for ref, res in _bias_results(audit) if res is not None
                             for w in [worst_group(_opener(ref, res), ref, res)] if w])


def disparity_column(audit, night: Night) -> tuple[str, float]:
    return disparity_cell([(ref.dataset.name, largest_disparity(_opener(ref, res), ref, res))
                           for ref, res in _bias_results(audit) if res is not None
                           if any(isinstance(s, dict) and s.get("disparities") for s in (res.summary or {}).values())])


def drift_column(audit, night: Night) -> tuple[str, float]:
    return drift_cell(night, audit.model, audit.refs, audit.results)


def explained_variance_column(audit, night: Night) -> tuple[str, float]:
    return explained_variance_cell(night, audit.refs, audit.results)


def regressions_column(audit, night: Night) -> tuple[str, float]:
    regs = night.regressions_of(audit.model)
    return "".join(regression_badge(r) for r in regs) or "<span class='badge ok'>none</span>", len(regs)


def changes_column(audit, night: Night) -> tuple[str, float]:
    diff = night.diff_of(audit.model)
    return changes_html(diff), (len(diff[1].stages) if diff else 0)


@dataclass(frozen=True)
class SummaryColumn:
    """One column of the summary table: ``cell(audit, night) -> (html, sort value)``."""

    title: str
    cell: object


# The summary's columns after the model's name, in order. A stage adds its headline with
# register_column (e.g. background reliance, activation statistics).
SUMMARY_COLUMNS: list[SummaryColumn] = [
    SummaryColumn("worst-group accuracy [CI]", worst_group_column),
    SummaryColumn("largest significant disparity [CI]", disparity_column),
    SummaryColumn("linear CKA to previous night (control)", drift_column),
    SummaryColumn("explained variance at k", explained_variance_column),
    SummaryColumn("regressions tonight", regressions_column),
    SummaryColumn("changed since the previous tag", changes_column),
]


def register_column(column: SummaryColumn, *, before: str | None = None) -> None:
    """Add a headline column to the summary (before the column titled ``before``, else before the
    regressions); registering a title twice replaces it."""
    SUMMARY_COLUMNS[:] = [c for c in SUMMARY_COLUMNS if c.title != column.title]
    before = before or "regressions tonight"
    at = next((i for i, c in enumerate(SUMMARY_COLUMNS) if c.title == before), len(SUMMARY_COLUMNS))
    SUMMARY_COLUMNS.insert(at, column)
