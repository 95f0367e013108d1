"""Permutation p-values and multiple-testing corrections shared by the bias audits.

Conventions:

- A Monte Carlo permutation p-value is ``(1 + #{null ≥ observed}) / (1 + n_null)``
  (Phipson & Smyth 2010): the observed data count as one draw from the null, so the
  p-value is never 0 and the test is valid (never anti-conservative) at any number
  of permutations. Ties count as "at least as extreme" (conservative).
- :func:`bh` (Benjamini & Hochberg 1995) controls the false discovery rate and is
  the default across all comparisons of one run; :func:`holm` (Holm 1979) controls
  the family-wise error rate and is used within a WEAT family.
- NaN p-values (comparisons that could not be made, e.g. fewer than two eligible
  groups) are left out of the count ``m``, stay NaN and are never rejected.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..errors import ZooauditError

# Relative tolerance when comparing null statistics with the observed one: sums of
# the same floats in a different order differ in the last bits, and a partition that
# equals the observed one must count as a tie, not as "less extreme".
TIE_RTOL = 1e-9


class Adjusted(NamedTuple):
    """Adjusted p-values and reject flags, same shape as the input p-values."""

    p_adjusted: np.ndarray
    reject: np.ndarray


def _check_pvals(pvals, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pvals, dtype=np.float64)
    finite = np.isfinite(p)
    if np.any((p[finite] < 0) | (p[finite] > 1)):
        bad = p[finite][(p[finite] < 0) | (p[finite] > 1)][0]
        raise ZooauditError(f"p-values must lie in [0, 1] (NaN allowed for comparisons not made); got {bad!r}.")
    if not 0.0 < alpha < 1.0:
        raise ZooauditError(f"alpha must be in (0, 1); got {alpha!r}.")
    return p, finite


def bh(pvals, *, alpha: float = 0.05) -> Adjusted:
    """Benjamini–Hochberg step-up adjusted p-values (FDR control).

    ``p_adj_(i) = min_{j ≥ i} min(1, m · p_(j) / j)`` over the ascending order
    statistics of the ``m`` finite p-values; reject where ``p_adj ≤ alpha``.

    Args:
        pvals: array of p-values, any shape; NaN marks a comparison not made.
        alpha: FDR level for the reject flags.
    """
    def step_up(p_sorted: np.ndarray) -> np.ndarray:
        m = p_sorted.size
        # each adjusted value is the smallest scaled value at or above its rank
        return np.minimum.accumulate((p_sorted * m / np.arange(1, m + 1))[::-1])[::-1]

    return _adjust_sorted(pvals, alpha, step_up)


def holm(pvals, *, alpha: float = 0.05) -> Adjusted:
    """Holm step-down adjusted p-values (FWER control).

    ``p_adj_(i) = max_{j ≤ i} min(1, (m − j + 1) · p_(j))``; reject where
    ``p_adj ≤ alpha``. Shapes and NaN handling as in :func:`bh`.
    """
    def step_down(p_sorted: np.ndarray) -> np.ndarray:
        m = p_sorted.size
        return np.maximum.accumulate(p_sorted * (m - np.arange(m)))

    return _adjust_sorted(pvals, alpha, step_down)


def _adjust_sorted(pvals, alpha: float, adjust) -> Adjusted:
    """Apply ``adjust`` (ascending finite p-values → adjusted values, same order) to the
    finite entries of ``pvals``; cap at 1, keep NaN and the shape, flag ``≤ alpha``."""
    p, finite = _check_pvals(pvals, alpha)
    flat, out = p.ravel(), np.full(p.size, np.nan)
    idx = np.flatnonzero(finite.ravel())
    if idx.size:
        order = idx[np.argsort(flat[idx], kind="stable")]
        out[order] = np.minimum(adjust(flat[order]), 1.0)
    out = out.reshape(p.shape)
    return Adjusted(out, np.where(np.isfinite(out), out <= alpha, False))


CORRECTIONS = {"bh": bh, "holm": holm}


def adjust(pvals, *, method: str = "bh", alpha: float = 0.05) -> Adjusted:
    """Dispatch to :func:`bh` or :func:`holm` by name."""
    if method not in CORRECTIONS:
        raise ZooauditError(f"Unknown multiple-testing correction {method!r}. Allowed: {', '.join(CORRECTIONS)}.")
    return CORRECTIONS[method](pvals, alpha=alpha)


def at_least(null: np.ndarray, observed: float) -> np.ndarray:
    """Mask of null statistics at least as large as ``observed`` (ties included)."""
    return null >= observed - TIE_RTOL * max(1.0, abs(observed))


def permutation_p_value(observed: float, null) -> float:
    """One-sided Monte Carlo p-value ``(1 + #{null ≥ observed}) / (1 + len(null))``.

    ``null``: ``(n_permutations,)`` statistics computed on permuted data; larger
    means more extreme. NaN null draws (statistic undefined on that permutation)
    are dropped from both counts. NaN ``observed`` gives NaN.
    """
    null = np.asarray(null, dtype=np.float64)
    null = null[np.isfinite(null)]
    if not np.isfinite(observed):
        return float("nan")
    return float((1 + np.count_nonzero(at_least(null, observed))) / (1 + null.size))


def adjust_datasets(datasets: list, dim: str, *, method: str = "bh", alpha: float = 0.05, over: str = "") -> None:
    """Adjust the ``p_value`` of several xarray Datasets (each along ``dim``) together, in place:
    their ``p_adjusted`` and ``reject`` are replaced by the joint correction (``attrs["adjusted_over"]``
    records ``over``). One family across, e.g., every group attribute of a run."""
    if not datasets:
        return
    adj = adjust(np.concatenate([ds["p_value"].values for ds in datasets]), method=method, alpha=alpha)
    start = 0
    for ds in datasets:
        m = ds.sizes[dim]
        ds["p_adjusted"] = (dim, adj.p_adjusted[start:start + m])
        ds["reject"] = (dim, adj.reject[start:start + m])
        ds.attrs["adjusted_over"] = over
        start += m
