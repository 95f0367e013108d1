"""Prediction-level group metrics: hand counts, fairlearn, conventions, validation."""

import warnings

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import brentq
from scipy.stats import norm

from zooaudit.analysis.bias import BiasAuditWarning, group_metrics, wilson_interval
from zooaudit.errors import ZooauditError

Y = np.array([0, 0, 1, 1, 0, 1, 1, 0, 1, 0])
P = np.array([0, 1, 1, 1, 0, 0, 1, 0, 1, 1])
G = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])


def test_group_metrics_match_hand_count():
    rep = group_metrics(Y, P, G, n_boot=0, group_names=["red", "green"])
    # red: 4 of 5 correct; green: 3 of 5
    assert rep.table["accuracy"].sel(group="red").item() == pytest.approx(0.8)
    assert rep.table["accuracy"].sel(group="green").item() == pytest.approx(0.6)
    assert rep.table["count"].values.tolist() == [5, 5]
    assert rep.overall_accuracy == pytest.approx(0.7)
    # cells (label × group): green & label 0 → samples 7, 9: one correct of two
    assert rep.cells["accuracy"].sel(cell="label=0|green").item() == pytest.approx(0.5)
    assert rep.worst_group_accuracy == pytest.approx(0.5)
    assert rep.worst_group == "label=0|green"
    assert rep.table["small"].all()  # 5 < 20: reported but flagged small
    assert rep.worst_group_small  # every cell small: the worst is taken over all, and says so


def test_binary_rates_match_hand_count():
    rep = group_metrics(Y, P, G, n_boot=0, group_names=["red", "green"], min_group_size=1)
    t = rep.table
    # red: y = 0 0 1 1 0, ŷ = 0 1 1 1 0 → predicted positive 3/5; TP 2/2; FP 1/3
    # green: y = 1 1 0 1 0, ŷ = 0 1 0 1 1 → predicted positive 3/5; TP 2/3; FP 1/2
    assert t["selection_rate"].values == pytest.approx([0.6, 0.6])
    assert t["tpr"].values == pytest.approx([1.0, 2 / 3])
    assert t["fpr"].values == pytest.approx([1 / 3, 0.5])
    assert t["n_pos"].values.tolist() == [2, 3] and t["n_neg"].values.tolist() == [3, 2]
    d = rep.disparities
    assert d["difference"].sel(metric="demographic_parity").item() == pytest.approx(0.0)
    assert d["difference"].sel(metric="equal_opportunity").item() == pytest.approx(1 / 3)
    assert d["ratio"].sel(metric="equal_opportunity").item() == pytest.approx(2 / 3)
    # equalized odds: worst of TPR gap 1/3 and FPR gap 1/6
    assert d["difference"].sel(metric="equalized_odds").item() == pytest.approx(1 / 3)
    assert d["ratio"].sel(metric="equalized_odds").item() == pytest.approx(min(2 / 3, (1 / 3) / 0.5))
    assert d["max_group"].sel(metric="equal_opportunity").item() == "red"


def _random(n=600, seed=0, n_groups=3):
    rng = np.random.default_rng(seed)
    g = rng.integers(0, n_groups, n)
    y = rng.integers(0, 2, n)
    flip = rng.random(n) < 0.1 + 0.1 * g  # accuracy falls with the group code
    return y, np.where(flip, 1 - y, y), g


def test_rates_and_disparities_match_fairlearn():
    from fairlearn.metrics import (
        MetricFrame,
        demographic_parity_difference,
        demographic_parity_ratio,
        equal_opportunity_difference,
        equal_opportunity_ratio,
        equalized_odds_difference,
        equalized_odds_ratio,
        false_positive_rate,
        selection_rate,
        true_positive_rate,
    )
    from sklearn.metrics import accuracy_score

    y, p, g = _random()
    rep = group_metrics(y, p, g, n_boot=0, min_group_size=1, n_permutations=0)
    mf = MetricFrame(metrics={"accuracy": accuracy_score, "selection_rate": selection_rate,
                              "tpr": true_positive_rate, "fpr": false_positive_rate},
                     y_true=y, y_pred=p, sensitive_features=g)
    for m in ("accuracy", "selection_rate", "tpr", "fpr"):
        np.testing.assert_allclose(rep.table[m].values, mf.by_group[m].values, rtol=0, atol=1e-12)
    d = rep.disparities
    for metric, diff, ratio in (("demographic_parity", demographic_parity_difference, demographic_parity_ratio),
                                ("equal_opportunity", equal_opportunity_difference, equal_opportunity_ratio),
                                ("equalized_odds", equalized_odds_difference, equalized_odds_ratio)):
        assert d["difference"].sel(metric=metric).item() == pytest.approx(diff(y, p, sensitive_features=g))
        assert d["ratio"].sel(metric=metric).item() == pytest.approx(ratio(y, p, sensitive_features=g))
    assert d["difference"].sel(metric="accuracy").item() == pytest.approx(mf.difference()["accuracy"])


