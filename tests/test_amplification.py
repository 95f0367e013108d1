"""Bias amplification (Zhao 2017, Wang & Russakovsky 2021, Zhao/Andrews/Xiang 2023) and contextual bias
(Singh et al. 2020): hand-computed cases, an independent loop implementation, and properties."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from zooaudit.analysis.amplification import MEASURES, bias_amplification, multi_hot
from zooaudit.analysis.contextual import contextual_bias
from zooaudit.errors import ZooauditError


def expand(cells: dict) -> tuple[np.ndarray, ...]:
    """{(attribute, task, predicted task): count} → per-sample arrays."""
    cols = [[], [], []]
    for key, count in cells.items():
        for col, v in zip(cols, key):
            col.extend([v] * count)
    return tuple(np.array(c) for c in cols)


# Training counts c(gender, task): (m, cook)=2, (w, cook)=6, (m, drive)=6, (w, drive)=2 (n = 16).
TRAIN = {(0, 0, 0): 2, (1, 0, 0): 6, (0, 1, 1): 6, (1, 1, 1): 2}
# Test: the same proportions (n = 8); the model gets the two counter-stereotypical samples wrong.
TEST = {(0, 0, 1): 1, (1, 0, 0): 3, (0, 1, 1): 3, (1, 1, 0): 1}


def test_hand_computed_case():
    tr_a, tr_t, _ = expand(TRAIN)
    a, t, p = expand(TEST)
    ds = bias_amplification(tr_a, tr_t, a, t, p, n_boot=0, n_permutations=0)
    # MALS: b*(w,cook) = 6/8 = .75 and b*(m,drive) = .75 exceed 1/|G|; predicted b̃ = 4/4 = 1 for both.
    # BiasAmp = 1/|T| · ((1 − .75) + (1 − .75)) = 0.5 / 2 = 0.25
    assert float(ds["value"].sel(measure="mals")) == pytest.approx(0.25)
    # A→T: y = 1 for (m,drive), (w,cook) (P_train(a,t) = 6/16 > 1/4); Δ(m,cook) = P(T̂=cook|m) − P(cook|m)
    # = 0/4 − 1/4, Δ(m,drive) = 4/4 − 3/4, Δ(w,cook) = 4/4 − 3/4, Δ(w,drive) = 0/4 − 1/4 → all terms +0.25
    assert float(ds["value"].sel(measure="directional_at")) == pytest.approx(0.25)
    np.testing.assert_allclose(ds["pairs_directional_at"].values, 0.25)
    # Without the model's attribute predictions T→A and M→G are undefined.
    assert np.isnan(ds["value"].sel(measure="directional_ta"))
    assert np.isnan(ds["value"].sel(measure="multi_mg"))
    # Multi-MALS (sets {cook}, {drive}; {cook, drive} never occurs): Δ = (0, .25; .25, 0) → X = .5/|M| = .25,
    # variance over the four entries: mean .125 → ((.125)² · 4) / 4 = .015625
    assert float(ds["value"].sel(measure="multi_mals")) == pytest.approx(0.25)
    assert float(ds["variance"].sel(measure="multi_mals")) == pytest.approx(0.015625)
    assert list(ds["label_set"].values) == ["0", "1"]
    # G→M: Δ(m,cook) = 0/4 − 2/8, Δ(m,drive) = 4/4 − 6/8, Δ(w,cook) = 1 − .75, Δ(w,drive) = 0 − .25
    # → mean |Δ| = .25, variance (mean 0) = .0625
    assert float(ds["value"].sel(measure="multi_gm")) == pytest.approx(0.25)
    assert float(ds["variance"].sel(measure="multi_gm")) == pytest.approx(0.0625)


def test_hand_computed_attribute_direction():
    tr_a, tr_t, _ = expand(TRAIN)
    a, t, p = expand(TEST)
    a_hat = 1 - t  # the model predicts "w" for every cook and "m" for every driver
    ds = bias_amplification(tr_a, tr_t, a, t, p, attr_pred=a_hat, n_boot=0, n_permutations=0)
    # T→A: Δ(m,cook) = P(Â=m|cook) − P(m|cook) = 0 − 1/4 (y = 0 → +.25), Δ(w,cook) = 1 − 3/4 (y = 1),
    # Δ(m,drive) = 1 − 3/4 (y = 1), Δ(w,drive) = 0 − 1/4 (y = 0) → 0.25
    assert float(ds["value"].sel(measure="directional_ta")) == pytest.approx(0.25)
    # M→G: Δ(m,{cook}) = 0 − 2/8, Δ(w,{cook}) = 1 − 6/8, Δ(m,{drive}) = 1 − 6/8, Δ(w,{drive}) = 0 − 2/8
    assert float(ds["value"].sel(measure="multi_mg")) == pytest.approx(0.25)
    assert float(ds["variance"].sel(measure="multi_mg")) == pytest.approx(0.0625)


def _loop_reference(tr_a, tr_t, a, t, p, G, T):
    """Independent per-pair loops over the paper formulas (one-hot attribute and task)."""
    def P(mask):
        return mask.mean()

    mals = 0.0
    for g, k in itertools.product(range(G), range(T)):
        b_star = np.sum((tr_a == g) & (tr_t == k)) / np.sum(tr_t == k)
        if b_star > 1 / G and np.sum(p == k) > 0:
            mals += np.sum((a == g) & (p == k)) / np.sum(p == k) - b_star
    mals /= T
    terms = []
    for g, k in itertools.product(range(G), range(T)):
        y = P((tr_a == g) & (tr_t == k)) > P(tr_a == g) * P(tr_t == k)
        if np.sum(a == g) == 0:
            continue
        delta = np.mean(p[a == g] == k) - np.mean(t[a == g] == k)
        terms.append(delta if y else -delta)
    gm = [abs(np.mean(p[a == g] == k) - np.mean(tr_t[tr_a == g] == k)) for g in range(G) for k in range(T)
          if np.sum((tr_a == g) & (tr_t == k)) + np.sum((tr_a != g) & (tr_t == k)) > 0]
    return mals, float(np.mean(terms)), float(np.mean(gm))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_loop_reference(seed):
    rng = np.random.default_rng(seed)
    G, T, m, n = 3, 4, 400, 300
    tr_a = rng.integers(0, G, m)
    tr_t = np.where(rng.random(m) < 0.6, tr_a % T, rng.integers(0, T, m))
    a = rng.integers(0, G, n)
    t = np.where(rng.random(n) < 0.6, a % T, rng.integers(0, T, n))
    p = np.where(rng.random(n) < 0.7, t, rng.integers(0, T, n))
    ds = bias_amplification(tr_a, tr_t, a, t, p, max_order=1, n_boot=0, n_permutations=0)
    mals, at, gm = _loop_reference(tr_a, tr_t, a, t, p, G, T)
    assert float(ds["value"].sel(measure="mals")) == pytest.approx(mals, abs=1e-12)
    assert float(ds["value"].sel(measure="directional_at")) == pytest.approx(at, abs=1e-12)
    assert float(ds["value"].sel(measure="multi_gm")) == pytest.approx(gm, abs=1e-12)


def test_predictions_equal_training_labels_give_zero():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 2, 500)
    t = np.where(rng.random(500) < 0.8, a, 1 - a) + 2 * rng.integers(0, 2, 500)  # 4 tasks
    ds = bias_amplification(a, t, a, t, t, attr_pred=a, n_boot=20, n_permutations=0)
    np.testing.assert_allclose(ds["value"].values, 0.0, atol=1e-12)
    np.testing.assert_allclose(ds["value_ci"].values, 0.0, atol=0.2)  # test side resampled, train fixed


def test_multi_label_sets_and_amplification():
    # Tasks {0: keyboard, 1: computer}; the pair {keyboard, computer} is the group-1 signal.
    rng = np.random.default_rng(4)
    n = 600
    g = rng.integers(0, 2, n)
    both = (rng.random(n) < np.where(g == 1, 0.7, 0.3))
    task = np.stack([both | (rng.random(n) < 0.2), both | (rng.random(n) < 0.2)], 1).astype(int)
    pred = task.copy()
    # the model adds the pair to group 1 and removes it from group 0: amplification of the set
    pred[(g == 1) & (rng.random(n) < 0.5)] = 1
    pred[(g == 0) & (task.sum(1) == 2) & (rng.random(n) < 0.5), 0] = 0
    ds = bias_amplification(g, task, g, task, pred, max_order=2, n_boot=50, n_permutations=199, multi_label=True)
    assert "0+1" in ds["label_set"].values
    assert float(ds["pairs_multi_gm"].sel(attribute="1", label_set="0+1")) > 0.1
    assert float(ds["value"].sel(measure="directional_at")) > 0
    assert float(ds["p_value"].sel(measure="directional_at")) < 0.05
    lo, hi = ds["value_ci"].sel(measure="directional_at").values
    assert lo <= float(ds["value"].sel(measure="directional_at")) <= hi


def test_permutation_p_values_uniform_under_null():
    # Predictions depend only on the true task (correct w.p. .8): no amplification.
    ps = []
    for seed in range(60):
        rng = np.random.default_rng(100 + seed)
        a = rng.integers(0, 2, 120)
        t = np.where(rng.random(120) < 0.75, a, 1 - a)
        p = np.where(rng.random(120) < 0.8, t, 1 - t)
        ds = bias_amplification(a, t, a, t, p, measures=["directional_at"], n_boot=0, n_permutations=99,
                                random_state=seed)
        ps.append(float(ds["p_value"].sel(measure="directional_at")))
    ps = np.asarray(ps)
    assert 0.02 <= np.mean(ps <= 0.2) <= 0.45        # ≈ 0.2 expected
    assert 0.3 <= np.mean(ps) <= 0.7                  # ≈ 0.5 expected


def test_amplifying_model_is_detected_and_grows_with_strength():
    values = []
    for shortcut in (0.0, 0.3, 0.6):
        rng = np.random.default_rng(7)
        a = rng.integers(0, 2, 800)
        t = np.where(rng.random(800) < 0.7, a, 1 - a)
        # with probability `shortcut` the model answers the attribute instead of the task
        p = np.where(rng.random(800) < shortcut, a, t)
        ds = bias_amplification(a, t, a, t, p, measures=["directional_at", "mals"], n_boot=0, n_permutations=199)
        values.append(float(ds["value"].sel(measure="directional_at")))
        if shortcut >= 0.3:
            assert float(ds["p_adjusted"].sel(measure="directional_at")) < 0.05
    assert values[0] == pytest.approx(0.0, abs=1e-12) and values[0] < values[1] < values[2]


def test_bad_input():
    a = np.array([0, 1, 0, 1])
    t = np.array([0, 0, 1, 1])
    with pytest.raises(ZooauditError, match="single attribute value"):
        bias_amplification(np.zeros(4, int), t, a, t, t)
    with pytest.raises(ZooauditError, match="multi-hot"):
        bias_amplification(a, np.array([[0, 2]] * 4), a, np.array([[0, 1]] * 4), np.array([[0, 1]] * 4))
    with pytest.raises(ZooauditError, match="multi-hot"):
        bias_amplification(a, t, a, t, t, multi_label=True)
    with pytest.raises(ZooauditError, match="rows"):
        bias_amplification(a, t, a[:3], t, t)
    with pytest.raises(ZooauditError, match="Unknown amplification measure"):
        bias_amplification(a, t, a, t, t, measures=["nope"])
    assert multi_hot(np.array([1, 0]), "x", 3).tolist() == [[0, 1, 0], [1, 0, 0]]
    assert set(MEASURES) >= {"mals", "directional_at", "directional_ta", "multi_mals", "multi_gm", "multi_mg"}


def test_empty_input_is_a_clear_result_or_error():
    """``np.array([])`` is float64, which ``np.bincount`` refuses: an empty split gives no patterns
    (the pattern helpers) or a ZooauditError naming the empty fields (the public call) — never
    NumPy's cast or zero-size-reduction error."""
    from zooaudit.analysis.amplification import _distinct, patterns

    for empty in (np.array([]), np.array([], np.int64), np.zeros(0, np.float32)):
        cells, counts = _distinct(empty, 4)
        assert cells.dtype == counts.dtype == np.int64 and cells.size == counts.size == 0
        table, index = patterns(empty, "task", 3)
        assert table.shape == (0, 3) and index.size == 0
    # non-empty codes: as np.unique, dense and sparse
    codes = np.array([3, 1, 3, 0, 3])
    for n_codes in (4, 1 << 30):
        cells, counts = _distinct(codes, n_codes)
        assert cells.tolist() == [0, 1, 3] and counts.tolist() == [1, 1, 3]
    with pytest.raises(ZooauditError, match="integers"):
        _distinct(np.array([1.0, 2.0]), 4)
    a = np.array([0, 1, 0, 1])
    t = np.array([0, 0, 1, 1])
    e = np.array([])
    with pytest.raises(ZooauditError, match=r"train_attr, train_task \(training side\) are empty"):
        bias_amplification(e, e, a, t, t)
    with pytest.raises(ZooauditError, match=r"attr, task, task_pred \(test side\) are empty"):
        bias_amplification(a, t, e, e, e)
    with pytest.raises(ZooauditError, match=r"task_pred \(test side\) is empty"):
        bias_amplification(a, t, a, t, e)


