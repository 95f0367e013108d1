"""Array datasets: NumPy ``.npy`` / ``.npz``, Zarr groups, and HF ``datasets`` folders.

``arrays`` — ``DatasetSpec.path`` is a ``.npz`` file, a Zarr group (a folder), or a
``.npy`` file of inputs (a float32 C-order ``.npy`` is memory-mapped copy-on-write: its
pages are read from the file as the shards reach them, never copied whole into RAM).
Arrays by name (options override the names):

- ``inputs`` (option ``inputs``): ``(sample, *input_shape)``, cast to float32;
- ``labels`` (option ``labels``): ``(sample,)`` integers; for a ``.npy`` file the
  option names a second ``.npy`` file; absent: every label is 0;
- ``sample_ids``: ``(sample,)`` unique integers (default: the row numbers);
- ``group_<attr>``: one ``(sample,)`` array per group attribute (or option
  ``groups``: a list of array names, each used as an attribute of that name);
- ``masks`` (option ``masks``): optional ``(sample, y, x)`` foreground masks of image
  inputs ``(sample, channel, y, x)``, non-zero = foreground; for a ``.npy`` file the
  option names a second ``.npy`` file;
- ``label_sets`` (option ``label_sets``): optional ``(sample, label)`` 0/1 multi-hot label
  sets (multi-label data; ``labels`` stays the single label), for a ``.npy`` file a second
  ``.npy`` file; the column names in ``names_label_sets`` (strings; default ``0``, ``1``, …);
- ``multi_<attr>``: one ``(sample, value)`` 0/1 array per set-valued (multi-hot) attribute (or
  option ``multi_groups``: a list of array names, each used as an attribute of that name), the
  value names in ``names_<array>``.

``hf-disk`` — ``DatasetSpec.path`` is a folder written by ``datasets``'
``save_to_disk`` (a ``Dataset``, or a ``DatasetDict`` whose split is
``DatasetSpec.split``; ``all`` concatenates the splits). Options: ``inputs``
(column; default the first of ``pixel_values``, ``image``, ``img``, ``inputs``,
``x``), ``labels`` (default ``label`` / ``labels`` if present), ``groups`` (a list of
columns), ``image_size`` and ``mode`` for image columns (as for image folders);
multi-hot columns: ``label_sets`` (a column) and ``multi_groups`` (a list of columns), each
holding per sample a list of names (``List(Value('string'))``, or ``List(ClassLabel)`` codes,
named by the feature), or a fixed-length 0/1 vector (any other numeric list, unnamed:
``0``, ``1``, …); ``label_set_names``: the allowed label names in column order (default: the
``ClassLabel`` names, or the sorted names seen).

Group attribute values are coded in sorted order of their string form (class
names of ``ClassLabel`` columns are used as the values).
"""

from __future__ import annotations

import mmap

import numpy as np

from ..errors import ZooauditError
from .registry import register
from .types import AuditDataset
from .multihot import from_codes, from_names, from_vectors
from .images import (
    code_groups,
    local_path,
    options_and_path,
    parse_size,
    stack_images,
    to_array,
)

ARRAY_OPTIONS = {"inputs", "labels", "groups", "masks", "label_sets", "multi_groups"}
HF_OPTIONS = {"inputs", "labels", "groups", "image_size", "mode", "label_sets", "multi_groups", "label_set_names"}
HF_INPUT_COLUMNS = ("pixel_values", "image", "img", "inputs", "x")


def memory_mapped(a) -> bool:
    """Whether ``a`` is a view of a memory-mapped file (its pages are then page cache the kernel
    can drop, not anonymous memory): how a float32 ``.npy`` loaded by :func:`load_arrays` arrives."""
    while a is not None:
        if isinstance(a, (np.memmap, mmap.mmap)):
            return True
        a = getattr(a, "base", None)
    return False


def _nonfinite_rows(inputs: np.ndarray, rows: int = 4096) -> np.ndarray:
    """Row numbers of samples with a non-finite value, read in blocks (a memory-mapped file
    is paged through once, never copied whole)."""
    flat = inputs.reshape(len(inputs), -1)
    return np.concatenate([np.flatnonzero(~np.isfinite(flat[i:i + rows]).all(axis=1)) + i
                           for i in range(0, len(flat), rows)] or [np.zeros(0, np.int64)])


