"""Bias section of the report: group bars with intervals, disparities, leakage with
controls, erasure, and the shortcut sweep across colored-digits models."""

from __future__ import annotations

import html

import numpy as np
import xarray as xr

from .. import layout
from .figures import bars_png, sweep_png
from .page import figure


def _fmt(v) -> str:
    return "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.3f}"


def _rows(ds: xr.Dataset) -> list[str]:
    rows = []
    for i, g in enumerate(ds["group"].values):
        ci = ds["accuracy_ci"].values[i] if "accuracy_ci" in ds else (np.nan, np.nan)
        small = " (small)" if bool(ds["small"].values[i]) else ""
        rows.append(f"<tr><td>{html.escape(str(g))}</td><td>{_fmt(ds['accuracy'].values[i])}</td>"
                    f"<td>[{_fmt(ci[0])}, {_fmt(ci[1])}]</td><td>{int(ds['count'].values[i])}{small}</td></tr>")
    for i, c in enumerate(ds["cell"].values):
        ci = ds["cell_accuracy_ci"].values[i] if "cell_accuracy_ci" in ds else (np.nan, np.nan)
        rows.append(f"<tr class=cell><td>{html.escape(str(c))}</td><td>{_fmt(ds['cell_accuracy'].values[i])}</td>"
                    f"<td>[{_fmt(ci[0])}, {_fmt(ci[1])}]</td><td>{int(ds['cell_count'].values[i])}</td></tr>")
    return rows


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th scope='col'>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c if isinstance(c, str) else _fmt(c)}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def bias_section(open_group, plan, result, base: str, files: dict, *, open_line=None) -> list[str]:
    """HTML for one model's bias stage on one dataset; ``open_line(group) -> str`` is the line that
    opens a figure's data, shown under it."""
    out = []
    line = open_line or (lambda group: None)
    for attr, s in (result.summary or {}).items():
        if attr == "weat":  # the association tests of text encoders, not a group attribute
            out.extend(weat_section(s))
            continue
        if "overall_accuracy" not in s and "probe_accuracy" not in s:   # a set-valued attribute: amplification
            continue                                                       # only (bias_measures_section)
        if "overall_accuracy" not in s:  # an encoder: no predictions, representation probes only
            probes = s.get("probe_accuracy") or {}
            layers = list(next(iter(probes.values()), {}))
            out.append(f"<h4>Bias: probe accuracy of {html.escape(attr)} (chance {_fmt(s.get('probe_chance'))}); "
                       "leakage means something only beside its controls</h4>" + _table(
                           ["probe"] + layers, [[p] + [v[l] for l in layers] for p, v in probes.items()]))
            continue
        ds = open_group(layout.bias_group(plan.ds_key, attr))
        name = f"{base}-bias-{attr}.png"
        ci = f"bootstrap {ds.attrs.get('ci', 0.95):.0%} CI"
        files[name] = bars_png(ds, f"accuracy by {attr} ({ci})")
        out.append(f"<h4>Bias: accuracy by {html.escape(attr)} — overall {_fmt(s['overall_accuracy'])}, "
                   f"worst-group {_fmt(s['worst_group_accuracy'])} ({html.escape(s['worst_group'])})</h4>"
                   + figure(name, f"Bar chart of accuracy per {attr} group with {ci} error bars",
                            f"accuracy (fraction correct) per {html.escape(attr)} group; error bars: {ci}.",
                            open_line=line(layout.bias_group(plan.ds_key, attr))))
        out.append("<table><thead><tr><th scope='col'>group / cell</th><th scope='col'>accuracy</th>"
                   "<th scope='col'>bootstrap CI</th><th scope='col'>n</th></tr></thead><tbody>"
                   + "".join(_rows(ds)) + "</tbody></table>")
        disp = s.get("disparities", {})
        if disp:
            out.append("<p>Disparities (permutation p-values, corrected across the run):</p>" + _table(
                ["metric", "difference", "adjusted p", "flagged"],
                [[m, v["difference"], v["p_adjusted"], "<b>yes</b>" if v["flagged"] else "no"]
                 for m, v in disp.items()]))
        if s.get("regressions"):
            out.append(f"<p><b>Significantly worse than the previous audit "
                       f"({html.escape(str(s.get('previous_snapshot'))[:12])}):</b> "
                       f"{html.escape(', '.join(s['regressions']))}</p>")
        probes = s.get("probe_accuracy")
        if probes:
            layers = list(next(iter(probes.values())))
            out.append(f"<p>Probe accuracy of {html.escape(attr)} (chance {_fmt(s.get('probe_chance'))}); "
                       "leakage means something only beside its controls:</p>" + _table(
                           ["probe"] + layers, [[p] + [v[l] for l in layers] for p, v in probes.items()]))
        if "output_leakage" in s:
            ol = s["output_leakage"]
            out.append(f"<p>Leakage from the model's outputs within each true label: {_fmt(ol.get('leakage'))} "
                       f"(chance {_fmt(ol.get('chance'))}, excess {_fmt(ol.get('excess'))}).</p>")
        if "erasure_delta_worst_group" in s:
            d = s["erasure_delta_worst_group"]
            out.append("<p>LEACE erasure: change in worst-group accuracy of a refit readout:</p>"
                       + _table(["layer", "Δ worst-group accuracy"], [[k, v] for k, v in d.items()]))
    return out


def weat_section(rows: list[dict]) -> list[str]:
    """WEAT/SEAT table: effect size d (ddof 1), one-sided p, Holm-adjusted within (method, layer)."""
    if not rows:
        return []
    return ["<h4>Embedding association tests (WEAT / SEAT)</h4><p>Effect size d (sample std, ddof = 1); "
            "one-sided partition-test p-value; Holm-adjusted within the tests of one method and layer.</p>"
            + _table(["method", "layer", "test", "effect size d", "p", "Holm p", "significant", "n per target set"],
                     [[html.escape(r["method"]), html.escape(r["layer"]), html.escape(r["test"]), r["effect_size"],
                       r["p_value"], r["p_adjusted"], "<b>yes</b>" if r["significant"] else "no",
                       str(r["n_targets"])] for r in rows])]


def shortcut_sweep_section(audits, files: dict) -> list[str]:
    """Worst-group accuracy and output leakage against the colour flip of each colored model's training set."""
    points = []
    for audit in audits:
        for plan in audit.refs:
            flip = (plan.model_info.get("train_data") or {}).get("color_flip")
            res = next((r for r in audit.results if r.stage == "bias" and r.dataset == plan.ds_key), None)
            if flip is None or res is None or "colour" not in (res.summary or {}):
                continue
            s = res.summary["colour"]
            points.append((flip, s["worst_group_accuracy"], (s.get("output_leakage") or {}).get("leakage")))
    if len(points) < 2:
        return []
    points.sort()
    files["shortcut-sweep.png"] = sweep_png(points)
    rows = "".join(f"<tr><td>{f:.2f}</td><td>{_fmt(w)}</td><td>{_fmt(l)}</td></tr>" for f, w, l in points)
    return [figure("shortcut-sweep.png", "Worst-group accuracy and colour leakage against the training colour flip",
                     "worst-group accuracy and output leakage of colour (fractions, 0–1) against the probability that "
                     "a training image's colour disagrees with its label.")
            + "<table><thead><tr><th scope='col'>colour flip in training</th><th scope='col'>worst-group accuracy</th>"
            "<th scope='col'>output leakage of colour</th></tr></thead><tbody>" + rows + "</tbody></table>"]
