"""The zoo page's background-reliance ranking: per attribution method, the models ranked by their mean
background share of attribution (with its bootstrap CI), beside the group difference of that share per
attribute (with its CI and adjusted p) and, where the bias stage measured it on the same dataset, the
accuracy drop when the background is swapped (originals − counterfactual partners, with McNemar's p).

Read from the committed summaries only (the attribution stage's per-layer ``background_share``,
``background_share_ci``, ``background_share_by_group``; the bias stage's ``shortcut``); the report computes
nothing beyond the subtraction of the two committed accuracies.
"""

from __future__ import annotations

from .page import esc, fmt, table

__all__ = ["reliance_rows", "zoo_reliance_section"]


def _swap_drop(results, dataset: str) -> dict | None:
    """The counterfactual accuracy drop of the bias result on ``dataset`` (the same over attributes:
    accuracy and cf_accuracy are over every pair), or None."""
    for r in results:
        if r.stage != "bias" or r.dataset != dataset:
            continue
        for s in (r.summary or {}).values():
            sc = s.get("shortcut") if isinstance(s, dict) else None
            if sc and sc.get("accuracy") is not None and sc.get("cf_accuracy") is not None:
                return {"drop": sc["accuracy"] - sc["cf_accuracy"], "accuracy": sc["accuracy"],
                        "cf_accuracy": sc["cf_accuracy"], "p_value": sc.get("p_value")}
    return None


def reliance_rows(audits) -> dict[str, list[dict]]:
    """``{method: [row, …]}`` ranked by mean background share, largest first; a row per (model, dataset,
    layer): ``model, dataset, layer, share, ci, groups {attr: {difference, difference_ci, p_adjusted}},
    swap`` (:func:`_swap_drop`)."""
    out: dict[str, list[dict]] = {}
    for audit in audits:
        for r in audit.results:
            if r.stage != "attribution" or not r.summary:
                continue
            swap = _swap_drop(audit.results, r.dataset)
            for layer, s in r.summary.items():
                if not isinstance(s, dict):
                    continue
                for method, share in (s.get("background_share") or {}).items():
                    if share is None:
                        continue
                    groups = {attr: {k: v.get(k) for k in ("difference", "difference_ci", "p_adjusted")}
                              for attr, by in (s.get("background_share_by_group") or {}).items()
                              for v in [by.get(method)] if v}
                    out.setdefault(method, []).append(
                        {"model": audit.model, "dataset": r.dataset, "layer": layer, "share": share,
                         "ci": (s.get("background_share_ci") or {}).get(method), "groups": groups, "swap": swap})
    for rows in out.values():
        rows.sort(key=lambda t: (-t["share"], t["model"], t["dataset"], t["layer"]))
    return out


def _ci(ci) -> str:
    return f" [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else " [–, –]"


def zoo_reliance_section(audits) -> list[str]:
    """HTML: one ranked table per method (nothing when no model has an attribution result)."""
    ranked = reliance_rows(audits)
    if not ranked:
        return []
    out = ["<h2>Background reliance across the zoo</h2><p>Models ranked by the mean share of their positive "
           "attribution energy outside the object mask (bootstrap CI), per method; the group difference of that "
           "share (higher group code − lower; the range for more groups) with its CI and adjusted p; and, where "
           "the bias stage ran its counterfactual pairs, the accuracy drop when the background is swapped "
           "(accuracy on originals − on partners, McNemar p; negative where the partners score higher, e.g. "
           "originals whose background disagrees with the class).</p>"]
    for method, rows in ranked.items():
        cells = []
        for rank, t in enumerate(rows, 1):
            groups = "<br>".join(f"{esc(a)}: {fmt(g['difference'])}{_ci(g.get('difference_ci'))}, adjusted p "
                                 f"{fmt(g['p_adjusted'], 4)}" for a, g in t["groups"].items()) or "–"
            sw = t["swap"]
            swap = "–" if sw is None else (f"{fmt(sw['drop'])} ({fmt(sw['accuracy'])} → {fmt(sw['cf_accuracy'])}), "
                                           f"p {fmt(sw['p_value'], 4)}")
            cells.append([(str(rank), rank), esc(t["model"]), esc(t["dataset"]), esc(t["layer"]),
                          (f"{fmt(t['share'])}{_ci(t['ci'])}", t["share"]), groups,
                          swap if sw is None else (swap, sw["drop"])])
        out.append(f"<h3>{esc(method)}</h3>" + table(
            ["rank", "model", "dataset", "layer", "background share [CI]", "group difference [CI]",
             "background-swap accuracy drop"], cells, sortable=True))
    return out
