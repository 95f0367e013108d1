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

The midranks come from one sort per component, shared by every target (:func:`_auc_var`): the codes
are read one float64 column at a time, so memory beyond the caller's codes is O(samples).
"""

from __future__ import annotations

import numpy as np
import xarray as xr
from scipy.stats import norm

from ..errors import ZooauditError
from .fairness import CI_COORD


def delong_auc(scores: np.ndarray, target: np.ndarray, *, ci: float = 0.95):
    """``(auc (k,), ci (k, 2), p (k,))`` of each column of ``scores`` ``(n, k)`` for the binary ``target`` ``(n,)``."""
    X = np.asarray(scores)
    t = _check(X, target)
    if t.all() or not t.any():
        k = X.shape[1]
        return np.full(k, np.nan), np.full((k, 2), np.nan), np.full(k, np.nan)
    auc, var = _auc_var(X, t[:, None])
    return _interval(auc[0], var[0], ci)


def _check(X: np.ndarray, target) -> np.ndarray:
    t = np.asarray(target).astype(bool)
    if X.ndim != 2 or len(t) != X.shape[0]:
        raise ZooauditError(f"scores must be (n_samples, n_components) with one target per sample; got scores "
                            f"{X.shape} and target {t.shape}.")
    return t


def _auc_var(X: np.ndarray, T: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(auc (targets, k), DeLong variance (targets, k))`` of the columns of ``X`` ``(n, k)`` (any dtype; one
    float64 column at a time) for the binary targets ``T`` ``(n, targets)``. One sort per column serves
    every target: in sorted order, a tie group ``g`` of ``c_g`` samples, ``c⁺_g`` of them positive, gives
    each positive ``R_i − R⁺_i = N⁻_before(g) + c⁻_g/2`` and each negative ``R_k − R⁻_k = N⁺_before(g) + c⁺_g/2``
    (midranks), so ``V10``, ``V01`` and the AUC are sums over the groups — the midrank values exactly
    (half-integers), the variances to rounding. NaN in a column: NaN AUC and variance (as ``rankdata``)."""
    k, nt = X.shape[1], T.shape[1]
    m, n = T.sum(0), (~T).sum(0)
    auc, var = np.full((nt, k), np.nan), np.full((nt, k), np.nan)
    live = [i for i in range(nt) if m[i] and n[i]]
    for j in range(k):
        x = np.asarray(X[:, j], dtype=np.float64)
        if not live or np.isnan(x).any():
            continue
        order = np.argsort(x)
        xs = x[order]
        gid = np.concatenate([[0], np.cumsum(xs[1:] != xs[:-1])])          # tie group of each sorted sample
        size = np.bincount(gid).astype(np.float64)
        for i in live:
            pos = np.bincount(gid[T[order, i]], minlength=size.size).astype(np.float64)
            neg = size - pos
            below = (np.cumsum(neg) - neg) + neg / 2          # per group: R_i − R⁺_i of its positives (exact)
            auc[i, j] = (pos @ below) / (m[i] * n[i])          # the Mann–Whitney count, exact below 2⁵³
            v10 = below / n[i]
            v01 = 1.0 - ((np.cumsum(pos) - pos) + pos / 2) / m[i]            # per group, for its negatives
            var[i, j] = (_weighted_var(v10, pos, m[i]) / m[i] if m[i] > 1 else 0.0) + \
                        (_weighted_var(v01, neg, n[i]) / n[i] if n[i] > 1 else 0.0)
    return auc, var


def _weighted_var(v: np.ndarray, w: np.ndarray, total: int) -> float:
    """Sample variance (ddof 1) of ``total`` values, ``w[g]`` of them equal to ``v[g]``."""
    mean = (w @ v) / total
    return float(w @ (v - mean) ** 2) / (total - 1)


def _interval(auc: np.ndarray, var, ci: float):
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
        codes: ``(n_samples, n_components)``, any float dtype: read one float64 column at a time (memory
            O(n_samples) beyond ``codes``; no float64 copy of the matrix).
        targets: ``{target name: (n_samples,) bool}`` (e.g. ``"colour=red"``, ``"error"``).
    Returns:
        Dataset over ``(target, component)``: ``auc``, ``auc_ci`` (+ ``ci``), ``separation``,
        ``p_value``; ``n_pos``, ``small`` per target. No correction (the caller's family).
    """
    codes = np.asarray(codes)
    k = codes.shape[1]
    names = list(targets)
    T = np.stack([_check(codes, targets[name]) for name in names], 1) if names else np.zeros((len(codes), 0), bool)
    auc, var = _auc_var(codes, T)
    lohi, p = np.full((len(names), k, 2), np.nan), np.full((len(names), k), np.nan)
    n_pos = T.sum(0).astype(np.int64)
    small = np.minimum(n_pos, len(T) - n_pos) < max(min_group_size, 2)
    for i in range(len(names)):
        _, lohi[i], p[i] = _interval(auc[i], var[i], ci)
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
