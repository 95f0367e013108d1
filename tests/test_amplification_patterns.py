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


@pytest.mark.parametrize("T", [6, 70])     # 70: one-hot rows wider than the packed int64 codes
def test_class_codes_give_the_one_hot_results(T):
    """Single-label tasks and attributes as ``(n,)`` codes (what the stage passes, issue 17) give exactly
    the results of their ``(n, C)`` one-hot matrices, bootstrap CIs included: the codes' distinct rows are
    listed in the one-hot rows' lexicographic order, so the multinomial draws run over the same cells. The
    last task and group never occur, so their table rows come from ``n_tasks`` / ``n_groups``."""
    from zooaudit.analysis.contextual import contextual_bias

    rng = np.random.default_rng(11)
    G, n_tr, n = 4, 1800, 1500
    g_tr, g = rng.integers(0, G - 1, n_tr), rng.integers(0, G - 1, n)
    t_tr = np.where(rng.random(n_tr) < 0.5, g_tr, rng.integers(0, min(T, 6) - 1, n_tr))   # task follows group
    t = np.where(rng.random(n) < 0.5, g, rng.integers(0, min(T, 6) - 1, n))
    pred = np.where(rng.random(n) < 0.7, t, rng.integers(0, min(T, 6) - 1, n))
    g_pred = np.where(rng.random(n) < 0.8, g, rng.integers(0, G - 1, n))
    hot_g, hot_t = np.eye(G, dtype=np.uint8), np.eye(T, dtype=np.uint8)

    side_codes, side_hot = _Side(t, "task", T), _Side(hot_t[t], "task", T)
    np.testing.assert_array_equal(side_codes.table, side_hot.table)
    np.testing.assert_array_equal(side_codes.index(), side_hot.index())

    kw = dict(max_order=2, n_boot=40, n_permutations=40, random_state=3)
    got = bias_amplification(g_tr, t_tr, g, t, pred, g_pred, n_groups=G, n_tasks=T, **kw)
    want = bias_amplification(hot_g[g_tr], hot_t[t_tr], hot_g[g], hot_t[t], hot_t[pred], hot_g[g_pred], **kw)
    xr.testing.assert_identical(got, want)
    assert np.isfinite(got["value_ci"].values).all() and got.sizes["task"] == T and got.sizes["attribute"] == G

    logits = rng.normal(size=(n, T)).astype(np.float32)
    logits[np.arange(n), pred] += 2.0
    scores = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    ckw = dict(n_boot=40, random_state=5, min_group_size=5)
    got = contextual_bias(t_tr, g_tr, t, g, pred, scores, n_categories=T, n_contexts=G, **ckw)
    want = contextual_bias(hot_t[t_tr], hot_g[g_tr], hot_t[t], hot_g[g], hot_t[pred], scores, **ckw)
    xr.testing.assert_identical(got, want)
    assert got.sizes["pair"] > 0 and np.isfinite(got["bias_ci"].values).any()
