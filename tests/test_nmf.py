"""NMF (full-batch, out-of-core minibatch, scikit-learn), semi-NMF and DFF."""

import dask.array as da
import numpy as np
import pytest

from zooaudit.analysis.factorize import dff, matched_cosine, nmf, semi_nmf, stability
from zooaudit.errors import ZooauditError


def planted(n=3000, d=40, k=4, seed=0, signed=False, density=0.5, noise=1e-3):
    """``X = W H + noise`` with sparse non-negative codes ``W``; ``H`` ≥ 0 (or signed)."""
    rng = np.random.default_rng(seed)
    H = rng.normal(size=(k, d)) if signed else rng.random((k, d)) ** 3
    W = rng.random((n, k)) * (rng.random((n, k)) < density)
    X = W @ H + noise * (rng.normal(size=(n, d)) if signed else rng.random((n, d)))
    return X, W, H


@pytest.fixture(scope="module")
def data():
    return planted()


@pytest.fixture(scope="module")
def in_memory(data):
    return nmf(data[0], 4, random_state=0)


def test_full_batch_nmf_recovers_planted_components(data, in_memory):
    X, _, H = data
    cos, _ = matched_cosine(H, in_memory.components)
    assert cos.min() >= 0.99
    assert in_memory.params["solver"] == "hals"
    assert (in_memory.components >= 0).all() and (in_memory.codes >= 0).all()
    np.testing.assert_allclose(np.linalg.norm(in_memory.components, axis=1), 1.0)
    assert in_memory.metrics["explained_variance"] > 0.9999
    recon = in_memory.codes @ in_memory.components
    assert in_memory.metrics["reconstruction_mse"] == pytest.approx(np.mean((X - recon) ** 2), rel=1e-9)


def test_torch_hals_follows_scikit_learn_coordinate_descent(data, in_memory):
    """Same start (NNDSVDa), same update, same stopping rule: same iterations, same factors."""
    ref = nmf(data[0], 4, random_state=0, solver="sklearn")
    cos, _match = matched_cosine(ref.components, in_memory.components)
    assert cos.min() > 0.99999
    assert in_memory.metrics["explained_variance"] == pytest.approx(ref.metrics["explained_variance"], abs=1e-8)
    assert abs(in_memory.metrics["n_iter"] - ref.metrics["n_iter"]) <= 1


def test_out_of_core_minibatch_recovers_planted_and_matches_in_memory(data, in_memory):
    X, _, H = data
    A = da.from_array(X, chunks=(500, -1))
    f = nmf(A, 4, solver="minibatch", max_epochs=30, random_state=0)
    assert f.params["solver"] == "minibatch" and f.metrics["n_iter"] <= 30
    assert matched_cosine(H, f.components)[0].min() >= 0.99
    assert matched_cosine(in_memory.components, f.components)[0].min() >= 0.999
    assert f.metrics["explained_variance"] == pytest.approx(in_memory.metrics["explained_variance"], abs=1e-4)
    # lazy codes: same transform, evaluated chunk by chunk on demand
    lazy = nmf(A, 4, solver="minibatch", max_epochs=30, random_state=0, codes="dask")
    assert isinstance(lazy.codes, da.Array)
    np.testing.assert_allclose(lazy.codes.compute(), f.codes, rtol=1e-9, atol=1e-12)


def test_float32_activations_run_in_float32_and_random_start_is_seeded():
    X, _, H = planted(n=1500, seed=1)
    a = nmf(X.astype(np.float32), 4, init="random", random_state=3, max_iter=600)
    b = nmf(X.astype(np.float32), 4, init="random", random_state=3, max_iter=600)
    np.testing.assert_array_equal(a.components, b.components)
    assert matched_cosine(H, a.components)[0].min() >= 0.99


def test_stability_is_one_for_a_well_separated_planted_problem():
    X, _, _ = planted(n=1500, seed=2)
    s = stability("nmf", X, 4, seeds=(0, 1, 2), max_iter=600)
    assert s.pairwise.shape == (3, 3) and s.per_component.shape == (4,)
    assert s.mean >= 0.999 and s.min >= 0.99


