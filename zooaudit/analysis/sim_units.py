"""Sample- and unit-level alignment: mutual k-NN (Huh et al. 2024), neuron matching (Li et al. 2015)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import xarray as xr

from ..errors import ZooauditError
from .blocks import as_matrix
from .sim_checks import (
    UndefinedSimilarityWarning,
    check_int,
    check_sample_ids,
    check_samples,
    dense,
)
from .sim_stream import joint_gram

BLOCK_BYTES = 64 * 2**20


def _unit_rows(x: np.ndarray, name: str) -> np.ndarray:
    norm = np.sqrt(np.einsum("ij,ij->i", x, x))
    zero = norm == 0
    if zero.any():
        warnings.warn(f"mutual_knn: {int(zero.sum())} samples of {name} are all-zero; their cosine similarity to "
                      "every sample is 0, so their neighbours are ties.", UndefinedSimilarityWarning, stacklevel=3)
    norm[zero] = 1.0
    return x / norm[:, None]


def knn_indices(X, k: int) -> np.ndarray:
    """``(n, k)`` indices of each row's k nearest rows by cosine similarity, self excluded.

    Blockwise: one ``(block, n)`` similarity block at a time, reduced to its top-k
    with ``argpartition`` (neighbour order within a row is unspecified; exact ties at
    the k-th place are broken arbitrarily but deterministically).
    """
    z = _unit_rows(dense(as_matrix(X, "X"), "X"), "X")
    n = z.shape[0]
    out = np.empty((n, k), np.int64)
    rows = max(1, BLOCK_BYTES // (8 * n))
    for s in range(0, n, rows):
        e = min(n, s + rows)
        S = z[s:e] @ z.T
        S[np.arange(e - s), np.arange(s, e)] = -np.inf          # never one's own neighbour
        out[s:e] = np.argpartition(S, n - k, axis=1)[:, n - k:]
    return out


def mutual_knn(X, Y, *, k: int = 10) -> float:
    """Mutual k-nearest-neighbour alignment (Huh et al. 2024) of ``X (n, p)`` and ``Y (n, q)``.

    Rows are L2-normalised; for each sample i the k nearest other samples by cosine
    similarity are found in X and in Y (self excluded); the score is the mean over
    samples of ``|kNN_X(i) ∩ kNN_Y(i)| / k`` ∈ [0, 1]. Chance level for unrelated
    representations is about ``k / (n − 1)``. Needs ``1 ≤ k ≤ n − 1``. Symmetric.
    Memory: the inputs, ``O(n·k)`` indices and one ``(block, n)`` similarity block.
    """
    check_sample_ids([X, Y], ["X", "Y"])
    X, Y = as_matrix(X, "X"), as_matrix(Y, "Y")
    n = check_samples([X, Y], ["X", "Y"], min_samples=2)
    k = check_int("k", k, low=1, high=n - 1,
                  hint=f"k counts neighbours other than the sample itself, so k must be below n={n}.")
    a, b = knn_indices(X, k), knn_indices(Y, k)
    both = np.sort(np.concatenate([a, b], axis=1), axis=1)
    shared = np.count_nonzero(both[:, 1:] == both[:, :-1], axis=1)   # each list has distinct entries
    return float(shared.mean() / k)


@dataclass(frozen=True)
class NeuronMatch:
    """One-to-one matching of X's units to Y's units (see :func:`match_neurons`).

    ``x_unit``, ``y_unit``: ``(k,)`` int, matched pairs, ``k = min(p, q)``, ``x_unit``
    ascending. ``correlation``: ``(k,)`` Pearson r of each matched pair.
    ``permutation``: ``(p,)`` int, the Y unit matched to each X unit (−1 when p > q
    leaves it unmatched); when p = q, ``Y[:, permutation]`` lines Y's units up with
    X's. ``mean_correlation``: mean of ``correlation``. ``corr``: ``(p, q)`` the full
    unit-by-unit correlation matrix.
    """

    x_unit: np.ndarray
    y_unit: np.ndarray
    correlation: np.ndarray
    permutation: np.ndarray
    mean_correlation: float
    corr: np.ndarray

    def to_dataset(self) -> xr.Dataset:
        """Labelled view: ``y_unit`` and ``correlation`` over dim ``unit_x`` (matched X units)."""
        return xr.Dataset({"y_unit": ("unit_x", self.y_unit), "correlation": ("unit_x", self.correlation)},
                          coords={"unit_x": self.x_unit}, attrs={"mean_correlation": self.mean_correlation,
                                                                 "method": "hungarian, max total Pearson r"})


def match_neurons(X, Y) -> NeuronMatch:
    """Match units one-to-one (Li et al. 2015, Convergent Learning).

    Pearson correlation between every unit of ``X (n, p)`` and of ``Y (n, q)``
    (streamed covariances, one pass), then the one-to-one assignment maximising the
    total correlation (Hungarian algorithm, ``scipy.optimize.linear_sum_assignment``).
    A constant unit has undefined correlation: it is treated as correlation 0
    with everything (warning). A layer against a unit-permuted copy of itself
    recovers the permutation.
    """
    from scipy.optimize import linear_sum_assignment

    check_sample_ids([X, Y], ["X", "Y"])
    X, Y = as_matrix(X, "X"), as_matrix(Y, "Y")
    check_samples([X, Y], ["X", "Y"], min_samples=2)
    acc = joint_gram([X, Y], names=["X", "Y"], dtype=np.float64)
    C = acc.centred()
    sx, sy = acc.slices
    var = np.clip(np.diag(C), 0.0, None)
    mu = np.abs(acc.shift + acc.s / acc.n)
    const = var / acc.n <= (8 * np.finfo(np.float64).eps * mu) ** 2
    if const.all():
        raise ZooauditError("match_neurons needs units that vary across samples; every unit of X and Y is constant.")
    if const.any():
        warnings.warn(f"match_neurons: {int(const[sx].sum())} units of X and {int(const[sy].sum())} of Y are "
                      "constant; their correlations are undefined and set to 0.", UndefinedSimilarityWarning,
                      stacklevel=2)
    sd = np.sqrt(np.where(const, 1.0, var))
    corr = C[sx, sy] / sd[sx, None] / sd[None, sy]
    corr[const[sx], :] = 0.0
    corr[:, const[sy]] = 0.0
    corr = np.clip(corr, -1.0, 1.0)
    rows, cols = linear_sum_assignment(corr, maximize=True)
    perm = np.full(corr.shape[0], -1, np.int64)
    perm[rows] = cols
    r = corr[rows, cols]
    return NeuronMatch(x_unit=rows.astype(np.int64), y_unit=cols.astype(np.int64), correlation=r,
                       permutation=perm, mean_correlation=float(r.mean()), corr=corr)
