"""RSA (blockwise RDMs), mutual k-NN alignment and neuron matching."""

import itertools

import dask.array as da
import numpy as np
import pytest
from scipy.spatial.distance import pdist
from scipy.stats import spearmanr
from sklearn.neighbors import NearestNeighbors

from zooaudit.analysis import sim_rsa, sim_units
from zooaudit.analysis.similarity import (
    NeuronMatch,
    UndefinedSimilarityWarning,
    knn_indices,
    match_neurons,
    mutual_knn,
    rdm,
    rsa,
)
from zooaudit.errors import ZooauditError


@pytest.fixture(scope="module")
def xy():
    rng = np.random.default_rng(30)
    x = rng.normal(size=(90, 10))
    y = np.tanh(x[:, :6] @ rng.normal(size=(6, 7))) + 0.5 * rng.normal(size=(90, 7))
    return x, y


@pytest.fixture
def tiny_blocks(monkeypatch):
    monkeypatch.setattr(sim_rsa, "BLOCK_BYTES", 8 * 90 * 7)     # 7 rows per block
    monkeypatch.setattr(sim_units, "BLOCK_BYTES", 8 * 90 * 11)


def brute_tau_a(a, b):
    m = len(a)
    s = sum(np.sign(a[i] - a[j]) * np.sign(b[i] - b[j]) for i, j in itertools.combinations(range(m), 2))
    return s / (m * (m - 1) / 2)


@pytest.mark.parametrize("kind, scipy_metric", [("correlation", "correlation"), ("euclidean", "euclidean"),
                                                ("sqeuclidean", "sqeuclidean")])
def test_blockwise_rdm_matches_pdist(xy, tiny_blocks, kind, scipy_metric):
    x, _ = xy
    np.testing.assert_allclose(rdm(x, kind=kind), pdist(x, scipy_metric), atol=1e-10)
    np.testing.assert_allclose(rdm(da.from_array(x, chunks=(13, -1)), kind=kind), pdist(x, scipy_metric),
                               atol=1e-10)


def test_rsa_spearman_matches_scipy(xy, tiny_blocks):
    x, y = xy
    for kind in ("correlation", "euclidean"):
        ref = spearmanr(pdist(x, kind), pdist(y, kind)).statistic
        assert rsa(x, y, rdm=kind) == pytest.approx(ref, abs=1e-12)
    assert rsa(x, y, rdm="euclidean") == pytest.approx(rsa(x, y, rdm="sqeuclidean"), abs=1e-12)
    assert rsa(x, x) == pytest.approx(1.0, abs=1e-12)
    assert rsa(y, x) == pytest.approx(rsa(x, y), abs=1e-12)


def test_rsa_kendall_is_tau_a():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(12, 4)), rng.normal(size=(12, 3))
    y = np.round(y, 1)                     # coarse values: the RDM has ties, where τ-a ≠ τ-b
    dx, dy = pdist(x, "euclidean"), np.round(pdist(y, "euclidean"), 1)
    assert len(np.unique(dy)) < len(dy)
    # feed the tied RDM through the library's comparison via the same rounding of distances
    got = sim_rsa._tau_a(dx, dy)
    assert got == pytest.approx(brute_tau_a(dx, dy), abs=1e-12)
    assert rsa(x, y, rdm="euclidean", compare="kendall") == pytest.approx(
        brute_tau_a(dx, pdist(y, "euclidean")), abs=1e-12)


def test_rsa_invariances(xy):
    x, y = xy
    rng = np.random.default_rng(2)
    q, _ = np.linalg.qr(rng.normal(size=(10, 10)))
    base = rsa(x, y, rdm="euclidean")
    assert rsa(3 * x @ q + 1, y, rdm="euclidean") == pytest.approx(base, abs=1e-12)
    base_c = rsa(x, y)
    assert rsa(2 * x + 5, y) == pytest.approx(base_c, abs=1e-12)   # correlation RDM: per-sample affine


