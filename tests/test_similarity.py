"""Linear CKA (biased and debiased, streamed) and the all-pairs matrix."""

import warnings

import dask.array as da
import numpy as np
import pytest
from hsic_reference import song_hsic
from scipy.stats import ortho_group

from zooaudit.analysis import sim_stream
from zooaudit.analysis.similarity import (
    METRICS,
    UndefinedSimilarityWarning,
    cka_matrix,
    linear_cka,
    similarity_matrix,
)


def textbook_cka(x, y):
    """Independent reference: HSIC with centred Gram matrices (Kornblith et al. 2019)."""
    n = x.shape[0]
    h = np.eye(n) - 1.0 / n
    k, l = h @ x @ x.T @ h, h @ y @ y.T @ h
    return np.sum(k * l) / (np.linalg.norm(k) * np.linalg.norm(l))


def gram_debiased_cka(x, y):
    """Independent reference: debiased CKA from n×n linear Gram matrices of the raw data."""
    k, l = x @ x.T, y @ y.T
    return song_hsic(k, l) / np.sqrt(song_hsic(k, k) * song_hsic(l, l))


def u_statistic_hsic(k, l):
    """HSIC as the U-statistic over ordered 4-tuples of distinct indices (Song et al., Thm 2)."""
    import itertools

    n = k.shape[0]
    total = 0.0
    for i, j, q, r in itertools.permutations(range(n), 4):
        total += k[i, j] * l[i, j] + k[i, j] * l[q, r] - 2 * k[i, j] * l[i, q]
    return total / (n * (n - 1) * (n - 2) * (n - 3))


@pytest.fixture
def xy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 12))
    y = np.tanh(x @ rng.normal(size=(12, 7))) + 0.3 * rng.normal(size=(300, 7))
    return x, y


@pytest.fixture
def small_blocks(monkeypatch):
    """Force many row blocks (and frequent batched rank-one updates) for in-memory inputs."""
    monkeypatch.setattr(sim_stream, "MAX_BLOCK_ROWS", 29)
    monkeypatch.setattr(sim_stream, "MIN_BLOCK_ROWS", 1)
    monkeypatch.setattr(sim_stream, "LOWRANK_FLUSH", 2)


def test_self_similarity_is_one_and_symmetric(xy):
    x, y = xy
    for debiased in (False, True):
        assert linear_cka(x, x, debiased=debiased) == pytest.approx(1.0, abs=1e-12)
        assert linear_cka(x, y, debiased=debiased) == pytest.approx(linear_cka(y, x, debiased=debiased), abs=1e-12)


def test_matches_gram_reference_and_streaming(xy):
    x, y = xy
    ref = textbook_cka(x, y)
    assert linear_cka(x, y) == pytest.approx(ref, abs=1e-10)
    streamed = linear_cka(da.from_array(x, chunks=(37, -1)), da.from_array(y, chunks=(37, -1)))
    assert streamed == pytest.approx(ref, abs=1e-10)


def test_song_formula_is_the_u_statistic():
    """The Gram reference used below is itself checked against the definition."""
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(7, 3)), rng.normal(size=(7, 2))
    k, l = x @ x.T, y @ y.T
    assert song_hsic(k, l) == pytest.approx(u_statistic_hsic(k, l), abs=1e-12)


def test_debiased_streaming_equals_gram_computation(xy, small_blocks):
    x, y = xy
    ref = gram_debiased_cka(x, y)
    assert linear_cka(x, y, debiased=True) == pytest.approx(ref, abs=1e-8)
    # odd Dask chunks on both axes, different per input, plus an offset (translation invariance)
    got = linear_cka(da.from_array(x + 100, chunks=(37, 5)), da.from_array(y - 50, chunks=(41, -1)), debiased=True)
    assert got == pytest.approx(ref, abs=1e-8)


def test_streamed_equals_in_memory_on_sorted_offset_data(xy, small_blocks):
    """First block unrepresentative (rows sorted, big offset): the shift must not cost accuracy."""
    x, y = xy
    order = np.argsort(x[:, 0])
    xs, ys = x[order] + 1e4, y[order]
    assert linear_cka(xs, ys) == pytest.approx(textbook_cka(xs - xs.mean(0), ys), abs=1e-10)
    assert linear_cka(xs, ys, debiased=True) == pytest.approx(gram_debiased_cka(xs - xs.mean(0), ys), abs=1e-8)


def test_invariances(xy):
    x, y = xy
    q = ortho_group.rvs(12, random_state=1)
    for debiased in (False, True):
        base = linear_cka(x, y, debiased=debiased)
        assert linear_cka(x @ q, y, debiased=debiased) == pytest.approx(base, abs=1e-10)
        assert linear_cka(3.7 * x, y, debiased=debiased) == pytest.approx(base, abs=1e-10)
        assert linear_cka(x + 5.0, y - 2.0, debiased=debiased) == pytest.approx(base, abs=1e-10)
        # not invariant to a general invertible linear map
        a = np.diag(np.linspace(0.1, 10, 12))
        assert abs(linear_cka(x @ a, y, debiased=debiased) - base) > 1e-3


def test_float32_offset_data_keeps_precision(xy):
    x, y = xy
    ref = textbook_cka(x, y)
    x32, y32 = (x + 100).astype(np.float32), (y + 100).astype(np.float32)
    got = linear_cka(da.from_array(x32, chunks=(50, -1)), da.from_array(y32, chunks=(50, -1)))
    assert got == pytest.approx(textbook_cka(x32.astype(np.float64), y32.astype(np.float64)), abs=1e-8)
    assert got == pytest.approx(ref, abs=1e-5)


