"""Eigen-decompositions: streamed top eigenpairs of ``(N, D)`` activations, and Eigen-CAM.

:func:`top_eigenpairs` returns the leading eigenpairs of the centred co-moment
``Σ (x − μ)(x − μ)ᵀ`` (PCA) or of the Gram ``Σ x xᵀ`` (NNDSVD starts for NMF) without
holding more than one row block in memory:

- ``"covariance"``: one pass accumulating the ``(D, D)`` matrix in float64 (Chan-merged
  centred blocks, see :mod:`.stats`), then a dense ``eigh``. Exact; O(D²) memory.
- ``"randomized"``: subspace iteration on the streamed matrix (Halko et al. 2011,
  Alg. 4.4 applied to ``AᵀA``), O(D·(k + oversamples)) memory and ``n_passes`` passes.
  The first pass centres on the first block's mean and corrects with the running sum,
  so no separate mean pass is needed and offset data loses no precision.

The module also holds the factorizations' checks of ``k`` and of the numerical rank; the
door checks and the row-block reader are :mod:`.blocks`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import ZooauditError
from .blocks import iter_blocks
from .blocks import nonfinite_layer_error as nonfinite_error
from .stats import Moments

RANK_RTOL = 1e-12  # eigenvalues below this fraction of the largest count as zero


def check_k(k, n: int, d: int, name: str, method: str) -> int:
    """``k`` must be an int in ``[1, min(n, d)]``."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ZooauditError(f"k={k!r} for {method} of layer {name!r}: k must be a positive integer.")
    if k > min(n, d):
        raise ZooauditError(f"k={k} components requested for {method} of layer {name!r} of shape ({n}, {d}); "
                            f"k must be ≤ min(samples, features) = {min(n, d)}.")
    return int(k)


def check_rank(values: np.ndarray, k: int, name: str, method: str, what: str) -> int:
    """Refuse ``k`` above the numerical rank seen in the leading eigenvalues ``values``."""
    top = float(values[0]) if len(values) else 0.0
    rank = int(np.sum(values > RANK_RTOL * top)) if top > 0 else 0
    if rank < k:
        raise ZooauditError(
            f"k={k} components requested for {method} of layer {name!r}, but its {what} has numerical rank "
            f"{rank} (eigenvalues below {RANK_RTOL:g} of the largest count as zero); k must be ≤ {rank}. "
            + ("The layer is constant over the samples. " if rank == 0 else "")
            + "Choose a smaller k or another layer.")
    return rank


@dataclass
class Spectrum:
    """Leading eigenpairs of a streamed ``(D, D)`` second-moment matrix.

    ``values`` ``(k,)`` descending eigenvalues (sums over samples, not divided by N);
    ``vectors`` ``(D, k)`` orthonormal columns; ``trace`` of the same matrix; ``n`` samples;
    ``mean`` ``(D,)``; ``minimum`` entry of A; ``ss_centred`` = ``Σ‖x − x̄‖²``.
    """

    values: np.ndarray
    vectors: np.ndarray
    trace: float
    n: int
    mean: np.ndarray
    minimum: float
    ss_centred: float


class Scan:
    """Per-pass bookkeeping: count, column sums, the centred sum of squares
    ``Σ‖x − x̄‖²`` (Chan-merged, exact on offset data), the minimum and the non-finite count."""

    def __init__(self, d: int):
        self.n, self.sum, self.ss_centred = 0, np.zeros(d), 0.0
        self.minimum, self.nonfinite = np.inf, 0

    def update(self, x: np.ndarray) -> bool:
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
        self.nonfinite += bad
        if bad or x.shape[0] == 0:
            return False
        b = x.shape[0]
        sum_b = x.sum(axis=0, dtype=np.float64)
        mean_b = sum_b / b
        ss_b = float(np.sum((x - mean_b) ** 2))
        if self.n:
            delta = mean_b - self.sum / self.n
            ss_b += float(delta @ delta) * self.n * b / (self.n + b)
        self.ss_centred += ss_b
        self.n += b
        self.sum += sum_b
        self.minimum = min(self.minimum, float(x.min()))
        return True

    @property
    def mean(self) -> np.ndarray:
        return self.sum / max(self.n, 1)


