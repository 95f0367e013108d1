"""TopK sparse autoencoder: learns, is sparse, is reproducible."""

import dask.array as da
import numpy as np
import pytest

from zooaudit.analysis.factorize import matched_cosine, sae
from zooaudit.errors import ZooauditError


@pytest.fixture(scope="module")
def data():
    """Sparse combinations of 16 unit directions in 32-d, offset from the origin."""
    rng = np.random.default_rng(0)
    H = rng.normal(size=(16, 32))
    H /= np.linalg.norm(H, axis=1, keepdims=True)
    W = rng.random((3000, 16)) * (rng.random((3000, 16)) < 0.15)
    return W @ H + 0.01 * rng.normal(size=(3000, 32)) + 3.0, H


def test_training_reduces_reconstruction_error_and_codes_are_topk(data):
    X, H = data
    untrained = sae(X, 32, topk=4, epochs=0, random_state=0)
    f = sae(X, 32, topk=4, epochs=25, batch_size=128, lr=3e-3, random_state=0)
    assert f.metrics["reconstruction_mse"] < 0.1 * untrained.metrics["reconstruction_mse"]
    assert f.metrics["explained_variance"] > 0.95
    assert f.codes.shape == (3000, 32) and f.components.shape == (32, 32)
    assert (f.codes >= 0).all() and ((f.codes > 0).sum(1) <= 4).all()
    assert f.metrics["l0"] <= 4 and f.metrics["sparsity"] >= 1 - 4 / 32
    np.testing.assert_allclose(np.linalg.norm(f.components, axis=1), 1.0, atol=1e-6)
    recon = f.codes @ f.components + f.mean
    assert f.metrics["reconstruction_mse"] == pytest.approx(np.mean((X - recon) ** 2), rel=1e-9)
    assert matched_cosine(H, f.components)[0].mean() > 0.9  # dictionary directions found


def test_fixed_seed_is_bitwise_reproducible_on_cpu(data):
    X, _ = data
    kw = {"topk": 4, "epochs": 3, "batch_size": 256, "random_state": 7}
    a, b = sae(X, 24, **kw), sae(X, 24, **kw)
    np.testing.assert_array_equal(a.components, b.components)
    np.testing.assert_array_equal(a.codes, b.codes)
    c = sae(X, 24, **{**kw, "random_state": 8})
    assert not np.array_equal(a.components, c.components)


def test_streams_dask_chunks_and_returns_lazy_codes(data):
    X, _ = data
    f = sae(da.from_array(X, chunks=(700, -1)), 32, topk=4, epochs=5, batch_size=128, lr=3e-3, codes="dask")
    assert f.metrics["explained_variance"] > 0.8
    codes = f.codes.compute()
    recon = codes @ f.components + f.mean
    assert f.metrics["reconstruction_mse"] == pytest.approx(np.mean((X - recon) ** 2), rel=1e-6)


@pytest.mark.parametrize("kw, match", [
    ({"topk": 40}, "topk=40 exceeds k_latents=32"),
    ({"epochs": -1}, "epochs=-1"),
    ({"lr": 0}, "lr=0"),
    ({"device": "tpu"}, "Allowed here: cpu"),
])
def test_bad_settings_are_clear_errors(data, kw, match):
    with pytest.raises(ZooauditError, match=match):
        sae(data[0][:50], 32, name="resid.3", **kw)
