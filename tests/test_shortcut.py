"""Shortcut reliance on counterfactual pairs: a hand-computed case, the min-n policy, bad pairs."""

import numpy as np
import pytest

from zooaudit.analysis.shortcut import check_pairs, minority_cells, shortcut_reliance
from zooaudit.data.counterfactual import counterfactual_spec
from zooaudit.errors import ZooauditError
from zooaudit.specs import DatasetSpec


def test_hand_computed_colour_shortcut():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    groups = np.array([0, 0, 0, 1, 1, 1, 1, 0])        # colour of the original
    pred, pred_cf = groups.copy(), 1 - groups           # the model answers the colour
    # training: label 0 is colour 0 in 9 of 10 samples, label 1 colour 1 in 9 of 10
    t_y = np.array([0] * 10 + [1] * 10)
    t_g = np.array([0] * 9 + [1] + [1] * 9 + [0])
    ds = shortcut_reliance(y, pred, pred_cf, groups, 1 - groups, t_y, t_g, group_names=["red", "green"],
                           min_group_size=2)
    red = ds.sel(group="red")          # samples 0, 1, 2 (right → wrong) and 7 (wrong → right)
    assert int(red["count"]) == 4 and float(red["accuracy"]) == 0.75 and float(red["cf_accuracy"]) == 0.25
    assert float(red["flip_rate"]) == 1.0 and float(red["accuracy_drop"]) == 0.5
    assert float(red["p_value"]) == pytest.approx(0.625)          # 2 · P(Binom(4, ½) ≥ 3) = 2 · 5/16
    assert ds.attrs["flip_rate"] == 1.0 and ds.attrs["cf_accuracy"] == 0.25
    assert ds["minority"].sel(cell="label=0|green") and ds["minority"].sel(cell="label=1|red")
    assert not ds["minority"].sel(cell="label=0|red")
    # counterfactual side: samples 0, 1, 2 moved to (label 0, green), all wrong: the worst uncommon setting
    assert ds.attrs["worst_minority_counterfactual"] == 0.0
    assert ds.attrs["worst_minority_counterfactual_cell"] == "label=0|green"
    assert not ds.attrs["worst_minority_counterfactual_small"]
    # originals: each minority cell has one sample — small; the worst is taken over them and flagged
    assert ds.attrs["worst_minority_original_small"]
    lo, hi = red["cf_accuracy_wilson"].values
    assert lo < 0.25 < hi


def test_min_group_size_leaves_small_groups_untested():
    y = np.zeros(30, int)
    g = np.array([0] * 25 + [1] * 5)
    ds = shortcut_reliance(y, y, np.ones(30, int), g, 1 - g, y, g, min_group_size=20)
    assert bool(ds["small"].sel(group="1")) and np.isnan(ds["p_value"].sel(group="1"))
    assert float(ds["p_value"].sel(group="0")) < 1e-6 and bool(ds["reject"].sel(group="0"))


def test_minority_cells_and_bad_pairs():
    np.testing.assert_array_equal(minority_cells([0, 0, 0, 1], [0, 0, 1, 1], 2, 2), [[False, True], [True, False]])
    ids = np.array([5, 6, 7])
    check_pairs(ids, ids.copy(), [0, 1, 0], [0, 1, 0])
    with pytest.raises(ZooauditError, match="do not match: sample id 6"):
        check_pairs(ids, np.array([5, 7, 6]), [0, 1, 0], [0, 1, 0])
    with pytest.raises(ZooauditError, match="partner"):
        check_pairs(ids, ids[:2], [0, 1, 0], [0, 1])
    with pytest.raises(ZooauditError, match="label"):
        check_pairs(ids, ids, [0, 1, 0], [0, 0, 0])


def test_counterfactual_specs():
    cf = counterfactual_spec(DatasetSpec(name="scenes", options={"n_test": 8}))
    assert cf.options == {"n_test": 8, "swap_background": True}
    assert counterfactual_spec(cf).options["swap_background"] is False
    assert counterfactual_spec(DatasetSpec(name="colored-digits")).options == {"swap_color": True}
    assert counterfactual_spec(DatasetSpec(name="digits")) is None


def test_colored_digits_swap_is_a_counterfactual():
    from zooaudit.data import load_dataset

    a = load_dataset(DatasetSpec(name="colored-digits", max_samples=50))
    b = load_dataset(counterfactual_spec(DatasetSpec(name="colored-digits", max_samples=50)))
    check_pairs(a.sample_ids, b.sample_ids, a.labels, b.labels)
    np.testing.assert_array_equal(b.groups["colour"], 1 - a.groups["colour"])
    np.testing.assert_array_equal(a.inputs.sum(1), b.inputs.sum(1))      # the same digit, other channel
