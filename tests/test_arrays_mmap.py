"""A float32 ``.npy`` dataset is memory-mapped, not read whole into RAM, and hashes as before."""

from __future__ import annotations

import hashlib

import numpy as np

from zooaudit.data import load_dataset
from zooaudit.data.arrays import memory_mapped
from zooaudit.keys import canonical_json


def _hash_by_copies(ds) -> str:
    """The content hash as it was defined: spec, then ``tobytes()`` of every array."""
    h = hashlib.sha256(canonical_json(ds.spec).encode())
    for arr in (ds.inputs, ds.labels, ds.sample_ids, *[ds.groups[k] for k in sorted(ds.groups)]):
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def test_float32_npy_is_memory_mapped_and_hashes_like_a_loaded_copy(tmp_path):
    x = np.random.default_rng(0).standard_normal((50, 1, 4, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", np.arange(50) % 3)
    ds = load_dataset({"name": "arrays", "path": str(tmp_path / "x.npy"), "options": {"labels": str(tmp_path / "y.npy")}})
    assert memory_mapped(ds.inputs)
    assert ds.inputs.flags.writeable and ds.inputs.dtype == np.float32 and ds.input_shape == (1, 4, 4)
    np.testing.assert_array_equal(ds.inputs, x)
    assert ds.content_hash == _hash_by_copies(ds)


def test_float64_npy_is_converted_in_memory(tmp_path):
    x = np.random.default_rng(1).standard_normal((20, 3)).astype(np.float64)
    np.save(tmp_path / "x.npy", x)
    ds = load_dataset({"name": "arrays", "path": str(tmp_path / "x.npy")})
    assert not memory_mapped(ds.inputs) and ds.inputs.dtype == np.float32
    np.testing.assert_array_equal(ds.inputs, x.astype(np.float32))
    assert ds.content_hash == _hash_by_copies(ds)
