"""Shortcut reliance on counterfactual pairs (Geirhos et al. 2020; FOCUS-style uncommon settings).

Each audit sample ``i`` has a counterfactual partner: the same object (digit) with only the
suspected shortcut changed (background swapped; colour swapped). With ``y`` the label, ``ŷ``
the prediction on the original and ``ŷ'`` on the partner:

- per group ``g`` of the original sample: ``accuracy`` ``P(ŷ = y)``, ``cf_accuracy``
  ``P(ŷ' = y)``, ``flip_rate`` ``P(ŷ' ≠ ŷ)`` (Wilson intervals), ``accuracy_drop`` =
  accuracy − cf_accuracy and its paired test: exact McNemar (two-sided binomial test on the
  discordant pairs ``b`` = right→wrong, ``c`` = wrong→right, ``p = binom(b; b + c, ½)``),
  BH/Holm across the groups (the bias stage adjusts again across the run).
- Uncommon settings: a (label × attribute value) cell is a *minority* cell when its share of
  the label's training samples is below ``1/G`` (G attribute values). ``worst_minority_*`` is the
  lowest accuracy over the non-small minority cells, on the originals (cell of the original)
  and on the counterfactuals (cell of the partner: the uncommon setting the swap created).
- Min-n policy as the group metrics: groups and cells with fewer than ``min_group_size`` pairs
  are reported and flagged ``small``; they get no p-value and are never the worst cell
  (unless every minority cell is small: then ``worst_minority_small``).
"""

from __future__ import annotations

import numpy as np
import xarray as xr
from scipy.stats import binomtest

from ..errors import ZooauditError
from .fairness import CI_COORD, wilson_interval
from .multitest import adjust


def check_pairs(ids, cf_ids, labels, cf_labels) -> None:
    """Counterfactual partners must be the same samples, in the same order, with the same labels."""
    ids, cf_ids = np.asarray(ids), np.asarray(cf_ids)
    labels, cf_labels = np.asarray(labels).tolist(), np.asarray(cf_labels).tolist()
    if ids.shape != cf_ids.shape:
        raise ZooauditError(f"counterfactual pairs: {len(ids)} samples but {len(cf_ids)} counterfactuals; "
                            "every sample needs exactly one partner with the same sample id.")
    bad = np.flatnonzero(ids != cf_ids)
    if bad.size:
        raise ZooauditError(f"counterfactual pairs do not match: sample id {ids[bad[0]].item()!r} at row {bad[0]} has the "
                            f"counterfactual id {cf_ids[bad[0]].item()!r} ({bad.size} rows differ); partners must share "
                            "sample ids, in the same order.")
    bad = np.flatnonzero(np.asarray(labels) != np.asarray(cf_labels))
    if bad.size:
        raise ZooauditError(f"counterfactual pairs: sample id {ids[bad[0]].item()!r} has label {labels[bad[0]]!r} but its "
                            f"counterfactual {cf_labels[bad[0]]!r}; a counterfactual changes the shortcut only.")


def _mcnemar(b: int, c: int) -> float:
    return float(binomtest(b, b + c, 0.5).pvalue) if b + c else 1.0


