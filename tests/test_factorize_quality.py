"""Eigen-CAM, Hungarian matching, seed stability, the k sweep and the streamed quality metrics."""

import dask.array as da
import numpy as np
import pytest
from scipy.stats import ortho_group

from zooaudit.analysis.factorize import (
    eigencam,
    k_sweep,
    matched_cosine,
    nmf,
    pca,
    stability,
)
from zooaudit.analysis.quality import QualityAccumulator
from zooaudit.errors import ZooauditError


def reference_eigencam(fmap):
    """Independent computation: SVD of the centred (H·W, C) matrix, first right singular vector."""
    c, h, w = fmap.shape
    m = fmap.reshape(c, h * w).T
    m = m - m.mean(0)
    _, _, vt = np.linalg.svd(m, full_matrices=False)
    v = vt[0] * np.sign(vt[0].sum())
    return (m @ v).reshape(h, w)


@pytest.mark.parametrize("shape", [(16, 7, 9), (40, 3, 4)])  # C < H·W and C > H·W
def test_eigencam_is_the_first_principal_component_of_the_map(shape):
    fmap = np.random.default_rng(0).random(shape) ** 2
    np.testing.assert_allclose(eigencam(fmap), reference_eigencam(fmap), atol=1e-12)


def test_eigencam_sign_follows_the_channel_sum_and_batches():
    rng = np.random.default_rng(1)
    blob = np.zeros((6, 8))
    blob[2:4, 5:7] = 1.0
    fmap = blob[None] * rng.random((12, 1, 1)) + 0.01 * rng.random((12, 6, 8))
    cam = eigencam(fmap)
    assert cam[2:4, 5:7].min() > cam.max() / 2  # the active blob is positive
    centred_sum = fmap.sum(0) - fmap.sum(0).mean()
    assert np.sum(cam * centred_sum) > 0
    batch = np.stack([fmap, -fmap[::-1], 2 * fmap])
    out = eigencam(batch)
    assert out.shape == (3, 6, 8)
    np.testing.assert_allclose(out[2], 2 * cam, atol=1e-12)
    np.testing.assert_array_equal(eigencam(np.ones((3, 4, 4))), np.zeros((4, 4)))
    with pytest.raises(ZooauditError, match=r"\(C, H, W\)"):
        eigencam(np.ones((4, 4)), name="layer4")


def test_matched_cosine_undoes_a_permutation():
    rng = np.random.default_rng(2)
    c = rng.normal(size=(6, 20))
    perm = rng.permutation(6)
    cos, match = matched_cosine(c, 3 * c[perm])
    np.testing.assert_allclose(cos, 1.0)
    np.testing.assert_array_equal(perm[match], np.arange(6))


def test_pca_is_perfectly_stable_and_k_sweep_is_monotone():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(400, 12)) @ np.diag(np.linspace(3, 0.1, 12)) @ ortho_group.rvs(12, random_state=0)
    assert stability("pca", x, 4, seeds=(0, 1)).mean == pytest.approx(1.0)
    ds = k_sweep(da.from_array(x, chunks=(100, -1)), [1, 2, 4, 8, 12], "pca", name="fc")
    assert ds["explained_variance"].dims == ("k",) and list(ds["k"].values) == [1, 2, 4, 8, 12]
    ev = ds["explained_variance"].values
    assert np.all(np.diff(ev) > 0) and ev[-1] == pytest.approx(1.0)
    assert ds.attrs == {"method": "pca", "layer": "fc"}


def test_k_sweep_with_seeds_adds_stability_for_nmf():
    rng = np.random.default_rng(4)
    x = (rng.random((600, 3)) * (rng.random((600, 3)) < 0.5)) @ rng.random((3, 15)) ** 3
    ds = k_sweep(x, [2, 3], "nmf", seeds=(0, 1), max_iter=300)
    assert set(ds.data_vars) >= {"explained_variance", "l0", "dead_components", "stability_mean", "stability_min"}
    assert ds["stability_mean"].sel(k=3) > 0.99
    with pytest.raises(ZooauditError, match="Allowed: nmf, pca, sae, semi_nmf"):
        k_sweep(x, [2], "ica")


def test_stability_on_a_row_subset_fits_only_those_rows():
    rng = np.random.default_rng(5)
    x = (rng.random((3000, 3)) * (rng.random((3000, 3)) < 0.5)) @ rng.random((3, 15)) ** 3
    rows = np.sort(rng.choice(3000, 400, replace=False))
    full = nmf(x, 3, max_iter=300)
    sub = stability("nmf", da.from_array(x, chunks=(700, -1)), 3, (0, 1), rows=rows, reference=full.components,
                    max_iter=300)
    same = stability("nmf", x[rows], 3, (0, 1), reference=full.components, max_iter=300)
    assert sub.rows == 400 and stability("nmf", x, 3, (0, 1), max_iter=50).rows == 3000
    np.testing.assert_allclose(sub.pairwise, same.pairwise)
    np.testing.assert_allclose(sub.per_component, same.per_component)
    assert sub.per_component.min() > 0.99  # the full-data components are recovered from the subset
    with pytest.raises(ZooauditError, match=r"indices in \[0, 3000\)"):
        stability("nmf", x, 3, (0, 1), rows=np.array([5, 3000]))


def test_quality_metrics_do_not_depend_on_chunking_and_count_dead_components():
    rng = np.random.default_rng(5)
    x = rng.random((500, 8)) + 10
    x_hat = x + 0.1 * rng.normal(size=x.shape)
    codes = np.c_[rng.random(500), np.zeros(500), (rng.random(500) < 0.3) * 1.0]
    one, many = QualityAccumulator(3, 1.0), QualityAccumulator(3, 1.0)
    one.update(x, x_hat, codes)
    for i in range(0, 500, 37):
        many.update(x[i:i + 37], x_hat[i:i + 37], codes[i:i + 37])
    a, b = one.metrics(), many.metrics()
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-10, abs=1e-12)
    assert a["dead_components"] == 1
    assert a["l0"] == pytest.approx((codes != 0).sum() / 500)


def test_every_factorization_carries_the_quality_metrics():
    x = np.random.default_rng(6).random((300, 10))
    for f in (pca(x, 3), nmf(x, 3)):
        assert {"explained_variance", "reconstruction_mse", "mean_cosine", "l0", "sparsity",
                "dead_components"} <= set(f.metrics)
        ds = f.to_dataset(np.arange(300))
        assert "explained_variance" in ds.attrs and "param_solver" in ds.attrs
