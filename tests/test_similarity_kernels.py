"""RBF CKA (exact) and minibatch CKA (Nguyen et al. 2021)."""

import dask.array as da
import numpy as np
import pytest
from hsic_reference import song_hsic
from scipy.spatial.distance import pdist, squareform
from scipy.stats import ortho_group

from zooaudit.analysis import sim_checks
from zooaudit.analysis.similarity import (
    UndefinedSimilarityWarning,
    linear_cka,
    minibatch_cka,
    rbf_cka,
)
from zooaudit.errors import ZooauditError


def ref_rbf_gram(x, threshold):
    d2 = pdist(x, "sqeuclidean")                       # the n(n−1)/2 distinct pairs
    sigma = threshold * np.sqrt(np.median(d2))
    return np.exp(-squareform(d2) / (2 * sigma ** 2))


def ref_hsic(k, l, debiased):
    n = k.shape[0]
    if not debiased:
        h = np.eye(n) - 1.0 / n
        return np.trace(k @ h @ l @ h) / (n - 1) ** 2
    return song_hsic(k, l)


def ref_cka(k, l, debiased):
    return ref_hsic(k, l, debiased) / np.sqrt(ref_hsic(k, k, debiased) * ref_hsic(l, l, debiased))


@pytest.fixture(scope="module")
def xy():
    rng = np.random.default_rng(10)
    x = rng.normal(size=(160, 9))
    y = np.sin(x[:, :4] @ rng.normal(size=(4, 6))) + 0.2 * rng.normal(size=(160, 6))
    return x, y


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("threshold", [0.5, 1.0, 2.0])
def test_rbf_cka_matches_reference(xy, debiased, threshold):
    x, y = xy
    ref = ref_cka(ref_rbf_gram(x, threshold), ref_rbf_gram(y, threshold), debiased)
    assert rbf_cka(x, y, threshold=threshold, debiased=debiased) == pytest.approx(ref, abs=1e-10)


def test_rbf_cka_properties(xy):
    x, y = xy
    base = rbf_cka(x, y)
    assert rbf_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert rbf_cka(x, x, debiased=True) == pytest.approx(1.0, abs=1e-12)
    assert rbf_cka(y, x) == pytest.approx(base, abs=1e-12)
    q = ortho_group.rvs(9, random_state=3)
    assert rbf_cka(x @ q, y) == pytest.approx(base, abs=1e-10)
    assert rbf_cka(4.2 * x + 7.0, y) == pytest.approx(base, abs=1e-10)     # bandwidth follows the scale
    assert abs(rbf_cka(x * np.linspace(0.1, 5, 9), y) - base) > 1e-3       # not a general linear map
    assert rbf_cka(da.from_array(x, chunks=(33, -1)), y) == pytest.approx(base, abs=1e-12)


def test_rbf_cka_refuses_large_n(monkeypatch):
    monkeypatch.setattr(sim_checks, "MAX_GRAM_SAMPLES", 50)
    x = np.random.default_rng(0).normal(size=(60, 3))
    with pytest.raises(ZooauditError, match="minibatch_cka"):
        rbf_cka(x, x)


def test_rbf_cka_zero_variance_warns(xy):
    x, _ = xy
    with pytest.warns(UndefinedSimilarityWarning):
        assert np.isnan(rbf_cka(x, np.ones((160, 2))))


def test_minibatch_linear_single_batch_is_debiased_cka(xy):
    x, y = xy
    assert minibatch_cka(x, y, kernel="linear", batch_size=160) == pytest.approx(
        linear_cka(x, y, debiased=True), abs=1e-10)


def test_minibatch_rbf_single_batch_is_debiased_rbf_cka(xy):
    x, y = xy
    assert minibatch_cka(x, y, kernel="rbf", batch_size=160) == pytest.approx(
        rbf_cka(x, y, debiased=True), abs=1e-10)


def test_minibatch_sums_hsic_over_batches(xy):
    """Numerators and denominators are summed over batches, then divided (not CKA averaged)."""
    x, y = xy
    rng = np.random.RandomState(7)
    order = rng.permutation(160)
    batches = np.array_split(order, 160 // 40)
    kl = kk = ll = 0.0
    for idx in batches:
        idx = np.sort(idx)
        k, l = x[idx] @ x[idx].T, y[idx] @ y[idx].T
        kl, kk, ll = kl + ref_hsic(k, l, True), kk + ref_hsic(k, k, True), ll + ref_hsic(l, l, True)
    assert minibatch_cka(x, y, batch_size=40, random_state=7) == pytest.approx(kl / np.sqrt(kk * ll), abs=1e-10)


def test_minibatch_close_to_full_for_large_batches():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(3000, 20))
    y = np.tanh(x @ rng.normal(size=(20, 15)) / 3) + 0.5 * rng.normal(size=(3000, 15))
    full = linear_cka(x, y, debiased=True)
    mb = minibatch_cka(x, y, batch_size=1000, random_state=0)
    assert mb == pytest.approx(full, abs=0.02)
    # streamed Dask input, contiguous batches, same answer as the in-memory one
    dx, dy = da.from_array(x, chunks=(333, -1)), da.from_array(y, chunks=(333, -1))
    assert minibatch_cka(dx, dy, batch_size=1000, shuffle=False) == pytest.approx(
        minibatch_cka(x, y, batch_size=1000, shuffle=False), abs=1e-12)
    assert minibatch_cka(dx, dy, batch_size=1000, random_state=0) == pytest.approx(mb, abs=1e-12)
    full_rbf = rbf_cka(x[:2000], y[:2000], debiased=True)
    assert minibatch_cka(x[:2000], y[:2000], kernel="rbf", batch_size=1000, random_state=1) == pytest.approx(
        full_rbf, abs=0.03)


def test_minibatch_independent_data_near_zero():
    rng = np.random.default_rng(8)
    x, y = rng.normal(size=(2000, 64)), rng.normal(size=(2000, 64))
    assert abs(minibatch_cka(x, y, batch_size=64, random_state=0)) < 0.02
    assert linear_cka(x[:64], y[:64]) > 0.4     # what averaging biased per-batch CKA would approach


def test_minibatch_validation(xy):
    x, y = xy
    with pytest.raises(ZooauditError, match="kernel"):
        minibatch_cka(x, y, kernel="poly")
    with pytest.raises(ZooauditError, match="batch_size"):
        minibatch_cka(x, y, batch_size=3)
    with pytest.raises(ZooauditError, match="batch_size"):
        minibatch_cka(x, y, batch_size=10**6)
    assert minibatch_cka(x, y, batch_size=1000) == pytest.approx(minibatch_cka(x, y, batch_size=160), abs=1e-12)
    with pytest.raises(ZooauditError, match="threshold"):
        rbf_cka(x, y, threshold=0)