def test_negative_layer_names_its_minimum_and_offers_shift_or_semi_nmf():
    X, _, _ = planted(n=200, seed=3)
    X[5, 7] = -0.5
    for A in (X, da.from_array(X, chunks=(50, -1))):
        for solver in ("hals", "minibatch"):
            with pytest.raises(ZooauditError, match=r"layer 'mlp.3' has minimum -0.5") as err:
                nmf(A, 2, solver=solver, name="mlp.3")
            assert "semi_nmf" in str(err.value) and "Shift" in str(err.value)


def test_nan_and_rank_and_device_errors():
    X, _, _ = planted(n=200, seed=4)
    bad = X.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ZooauditError, match=r"'L' contains NaN"):
        nmf(da.from_array(bad, chunks=(50, -1)), 2, solver="minibatch", name="L")
    low = np.random.default_rng(0).random((100, 2)) @ np.random.default_rng(1).random((2, 30))
    with pytest.raises(ZooauditError, match=r"'L'.*numerical rank 2.*k must be ≤ 2"):
        nmf(low, 3, name="L")
    with pytest.raises(ZooauditError, match=r"Device 'cuda:7' requested for layer 'L' but .*Allowed here: cpu, auto, None \(the CPU\)"):
        nmf(X, 2, device="cuda:7", name="L")
    with pytest.raises(ZooauditError, match="Allowed: auto, hals, minibatch, sklearn"):
        nmf(X, 2, solver="mu", name="L")


def test_semi_nmf_recovers_signed_planted_components():
    X, _, H = planted(n=2000, d=30, signed=True, density=0.3, noise=1e-2)
    f = semi_nmf(X, 4, random_state=0)
    assert f.params["update"] == "mu"
    assert matched_cosine(H, f.components)[0].min() >= 0.95
    assert (f.codes >= 0).all() and (f.components < 0).any()
    assert f.metrics["explained_variance"] > 0.999
    mb = semi_nmf(da.from_array(X, chunks=(400, -1)), 4, solver="minibatch", random_state=0)
    assert matched_cosine(H, mb.components)[0].min() >= 0.95
    assert mb.metrics["explained_variance"] == pytest.approx(f.metrics["explained_variance"], abs=1e-4)


def test_dff_heat_maps_are_codes_per_image():
    rng = np.random.default_rng(6)
    n, c, h, w, k = 6, 10, 5, 7, 3
    concepts = rng.random((k, c)) ** 3
    masks = rng.random((n, k, h, w)) * (rng.random((n, k, h, w)) < 0.4)
    acts = np.einsum("nkyx,kc->ncyx", masks, concepts)
    for A in (acts, da.from_array(acts, chunks=(2, -1, -1, -1))):
        f = dff(A, k, random_state=0, max_iter=1000)
        assert f.method == "dff" and f.maps.shape == (n, k, h, w)
        assert f.codes.shape == (n * h * w, k) and f.components.shape == (k, c)
        i, y, x = 4, 2, 5
        np.testing.assert_allclose(f.maps[i, :, y, x], f.codes[(i * h + y) * w + x])
        assert matched_cosine(concepts, f.components)[0].min() >= 0.99
    ds = f.to_dataset(np.arange(n))
    assert ds["heatmaps"].dims == ("sample", "component", "y", "x")
    with pytest.raises(ZooauditError, match=r"\(N, C, H, W\)"):
        dff(acts[0], 2, name="conv1")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_metrics_from_factors_equal_the_streamed_reconstruction_pass(dtype):
    """In-memory NMF / semi-NMF take their metrics from the factors (trace identity); they must
    equal the generic pass that forms every reconstruction, for the same codes."""
    from zooaudit.analysis.quality import finish

    X = planted(n=2500, d=30, k=5, seed=3, noise=0.05)[0].astype(dtype) + 0.3  # offset: tests the centring
    rms = np.sqrt(((X - X.mean(0)) ** 2).sum() / len(X))
    for fit in (nmf(X, 5, max_iter=40), semi_nmf(X - 0.5, 5, max_iter=40)):
        Y = X if fit.method == "nmf" else X - 0.5
        ref = finish(fit.method, Y, fit.components, np.zeros(30), lambda s, e, x, c=fit.codes: c[s:e], codes="numpy",
                     rms=rms, extra={}, params={})
        rtol = 1e-5 if dtype == np.float32 else 1e-10
        for m in ("explained_variance", "reconstruction_mse", "mean_cosine"):
            assert fit.metrics[m] == pytest.approx(ref.metrics[m], rel=rtol), m
        assert 0.5 < fit.metrics["explained_variance"] < 1
        assert fit.metrics["l0"] == ref.metrics["l0"] and fit.metrics["dead_components"] == ref.metrics["dead_components"]


