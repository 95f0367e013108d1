"""ROAD (zooaudit.road): noisy linear imputation and the MoRF / LeRF curves, against hand
computations, a dense solve of the same system and pytorch-grad-cam's reference imputer."""

import numpy as np
import pytest
import torch
import xarray as xr

from weighted_model import Weighted
from zooaudit.analysis.attribution import auc
from zooaudit.errors import ZooauditError
from zooaudit.road import imputation_system, noisy_linear_imputation, road_curves


def test_a_pixel_among_constants_gets_the_constant():
    img = np.full((1, 2, 5, 5), 3.0, np.float32)
    img[0, 1] = -2.0
    img[0, :, 2, 2] = 100.0                      # the value to forget
    removed = np.zeros((1, 5, 5), bool)
    removed[0, 2, 2] = True
    out = noisy_linear_imputation(img, removed, sigma=0.0)
    np.testing.assert_allclose(out[0, :, 2, 2], [3.0, -2.0], rtol=1e-6)
    assert (out[0][:, ~removed[0]] == img[0][:, ~removed[0]]).all()
    # a corner pixel: its 3 in-image neighbours, weights 1/6, 1/6, 1/12 (not renormalised to 1,
    # the equation divides by their sum): (2/6·a + 1/12·b) / (5/12)
    img2 = np.zeros((1, 1, 3, 3), np.float32)
    img2[0, 0, 0, 1], img2[0, 0, 1, 0], img2[0, 0, 1, 1] = 1.0, 3.0, 6.0
    corner = np.zeros((1, 3, 3), bool)
    corner[0, 0, 0] = True
    out2 = noisy_linear_imputation(img2, corner, sigma=0.0)
    np.testing.assert_allclose(out2[0, 0, 0, 0], (1.0 / 6 + 3.0 / 6 + 6.0 / 12) / (5 / 12), rtol=1e-6)


def test_a_linear_ramp_is_reproduced_at_interior_pixels():
    yy, xx = np.mgrid[0:9, 0:11].astype(np.float32)
    img = np.stack([2 * yy - 0.5 * xx + 1, xx])[None]           # (1, 2, 9, 11)
    removed = np.zeros((1, 9, 11), bool)
    removed[0, 2:7, 3:9] = True                                  # a block, every pixel interior
    removed[0, 1, 1] = True
    out = noisy_linear_imputation(img, removed, sigma=0.0)
    np.testing.assert_allclose(out, img, atol=1e-4)


def test_sparse_solve_equals_a_dense_solve_and_the_reference_imputer():
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    rng = np.random.default_rng(3)
    img = rng.normal(size=(2, 3, 7, 6)).astype(np.float32)
    removed = rng.random((2, 7, 6)) < 0.5
    a, b, unknowns = imputation_system(img, removed)
    assert a.shape == (removed.sum(), removed.sum()) and b.shape == (removed.sum(), 3)
    dense = np.linalg.solve(a.toarray(), b)
    out = noisy_linear_imputation(img, removed, sigma=0.0)
    flat = out.transpose(0, 2, 3, 1).reshape(-1, 3)
    np.testing.assert_allclose(flat[unknowns], dense, rtol=1e-5, atol=1e-5)
    for k in range(2):   # the reference: mask 1 = kept
        ref = NoisyLinearImputer(noise=0.0)(torch.from_numpy(img[k]), torch.from_numpy((~removed[k]).astype(np.float32)))
        np.testing.assert_allclose(out[k], ref.numpy(), rtol=1e-5, atol=1e-5)


