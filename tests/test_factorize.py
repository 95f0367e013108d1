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


# --- PCA solvers, codes, streamed quality -------------------------------------------------

def _decaying(n=1200, d=300, seed=3, offset=0.0):
    rng = np.random.default_rng(seed)
    scales = 2.0 ** -np.arange(d) * 10 + 1e-3
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return rng.normal(size=(n, d)) * scales @ q.T + offset


def test_randomized_pca_equals_svd_of_centred_data():
    x = _decaying(offset=100.0)
    xc = x - x.mean(0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    f = pca(da.from_array(x, chunks=(250, -1)), 5, solver="randomized", random_state=1)
    assert f.params["solver"] == "randomized"
    for i in range(5):
        assert abs(f.components[i] @ vt[i]) == pytest.approx(1.0, abs=1e-9)
    assert f.metrics["explained_variance"] == pytest.approx((s[:5] ** 2).sum() / (s ** 2).sum(), abs=1e-10)
    np.testing.assert_allclose(f.metrics["explained_variance_ratio"], s[:5] ** 2 / (s ** 2).sum(), rtol=1e-8)
    exact = pca(x, 5, solver="covariance")
    np.testing.assert_allclose(f.components, exact.components, atol=1e-8)  # same sign convention
    np.testing.assert_allclose(f.codes, exact.codes, atol=1e-6)


def test_pca_metrics_are_streamed_quality_measures():
    x = _decaying(n=600, d=20, offset=1e4)
    f = pca(da.from_array(x, chunks=(128, -1)), 3)
    recon = f.codes @ f.components + f.mean
    assert f.metrics["explained_variance"] == pytest.approx(explained_variance(x, recon), abs=1e-9)
    assert f.metrics["reconstruction_mse"] == pytest.approx(np.mean((x - recon) ** 2), rel=1e-6)
    assert f.metrics["l0"] == pytest.approx(3.0) and f.metrics["dead_components"] == 0
    cos = np.sum(x * recon, 1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(recon, axis=1))
    assert f.metrics["mean_cosine"] == pytest.approx(cos.mean(), abs=1e-12)
    assert len(f.metrics["explained_variance_curve"]) == 20


def test_pca_lazy_codes_equal_in_memory_codes():
    x = _decaying(n=500, d=12)
    f = pca(da.from_array(x, chunks=(100, -1)), 4, codes="dask")
    assert isinstance(f.codes, da.Array)
    np.testing.assert_allclose(f.codes.compute(), pca(x, 4).codes, atol=1e-10)
    ds = f.to_dataset(np.arange(500))
    assert ds["codes"].dims == ("sample", "component") and ds["mean"].dims == ("unit",)


def test_explained_variance_streams_dask_and_sums_before_dividing():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(300, 6)) * [1, 2, 3, 4, 5, 6] + 50
    x_hat = x + rng.normal(size=x.shape)
    ev = explained_variance(x, x_hat)
    assert ev == pytest.approx(1 - np.sum((x - x_hat) ** 2) / np.sum((x - x.mean(0)) ** 2), abs=1e-12)
    assert explained_variance(da.from_array(x, chunks=(37, -1)), da.from_array(x_hat, chunks=(37, -1))) \
        == pytest.approx(ev, abs=1e-12)
    # averaging per-batch ratios would differ: the batches have different variances
    per_batch = np.mean([explained_variance(x[i:i + 30] * (1 + i / 30), x_hat[i:i + 30] * (1 + i / 30))
                         for i in range(0, 300, 30)])
    assert abs(per_batch - ev) > 1e-3


def test_rank_deficient_layer_is_refused_with_its_rank():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(200, 3)) @ rng.normal(size=(3, 30))
    with pytest.raises(ZooauditError, match=r"'low'.* numerical rank 3.*k must be ≤ 3"):
        pca(x, 5, name="low")
    with pytest.raises(ZooauditError, match="constant"):
        pca(np.ones((20, 4)), 1, name="flat")


@pytest.mark.parametrize("bad, match", [
    (np.zeros((0, 5)), "'L' is empty"),
    (np.zeros((5, 0)), "'L' is empty"),
    (np.zeros(5), r"needs \(n_samples, n_features\)"),
])
def test_empty_or_flat_input_is_a_clear_error(bad, match):
    with pytest.raises(ZooauditError, match=match):
        pca(bad, 1, name="L")


def test_bad_options_name_the_allowed_values():
    x = np.abs(_decaying(n=50, d=6))
    with pytest.raises(ZooauditError, match="Allowed: auto, covariance, randomized"):
        pca(x, 2, solver="lanczos", name="L")
    with pytest.raises(ZooauditError, match="positive integer"):
        pca(x, 0, name="L")
    with pytest.raises(ZooauditError, match="Allowed: numpy, dask"):
        pca(x, 2, codes="list", name="L")


def test_nan_in_dask_activations_is_found_while_streaming():
    x = np.ones((40, 3))
    x[33, 0] = np.inf
    with pytest.raises(ZooauditError, match=r"'L' contains NaN or Inf activations \(1 values\)"):
        pca(da.from_array(x, chunks=(10, -1)), 1, name="L", solver="randomized")


def test_pca_without_codes_reads_the_data_once_and_keeps_the_spectrum_metrics():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(600, 12)) @ rng.normal(size=(12, 12)) + 20
    reads = []

    def counted(block):
        if block.size:  # dask also calls it once on an empty meta array
            reads.append(1)
        return block

    A = da.from_array(x, chunks=(100, -1)).map_blocks(counted, dtype=x.dtype)
    one = pca(A, 3, solver="covariance", codes="none")
    assert len(reads) == 6 and one.codes is None  # 6 chunks, each read once
    full = pca(x, 3)
    np.testing.assert_allclose(one.components, full.components, atol=1e-10)
    for key in ("explained_variance", "reconstruction_mse"):
        assert one.metrics[key] == pytest.approx(full.metrics[key], rel=1e-9)
    assert np.isnan(one.metrics["mean_cosine"]) and np.isnan(one.metrics["l0"])
