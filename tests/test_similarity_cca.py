"""CCA, SVCCA, PWCCA and shape metrics (Procrustes, partial whitening)."""

import warnings

import dask.array as da
import numpy as np
import pytest
from scipy.linalg import fractional_matrix_power, orthogonal_procrustes
from scipy.stats import ortho_group

from zooaudit.analysis.similarity import (
    DegenerateCCAWarning,
    UndefinedSimilarityWarning,
    cca,
    procrustes,
    pwcca,
    shape_distance,
    svcca,
)
from zooaudit.errors import ZooauditError


def qr_cca(x, y):
    """Independent reference (Björck & Golub 1973): SVD of Q_xᵀ Q_y from QRs of the centred data.

    Returns correlations and the canonical variates of X (unit-norm columns, n × k).
    """
    qx, _ = np.linalg.qr(x - x.mean(0))
    qy, _ = np.linalg.qr(y - y.mean(0))
    u, rho, _ = np.linalg.svd(qx.T @ qy, full_matrices=False)
    return rho, qx @ u


def ref_pwcca(x, y):
    rho, h = qr_cca(x, y)
    xc = x - x.mean(0)
    alpha = np.abs(h.T @ xc).sum(axis=1)          # Σ_j |⟨h_i, x̃_j⟩|
    return float(np.sum(alpha / alpha.sum() * rho))


def ref_svcca(x, y, keep):
    def reduce(a):
        ac = a - a.mean(0)
        _, s, vt = np.linalg.svd(ac, full_matrices=False)
        frac = np.cumsum(s ** 2) / np.sum(s ** 2)
        k = int(np.argmax(frac >= keep - 1e-12)) + 1
        return ac @ vt[:k].T
    return float(qr_cca(reduce(x), reduce(y))[0].mean())


def ref_shape(x, y, alpha):
    """Partial whitening in sample space, zero padding, then the best rotation (scipy)."""
    def phi(a):
        ac = a - a.mean(0)
        cov = ac.T @ ac / len(a)
        return ac @ (alpha * np.eye(a.shape[1]) + (1 - alpha) * np.real(fractional_matrix_power(cov, -0.5)))
    fx, fy = phi(x), phi(y)
    width = max(fx.shape[1], fy.shape[1])
    fx = np.pad(fx, ((0, 0), (0, width - fx.shape[1])))
    fy = np.pad(fy, ((0, 0), (0, width - fy.shape[1])))
    fx, fy = fx / np.linalg.norm(fx), fy / np.linalg.norm(fy)
    r, _ = orthogonal_procrustes(fx, fy)
    return float(np.arccos(np.clip(np.sum((fx @ r) * fy), -1, 1)))


@pytest.fixture(scope="module")
def xy():
    rng = np.random.default_rng(20)
    x = rng.normal(size=(250, 8)) @ rng.normal(size=(8, 8))
    y = np.tanh(x[:, :5] @ rng.normal(size=(5, 6)) / 3) + 0.4 * rng.normal(size=(250, 6))
    return x, y


def test_cca_matches_qr_reference_descending(xy):
    x, y = xy
    rho = cca(x, y)
    assert rho.shape == (6,)
    assert np.all(np.diff(rho) <= 0) and np.all((rho >= 0) & (rho <= 1))
    np.testing.assert_allclose(rho, qr_cca(x, y)[0], atol=1e-10)
    np.testing.assert_allclose(cca(y, x), rho, atol=1e-10)


def test_cca_invariant_to_invertible_linear_maps_and_streams(xy):
    x, y = xy
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(8, 8)), rng.normal(size=(6, 6))
    base = cca(x, y)
    np.testing.assert_allclose(cca(x @ a + 3.0, y @ b - 100.0), base, atol=1e-8)
    np.testing.assert_allclose(cca(da.from_array(x, chunks=(37, 3)), da.from_array(y, chunks=(41, -1))), base,
                               atol=1e-10)
    x32, y32 = (x + 100).astype(np.float32), (y + 100).astype(np.float32)
    np.testing.assert_allclose(cca(x32, y32), base, atol=1e-6)