def minority_cells(train_labels, train_groups, n_labels: int, n_groups: int) -> np.ndarray:
    """``(n_labels, n_groups)`` bool: cells whose share of the label's training samples is below 1/G."""
    counts = np.zeros((n_labels, n_groups))
    np.add.at(counts, (np.asarray(train_labels), np.asarray(train_groups)), 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = counts / counts.sum(1, keepdims=True)
    return np.nan_to_num(share, nan=0.0) < 1.0 / n_groups


def shortcut_reliance(y, pred, pred_cf, groups, groups_cf, train_labels, train_groups, *, group_names=None,
                      label_names=None, ci: float = 0.95, min_group_size: int = 20, correction: str = "bh",
                      alpha: float = 0.05) -> xr.Dataset:
    """Counterfactual accuracy, flip rate and minority-cell accuracy (module docstring).

    Args:
        y, pred, pred_cf: ``(n,)`` labels, predictions on the originals and on their partners.
        groups, groups_cf: ``(n,)`` integer attribute codes of the originals and of the partners.
        train_labels, train_groups: the training side, for the minority (uncommon) cells.
    Returns:
        Dataset over ``group`` (of the original) and ``cell`` (label × attribute value).
    """
    y, pred, pred_cf, groups, groups_cf = (np.asarray(a) for a in (y, pred, pred_cf, groups, groups_cf))
    n = len(y)
    for name, a in (("pred", pred), ("pred_cf", pred_cf), ("groups", groups), ("groups_cf", groups_cf)):
        if len(a) != n:
            raise ZooauditError(f"{name} has {len(a)} entries but y has {n}: one per counterfactual pair.")
    if n == 0:
        raise ZooauditError("shortcut_reliance needs at least one counterfactual pair.")
    G = int(max(groups.max(), groups_cf.max(), np.max(train_groups)) + 1) if group_names is None else len(group_names)
    L = int(max(y.max(), pred.max(), pred_cf.max(), np.max(train_labels)) + 1) if label_names is None \
        else len(label_names)
    group_names = [str(g) for g in (group_names if group_names is not None else range(G))]
    label_names = [str(v) for v in (label_names if label_names is not None else range(L))]
    ok, ok_cf, flip = pred == y, pred_cf == y, pred != pred_cf
    count = np.bincount(groups, minlength=G)
    hits = {k: np.bincount(groups, weights=v, minlength=G).astype(np.int64)
            for k, v in (("accuracy", ok), ("cf_accuracy", ok_cf), ("flip_rate", flip))}
    small = count < max(min_group_size, 2)
    p = np.array([np.nan if small[g] else _mcnemar(int(np.sum(ok & ~ok_cf & (groups == g))),
                                                   int(np.sum(~ok & ok_cf & (groups == g)))) for g in range(G)])
    adj = adjust(p, method=correction, alpha=alpha)
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = {k: np.where(count > 0, h / np.maximum(count, 1), np.nan) for k, h in hits.items()}
    data = {"count": ("group", count), "small": ("group", small), "p_value": ("group", p),
            "p_adjusted": ("group", adj.p_adjusted), "reject": ("group", adj.reject),
            "accuracy_drop": ("group", rates["accuracy"] - rates["cf_accuracy"])}
    for k in hits:
        data[k] = ("group", rates[k])
        data[f"{k}_wilson"] = (("group", "ci"), wilson_interval(hits[k], count, ci=ci))
    minority = minority_cells(train_labels, train_groups, L, G)
    cells = {}
    for side, g_codes, correct in (("original", groups, ok), ("counterfactual", groups_cf, ok_cf)):
        code = y * G + g_codes
        c_count = np.bincount(code, minlength=L * G)
        c_hits = np.bincount(code, weights=correct, minlength=L * G).astype(np.int64)
        with np.errstate(invalid="ignore", divide="ignore"):
            acc = np.where(c_count > 0, c_hits / np.maximum(c_count, 1), np.nan)
        cells[side] = (c_count, acc, wilson_interval(c_hits, c_count, ci=ci))
    names = [f"label={label_names[c // G]}|{group_names[c % G]}" for c in range(L * G)]
    for side, (c_count, acc, wil) in cells.items():
        data[f"{side}_cell_count"] = ("cell", c_count)
        data[f"{side}_cell_accuracy"] = ("cell", acc)
        data[f"{side}_cell_wilson"] = (("cell", "ci"), wil)
    data["minority"] = ("cell", minority.ravel())
    ds = xr.Dataset(data, coords={"group": group_names, "cell": names, "ci": CI_COORD})
    attrs = {"n_pairs": int(n), "cf_accuracy": float(ok_cf.mean()), "accuracy": float(ok.mean()),
             "flip_rate": float(flip.mean()),
             "p_value": _mcnemar(int(np.sum(ok & ~ok_cf)), int(np.sum(~ok & ok_cf))),
             "min_group_size": int(min_group_size), "ci": float(ci), "correction": correction,
             "ci_method": "Wilson score", "test": "exact McNemar (two-sided) on discordant pairs"}
    for side, (c_count, acc, _) in cells.items():
        pool = np.flatnonzero(minority.ravel() & (c_count >= max(min_group_size, 2)))
        all_small = pool.size == 0
        if all_small:
            pool = np.flatnonzero(minority.ravel() & (c_count > 0))
        if pool.size:
            worst = int(pool[np.nanargmin(acc[pool])])
            attrs.update({f"worst_minority_{side}": float(acc[worst]), f"worst_minority_{side}_cell": names[worst],
                          f"worst_minority_{side}_small": bool(all_small)})
    ds.attrs.update(attrs)
    return ds