def _finish(name: str, spec, inputs, labels, ids, group_columns: dict[str, list], where: str,
            masks=None, sets: dict | None = None) -> AuditDataset:
    """Validate lengths and dtypes; build the dataset."""
    inputs = np.asarray(inputs)
    n = len(inputs) if inputs.ndim else 0
    if n == 0:
        raise ZooauditError(f"Dataset {name!r} at {where!r} is empty: it needs at least one sample.")
    if inputs.dtype.kind not in "fiub":
        raise ZooauditError(f"Dataset {name!r}: inputs at {where!r} have dtype {inputs.dtype}; numeric arrays only.")
    if inputs.dtype.kind == "f" and (bad := _nonfinite_rows(inputs)).size:
        raise ZooauditError(f"Dataset {name!r}: inputs at {where!r} hold NaN or ±Inf in {bad.size} sample(s) (rows "
                            f"{', '.join(map(str, bad[:5]))}{' …' if bad.size > 5 else ''}); a model's activations on "
                            "them would be meaningless. Allowed: finite inputs — drop or impute those samples.")
    labels = np.zeros(n, np.int64) if labels is None else np.asarray(labels)
    ids = np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids)
    for what, arr in [("labels", labels), ("sample_ids", ids), *[(f"group {k!r}", np.asarray(v))
                                                                for k, v in group_columns.items()]]:
        if arr.shape != (n,):
            raise ZooauditError(f"Dataset {name!r} at {where!r}: {what} has shape {arr.shape}; expected ({n},) — one "
                                "value per sample of the inputs.")
    if labels.dtype.kind not in "iub":
        raise ZooauditError(f"Dataset {name!r}: labels must be integers, got dtype {labels.dtype}.")
    if len(np.unique(ids)) != n:
        raise ZooauditError(f"Dataset {name!r}: sample_ids at {where!r} are not unique.")
    groups, group_names = code_groups({k: list(v) for k, v in group_columns.items()})
    return AuditDataset(name=name, spec=spec.model_dump(), inputs=np.ascontiguousarray(inputs, np.float32),
                        labels=labels.astype(np.int64), sample_ids=ids.astype(np.int64), groups=groups,
                        group_names=group_names, masks=masks, **(sets or {}))


def _names_list(option, field: str) -> list[str]:
    """An option that lists names or array names: one string or a list of them."""
    values = option if isinstance(option, list) else [option]
    if not all(isinstance(v, str) and v for v in values):
        raise ZooauditError(f"options.{field} must be a name or a list of names; got {option!r}.")
    return values


def _array_sets(arrays, options: dict, where: str) -> dict:
    """The multi-hot columns of an ``.npz`` / Zarr dataset (keys in the module docstring)."""
    out: dict = {}
    key = str(options.get("label_sets", "label_sets"))
    if (sets := _get(arrays, key, where, required="label_sets" in options)) is not None:
        out["label_sets"] = sets
        out["label_set_names"] = _names(arrays, key, where)
    if "multi_groups" in options:
        cols = {g: g for g in _names_list(options["multi_groups"], "multi_groups")}
    else:
        cols = {k[len("multi_"):]: k for k in arrays if k.startswith("multi_")}
    if cols:
        out["group_sets"] = {attr: _get(arrays, k, where) for attr, k in cols.items()}
        out["group_set_names"] = {attr: _names(arrays, k, where) for attr, k in cols.items()}
    return out


def _names(arrays, key: str, where: str) -> list[str]:
    """The column names of multi-hot array ``key``: array ``names_<key>`` (strings), or none."""
    names = _get(arrays, f"names_{key}", where, required=False)
    if names is None:
        return []
    if names.ndim != 1 or names.dtype.kind not in "USiu":
        raise ZooauditError(f"{where!r}: names_{key} must be a 1-d array of names (strings), one per column of "
                            f"{key!r}; got shape {names.shape}, dtype {names.dtype}.")
    return [str(v) for v in names]


def _get(arrays, key: str, where: str, required: bool = True):
    if key in arrays:
        return np.asarray(arrays[key][...])
    if required:
        raise ZooauditError(f"{where!r} has no array {key!r}; it holds {sorted(arrays)}. Name the right one with "
                            "options.inputs / options.labels.")
    return None