def test_intersectional_groups_match_crosstab_and_fairlearn():
    from fairlearn.metrics import MetricFrame, selection_rate

    rng = np.random.default_rng(1)
    n = 500
    feats = pd.DataFrame({"colour": rng.choice(["red", "green"], n), "size": rng.choice(["big", "small"], n)})
    y, p = rng.integers(0, 2, n), rng.integers(0, 2, n)
    rep = group_metrics(y, p, feats, n_boot=0, min_group_size=1, n_permutations=0)
    assert rep.table["group"].values.tolist() == ["colour=green&size=big", "colour=green&size=small",
                                                  "colour=red&size=big", "colour=red&size=small"]
    counts = pd.crosstab(feats["colour"], feats["size"])
    assert rep.table["count"].values.tolist() == [counts.loc[c, s] for c in ("green", "red") for s in ("big", "small")]
    mf = MetricFrame(metrics=selection_rate, y_true=y, y_pred=p, sensitive_features=feats)
    np.testing.assert_allclose(rep.table["selection_rate"].values, mf.by_group.values, atol=1e-12)
    # a dict of arrays is the same audit
    rep2 = group_metrics(y, p, {c: feats[c].to_numpy() for c in feats}, n_boot=0, min_group_size=1,
                         n_permutations=0)
    np.testing.assert_array_equal(rep2.table["selection_rate"].values, rep.table["selection_rate"].values)


def test_tpr_is_nan_without_positives_where_fairlearn_says_zero():
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([1, 0, 0, 1, 0, 1])
    g = np.array([0, 0, 0, 1, 1, 1])
    rep = group_metrics(y, p, g, n_boot=0, min_group_size=1)
    assert np.isnan(rep.table["tpr"].values[0]) and np.isnan(rep.table["fpr"].values[1])
    # TPR has one eligible group only: no equal-opportunity gap can be computed
    assert np.isnan(rep.disparities["difference"].sel(metric="equal_opportunity").item())
    assert rep.disparities["n_groups"].sel(metric="equal_opportunity").item() == 1


def test_bootstrap_ci_is_reproducible_and_brackets_estimate():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    p = np.where(rng.random(400) < 0.8, y, 1 - y)
    g = rng.integers(0, 2, 400)
    a = group_metrics(y, p, g, n_boot=100, random_state=7)
    b = group_metrics(y, p, g, n_boot=100, random_state=7)
    np.testing.assert_array_equal(a.table["accuracy_ci"].values, b.table["accuracy_ci"].values)
    np.testing.assert_array_equal(a.disparities["p_value"].values, b.disparities["p_value"].values)
    lo, hi = a.table["accuracy_ci"].values.T
    acc = a.table["accuracy"].values
    assert np.all(lo <= acc) and np.all(acc <= hi) and np.all(hi - lo > 0)
    c = group_metrics(y, p, g, n_boot=100, random_state=8)
    assert not np.array_equal(a.table["accuracy_ci"].values, c.table["accuracy_ci"].values)


def test_stratified_bootstrap_agrees_with_wilson_for_large_groups():
    y, p, g = _random(n=3000, seed=3, n_groups=2)
    rep = group_metrics(y, p, g, n_boot=2000, n_permutations=0)
    for m in ("accuracy", "selection_rate", "tpr", "fpr"):
        np.testing.assert_allclose(rep.table[f"{m}_ci"].values, rep.table[f"{m}_wilson"].values, atol=0.01)


def _wilson_by_inversion(k, n, ci):
    """Independent Wilson bounds: the p where the score statistic equals z (root finding)."""
    z, ph = norm.ppf(1 - (1 - ci) / 2), k / n
    f = lambda q: (ph - q) ** 2 - z**2 * q * (1 - q) / n
    eps = 1e-12  # at k = 0 or k = n, p̂ itself is a (trivial) root: bracket the other one
    lo = 0.0 if k == 0 else brentq(f, 1e-15, ph - eps if k == n else ph)
    hi = 1.0 if k == n else brentq(f, ph + eps if k == 0 else ph, 1 - 1e-15)
    return lo, hi


@pytest.mark.parametrize("k,n", [(0, 5), (1, 1), (3, 7), (19, 20), (50, 100), (7, 7)])
def test_wilson_interval_matches_score_test_inversion(k, n):
    got = wilson_interval(k, n, ci=0.9)
    np.testing.assert_allclose(got, _wilson_by_inversion(k, n, 0.9), atol=1e-9)
    assert got[0] <= k / n <= got[1]
    assert np.isnan(wilson_interval(0, 0)).all()


