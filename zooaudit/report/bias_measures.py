"""Report sections of the bias measures beyond group accuracy, from committed results only:
amplification table, contextual-bias pairs, counterfactual accuracy by group (chart), the
components that carry the bias (with their top samples, the galleries' ids), a zoo table
ranking models by each measure, and the measures against the shortcut strength."""

from __future__ import annotations

import html

import numpy as np

from .. import layout
from .figures import _line_chart_png, _png, plt

MEASURE_LABELS = {"mals": "BiasAmp (Zhao 2017)", "directional_at": "BiasAmp→ A→T", "directional_ta": "BiasAmp→ T→A",
                  "multi_mals": "Multi_MALS", "multi_gm": "Multi→ G→M", "multi_mg": "Multi→ M→G"}


def _f(v) -> str:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return "–"
    return f"{v:.3f}" if np.isfinite(v) else "–"


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    return f"<table><tr>{head}</tr>" + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>"
                                              for r in rows) + "</table>"


def cf_bars_png(ds, title: str) -> bytes:
    """Accuracy on the originals and on their counterfactual partners, per group, with Wilson intervals."""
    groups = [str(g) for g in ds["group"].values]
    x = np.arange(len(groups))
    fig, ax = plt.subplots(figsize=(5, 3))
    for dx, var, label in ((-0.2, "accuracy", "original"), (0.2, "cf_accuracy", "counterfactual")):
        v, ci = ds[var].values, ds[f"{var}_wilson"].values
        ax.bar(x + dx, v, 0.4, label=label, yerr=np.abs(np.stack([v - ci[:, 0], ci[:, 1] - v])), capsize=3)
    ax.set_xticks(x, groups, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    return _png(fig)


def bias_measures_section(open_group, plan, bias_result, features_result, base: str, files: dict) -> list[str]:
    """HTML for one model's amplification, contextual, shortcut and bias-feature results on one dataset.
    ``open_group(group, snapshot)`` opens a committed group; results may be None."""
    out = []
    summary = (bias_result.summary or {}) if bias_result is not None else {}
    for attr, s in summary.items():
        if not isinstance(s, dict):
            continue
        if "amplification" in s:
            ds = open_group(f"{layout.bias_group(plan.ds_key, 'amplification')}/{attr}", bias_result.snapshot)
            rows = [[MEASURE_LABELS.get(str(m), str(m)), _f(ds["value"].sel(measure=m)),
                     "[{}, {}]".format(*(_f(v) for v in ds["value_ci"].sel(measure=m).values)),
                     _f(ds["variance"].sel(measure=m)), _f(ds["p_adjusted"].sel(measure=m)),
                     "yes" if bool(ds["reject"].sel(measure=m)) else ""] for m in ds["measure"].values]
            out.append(f"<h4>Bias amplification of {html.escape(attr)} (training side "
                       f"{html.escape(str(ds.attrs.get('train_dataset', '')))})</h4>"
                       + _table(["measure", "value", "bootstrap CI", "variance", "p (adjusted)", "flagged"], rows))
        if "contextual" in s:
            ds = open_group(f"{layout.bias_group(plan.ds_key, 'contextual')}/{attr}", bias_result.snapshot)
            rows = [[html.escape(str(ds["category"].values[i])), html.escape(str(ds["context"].values[i])),
                     _f(ds["bias"].values[i]), "[{}, {}]".format(*(_f(v) for v in ds["bias_ci"].values[i])),
                     _f(ds["acc_cooccur"].values[i]), _f(ds["acc_exclusive"].values[i]),
                     f"{int(ds['n_cooccur'].values[i])} / {int(ds['n_exclusive'].values[i])}"
                     + (" (small)" if bool(ds["small"].values[i]) else "")] for i in range(min(10, ds.sizes["pair"]))]
            out.append(f"<h4>Contextual bias: most biased (category, {html.escape(attr)}) pairs</h4>"
                       + _table(["category", "context", "bias score", "CI", "co-occurring acc.", "exclusive acc.",
                                 "n co-occ. / excl."], rows))
        if "shortcut" in s:
            ds = open_group(f"{layout.bias_group(plan.ds_key, 'shortcut')}/{attr}", bias_result.snapshot)
            name = f"{base}-shortcut-{attr}.png"
            files[name] = cf_bars_png(ds, f"counterfactual accuracy by {attr} (Wilson CI)")
            c = s["shortcut"]
            out.append(f"<h4>Shortcut reliance ({html.escape(attr)} swapped): flip rate {_f(c['flip_rate'])}, "
                       f"accuracy {_f(c['accuracy'])} → {_f(c['cf_accuracy'])} on counterfactuals, worst uncommon "
                       f"setting {_f(c.get('worst_minority_counterfactual'))} "
                       f"({html.escape(str(c.get('worst_minority_counterfactual_cell', '–')))})</h4><img src='{name}' alt='Accuracy on original and counterfactual inputs per group, with confidence intervals'>")
    if features_result is not None and features_result.summary.get("top_components"):
        ds = open_group(layout.bias_group(plan.ds_key, "features"), features_result.snapshot)
        for target in ds["target"].values:
            row = ds.sel(target=target)
            order = np.argsort(row["rank"].values)[:5]
            rows = []
            for i in order:
                layer, method, comp = (str(row["layer"].values[i]), str(row["method"].values[i]),
                                       int(row["component"].values[i]))
                rows.append([html.escape(layer), html.escape(method), str(comp), _f(row["auc"].values[i]),
                             "[{}, {}]".format(*(_f(v) for v in row["auc_ci"].values[i])),
                             _f(row["p_adjusted"].values[i]), _gallery(open_group, plan, features_result, layer,
                                                                       method, comp, base, files)])
            out.append(f"<h4>Components that carry {html.escape(str(target))} (AUC, DeLong CI, corrected across "
                       "components)</h4>" + _table(["layer", "method", "component", "AUC", "CI", "p (adjusted)",
                                                     "top samples (gallery)"], rows))
    return out


def _gallery(open_group, plan, result, layer: str, method: str, comp: int, base: str, files: dict) -> str:
    """The ids of the component's top-activating samples, linked to the factorize section's concept
    gallery of that (layer, method) when the report drew one (row ``comp`` of it)."""
    try:
        f = open_group(layout.factors_group(plan.ds_key, layer, method), result.snapshot)
        ids = ", ".join(str(int(v)) for v in f["top_sample"].values[comp][:6])
    except (KeyError, FileNotFoundError, IndexError):
        return "–"
    name = f"{base}-gallery-{layer}-{method}.png"
    return f"<a href='{html.escape(name)}'>{ids} (gallery row {comp})</a>" if name in files else ids


def zoo_measures_table(audits) -> list[str]:
    """Models ranked by each measure (from the stage summaries): amplification A→T, top contextual bias,
    counterfactual flip rate — highest first."""
    rows = []
    for audit in audits:
        for r in audit.results:
            if r.stage != "bias" or not r.summary:
                continue
            for attr, s in r.summary.items():
                if not isinstance(s, dict) or not {"amplification", "contextual", "shortcut"} & set(s):
                    continue
                amp = (s.get("amplification") or {}).get("directional_at", {}).get("value")
                ctx = (s.get("contextual") or [{}])[0].get("bias") if s.get("contextual") else None
                flip = (s.get("shortcut") or {}).get("flip_rate")
                rows.append((audit.model, r.dataset, attr, amp, ctx, flip))
    if len(rows) < 2:
        return []
    rows.sort(key=lambda t: -(t[3] if t[3] is not None else -np.inf))
    return ["<h2>Bias measures across the zoo (ranked by BiasAmp→ A→T)</h2>" + _table(
        ["model", "dataset", "attribute", "BiasAmp→ A→T", "top contextual bias", "flip rate"],
        [[html.escape(m), html.escape(d), html.escape(a), _f(x), _f(y), _f(z)] for m, d, a, x, y, z in rows])]


def measures_sweep_section(audits, files: dict) -> list[str]:
    """Amplification, contextual bias and flip rate against the colour flip of each colored model's training set."""
    points = []
    for audit in audits:
        for plan in audit.refs:
            flip = (plan.model_info.get("train_data") or {}).get("color_flip")
            res = next((r for r in audit.results if r.stage == "bias" and r.dataset == plan.ds_key), None)
            s = (res.summary or {}).get("colour") if res is not None else None
            if flip is None or not s or "amplification" not in s:
                continue
            points.append((flip, s["amplification"]["directional_at"]["value"],
                           (s.get("shortcut") or {}).get("flip_rate")))
    if len(points) < 2:
        return []
    points.sort()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label="BiasAmp→ A→T")
    if all(p[2] is not None for p in points):
        ax.plot([p[0] for p in points], [p[2] for p in points], marker="s", label="counterfactual flip rate")
    ax.set_xlabel("colour flip probability in training (smaller = stronger shortcut)")
    files["bias-measures-sweep.png"] = _line_chart_png(fig, ax, "amplification and reliance vs shortcut strength")
    return ["<h2>Amplification and shortcut reliance against the shortcut strength</h2>"
            "<img src='bias-measures-sweep.png' alt='Bias measures across the zoo's shortcut-strength sweep'>"]


