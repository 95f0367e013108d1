"""Validation at the door for every similarity function, and similarity_matrix over every metric."""

import dask.array as da
import numpy as np
import pytest
import xarray as xr

from zooaudit.analysis.similarity import (METRICS, cca, cka_matrix, linear_cka, match_neurons, minibatch_cka,
                                          mutual_knn, procrustes, pwcca, rbf_cka, rdm, rsa, shape_distance,
                                          similarity_matrix, svcca)
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
}


@pytest.mark.parametrize("metric", METRICS)
def test_similarity_matrix_every_metric(metric, xy):
    x, y = xy
    layers = {"x": x, "y": y, "z": np.sin(x[:, :3])}
    m = similarity_matrix(layers, metric=metric)
    assert m.dims == ("layer_a", "layer_b") and m.name == metric and m.attrs["metric"] == metric
    assert list(m.layer_b.values) == ["x", "y", "z"]
    for a in layers:
        for b in layers:
            assert m.sel(layer_a=a, layer_b=b).item() == pytest.approx(REFERENCE[metric](layers[a], layers[b]),
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
