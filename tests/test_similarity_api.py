"""Validation at the door for every similarity function, and similarity_matrix over every metric."""

import dask.array as da
import numpy as np
import pytest
import xarray as xr

from zooaudit.analysis.similarity import (
    METRICS,
    cca,
    cka_matrix,
    linear_cka,
    match_neurons,
    minibatch_cka,
    mutual_knn,
    procrustes,
    pwcca,
    rbf_cka,
    rdm,
    rsa,
    shape_distance,
    similarity_matrix,
    svcca,
)
from zooaudit.errors import ZooauditError

PAIR_FUNCTIONS = [linear_cka, rbf_cka, minibatch_cka, cca, svcca, pwcca, procrustes, shape_distance, rsa,
                  mutual_knn, match_neurons]


@pytest.fixture(scope="module")
def xy():
    rng = np.random.default_rng(40)
    x = rng.normal(size=(60, 6))
    y = np.tanh(x @ rng.normal(size=(6, 5))) + 0.3 * rng.normal(size=(60, 5))
    return x, y


@pytest.mark.parametrize("fn", PAIR_FUNCTIONS, ids=lambda f: f.__name__)
def test_different_sample_counts(fn, xy):
    x, y = xy
    with pytest.raises(ZooauditError, match=r"sample counts differ \(X: 60, Y: 59\)"):
        fn(x, y[:59])


