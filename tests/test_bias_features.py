"""Which components carry the bias: DeLong AUCs (against sklearn and a brute-force kernel), and the
bias-features stage after factorize on the colored-digits builtin."""

from types import SimpleNamespace

import numpy as np
import pytest
import xarray as xr
from sklearn.metrics import roc_auc_score

from zooaudit import layout, stages
from zooaudit.analysis.bias_features import component_aucs, delong_auc, group_targets
from zooaudit.errors import ZooauditError
from zooaudit.specs import AuditModelSpec, DatasetSpec
from zooaudit.stages.registry import array_stage


def _brute_delong(x, t):
    pos, neg = x[t], x[~t]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    v10, v01 = psi.mean(1), psi.mean(0)
    return psi.mean(), v10.var(ddof=1) / len(pos) + v01.var(ddof=1) / len(neg)


def test_delong_against_sklearn_and_the_pairwise_kernel():
    rng = np.random.default_rng(0)
    t = rng.random(120) < 0.4
    X = np.stack([t + rng.normal(0, 1, 120), rng.normal(0, 1, 120), -2 * t + rng.normal(0, 1, 120),
                  np.round(rng.normal(0, 1, 120))], 1)       # last column: many ties
    auc, ci, p = delong_auc(X, t)
    for j in range(X.shape[1]):
        assert auc[j] == pytest.approx(roc_auc_score(t, X[:, j]), abs=1e-12)
        a, var = _brute_delong(X[:, j], t)
        half = 1.959963984540054 * np.sqrt(var)
        np.testing.assert_allclose(ci[j], np.clip([a - half, a + half], 0, 1), atol=1e-12)
    assert p[0] < 1e-6 and p[2] < 1e-6 and p[1] > 0.01
    assert auc[2] < 0.2      # reversed sign: separates too


def test_component_aucs_min_n_and_targets():
    rng = np.random.default_rng(1)
    codes = rng.normal(size=(100, 3))
    targets = {"rare": np.arange(100) < 5, "half": np.arange(100) < 50}
    ds = component_aucs(codes, targets, min_group_size=20)
    assert bool(ds["small"].sel(target="rare")) and np.isnan(ds["p_value"].sel(target="rare")).all()
    assert np.isfinite(ds["auc"].sel(target="rare")).all() and np.isfinite(ds["p_value"].sel(target="half")).all()
    assert list(group_targets(np.array([0, 1, 1]), ["red", "green"], "colour")) == ["colour=green"]
    assert list(group_targets(np.array([0, 1, 2]), [], "bg")) == ["bg=0", "bg=1", "bg=2"]
    with pytest.raises(ZooauditError, match="single value"):
        group_targets(np.zeros(4, int), [], "colour")


def test_bias_features_stage_after_factorize(shared_store):
    spec = AuditModelSpec(model="builtin:cnn-colored-w16-s0", store=shared_store, shard_size=100,
                          datasets=[DatasetSpec(name="colored-digits", max_samples=300)],
                          factorize={"k": 4, "methods": ["pca"], "seeds": [0]},
                          bias={"probes": False, "measures": ["components"]})
    ref, _ = stages.run_model_stages(stages.plan_extraction(spec, spec.datasets[0]), spec)
    stage = array_stage("bias-features")
    assert stage.after == ("factorize",)
    with pytest.raises(ZooauditError, match="run the factorize stage first"):
        stage.run(ref, stage.spec_of(spec.model_copy(update={"factorize": spec.factorize.model_copy(
            update={"k": 3})})))
    fact = stages.run_factorize(ref, spec.factorize)
    res = stage.run(ref, stage.spec_of(spec))
    top = res.summary["top_components"]
    assert set(top) == {"colour=green", "error"}
    # the colour shortcut lives in the network: some component separates the colour almost perfectly
    assert abs(top["colour=green"][0]["auc"] - 0.5) > 0.4 and top["colour=green"][0]["flagged"]
    snap = ref.repository.session(res.snapshot).store
    ds = xr.open_zarr(snap, group=layout.bias_group(ref.ds_key, "features"), consolidated=False)
    assert {"target", "feature", "ci"} <= set(ds.dims)
    assert ds.sizes["feature"] == sum(min(4, ref.shapes[layer][-1]) for layer in ref.layers)   # k clipped (head: 2)
    assert set(ds["method"].values) == {"pca"}
    assert int(ds["rank"].sel(target="error").min()) == 0
    assert stage.run(ref, stage.spec_of(spec)).skipped
    # the report section, from the committed results only
    from zooaudit.report import build_report

    bspec = spec.bias.model_copy(update={"measures": ["amplification", "contextual", "shortcut"], "n_boot": 20,
                                         "n_permutations": 50})
    with pytest.raises(ZooauditError, match="No counterfactual predictions"):
        stages.run_bias(ref, bspec)           # the model stage was not asked for them
    full = spec.model_copy(update={"bias": bspec})
    ref, _ = stages.run_model_stages(stages.plan_extraction(full, full.datasets[0]), full)
    bias = stages.run_bias(ref, bspec)
    audit = SimpleNamespace(model=ref.model_uri, refs=[ref], results=[fact, bias, res])
    index = build_report(ref.store, {"test": "bias-measures"}, [audit], [], run_id="bfeat")
    from pathlib import Path

    from zooaudit.report import model_page_name

    page = (Path(index).parent / model_page_name(ref.model_key)).read_text()   # the model's page of the site
    for text in ("Bias amplification of colour", "Contextual bias", "Shortcut reliance", "Components that carry",
                 "(gallery row ",
                 f"{ref.model_key}-{ref.ds_key}-shortcut-colour.png"):
        assert text in page, text


def test_component_blocks_give_the_same_aucs(monkeypatch):
    import zooaudit.stages.bias_features as bf
    from zooaudit.specs import BiasSpec

    rng = np.random.default_rng(2)
    codes = xr.DataArray(rng.normal(size=(80, 10)), dims=("sample", "component"))
    targets = {"t": rng.random(80) < 0.5}
    whole = component_aucs(codes.values, targets, min_group_size=5)
    monkeypatch.setattr(bf, "COMPONENT_BLOCK", 3)
    blocks = bf._block_aucs(codes, targets, BiasSpec(min_group_size=5))
    np.testing.assert_allclose(blocks["auc"].values, whole["auc"].values)
    np.testing.assert_allclose(blocks["p_value"].values, whole["p_value"].values)
    assert blocks["component"].values.tolist() == list(range(10))


def test_every_factorization_skipped_is_recorded_not_an_error(shared_store, monkeypatch):
    spec = AuditModelSpec(model="builtin:cnn-colored-w16-s0", store=shared_store, shard_size=100,
                          datasets=[DatasetSpec(name="colored-digits", max_samples=300)],
                          factorize={"k": 2, "methods": ["eigencam", "pca"], "seeds": [0]},
                          bias={"probes": False, "measures": ["components"]})
    ref, _ = stages.run_model_stages(stages.plan_extraction(spec, spec.datasets[0]), spec)
    only_layer = type(ref)(**{**ref.__dict__, "layers": []})
    stage = array_stage("bias-features")
    assert stage.key(only_layer, stage.spec_of(spec)) is None          # no layers: nothing to rank
    stages.run_factorize(ref, spec.factorize)
    import zooaudit.stages.bias_features as bf

    monkeypatch.setattr(bf, "_codes", lambda *a: None)                   # as if factorize skipped them all
    res = stage.run(ref, stage.spec_of(spec))
    assert res.summary["top_components"] == {} and len(res.summary["skipped"]) == len(ref.layers)
    assert stage.run(ref, stage.spec_of(spec)).skipped
