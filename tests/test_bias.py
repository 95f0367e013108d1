import numpy as np
import pytest

from zooaudit.analysis.bias import group_metrics


def test_group_metrics_match_hand_count():
    y = np.array([0, 0, 1, 1, 0, 1, 1, 0, 1, 0])
    p = np.array([0, 1, 1, 1, 0, 0, 1, 0, 1, 1])
    g = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    rep = group_metrics(y, p, g, n_boot=0, group_names=["red", "green"])
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


def test_bootstrap_ci_is_reproducible_and_brackets_estimate():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    p = np.where(rng.random(400) < 0.8, y, 1 - y)
    g = rng.integers(0, 2, 400)
    a = group_metrics(y, p, g, n_boot=100, random_state=7)
    b = group_metrics(y, p, g, n_boot=100, random_state=7)
    np.testing.assert_array_equal(a.table["accuracy_ci"].values, b.table["accuracy_ci"].values)
    lo, hi = a.table["accuracy_ci"].values.T
    acc = a.table["accuracy"].values
    assert np.all(lo <= acc) and np.all(acc <= hi) and np.all(hi - lo > 0)