def top_eigenpairs(A, k: int, *, centre: bool, solver: str = "covariance", oversamples: int = 10,
                   n_passes: int = 4, random_state: int = 0, name: str = "A", method: str = "pca",
                   after_first_pass: Callable[[Scan], None] | None = None) -> Spectrum:
    """Top-``k`` eigenpairs of ``Σ(x − μ)(x − μ)ᵀ`` (``centre=True``) or ``Σ x xᵀ``.

    Args:
        A: ``(N, D)`` NumPy or Dask (validated by the caller).
        solver: ``"covariance"`` (one pass, exact) or ``"randomized"`` (``n_passes`` ≥ 2 passes:
            one sketch, ``n_passes − 2`` power iterations, one Rayleigh–Ritz pass).
        after_first_pass: called with the first pass's scan (count, minimum ...) so callers can
            refuse bad data before the remaining passes.
    Raises ZooauditError on NaN/Inf (naming ``name`` and ``method``).
    """
    d = A.shape[1]
    scan = Scan(d)
    if solver == "covariance":
        mom = Moments(d) if centre else None
        gram = None if centre else np.zeros((d, d))
        for _, _, x in iter_blocks(A):
            if scan.update(x):
                if centre:
                    mom.update(x)
                else:
                    gram += (x.T @ x).astype(np.float64)
        finish_scan(scan, name, method, after_first_pass)
        mat = mom.m2 if centre else gram
        evals, evecs = np.linalg.eigh(mat)
        order = np.argsort(evals)[::-1][:k]
        mean = mom.mean if centre else scan.sum / scan.n
        return Spectrum(np.clip(evals[order], 0.0, None), evecs[:, order], float(np.trace(mat)),
                        scan.n, mean, scan.minimum, scan.ss_centred)
    if solver != "randomized":
        raise ZooauditError(f"Unknown eigen solver {solver!r} for layer {name!r}. Allowed: covariance, randomized.")
    n_passes = max(int(n_passes), 2)
    width = min(k + int(oversamples), d)
    omega = np.random.default_rng(random_state).standard_normal((d, width))
    shift, sketch, shifted_sq = None, np.zeros((d, width)), 0.0
    for _, _, x in iter_blocks(A, np.float64):
        if not scan.update(x):
            continue
        if shift is None:  # centre on the first block's mean: keeps offset data exact
            shift = x.mean(axis=0) if centre else np.zeros(d)
        xs = x - shift
        sketch += xs.T @ (xs @ omega)
        shifted_sq += float(np.einsum("ij,ij->", xs, xs))
    finish_scan(scan, name, method, after_first_pass)
    mean = scan.sum / scan.n
    delta = mean - shift if centre else np.zeros(d)
    sketch -= scan.n * np.outer(delta, delta @ omega)
    trace = shifted_sq - scan.n * float(delta @ delta)
    q = np.linalg.qr(sketch)[0]
    centre_at = mean if centre else np.zeros(d)
    for p in range(n_passes - 1):
        z = np.zeros_like(q)
        for _, _, x in iter_blocks(A, np.float64):
            xc = x - centre_at
            z += xc.T @ (xc @ q)
        if p < n_passes - 2:
            q = np.linalg.qr(z)[0]
    small = q.T @ z
    evals, evecs = np.linalg.eigh((small + small.T) / 2)
    order = np.argsort(evals)[::-1][:k]
    return Spectrum(np.clip(evals[order], 0.0, None), q @ evecs[:, order], trace, scan.n,
                    mean, scan.minimum, scan.ss_centred)


def finish_scan(scan: Scan, name: str, method: str, hook) -> None:
    if scan.nonfinite:
        raise nonfinite_error(name, method, scan.nonfinite)
    if hook is not None:
        hook(scan)


def eigencam(fmap, *, name: str = "map") -> np.ndarray:
    """Eigen-CAM (Muhammad & Yeasin 2020): first principal component of a spatial map.

    For one image's map ``(C, H, W)``, the ``(H·W, C)`` matrix of positions × channels is
    centred over positions, its first principal direction ``v`` (``(C,)``, unit) is found,
    and the map is the projection ``(M − mean) v`` reshaped to ``(H, W)`` (no ReLU or
    rescaling: apply them for display). A ``(N, C, H, W)`` batch gives ``(N, H, W)``.

    Sign convention: ``Σ_c v_c > 0``, i.e. the map correlates positively with the
    centred channel-sum map (high where the layer is strongly active). Exact ties
    (``Σ v = 0``) fall back to making the largest-|loading| channel positive.
    A map with no spatial variance gives zeros.
    """
    x = np.asarray(fmap, dtype=np.float64)
    if x.ndim == 4:
        return np.stack([eigencam(m, name=name) for m in x]) if len(x) else np.zeros((0, *x.shape[2:]))
    if x.ndim != 3 or 0 in x.shape:
        raise ZooauditError(f"Eigen-CAM of {name!r} needs a non-empty (C, H, W) or (N, C, H, W) map; "
                            f"got shape {x.shape}.")
    if not np.isfinite(x).all():
        raise nonfinite_error(name, "Eigen-CAM", int((~np.isfinite(x)).sum()))
    c, h, w = x.shape
    m = x.reshape(c, h * w).T
    m = m - m.mean(axis=0)
    if c <= h * w:  # eigendecompose the smaller Gram of the two
        evals, evecs = np.linalg.eigh(m.T @ m)
        v = evecs[:, -1]
    else:
        evals, evecs = np.linalg.eigh(m @ m.T)
        v = m.T @ evecs[:, -1]
        v = v / np.linalg.norm(v) if np.linalg.norm(v) > 0 else v
    if evals[-1] <= 0:
        return np.zeros((h, w))
    total = v.sum()
    sign = np.sign(total) if abs(total) > 1e-12 * np.abs(v).sum() else np.sign(v[np.argmax(np.abs(v))])
    return (m @ (v * sign)).reshape(h, w)
