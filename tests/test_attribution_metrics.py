"""Metrics on stored maps (zooaudit.analysis.attribution): hand-computed cases, mathematical
properties, and SciPy / NumPy references."""

import numpy as np
import pytest
import xarray as xr
from scipy import stats

from zooaudit.analysis import attribution as A
from zooaudit.errors import ZooauditError


def _case():
    maps = np.zeros((3, 4, 4))
    masks = np.zeros((3, 4, 4), bool)
    masks[:, 1:3, 1:3] = True
    maps[0, 1, 1] = 3.0      # all energy inside
    maps[0, 0, 0] = -5.0     # negative: not energy
    maps[1] = 1.0            # uniform: inside share = mask area 4/16
    maps[2, 0, 3] = 2.0      # max outside, two pixels from the mask
    maps[2, 2, 2] = 1.0
    return maps, masks


def test_energy_and_background_share_by_hand():
    maps, masks = _case()
    np.testing.assert_allclose(A.energy_inside(maps, masks), [1.0, 0.25, 1 / 3])
    np.testing.assert_allclose(A.background_share(maps, masks), [0.0, 0.75, 2 / 3])
    # scale invariance, and an all-zero (or all-negative) map has no defined share
    np.testing.assert_allclose(A.energy_inside(7 * maps, masks), A.energy_inside(maps, masks))
    assert np.isnan(A.energy_inside(-np.ones((1, 4, 4)), masks[:1]))[0]


def test_pointing_game_and_iou_by_hand():
    maps, masks = _case()
    np.testing.assert_array_equal(A.pointing_game(maps, masks), [1.0, 0.0, 0.0])   # uniform: first pixel (0, 0)
    np.testing.assert_array_equal(A.pointing_game(maps, masks, tolerance=1), [1.0, 1.0, 1.0])  # Chebyshev 1
    far, dot = np.zeros((1, 6, 6)), np.zeros((1, 6, 6), bool)
    far[0, 3, 5], dot[0, 0, 0] = 1.0, True          # Chebyshev distance max(3, 5) = 5
    assert A.pointing_game(far, dot, tolerance=4)[0] == 0.0 and A.pointing_game(far, dot, tolerance=5)[0] == 1.0
    # IoU at half the max: {(1,1)} vs 4 mask px = 1/4; uniform: all 16 px = 4/16; sample 2: {(0,3),(2,2)} → 1/5
    np.testing.assert_allclose(A.mask_iou(maps, masks), [0.25, 0.25, 0.2])
    np.testing.assert_allclose(A.mask_iou(maps, masks, threshold=1.0), [0.25, 0.25, 0.0])


def test_auc_is_the_trapezoid_rule():
    rng = np.random.default_rng(0)
    curves = rng.random((5, 3, 11))
    f = np.linspace(0, 1, 11)
    np.testing.assert_allclose(A.auc(curves, f), np.trapezoid(curves, f, axis=-1))
    np.testing.assert_allclose(A.auc(np.ones((2, 11)), f), 1.0)
    with pytest.raises(ZooauditError, match="increasing fractions"):
        A.auc(curves, f[::-1])