def test_small_groups_are_reported_but_never_drive_a_disparity():
    rng = np.random.default_rng(2)
    n = 400
    y = rng.integers(0, 2, n)
    p = np.where(rng.random(n) < 0.85, y, 1 - y)
    g = rng.integers(0, 2, n)
    # a tiny third group that is always wrong
    y, p, g = np.r_[y, [0, 1, 0]], np.r_[p, [1, 0, 1]], np.r_[g, [2, 2, 2]]
    rep = group_metrics(y, p, g, n_boot=50, min_group_size=20)
    assert rep.table["small"].values.tolist() == [False, False, True]
    assert rep.table["accuracy"].values[2] == 0.0  # reported
    d = rep.disparities["difference"].sel(metric="accuracy").item()
    acc = rep.table["accuracy"].values
    assert d == pytest.approx(abs(acc[0] - acc[1]))  # the tiny group takes no part
    assert "2" not in rep.worst_group and not rep.worst_group_small
    assert not rep.disparities["reject"].sel(metric="accuracy").item()


def test_single_sample_group_warns_and_has_no_bootstrap_ci():
    y, p, g = _random(n=200, seed=4, n_groups=2)
    y, p, g = np.r_[y, 1], np.r_[p, 1], np.r_[g, 9]
    with pytest.warns(BiasAuditWarning, match="single sample"):
        rep = group_metrics(y, p, g, n_boot=20, min_group_size=1)
    row = rep.table.sel(group="9")
    assert np.isnan(row["accuracy_ci"].values).all()
    assert np.isfinite(row["accuracy_wilson"].values).all()
    assert not rep.table["small"].sel(group="9").item()  # min_group_size=1: not small
    # ... but a single sample (rate 0 or 1) takes part in no disparity, whatever min_group_size
    assert rep.disparities["n_groups"].sel(metric="accuracy").item() == 2


def test_one_class_predictions_give_zero_gaps_and_unit_ratios():
    y, _, g = _random(n=300, seed=5)
    p = np.zeros_like(y)
    with pytest.warns(BiasAuditWarning, match="single class"):
        rep = group_metrics(y, p, g, n_boot=0, n_permutations=99)
    d = rep.disparities
    for m in ("demographic_parity", "equal_opportunity", "equalized_odds"):
        assert d["difference"].sel(metric=m).item() == 0.0
        assert d["ratio"].sel(metric=m).item() == 1.0  # 0/0: equal rates, defined as parity
        assert d["p_value"].sel(metric=m).item() == 1.0


def test_multiclass_labels_give_accuracy_only_unless_pos_label():
    rng = np.random.default_rng(6)
    y, g = rng.integers(0, 4, 200), rng.integers(0, 2, 200)
    p = np.where(rng.random(200) < 0.7, y, rng.integers(0, 4, 200))
    rep = group_metrics(y, p, g, n_boot=0)
    assert "tpr" not in rep.table and rep.disparities["metric"].values.tolist() == ["accuracy"]
    assert rep.pos_label is None
    rep3 = group_metrics(y, p, g, n_boot=0, pos_label=3)  # one-vs-rest
    is3 = (y == 3) & (g == 0)
    assert rep3.table["tpr"].values[0] == pytest.approx(np.mean(p[is3] == 3))


@pytest.mark.parametrize("kwargs,match", [
    ({"y_true": [0, 1, 1], "y_pred": [0, 1], "groups": [0, 0, 1]}, "y_pred has 2 entries but y_true has 3"),
    ({"y_true": [0, 1, 1], "y_pred": [0, 1, 1], "groups": [0, 1]}, "2 entries but y_true has 3"),
    ({"y_true": [0, 1, 1], "y_pred": [0, 1, 1], "groups": ["a", None, "b"]}, "missing values.*index 1"),
    ({"y_true": [0, 1, 1], "y_pred": [0, 1, 1], "groups": [0.0, 1.0, np.nan]}, "missing values.*index 2"),
    ({"y_true": [0, np.nan, 1], "y_pred": [0, 1, 1], "groups": [0, 1, 1]}, "y_true has 1 missing"),
    ({"y_true": [], "y_pred": [], "groups": []}, "at least one sample"),
    ({"y_true": [0, 1, 1], "y_pred": [0, 1, 1], "groups": [0, 1, 5], "group_names": ["a", "b"]}, "labels contain 5"),
    ({"y_true": [0, 1, 1], "y_pred": [0, 1, 1], "groups": [0, 1, 1], "pos_label": 7}, "pos_label 7"),
    ({"y_true": [0, 1, 1], "y_pred": [0, 1, 1], "groups": [0, 1, 1], "n_boot": -1}, "n_boot must be"),
    ({"y_true": [0, 1, 1], "y_pred": [0, 1, 1], "groups": [0, 1, 1], "ci": 95}, "ci is a confidence level"),
    ({"y_true": [0, 1, 1], "y_pred": [0, 1, 1], "groups": [0, 1, 1], "correction": "bonf"}, "bonf"),
])
def test_bad_input_names_the_value(kwargs, match):
    with pytest.raises(ZooauditError, match=match), warnings.catch_warnings():
        warnings.simplefilter("ignore", BiasAuditWarning)
        group_metrics(**kwargs)
