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
``minibatch_cka``      Nguyen et al. 2021, linear (default) or RBF kernel, any n
``cca``/``svcca``/``pwcca``   streamed covariances; PWCCA weights from X (paper's definition)
``procrustes``         angular shape distance (alpha=1); ``shape_distance`` for any alpha
``rsa``                blockwise condensed RDMs, Spearman or Kendall τ-a
``mutual_knn``         blockwise top-k, cosine neighbours
``match_neurons``      Pearson + Hungarian one-to-one unit matching
``similarity_matrix``  every ``METRICS`` name over all pairs of layers / models
=====================  ==========================================================

:func:`similarity_matrices` computes several metrics over all pairs at once: the
linear-CKA variants and the co-moment metrics (CCA family, Procrustes) of every pair
come from ONE streamed pass over the rows that accumulates the joint second moments
of all representations (memory ``O(P²)`` for ``P`` features in all, independent of
n); minibatch CKA reads every sample once per metric call in shared random
minibatches (``b×b`` Grams); the sample-pair metrics (RBF CKA, RSA, mutual k-NN)
need every pair of samples and are computed pair by pair in memory. Which metric is
computed how, its kind and the samples it needs are declared once, in :mod:`.metrics`.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence

import numpy as np
import xarray as xr

from ..errors import ZooauditError, unknown
from .metrics import (
    METRICS,
    MINIBATCH_METRICS,
    SAMPLE_PAIR_METRICS,
    SIMILARITY_METRIC_LIST,
    STREAMED_METRICS,
)
from .sim_cca import (
    _Pair,
    cca,
    full_eig,
    procrustes,
    pwcca,
    shape_distance,
    svcca,
)
from .blocks import as_matrix
from .sim_checks import (
    MAX_GRAM_SAMPLES,
    DegenerateCCAWarning,
    UndefinedSimilarityWarning,
    check_real,
    check_sample_ids,
    check_samples,
)
from .sim_cka import (
    cka_from_stats,
    cka_matrix,
    joint_moments,
    linear_cka,
    minibatch_cka,
    rbf_cka,
)
from .sim_rsa import rdm, rsa
from .sim_span import reducible, row_space
from .sim_stream import JointGram
from .sim_units import NeuronMatch, knn_indices, match_neurons, mutual_knn

__all__ = [
    "MAX_GRAM_SAMPLES",
    "METRICS",
    "MINIBATCH_METRICS",
    "SAMPLE_PAIR_METRICS",
    "STREAMED_METRICS",
    "DegenerateCCAWarning",
    "JointGram",
    "NeuronMatch",
    "UndefinedSimilarityWarning",
    "cca",
    "cka_matrix",
    "knn_indices",
    "linear_cka",
    "match_neurons",
    "minibatch_cka",
    "mutual_knn",
    "procrustes",
    "pwcca",
    "rbf_cka",
    "rdm",
    "rsa",
    "shape_distance",
    "similarity_matrices",
    "similarity_matrix",
    "svcca",
]


# The metrics are declared once, in .metrics; METRICS and the names of each mode are derived there.
_DECLARED = {m.name: m for m in SIMILARITY_METRIC_LIST}


def _check_params(metric: str, params: dict) -> dict:
    decl = _DECLARED[metric]
    allowed = [p.name for p in inspect.signature(decl.function).parameters.values()
               if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in decl.fixed]
    if not isinstance(params, Mapping):
        raise ZooauditError(f"parameters of metric {metric!r} must be a mapping {{name: value}}; got {params!r}.")
    for key in params:
        if key not in allowed:
            raise unknown(f"parameter for metric {metric!r}", key, allowed,
                          "linear CKA variants take none (choose 'linear_cka' or 'linear_cka_debiased')."
                          if decl.fixed else "" if allowed else f"{metric} takes none.")
    params = dict(params)
    if metric == "svcca" and "keep_variance" in params:   # the co-moment path skips svcca()'s own check
        params["keep_variance"] = check_real("keep_variance", params["keep_variance"], low=0.0, high=1.0,
                                             low_open=True)
    return params


def similarity_matrix(layers_a: Mapping[str, object], layers_b: Mapping[str, object] | None = None, *,
                      metric: str = "linear_cka", dims: tuple[str, str] = ("layer_a", "layer_b"),
                      device=None, **params) -> xr.DataArray:
    """``metric`` between every ``layers_a`` entry and every ``layers_b`` entry (default: ``layers_a``).

    ``layers_a``, ``layers_b``: ``{name: (n, p_name) array}`` sharing their samples
    (xarray DataArrays labelled with sample ids must carry the same ids, in order).
    ``metric``: one of :data:`METRICS`; ``"cca"`` is the mean canonical correlation,
    ``"procrustes"`` a distance (0 = same shape), the rest similarities.
    ``params``: keyword options of the metric's function (e.g. ``k=`` for
    ``mutual_knn``, ``threshold=`` for ``rbf_cka``). The streamed metrics
    (:data:`STREAMED_METRICS`) come from one joint pass over every distinct array
    (accumulated with NumPy, or with torch on ``device`` when one is given: see
    :func:`similarity_matrices`);
    :data:`MINIBATCH_METRICS` share one set of minibatches for all pairs; the
    others are computed pair by pair (once per unordered pair when symmetric).

    Returns a ``(len(layers_a), len(layers_b))`` float64 DataArray with dims
    ``dims``, coordinates the mapping keys, and attrs naming the metric.
    """
    if not isinstance(metric, str) or metric not in METRICS:
        raise unknown("similarity metric", metric, METRICS)
    return similarity_matrices(layers_a, layers_b, metrics=[metric], dims=dims, params={metric: params},
                               device=device)[metric]


def similarity_matrices(layers_a: Mapping[str, object], layers_b: Mapping[str, object] | None = None, *,
                        metrics: Sequence[str], dims: tuple[str, str] = ("layer_a", "layer_b"),
                        params: Mapping[str, Mapping] | None = None, device=None) -> dict[str, xr.DataArray]:
    """Several metrics over all pairs: ``{metric: similarity_matrix(..., metric=metric)}``.

    Every requested metric of :data:`STREAMED_METRICS` is computed from the same
    single pass over the rows (float64 joint moments of all distinct arrays of both
    sides, plus row-norm sums when ``linear_cka_debiased`` is asked for); the
    :data:`MINIBATCH_METRICS` from one sweep of minibatches over every distinct array;
    the :data:`SAMPLE_PAIR_METRICS` pair by pair. ``params``: ``{metric: {option: value}}``.
    ``device``: ``None`` accumulates the joint moments with NumPy on the CPU (the
    default); a torch device (``"cuda"``, ``"cpu"``, ...) accumulates them with torch
    there (:mod:`~zooaudit.analysis.sim_torch`; the same values to rounding).
    """
    if isinstance(metrics, str) or not isinstance(metrics, Sequence) or not metrics:
        raise ZooauditError(f"metrics must be a non-empty list of metric names; got {metrics!r}. "
                            f"Allowed: {', '.join(METRICS)}.")
    for metric in metrics:
        if not isinstance(metric, str) or metric not in METRICS:
            raise unknown("similarity metric", metric, METRICS)
    if len(set(metrics)) != len(metrics):
        raise ZooauditError(f"metrics lists a metric twice: {list(metrics)!r}.")
    params = dict(params or {})
    for m in params:
        if m not in metrics:
            raise unknown("metric in params", m, list(metrics), "params are keyed by the requested metrics.")
    params = {m: _check_params(m, params.get(m, {})) for m in metrics}
    if (not isinstance(dims, (tuple, list)) or len(dims) != 2 or not all(isinstance(d, str) for d in dims)
            or dims[0] == dims[1]):
        raise ZooauditError(f"dims must be two distinct dimension names, e.g. ('layer_a', 'layer_b'); got {dims!r}.")
    same = layers_b is None
    layers_b = layers_a if same else layers_b
    for label, m in (("layers_a", layers_a), ("layers_b", layers_b)):
        if not isinstance(m, Mapping) or not m:
            raise ZooauditError(f"{label} must be a non-empty mapping {{name: (n_samples, n_features) array}}; "
                                f"got {type(m).__name__}.")
    keys_a, keys_b = [str(k) for k in layers_a], [str(k) for k in layers_b]
    check_sample_ids([*layers_a.values(), *([] if same else layers_b.values())], keys_a if same else [*keys_a, *keys_b])
    arrays_a = [as_matrix(v, k) for k, v in zip(keys_a, layers_a.values())]
    arrays_b = arrays_a if same else [as_matrix(v, k) for k, v in zip(keys_b, layers_b.values())]
    min_samples = max(_DECLARED[m].min_samples for m in metrics)
    check_samples(arrays_a if same else [*arrays_a, *arrays_b], keys_a if same else [*keys_a, *keys_b],
                  min_samples=min_samples)

    values = {}
    streamed = [m for m in metrics if _DECLARED[m].mode == "streamed"]
    if streamed:
        values.update(_streamed_block(streamed, params, keys_a, arrays_a, keys_b, arrays_b, same, device))
    for metric in (m for m in metrics if _DECLARED[m].mode == "minibatch"):
        names, arrays, ia, ib = _distinct(keys_a, arrays_a, keys_b, arrays_b)
        values[metric] = _DECLARED[metric].all_pairs(arrays, names, **params[metric])[np.ix_(ia, ib)]
    for metric in (m for m in metrics if _DECLARED[m].mode == "pairwise"):
        decl = _DECLARED[metric]
        v = np.empty((len(arrays_a), len(arrays_b)))
        for i, x in enumerate(arrays_a):
            for j, y in enumerate(arrays_b):
                v[i, j] = v[j, i] if same and decl.symmetric and j < i else decl.function(x, y, **params[metric])
        values[metric] = v

    out = {}
    for metric in metrics:
        attrs = {"metric": metric, "kind": _DECLARED[metric].kind,
                 **{k: v for k, v in params[metric].items() if isinstance(v, (str, int, float, bool))}}
        if metric.startswith("linear_cka"):
            attrs.update(estimator="debiased (unbiased HSIC, Song et al. 2012)" if metric.endswith("debiased")
                         else "biased", centred="columns")
        if metric == "procrustes":
            attrs["units"] = "radians"
        if metric == "minibatch_cka":
            attrs.setdefault("kernel", "linear")
            attrs["estimator"] = "minibatch unbiased HSIC (Nguyen et al. 2021), sums over minibatches then divided"
        out[metric] = xr.DataArray(values[metric], dims=tuple(dims), coords={dims[0]: keys_a, dims[1]: keys_b},
                                   name=metric, attrs=attrs)
    return out


def _distinct(keys_a, arrays_a, keys_b, arrays_b):
    """``(names, arrays, ia, ib)``: the distinct arrays (by identity) of both sides, and where each side's are."""
    index: dict[int, int] = {}
    names, arrays = [], []
    for keys, arrs in ((keys_a, arrays_a), (keys_b, arrays_b)):
        for k, a in zip(keys, arrs):
            if id(a) not in index:
                index[id(a)] = len(arrays)
                names.append(k)
                arrays.append(a)
    return names, arrays, [index[id(a)] for a in arrays_a], [index[id(b)] for b in arrays_b]


def _streamed_block(metrics, params, keys_a, arrays_a, keys_b, arrays_b, same: bool,
                    device=None) -> dict[str, np.ndarray]:
    """One joint pass over the distinct arrays (by identity) of both sides → every streamed metric."""
    names, arrays, ia, ib = _distinct(keys_a, arrays_a, keys_b, arrays_b)
    # layers wider than their rows enter through their row space (same values, n² not p² memory)
    arrays = [row_space(a, k) if reducible(a, metrics) else a for k, a in zip(names, arrays)]
    moments = [m for m in metrics if _DECLARED[m].from_moments is not None]
    grams = [m for m in metrics if _DECLARED[m].from_moments is None]   # linear CKA: from the Gram statistics
    # CCA-type metrics invert covariances: accumulate in float64 GEMMs; linear CKA alone may use float32.
    # Debiased (unbiased-HSIC) CKA also needs the sums of squared row norms.
    acc = joint_moments(arrays, names=names, rownorms=any(_DECLARED[m].fixed.get("debiased") for m in grams),
                     dtype=np.float64 if moments else None, device=device)
    out = {}
    for metric in sorted(grams, key=METRICS.index):
        out[metric] = cka_from_stats(acc, **_DECLARED[metric].fixed)[np.ix_(ia, ib)]
    if moments:
        C = acc.centred()
        constant = acc.constant_layers(C)
        sl = acc.slices
        eigs: dict[int, tuple] = {}

        def eig(i):
            if i not in eigs:
                eigs[i] = full_eig(C[sl[i], sl[i]])
            return eigs[i]

        for metric in moments:
            fn, symmetric = _DECLARED[metric].from_moments, _DECLARED[metric].symmetric
            v = np.empty((len(ia), len(ib)))
            for r, i in enumerate(ia):
                for c, j in enumerate(ib):
                    if same and symmetric and c < r:
                        v[r, c] = v[c, r]
                        continue
                    pair = _Pair.from_moments(acc.n, C[sl[i], sl[i]], C[sl[j], sl[j]], C[sl[i], sl[j]],
                                              constant[[i, j]], eigs=(eig(i), eig(j)))
                    v[r, c] = fn(pair, **params[metric])
            out[metric] = v
    return out
