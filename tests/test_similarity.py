import dask.array as da
import numpy as np
import pytest
from scipy.stats import ortho_group

from zooaudit.analysis.similarity import linear_cka, similarity_matrix


def textbook_cka(x, y):
    """Independent reference: HSIC with centred Gram matrices (Kornblith et al. 2019)."""
    n = x.shape[0]
    h = np.eye(n) - 1.0 / n
    k, l = h @ x @ x.T @ h, h @ y @ y.T @ h
    return np.sum(k * l) / (np.linalg.norm(k) * np.linalg.norm(l))


@pytest.fixture
def xy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 12))
    y = np.tanh(x @ rng.normal(size=(12, 7))) + 0.3 * rng.normal(size=(300, 7))
    return x, y


def test_self_similarity_is_one_and_symmetric(xy):
    x, y = xy
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, y) == pytest.approx(linear_cka(y, x), abs=1e-12)


def test_matches_gram_reference_and_streaming(xy):
    x, y = xy
    ref = textbook_cka(x, y)
    assert linear_cka(x, y) == pytest.approx(ref, abs=1e-10)
    streamed = linear_cka(da.from_array(x, chunks=(37, -1)), da.from_array(y, chunks=(37, -1)))
    assert streamed == pytest.approx(ref, abs=1e-10)


def test_invariances(xy):
    x, y = xy
    q = ortho_group.rvs(12, random_state=1)
    base = linear_cka(x, y)
    assert linear_cka(x @ q, y) == pytest.approx(base, abs=1e-10)
    assert linear_cka(3.7 * x, y) == pytest.approx(base, abs=1e-10)
    assert linear_cka(x + 5.0, y - 2.0) == pytest.approx(base, abs=1e-10)
    # not invariant to a general invertible linear map
    a = np.diag(np.linspace(0.1, 10, 12))
    assert abs(linear_cka(x @ a, y) - base) > 1e-3


def test_float32_offset_data_keeps_precision(xy):
    x, y = xy
    ref = textbook_cka(x, y)
    x32, y32 = (x + 100).astype(np.float32), (y + 100).astype(np.float32)
    got = linear_cka(da.from_array(x32, chunks=(50, -1)), da.from_array(y32, chunks=(50, -1)))
    assert got == pytest.approx(textbook_cka(x32.astype(np.float64), y32.astype(np.float64)), abs=1e-8)
    assert got == pytest.approx(ref, abs=1e-5)


def test_debiased_near_zero_for_independent_gaussians():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(32, 64)), rng.normal(size=(32, 64))
    assert linear_cka(x, y) > 0.5          # biased estimator is inflated at small n
    assert abs(linear_cka(x, y, debiased=True)) < 0.1


def test_similarity_matrix_labels_and_values(xy):
    x, y = xy
    m = similarity_matrix({"a": x, "b": y, "c": x[:, :5]})
    assert m.dims == ("layer_a", "layer_b")
    assert list(m.layer_a.values) == ["a", "b", "c"]
    np.testing.assert_allclose(np.diag(m.values), 1.0, atol=1e-12)
    np.testing.assert_allclose(m.values, m.values.T, atol=1e-12)
    assert m.sel(layer_a="a", layer_b="b").item() == pytest.approx(textbook_cka(x, y), abs=1e-10)
