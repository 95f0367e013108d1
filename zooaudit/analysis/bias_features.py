"""Which learned features carry the bias: how well each factorization component separates a target.

For every component ``j`` (a column of the codes ``(sample, component)``) and a binary target
(one value of a group attribute against the rest; or the model's errors, ``ŷ ≠ y``):

- ``auc``: the ROC AUC of the code as a score for the target (Mann–Whitney: P(code of a
  positive > code of a negative), ties ½). 0.5 = no separation; below 0.5 the component
  separates too, with the sign reversed: ``separation = |auc − 0.5|`` ranks them.
- ``auc_ci``: DeLong et al. (1988) interval, ``auc ± z·√(var)``, clipped to [0, 1], with
  the structural components computed from midranks (Sun & Xu 2014): ``V10_i = (R_i − R^+_i)/n``
  over positives, ``V01_k = 1 − (R_k − R^-_k)/m`` over negatives (``R``: midrank among all,
  ``R^±``: among positives / negatives), ``var = s²(V10)/m + s²(V01)/n`` (ddof 1).
- ``p_value``: two-sided DeLong z-test of ``auc = 0.5``; BH/Holm across every component of the
  family the caller passes (all layers × methods × components of one target).
- Min-n policy: a target whose positive or negative class has fewer than ``min_group_size``
  samples gets AUCs (flagged ``small``) but no p-values.
"""

from __future__ import annotations

import numpy as np
import xarray as xr
from scipy.stats import norm, rankdata

from ..errors import ZooauditError
from .fairness import CI_COORD


def delong_auc(scores: np.ndarray, target: np.ndarray, *, ci: float = 0.95):
    """``(auc (k,), ci (k, 2), p (k,))`` of each column of ``scores`` ``(n, k)`` for the binary ``target`` ``(n,)``."""
    X = np.asarray(scores, dtype=np.float64)
    t = np.asarray(target).astype(bool)
    if X.ndim != 2 or len(t) != X.shape[0]:
        raise ZooauditError(f"scores must be (n_samples, n_components) with one target per sample; got scores "
                            f"{X.shape} and target {t.shape}.")
    m, n = int(t.sum()), int((~t).sum())
    k = X.shape[1]
    if m == 0 or n == 0:
        return np.full(k, np.nan), np.full((k, 2), np.nan), np.full(k, np.nan)
    r_all = rankdata(X, axis=0)
    r_pos, r_neg = rankdata(X[t], axis=0), rankdata(X[~t], axis=0)
    auc = (r_all[t].sum(0) - m * (m + 1) / 2) / (m * n)
    v10 = (r_all[t] - r_pos) / n
    v01 = 1.0 - (r_all[~t] - r_neg) / m
    var = (v10.var(0, ddof=1) / m if m > 1 else 0.0) + (v01.var(0, ddof=1) / n if n > 1 else 0.0)
    se = np.sqrt(var)
    z = norm.ppf(1 - (1 - ci) / 2)
    lohi = np.clip(np.stack([auc - z * se, auc + z * se], 1), 0.0, 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.where(se > 0, 2 * norm.sf(np.abs(auc - 0.5) / np.where(se > 0, se, 1)), np.where(auc == 0.5, 1.0, 0.0))
    return auc, lohi, p


def component_aucs(codes: np.ndarray, targets: dict[str, np.ndarray], *, component_names=None, ci: float = 0.95,
                   min_group_size: int = 20) -> xr.Dataset:
    """AUC of every component for every binary target.

    Args:
        codes: ``(n_samples, n_components)``.
        targets: ``{target name: (n_samples,) bool}`` (e.g. ``"colour=red"``, ``"error"``).
    Returns:
        Dataset over ``(target, component)``: ``auc``, ``auc_ci`` (+ ``ci``), ``separation``,
        ``p_value``; ``n_pos``, ``small`` per target. No correction (the caller's family).
    """
    codes = np.asarray(codes, dtype=np.float64)
    k = codes.shape[1]
    names = list(targets)
    auc, lohi, p = np.full((len(names), k), np.nan), np.full((len(names), k, 2), np.nan), np.full((len(names), k), np.nan)
    n_pos, small = np.zeros(len(names), np.int64), np.zeros(len(names), bool)
    for i, name in enumerate(names):
        t = np.asarray(targets[name]).astype(bool)
        n_pos[i] = t.sum()
        small[i] = min(t.sum(), (~t).sum()) < max(min_group_size, 2)
        auc[i], lohi[i], p[i] = delong_auc(codes, t, ci=ci)
        if small[i]:
            p[i] = np.nan
    comps = component_names if component_names is not None else np.arange(k)
    return xr.Dataset({"auc": (("target", "component"), auc), "auc_ci": (("target", "component", "ci"), lohi),
                       "separation": (("target", "component"), np.abs(auc - 0.5)),
                       "p_value": (("target", "component"), p), "n_pos": ("target", n_pos),
                       "small": ("target", small)},
                      coords={"target": names, "component": comps, "ci": CI_COORD},
                      attrs={"ci": float(ci), "min_group_size": int(min_group_size),
                             "ci_method": "DeLong (midrank structural components)",
                             "test": "two-sided DeLong z-test of AUC = 0.5"})


def group_targets(groups: np.ndarray, names: list[str], attr: str) -> dict[str, np.ndarray]:
    """One-vs-rest targets ``{"attr=value": (n,) bool}`` of an attribute (one target when it is binary)."""
    values = np.unique(groups)
    if values.size < 2:
        raise ZooauditError(f"group attribute {attr!r} has a single value ({values.tolist()}); a component can "
                            "only separate an attribute with two or more observed values.")
    shown = values[1:] if values.size == 2 else values
    return {f"{attr}={names[int(v)] if names and 0 <= int(v) < len(names) else v}": groups == v for v in shown}
