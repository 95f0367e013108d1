"""Permutation p-values of disparities, BH / Holm corrections."""

import numpy as np
import pytest

from zooaudit.analysis.bias import (
    adjust_run,
    bh,
    group_metrics,
    holm,
    permutation_p_value,
)
from zooaudit.errors import ZooauditError

# Benjamini & Hochberg (1995), section 4: 15 p-values; at q = 0.05 BH rejects the
# four smallest, Holm (FWER 0.05) the three smallest.
BH95 = np.array([0.0001, 0.0004, 0.0019, 0.0095, 0.0201, 0.0278, 0.0298, 0.0344, 0.0459, 0.3240, 0.4262,
                 0.5719, 0.6528, 0.7590, 1.0000])


def test_bh_and_holm_on_the_published_example():
    assert bh(BH95).reject.sum() == 4 and bh(BH95).reject[:4].all()
    assert holm(BH95).reject.sum() == 3 and holm(BH95).reject[:3].all()


def test_bh_and_holm_adjusted_values_by_hand():
    p = np.array([0.01, 0.04, 0.03, 0.005])
    # sorted .005 .01 .03 .04; BH: ×4/1 ×4/2 ×4/3 ×4/4 = .02 .02 .04 .04, then running min from the top
    np.testing.assert_allclose(bh(p).p_adjusted, [0.02, 0.04, 0.04, 0.02])
    # Holm: ×4 ×3 ×2 ×1 = .02 .03 .06 .04, then running max from the bottom → .02 .03 .06 .06
    np.testing.assert_allclose(holm(p).p_adjusted, [0.03, 0.06, 0.06, 0.02])
    assert holm(p, alpha=0.05).reject.tolist() == [True, False, False, True]


def _bh_naive(p):
    """Textbook definition, O(m²): p_adj_i = min over j with p_j ≥ p_i of m p_j / rank_j."""
    m, ranks = len(p), np.argsort(np.argsort(p, kind="stable"), kind="stable") + 1
    return np.array([min(min(1.0, m * p[j] / ranks[j]) for j in range(m) if p[j] >= p[i]) for i in range(m)])


def _holm_naive(p):
    m, order = len(p), np.argsort(p, kind="stable")
    out = np.empty(m)
    for r, i in enumerate(order):
        out[i] = min(1.0, max((m - k) * p[order[k]] for k in range(r + 1)))
    return out


def test_bh_and_holm_match_naive_definitions():
    rng = np.random.default_rng(0)
    for _ in range(20):
        p = rng.random(12) ** 3
        np.testing.assert_allclose(bh(p).p_adjusted, _bh_naive(p), atol=1e-12)
        np.testing.assert_allclose(holm(p).p_adjusted, _holm_naive(p), atol=1e-12)
        assert np.all(holm(p).p_adjusted >= bh(p).p_adjusted - 1e-12)  # FWER control is the stricter


def test_nan_p_values_are_left_out_and_shape_is_kept():
    p = np.array([[0.01, np.nan], [0.04, 0.03]])
    adj = bh(p)
    assert adj.p_adjusted.shape == (2, 2) and np.isnan(adj.p_adjusted[0, 1]) and not adj.reject[0, 1]
    np.testing.assert_allclose(adj.p_adjusted[~np.isnan(p)], bh([0.01, 0.04, 0.03]).p_adjusted)
    with pytest.raises(ZooauditError, match="1.5"):
        bh([0.2, 1.5])


def test_permutation_p_value_counts_the_observed_draw():
    assert permutation_p_value(3.0, [1, 2, 3, 4]) == pytest.approx(3 / 5)  # ties count
    assert permutation_p_value(10.0, np.zeros(999)) == pytest.approx(1 / 1000)  # never 0


def _dataset(rng, n, acc=(0.8, 0.8)):
    g = rng.integers(0, 2, n)
    y = rng.integers(0, 2, n)
    wrong = rng.random(n) > np.where(g == 0, acc[0], acc[1])
    return y, np.where(wrong, 1 - y, y), g


def test_planted_disparity_has_a_small_p_value():
    rng = np.random.default_rng(1)
    y, p, g = _dataset(rng, 400, acc=(0.9, 0.6))
    rep = group_metrics(y, p, g, n_boot=0, n_permutations=999)
    assert rep.disparities["p_value"].sel(metric="accuracy").item() == pytest.approx(1 / 1000)
    assert rep.disparities["reject"].sel(metric="accuracy").item()
    # the bootstrap CI of the gap excludes 0
    rep = group_metrics(y, p, g, n_boot=500, n_permutations=0)
    assert rep.disparities["difference_ci"].sel(metric="accuracy").values[0] > 0.15


def test_null_p_values_are_roughly_uniform():
    rng = np.random.default_rng(2)
    ps = []
    for _ in range(200):
        y, p, g = _dataset(rng, 120)
        ps.append(group_metrics(y, p, g, n_boot=0, n_permutations=199, min_group_size=5)
                  .disparities["p_value"].values)
    ps = np.array(ps)  # (200, metric)
    assert np.all((ps > 0) & (ps <= 1))
    frac = (ps <= 0.05).mean(0)
    assert np.all((0.01 <= frac) & (frac <= 0.10)), frac  # nominal 0.05; Binomial(200, .05) sd ≈ .015
    # Rates of 120 samples are discrete and ties count as extreme, so the null p-values are
    # super-uniform (P[p ≤ a] ≤ a), not exactly uniform: check that at several levels.
    for a in (0.1, 0.25, 0.5):
        assert np.all((ps <= a).mean(0) <= a + 0.05), (a, (ps <= a).mean(0))


def test_equal_opportunity_null_is_calibrated_when_base_rates_differ():
    # Same TPR/FPR in both groups, different base rates: permuting within y keeps the test valid.
    rng = np.random.default_rng(3)
    ps = []
    for _ in range(150):
        g = rng.integers(0, 2, 150)
        y = (rng.random(150) < np.where(g == 0, 0.25, 0.75)).astype(int)
        p = np.where(y == 1, rng.random(150) < 0.8, rng.random(150) < 0.2).astype(int)
        d = group_metrics(y, p, g, n_boot=0, n_permutations=199, min_group_size=5).disparities
        ps.append(d["p_value"].sel(metric=["equal_opportunity", "equalized_odds"]).values)
    frac = (np.array(ps) <= 0.05).mean(0)
    assert np.all(frac <= 0.10), frac


def test_adjust_run_applies_bh_across_attributes():
    rng = np.random.default_rng(4)
    y, p, g = _dataset(rng, 300, acc=(0.9, 0.7))
    reports = {"colour": group_metrics(y, p, g, n_boot=0, n_permutations=199),
               "size": group_metrics(y, p, rng.integers(0, 2, 300), n_boot=0, n_permutations=199)}
    ds = adjust_run(reports)
    assert ds["p_adjusted"].dims == ("attribute", "metric")
    raw = np.concatenate([r.disparities["p_value"].values for r in reports.values()])
    np.testing.assert_allclose(ds["p_adjusted"].values.ravel(), bh(raw).p_adjusted)
    assert ds["reject"].sel(attribute="colour", metric="accuracy").item()
