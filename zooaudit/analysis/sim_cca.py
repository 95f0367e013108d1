"""CCA family (CCA, SVCCA, PWCCA) and shape metrics (Procrustes, partial whitening).

Everything here is computed from the streamed centred co-moments ``Cxx = X̃ᵀX̃``,
``Cyy``, ``Cxy`` of one float64 pass over the rows (NumPy or Dask; memory
``O((p + q)²)``, independent of n); ``X̃`` is X with centred columns. Normalising
constants (ddof) cancel in every quantity below.

Rank: an eigen-direction of ``Cxx`` whose eigenvalue is below
``max(p, q)·100·eps·λ_max`` carries no variance and is dropped (pseudo-inverse
square roots), so duplicated or constant units are harmless.
"""

from __future__ import annotations

import math

import numpy as np

from .blocks import as_matrix
from .sim_checks import (
    DegenerateCCAWarning,
    check_real,
    check_sample_ids,
    check_samples,
    warn_undefined,
)
from .sim_stream import joint_gram


class _Pair:
    """Centred co-moments of X and Y from one joint pass, with their eigen-decompositions.

    :meth:`from_moments` builds one from blocks of a larger joint pass (every layer
    pair of :func:`~zooaudit.analysis.similarity.similarity_matrix` from one pass).
    """

    def __init__(self, X, Y, min_samples: int = 2):
        check_sample_ids([X, Y], ["X", "Y"])
        X, Y = as_matrix(X, "X"), as_matrix(Y, "Y")
        self.n = check_samples([X, Y], ["X", "Y"], min_samples=min_samples)
        acc = joint_gram([X, Y], names=["X", "Y"], dtype=np.float64)
        C = acc.centred()
        sx, sy = acc.slices
        self._set(C[sx, sx], C[sy, sy], C[sx, sy], acc.constant_layers(C), None)

    @classmethod
    def from_moments(cls, n: int, cxx: np.ndarray, cyy: np.ndarray, cxy: np.ndarray, constant: np.ndarray,
                     eigs=None) -> _Pair:
        """From centred co-moments ``(p, p)``, ``(q, q)``, ``(p, q)`` over ``n`` samples.

        ``constant``: ``(2,)`` bool, X / Y has zero variance. ``eigs``: optional
        ``((λx, Vx), (λy, Vy))`` full descending eigen-decompositions of ``cxx`` and
        ``cyy`` (computed once per layer by the caller).
        """
        self = cls.__new__(cls)
        self.n = int(n)
        self._set(cxx, cyy, cxy, np.asarray(constant, bool), eigs)
        return self

    def _set(self, cxx, cyy, cxy, constant, eigs) -> None:
        self.cxx, self.cyy, self.cxy = cxx, cyy, cxy
        self.p, self.q = cxx.shape[0], cyy.shape[0]
        self.constant = constant
        self._full = eigs
        self._eig = None

    def _decompose(self):
        if self._eig is None:
            rtol = max(self.p, self.q) * 100 * np.finfo(np.float64).eps
            (lx, vx), (ly, vy) = self._full or (full_eig(self.cxx), full_eig(self.cyy))
            self._eig = (*_keep(lx, vx, rtol), *_keep(ly, vy, rtol))
        return self._eig

    lx = property(lambda self: self._decompose()[0])
    vx = property(lambda self: self._decompose()[1])
    ly = property(lambda self: self._decompose()[2])
    vy = property(lambda self: self._decompose()[3])

    def undefined(self, what: str) -> bool:
        if self.constant.any() or not len(self.lx) or not len(self.ly):
            which = "X" if (self.constant[0] or not len(self.lx)) else "Y"
            warn_undefined(f"{what} is undefined: {which} has zero variance; returning NaN.")
            return True
        return False

    def warn_saturated(self, kx: int, ky: int, what: str) -> None:
        if max(kx, ky) >= self.n - 1:
            import warnings

            warnings.warn(
                f"{what}: X has {kx} and Y has {ky} (retained) features for n={self.n} samples; with p or q ≥ n − 1 "
                "every canonical correlation is 1 and says nothing about the representations. Use more samples "
                "than features (or SVCCA with fewer retained directions).", DegenerateCCAWarning, stacklevel=3)


