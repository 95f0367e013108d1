"""Representational similarity analysis: blockwise RDMs compared by rank correlation.

RDMs are condensed upper triangles (``i < j``, row-major — the order of
``scipy.spatial.distance.squareform``): ``n(n−1)/2`` float64 values per
representation, filled one block of rows at a time, so no ``(n, n)`` matrix is ever
held. The representation itself is materialised in memory (``n·p`` values).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy.spatial.distance import cdist

from .blocks import as_matrix
from .sim_checks import (
    UndefinedSimilarityWarning,
    check_choice,
    check_sample_ids,
    check_samples,
    dense,
    warn_undefined,
)

RDM_KINDS = ("correlation", "euclidean", "sqeuclidean")
COMPARE = ("spearman", "kendall")
BLOCK_BYTES = 64 * 2**20


def rdm(X, *, kind: str = "correlation") -> np.ndarray:
    """Condensed representational dissimilarity matrix of ``X (n, p)``: shape ``(n(n−1)/2,)``.

    ``kind``: ``"correlation"`` — ``1 − r(xᵢ, xⱼ)``, Pearson correlation of two
    samples' activation patterns across the p features; a sample whose pattern is
    constant has no defined correlation: it is given correlation 0 (distance 1) to
    every sample, with an :class:`UndefinedSimilarityWarning`. ``"euclidean"`` —
    ``‖xᵢ − xⱼ‖``; ``"sqeuclidean"`` — ``‖xᵢ − xⱼ‖²``. Computed from pairwise
    differences (``scipy.spatial.distance.cdist`` per block of rows, equal to
    ``pdist``), so exact ties stay ties. Entry ``(i, j)``, ``i < j``, sits at
    ``n·i − i(i+1)/2 + j − i − 1``.
    """
    kind = check_choice("rdm", kind, RDM_KINDS)
    x = dense(as_matrix(X, "X"), "X")
    n = x.shape[0]
    const = None
    if kind == "correlation":
        spread = x.max(axis=1) - x.min(axis=1)
        const = spread == 0
        if const.any():
            warnings.warn(f"rdm='correlation': {int(const.sum())} of {n} samples have the same value in every "
                          "feature, so their correlation with other samples is undefined; they are given "
                          "correlation 0 (distance 1).", UndefinedSimilarityWarning, stacklevel=2)
    out = np.empty(n * (n - 1) // 2)
    rows = max(1, BLOCK_BYTES // (8 * max(n, 1)))
    off = 0
    with np.errstate(invalid="ignore", divide="ignore"):
        for s in range(0, n - 1, rows):
            e = min(n - 1, s + rows)
            # differences, not Gram expansions: rounding then cannot split exact ties
            # (duplicate samples), which rank comparisons depend on; bit-equal to pdist
            D = cdist(x[s:e], x[s:], kind)                 # (b, n − s): only j > i is kept
            if const is not None and const.any():
                D[const[s:e], :] = 1.0
                D[:, const[s:]] = 1.0
            for i in range(s, e):
                length = n - 1 - i
                out[off:off + length] = D[i - s, i - s + 1:]
                off += length
    return out


def _tau_a(dx: np.ndarray, dy: np.ndarray) -> float:
    """Kendall τ-a = (concordant − discordant) / (m(m−1)/2) over the m RDM entries.

    scipy gives τ-b = (C − D)/sqrt((N₀ − N₁)(N₀ − N₂)) in O(m log m); rescaling by the
    tie counts N₁, N₂ (pairs tied in x, in y) recovers τ-a exactly.
    """
    from scipy.stats import kendalltau

    m = len(dx)
    n0 = m * (m - 1) / 2.0
    ties = []
    for d in (dx, dy):
        _, counts = np.unique(d, return_counts=True)
        ties.append(float(np.sum(counts * (counts - 1.0) / 2.0)))
    tau_b = kendalltau(dx, dy, variant="b").statistic
    return float(tau_b * math.sqrt((n0 - ties[0]) * (n0 - ties[1])) / n0)


def rsa(X, Y, *, rdm: str = "correlation", compare: str = "spearman") -> float:
    """RSA score of ``X (n, p)`` and ``Y (n, q)``: rank correlation of their RDMs.

    ``rdm``: ``"correlation"`` (1 − Pearson r between samples), ``"euclidean"`` or
    ``"sqeuclidean"`` (identical ranks, so identical RSA) — see :func:`rdm`.
    ``compare``: ``"spearman"`` (Pearson correlation of average ranks) or
    ``"kendall"`` (τ-a, which counts ties against the score; O(m log m) for the
    ``m = n(n−1)/2`` entries). Only the upper triangles enter. Symmetric; in
    [−1, 1]. Memory: the two condensed RDMs (``O(n²)``) plus the inputs. An RDM
    with all entries equal warns and gives NaN.
    """
    kind = check_choice("rdm", rdm, RDM_KINDS)
    compare = check_choice("compare", compare, COMPARE)
    check_sample_ids([X, Y], ["X", "Y"])
    X, Y = as_matrix(X, "X"), as_matrix(Y, "Y")
    check_samples([X, Y], ["X", "Y"], min_samples=3)
    dx = _rdm_fn(X, kind=kind)
    dy = _rdm_fn(Y, kind=kind)
    for name, d in (("X", dx), ("Y", dy)):
        if np.all(d == d[0]):
            return warn_undefined(f"RSA is undefined: every entry of {name}'s RDM is equal "
                                  "(e.g. all samples identical); returning NaN.")
    if compare == "kendall":
        return _tau_a(dx, dy)
    from scipy.stats import rankdata

    rx = rankdata(dx)
    del dx
    rx -= rx.mean()
    ry = rankdata(dy)
    del dy
    ry -= ry.mean()
    return float(np.dot(rx, ry) / math.sqrt(np.dot(rx, rx) * np.dot(ry, ry)))


_rdm_fn = rdm
