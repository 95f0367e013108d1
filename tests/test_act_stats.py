"""Activation statistics against in-memory NumPy computations of their definitions, on random
and planted data: dead / always-active units, a planted massive unit, spectra with known
effective rank, neural collapse on a simplex ETF; streamed in blocks equals one block."""

import numpy as np
import pytest

from zooaudit.analysis.act_stats import ActivationStats, spectrum_route, spectrum_stats
from zooaudit.analysis.neural_collapse import ClassScatter, nc_metrics, ncc_agreement, nearest_centre
from zooaudit.errors import ZooauditError


def streamed(X, block=37, groups=None, **kw):
    acc = ActivationStats(X.shape[1], groups=None if groups is None else {a: int(g.max()) + 1 for a, g in
                                                                          groups.items()}, **kw)
    for s in range(0, len(X), block):
        acc.update(X[s:s + block], s, None if groups is None else {a: g[s:s + block] for a, g in groups.items()})
    return acc


def relu_data(n=300, p=24, seed=0):
    rng = np.random.default_rng(seed)
    X = np.maximum(rng.normal(size=(n, p)) + rng.normal(size=p), 0.0)
    X[:, [2, 7]] = 0.0                      # dead
    X[:, 5] = rng.random(n) + 0.5           # always active
    return X


def test_sparsity_equals_definition():
    X = relu_data()
    eps = 0.1
    r = streamed(X, eps=eps).result()
    active = np.abs(X) > eps
    np.testing.assert_array_equal(r["sample_active_fraction"], active.mean(axis=1))
    np.testing.assert_array_equal(r["unit_active_fraction"], active.mean(axis=0))
    assert r["activation_ratio"] == pytest.approx(active.mean(), abs=1e-15)
    assert r["sample_fraction_median"] == np.median(active.mean(axis=1))
    assert r["sample_fraction_p10"] == np.quantile(active.mean(axis=1), 0.1)
    assert r["dead_fraction"] == (~active.any(axis=0)).mean()
    assert r["always_active_fraction"] == active.all(axis=0).mean()


def test_planted_dead_and_always_active_recovered_exactly():
    r = streamed(relu_data(), eps=0.0).result()
    assert r["dead_fraction"] == 2 / 24
    assert set(np.flatnonzero(r["unit_active_fraction"] == 0)) == {2, 7}
    assert 5 in set(np.flatnonzero(r["unit_active_fraction"] == 1))


def test_per_group_activity():
    X = relu_data()
    g = np.random.default_rng(3).integers(0, 2, len(X))
    h = np.arange(len(X)) % 3
    r = streamed(X, groups={"g": g, "h": h}, eps=0.0).result()
    for attr, codes in (("g", g), ("h", h)):
        for code in range(codes.max() + 1):
            np.testing.assert_array_equal(r["group_unit_active_fraction"][attr][code],
                                          (X[codes == code] > 0).mean(axis=0))
            assert r["group_n"][attr][code] == (codes == code).sum()


def test_planted_massive_activation_recovered_and_flagged():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(500, 32)).astype(np.float32)
    X[17, 3] = -5000.0                      # Sun et al.: > 100 and > 1000 × median |a| (≈ 0.67)
    X[400, 9] = 60.0                        # large, but below the absolute threshold
    r = streamed(X, top_k=5).result()
    assert (r["top_row"][0], r["top_unit"][0], r["top_value"][0]) == (17, 3, 5000.0)
    assert list(r["top_massive"]) == [True, False, False, False, False]
    assert (r["top_row"][1], r["top_unit"][1]) == (400, 9)
    assert r["n_massive_units"] == 1
    X[:6, 20] = 3000.0                      # a second massive unit, only partly in the top 5
    r = streamed(X, top_k=5).result()
    assert r["n_massive_units"] == 2 and r["top_massive"].sum() == 5
    med = np.median(np.abs(X))
    assert r["median_abs_lo"] <= med <= r["median_abs_hi"]
    assert r["median_abs_hi"] / r["median_abs_lo"] <= 1 + 2 ** -6 + 1e-12
    assert r["max_to_median"] == pytest.approx(5000 / med, rel=0.016)
    # no planted spike: nothing flagged
    assert not streamed(rng.normal(size=(200, 8)), top_k=4).result()["top_massive"].any()


