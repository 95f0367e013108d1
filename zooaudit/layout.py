"""Where things live inside a model repository (DESIGN.md §3), and how to write them.

Per dataset group ``<ds>``::

    <ds>/samples                sample (coord: sample id), label, group attributes; multi-hot
                                datasets also label_sets (sample, class) and multi_<attr>
                                (sample, <attr>_value), 0/1 with the names as coordinates
    <ds>/acts/<layer>           activations (sample, unit) | (sample, channel, y, x)
                                | all tokens: (token, unit) + token_start, token_count (sample,)
    <ds>/outputs                logits (sample, class), prediction (sample)
    <ds>/factors/<layer>/<m>    components (component, unit), codes (sample, component)
    <ds>/similarity/<metric>    (layer_a, layer_b)
    <ds>/bias/<attribute>       per-group metrics with CIs
    <ds>/statistics/...         activation statistics: summary (layer), layers/<layer>, collapse,
                                groups/<attribute>
    <ds>/attribution/<layer>/<part>  attribution maps (sample, method, y, x), metrics, curves,
                                reliance/<attribute>, agreement (zooaudit.stages.attribution)
    <ds>/controls/<kind>/...    controls extracted beside the activations, laid out like them
                                (samples, acts/<layer>): random_init (a seeded random-initialised
                                copy of the model), input_embeddings (text encoders)

Model-wide: ``wordsets/<digest>/<layer>`` — WEAT/SEAT word and sentence embeddings
``(text, unit)`` of one word-set file.

The sample dimension is chunked by the shard size, so each extraction shard
writes whole chunks.
"""

from __future__ import annotations

import asyncio

import numpy as np
import xarray as xr
import zarr
from zarr.codecs import BloscCodec
from zarr.core.array import AsyncArray
from zarr.core.sync import sync
from zarr.storage import StorePath

from .errors import ZooauditError
from .tokens import TokenRows, create_token_array, is_token_shape, write_token_shard

