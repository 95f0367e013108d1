"""write_datasets (one batched Zarr write of several small groups) stores exactly what
write_dataset (xarray.to_zarr, one group at a time) stores: same keys, same metadata, same chunks."""

import json

import dask.array as da
import numpy as np
import xarray as xr
from zarr.storage import MemoryStore

from zooaudit.store import write_dataset, write_datasets


class _Session:   # what the writers use of an Icechunk session: its store
    def __init__(self):
        self.store = MemoryStore()


def _datasets() -> dict[str, xr.Dataset]:
    rng = np.random.default_rng(0)
    summary = xr.Dataset(
        {"ratio": ("layer", np.array([0.5, np.nan, 0.25])), "f32": (("layer", "k"), rng.random((3, 4), np.float32)),
         "count": ("layer", np.array([1, 2, 3], np.int64)), "flag": ("layer", np.array([True, False, True])),
         "label": ("layer", np.array(["a", "bb", "ccc"]))},
        coords={"layer": ["l1", "l2", "l3"], "n_units": ("layer", [3, 4, 5]), "rows": ("layer", ["sample"] * 3),
                "grid": (("layer", "k"), np.arange(12).reshape(3, 4))},   # on f32 only (dims ⊆)
        attrs={"eps": 0.0, "bad": float("nan"), "notes": ["x: y"], "nested": {"a": 1}})
    summary["ratio"].attrs["note"] = "per layer"
    layer = xr.Dataset({"u": ("unit", rng.random(7)), "top": ("rank", np.array([3, 1], np.int64)),
                        "eig": ("component", np.zeros(0)), "scalar": ((), np.float64(1.5))},
                       coords={"unit": np.arange(7), "rank": np.arange(2)}, attrs={"layer": "l1"})
    lazy = xr.Dataset({"z": ("i", da.from_array(np.arange(6.0), chunks=3))})   # falls back to write_dataset
    # a coordinate on no variable's dimensions (a global "coordinates" attribute): falls back too
    loose = xr.Dataset({"v": ("i", np.arange(3.0))}, coords={"w": ("j", np.arange(2))})
    return {"m/statistics/summary": summary, "m/statistics/layers/l1": layer, "m/statistics/lazy": lazy,
            "m/statistics/loose": loose}


def _contents(store: MemoryStore) -> dict:
    return {k: json.loads(v.to_bytes()) if k.endswith("zarr.json") else v.to_bytes()
            for k, v in store._store_dict.items()}


def test_batched_write_is_byte_identical_to_write_dataset():
    one, batch = _Session(), _Session()
    for group, ds in _datasets().items():
        write_dataset(one, ds, group)
    write_datasets(batch, _datasets())
    a, b = _contents(one.store), _contents(batch.store)
    assert sorted(a) == sorted(b)
    assert len(a) > 20
    for k in a:
        assert a[k] == b[k], k
    back = xr.open_zarr(batch.store, group="m/statistics/summary", consolidated=False).load()
    ref = _datasets()["m/statistics/summary"]
    np.testing.assert_array_equal(back["f32"].values, ref["f32"].values)
    np.testing.assert_array_equal(back["ratio"].values, ref["ratio"].values)
    assert list(back["label"].values) == ["a", "bb", "ccc"] and back.attrs["bad"] is None


def test_batched_write_replaces_groups():
    s = _Session()
    write_datasets(s, {"g": xr.Dataset({"old": ("i", np.arange(3.0))})})
    write_datasets(s, {"g": xr.Dataset({"new": ("i", np.arange(2.0))})})
    back = xr.open_zarr(s.store, group="g", consolidated=False)
    assert list(back.data_vars) == ["new"]


def test_nested_groups_are_written_in_order():
    s = _Session()
    write_datasets(s, {"a": xr.Dataset({"x": ("i", np.arange(2.0))}), "a/b": xr.Dataset({"y": ("i", np.arange(3.0))})})
    assert list(xr.open_zarr(s.store, group="a", consolidated=False).data_vars) == ["x"]
    np.testing.assert_array_equal(xr.open_zarr(s.store, group="a/b", consolidated=False)["y"].values, np.arange(3.0))
