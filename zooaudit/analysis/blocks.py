"""Shared infrastructure of the analyses: door checks and row blocks.

Every analysis takes ``(n_samples, n_features)`` arrays whose rows are samples —
NumPy, Dask, xarray DataArrays (their ``.data``) or lazily sliceable array-likes
with ``shape``/``ndim``/``dtype`` (Zarr arrays) — and reads them in row blocks so that
memory stays independent of ``n``:

- door checks: :func:`as_matrix` (both families), :func:`layer_matrix` (the
  factorizations' wording, flattened, non-empty), :func:`is_dask`, :func:`width`, and
  the two errors for NaN/±Inf (:func:`nonfinite_rows_error` names the rows, for the
  similarity metrics; :func:`nonfinite_layer_error` counts the values, for the
  factorizations — each family's wording is kept);
- row blocks: :func:`row_bounds` (whole chunks of the first chunked input),
  :func:`iter_blocks` / :func:`load_rows` (one array, stored dtype kept so float32
  stays float32 on the way to torch), :func:`compute_here` and :data:`ROW_BLOCK`.

Device resolution is :mod:`zooaudit.devices` (extraction uses it too).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..errors import ZooauditError

ROW_BLOCK = 8192  # rows per block when streaming in-memory (NumPy) arrays


def compute_here(x):
    """``x`` with any lazy (Dask / xarray-over-Dask) values computed on the calling thread.

    Never through an ambient distributed client: these reads run inside Dask worker tasks,
    where a nested cluster compute can wait forever for a busy worker thread. NumPy and
    other eager inputs are returned as they are."""
    return x.compute(scheduler="synchronous") if hasattr(x, "compute") else x


def is_dask(x) -> bool:
    return hasattr(x, "dask") and hasattr(x, "chunks")


def width(x) -> int:
    """Features per sample of an ``(n, ...)`` array: the product of its trailing dims."""
    return int(np.prod(x.shape[1:]))


def as_matrix(x, name: str = "X", *, purpose: str = "similarity"):
    """Return ``x`` as a lazily sliceable array with ``ndim >= 2`` (not copied).

    NumPy-convertible inputs become ``np.ndarray``; Dask and Zarr arrays stay lazy; an
    xarray DataArray gives its ``.data``. The one door check of both analysis families:
    ``name`` says what is checked and ``purpose`` what it is for in the errors
    (:func:`layer_matrix` passes ``"Layer 'conv1'"`` and ``"factorization"``).
    Arrays with more than two dimensions are returned as they are; callers flatten the
    trailing dims (block by block, or :func:`layer_matrix` at once).
    (:func:`zooaudit.layout.as_matrix` is another thing: it only flattens a stored
    activations DataArray, unchecked.)
    """
    if hasattr(x, "dims") and hasattr(x, "data") and hasattr(x, "coords"):  # xarray.DataArray
        x = x.data
    if not (is_dask(x) or isinstance(x, np.ndarray) or
            (hasattr(x, "shape") and hasattr(x, "ndim") and hasattr(x, "dtype") and hasattr(x, "__getitem__"))):
        x = np.asarray(x)
    if x.ndim < 2:
        raise ZooauditError(
            f"{name} has shape {tuple(x.shape)}; {purpose} needs (n_samples, n_features) arrays, 2-D or more "
            "(extra trailing dims are flattened). Reshape a single feature with x.reshape(-1, 1).")
    dt = np.dtype(x.dtype)
    if not (np.issubdtype(dt, np.number) or dt == np.bool_) or np.issubdtype(dt, np.complexfloating):
        raise ZooauditError(f"{name} must hold real numbers; got dtype {dt}.")
    if width(x) == 0:
        raise ZooauditError(f"{name} is empty: it has no features (shape {tuple(x.shape)}); {purpose} needs at "
                            "least one. Check the layer selection.")
    return x


def layer_matrix(A, name: str):
    """Validate and flatten ``A`` to ``(N, D)`` (NumPy or Dask; an xarray DataArray gives its data).

    The checks of :func:`as_matrix`, worded for the factorization of layer ``name``; a
    layer without samples is refused too (similarity counts samples later, against each
    metric's own minimum).
    """
    A = as_matrix(A, f"Layer {name!r}", purpose="factorization")
    if A.ndim > 2:
        A = A.reshape(A.shape[0], -1)
    if A.shape[0] == 0:
        raise ZooauditError(f"Layer {name!r} is empty: it has no samples (shape {tuple(A.shape)}); nothing to "
                            "factorize. Check that the dataset has samples.")
    return A


def nonfinite_rows_error(name: str, block: np.ndarray, start: int = 0) -> ZooauditError:
    """The similarity metrics' error for non-finite values in ``block`` ``(b, ...)`` (rows ``start`` … of the input)."""
    bad = np.flatnonzero(~np.isfinite(block.reshape(block.shape[0], -1)).all(axis=1)) + start
    shown = ", ".join(str(int(r)) for r in bad[:5]) + (" …" if len(bad) > 5 else "")
    where = f"row {shown}" if len(bad) == 1 else f"rows {shown}" if len(bad) else f"rows from {start}"
    return ZooauditError(
        f"{name} contains non-finite values (NaN or ±Inf) in {where}; similarity metrics need finite "
        "activations. Drop or impute those samples (the same rows from every representation) first.")


def nonfinite_layer_error(name: str, method: str, count: int) -> ZooauditError:
    """The factorizations' error for ``count`` non-finite values in layer ``name``."""
    return ZooauditError(f"Layer {name!r} contains NaN or Inf activations ({count} values); {method} needs finite "
                         "values. Drop or impute the affected samples (e.g. numpy.nan_to_num) and rerun.")


def row_bounds(*arrays, rows: int | None = None) -> list[tuple[int, int]]:
    """Row ranges ``[(start, stop), ...]`` of about ``rows`` rows over arrays sharing their rows.

    The ranges are made of whole chunks of the first chunked input (Dask chunks of axis 0,
    or the chunk length of a Zarr array), merged until a range holds about ``rows`` rows;
    unchunked inputs get plain ``rows``-row ranges. ``rows=None`` (one array): each Dask
    chunk on its own, else blocks of about :data:`ROW_BLOCK` rows.
    """
    if rows is None:
        rows = 1 if is_dask(arrays[0]) else ROW_BLOCK
    n = int(arrays[0].shape[0])
    for a in arrays:
        chunks = getattr(a, "chunks", None)
        if is_dask(a):
            sizes = list(chunks[0])
        elif isinstance(chunks, tuple) and chunks and isinstance(chunks[0], (int, np.integer)):
            sizes = [int(chunks[0])] * (n // int(chunks[0])) + ([n % int(chunks[0])] if n % int(chunks[0]) else [])
        else:
            continue
        bounds, start, stop = [], 0, 0
        for size in sizes:   # merge consecutive chunks until a block holds ~rows rows
            if stop > start and stop - start + size > rows:
                bounds.append((start, stop))
                start = stop
            stop += size
        if stop > start:
            bounds.append((start, stop))
        return bounds
    return [(s, min(s + rows, n)) for s in range(0, n, rows)]


def iter_blocks(A, dtype=None) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield ``(start, stop, block (stop − start, D))`` over row chunks of a NumPy or Dask array.

    Dask arrays are read one chunk of rows at a time (nothing else is held); NumPy arrays in
    blocks of :data:`ROW_BLOCK` rows. ``dtype=None`` keeps float32/float64 as stored
    (other dtypes become float64).
    """
    for start, stop in row_bounds(A):
        yield start, stop, load_rows(A, start, stop, dtype)


def load_rows(A, start: int, stop: int, dtype=None) -> np.ndarray:
    """Rows ``[start, stop)`` of a NumPy or Dask array as a ``(stop − start, D)`` NumPy block."""
    block = np.asarray(compute_here(A[start:stop]))
    want = dtype or (block.dtype if block.dtype in (np.float32, np.float64) else np.float64)
    return block.reshape(stop - start, -1).astype(want, copy=False)


__all__ = ["ROW_BLOCK", "as_matrix", "compute_here", "is_dask", "iter_blocks", "layer_matrix",
           "load_rows", "nonfinite_layer_error", "nonfinite_rows_error", "row_bounds", "width"]
