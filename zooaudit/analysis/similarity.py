"""Representational similarity: CKA family, CCA family, shape metrics, RSA, k-NN alignment.

Every function takes ``(n_samples, n_features)`` arrays whose rows are the same
samples — NumPy, Dask (streamed over row chunks, float64 accumulation, memory
independent of n where the method allows), xarray DataArrays or Zarr arrays —
and validates them at the door (:class:`~zooaudit.errors.ZooauditError` for
mismatched sample counts, NaN/Inf, unknown options). Where a value is undefined
for the data (zero variance), the function warns with
:class:`UndefinedSimilarityWarning` and returns NaN.

=====================  ==========================================================
``linear_cka``         streamed, exact; biased or debiased (unbiased HSIC)
``rbf_cka``            exact n×n Gram (moderate n); bandwidth = threshold·√median d²
``minibatch_cka``      Nguyen et al. 2021, linear or RBF kernel, any n
``cca``/``svcca``/``pwcca``   streamed covariances; PWCCA weights from X (paper's definition)
``procrustes``         angular shape distance (alpha=1); ``shape_distance`` for any alpha
``rsa``                blockwise condensed RDMs, Spearman or Kendall τ-a
``mutual_knn``         blockwise top-k, cosine neighbours
``match_neurons``      Pearson + Hungarian one-to-one unit matching
``similarity_matrix``  every ``METRICS`` name over all pairs of layers / models
=====================  ==========================================================
"""

from __future__ import annotations

import inspect
from typing import Callable, Mapping

import numpy as np
import xarray as xr

from ..errors import ZooauditError, unknown
from .sim_cca import cca, procrustes, pwcca, shape_distance, svcca
from .sim_checks import (MAX_GRAM_SAMPLES, DegenerateCCAWarning, UndefinedSimilarityWarning, as_matrix,
                         check_samples)
from .sim_cka import cka_from_stats, cka_matrix, linear_cka, minibatch_cka, rbf_cka
from .sim_rsa import rdm, rsa
from .sim_stream import JointGram, joint_gram
from .sim_units import NeuronMatch, knn_indices, match_neurons, mutual_knn

__all__ = [
    "METRICS", "MAX_GRAM_SAMPLES", "DegenerateCCAWarning", "UndefinedSimilarityWarning", "JointGram", "NeuronMatch",
    "linear_cka", "cka_matrix", "rbf_cka", "minibatch_cka", "cca", "svcca", "pwcca", "procrustes",
    "shape_distance", "rsa", "rdm", "mutual_knn", "knn_indices", "match_neurons", "similarity_matrix",
]


def _mean_cca(X, Y) -> float:
    """Mean canonical correlation (the ``"cca"`` entry of :func:`similarity_matrix`)."""
    rho = cca(X, Y)
    return float(rho.mean()) if len(rho) else float("nan")


# name → (pairwise function, symmetric?, "similarity" | "distance")
_PAIRWISE: dict[str, tuple[Callable, bool, str]] = {
    "rbf_cka": (rbf_cka, True, "similarity"),
    "cca": (_mean_cca, True, "similarity"),
    "svcca": (svcca, True, "similarity"),
    "pwcca": (pwcca, False, "similarity"),
    "procrustes": (procrustes, True, "distance"),
    "rsa": (rsa, True, "similarity"),
    "mutual_knn": (mutual_knn, True, "similarity"),
}
METRICS = ("linear_cka", "linear_cka_debiased", *_PAIRWISE)


def _check_params(metric: str, params: dict) -> None:
    fn = _PAIRWISE[metric][0] if metric in _PAIRWISE else None
    allowed = [] if fn is None else [p.name for p in inspect.signature(fn).parameters.values()
                                     if p.kind is inspect.Parameter.KEYWORD_ONLY]
    for key in params:
        if key not in allowed:
            raise unknown(f"parameter for metric {metric!r}", key, allowed,
                          "linear CKA variants take none (choose 'linear_cka' or 'linear_cka_debiased')."
                          if fn is None else "")