def full_eig(C: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All eigenvalues of the symmetric ``C`` (descending) and their eigenvectors (columns)."""
    lam, V = np.linalg.eigh(C)
    return lam[::-1], V[:, ::-1]


def _keep(lam: np.ndarray, V: np.ndarray, rtol: float) -> tuple[np.ndarray, np.ndarray]:
    """The eigen-pairs above ``rtol·λ_max`` (the rank of ``C``)."""
    if not len(lam) or lam[0] <= 0:
        return lam[:0], V[:, :0]
    keep = lam > rtol * lam[0]
    return lam[keep], V[:, keep]


def _canonical(lx, vx, ly, vy, cxy):
    """SVD of the whitened cross-moment ``Λx^{-1/2} Vxᵀ Cxy Vy Λy^{-1/2}``: (ρ, U, Wᵀ)."""
    M = (vx.T @ cxy @ vy) / np.sqrt(lx)[:, None] / np.sqrt(ly)[None, :]
    U, rho, Wt = np.linalg.svd(M, full_matrices=False)
    return np.clip(rho, 0.0, 1.0), U, Wt


def cca(X, Y) -> np.ndarray:
    """Canonical correlations of ``X (n, p)`` and ``Y (n, q)``, descending.

    Singular values of ``Σxx^{-1/2} Σxy Σyy^{-1/2}`` from streamed covariances;
    length ``min(rank X̃, rank Ỹ)`` (``min(p, q)`` for full-rank data), each in
    [0, 1]. Invariant to invertible linear maps of either side and to translation.
    Warns :class:`~zooaudit.analysis.sim_checks.DegenerateCCAWarning` when p or
    q ≥ n − 1 (every correlation is then 1). A zero-variance input warns and gives
    an all-NaN vector of length ``min(p, q)``.
    """
    return cca_of(_Pair(X, Y))


def cca_of(pr: _Pair) -> np.ndarray:
    """:func:`cca` from a pair's co-moments."""
    pr.warn_saturated(pr.p, pr.q, "cca")
    if pr.undefined("CCA"):
        return np.full(min(pr.p, pr.q), np.nan)
    rho, _, _ = _canonical(pr.lx, pr.vx, pr.ly, pr.vy, pr.cxy)
    return rho


def _n_keep(lam: np.ndarray, keep_variance: float) -> int:
    frac = np.cumsum(lam) / lam.sum()
    return int(min(len(lam), np.searchsorted(frac, keep_variance * (1 - 1e-12)) + 1))


def svcca(X, Y, *, keep_variance: float = 0.99) -> float:
    """SVCCA (Raghu et al. 2017): mean canonical correlation after SVD truncation.

    Each side keeps its fewest top principal directions (of the centred data) whose
    variance fraction reaches ``keep_variance`` ∈ (0, 1]; the result is the mean of
    the ``min(kx, ky)`` canonical correlations of the truncated representations.
    Symmetric; in [0, 1]. Warns :class:`DegenerateCCAWarning` if a side keeps
    ≥ n − 1 directions; zero variance warns and gives NaN.
    """
    keep_variance = check_real("keep_variance", keep_variance, low=0.0, high=1.0, low_open=True)
    return svcca_of(_Pair(X, Y), keep_variance=keep_variance)


def svcca_of(pr: _Pair, *, keep_variance: float = 0.99) -> float:
    """:func:`svcca` from a pair's co-moments (``keep_variance`` already checked)."""
    if pr.undefined("SVCCA"):
        return float("nan")
    kx, ky = _n_keep(pr.lx, keep_variance), _n_keep(pr.ly, keep_variance)
    pr.warn_saturated(kx, ky, "svcca")
    rho, _, _ = _canonical(pr.lx[:kx], pr.vx[:, :kx], pr.ly[:ky], pr.vy[:, :ky], pr.cxy)
    return float(rho.mean())


def pwcca(X, Y) -> float:
    """Projection-weighted CCA (Morcos et al. 2018), weights from X (the first argument).

    Convention — the paper's definition, not the reference code's: with canonical
    variates ``hᵢ = X̃ aᵢ`` (``aᵢ`` the i-th canonical direction of X, so ``hᵢ`` has
    unit variance), the weight of correlation ``ρᵢ`` is ``αᵢ ∝ Σⱼ |⟨hᵢ, x̃ⱼ⟩|`` over the
    centred units ``x̃ⱼ`` of X, normalised to sum 1; PWCCA = ``Σᵢ αᵢ ρᵢ`` ∈ [0, 1].
    (google/svcca's ``compute_pwcca`` instead picks the side with fewer units,
    QR-orthonormalises its directions and weights by those.) Computed in feature
    space: ``X̃ᵀhᵢ = Cxx aᵢ``. Not symmetric in X and Y. Warnings as :func:`cca`.
    """
    return pwcca_of(_Pair(X, Y))


def pwcca_of(pr: _Pair) -> float:
    """:func:`pwcca` from a pair's co-moments."""
    pr.warn_saturated(pr.p, pr.q, "pwcca")
    if pr.undefined("PWCCA"):
        return float("nan")
    rho, U, _ = _canonical(pr.lx, pr.vx, pr.ly, pr.vy, pr.cxy)
    # Cxx aᵢ with aᵢ = Vx Λx^{-1/2} uᵢ  is  Vx Λx^{1/2} uᵢ
    proj = (pr.vx * np.sqrt(pr.lx)[None, :]) @ U
    alpha = np.abs(proj).sum(axis=0)
    return float(np.dot(alpha / alpha.sum(), rho))


def shape_distance(X, Y, *, alpha: float = 1.0) -> float:
    """Angular shape distance of Williams et al. (2021) with partial whitening ``alpha``.

    Each centred representation is mapped by ``φ_α(X̃) = X̃ (α I + (1 − α) Σx^{-1/2})``
    (``Σx = X̃ᵀX̃ / n``, pseudo-inverse square root on its range), then
    ``θ = arccos(‖φ_α(X̃)ᵀ φ_α(Ỹ)‖_* / (‖φ_α(X̃)‖_F ‖φ_α(Ỹ)‖_F))`` ∈ [0, π/2] radians:
    the angle after the best orthogonal alignment, the narrower representation
    being padded with zero columns (the nuclear norm of the ``(p, q)`` cross-moment
    is exactly that). ``alpha=1`` is rotation-only Procrustes (:func:`procrustes`);
    ``alpha=0`` whitens fully (for p = q: ``arccos`` of the mean canonical
    correlation). A metric for every α (triangle inequality). For 0 < α < 1 the
    value depends on the data's overall scale, as in the paper. Zero variance warns
    and gives NaN.
    """
    alpha = check_real("alpha", alpha, low=0.0, high=1.0)
    pr = _Pair(X, Y)
    if pr.undefined("shape distance"):
        return float("nan")
    zx = alpha + (1.0 - alpha) * np.sqrt(pr.n / pr.lx)     # Z_α on each eigen-direction of Σx
    zy = alpha + (1.0 - alpha) * np.sqrt(pr.n / pr.ly)
    cross = (pr.vx.T @ pr.cxy @ pr.vy) * zx[:, None] * zy[None, :]
    nuclear = float(np.linalg.svd(cross, compute_uv=False).sum())
    norm = math.sqrt(float(np.sum(zx * zx * pr.lx)) * float(np.sum(zy * zy * pr.ly)))
    return float(np.arccos(np.clip(nuclear / norm, -1.0, 1.0)))


def procrustes(X, Y) -> float:
    """Angular Procrustes shape distance, rotation-only (``alpha=1``), in radians.

    ``arccos(‖X̃ᵀỸ‖_* / (‖X̃‖_F ‖Ỹ‖_F))`` on column-centred ``X (n, p)``, ``Y (n, q)``
    (zero-padding the narrower one). 0 for identical representations up to
    rotation, translation and scale; a metric (triangle inequality). One
    streamed pass. Zero variance warns and gives NaN.
    """
    return procrustes_of(_Pair(X, Y))


def procrustes_of(pr: _Pair) -> float:
    """:func:`procrustes` from a pair's co-moments."""
    if pr.constant.any():
        return warn_undefined("Procrustes distance is undefined: a representation has zero variance; returning NaN.")
    nuclear = float(np.linalg.svd(pr.cxy, compute_uv=False).sum())
    norm = math.sqrt(max(float(np.trace(pr.cxx)), 0.0) * max(float(np.trace(pr.cyy)), 0.0))
    return float(np.arccos(np.clip(nuclear / norm, -1.0, 1.0)))


def mean_cca_of(pr: _Pair) -> float:
    """Mean canonical correlation (the ``"cca"`` entry of ``similarity_matrix``)."""
    rho = cca_of(pr)
    return float(rho.mean()) if len(rho) else float("nan")