def _np_load(path, mmap_mode=None):
    # allow_pickle=False: an object array would need unpickling, which can run code.
    import zipfile

    try:
        return np.load(path, allow_pickle=False, mmap_mode=mmap_mode)
    except (zipfile.BadZipFile, EOFError, OSError) as err:
        raise ZooauditError(f"Cannot read {str(path)!r}: it is not a valid .npy / .npz file ({err}). Allowed: files "
                            "written by numpy.save / numpy.savez, or a Zarr group folder.") from None
    except ValueError as err:
        raise ZooauditError(f"Cannot load {str(path)!r} without unpickling ({err}); store numeric arrays only.") from None


def _npz_item(z, key: str, where: str):
    try:
        return z[key]
    except ValueError as err:
        raise ZooauditError(f"Array {key!r} in {where!r} cannot be loaded without unpickling ({err}); store numeric "
                            "arrays only.") from None


@register("arrays")
def load_arrays(spec) -> AuditDataset:
    options, path = options_and_path(spec, ARRAY_OPTIONS, "arrays")
    where = str(path)
    if path.suffix == ".npy":
        # Copy-on-write map ("c", not "r"): the arrays stay writable, as loaded ones are, for
        # torch.from_numpy; _finish keeps the map unless the dtype or order needs converting.
        inputs = _np_load(path, mmap_mode="c")
        labels = _np_load(local_path(str(options["labels"]), "arrays")) if "labels" in options else None
        masks = _np_load(local_path(str(options["masks"]), "arrays")) if "masks" in options else None
        if "multi_groups" in options:
            raise ZooauditError("Dataset 'arrays': options.multi_groups needs a .npz file or a Zarr group (arrays by "
                                "name); a .npy file of inputs takes options labels, masks and label_sets only.")
        sets = {"label_sets": _np_load(local_path(str(options["label_sets"]), "arrays"))} \
            if "label_sets" in options else None
        return _finish("arrays", spec, inputs, labels, None, {}, where, masks, sets)
    if path.suffix == ".npz":
        with _np_load(path) as z:
            arrays = {k: _npz_item(z, k, where) for k in z.files}
    elif path.is_dir():
        import zarr

        group = zarr.open_group(str(path), mode="r")
        arrays = {k: v for k, v in group.arrays()}
    else:
        raise ZooauditError(f"Dataset 'arrays': {where!r} is neither a .npy / .npz file nor a Zarr group folder.")
    inputs = _get(arrays, str(options.get("inputs", "inputs")), where)
    labels = _get(arrays, str(options.get("labels", "labels")), where, required="labels" in options)
    ids = _get(arrays, "sample_ids", where, required=False)
    masks = _get(arrays, str(options.get("masks", "masks")), where, required="masks" in options)
    if "groups" in options:
        names = options["groups"] if isinstance(options["groups"], list) else [options["groups"]]
        cols = {g: _get(arrays, g, where) for g in names}
    else:
        cols = {k[len("group_"):]: np.asarray(v[...]) for k, v in arrays.items() if k.startswith("group_")}
    return _finish("arrays", spec, inputs, labels, ids, cols, where, masks, _array_sets(arrays, options, where))


def _hf_split(obj, split: str, where: str):
    import datasets

    if isinstance(obj, datasets.DatasetDict):
        if split == "all":
            return datasets.concatenate_datasets([obj[k] for k in sorted(obj)])
        if split not in obj:
            raise ZooauditError(f"HF dataset {where!r} has splits {sorted(obj)}; DatasetSpec.split={split!r} is not "
                                "one of them (or use 'all').")
        return obj[split]
    return obj


def _hf_column_values(ds, column: str):
    """Values of a column; ``ClassLabel`` codes become their class names."""
    import datasets

    feature = ds.features[column]
    values = ds[column]
    if isinstance(feature, datasets.ClassLabel):
        return [feature.int2str(int(v)) for v in values]
    return list(values)


