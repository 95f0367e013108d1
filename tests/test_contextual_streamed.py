"""Contextual bias computed block by block equals the whole-matrix code it replaced (``bias_reference``,
30d50b3) exactly — class codes, multi-hot categories and contexts, scores or hard predictions, several
blocks — and keeps its error messages."""

import numpy as np
import pytest
import xarray as xr

import zooaudit.analysis.amplification as amp
import zooaudit.analysis.contextual as ctx_mod
from bias_reference import contextual_bias as reference
from zooaudit.analysis.contextual import contextual_bias
from zooaudit.errors import ZooauditError


def _single(n, C, Z, seed):
    """Class codes: the context follows the category in 70% of the samples; predictions right 80%."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, n)
    z = np.where(rng.random(n) < 0.7, y % Z, rng.integers(0, Z, n))
    pred = np.where(rng.random(n) < 0.8, y, rng.integers(0, C, n))
    logits = rng.normal(size=(n, C)) + 2.0 * np.eye(C)[pred] + 0.5 * (z[:, None] == np.arange(C) % Z)
    scores = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, z, pred, scores


def _multi(n, C, seed):
    """Multi-hot label sets with co-occurring columns (column j+1 often with j); sigmoid scores."""
    rng = np.random.default_rng(seed)
    base = rng.random((n, C)) < 0.3
    base[:, 1:] |= base[:, :-1] & (rng.random((n, C - 1)) < 0.5)
    labels = base.astype(np.uint8)
    scores = 1 / (1 + np.exp(-(rng.normal(size=(n, C)) + 2.5 * (labels - 0.5))))
    return labels, (scores >= 0.5).astype(np.uint8), scores


def _same(a: xr.Dataset, b: xr.Dataset):
    xr.testing.assert_identical(a, b)
    for name in a.data_vars:
        assert a[name].dtype == b[name].dtype, name


def _both(*args, **kw):
    return contextual_bias(*args, **kw), reference(*args, **kw)


@pytest.mark.parametrize("block", [None, 97])
def test_class_codes_scores_and_hard_predictions(monkeypatch, block):
    if block:   # several blocks of samples (and an odd block size), bootstrap draws in batches
        monkeypatch.setattr(ctx_mod, "_BLOCK", block)
        monkeypatch.setattr(amp, "_BLOCK", block)
        monkeypatch.setattr(ctx_mod, "_BOOT_ELEMENTS", 1001)
    y, z, pred, scores = _single(1500, 5, 3, 0)
    ty, tz, _, _ = _single(2000, 5, 3, 1)
    _same(*_both(ty, tz, y, z, pred, scores, category_names=list("abcde"), context_names=["r", "g", "b"],
                 min_group_size=10, n_boot=40, random_state=3))
    _same(*_both(ty, tz, y, z, pred, None, n_boot=25, top_k=4, min_cooccurrence=0.05))
    _same(*_both(ty, tz, y, z, pred, scores.astype(np.float32), n_boot=0, min_group_size=200))
    # one-hot matrices give the same as their class codes
    one_hot = np.eye(5)[y]
    _same(*_both(np.eye(5)[ty], np.eye(3)[tz], one_hot, np.eye(3)[z], np.eye(5)[pred], scores, n_boot=15))


@pytest.mark.parametrize("block", [None, 97])
def test_own_category_scores_equal_the_score_matrix(monkeypatch, block):
    """With class codes, the ``(n,)`` score of each sample's own category is all the measure reads: the
    result is identical to passing the ``(n, C)`` matrix; and the stage's blockwise own-class softmax
    equals the whole matrix's column exactly (a stored float32 DataArray, several blocks)."""
    from zooaudit.stages import amplification as amp_stage

    if block:
        monkeypatch.setattr(ctx_mod, "_BLOCK", block)
        monkeypatch.setattr(amp, "_BLOCK", block)
        monkeypatch.setattr(amp_stage, "_SCORE_ROWS", block)
    y, z, pred, scores = _single(1500, 5, 3, 0)
    ty, tz, _, _ = _single(2000, 5, 3, 1)
    own = scores[np.arange(len(y)), y]
    kw = dict(min_group_size=10, n_boot=40, random_state=3, n_categories=5, n_contexts=3)
    _same(contextual_bias(ty, tz, y, z, pred, own, **kw), contextual_bias(ty, tz, y, z, pred, scores, **kw))
    logits = xr.DataArray(np.log(scores).astype(np.float32) + 1.5, dims=("sample", "class"))
    want = amp_stage._softmax(logits.values.copy())[np.arange(len(y)), y]
    got = amp_stage.own_class_scores(logits, y)
    assert got.dtype == np.float32 and np.array_equal(got, want)
    with pytest.raises(ZooauditError, match=r"or \(1500,\) \(each sample's own"):
        contextual_bias(ty, tz, y, z, pred, own[:-1], **kw)
    with pytest.raises(ZooauditError, match=r"= \(1500, 5\); got \(1500,\)"):   # one-hot categories: no (n,) form
        contextual_bias(np.eye(5)[ty], tz, np.eye(5)[y], z, pred, own, **kw)


