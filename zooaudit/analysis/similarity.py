"""Representational similarity: linear CKA (streamed), and all-pairs matrices.

Conventions: CKA is computed on column-centred data. The biased estimator is
``‖XᵀY‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F)`` from streamed float64 centred second moments
(exact, one pass). ``debiased=True`` uses the unbiased HSIC estimator of Song
et al. (2012) on n×n Gram matrices (in memory: moderate n only).
"""

from __future__ import annotations

import warnings
from typing import Mapping

import numpy as np
import xarray as xr

from ..errors import ZooauditError
from .stats import joint_moments

METRICS = ("linear_cka",)
MAX_GRAM_N = 20_000


def _as_2d(x):
    return x.reshape(x.shape[0], -1) if x.ndim > 2 else x


def _cka_from_cov(cxy: np.ndarray, cxx: np.ndarray, cyy: np.ndarray) -> float:
    denom = np.linalg.norm(cxx) * np.linalg.norm(cyy)
    if denom == 0.0:
        warnings.warn("linear CKA undefined: a representation has zero variance (returning NaN)", RuntimeWarning)
        return float("nan")
    return float(np.sum(cxy * cxy) / denom)


def _hsic_unbiased(k: np.ndarray, l: np.ndarray) -> float:
    """Unbiased HSIC (Song et al. 2012) of two n×n Gram matrices, n > 3."""
    n = k.shape[0]
    k = k.copy()
    l = l.copy()
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l, 0.0)
    kl = k @ l
    term = np.trace(kl) + k.sum() * l.sum() / ((n - 1) * (n - 2)) - 2.0 * kl.sum() / (n - 2)
    return float(term / (n * (n - 3)))


def _debiased_linear_cka(x, y) -> float:
    n = x.shape[0]
    if n < 4:
        raise ZooauditError(f"debiased CKA needs at least 4 samples, got {n}.")
    if n > MAX_GRAM_N:
        raise ZooauditError(f"debiased CKA is computed from n×n Gram matrices here; n={n} exceeds {MAX_GRAM_N}.")
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    x = x - x.mean(0)
    y = y - y.mean(0)
    k, l = x @ x.T, y @ y.T
    kl, kk, ll = _hsic_unbiased(k, l), _hsic_unbiased(k, k), _hsic_unbiased(l, l)
    if kk <= 0 or ll <= 0:
        warnings.warn("debiased CKA undefined: non-positive self-HSIC (returning NaN)", RuntimeWarning)
        return float("nan")
    return float(kl / np.sqrt(kk * ll))


def linear_cka(X, Y, *, debiased: bool = False) -> float:
    """Linear CKA between ``X (n, p)`` and ``Y (n, q)`` (rows = the same samples).

    Biased: one streaming pass over row chunks (NumPy or Dask), float64.
    Invariant to orthogonal maps, isotropic scaling and translation.
    """
    X, Y = _as_2d(X), _as_2d(Y)
    if X.shape[0] != Y.shape[0]:
        raise ZooauditError(f"X and Y must share samples (rows): got {X.shape[0]} and {Y.shape[0]}.")
    if debiased:
        return _debiased_linear_cka(X, Y)
    mom, (sx, sy) = joint_moments([X, Y])
    return _cka_from_cov(mom.m2[sx, sy], mom.m2[sx, sx], mom.m2[sy, sy])


def cka_matrix(named: Mapping[str, object]) -> np.ndarray:
    """All-pairs linear CKA of ``{name: (n, p_i)}`` from one joint pass over the rows."""
    arrays = [_as_2d(a) for a in named.values()]
    mom, slices = joint_moments(arrays)
    m = len(arrays)
    out = np.ones((m, m))
    for i in range(m):
        for j in range(i, m):
            si, sj = slices[i], slices[j]
            out[i, j] = out[j, i] = _cka_from_cov(mom.m2[si, sj], mom.m2[si, si], mom.m2[sj, sj])
    return out


def similarity_matrix(layers_a: Mapping[str, object], layers_b: Mapping[str, object] | None = None, *,
                      metric: str = "linear_cka", dims: tuple[str, str] = ("layer_a", "layer_b")) -> xr.DataArray:
    """Similarity of every ``layers_a`` entry with every ``layers_b`` entry.

    All pairs come from one pass over the data (joint moments of every layer).
    Returns a DataArray with dims ``dims`` labelled by the mapping keys.
    """
    if metric not in METRICS:
        raise ZooauditError(f"Unknown similarity metric {metric!r}. Allowed: {', '.join(METRICS)}.")
    layers_b = layers_a if layers_b is None else layers_b
    names = list(dict.fromkeys([*layers_a, *layers_b]))
    union = {**dict(layers_a), **dict(layers_b)}
    full = cka_matrix({k: union[k] for k in names})
    ia = [names.index(k) for k in layers_a]
    ib = [names.index(k) for k in layers_b]
    return xr.DataArray(full[np.ix_(ia, ib)], dims=dims,
                        coords={dims[0]: list(layers_a), dims[1]: list(layers_b)},
                        name=metric, attrs={"metric": metric, "estimator": "biased", "centred": "columns"})