@register("hf-disk")
def load_hf_disk(spec) -> AuditDataset:
    import datasets

    options, path = options_and_path(spec, HF_OPTIONS, "hf-disk")
    where = str(path)
    try:
        obj = datasets.load_from_disk(where)
    except (FileNotFoundError, ValueError) as err:
        raise ZooauditError(f"{where!r} is not a dataset saved with datasets' save_to_disk: {err}") from None
    ds = _hf_split(obj, spec.split, where)
    columns = list(ds.column_names)
    input_col = options.get("inputs") or next((c for c in HF_INPUT_COLUMNS if c in columns), None)
    if input_col not in columns:
        raise ZooauditError(f"HF dataset {where!r}: no input column {input_col!r}; columns are {columns}. "
                            "Name it with options.inputs.")
    label_col = options.get("labels") or next((c for c in ("label", "labels") if c in columns), None)
    if label_col is not None and label_col not in columns:
        raise ZooauditError(f"HF dataset {where!r}: no label column {label_col!r}; columns are {columns}.")
    group_cols = options.get("groups", [])
    group_cols = group_cols if isinstance(group_cols, list) else [group_cols]
    for g in group_cols:
        if g not in columns:
            raise ZooauditError(f"HF dataset {where!r}: no group column {g!r}; columns are {columns}.")
    if len(ds) == 0:
        raise ZooauditError(f"HF dataset {where!r} (split {spec.split!r}) is empty: it needs at least one sample.")
    if isinstance(ds.features[input_col], datasets.Image):
        size = parse_size(options.get("image_size"))
        mode = str(options.get("mode", "RGB"))
        images = [to_array(img, mode, size) for img in ds[input_col]]
        inputs = stack_images(images, [f"row {i}" for i in range(len(images))], "hf-disk")
    else:
        inputs = np.asarray(ds.with_format("numpy")[input_col])
    labels = np.asarray(ds[label_col]) if label_col else None
    cols = {g: _hf_column_values(ds, g) for g in group_cols}
    return _finish("hf-disk", spec, inputs, labels, None, cols, where, sets=_hf_sets(ds, options, where))


def _hf_sets(ds, options: dict, where: str) -> dict:
    """The multi-hot columns of an HF dataset (forms in the module docstring)."""
    out: dict = {}
    columns = list(ds.column_names)
    wanted = {}
    if "label_sets" in options:
        wanted["label_sets"] = _names_list(options["label_sets"], "label_sets")[0]
    for g in _names_list(options["multi_groups"], "multi_groups") if "multi_groups" in options else []:
        wanted[g] = g
    if "label_set_names" in options and "label_sets" not in options:
        raise ZooauditError("options.label_set_names needs options.label_sets (the column of label sets).")
    for what, col in wanted.items():
        if col not in columns:
            raise ZooauditError(f"HF dataset {where!r}: no multi-hot column {col!r} (options."
                                f"{'label_sets' if what == 'label_sets' else 'multi_groups'}); columns are {columns}.")
    for what, col in wanted.items():
        vocabulary = _names_list(options["label_set_names"], "label_set_names") \
            if what == "label_sets" and "label_set_names" in options else None
        matrix, names = _hf_multi_hot(ds, col, f"column {col!r}", vocabulary)
        if what == "label_sets":
            out["label_sets"], out["label_set_names"] = matrix, names
        else:
            out.setdefault("group_sets", {})[what] = matrix
            out.setdefault("group_set_names", {})[what] = names
    return out


def _hf_multi_hot(ds, column: str, field: str, vocabulary) -> tuple[np.ndarray, list[str]]:
    """``((n, C) 0/1, names)`` of a list-valued column: names, ``ClassLabel`` codes or 0/1 vectors."""
    import datasets

    feature = ds.features[column]
    inner = getattr(feature, "feature", None)
    if not isinstance(feature, (datasets.List, datasets.LargeList, datasets.Sequence)) or inner is None:
        raise ZooauditError(f"HF dataset: {field} has feature {feature}; a multi-hot column holds a list per sample "
                            "(names, ClassLabel codes or a 0/1 vector).")
    rows = list(ds[column])
    if isinstance(inner, datasets.ClassLabel):
        if vocabulary is None:
            return from_codes(rows, field, "hf-disk", inner.num_classes), list(inner.names)
        rows = [[inner.int2str(int(v)) for v in r] for r in rows]
        return from_names(rows, field, "hf-disk", vocabulary)
    if isinstance(inner, datasets.Value) and inner.dtype in ("string", "large_string"):
        return from_names(rows, field, "hf-disk", vocabulary)
    matrix = from_vectors(rows, field, "hf-disk")
    if vocabulary is not None and len(vocabulary) != matrix.shape[1]:
        raise ZooauditError(f"HF dataset: {field} has {matrix.shape[1]} 0/1 entries per row but options."
                            f"label_set_names lists {len(vocabulary)} names; give one name per entry.")
    return matrix, list(vocabulary or [])
