"""The token-attribution section of a text model's page (:mod:`zooaudit.stages.attribution_text`).

Top tokens per method (mean attribution over their occurrences, from the commit's summary) — for
a classifier's class output also per target class — then the first mapped texts with each token
shaded by its Integrated Gradients share (or gradient × input when IG was not run): red raises
the explained output (the similarity to the reference, or the target class's logit), blue lowers
it; the shade is |attribution| / the text's largest |attribution|, so texts are comparable in
pattern, not in scale (the raw sum is the score change, printed beside each text).
"""

from __future__ import annotations

import html

import numpy as np

from .. import layout
from ..stages.attribution_text import TOKENS_LAYER
from ..token_attribution import sample_tokens
from .statistics import _fmt, _table

SHOWN_TEXTS = 8


def _shaded(tokens: list[str], values: np.ndarray) -> str:
    scale = float(np.abs(values).max()) or 1.0
    spans = []
    for tok, v in zip(tokens, values):
        a = min(1.0, abs(float(v)) / scale)
        rgb = "214,39,40" if v > 0 else "31,119,180"
        spans.append(f"<span style='background: rgba({rgb},{a:.2f}); padding: 0 2px' "
                     f"title='{float(v):+.4f}'>{html.escape(tok)}</span>")
    return " ".join(spans)


def token_attribution_section(open_group, ref, result) -> list[str]:
    """HTML for one text model's token attributions on one dataset. ``open_group(group) ->
    Dataset`` at the stage's snapshot."""
    ds = open_group(layout.attribution_group(ref.ds_key, TOKENS_LAYER, "tokens"))
    summary = result.summary or {}
    methods = [str(m) for m in ds["method"].values]
    classify = "target" in ds
    names = list(ds.attrs.get("class_names", []))
    if classify:
        what, score_name = f"logit of the {ds.attrs.get('target', 'predicted')} class", "target logit"
    else:
        what, score_name = f"similarity to “{ds.attrs.get('reference', '')}”", "similarity"
    out = [f"<h4>Token attributions: {html.escape(what)}</h4>",
           f"<p>{html.escape(str(ds.attrs.get('output', '')))}, attributed to the {html.escape(str(ds.attrs.get('wrt')))}"
           f"; Integrated Gradients: {int(ds.attrs.get('ig_steps', 0))} {html.escape(str(ds.attrs.get('ig_rule')))} "
           f"steps, baseline {html.escape(str(ds.attrs.get('ig_baseline')))}. {ds.sizes['sample']} texts, mean "
           f"{score_name} {_fmt(summary.get('mean_score'))}"
           + (f", accuracy {_fmt(summary['accuracy'])}" if "accuracy" in summary else "")
           + (f", mean |completeness gap| {_fmt(summary.get('mean_abs_ig_gap'))}" if "mean_abs_ig_gap" in summary
              else "") + ".</p>"]
    for m in methods:
        rows = [[html.escape(r["token"]), r["mean"], str(r["count"])] for r in summary.get("top_tokens", {}).get(m, [])]
        if rows:
            out.append(f"<h5>Tokens with the largest mean attribution — {html.escape(m)}</h5>"
                       + _table(["token", "mean attribution", "occurrences"], rows))
    for cls, per_method in (summary.get("top_tokens_by_target") or {}).items():
        shown_m = "integrated_gradients" if "integrated_gradients" in per_method else next(iter(per_method), None)
        rows = [[html.escape(r["token"]), r["mean"], str(r["count"])] for r in per_method.get(shown_m) or []]
        if rows:
            out.append(f"<h5>Target class {html.escape(cls)}: tokens with the largest mean attribution — "
                       f"{html.escape(shown_m)}</h5>" + _table(["token", "mean attribution", "occurrences"], rows))
    by_group = summary.get("mean_score_by_group") or {}
    if by_group:
        out.append(_table(["attribute", "group", f"mean {score_name}"],
                          [[html.escape(a), html.escape(g), v] for a, groups in by_group.items()
                           for g, v in groups.items()]))
    shown = "integrated_gradients" if "integrated_gradients" in methods else methods[0]
    j = methods.index(shown)
    rows = []
    for i in range(min(SHOWN_TEXTS, ds.sizes["sample"])):
        tokens, values = sample_tokens(ds, i)
        row = [str(ds["sample"].values[i]), _shaded(tokens, values[:, j]), float(ds["score"].values[i]),
               float(values[:, j].sum())]
        if classify:
            t = int(ds["target"].values[i])
            row.insert(1, html.escape(names[t] if t < len(names) else str(t)))
        rows.append(row)
    head = ["sample"] + (["target"] if classify else []) + ["tokens", score_name, "Σ attribution"]
    out.append(f"<h5>Texts, tokens shaded by {html.escape(shown)} (red: raises the {score_name}, blue: lowers "
               f"it)</h5>" + _table(head, rows))
    return out