def test_contextual_bias_hand_case():
    # Training: label 0 is red in 8 of 10 samples, label 1 green in 8 of 10 (both colours > 10%: candidates).
    tr_y = np.array([0] * 10 + [1] * 10)
    tr_c = np.array([0] * 8 + [1] * 2 + [0] * 2 + [1] * 8)
    y = np.array([0] * 8 + [1] * 8)
    c = np.array([0] * 4 + [1] * 4 + [0] * 4 + [1] * 4)
    p0 = np.array([.9, .9, .8, .8, .6, .4, .3, .3] + [.5] * 8)
    scores = np.stack([p0, 1 - p0], 1)
    pred = np.array([0, 0, 0, 0, 0, 1, 1, 1] + [1] * 8)
    ds = contextual_bias(tr_y, tr_c, y, c, pred, scores, category_names=["small", "large"],
                         context_names=["red", "green"], min_group_size=2, n_boot=100)
    top = ds.isel(pair=0)
    # bias(small, red) = mean(.9,.9,.8,.8) / mean(.6,.4,.3,.3) = .85 / .4
    assert (str(top["category"].values), str(top["context"].values)) == ("small", "red")
    assert float(top["bias"]) == pytest.approx(0.85 / 0.4)
    assert float(top["acc_cooccur"]) == 1.0 and float(top["acc_exclusive"]) == 0.25
    assert bool(top["most_biased"])
    last = ds.isel(pair=-1)
    assert float(last["bias"]) == pytest.approx(0.4 / 0.85)
    assert int(ds["most_biased"].sum()) == 2                    # one context per category
    lo, hi = top["bias_ci"].values
    assert lo <= 0.85 / 0.4 <= hi
    # min-n: with min_group_size 5 every subset (4 samples) is small — reported, none most-biased
    small = contextual_bias(tr_y, tr_c, y, c, pred, scores, min_group_size=5, n_boot=0)
    assert small["small"].all() and not small["most_biased"].any()