def test_data_products_are_one_fixed_layout_bitwise_reproducible():
    """The layouts of the two products are a few ulps apart at these shapes (checked here, so
    the test can fail), so the layout must be a fixed rule: the same call gives the same bits
    every time, on one thread and on two (a resumed audit reproduces the committed codes)."""
    import torch

    from zooaudit.analysis.nmf import data_products

    g = torch.Generator().manual_seed(0)
    X = torch.rand(40, 32, generator=g)
    H, Wt = torch.rand(8, 32, generator=g), torch.rand(8, 40, generator=g)
    assert not torch.equal((X @ H.T).T, (X.T.contiguous().T @ H.T).T)  # layouts differ in the bits
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 1, 2):
            torch.set_num_threads(threads)
            rhs_w, rhs_h = data_products(X)
            outs.append((rhs_w(H), rhs_h(Wt)))
    finally:
        torch.set_num_threads(before)
    for w, h in outs[1:]:
        assert torch.equal(w, outs[0][0]) and torch.equal(h, outs[0][1])
    torch.testing.assert_close(outs[0][0], H @ X.T, rtol=1e-5, atol=1e-5)  # and they are the products
    torch.testing.assert_close(outs[0][1], Wt @ X, rtol=1e-5, atol=1e-5)
    assert outs[0][0].is_contiguous() and outs[0][1].is_contiguous()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_hals_sweep_equals_scikit_learn_cd_kernel_serial_and_column_split(dtype, monkeypatch):
    """One W sweep (with a dead component) against scikit-learn's own Cython update
    (``_update_cdnmf_fast``): same updated codes, same violation; on one torch thread and
    with the columns split over two threads."""
    import torch
    from sklearn.decomposition._cdnmf_fast import _update_cdnmf_fast

    from zooaudit.analysis import nmf as nmf_mod

    rng = np.random.default_rng(7)
    n, d, k = 900, 30, 6
    X = rng.random((n, d)).astype(dtype)
    H = rng.random((k, d)).astype(dtype)
    H[2] = 0  # S_tt = 0: skipped, zero gradient
    W = (rng.random((n, k)) * (rng.random((n, k)) < 0.5)).astype(dtype)
    W_ref = W.copy()
    v_ref = _update_cdnmf_fast(W_ref, H @ H.T, X @ H.T, np.arange(k))
    rtol = 1e-12 if dtype == np.float64 else 1e-5
    monkeypatch.setattr(nmf_mod, "PARALLEL_COLUMNS", 100)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            Wt = torch.from_numpy(np.ascontiguousarray(W.T))
            v = nmf_mod.hals_rows(Wt, torch.from_numpy(np.ascontiguousarray((X @ H.T).T)), torch.from_numpy(H @ H.T))
            assert torch.get_num_threads() == threads  # restored after the sweep
            assert float(v) == pytest.approx(v_ref, rel=rtol)
            np.testing.assert_allclose(Wt.numpy().T, W_ref, rtol=rtol, atol=rtol * W_ref.max())
    finally:
        torch.set_num_threads(before)