def test_noise_is_seeded_on_imputed_pixels_only_and_all_removed_gives_the_fill():
    rng = np.random.default_rng(0)
    img = rng.random((2, 1, 6, 6)).astype(np.float32)
    removed = np.zeros((2, 6, 6), bool)
    removed[0, 1:3, 1:4] = True
    removed[1] = True                                            # every pixel: singular, → fill
    a = noisy_linear_imputation(img, removed, sigma=0.1, fill=0.25, rng=7)
    b = noisy_linear_imputation(img, removed, sigma=0.1, fill=0.25, rng=7)
    clean = noisy_linear_imputation(img, removed, sigma=0.0, fill=0.25)
    np.testing.assert_array_equal(a, b)
    assert (a[0][:, ~removed[0]] == img[0][:, ~removed[0]]).all()
    noise = (a - clean)[removed[:, None].repeat(1, 1)]
    assert np.abs(noise).min() > 0 and 0.05 < noise.std() < 0.15
    np.testing.assert_allclose(clean[1], 0.25)
    with pytest.raises(ZooauditError, match="sigma=-1"):
        noisy_linear_imputation(img, removed, sigma=-1)
    with pytest.raises(ZooauditError, match="one \\(H, W\\) mask per image"):
        noisy_linear_imputation(img, removed[:, :3])


def test_morf_and_lerf_curves_by_hand_on_a_pixel_weight_model():
    """A model scoring w·x on a constant-background image: imputation of a constant region is
    exact, so only the removed weighted pixels change the score; computed by hand."""
    h = w = 4
    weights = np.zeros((1, h, w), np.float32)
    weights[0, 0, 0], weights[0, 3, 3] = 2.0, 1.0                # two evidence pixels at corners
    x = np.full((1, 1, h, w), 0.5, np.float32)
    x[0, 0, 0, 0], x[0, 0, 3, 3] = 1.5, 2.5                      # w·x = 3 + 2.5 + 0 = 5.5 (others weigh 0)
    relevance = np.arange(h * w, dtype=np.float32).reshape(1, 1, h, w)[..., ::-1, ::-1].copy()
    relevance[0, 0, 0, 0], relevance[0, 0, 3, 3] = 100, 99       # the oracle: (0,0) then (3,3), then the rest
    maps = xr.DataArray(relevance, dims=("sample", "method", "y", "x"), coords={"method": ["oracle"]})
    out = road_curves(Weighted(weights), x, maps, [0], steps=16, sigma=0.0, fill=0.5, batch_size=5)
    c = out["curves"]
    assert c.dims == ("sample", "order", "kind", "step") and list(out["kind"].values) == ["morf", "lerf"]
    sig = lambda z: 1 / (1 + np.exp(-z))                        # noqa: E731
    # MoRF: step 1 removes (0,0) → imputed 0.5 (its neighbours are 0.5): w·x = 1 + 2.5; step 2
    # also (3,3) → 1 + 0.5; after that only zero-weight pixels go (then everything: fill 0.5)
    morf = [sig(5.5), sig(3.5), *[sig(1.5)] * 15]
    np.testing.assert_allclose(c.sel(order="oracle", kind="morf").values[0], morf, rtol=1e-5)
    # LeRF: the 14 zero-weight pixels first (steps 0–14: the weighted pixels keep their values),
    # then (3,3) at step 15: every pixel but (0,0) is imputed, the constant extension of its 1.5
    lerf = c.sel(order="oracle", kind="lerf").values[0]
    np.testing.assert_allclose(lerf[:15], sig(5.5), rtol=1e-5)
    kept = np.zeros((1, h, w), bool)
    kept[0, 0, 0] = True
    imputed = noisy_linear_imputation(x, ~kept, sigma=0.0)       # all but (0,0) removed
    np.testing.assert_allclose(imputed[0, 0], 1.5, rtol=1e-5)    # a constant extension of the one kept value
    np.testing.assert_allclose(lerf[15], sig(2 * 1.5 + 1 * 1.5), rtol=1e-5)
    np.testing.assert_allclose(lerf[16], sig(2 * 0.5 + 1 * 0.5), rtol=1e-5)  # all removed: the fill
    a = auc(c.values, out["fraction"].values)
    assert a[0, 0, 0] < a[0, 1, 0] and a[0, 0, 1] > a[0, 1, 1]   # the oracle beats random on both


def test_road_curves_refuse_bad_input():
    x = np.zeros((2, 1, 4, 4), np.float32)
    maps = xr.DataArray(np.zeros((2, 1, 3, 3)), dims=("sample", "method", "y", "x"), coords={"method": ["m"]})
    with pytest.raises(ZooauditError, match="do not match inputs"):
        road_curves(Weighted(np.zeros((1, 4, 4))), x, maps, [0, 0])
