"""The similarity metrics, declared once: name, function, kind, symmetry, samples needed, how computed.

:data:`SIMILARITY_METRIC_LIST` is the one declaration; everything else is derived from it:
the names (:data:`METRICS`, in order), the names of each mode (:data:`STREAMED_METRICS`,
:data:`MINIBATCH_METRICS`, :data:`SAMPLE_PAIR_METRICS`), :func:`similarity_metric`
(name → declaration) and :func:`metric_kind`. :func:`~.similarity.similarity_matrices`
dispatches on these declarations; specs, stages and reports read them.

The modes:

``streamed``   exact from ONE streamed pass over the rows that accumulates the joint
               second moments of every representation (memory independent of n): linear
               CKA reads the Gram statistics, the co-moment metrics call ``from_moments``
               on each pair's co-moments.
``minibatch``  every sample, in shared random minibatches of b rows (b×b Grams):
               ``all_pairs(arrays, names, **options)`` gives the matrix over every array.
``pairwise``   need every pair of samples (n×n Gram / RDM / neighbour search, time O(n²)):
               ``function(X, Y, **options)`` pair by pair, in memory.

This module imports only the functions it declares (no stage, spec or model code).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from ..errors import unknown
from .sim_cca import cca, mean_cca_of, procrustes, procrustes_of, pwcca, pwcca_of, svcca, svcca_of
from .sim_cka import linear_cka, minibatch_cka, minibatch_cka_pairs, rbf_cka
from .sim_rsa import rsa
from .sim_units import mutual_knn

__all__ = [
    "METRICS",
    "MINIBATCH_METRICS",
    "SAMPLE_PAIR_METRICS",
    "SIMILARITY_METRIC_LIST",
    "STREAMED_METRICS",
    "SimilarityMetric",
    "metric_kind",
    "similarity_metric",
]


@dataclass(frozen=True)
class SimilarityMetric:
    """One similarity metric.

    Attributes:
        name: the name specs, results and reports use.
        function: the public one-pair function ``function(X, Y, **options)``; its
            keyword-only parameters, less those in ``fixed``, are the metric's options.
        kind: ``"similarity"`` (larger = more alike) or ``"distance"`` (0 = the same).
        symmetric: ``f(X, Y) == f(Y, X)``: computed once per unordered pair of one side.
        min_samples: the fewest samples the metric is defined on.
        mode: ``"streamed"``, ``"minibatch"`` or ``"pairwise"`` (module docstring).
        fixed: options the metric's name fixes (``linear_cka_debiased``: ``debiased=True``).
        from_moments: streamed co-moment metrics: the value of one pair from its co-moments
            (:class:`~.sim_cca._Pair`) and the options; None for linear CKA (Gram statistics).
        all_pairs: minibatch metrics: the matrix over every distinct array.
    """

    name: str
    function: Callable
    kind: Literal["similarity", "distance"]
    symmetric: bool
    min_samples: int
    mode: Literal["streamed", "minibatch", "pairwise"]
    fixed: Mapping[str, object] = field(default_factory=dict, hash=False)
    from_moments: Callable | None = None
    all_pairs: Callable | None = None


SIMILARITY_METRIC_LIST: tuple[SimilarityMetric, ...] = (
    SimilarityMetric("linear_cka", linear_cka, "similarity", True, 2, "streamed", fixed={"debiased": False}),
    SimilarityMetric("linear_cka_debiased", linear_cka, "similarity", True, 4, "streamed", fixed={"debiased": True}),
    SimilarityMetric("rbf_cka", rbf_cka, "similarity", True, 2, "pairwise"),
    SimilarityMetric("cca", cca, "similarity", True, 2, "streamed", from_moments=mean_cca_of),
    SimilarityMetric("svcca", svcca, "similarity", True, 2, "streamed", from_moments=svcca_of),
    SimilarityMetric("pwcca", pwcca, "similarity", False, 2, "streamed", from_moments=pwcca_of),
    SimilarityMetric("procrustes", procrustes, "distance", True, 2, "streamed", from_moments=procrustes_of),
    SimilarityMetric("rsa", rsa, "similarity", True, 3, "pairwise"),
    SimilarityMetric("mutual_knn", mutual_knn, "similarity", True, 2, "pairwise"),
    SimilarityMetric("minibatch_cka", minibatch_cka, "similarity", True, 4, "minibatch",
                     all_pairs=minibatch_cka_pairs),
)
_BY_NAME = {m.name: m for m in SIMILARITY_METRIC_LIST}

METRICS: tuple[str, ...] = tuple(m.name for m in SIMILARITY_METRIC_LIST)
# exact from one streamed pass over the rows (memory independent of n)
STREAMED_METRICS: tuple[str, ...] = tuple(m.name for m in SIMILARITY_METRIC_LIST if m.mode == "streamed")
# need every pair of samples: n×n Gram / RDM / neighbour search, time O(n²)
SAMPLE_PAIR_METRICS: tuple[str, ...] = tuple(m.name for m in SIMILARITY_METRIC_LIST if m.mode == "pairwise")
# every sample, in random minibatches of b rows (b×b Grams, memory O(b²) per representation):
# neither one pass over the joint moments nor an n×n matrix
MINIBATCH_METRICS: tuple[str, ...] = tuple(m.name for m in SIMILARITY_METRIC_LIST if m.mode == "minibatch")


def similarity_metric(name: str) -> SimilarityMetric:
    """The declaration of metric ``name``; a :class:`~zooaudit.errors.ZooauditError` when unknown."""
    if not isinstance(name, str) or name not in _BY_NAME:
        raise unknown("similarity metric", name, METRICS)
    return _BY_NAME[name]


def metric_kind(name: str) -> str:
    """``"distance"`` or ``"similarity"`` of metric ``name`` (a name not declared here: similarity)."""
    m = _BY_NAME.get(name)
    return m.kind if m is not None else "similarity"