@pytest.mark.parametrize("fn", PAIR_FUNCTIONS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values(fn, bad, xy):
    x, y = xy
    y = y.copy()
    y[17, 2] = bad
    with pytest.raises(ZooauditError, match="non-finite"):
        fn(x, y)
    with pytest.raises(ZooauditError, match="non-finite"):
        fn(x, da.from_array(y, chunks=(7, -1)))


def test_non_finite_names_the_rows_and_layer(xy):
    x, y = xy
    y = y.copy()
    y[17, 2] = np.nan
    with pytest.raises(ZooauditError, match=r"'conv3'|conv3 contains"):
        cka_matrix({"fc": x, "conv3": da.from_array(y, chunks=(10, -1))})
    with pytest.raises(ZooauditError, match=r"in row 17;"):
        cka_matrix({"fc": x, "conv3": da.from_array(y, chunks=(10, -1))})


def test_shapes_and_types(xy):
    x, _ = xy
    with pytest.raises(ZooauditError, match="2-D"):
        linear_cka(x[:, 0], x)
    with pytest.raises(ZooauditError, match="no features"):
        linear_cka(x, x[:, :0])
    with pytest.raises(ZooauditError, match="real numbers"):
        linear_cka(x.astype(complex), x)
    with pytest.raises(ZooauditError, match="at least 4 samples"):
        linear_cka(x[:3], x[:3], debiased=True)
    with pytest.raises(ZooauditError, match="debiased must be True or False"):
        linear_cka(x, x, debiased="yes")
    # >2-D activations are flattened per sample; xarray DataArrays and lists are accepted
    maps = np.random.default_rng(0).normal(size=(60, 2, 3))
    assert linear_cka(maps, maps.reshape(60, 6)) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(xr.DataArray(x, dims=("sample", "unit")), x.tolist()) == pytest.approx(1.0, abs=1e-12)


def test_unknown_option_values_list_the_allowed_ones(xy):
    x, y = xy
    with pytest.raises(ZooauditError, match=r"Unknown rdm 'cosine'\. Allowed: correlation, euclidean, sqeuclidean"):
        rsa(x, y, rdm="cosine")
    with pytest.raises(ZooauditError, match=r"Unknown compare 'pearson'\. Allowed: kendall, spearman"):
        rsa(x, y, compare="pearson")
    with pytest.raises(ZooauditError, match="Unknown rdm"):
        rdm(x, kind="manhattan")
    with pytest.raises(ZooauditError, match=r"Unknown kernel 'poly'\. Allowed: linear, rbf"):
        minibatch_cka(x, y, kernel="poly")
    with pytest.raises(ZooauditError, match=r"Unknown similarity metric 'cka'\. Allowed: .*linear_cka, "
                                            r"linear_cka_debiased"):
        similarity_matrix({"a": x}, metric="cka")
    with pytest.raises(ZooauditError, match=r"Unknown parameter for metric 'mutual_knn' 'kk'\. Allowed: k"):
        similarity_matrix({"a": x}, metric="mutual_knn", kk=3)
    with pytest.raises(ZooauditError, match="linear CKA variants take none"):
        similarity_matrix({"a": x}, metric="linear_cka", debiased=True)
    with pytest.raises(ZooauditError, match="k must be between 1 and 59"):
        mutual_knn(x, y, k=60)
    with pytest.raises(ZooauditError, match="dims"):
        similarity_matrix({"a": x}, dims=("layer", "layer"))
    with pytest.raises(ZooauditError, match="non-empty mapping"):
        similarity_matrix({})
    with pytest.raises(ZooauditError, match=r"sample counts differ \(a: 60, b: 50\)"):
        similarity_matrix({"a": x, "b": y[:50]})


REFERENCE = {
    "linear_cka": lambda a, b: linear_cka(a, b),
    "linear_cka_debiased": lambda a, b: linear_cka(a, b, debiased=True),
    "rbf_cka": lambda a, b: rbf_cka(a, b),
    "cca": lambda a, b: cca(a, b).mean(),
    "svcca": lambda a, b: svcca(a, b),
    "pwcca": lambda a, b: pwcca(a, b),
    "procrustes": lambda a, b: procrustes(a, b),
    "rsa": lambda a, b: rsa(a, b),
    "mutual_knn": lambda a, b: mutual_knn(a, b),
    "minibatch_cka": lambda a, b: minibatch_cka(a, b),
}


@pytest.mark.parametrize("metric", METRICS)
def test_similarity_matrix_every_metric(metric, xy):
    x, y = xy
    layers = {"x": x, "y": y, "z": np.sin(x[:, :3])}
    m = similarity_matrix(layers, metric=metric)
    assert m.dims == ("layer_a", "layer_b") and m.name == metric and m.attrs["metric"] == metric
    assert list(m.layer_b.values) == ["x", "y", "z"]
    for a, xa in layers.items():
        for b, xb in layers.items():
            assert m.sel(layer_a=a, layer_b=b).item() == pytest.approx(REFERENCE[metric](xa, xb),
                                                                       abs=1e-9)
    self_value = 0.0 if metric == "procrustes" else 1.0
    np.testing.assert_allclose(np.diag(m.values), self_value, atol=1e-7)
    if metric != "pwcca":
        np.testing.assert_allclose(m.values, m.values.T, atol=1e-10)
    rect = similarity_matrix({"x": x}, {"y": da.from_array(y, chunks=(13, -1)), "x": x}, metric=metric,
                             dims=("model_a", "model_b"))
    assert rect.shape == (1, 2) and rect.dims == ("model_a", "model_b")
    assert rect.values[0, 0] == pytest.approx(m.values[0, 1], abs=1e-9)


def test_similarity_matrix_passes_metric_parameters(xy):
    x, y = xy
    m = similarity_matrix({"x": x, "y": y}, metric="mutual_knn", k=3)
    assert m.values[0, 1] == pytest.approx(mutual_knn(x, y, k=3), abs=1e-12) and m.attrs["k"] == 3
    m = similarity_matrix({"x": x, "y": y}, metric="rsa", rdm="euclidean", compare="kendall")
    assert m.values[0, 1] == pytest.approx(rsa(x, y, rdm="euclidean", compare="kendall"), abs=1e-12)


@pytest.mark.parametrize("fn", PAIR_FUNCTIONS, ids=lambda f: f.__name__)
def test_different_sample_ids_of_labelled_inputs(fn, xy):
    x, y = xy
    ids = np.arange(60)
    a = xr.DataArray(x, dims=("sample", "unit"), coords={"sample": ids})
    b = xr.DataArray(y, dims=("sample", "unit"), coords={"sample": ids[::-1]})
    with pytest.raises(ZooauditError, match=r"different sample ids .*same ids in a different order"):
        fn(a, b)
    with pytest.raises(ZooauditError, match=r"different sample ids \(first difference at row 0: 100 vs 0\)"):
        fn(a, b.assign_coords(sample=ids + 100))
    fn(a, b.assign_coords(sample=ids))          # same ids, same order: fine
    fn(a, y)                                     # unlabelled inputs are trusted


def test_similarity_matrix_checks_sample_ids(xy):
    x, y = xy
    a = xr.DataArray(x, dims=("sample", "unit"), coords={"sample": np.arange(60)})
    b = xr.DataArray(y, dims=("sample", "unit"), coords={"sample": np.arange(1, 61)})
    with pytest.raises(ZooauditError, match="m2 and m1 label their rows with different sample ids"):
        similarity_matrix({"m1": a}, {"m2": b}, dims=("model_a", "model_b"))


def test_similarity_matrices_share_one_pass(xy, monkeypatch):
    from zooaudit.analysis import sim_stream
    from zooaudit.analysis.similarity import STREAMED_METRICS, similarity_matrices

    x, y = xy
    layers = {"x": da.from_array(x, chunks=(16, -1)), "y": y, "z": np.sin(x[:, :3])}
    passes = []
    real = sim_stream.iter_row_blocks
    monkeypatch.setattr(sim_stream, "iter_row_blocks", lambda arrays, rows: passes.append(len(arrays)) or
                        real(arrays, rows))
    got = similarity_matrices(layers, metrics=list(METRICS), params={"svcca": {"keep_variance": 0.9}})
    assert passes == [3]                          # every streamed metric, every pair: one pass over 3 arrays
    monkeypatch.setattr(sim_stream, "iter_row_blocks", real)
    for metric in METRICS:
        kw = {"keep_variance": 0.9} if metric == "svcca" else {}
        alone = similarity_matrix(layers, metric=metric, **kw)
        np.testing.assert_allclose(got[metric].values, alone.values, atol=1e-9, err_msg=metric)
        assert got[metric].attrs == alone.attrs
    assert set(STREAMED_METRICS) == {"linear_cka", "linear_cka_debiased", "cca", "svcca", "pwcca", "procrustes"}
    with pytest.raises(ZooauditError, match="keep_variance must lie in"):
        similarity_matrices(layers, metrics=["svcca"], params={"svcca": {"keep_variance": 1.5}})
    with pytest.raises(ZooauditError, match="listed twice|twice"):
        similarity_matrices(layers, metrics=["rsa", "rsa"])
    with pytest.raises(ZooauditError, match=r"Unknown metric in params 'rsa'"):
        similarity_matrices(layers, metrics=["cca"], params={"rsa": {}})
    with pytest.raises(ZooauditError, match="non-empty list"):
        similarity_matrices(layers, metrics="cca")


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_minibatch_matrix_shares_minibatches_and_equals_the_pairwise_function(kernel, monkeypatch):
    """All pairs from one sweep of minibatches (the same batches for every pair), lazy inputs
    gathered a group of minibatches at a time; each entry is minibatch_cka of that pair."""
    from zooaudit.analysis import sim_stream
    from zooaudit.analysis.similarity import (
        MINIBATCH_METRICS,
        UndefinedSimilarityWarning,
        similarity_matrices,
    )

    rng = np.random.default_rng(5)
    x = rng.normal(size=(300, 6))
    layers = {"x": x, "y": np.tanh(x @ rng.normal(size=(6, 4))) + 0.3 * rng.normal(size=(300, 4)),
              "z": da.from_array(np.sin(x[:, :3]) + 0.1 * rng.normal(size=(300, 3)), chunks=(41, -1))}
    monkeypatch.setattr(sim_stream, "TARGET_BLOCK_BYTES", 8 * 13 * 50 * 2)   # two minibatches per gather
    opts = {"kernel": kernel, "batch_size": 50, "random_state": 3}
    m = similarity_matrices(layers, metrics=["minibatch_cka"], params={"minibatch_cka": opts})["minibatch_cka"]
    assert m.attrs["kernel"] == kernel and m.attrs["batch_size"] == 50 and "Nguyen" in m.attrs["estimator"]
    for a, xa in layers.items():
        for b, xb in layers.items():
            assert m.sel(layer_a=a, layer_b=b).item() == pytest.approx(minibatch_cka(xa, xb, **opts), abs=1e-12)
    np.testing.assert_allclose(np.diag(m.values), 1.0, atol=1e-12)
    assert MINIBATCH_METRICS == ("minibatch_cka",)
    with pytest.warns(UndefinedSimilarityWarning, match="minibatch linear CKA is undefined for 'c'"):
        dead = similarity_matrix({"x": x, "c": np.ones((300, 2))}, metric="minibatch_cka", batch_size=50)
    assert np.isnan(dead.values[1]).all() and np.isnan(dead.values[:, 1]).all()
    assert dead.values[0, 0] == pytest.approx(1.0, abs=1e-12)   # H/√H√H: one rounding off 1 on some draws
