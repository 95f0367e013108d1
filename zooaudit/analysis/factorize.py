"""Factorization of ``(n_samples, n_features)`` activations: PCA and NMF.

Explained variance (FIELD-NOTES.md) is ``1 − Σ‖x − x̂‖² / Σ‖x − mean‖²`` with
both sums taken over all samples before dividing: predicting the mean scores 0,
perfect reconstruction 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import xarray as xr

from ..errors import ZooauditError
from .stats import iter_row_blocks, joint_moments


@dataclass
class Factorization:
    """``A ≈ codes @ components (+ mean for PCA)``.

    Attributes:
        method: ``"pca"`` or ``"nmf"``.
        components: ``(k, D)``.
        codes: ``(N, k)``.
        metrics: ``explained_variance`` (with k components), ``reconstruction_mse``,
            and per method extras (PCA: ``explained_variance_ratio`` per component).
        mean: ``(D,)`` for PCA (codes are of the centred data), zeros for NMF.
    """

    method: str
    components: np.ndarray
    codes: np.ndarray
    metrics: dict = field(default_factory=dict)
    mean: np.ndarray | None = None

    def to_dataset(self, sample_ids=None) -> xr.Dataset:
        k, d = self.components.shape
        coords = {"component": np.arange(k), "unit": np.arange(d)}
        if sample_ids is not None:
            coords["sample"] = np.asarray(sample_ids)
        data = {
            "components": (("component", "unit"), self.components),
            "codes": (("sample", "component"), self.codes),
        }
        if "explained_variance_ratio" in self.metrics:
            data["explained_variance_ratio"] = ("component", np.asarray(self.metrics["explained_variance_ratio"]))
        scalars = {k: float(v) for k, v in self.metrics.items() if np.ndim(v) == 0}
        return xr.Dataset(data, coords=coords, attrs={"method": self.method, **scalars})


def _check(A, k: int, name: str) -> None:
    n, d = A.shape[0], int(np.prod(A.shape[1:]))
    if n == 0 or d == 0:
        raise ZooauditError(f"Layer {name!r} is empty (shape {tuple(A.shape)}); nothing to factorize.")
    if k > min(n, d):
        raise ZooauditError(
            f"k={k} components requested for layer {name!r} of shape ({n}, {d}); "
            f"k must be ≤ min(samples, features) = {min(n, d)}."
        )


def explained_variance(X: np.ndarray, X_hat: np.ndarray) -> float:
    """``1 − Σ‖x − x̂‖² / Σ‖x − x̄‖²`` over all samples (float64)."""
    X = np.asarray(X, np.float64)
    resid = np.sum((X - np.asarray(X_hat, np.float64)) ** 2)
    total = np.sum((X - X.mean(axis=0)) ** 2)
    return float(1.0 - resid / total) if total > 0 else float("nan")


def pca(A, k: int, *, name: str = "A") -> Factorization:
    """PCA by eigendecomposition of the streamed covariance (one pass, O(D²) memory).

    Component signs are fixed so that each component's largest-|loading| entry is positive.
    ``explained_variance`` = (sum of the top-k eigenvalues) / trace, which equals
    the FIELD-NOTES definition for the PCA reconstruction.
    """
    A = A.reshape(A.shape[0], -1) if A.ndim > 2 else A
    _check(A, k, name)
    mom, _ = joint_moments([A])
    if not np.isfinite(mom.m2).all():
        raise ZooauditError(f"Layer {name!r} contains NaN or Inf activations; PCA needs finite values.")
    evals, evecs = np.linalg.eigh(mom.m2)
    order = np.argsort(evals)[::-1]
    evals = np.clip(evals[order], 0.0, None)
    comps = evecs[:, order[:k]].T
    signs = np.sign(comps[np.arange(k), np.abs(comps).argmax(axis=1)])
    comps *= np.where(signs == 0, 1.0, signs)[:, None]
    total = evals.sum()
    ratio = evals / total if total > 0 else np.full_like(evals, np.nan)
    codes = np.concatenate([(blk[0] - mom.mean) @ comps.T for blk in iter_row_blocks([A])])
    ev = float(ratio[:k].sum())
    return Factorization(
        method="pca", components=comps, codes=codes, mean=mom.mean,
        metrics={"explained_variance": ev, "explained_variance_ratio": ratio[:k],
                 "explained_variance_curve": np.cumsum(ratio[: min(len(ratio), 64)]),
                 "reconstruction_mse": float(evals[k:].sum() / (mom.n * A.shape[1]))},
    )


def nmf(A, k: int, *, random_state: int = 0, max_iter: int = 400, name: str = "A") -> Factorization:
    """NMF ``A ≈ W H`` (W = codes ≥ 0, H = components ≥ 0), scikit-learn's coordinate descent,
    ``nndsvda`` init, Frobenius loss. Fits in memory (the data is materialised)."""
    from sklearn.decomposition import NMF

    A = A.reshape(A.shape[0], -1) if A.ndim > 2 else A
    _check(A, k, name)
    X = np.asarray(A, dtype=np.float64)
    if not np.isfinite(X).all():
        raise ZooauditError(f"Layer {name!r} contains NaN or Inf activations ({int((~np.isfinite(X)).sum())} "
                            "values); NMF needs finite values.")
    lo = float(X.min())
    if lo < 0:
        raise ZooauditError(
            f"NMF needs non-negative activations but layer {name!r} has minimum {lo:.4g}. "
            "Use a non-negative layer (e.g. after a ReLU), shift the data, or use PCA / semi-NMF."
        )
    model = NMF(n_components=k, init="nndsvda", random_state=random_state, max_iter=max_iter, tol=1e-5)
    import warnings
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        W = model.fit_transform(X)
    H = model.components_
    recon = W @ H
    return Factorization(
        method="nmf", components=H, codes=W, mean=np.zeros(X.shape[1]),
        metrics={"explained_variance": explained_variance(X, recon),
                 "reconstruction_mse": float(np.mean((X - recon) ** 2)),
                 "n_iter": int(model.n_iter_),
                 "dead_components": int((W.max(axis=0) <= 0).sum())},
    )


def is_nonnegative(A) -> bool:
    return all(float(blk[0].min()) >= 0 for blk in iter_row_blocks([A.reshape(A.shape[0], -1) if A.ndim > 2 else A]))
