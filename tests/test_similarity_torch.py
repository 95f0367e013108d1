"""The torch backend of the streamed joint moments (sim_torch), on CPU torch: the same
statistics and metrics as the NumPy path (float64 to 1e-10), bad input and devices."""

import dask.array as da
import numpy as np
import pytest
import torch

from zooaudit.analysis import sim_stream, sim_torch
from zooaudit.analysis.sim_cka import cka_from_stats, cka_matrix
from zooaudit.analysis.sim_torch import TorchJointGram
from zooaudit.analysis.similarity import STREAMED_METRICS, similarity_matrices
from zooaudit.errors import ZooauditError


@pytest.fixture(scope="module")
def layers():
    rng = np.random.default_rng(21)
    z = rng.normal(size=(400, 6))
    return {"a": z @ rng.normal(size=(6, 9)) + 100.0,                          # offset: translation invariance
            "b": np.tanh(z @ rng.normal(size=(6, 14))) + 0.2 * rng.normal(size=(400, 14)) - 50.0,
            "c": rng.normal(size=(400, 3))}


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(sim_stream, "MAX_BLOCK_ROWS", 37)
    monkeypatch.setattr(sim_stream, "MIN_BLOCK_ROWS", 1)
    monkeypatch.setattr(sim_stream, "LOWRANK_FLUSH", 3)


def test_torch_moments_equal_numpy_float64(layers, small_blocks):
    arrays = list(layers.values())
    ref = sim_stream.joint_gram(arrays, rownorms=True, dtype=np.float64)
    got = sim_torch.torch_joint_gram(arrays, rownorms=True, dtype=np.float64, device="cpu")
    assert isinstance(got, TorchJointGram) and not isinstance(ref, TorchJointGram)
    assert got.n == ref.n == 400
    scale = np.abs(ref.centred()).max()
    np.testing.assert_allclose(got.centred(), ref.centred(), rtol=0, atol=1e-10 * scale)
    np.testing.assert_array_equal(got.T, got.T.T)
    for name in ("A", "RR", "RZ", "s", "shift"):
        r, g = getattr(ref, name), getattr(got, name)
        np.testing.assert_allclose(g, r, rtol=0, atol=1e-10 * max(1.0, np.abs(r).max()), err_msg=name)
    for debiased in (False, True):
        np.testing.assert_allclose(cka_from_stats(got, debiased=debiased), cka_from_stats(ref, debiased=debiased),
                                   rtol=0, atol=1e-10)
    # the centred co-moments are the in-memory ones
    zc = np.concatenate(arrays, axis=1)
    zc = zc - zc.mean(0)
    np.testing.assert_allclose(got.centred(), zc.T @ zc, rtol=0, atol=1e-10 * scale)


def test_every_streamed_metric_on_torch_equals_numpy(layers, small_blocks):
    lazy = {k: da.from_array(v, chunks=(53, -1)) for k, v in layers.items()}
    ref = similarity_matrices(layers, metrics=list(STREAMED_METRICS))
    got = similarity_matrices(lazy, metrics=list(STREAMED_METRICS), device=torch.device("cpu"))
    for metric in STREAMED_METRICS:
        # Procrustes is an arccos: near 0 a 1e-16 change of its cosine moves it by 1e-8; compare cosines
        g, r = (np.cos(m[metric].values) if metric == "procrustes" else m[metric].values for m in (got, ref))
        np.testing.assert_allclose(g, r, rtol=0, atol=1e-10, err_msg=metric)
        assert got[metric].attrs == ref[metric].attrs
    assert cka_matrix(layers, debiased=True, device="cpu") == pytest.approx(cka_matrix(layers, debiased=True),
                                                                            abs=1e-10)


def test_float32_and_other_dtypes_on_torch(layers, small_blocks):
    f32 = {k: v.astype(np.float32) for k, v in layers.items()}
    for debiased in (False, True):
        np.testing.assert_allclose(cka_matrix(f32, debiased=debiased, device="cpu"),
                                   cka_matrix(layers, debiased=debiased), rtol=0, atol=1e-6)
    mixed = {"half": layers["c"].astype(np.float16), "int": np.rint(layers["a"]).astype(np.int32),
             "bool": layers["b"] > -50.0}
    np.testing.assert_allclose(cka_matrix(mixed, device="cpu"), cka_matrix(mixed), rtol=0, atol=1e-10)


def test_torch_path_bad_input_and_devices(layers):
    x = layers["a"].copy()
    x[123, 4] = np.nan
    with pytest.raises(ZooauditError, match=r"non-finite"):
        cka_matrix({"x": x, "y": layers["b"]}, device="cpu")
    with pytest.raises(ZooauditError, match=r"Bad torch device 'gpu7' for the similarity moments.*Allowed here: cpu, auto, None \(the CPU\)"):
        cka_matrix(layers, device="gpu7")
    if not torch.cuda.is_available():
        with pytest.raises(ZooauditError, match=r"'cuda' requested .* CUDA is not available"):
            cka_matrix(layers, device="cuda")
