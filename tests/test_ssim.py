"""SSIM (zooaudit.analysis.ssim): its defining properties, and values computed directly from
Wang et al.'s formula — one window position by hand, every position by explicit loops with
uniform and with (2-D, non-separable) gaussian weights."""

import numpy as np
import pytest

from zooaudit.analysis.ssim import ssim, ssim_maps
from zooaudit.errors import ZooauditError

C1, C2 = 0.01**2, 0.03**2


def _formula(x, y, w):
    """SSIM of one window: the weighted statistics written out."""
    mx, my = (w * x).sum(), (w * y).sum()
    vx, vy = (w * (x - mx) ** 2).sum(), (w * (y - my) ** 2).sum()
    cxy = (w * (x - mx) * (y - my)).sum()
    return (2 * mx * my + C1) * (2 * cxy + C2) / ((mx**2 + my**2 + C1) * (vx + vy + C2))


def _by_loops(x, y, w):
    k = len(w)
    vals = [_formula(x[i:i + k, j:j + k], y[i:i + k, j:j + k], w)
            for i in range(x.shape[0] - k + 1) for j in range(x.shape[1] - k + 1)]
    return np.mean(vals)


def test_identity_symmetry_and_sign():
    rng = np.random.default_rng(0)
    x, y = rng.random((4, 16, 16)), rng.random((4, 16, 16))
    np.testing.assert_allclose(ssim(x, x), 1.0, atol=1e-12)
    np.testing.assert_allclose(ssim(x, x, window="uniform", win_size=5), 1.0, atol=1e-12)
    np.testing.assert_allclose(ssim(x, y), ssim(y, x), atol=1e-15)
    assert (ssim(x, y) < 1).all() and (ssim(x, y) > -1).all()
    assert (ssim(x, 1 - x) < 0).all()                     # inverted structure: negative covariance


def test_one_uniform_window_by_hand():
    x = np.array([[0.0, 0.5, 1.0], [0.2, 0.4, 0.6], [1.0, 0.0, 0.3]])
    y = np.array([[0.1, 0.5, 0.9], [0.3, 0.3, 0.7], [0.8, 0.2, 0.1]])
    mx, my = x.mean(), y.mean()
    vx, vy = x.var(), y.var()                            # population variances (weights 1/9)
    cxy = ((x - mx) * (y - my)).mean()
    by_hand = (2 * mx * my + C1) * (2 * cxy + C2) / ((mx**2 + my**2 + C1) * (vx + vy + C2))
    np.testing.assert_allclose(ssim(x[None], y[None], window="uniform", win_size=3), [by_hand], rtol=1e-12)


def test_every_window_position_uniform_and_gaussian():
    rng = np.random.default_rng(1)
    x, y = rng.random((2, 5, 6)), rng.random((2, 5, 6))
    u = np.full((3, 3), 1 / 9)
    np.testing.assert_allclose(ssim(x, y, window="uniform", win_size=3), [_by_loops(x[i], y[i], u) for i in range(2)],
                               rtol=1e-12)
    a, b = rng.random((2, 13, 14)), rng.random((2, 13, 14))
    b[1] = 0.7 * a[1] + 0.3 * b[1]
    r = np.arange(11) - 5
    g = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * 1.5**2))
    g /= g.sum()                                         # 11 × 11, σ = 1.5: 3 × 4 positions
    ref = [_by_loops(a[i], b[i], g) for i in range(2)]
    np.testing.assert_allclose(ssim(a, b), ref, rtol=1e-12)
    assert ref[1] > ref[0]                               # the correlated pair is more similar


def test_ssim_maps_scales_each_map_and_leaves_constant_maps_undefined():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(3, 12, 12)), rng.normal(size=(3, 12, 12))
    ref = ssim_maps(a, b)
    np.testing.assert_allclose(ssim_maps(5 * a - 2, b), ref, atol=1e-12)   # min–max scaled first
    unit = lambda m: (m - m.min((1, 2), keepdims=True)) / np.ptp(m, (1, 2), keepdims=True)  # noqa: E731
    np.testing.assert_allclose(ref, ssim(unit(a), unit(b)), atol=1e-12)
    a[1] = 0.0
    out = ssim_maps(a, b)
    assert np.isnan(out[1]) and np.isfinite(out[[0, 2]]).all()


def test_bad_input_is_named():
    x = np.zeros((1, 8, 8))
    with pytest.raises(ZooauditError, match="win_size=11 exceeds the images' size"):
        ssim(x, x)
    with pytest.raises(ZooauditError, match="Unknown SSIM window 'box'"):
        ssim(x, x, window="box", win_size=3)
    with pytest.raises(ZooauditError, match="same shape"):
        ssim_maps(x, x[:, :4])
