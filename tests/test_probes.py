"""Representation-level bias: probe leakage with controls, output leakage, LEACE erasure."""

import warnings

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from zooaudit.analysis.bias import (
    erase,
    erasure_diagnostic,
    leace_eraser,
    linear_probe,
    output_leakage_within_label,
    probe_leakage,
)
from zooaudit.analysis.probes import make_folds
from zooaudit.errors import ZooauditError


def _acts(rng, n=600, d=12, signal=2.0, n_classes=2):
    """Activations with the attribute planted along one random direction."""
    a = rng.integers(0, n_classes, n)
    direction = rng.normal(size=d)
    return rng.normal(size=(n, d)) + signal * np.outer(a - a.mean(), direction) / np.linalg.norm(direction), a


def test_probe_matches_sklearn_cross_val_score_on_the_same_folds():
    rng = np.random.default_rng(0)
    X, a = _acts(rng, signal=1.0)
    folds = make_folds(a, cv=5, random_state=3)
    ours = linear_probe(X, a, folds=folds)
    ref = cross_val_score(make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)), X, a, cv=folds)
    np.testing.assert_allclose(ours.fold_accuracy, ref)
    assert ours.chance == pytest.approx(np.bincount(a).max() / a.size)


def test_probe_leakage_reports_controls_side_by_side():
    rng = np.random.default_rng(1)
    X, a = _acts(rng)
    noise_input = rng.normal(size=(a.size, 5))  # carries no attribute information
    ds = probe_leakage(X, a, cv=5, random_state=0, controls={"input": noise_input, "random_init": X[:, :3]})
    assert ds["probe"].values.tolist() == ["activations", "shuffled_labels", "input", "random_init"]
    assert ds["fold_accuracy"].dims == ("probe", "fold") and ds.sizes["fold"] == 5
    acc = ds["accuracy"].to_series()
    assert acc["activations"] > 0.8
    assert abs(acc["shuffled_labels"] - ds.attrs["chance"]) < 0.08  # shuffled labels: chance
    assert abs(acc["input"] - ds.attrs["chance"]) < 0.08
    np.testing.assert_allclose(ds["excess"].values, ds["accuracy"].values - ds.attrs["chance"])
    again = probe_leakage(X, a, cv=5, random_state=0, controls={"input": noise_input, "random_init": X[:, :3]})
    np.testing.assert_array_equal(again["fold_accuracy"].values, ds["fold_accuracy"].values)


def test_shuffled_label_control_is_at_chance_for_a_multiclass_attribute():
    rng = np.random.default_rng(2)
    X, a = _acts(rng, n=900, n_classes=3, signal=3.0)
    ds = probe_leakage(X, a, random_state=1)
    assert abs(ds["accuracy"].sel(probe="shuffled_labels").item() - 1 / 3) < 0.07


@pytest.mark.parametrize("backend", ["numpy", "concept-erasure"])
def test_erasure_drives_the_probe_to_chance(backend):
    if backend == "concept-erasure":
        pytest.importorskip("concept_erasure")
    rng = np.random.default_rng(3)
    X, a = _acts(rng, n=800, d=10, signal=4.0, n_classes=3)
    assert linear_probe(X, a).accuracy > 0.9
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        Xe = erase(X, a, backend=backend)
        # out of sample: eraser fit on the training folds only, as erasure_diagnostic does.
        # (Cross-validating on rows erased in-sample scores *below* chance: each training
        # fold then carries the mirror image of its test fold's class means.)
        ds = erasure_diagnostic(X, a, a, backend=backend, random_state=0)
    before, after = ds["probe_accuracy"].values
    assert before > 0.9 and abs(after - ds.attrs["chance"]) < 0.05
    # in sample, LEACE's guarantee: a refit probe does no better than the majority class ...
    chance = np.bincount(a).max() / a.size
    assert LogisticRegression(max_iter=1000).fit(Xe, a).score(Xe, a) < chance + 0.03
    # ... because no cross-covariance with the one-hot attribute is left; the mean is unchanged
    Z = np.eye(3)[a]
    cross = (Xe - Xe.mean(0)).T @ (Z - Z.mean(0)) / a.size
    assert np.abs(cross).max() < 1e-8
    np.testing.assert_allclose(Xe.mean(0), X.mean(0), atol=1e-10)


def test_numpy_leace_matches_the_concept_erasure_package():
    ce = pytest.importorskip("concept_erasure")
    import torch

    rng = np.random.default_rng(4)
    X, a = _acts(rng, n=500, d=8, n_classes=3)
    Z = np.eye(3)[a]
    fitter = ce.LeaceFitter.fit(torch.from_numpy(X), torch.from_numpy(Z), shrinkage=False,
                                constrain_cov_trace=False, svd_tol=1e-10)
    ref = fitter.eraser(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(erase(X, a, backend="numpy"), ref, atol=1e-8)
    # an eraser fit on some rows applies to others, and erasing twice changes nothing more
    f = leace_eraser(X[:300], a[:300], backend="numpy")
    np.testing.assert_allclose(f(f(X[300:])), f(X[300:]), atol=1e-8)


def test_wide_layer_leace_fits_in_the_span_of_the_rows():
    # d > n: fitted from an SVD of the rows, the eraser is the full d×d exact LEACE — checked
    # against the package without shrinkage, on the training rows and on new rows
    ce = pytest.importorskip("concept_erasure")
    import torch

    from zooaudit.analysis.probes import _resolve_backend

    rng = np.random.default_rng(7)
    X, a = _acts(rng, n=60, d=400, n_classes=3)
    Z = np.eye(3)[a]
    fitter = ce.LeaceFitter.fit(torch.from_numpy(X[:40]), torch.from_numpy(Z[:40]), shrinkage=False,
                                constrain_cov_trace=False, svd_tol=1e-10)
    f = leace_eraser(X[:40], a[:40], backend="numpy")
    for rows in (X[:40], X[40:]):
        np.testing.assert_allclose(f(rows), fitter.eraser(torch.from_numpy(rows)).numpy(), atol=1e-8)
    # auto: the package for a tall matrix, the span fit for a wide one
    assert _resolve_backend("auto", (500, 8)) == "concept-erasure"
    assert _resolve_backend("auto", (40, 400)) == "numpy"
    assert erasure_diagnostic(X, a, a, cv=3, random_state=0).attrs["backend"] == "numpy"


def test_wide_probe_is_fitted_in_the_span_of_its_training_rows():
    # d > n: the reduced fit predicts what the plain standardise + logistic pipeline predicts
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from zooaudit.analysis.probes import _fit_score

    rng = np.random.default_rng(8)
    for n, d in ((60, 2000), (90, 500)):
        a = rng.integers(0, 3, n)
        X = rng.normal(size=(n, d)) + 0.3 * a[:, None] * rng.normal(size=d)
        tr, te = np.arange(2 * n // 3), np.arange(2 * n // 3, n)
        ref = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000)).fit(X[tr], a[tr])
        acc, pred = _fit_score(X, a, tr, te, 1.0, 1000)
        np.testing.assert_array_equal(pred, ref.predict(X[te]))
        assert acc == pytest.approx(np.mean(ref.predict(X[te]) == a[te]))