def test_contextual_bias_categories_as_contexts():
    # multi-label: category 0 usually with category 1 in training
    tr = np.array([[1, 1]] * 8 + [[1, 0]] * 2 + [[0, 1]] * 5)
    test = np.array([[1, 1]] * 30 + [[1, 0]] * 30)
    pred = test.copy()
    pred[30:, 0] = np.arange(30) % 2  # half of the exclusive samples missed
    ds = contextual_bias(tr, tr, test, test, pred, contexts_are_categories=True, n_boot=0)
    # (1, 0) is a training candidate too (8 of 13), but category 1 never occurs without 0 in the test
    # split: no exclusive samples, small, ranked last
    assert [tuple(map(str, r)) for r in zip(ds["category"].values, ds["context"].values)] == [("0", "1"), ("1", "0")]
    assert bool(ds["small"][1]) and int(ds["n_exclusive"][1]) == 0 and not bool(ds["most_biased"][1])
    assert float(ds["acc_cooccur"][0]) == 1.0 and float(ds["acc_exclusive"][0]) == 0.5
    assert float(ds["bias"][0]) == pytest.approx(2.0)


def test_random_tables_keep_margins_and_the_permutation_distribution():
    from zooaudit.analysis.contingency import permuted_tables, random_tables

    rng = np.random.default_rng(0)
    N = np.array([[5, 1, 0], [2, 3, 4], [0, 2, 6]])
    T = random_tables(N, 4000, rng)
    assert (T.sum(2) == N.sum(1)).all() and (T.sum(1) == N.sum(0)).all() and (T >= 0).all()
    # a uniform permutation of the column labels: E[N_rc] = row_r · col_c / n (hypergeometric)
    expected = np.outer(N.sum(1), N.sum(0)) / N.sum()
    np.testing.assert_allclose(T.mean(0), expected, atol=0.1)
    # against shuffling the units themselves
    units_r, units_c = np.repeat(np.arange(3), N.sum(1)), np.concatenate([np.repeat(np.arange(3), n) for n in N])
    shuffled = np.stack([np.histogram2d(units_r, rng.permutation(units_c), bins=[3, 3])[0] for _ in range(4000)])
    np.testing.assert_allclose(T.var(0), shuffled.var(0), rtol=0.15, atol=0.05)
    r, c, w = permuted_tables(np.array([0, 0, 1]), np.array([10, 11, 12]), np.array([0, 1, 0]), np.array([3, 2, 4]),
                              5, rng)
    assert w.shape == (5, 5) and (w.sum(1) == 9).all()      # stratum 0: 2 × 2 cells, stratum 1: 1 × 1


def test_table_null_agrees_with_per_sample_shuffles(monkeypatch):
    import zooaudit.analysis.amplification as amp

    rng = np.random.default_rng(3)
    a = rng.integers(0, 3, 300)
    t = np.where(rng.random(300) < 0.6, a, rng.integers(0, 3, 300))
    p = np.where(rng.random(300) < 0.8, t, rng.integers(0, 3, 300))    # attribute-blind errors
    kw = {"measures": ["directional_at", "multi_gm"], "n_boot": 0, "n_permutations": 400, "max_order": 1}
    tables = bias_amplification(a, t, a, t, p, **kw)["p_value"].values
    monkeypatch.setattr(amp, "_TABLE_CELLS", 0)
    rows = bias_amplification(a, t, a, t, p, **kw)["p_value"].values
    assert (0.1 < tables).all() and (tables < 0.9).all()          # the same p-value, estimated twice
    np.testing.assert_allclose(tables, rows, atol=0.08)