@pytest.mark.parametrize("block", [None, 64])
def test_multi_hot_categories_and_contexts(monkeypatch, block):
    if block:
        monkeypatch.setattr(ctx_mod, "_BLOCK", block)
        monkeypatch.setattr(amp, "_BLOCK", block)
        monkeypatch.setattr(amp, "_CHECK_ELEMENTS", 50)
        monkeypatch.setattr(ctx_mod, "_BOOT_ELEMENTS", 333)
    labels, pred, scores = _multi(900, 6, 2)
    tr, _, _ = _multi(1200, 6, 3)
    _same(*_both(tr, tr, labels, labels, pred, scores, contexts_are_categories=True, n_boot=30, random_state=1))
    _same(*_both(tr, tr, labels, labels, pred, None, contexts_are_categories=True, n_boot=11, min_group_size=3))
    # single-coded categories against a multi-hot (set-valued) context
    y, _, p1, s1 = _single(900, 4, 2, 5)
    ty, _, _, _ = _single(1200, 4, 2, 6)
    _same(*_both(ty, tr[:, :3], y, labels[:, :3], p1, s1, n_boot=20, min_cooccurrence=0.2))
    # odd subset sizes and few samples: bootstraps of size 1, empty subsets, NaN bias
    _same(*_both(tr[:40], tr[:40], labels[:41][:-1], labels[:40], pred[:40], scores[:40],
                 contexts_are_categories=True, n_boot=7, min_group_size=1))


def test_error_messages_unchanged():
    y, z, pred, scores = _single(50, 3, 2, 0)
    cases = [dict(args=(y, z, y, z[:-1], pred)),
             dict(args=(y, z, y, z, pred, scores[:, :2])),
             dict(args=(y, z, y, z, pred[:-1])),
             dict(args=(y, z[:-1], y, z, pred)),
             dict(args=(y, z, np.eye(3)[y] * 2, z, pred)),
             dict(args=(y, z, y, z, pred), kw={"min_cooccurrence": 1.0}),
             dict(args=(np.eye(3)[y], np.eye(2)[z], np.eye(3)[y], np.eye(2)[z], np.eye(3)[pred]),
                  kw={"contexts_are_categories": True})]
    for case in cases:
        with pytest.raises(ZooauditError) as want:
            reference(*case["args"], **case.get("kw", {}))
        with pytest.raises(ZooauditError) as got:
            contextual_bias(*case["args"], **case.get("kw", {}))
        if case["args"][5:] and np.asarray(case["args"][5]).ndim == 2:
            # the one message that changed on purpose: with class codes it also names the (n,) own-category form
            assert str(got.value) == str(want.value).replace(
                "= (50, 3); got", "= (50, 3), or (50,) (each sample's own category's score); got")
        else:
            assert str(got.value) == str(want.value)