def test_float32_gemm_path_on_wide_offset_data(small_blocks):
    """≥ 512 float32 features: float32 GEMMs on block-centred data, float64 accumulation."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(400, 300))
    y = x[:, :250] @ rng.normal(size=(250, 260)) / 16 + rng.normal(size=(400, 260))
    x32, y32 = (x + 100).astype(np.float32), (y + 100).astype(np.float32)
    assert sim_stream.joint_gram([x32, y32]).dtype == np.float32
    for debiased, ref in ((False, textbook_cka), (True, gram_debiased_cka)):
        got = linear_cka(da.from_array(x32, chunks=(53, -1)), da.from_array(y32, chunks=(53, -1)), debiased=debiased)
        assert got == pytest.approx(ref(x, y), abs=1e-6)


def test_debiased_near_zero_for_independent_gaussians():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(32, 64)), rng.normal(size=(32, 64))
    assert linear_cka(x, y) > 0.6          # biased estimator is inflated at small n
    assert abs(linear_cka(x, y, debiased=True)) < 0.1
    # and the debiased value can be negative: over many draws it straddles 0
    vals = [linear_cka(rng.normal(size=(32, 64)), rng.normal(size=(32, 64)), debiased=True) for _ in range(20)]
    assert min(vals) < 0 < max(vals) and abs(np.mean(vals)) < 0.02


def test_zero_variance_warns_and_gives_nan(xy):
    x, _ = xy
    dead = np.full((300, 4), 3.3)
    for debiased in (False, True):
        with pytest.warns(UndefinedSimilarityWarning, match="zero variance"):
            assert np.isnan(linear_cka(x, dead, debiased=debiased))
    with pytest.warns(UndefinedSimilarityWarning, match="'dead'"):
        m = cka_matrix({"x": x, "dead": dead, "x2": x[:, :6]})
    assert np.isnan(m[1]).all() and np.isnan(m[:, 1]).all()
    assert m[0, 2] == pytest.approx(textbook_cka(x, x[:, :6]), abs=1e-10)


def test_no_warning_for_ordinary_data(xy):
    x, y = xy
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        linear_cka(x, y, debiased=True)
        cka_matrix({"x": x, "y": y})


def test_cosine_of_double_centred_sq_euclidean_rdms_is_linear_cka(xy):
    """Identity: −½ H D H = H X Xᵀ H for squared-Euclidean D, so their cosine is linear CKA."""
    from scipy.spatial.distance import squareform

    from zooaudit.analysis.similarity import rdm

    x, y = xy
    n = x.shape[0]
    h = np.eye(n) - 1.0 / n
    dx, dy = (h @ squareform(rdm(a, kind="sqeuclidean")) @ h for a in (x, y))
    cosine = np.sum(dx * dy) / (np.linalg.norm(dx) * np.linalg.norm(dy))
    assert cosine == pytest.approx(linear_cka(x, y), abs=1e-9)


def test_similarity_matrix_labels_and_values(xy):
    x, y = xy
    m = similarity_matrix({"a": x, "b": y, "c": x[:, :5]})
    assert m.dims == ("layer_a", "layer_b")
    assert list(m.layer_a.values) == ["a", "b", "c"]
    np.testing.assert_allclose(np.diag(m.values), 1.0, atol=1e-12)
    np.testing.assert_allclose(m.values, m.values.T, atol=1e-12)
    assert m.sel(layer_a="a", layer_b="b").item() == pytest.approx(textbook_cka(x, y), abs=1e-10)


def test_debiased_matrix_one_joint_pass_matches_pairs(xy):
    x, y = xy
    layers = {"a": x, "b": y, "c": np.tanh(x[:, :5])}
    m = similarity_matrix({k: da.from_array(v, chunks=(61, -1)) for k, v in layers.items()},
                          metric="linear_cka_debiased")
    assert m.attrs["metric"] == "linear_cka_debiased"
    for a, xa in layers.items():
        for b, xb in layers.items():
            assert m.sel(layer_a=a, layer_b=b).item() == pytest.approx(gram_debiased_cka(xa, xb),
                                                                       abs=1e-8)


def test_model_by_model_matrix_with_clashing_names(xy):
    """layers_a and layers_b may reuse a key for different arrays (one layer, two models)."""
    x, y = xy
    m = similarity_matrix({"embed": x, "m2": y}, {"embed": y}, dims=("model_a", "model_b"))
    assert m.dims == ("model_a", "model_b") and m.shape == (2, 1)
    assert m.sel(model_a="embed", model_b="embed").item() == pytest.approx(textbook_cka(x, y), abs=1e-10)
    assert m.sel(model_a="m2", model_b="embed").item() == pytest.approx(1.0, abs=1e-12)


def test_metrics_list():
    assert METRICS == ("linear_cka", "linear_cka_debiased", "rbf_cka", "cca", "svcca", "pwcca", "procrustes",
                       "rsa", "mutual_knn", "minibatch_cka")


def test_panelled_accumulation_equals_in_memory(xy, small_blocks, monkeypatch):
    """Several column panels (upper ones summed, mirrored at the end) and batched rank-one
    corrections give the exact centred co-moment matrix."""
    monkeypatch.setattr(sim_stream, "PANEL", 3)
    x, y = xy
    z = np.concatenate([x, y], axis=1) + 100.0
    acc = sim_stream.joint_gram([x + 100.0, y + 100.0], dtype=np.float64)
    assert len(acc._panels) > 2
    zc = z - z.mean(0)
    np.testing.assert_allclose(acc.centred(), zc.T @ zc, rtol=1e-10, atol=1e-8)
    np.testing.assert_array_equal(acc.T, acc.T.T)