def similarity_matrix(layers_a: Mapping[str, object], layers_b: Mapping[str, object] | None = None, *,
                      metric: str = "linear_cka", dims: tuple[str, str] = ("layer_a", "layer_b"),
                      **params) -> xr.DataArray:
    """``metric`` between every ``layers_a`` entry and every ``layers_b`` entry (default: ``layers_a``).

    ``layers_a``, ``layers_b``: ``{name: (n, p_name) array}`` sharing their samples.
    ``metric``: one of :data:`METRICS`; ``"cca"`` is the mean canonical correlation,
    ``"procrustes"`` a distance (0 = same shape), the rest similarities.
    ``params``: keyword options of the metric's function (e.g. ``k=`` for
    ``mutual_knn``, ``threshold=`` for ``rbf_cka``). Linear CKA (biased or debiased)
    comes from one joint streamed pass over every distinct array; the other metrics
    are computed pair by pair (once per unordered pair when symmetric).

    Returns a ``(len(layers_a), len(layers_b))`` float64 DataArray with dims
    ``dims``, coordinates the mapping keys, and attrs naming the metric.
    """
    if not isinstance(metric, str) or metric not in METRICS:
        raise unknown("similarity metric", metric, METRICS)
    if (not isinstance(dims, (tuple, list)) or len(dims) != 2 or not all(isinstance(d, str) for d in dims)
            or dims[0] == dims[1]):
        raise ZooauditError(f"dims must be two distinct dimension names, e.g. ('layer_a', 'layer_b'); got {dims!r}.")
    _check_params(metric, params)
    same = layers_b is None
    layers_b = layers_a if same else layers_b
    for label, m in (("layers_a", layers_a), ("layers_b", layers_b)):
        if not isinstance(m, Mapping) or not m:
            raise ZooauditError(f"{label} must be a non-empty mapping {{name: (n_samples, n_features) array}}; "
                                f"got {type(m).__name__}.")
    keys_a, keys_b = [str(k) for k in layers_a], [str(k) for k in layers_b]
    arrays_a = [as_matrix(v, k) for k, v in zip(keys_a, layers_a.values())]
    arrays_b = arrays_a if same else [as_matrix(v, k) for k, v in zip(keys_b, layers_b.values())]
    check_samples(arrays_a if same else [*arrays_a, *arrays_b], keys_a if same else [*keys_a, *keys_b],
                  min_samples=4 if metric == "linear_cka_debiased" else 2)

    if metric in ("linear_cka", "linear_cka_debiased"):
        values = _linear_cka_block(keys_a, arrays_a, keys_b, arrays_b, debiased=metric.endswith("debiased"))
        attrs = {"estimator": "debiased (unbiased HSIC, Song et al. 2012)" if metric.endswith("debiased")
                 else "biased", "centred": "columns", "kind": "similarity"}
    else:
        fn, symmetric, kind = _PAIRWISE[metric]
        values = np.empty((len(arrays_a), len(arrays_b)))
        for i, x in enumerate(arrays_a):
            for j, y in enumerate(arrays_b):
                if same and symmetric and j < i:
                    values[i, j] = values[j, i]
                else:
                    values[i, j] = fn(x, y, **params)
        attrs = {"kind": kind, **{k: v for k, v in params.items() if isinstance(v, (str, int, float, bool))}}
    return xr.DataArray(values, dims=tuple(dims), coords={dims[0]: keys_a, dims[1]: keys_b}, name=metric,
                        attrs={"metric": metric, **attrs})


def _linear_cka_block(keys_a, arrays_a, keys_b, arrays_b, *, debiased: bool) -> np.ndarray:
    """One joint pass over the distinct arrays (by identity) of both sides."""
    index: dict[int, int] = {}
    names, arrays = [], []
    for keys, arrs in ((keys_a, arrays_a), (keys_b, arrays_b)):
        for k, a in zip(keys, arrs):
            if id(a) not in index:
                index[id(a)] = len(arrays)
                names.append(k)
                arrays.append(a)
    full = cka_from_stats(joint_gram(arrays, names=names, rownorms=debiased), debiased=debiased)
    ia = [index[id(a)] for a in arrays_a]
    ib = [index[id(b)] for b in arrays_b]
    return full[np.ix_(ia, ib)]