def test_cca_saturates_when_features_reach_n_minus_1():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(30, 29)), rng.normal(size=(30, 5))
    with pytest.warns(DegenerateCCAWarning, match="n − 1"):
        rho = cca(x, y)
    np.testing.assert_allclose(rho, 1.0, atol=1e-8)
    with pytest.warns(DegenerateCCAWarning):
        rho = cca(rng.normal(size=(30, 40)), y)         # p > n: rank-deficient, still all 1
    np.testing.assert_allclose(rho, 1.0, atol=1e-8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cca(x[:, :20], y)                               # p < n − 1: no warning


def test_svcca_matches_reference(xy):
    x, y = xy
    for keep in (0.5, 0.9, 0.99, 1.0):
        assert svcca(x, y, keep_variance=keep) == pytest.approx(ref_svcca(x, y, keep), abs=1e-10)
    assert svcca(x, y, keep_variance=1.0) == pytest.approx(cca(x, y).mean(), abs=1e-10)
    assert svcca(x, x) == pytest.approx(1.0, abs=1e-10)
    assert svcca(y, x) == pytest.approx(svcca(x, y), abs=1e-10)


def test_pwcca_paper_definition_and_asymmetry(xy):
    x, y = xy
    assert pwcca(x, y) == pytest.approx(ref_pwcca(x, y), abs=1e-10)
    assert pwcca(y, x) == pytest.approx(ref_pwcca(y, x), abs=1e-10)
    assert abs(pwcca(x, y) - pwcca(y, x)) > 1e-4        # weights come from the first argument
    assert pwcca(x, x) == pytest.approx(1.0, abs=1e-10)
    assert 0 <= pwcca(x, y) <= 1


def test_procrustes_matches_scipy_and_properties(xy):
    x, y = xy
    d = procrustes(x, y)
    assert d == pytest.approx(ref_shape(x, y, 1.0), abs=1e-10)     # also exercises zero padding (8 vs 6)
    assert procrustes(y, x) == pytest.approx(d, abs=1e-12)
    assert procrustes(x, x) == pytest.approx(0.0, abs=1e-7)
    q = ortho_group.rvs(8, random_state=4)
    assert procrustes(2.5 * x @ q + 9.0, y) == pytest.approx(d, abs=1e-10)
    assert 0 <= d <= np.pi / 2
    assert shape_distance(x, y, alpha=1.0) == pytest.approx(d, abs=1e-10)
    assert procrustes(da.from_array(x, chunks=(19, -1)), y) == pytest.approx(d, abs=1e-10)


def test_procrustes_triangle_inequality():
    rng = np.random.default_rng(6)
    for trial in range(20):
        widths = rng.integers(2, 7, size=3)
        a, b, c = (rng.normal(size=(40, w)) @ rng.normal(size=(w, w)) for w in widths)
        if trial % 2:                                           # correlated triples too
            b = np.pad(a, ((0, 0), (0, 3)))[:, :widths[1]] + 0.3 * b
        for alpha in (1.0, 0.5, 0.0):
            dab, dbc, dac = (shape_distance(u, v, alpha=alpha) for u, v in ((a, b), (b, c), (a, c)))
            assert dac <= dab + dbc + 1e-9


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.8])
def test_partial_whitening_matches_sample_space_reference(xy, alpha):
    x, y = xy
    assert shape_distance(x, y, alpha=alpha) == pytest.approx(ref_shape(x, y, alpha), abs=1e-8)


def test_full_whitening_is_mean_canonical_correlation(xy):
    x, _ = xy
    rng = np.random.default_rng(9)
    z = np.tanh(x @ rng.normal(size=(8, 8)) / 4) + 0.5 * rng.normal(size=(250, 8))
    assert shape_distance(x, z, alpha=0.0) == pytest.approx(np.arccos(cca(x, z).mean()), abs=1e-10)


def test_zero_variance_and_bad_parameters(xy):
    x, _ = xy
    dead = np.zeros((250, 3))
    for fn in (svcca, pwcca, procrustes, shape_distance):
        with pytest.warns(UndefinedSimilarityWarning):
            assert np.isnan(fn(x, dead))
    with pytest.warns(UndefinedSimilarityWarning):
        assert np.isnan(cca(x, dead)).all()
    with pytest.raises(ZooauditError, match="keep_variance"):
        svcca(x, x, keep_variance=0.0)
    with pytest.raises(ZooauditError, match="alpha"):
        shape_distance(x, x, alpha=1.5)