def test_top_k_and_unit_max_equal_sorting_everything():
    X = np.random.default_rng(2).standard_t(3, size=(211, 13))
    r = streamed(X, top_k=20, block=50).result()
    flat = np.abs(X).ravel()
    order = np.argsort(-flat, kind="stable")[:20]
    np.testing.assert_array_equal(r["top_value"], flat[order])
    np.testing.assert_array_equal(r["top_row"] * 13 + r["top_unit"], order)
    np.testing.assert_array_equal(r["unit_max_abs"], np.abs(X).max(axis=0))


def test_median_bounds_contain_exact_median_even_and_odd():
    rng = np.random.default_rng(4)
    for n in (10, 11):
        X = rng.lognormal(size=(n, 7)).astype(np.float32)
        lo, hi = streamed(X, block=3).median_bounds()
        assert lo <= np.median(np.abs(X)) <= hi


def reference_spectrum(X):
    Xc = X - X.mean(axis=0)
    sigma = np.linalg.svd(Xc, compute_uv=False)
    lam = sigma ** 2 / len(X)
    q = sigma / sigma.sum()
    q = q[q > 0]
    return {"effective_rank": np.exp(-(q * np.log(q)).sum()), "participation_ratio": lam.sum() ** 2 / (lam ** 2).sum(),
            "stable_rank": lam.sum() / lam.max(), "variance_top_1": lam[0] / lam.sum(),
            "variance_top_10": lam[:10].sum() / lam.sum()}, lam


def test_spectrum_equals_svd_of_centred_data_offset_by_100():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(400, 30)) @ rng.normal(size=(30, 30)) * np.linspace(0.1, 3, 30) + 100.0
    r = streamed(X, block=64).result()
    ref, lam = reference_spectrum(X)
    np.testing.assert_allclose(r["eigenvalues"], lam, rtol=1e-10, atol=1e-10 * lam.max())
    for k, v in ref.items():
        assert r[k] == pytest.approx(v, rel=1e-10), k
    assert r["variance_top_100"] == pytest.approx(1.0)


def test_gram_route_equals_covariance_route_and_svd():
    # n < p: the (n, n) centred Gram gives the covariance's nonzero eigenvalues, the rest are 0
    rng = np.random.default_rng(8)
    X = (rng.normal(size=(40, 12)) @ rng.normal(size=(12, 90)) + rng.normal(size=(40, 90)) * 0.1 + 50.0).astype(np.float32)
    gram, cov = streamed(X, block=9, gram_rows=len(X)).result(), streamed(X, block=9).result()
    assert gram["eigenvalues"].shape == cov["eigenvalues"].shape == (90,)
    np.testing.assert_allclose(gram["eigenvalues"], cov["eigenvalues"], rtol=0, atol=1e-9 * cov["eigenvalues"][0])
    _, lam = reference_spectrum(X.astype(np.float64))
    np.testing.assert_allclose(gram["eigenvalues"][:40], lam, rtol=1e-9, atol=1e-10 * lam[0])
    assert np.all(gram["eigenvalues"][39:] <= 1e-10 * lam[0])   # rank ≤ n − 1 after centring
    for k in ("effective_rank", "participation_ratio", "stable_rank", "variance_top_10"):
        assert gram[k] == pytest.approx(cov[k], rel=1e-7), k
    assert gram["activation_ratio"] == cov["activation_ratio"]


def test_gram_route_chosen_and_refused():
    assert spectrum_route(100, 64, 4096)[0] == "covariance"
    # within max_spectrum_width, a wide layer on few rows takes the (same, cheaper) Gram route
    assert spectrum_route(40, 4096, 4096)[0] == "gram" and "cheaper" in spectrum_route(40, 4096, 4096)[1]
    assert spectrum_route(3000, 4096, 4096)[0] == "covariance"        # more than half as many rows
    assert spectrum_route(100, 1000, 4096)[0] == "covariance"         # narrower than GRAM_MIN_WIDTH
    # too many rows for a cheap n×n eigh (the cap max_spectrum_width stands for): skipped, said why
    route, why = spectrum_route(16_384, 16_385, 4096, budget=2**40)
    assert route is None and "4096" in why and "rows" in why
    route, why = spectrum_route(100, 8192, 4096)
    assert route == "gram" and "100×100 Gram" in why
    assert spectrum_route(10_000, 8192, 4096)[0] is None            # n ≥ p: no smaller Gram
    assert "GiB" in spectrum_route(1000, 8192, 4096, budget=1000 * 8192 * 8 - 1)[1]
    assert spectrum_route(10, 8192, 0)[0] is None
    acc = ActivationStats(5, gram_rows=4)
    with pytest.raises(ZooauditError, match="gram_rows"):
        acc.update(np.ones((6, 5)), 0)
    acc = ActivationStats(5, gram_rows=4).update(np.ones((3, 5)), 0)
    with pytest.raises(ZooauditError, match="saw 3 rows"):
        acc.eigenvalues()


