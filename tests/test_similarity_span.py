"""Wide layers (more features than samples) enter the streamed pass through their row space."""

import warnings

import numpy as np
import pytest

from zooaudit.analysis import sim_span
from zooaudit.analysis.similarity import similarity_matrices
from zooaudit.errors import ZooauditError

METRICS = ["linear_cka", "linear_cka_debiased", "cca", "svcca", "procrustes"]


def _layers(rng, n=50):
    base = rng.normal(size=(n, 5))
    return {"wide": (base @ rng.normal(size=(5, 900)) + 0.3 * rng.normal(size=(n, 900)) + 100).astype(np.float32),
            "wide_maps": rng.normal(size=(n, 7, 10, 10)),
            "narrow": base @ rng.normal(size=(5, 12)) + 0.1 * rng.normal(size=(n, 12))}


def test_row_space_has_the_centred_gram_of_the_rows():
    x = np.random.default_rng(0).normal(size=(30, 200)) + 5
    y = sim_span.row_space(x)
    xc = x - x.mean(0)
    assert y.shape[0] == 30 and y.shape[1] <= 29
    np.testing.assert_allclose(y @ y.T, xc @ xc.T, atol=1e-9)
    np.testing.assert_allclose(y.mean(0), 0, atol=1e-9)
    assert sim_span.row_space(np.ones((10, 40))).shape == (10, 1)   # a constant layer stays constant


def test_wide_layers_give_the_same_metrics_as_the_feature_space_pass(monkeypatch):
    layers = _layers(np.random.default_rng(1))
    assert all(sim_span.reducible(v, METRICS) for k, v in layers.items() if k != "narrow")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # CCA on p ≥ n − 1 warns (degenerate), both ways
        reduced = similarity_matrices(layers, metrics=METRICS)
        monkeypatch.setattr(sim_span, "MAX_REDUCE_BYTES", 0)
        full = similarity_matrices(layers, metrics=METRICS)
    for m in METRICS:
        # procrustes of float32 inputs accumulates in float32 on the feature-space side
        np.testing.assert_allclose(reduced[m].values, full[m].values, atol=1e-7 if m == "procrustes" else 1e-10)


def test_pwcca_and_nonfinite_rows():
    layers = _layers(np.random.default_rng(2))
    assert not sim_span.reducible(layers["wide"], ["linear_cka", "pwcca"])   # PWCCA weighs original units
    bad = layers["wide"].copy()
    bad[3, 7] = np.nan
    with pytest.raises(ZooauditError, match="non-finite values .* row 3"):
        similarity_matrices({"bad": bad, "narrow": layers["narrow"]}, metrics=["linear_cka"])
