"""Validation at the door for the similarity metrics, and their warnings.

Every function in :mod:`zooaudit.analysis.similarity` takes ``(n_samples,
n_features)`` arrays whose rows are the same samples. Inputs may be NumPy arrays,
Dask arrays, xarray DataArrays (their ``.data`` is used) or lazily sliceable
array-likes with ``shape``/``ndim`` (Zarr arrays); arrays with more than two
dimensions are flattened to ``(n_samples, prod(rest))`` block by block.

Bad input raises :class:`~zooaudit.errors.ZooauditError` with one paragraph naming
the bad value and what is allowed. A similarity that is mathematically undefined
for the data (a representation with zero variance) is not an error: the metric
warns with :class:`UndefinedSimilarityWarning` and returns NaN, so one dead layer
does not sink a whole all-pairs matrix — never a silent NaN.
"""

from __future__ import annotations

import numbers

import numpy as np

from ..errors import ZooauditError, unknown
from .blocks import compute_here, is_dask, width
from .blocks import nonfinite_rows_error as nonfinite_error

# Largest n for which a metric builds n×n matrices in memory (RBF CKA, Gram-based
# HSIC): 10k samples is 800 MB per float64 matrix, and a metric holds a few.
MAX_GRAM_SAMPLES = 10_000


class UndefinedSimilarityWarning(RuntimeWarning):
    """A similarity is undefined for these data (e.g. a zero-variance representation); NaN is returned."""


class DegenerateCCAWarning(RuntimeWarning):
    """CCA is saturated: with p or q ≥ n − 1 features every canonical correlation is 1.

    With at least ``n − 1`` (centred) features a representation spans every centred
    direction of the samples, so any other representation is perfectly predictable
    from it: the correlations say nothing about the representations.
    """


def _sample_ids(x):
    """The sample-dimension coordinate of an xarray DataArray (its first dim), else None."""
    if hasattr(x, "dims") and hasattr(x, "coords") and getattr(x, "ndim", 0) >= 1 and x.dims[0] in x.coords:
        return np.asarray(x.coords[x.dims[0]].values)
    return None


def check_sample_ids(inputs, names) -> None:
    """Labelled inputs (xarray DataArrays with a coordinate on their first dim) must
    carry the same sample ids in the same order; unlabelled inputs are trusted.

    Called on the raw inputs, before :func:`.blocks.as_matrix` drops the labels.
    """
    first = None
    for x, name in zip(inputs, names):
        ids = _sample_ids(x)
        if ids is None:
            continue
        if first is None:
            first = (name, ids)
            continue
        ref_name, ref = first
        if len(ids) == len(ref) and not np.array_equal(ids, ref):
            pos = int(np.flatnonzero(ids != ref)[0]) if ids.shape == ref.shape else 0
            same_set = set(ids.tolist()) == set(ref.tolist())
            raise ZooauditError(
                f"{name} and {ref_name} label their rows with different sample ids (first difference at row "
                f"{pos}: {ids[pos].tolist()!r} vs {ref[pos].tolist()!r}{'; same ids in a different order' if same_set else ''}). "
                "Similarity compares row i of one representation with row i of the other: align both to the "
                "same samples in the same order (e.g. x.sel(sample=y.sample)) first.")


def check_samples(arrays, names, *, min_samples: int = 2) -> int:
    """All arrays share their number of rows (≥ ``min_samples``); return it."""
    ns = [int(a.shape[0]) for a in arrays]
    if len(set(ns)) > 1:
        shown = ", ".join(f"{nm}: {n}" for nm, n in zip(names, ns))
        raise ZooauditError(
            f"Representations must share their samples (rows), but the sample counts differ ({shown}). "
            "Compare activations of the same samples, in the same order.")
    if ns[0] < min_samples:
        raise ZooauditError(f"This metric needs at least {min_samples} samples; got {ns[0]}.")
    return ns[0]


# Joint width from which all-float32 inputs are multiplied in float32 (see sim_stream):
# below it float64 GEMMs cost little, and keep 1e-10 accuracy instead of ~1e-7.
FLOAT32_MIN_WIDTH = 512


def compute_dtype(arrays) -> np.dtype:
    """GEMM dtype: float32 when every input is at most single precision and the joint
    width reaches :data:`FLOAT32_MIN_WIDTH`, float64 otherwise."""
    small = all(np.dtype(a.dtype) in (np.dtype(np.float32), np.dtype(np.float16)) for a in arrays)
    wide = sum(width(a) for a in arrays) >= FLOAT32_MIN_WIDTH
    return np.dtype(np.float32) if small and wide else np.dtype(np.float64)


def dense(x, name: str = "X") -> np.ndarray:
    """Materialise ``x`` as a C-contiguous float64 ``(n, p)`` array, checked finite."""
    if is_dask(x):
        x = compute_here(x)
    a = np.ascontiguousarray(np.asarray(x, dtype=np.float64).reshape(x.shape[0], -1))
    if not np.isfinite(a).all():
        raise nonfinite_error(name, a)
    return a


def check_choice(kind: str, value, allowed) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise unknown(kind, value, allowed)
    return value


def check_int(name: str, value, *, low: int, high: int | None = None, hint: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ZooauditError(f"{name} must be an integer; got {value!r}.")
    value = int(value)
    if value < low or (high is not None and value > high):
        rng = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ZooauditError(f"{name} must be {rng}; got {value}." + (f" {hint}" if hint else ""))
    return value


def check_real(name: str, value, *, low: float, high: float = np.inf, low_open: bool = False,
               high_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value):
        raise ZooauditError(f"{name} must be a finite real number; got {value!r}.")
    value = float(value)
    bad = value < low or value > high or (low_open and value == low) or (high_open and value == high)
    if bad:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ZooauditError(f"{name} must lie in {lo}{low:g}, {high:g}{hi}; got {value!r}.")
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ZooauditError(f"{name} must be True or False; got {value!r}.")
    return bool(value)


def check_gram_size(n: int, what: str, hint: str) -> None:
    if n > MAX_GRAM_SAMPLES:
        raise ZooauditError(
            f"{what} builds n×n matrices in memory and n={n} exceeds the limit of {MAX_GRAM_SAMPLES} samples. "
            + hint)


def warn_undefined(message: str) -> float:
    import warnings

    warnings.warn(message, UndefinedSimilarityWarning, stacklevel=3)
    return float("nan")
