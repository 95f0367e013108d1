"""The token-attribution section of a text encoder's model page (:mod:`zooaudit.stages.attribution_text`).

Top tokens per method (mean attribution over their occurrences, from the commit's summary), then
the first mapped texts with each token shaded by its Integrated Gradients share (or gradient ×
input when IG was not run): red raises the similarity to the reference, blue lowers it; the
shade is |attribution| / the text's largest |attribution|, so texts are comparable in pattern,
not in scale (the raw sum is the score change, printed beside each text).
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
    """HTML for one text encoder's token attributions on one dataset. ``open_group(group) ->
    Dataset`` at the stage's snapshot."""
    ds = open_group(layout.attribution_group(ref.ds_key, TOKENS_LAYER, "tokens"))
    summary = result.summary or {}
    methods = [str(m) for m in ds["method"].values]
    out = [f"<h4>Token attributions: similarity to “{html.escape(str(ds.attrs.get('reference', '')))}”</h4>",
           f"<p>{html.escape(str(ds.attrs.get('output', '')))}, attributed to the {html.escape(str(ds.attrs.get('wrt')))}"
           f"; Integrated Gradients: {int(ds.attrs.get('ig_steps', 0))} {html.escape(str(ds.attrs.get('ig_rule')))} "
           f"steps, baseline {html.escape(str(ds.attrs.get('ig_baseline')))}. {ds.sizes['sample']} texts, mean "
           f"similarity {_fmt(summary.get('mean_score'))}"
           + (f", mean |completeness gap| {_fmt(summary.get('mean_abs_ig_gap'))}" if "mean_abs_ig_gap" in summary
              else "") + ".</p>"]
    for m in methods:
        rows = [[html.escape(r["token"]), r["mean"], str(r["count"])] for r in summary.get("top_tokens", {}).get(m, [])]
        if rows:
            out.append(f"<h5>Tokens with the largest mean attribution — {html.escape(m)}</h5>"
                       + _table(["token", "mean attribution", "occurrences"], rows))
    by_group = summary.get("mean_score_by_group") or {}
    if by_group:
        out.append(_table(["attribute", "group", "mean similarity"],
                          [[html.escape(a), html.escape(g), v] for a, groups in by_group.items()
                           for g, v in groups.items()]))
    shown = "integrated_gradients" if "integrated_gradients" in methods else methods[0]
    j = methods.index(shown)
    rows = []
    for i in range(min(SHOWN_TEXTS, ds.sizes["sample"])):
        tokens, values = sample_tokens(ds, i)
        rows.append([str(ds["sample"].values[i]), _shaded(tokens, values[:, j]), float(ds["score"].values[i]),
                     float(values[:, j].sum())])
    out.append(f"<h5>Texts, tokens shaded by {html.escape(shown)} (red: raises the similarity, blue: lowers it)</h5>"
               + _table(["sample", "tokens", "similarity", "Σ attribution"], rows))
    return out
