"""Multi-hot label patterns packed and counted block by block (``amplification._Side``) equal the
whole-matrix ``np.unique(axis=0)`` they replaced: same table, same per-sample rows, same amplification
results, same error messages."""

import numpy as np
import pytest
import xarray as xr

import zooaudit.analysis.amplification as amp
from zooaudit.analysis.amplification import _Side, bias_amplification, patterns
from zooaudit.errors import ZooauditError


def _sets(n, C, seed, dtype=np.uint8):
    rng = np.random.default_rng(seed)
    a = rng.random((n, C)) < rng.uniform(0.05, 0.6, C)
    return a.astype(dtype)


def _whole(a):
    table, index = np.unique(np.asarray(a).astype(np.int8), axis=0, return_inverse=True)
    return table.astype(np.float64), index.ravel()


@pytest.mark.parametrize("C, dtype", [(5, np.uint8), (12, bool), (30, np.float64), (62, np.int64),
                                      (70, np.uint8)])
def test_packed_patterns_equal_the_whole_matrix_unique(monkeypatch, C, dtype):
    monkeypatch.setattr(amp, "_CHECK_ELEMENTS", 1000)     # many row blocks (C = 30, 62: merged uniques)
    a = _sets(3000, C, C, dtype)
    a[::7] = a[0]                                           # repeated rows
    table, index = patterns(a, "task", C, multi_label=True)
    want_table, want_index = _whole(a)
    np.testing.assert_array_equal(table, want_table)
    np.testing.assert_array_equal(index, want_index)
    side = _Side(a, "task", C)
    for start, stop in ((0, 17), (5, 2999), (1234, None), (2990, 5000)):
        np.testing.assert_array_equal(side.index(start, stop), want_index[start:stop])
    empty, idx = patterns(np.zeros((0, C), dtype), "task", C)
    assert empty.shape == (0, C) and idx.size == 0


def test_multi_label_amplification_unchanged(monkeypatch):
    rng = np.random.default_rng(4)
    g_tr, g = rng.integers(0, 2, 2500), rng.integers(0, 2, 2000)
    tr, te = _sets(2500, 6, 1), _sets(2000, 6, 2)
    tr[:, 0] |= g_tr.astype(np.uint8)                      # label 0 goes with group 1
    te[:, 0] |= g.astype(np.uint8)
    pred = np.where(rng.random((2000, 6)) < 0.85, te, 1 - te).astype(np.uint8)
    kw = dict(max_order=2, n_boot=30, n_permutations=40, multi_label=True)
    monkeypatch.setattr(amp, "_CHECK_ELEMENTS", 600)
    got = bias_amplification(g_tr, tr, g, te, pred, **kw)
    monkeypatch.setattr(amp, "_PACKED_LABELS", 0)          # every matrix through the whole-matrix sort
    want = bias_amplification(g_tr, tr, g, te, pred, **kw)
    xr.testing.assert_identical(got, want)
    assert np.isfinite(got["value"].values).sum() >= 4


def test_bad_entry_in_a_later_block_is_named(monkeypatch):
    monkeypatch.setattr(amp, "_CHECK_ELEMENTS", 10)
    a = _sets(50, 4, 0, np.float64)
    a[33, 2] = 0.5
    with pytest.raises(ZooauditError, match=r"task must be multi-hot \(every entry 0 or 1\); found np.float64\(0.5\)"):
        _Side(a, "task", 4)
    with pytest.raises(ZooauditError, match="has 4 columns but 5 labels are known"):
        _Side(_sets(50, 4, 0), "task", 5)
    with pytest.raises(ZooauditError, match=r"got shape \(2, 2, 2\)"):
        _Side(np.zeros((2, 2, 2)), "task", 2)