# Codec of the activation and logit arrays. The chunks are encoded and written by the background
# writer while torch computes the next shard on the same cores, so the writer's CPU time is what
# extraction overhead is made of. Blosc LZ4 after bit-shuffling: on ResNet-18 activations (4
# layers, 1024 samples) 1.17x smaller at 3.2 ms to encode, against 1.21x at 7.5 ms for zstd
# level 1 and 4.2 -> 1.8 ms to decode; per shard written and committed the writer's CPU went
# from ≈ 40 to ≈ 25 ms (/tmp-style local store; fewer bytes also mean cheaper file writes).
# Blosc runs single-threaded here (numcodecs uses its threads only on the main thread).
ACTIVATION_COMPRESSORS = (BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"),)


def samples_group(ds_key: str) -> str:
    return f"{ds_key}/samples"


def acts_group(ds_key: str, layer: str) -> str:
    return f"{ds_key}/acts/{layer}"


def outputs_group(ds_key: str) -> str:
    return f"{ds_key}/outputs"


def factors_group(ds_key: str, layer: str, method: str) -> str:
    return f"{ds_key}/factors/{layer}/{method}"


def similarity_group(ds_key: str, metric: str) -> str:
    return f"{ds_key}/similarity/{metric}"


def bias_group(ds_key: str, attribute: str) -> str:
    return f"{ds_key}/bias/{attribute}"


def statistics_group(ds_key: str, part: str) -> str:
    """Activation statistics (:mod:`zooaudit.stages.statistics`): ``summary``, ``layers/<layer>``,
    ``collapse``, ``groups/<attribute>``."""
    return f"{ds_key}/statistics/{part}"
def attribution_group(ds_key: str, layer: str, part: str) -> str:
    """``<ds>/attribution/<layer>/<part>`` (part: maps, metrics, curves, reliance/<attr>, agreement)."""
    return f"{ds_key}/attribution/{layer}/{part}"


def controls_root(ds_key: str, kind: str) -> str:
    """Layout root of one control extracted beside the activations (``random_init``,
    ``input_embeddings``): ``samples`` and ``acts/<layer>`` below it, as for the activations."""
    return f"{ds_key}/controls/{kind}"


def wordsets_group(digest: str) -> str:
    """Word-set embeddings of WEAT/SEAT (one per word-set file content, model-wide)."""
    return f"wordsets/{digest[:16]}"


def dims_for(ndim: int) -> tuple[str, ...]:
    """Named dims of a stored activation array of ``ndim`` dimensions (sample first)."""
    return {2: ("sample", "unit"), 3: ("sample", "token", "unit"), 4: ("sample", "channel", "y", "x")}.get(
        ndim, ("sample",) + tuple(f"dim_{i}" for i in range(1, ndim))
    )


def multi_hot_var(attr: str) -> str:
    """Name of a set-valued attribute's ``(sample, <attr>_value)`` 0/1 array in the samples table."""
    return f"multi_{attr}"


def multi_hot_dim(attr: str) -> str:
    return f"{attr}_value"


def samples_dataset(dataset) -> xr.Dataset:
    """The ``samples`` table of a dataset: ids, labels and group attributes; where the dataset has
    them, the multi-hot label sets ``label_sets`` (sample, class) and set-valued attributes
    ``multi_<attr>`` (sample, <attr>_value), uint8 0/1, their names the ``class`` / ``<attr>_value``
    coordinates (a dataset without them has the table it always had)."""
    coords = {"sample": ("sample", dataset.sample_ids)}
    data = {"label": ("sample", dataset.labels)}
    data.update({name: ("sample", codes) for name, codes in dataset.groups.items()})
    if getattr(dataset, "label_sets", None) is not None:
        data["label_sets"] = (("sample", "class"), dataset.label_sets)
        coords["class"] = ("class", np.array(dataset.label_set_names, dtype=object))   # Zarr v3: vlen strings
    for attr, sets in getattr(dataset, "group_sets", {}).items():
        data[multi_hot_var(attr)] = (("sample", multi_hot_dim(attr)), sets)
        coords[multi_hot_dim(attr)] = (multi_hot_dim(attr), np.array(dataset.group_set_names[attr], dtype=object))
    ds = xr.Dataset(data, coords=coords)
    ds.attrs.update({"dataset": dataset.name, "group_names": dataset.group_names,
                     "group_attributes": sorted(dataset.groups)})
    if getattr(dataset, "group_sets", None):
        ds.attrs["multi_hot_attributes"] = sorted(dataset.group_sets)
    return ds


def create_activation_arrays(store, dataset, ds_key: str, shapes: dict[str, tuple[int, ...]],
                             n_outputs: int | None, chunk: int, dtype: str = "float32",
                             token_rows: int = 0) -> None:
    """Create (empty) activation and output arrays plus the samples table.

    ``shapes`` maps layer → per-sample shape after pooling. The ``sample``
    coordinate is written in full here; the shards fill the data arrays.
    A shape ``(-1, unit)`` is an all-tokens layer, laid out as in :mod:`zooaudit.tokens`
    with ``token_rows`` rows reserved per shard.
    """
    n = len(dataset)
    samples_dataset(dataset).to_zarr(store, group=samples_group(ds_key), mode="w", consolidated=False,
                                     zarr_format=3)
    ids = dataset.sample_ids
    for layer, shape in shapes.items():
        g = zarr.open_group(store, path=acts_group(ds_key, layer), mode="w")
        g.attrs.update({"layer": layer})
        if is_token_shape(shape):
            create_token_array(g, n, shape[1], -(-n // chunk), token_rows, chunk, dtype, ids)
            continue
        g.create_array("activations", shape=(n, *shape), chunks=(chunk, *shape), dtype=dtype,
                       dimension_names=dims_for(1 + len(shape)), fill_value=np.nan,
                       compressors=ACTIVATION_COMPRESSORS)
        g.create_array("sample", data=ids, dimension_names=("sample",))
    if n_outputs is not None:
        g = zarr.open_group(store, path=outputs_group(ds_key), mode="w")
        g.create_array("logits", shape=(n, n_outputs), chunks=(chunk, n_outputs), dtype="float32",
                       dimension_names=("sample", "class"), fill_value=np.nan, compressors=ACTIVATION_COMPRESSORS)
        g.create_array("prediction", shape=(n,), chunks=(chunk,), dtype="int64",
                       dimension_names=("sample",), fill_value=-1)
        g.create_array("sample", data=ids, dimension_names=("sample",))


class ArrayCache:
    """Metadata of the arrays a writer fills, read once per writer, not once per shard.

    Each shard is written in a fresh Icechunk session (a committed session is read-only),
    and re-opening every array there re-reads its ``zarr.json`` (~2 ms each). The shards
    of one extraction never change array metadata, so the first read serves them all.
    """

    def __init__(self) -> None:
        self._metadata: dict[str, object] = {}

    def array(self, store, path: str) -> AsyncArray:
        """The array at ``path`` of ``store``, writable (zarr's asynchronous handle)."""
        meta = self._metadata.get(path)
        if meta is None:
            arr = zarr.open_array(store, path=path, mode="r+").async_array
            self._metadata[path] = arr.metadata
            return arr
        return AsyncArray(meta, StorePath(store, path))


def write_shard(store, ds_key: str, start: int, acts: dict[str, np.ndarray],
                logits: np.ndarray | None, arrays: ArrayCache | None = None) -> None:
    """Write one shard's rows ``[start, start + len)`` of every layer (whole chunks).

    The dense arrays are written in one call into zarr's event loop, so their chunks are
    encoded and stored concurrently (one loop round trip, not one per array: the writer's
    CPU per ResNet-18 shard ≈ 25 → 22 ms, its wall time ≈ 25 → 18 ms).
    ``arrays``: array metadata kept across the shards of one writer (default: read here)."""
    arrays = arrays or ArrayCache()
    writes: list[tuple[AsyncArray, np.ndarray]] = []
    for layer, arr in acts.items():
        if isinstance(arr, TokenRows):
            write_token_shard(zarr.open_group(store, path=acts_group(ds_key, layer), mode="r+"), start, arr)
            continue
        writes.append((arrays.array(store, f"{acts_group(ds_key, layer)}/activations"), arr))
    if logits is not None:
        out = outputs_group(ds_key)
        writes += [(arrays.array(store, f"{out}/logits"), logits),
                   (arrays.array(store, f"{out}/prediction"), logits.argmax(axis=1))]

    async def write_all() -> None:
        await asyncio.gather(*(a.setitem(slice(start, start + len(v)), v) for a, v in writes))

    sync(write_all())


def open_activations(store, ds_key: str, layer: str) -> xr.DataArray:
    """Lazy ``(sample, ...)`` DataArray of one layer's activations (all-tokens layers:
    :func:`zooaudit.tokens.open_token_activations`)."""
    if zarr.open_group(store, path=acts_group(ds_key, layer), mode="r").attrs.get("storage") == "tokens":
        raise ZooauditError(f"Layer {layer!r} of {ds_key!r} is stored as all tokens (token, unit) with per-sample "
                            "offsets, not (sample, unit); open it with zooaudit.tokens.open_token_activations, "
                            "or extract it with pooling 'cls' or 'token_mean' for per-sample analyses.")
    ds = xr.open_zarr(store, group=acts_group(ds_key, layer), consolidated=False, zarr_format=3)
    da = ds["activations"]
    da.name = layer
    return da


def as_matrix(da: xr.DataArray):
    """``(sample, ...)`` → Dask/NumPy ``(n_samples, n_features)`` (non-sample dims flattened)."""
    data = da.data
    return data.reshape(data.shape[0], -1) if data.ndim > 2 else data