def test_spectrum_known_values():
    s = spectrum_stats(np.ones(16))
    assert s["effective_rank"] == pytest.approx(16) and s["participation_ratio"] == pytest.approx(16)
    assert s["stable_rank"] == pytest.approx(16) and s["variance_top_1"] == pytest.approx(1 / 16)
    one = spectrum_stats(np.r_[4.0, np.zeros(9)])
    assert one["effective_rank"] == pytest.approx(1) and one["stable_rank"] == 1 and one["variance_top_10"] == 1
    assert np.isnan(spectrum_stats(np.zeros(3))["effective_rank"])


def test_streamed_equals_one_block():
    X = relu_data(seed=6) * 3 - 1
    a, b = streamed(X, block=19).result(), streamed(X, block=len(X)).result()
    for key in ("activation_ratio", "dead_fraction", "effective_rank", "participation_ratio", "stable_rank",
                "median_abs"):
        assert a[key] == pytest.approx(b[key], rel=1e-10, abs=1e-12), key
    np.testing.assert_allclose(a["eigenvalues"], b["eigenvalues"], rtol=1e-10, atol=1e-12)


def test_nonfinite_and_empty_refused():
    X = np.ones((5, 3))
    X[2, 1] = np.nan
    with pytest.raises(ZooauditError, match=r"NaN or Inf activations \(1 values so far\)"):
        streamed(X).result()
    with pytest.raises(ZooauditError, match="no samples"):
        ActivationStats(3).result()
    with pytest.raises(ZooauditError, match="eps"):
        ActivationStats(3, eps=-1)


# -- neural collapse --------------------------------------------------------------------


def scatter(X, y, C, block=23):
    acc = ClassScatter(X.shape[1], C)
    for s in range(0, len(X), block):
        acc.update(X[s:s + block], y[s:s + block])
    return acc


def reference_nc(X, y, C, W=None):
    mu_g = X.mean(axis=0)
    means = np.stack([X[y == c].mean(axis=0) for c in range(C)])
    Sw = sum((X[y == c] - means[c]).T @ (X[y == c] - means[c]) for c in range(C)) / len(X)
    M = means - mu_g
    Sb = M.T @ M / C
    nc1 = np.trace(Sw @ np.linalg.pinv(Sb, rcond=1e-10, hermitian=True)) / C
    norms = np.linalg.norm(M, axis=1)
    cos = (M @ M.T) / np.outer(norms, norms)
    iu = ~np.eye(C, dtype=bool)
    out = {"nc1": nc1, "nc2_equinorm": norms.std(ddof=1) / norms.mean(),
           "nc2_equiangular": np.abs(cos[iu] + 1 / (C - 1)).mean()}
    if W is not None:
        out["nc3"] = np.linalg.norm(W / np.linalg.norm(W) - M / np.linalg.norm(M))
    return out, means


def labelled(n=360, p=12, C=4, seed=7, offset=50.0, spread=1.0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, n)
    centres = rng.normal(size=(C, p)) * 3
    return centres[y] + spread * rng.normal(size=(n, p)) + offset, y


def test_nc_equals_definition_on_random_imbalanced_data():
    X, y = labelled()
    y[y == 3] = np.where(np.arange((y == 3).sum()) % 3 == 0, 3, 0)   # imbalance
    W = np.random.default_rng(8).normal(size=(4, 12))
    got = nc_metrics(scatter(X, y, 4), classifier=W)
    ref, _ = reference_nc(X, y, 4, W)
    for k, v in ref.items():
        assert got[k] == pytest.approx(v, rel=1e-10), k


def test_nc_streamed_equals_one_block():
    X, y = labelled(seed=9)
    a, b = nc_metrics(scatter(X, y, 4, block=11)), nc_metrics(scatter(X, y, 4, block=len(X)))
    for k in ("nc1", "nc2_equinorm", "nc2_equiangular"):
        assert a[k] == pytest.approx(b[k], rel=1e-10)