_BIASAMP = (("mals", "BiasAmp (Zhao 2017)"), ("directional_at", "BiasAmp→ A→T"))


def zoo_biasamp_section(audits, files: dict) -> list[str]:
    """BiasAmp (Zhao 2017) and BiasAmp→ A→T with their bootstrap CIs per (model, dataset, attribute),
    read from the committed bias summaries; ordered by the training colour flip where the model records
    one (the correlation strength it was trained at), then by model. A chart with CI error bars beside
    the table (``bias-amp-zoo.png``)."""
    rows = []
    for audit in audits:
        flips = {plan.ds_key: (plan.model_info.get("train_data") or {}).get("color_flip")
                 for plan in getattr(audit, "refs", [])}
        for r in audit.results:
            if r.stage != "bias" or not r.summary:
                continue
            for attr, s in r.summary.items():
                amp = s.get("amplification") if isinstance(s, dict) else None
                if not amp or not any(m in amp for m, _ in _BIASAMP):
                    continue
                rows.append((audit.model, r.dataset, attr, flips.get(r.dataset),
                             {m: amp.get(m) or {} for m, _ in _BIASAMP}))
    if not rows:
        return []
    rows.sort(key=lambda t: (t[3] is None, t[3] if t[3] is not None else 0.0, t[0], t[1], t[2]))

    def cell(m: dict) -> str:
        ci = m.get("ci") or [None, None]
        return f"{_f(m.get('value'))} [{_f(ci[0])}, {_f(ci[1])}]" + (" ⚑" if m.get("flagged") else "")

    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(rows) + 2), 3.2))
    x = np.arange(len(rows))
    for k, (m, label) in enumerate(_BIASAMP):
        v = np.array([np.nan if t[4][m].get("value") is None else t[4][m]["value"] for t in rows], float)
        ci = np.array([[np.nan if c is None else c for c in (t[4][m].get("ci") or [None, None])] for t in rows], float)
        err = np.abs(np.stack([v - ci[:, 0], ci[:, 1] - v]))
        ax.errorbar(x + (k - 0.5) * 0.2, v, yerr=np.where(np.isfinite(err), err, 0), fmt="o", capsize=3, label=label)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(x, [f"{t[0].split(':')[-1]}" + ("" if t[3] is None else f"\nflip {t[3]:g}") for t in rows],
                  fontsize=7)
    files["bias-amp-zoo.png"] = _line_chart_png(fig, ax,
                                                "bias amplification per model (bootstrap CI at the bias spec's level)")
    return ["<h2>Bias amplification per model (with CIs)</h2>"
            "<img src='bias-amp-zoo.png' alt='BiasAmp and BiasAmp→ A→T per model with bootstrap CIs'>" + _table(
                ["model", "dataset", "attribute", "training colour flip"] + [label + " [CI]" for _, label in _BIASAMP],
                [[html.escape(m), html.escape(d), html.escape(a), "–" if fl is None else f"{fl:g}"]
                 + [cell(ms[k]) for k, _ in _BIASAMP] for m, d, a, fl, ms in rows])
            + "<p>⚑: significant after the bias stage's correction across the run's measures × attributes.</p>"]