def test_erasure_diagnostic_removes_a_shortcut():
    # y is weakly encoded; the attribute agrees with y 90% of the time and is strongly encoded,
    # so the readout leans on it and fails on the cells where they disagree.
    rng = np.random.default_rng(5)
    n = 1500
    y = rng.integers(0, 2, n)
    a = np.where(rng.random(n) < 0.9, y, 1 - y)
    X = np.c_[0.8 * (2 * y - 1) + rng.normal(size=n), 3.0 * (2 * a - 1) + 0.3 * rng.normal(size=n),
              rng.normal(size=(n, 4))]
    ds = erasure_diagnostic(X, a, y, cv=5, random_state=0, backend="numpy")
    assert ds["stage"].values.tolist() == ["before", "after"]
    before, after = ds["probe_accuracy"].values
    assert before > 0.95 and abs(after - ds.attrs["chance"]) < 0.06
    wga = ds["worst_group_accuracy"].values
    assert ds.attrs["delta_worst_group_accuracy"] == pytest.approx(wga[1] - wga[0])
    assert wga[1] > wga[0] + 0.2  # removing the shortcut helps the worst cell
    assert ds["worst_group"].values[0] in ("label=0|1", "label=1|0")


def test_output_leakage_within_label_sees_past_label_correlation():
    rng = np.random.default_rng(6)
    n = 1200
    y = rng.integers(0, 2, n)
    a = np.where(rng.random(n) < 0.65, y, 1 - y)  # attribute correlated with the label
    clean = np.c_[2.0 * y + rng.normal(size=n), -2.0 * y + rng.normal(size=n)]  # outputs depend on y only
    leaky = clean + np.c_[2.0 * a, np.zeros(n)]  # outputs also encode the attribute
    # unconditionally, even the clean outputs "leak" through the label
    assert linear_probe(clean, a).accuracy > 0.6
    ds_clean = output_leakage_within_label(clean, y, a, random_state=0)
    ds_leaky = output_leakage_within_label(leaky, y, a, random_state=0)
    assert ds_clean["label"].values.tolist() == ["0", "1"]
    assert abs(ds_clean.attrs["excess"]) < 0.05  # within a label: chance
    assert ds_leaky.attrs["excess"] > 0.15
    # the attribute leakage is the count-weighted mean of the per-label accuracies
    w = ds_leaky["count"].values / n
    assert ds_leaky.attrs["leakage"] == pytest.approx(float(np.sum(w * ds_leaky["accuracy"].values)))


def test_output_leakage_skips_labels_without_two_attribute_classes():
    rng = np.random.default_rng(7)
    y = np.r_[np.zeros(50, int), np.ones(50, int)]
    a = np.r_[rng.integers(0, 2, 50), np.ones(50, int)]  # label 1: one attribute value only
    ds = output_leakage_within_label(rng.normal(size=(100, 3)), y, a)
    assert np.isfinite(ds["accuracy"].values[0]) and np.isnan(ds["accuracy"].values[1])
    assert ds["chance"].values[1] == 1.0


@pytest.mark.parametrize("call,match", [
    (lambda X, a: linear_probe(X[:-1], a), "599 rows but the attribute has 600"),
    (lambda X, a: linear_probe(X, np.where(np.arange(600) == 5, None, a)), "missing values.*index 5"),
    (lambda X, a: linear_probe(X, np.zeros(600)), "single value"),
    (lambda X, a: linear_probe(X, np.r_[np.ones(597), np.zeros(3)]), "smallest attribute class has 3"),
    (lambda X, a: linear_probe(np.where(np.eye(600, 12) > 0, np.nan, X), a), "NaN"),
    (lambda X, a: erase(X, a, backend="torch"), "Unknown erasure backend 'torch'"),
    (lambda X, a: probe_leakage(X, a, controls={"shuffled_labels": X}), "reserved"),
    (lambda X, a: output_leakage_within_label(X, a[:10], a), "y_true has 10 entries"),
    (lambda X, a: erasure_diagnostic(X, a, np.r_[np.zeros(597), np.ones(3)]),
     r"smallest \(attribute × label\) cell has [0-3] samples"),
])
def test_bad_input_is_explained(call, match):
    X, a = _acts(np.random.default_rng(0))
    with pytest.raises(ZooauditError, match=match):
        call(X, a)
