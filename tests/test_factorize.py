import dask.array as da
import numpy as np
import pytest

from zooaudit.analysis.factorize import explained_variance, nmf, pca
from zooaudit.errors import ZooauditError


def test_explained_variance_endpoints():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 5)) + 3
    assert explained_variance(x, np.broadcast_to(x.mean(0), x.shape)) == pytest.approx(0.0, abs=1e-12)
    assert explained_variance(x, x) == pytest.approx(1.0)


def test_pca_equals_svd_of_centred_data():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 10)) @ rng.normal(size=(10, 10)) + 50
    f = pca(da.from_array(x, chunks=(64, -1)), 4)
    xc = x - x.mean(0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    for i in range(4):  # same subspace per component, up to sign
        assert abs(f.components[i] @ vt[i]) == pytest.approx(1.0, abs=1e-8)
    assert f.metrics["explained_variance"] == pytest.approx((s[:4] ** 2).sum() / (s ** 2).sum(), abs=1e-10)
    recon = f.codes @ f.components + f.mean
    assert f.metrics["explained_variance"] == pytest.approx(explained_variance(x, recon), abs=1e-8)
    assert f.codes.shape == (400, 4) and f.components.shape == (4, 10)


def test_nmf_explained_variance_and_planted_components():
    rng = np.random.default_rng(2)
    h = rng.random((3, 20)) ** 3
    w = rng.random((500, 3))
    x = w @ h + 0.001 * rng.random((500, 20))
    f = nmf(x, 3, random_state=0, max_iter=1000)
    recon = f.codes @ f.components
    assert f.metrics["explained_variance"] == pytest.approx(explained_variance(x, recon), abs=1e-12)
    assert f.metrics["explained_variance"] > 0.99
    cos = (f.components / np.linalg.norm(f.components, axis=1, keepdims=True)) @ (
        h / np.linalg.norm(h, axis=1, keepdims=True)).T
    assert np.sort(cos.max(axis=0)).min() > 0.98


def test_nmf_refuses_negative_layer_with_its_minimum():
    with pytest.raises(ZooauditError, match=r"layer 'fc1' has minimum -1"):
        nmf(np.array([[1.0, -1.0], [2.0, 3.0], [0.5, 0.1]]), 1, name="fc1")


def test_k_larger_than_rank_is_refused():
    with pytest.raises(ZooauditError, match="k must be"):
        pca(np.ones((3, 10)), 5, name="tiny")


def test_nan_activations_are_a_clear_error():
    x = np.ones((10, 3))
    x[2, 1] = np.nan
    with pytest.raises(ZooauditError, match="'L' contains NaN"):
        pca(x, 2, name="L")
    with pytest.raises(ZooauditError, match="'L' contains NaN"):
        nmf(x, 2, name="L")