def test_rsa_degenerate_inputs(xy):
    x, _ = xy
    with pytest.warns(UndefinedSimilarityWarning, match="RDM"):
        assert np.isnan(rsa(x, np.ones((90, 3)), rdm="euclidean"))
    row_const = x.copy()
    row_const[5] = 2.0                      # one sample constant across features
    with pytest.warns(UndefinedSimilarityWarning, match="correlation 0"):
        d = rdm(row_const)
    assert np.all(d[np.arange(5) * 90 - np.arange(5) * np.arange(1, 6) // 2 + 4 - np.arange(5)] == 1.0)


def test_mutual_knn_matches_sklearn(xy, tiny_blocks):
    x, y = xy
    k = 7

    def sk(a):
        a = a / np.linalg.norm(a, axis=1, keepdims=True)
        return NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(a).kneighbors(
            return_distance=False)

    a, b = sk(x), sk(y)
    assert np.array_equal(np.sort(knn_indices(x, k), axis=1), np.sort(a, axis=1))
    ref = np.mean([len(set(a[i]) & set(b[i])) / k for i in range(len(x))])
    assert mutual_knn(x, y, k=k) == pytest.approx(ref, abs=1e-12)
    assert mutual_knn(da.from_array(x, chunks=(17, -1)), y, k=k) == pytest.approx(ref, abs=1e-12)
    assert mutual_knn(x, x, k=k) == 1.0
    assert mutual_knn(y, x, k=k) == pytest.approx(mutual_knn(x, y, k=k), abs=1e-12)


def test_mutual_knn_chance_level():
    rng = np.random.default_rng(3)
    n, k = 600, 10
    vals = [mutual_knn(rng.normal(size=(n, 16)), rng.normal(size=(n, 16)), k=k) for _ in range(3)]
    assert np.mean(vals) == pytest.approx(k / (n - 1), rel=0.25)
    # invariant to per-sample positive scaling (rows are L2-normalised) and rotations
    x = rng.normal(size=(200, 5))
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    assert mutual_knn(x, x * rng.uniform(0.5, 2, size=(200, 1)) @ q, k=5) == 1.0


def test_mutual_knn_k_bounds(xy):
    x, y = xy
    assert 0 <= mutual_knn(x, y, k=89) <= 1            # k = n − 1: every other sample
    assert mutual_knn(x, y, k=89) == 1.0
    for bad in (90, 0, 2.5):
        with pytest.raises(ZooauditError, match="k"):
            mutual_knn(x, y, k=bad)


def test_match_neurons_recovers_permutation(xy):
    x, _ = xy
    rng = np.random.default_rng(4)
    perm = rng.permutation(10)
    y = x[:, perm] * rng.uniform(0.5, 3, size=10) + rng.normal(size=10)    # units rescaled and shifted
    m = match_neurons(x, y)
    assert isinstance(m, NeuronMatch)
    assert np.array_equal(m.permutation, np.argsort(perm))
    aligned = y[:, m.permutation]                      # Y's units lined up with X's
    np.testing.assert_allclose(np.diag(np.corrcoef(x.T, aligned.T)[:10, 10:]), 1.0, atol=1e-12)
    np.testing.assert_allclose(m.correlation, 1.0, atol=1e-12)
    assert m.mean_correlation == pytest.approx(1.0, abs=1e-12)
    ds = m.to_dataset()
    assert list(ds.unit_x.values) == list(range(10)) and np.array_equal(ds.y_unit.values, np.argsort(perm))


def test_match_neurons_against_brute_force(xy):
    x, y = xy
    xs, ys = x[:, :5], y[:, :5]
    m = match_neurons(xs, ys)
    corr = np.corrcoef(xs.T, ys.T)[:5, 5:]
    np.testing.assert_allclose(m.corr, corr, atol=1e-12)
    best = max(itertools.permutations(range(5)), key=lambda p: sum(corr[i, p[i]] for i in range(5)))
    assert tuple(m.permutation) == best
    np.testing.assert_allclose(m.correlation, corr[np.arange(5), list(best)], atol=1e-12)
    # rectangular: every unit of the narrower side matched once, the rest marked −1
    m2 = match_neurons(x, ys)
    assert len(m2.x_unit) == 5 and (m2.permutation == -1).sum() == 5
    assert sorted(m2.y_unit) == list(range(5))