def test_compare_groups_means_cis_and_permutation_p_against_scipy():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0.3, 0.1, 60), rng.normal(0.5, 0.1, 40)
    v, g = np.concatenate([a, b, [np.nan]]), np.r_[np.zeros(60, int), np.ones(41, int)]
    out = A.compare_groups(v, g, names=["disagrees", "agrees"], n_boot=2000, n_permutations=2000)
    np.testing.assert_allclose(out["mean"].values, [a.mean(), b.mean()])
    assert out["n"].values.tolist() == [60, 40] and list(out["group"].values) == ["disagrees", "agrees"]
    assert (out["ci_low"] < out["mean"]).all() and (out["mean"] < out["ci_high"]).all()
    np.testing.assert_allclose(out.attrs["difference"], b.mean() - a.mean())
    assert out.attrs["difference_ci_low"] > 0 and out.attrs["p_value"] < 1e-3
    # under the null, against SciPy's permutation test of the mean difference (two-sided)
    c, d = rng.normal(0, 1, 30), rng.normal(0.2, 1, 30)
    ours = A.compare_groups(np.r_[c, d], np.r_[np.zeros(30, int), np.ones(30, int)], n_permutations=4000,
                            n_boot=0).attrs["p_value"]
    ref = stats.permutation_test((d, c), lambda x, y: np.mean(x) - np.mean(y), n_resamples=4000,
                                 alternative="two-sided", random_state=0).pvalue
    assert abs(ours - ref) < 0.05
    three = A.compare_groups(np.r_[a, b, a + 1], np.r_[np.zeros(60, int), np.ones(40, int), np.full(60, 2)],
                             n_boot=100, n_permutations=100)
    np.testing.assert_allclose(three.attrs["difference"], (a + 1).mean() - a.mean())   # the range of the means
    with pytest.raises(ZooauditError, match="at least two groups"):
        A.compare_groups(a, np.zeros(60, int))


def test_compare_paired_against_scipy_sign_flips():
    rng = np.random.default_rng(2)
    x = rng.normal(0, 1, 40)
    y = x - 0.3 + rng.normal(0, 0.5, 40)
    ours = A.compare_paired(x, y, n_boot=1000, n_permutations=4000)
    ref = stats.permutation_test((x - y,), np.mean, permutation_type="samples", n_resamples=4000,
                                 alternative="greater", random_state=0).pvalue
    assert abs(ours["p_value"] - ref) < 0.02 and ours["ci_low"] < ours["difference"] < ours["ci_high"]
    np.testing.assert_allclose(ours["difference"], (x - y).mean())


def test_spearman_maps_equals_scipy():
    rng = np.random.default_rng(3)
    a = rng.random((6, 5, 5))
    b = a + rng.normal(0, 0.3, a.shape)
    b[0, 0, :2] = b[0, 0, 2]          # ties
    ours = A.spearman_maps(a, b)
    ref = [stats.spearmanr(a[i].ravel(), b[i].ravel()).statistic for i in range(6)]
    np.testing.assert_allclose(ours, ref, atol=1e-12)
    assert np.isnan(A.spearman_maps(np.ones((1, 3, 3)), a[:1, :3, :3]))[0]


def test_kendall_maps_equals_scipy_tau_b():
    rng = np.random.default_rng(7)
    a = rng.integers(0, 4, (8, 5, 7)).astype(float)          # many ties in both
    b = a + rng.integers(-2, 3, a.shape)
    b[1] = rng.random((5, 7))                                 # no ties in b
    a[2] = -b[2]                                              # reversed: τ = −1 where untied
    ours = A.kendall_maps(a, b)
    ref = [stats.kendalltau(a[i].ravel(), b[i].ravel(), variant="b").statistic for i in range(8)]
    np.testing.assert_allclose(ours, ref, atol=1e-12)
    big_a, big_b = rng.random((3, 64, 64)), rng.random((3, 64, 64))
    big_a[:, :20] = 0.0                                       # a CAM's ReLU'd zeros: one large tie
    big_b = np.round(big_a + big_b, 1)
    np.testing.assert_allclose(A.kendall_maps(big_a, big_b),
                               [stats.kendalltau(big_a[i].ravel(), big_b[i].ravel()).statistic for i in range(3)],
                               atol=1e-12)
    # by hand: (1, 2, 3) against (1, 3, 2): 2 concordant, 1 discordant pair, no ties → 1/3
    np.testing.assert_allclose(A.kendall_maps([[[1, 2, 3]]], [[[1, 3, 2]]]), [1 / 3])
    assert np.isnan(A.kendall_maps(np.ones((1, 3, 3)), a[:1, :3, :3]))[0]
    with pytest.raises(ZooauditError, match="same shape"):
        A.kendall_maps(a, b[:, :4])