def simplex_etf(C, p, rng):
    """C unit-norm class means with pairwise cosine −1/(C−1), in a random C-dim subspace of R^p."""
    E = np.eye(C) - 1.0 / C
    U, _ = np.linalg.qr(rng.normal(size=(p, C)))
    M = E @ U.T
    return M / np.linalg.norm(M, axis=1, keepdims=True)


def test_simplex_etf_gives_nc2_zero_and_collapsed_nc1_zero():
    rng = np.random.default_rng(10)
    C, p = 5, 16
    M = simplex_etf(C, p, rng) * 4 + 7.0                     # shifted: μ_G = 7
    noise = rng.normal(size=(20, p))
    X = np.concatenate([M[c] + s * noise for c in range(C) for s in (1, -1)])   # ± pairs: exact class means
    y = np.repeat(np.arange(C), 40)
    got = nc_metrics(scatter(X, y, C), classifier=(M - 7.0) * 2.5)
    assert got["nc2_equinorm"] == pytest.approx(0, abs=1e-12)
    assert got["nc2_equiangular"] == pytest.approx(0, abs=1e-12)
    assert got["nc3"] == pytest.approx(0, abs=1e-12)
    collapsed = nc_metrics(scatter(np.repeat(M, 8, axis=0), np.repeat(np.arange(C), 8), C))
    assert collapsed["nc1"] == pytest.approx(0, abs=1e-20)
    # random means: NC2 far from 0, and NC1 grows with the within-class spread
    Xr, yr = labelled(spread=0.5)
    Xs, ys = labelled(spread=2.0)
    assert nc_metrics(scatter(Xr, yr, 4))["nc2_equiangular"] > 0.05
    assert nc_metrics(scatter(Xs, ys, 4))["nc1"] > 4 * nc_metrics(scatter(Xr, yr, 4))["nc1"]


def test_nc4_equals_brute_force_nearest_centre():
    X, y = labelled(spread=3.0)
    acc = scatter(X, y, 4)
    pred = np.random.default_rng(11).integers(0, 4, len(X))
    _, means = reference_nc(X, y, 4)
    d = ((X[:, None, :] - means[None]) ** 2).sum(axis=2)
    np.testing.assert_array_equal(nearest_centre(X, acc.mean), d.argmin(axis=1))
    assert ncc_agreement(X, acc, pred) == (d.argmin(axis=1) == pred).mean()
    assert ncc_agreement(X, acc, d.argmin(axis=1)) == 1.0


def test_nc_bad_input():
    with pytest.raises(ZooauditError, match="at least as many samples as classes"):
        nc_metrics(scatter(np.ones((3, 2)), np.array([0, 1, 2]), 10))
    with pytest.raises(ZooauditError, match="at least two classes"):
        nc_metrics(scatter(np.ones((4, 2)), np.zeros(4, int), 1))
    with pytest.raises(ZooauditError, match=r"must lie in \[0, 2\)"):
        ClassScatter(2, 2).update(np.ones((2, 2)), np.array([0, 5]))
    X, y = labelled()
    with pytest.raises(ZooauditError, match="NC3 needs"):
        nc_metrics(scatter(X, y, 4), classifier=np.ones((4, 3)))


def test_mostly_zero_layer_has_median_zero_and_infinite_ratio():
    X = np.zeros((50, 4))
    X[:10] = 1.0
    X[3, 2] = 500.0
    r = streamed(X, top_k=2).result()
    assert r["median_abs"] == 0.0 == np.median(np.abs(X))
    assert r["max_to_median"] == np.inf and list(r["top_massive"]) == [True, False]


def test_torch_covariance_backend_equals_numpy():
    import torch

    X = relu_data(seed=12) + 10.0
    a = streamed(X, block=50).result()
    acc = ActivationStats(X.shape[1], device=torch.device("cpu"))
    for s in range(0, len(X), 50):
        acc.update(X[s:s + 50], s)
    b = acc.result()
    np.testing.assert_allclose(b["eigenvalues"], a["eigenvalues"], rtol=1e-10, atol=1e-12)
    assert b["effective_rank"] == pytest.approx(a["effective_rank"], rel=1e-10)