def test_agreement_matrix_kendall_against_scipy_and_undefined_means_without_warnings():
    import warnings

    rng = np.random.default_rng(8)
    m = np.round(rng.random((5, 3, 6, 6)), 1)
    m[:, 2] = 0.0                                              # an all-zero method: nothing defined
    m[0, 1] = 1.0                                              # one constant map: that sample is left out
    maps = xr.DataArray(m, dims=("sample", "method", "y", "x"), coords={"method": ["a", "b", "z"]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")                         # no "Mean of empty slice"
        out = A.agreement_matrix(maps)
    ref = [stats.kendalltau(m[i, 0].ravel(), m[i, 1].ravel()).statistic for i in range(1, 5)]
    np.testing.assert_allclose(out["kendall"].sel({"method": "a", "method_other": "b"}), np.mean(ref), atol=1e-12)
    np.testing.assert_allclose(out["kendall"].values, out["kendall"].values.T)
    assert int(out["n_kendall"].sel({"method": "a", "method_other": "b"})) == 4
    rho = [stats.spearmanr(m[i, 0].ravel(), m[i, 1].ravel()).statistic for i in range(1, 5)]
    np.testing.assert_allclose(out["spearman"].sel({"method": "a", "method_other": "b"}), np.mean(rho), atol=1e-12)
    assert int(out["n_spearman"].sel({"method": "b", "method_other": "b"})) == 4   # its constant map left out
    assert float(out["kendall"].sel({"method": "a", "method_other": "a"})) == 1.0
    for name in ("kendall", "spearman", "cosine"):
        assert np.isnan(out[name].sel({"method": "z"})).all() and (out[f"n_{name}"].sel({"method": "z"}) == 0).all()
    assert "n_<measure> = 0" in out.attrs["undefined"]


def test_agreement_matrix_properties_and_by_hand():
    rng = np.random.default_rng(4)
    m = rng.random((4, 3, 6, 6))
    m[:, 1] = 2 * m[:, 0] + 1           # same ranking as method 0
    m[:, 2] = -m[:, 0]                  # reversed ranking
    maps = xr.DataArray(m, dims=("sample", "method", "y", "x"), coords={"method": ["a", "b", "c"]})
    out = A.agreement_matrix(maps, top_fraction=0.25)
    np.testing.assert_allclose(np.diag(out["spearman"].values), 1.0)
    np.testing.assert_allclose(out["spearman"].sel({"method": "a", "method_other": "b"}), 1.0)
    np.testing.assert_allclose(out["spearman"].sel({"method": "a", "method_other": "c"}), -1.0)
    np.testing.assert_allclose(out["kendall"].sel({"method": "a", "method_other": "b"}), 1.0)
    np.testing.assert_allclose(out["kendall"].sel({"method": "a", "method_other": "c"}), -1.0)
    np.testing.assert_allclose(out["top_overlap"].sel({"method": "a", "method_other": "b"}), 1.0)
    assert float(out["top_overlap"].sel({"method": "a", "method_other": "c"})) == 0.0   # 9 of 36 px: disjoint ends
    np.testing.assert_allclose(out["cosine"].values, out["cosine"].values.T)
    flat = m.reshape(4, 3, -1)
    cos = (flat[:, 0] * flat[:, 1]).sum(1) / np.linalg.norm(flat[:, 0], axis=1) / np.linalg.norm(flat[:, 1], axis=1)
    np.testing.assert_allclose(out["cosine"].sel({"method": "a", "method_other": "b"}), cos.mean())


def test_bad_shapes_are_named():
    maps, masks = _case()
    with pytest.raises(ZooauditError, match=r"masks have shape \(3, 4, 3\); expected \(3, 4, 4\)"):
        A.energy_inside(maps, masks[:, :, :3])
    with pytest.raises(ZooauditError, match="tolerance"):
        A.pointing_game(maps, masks, tolerance=-1)
