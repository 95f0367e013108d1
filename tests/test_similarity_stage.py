"""The similarity stages without Prefect, every metric of SimilaritySpec.metrics:
layer × layer, model × model per compare layer, consecutive revisions — each beside
its control, all streamed metrics from one pass over the stored Zarr chunks."""

import numpy as np
import pytest
import xarray as xr
from pydantic import ValidationError

from zooaudit import layout, stages
from zooaudit.analysis import sim_stream
from zooaudit.analysis.similarity import (
    METRICS,
    MINIBATCH_METRICS,
    SAMPLE_PAIR_METRICS,
    STREAMED_METRICS,
)
from zooaudit.errors import ZooauditError
from zooaudit.report.figures import heatmap_png
from zooaudit.report.summary import similarity_table, zoo_markdown
from zooaudit.specs import AuditModelSpec, DatasetSpec, SimilaritySpec
from zooaudit.store import Store

pytestmark = pytest.mark.slow

N = 150
SSPEC = SimilaritySpec(metrics=list(METRICS), control="shuffle", control_max_samples=120,
                       pairwise_max_samples=100)


def _ref(store_url, model, n=N):
    """The model stages (activations and the random-init control) of ``model`` on ``n`` digits."""
    spec = AuditModelSpec(model=model, store=store_url, shard_size=32, batch_size=32, task_runner="threads",
                          datasets=[DatasetSpec(name="digits", max_samples=n)],
                          similarity=SimilaritySpec(control="random_init"))
    return stages.run_model_stages(stages.plan_extraction(spec, spec.datasets[0]), spec)[0]


def _open(repo, snapshot, group):
    return xr.open_zarr(repo.readonly_session(snapshot_id=snapshot).store, group=group, consolidated=False).load()


@pytest.fixture(scope="module")
def audited(shared_store):
    """Activations of three builtin models (two checkpoints of one) on the same 150 digits."""
    refs = [_ref(shared_store, m) for m in ("builtin:mlp-w32-s0", "builtin:mlp-w32-s0@5", "builtin:cnn-w8-s0")]
    return shared_store, refs


def _self_value(metric):
    return 0.0 if metric == "procrustes" else 1.0


def test_spec_rejects_unknown_and_repeated_metrics():
    with pytest.raises(ValidationError, match=r"unknown similarity metric\(s\) \['cka'\]; allowed: linear_cka, "
                                              r"linear_cka_debiased, rbf_cka"):
        SimilaritySpec(metrics=["linear_cka", "cka"])
    with pytest.raises(ValidationError, match="at least one"):
        SimilaritySpec(metrics=[])
    with pytest.raises(ValidationError, match=r"listed twice: \['rsa'\]"):
        SimilaritySpec(metrics=["rsa", "linear_cka", "rsa"])
    with pytest.raises(ValidationError, match="pairwise_max_samples"):
        SimilaritySpec(pairwise_max_samples=50_000)


def test_layer_stage_every_metric_beside_its_control(audited, monkeypatch):
    store_url, plans = audited
    plan = plans[2]   # the CNN: four layers of different widths
    passes = []
    real = sim_stream.iter_row_blocks
    monkeypatch.setattr(sim_stream, "iter_row_blocks", lambda arrays, rows: passes.append(len(arrays)) or
                        real(arrays, rows))
    res = stages.run_similarity(plan, SSPEC)
    # all streamed metrics of every layer pair: one pass over the stored activations, and
    # one over the in-memory control arrays (reference + shuffled copy of every layer)
    assert passes == [len(plan.sample_layers), 2 * len(plan.sample_layers)]
    assert not res.skipped
    repo = Store(store_url).model_repo(plan.model_key)
    layers = plan.sample_layers
    for metric in METRICS:
        ds = _open(repo, res.snapshot, layout.similarity_group(plan.ds_key, metric))
        v, c = ds["value"], ds["control"]
        assert v.dims == c.dims == ("layer_a", "layer_b") and list(v.layer_a.values) == layers
        assert list(c.layer_b.values) == layers
        pair = metric in SAMPLE_PAIR_METRICS   # n×n metrics: within pairwise_max_samples
        assert ds.attrs["n"] == (100 if pair else N) and ds.attrs["control_n"] == (100 if pair else 120)
        assert np.isfinite(v.values).all() and np.isfinite(c.values).all(), metric
        np.testing.assert_allclose(np.diag(v.values), _self_value(metric), atol=1e-6, err_msg=metric)
        if metric != "pwcca":
            np.testing.assert_allclose(v.values, v.values.T, atol=1e-9, err_msg=metric)
        # the shuffled control is unrelated data: far from the self-value on the diagonal
        assert np.all(np.abs(np.diag(c.values) - _self_value(metric)) > 0.05), metric
        assert res.summary[metric]["kind"] == ("distance" if metric == "procrustes" else "similarity")
    # the committed value is the library's value on the stored activations
    session = Store(store_url).model_repo(plan.model_key).readonly_session(snapshot_id=plan.snapshot)
    acts = {l: layout.open_activations(session.store, plan.ds_key, l).values for l in layers}
    from zooaudit.analysis.similarity import linear_cka, svcca
    ds = _open(repo, res.snapshot, layout.similarity_group(plan.ds_key, "svcca"))
    assert float(ds["value"].values[0, -1]) == pytest.approx(svcca(acts[layers[0]], acts[layers[-1]]), abs=1e-10)
    ds = _open(repo, res.snapshot, layout.similarity_group(plan.ds_key, "linear_cka_debiased"))
    assert float(ds["value"].values[1, 2]) == pytest.approx(
        linear_cka(acts[layers[1]], acts[layers[2]], debiased=True), abs=1e-9)
    rows = similarity_table([res])
    assert len(rows) == len(METRICS) * len(layers) * (len(layers) - 1) // 2
    assert {r["metric"] for r in rows} == set(METRICS) and all(r["control"] is not None for r in rows)
    assert stages.run_similarity(plan, SSPEC).skipped


def test_zoo_and_revision_stages_every_metric(audited):
    store_url, plans = audited
    zoo = stages.run_zoo_similarity(plans, ["embed"], SSPEC)
    repo = Store(store_url).zoo_repo()
    models = [p.model_uri for p in plans]
    for metric in METRICS:
        ds = _open(repo, zoo.snapshot, zoo.summary["groups"][metric])
        assert ds["value"].dims == ds["control"].dims == ("model_a", "layer_a", "model_b", "layer_b")
        m = ds["value"].sel(layer_a="embed", layer_b="embed")
        assert list(m.model_a.values) == models and np.isfinite(m.values).all()
        np.testing.assert_allclose(np.diag(m.values), _self_value(metric), atol=1e-6, err_msg=metric)
        ctrl = ds["control"].sel(layer_a="embed", layer_b="embed").values
        assert np.all(np.abs(np.diag(ctrl) - _self_value(metric)) > 0.05), metric
    assert zoo.summary["control"]["linear_cka"]["embed"]
    md = zoo_markdown([], [zoo], "report.html")
    assert "Control (shuffled samples), rsa, layer `embed`" in md

    revs = stages.run_revision_similarity(plans, SSPEC)
    family = revs.summary["families"]["builtin:mlp-w32-s0"]
    assert set(family) == set(METRICS)
    zoo_cka = _open(repo, zoo.snapshot, zoo.summary["groups"]["linear_cka"])["value"]
    for metric in METRICS:
        ds = _open(repo, revs.snapshot, family[metric]["group"])
        assert ds["value"].dims == ds["control"].dims == ("step", "layer")
        assert list(ds["step"].values) == ["5→15"] and np.isfinite(ds["value"].values).all()
    # revision similarity of a layer = the model × model entry of the two checkpoints
    rv = _open(repo, revs.snapshot, family["linear_cka"]["group"])["value"].sel(layer="embed").values[0]
    assert rv == pytest.approx(float(zoo_cka.sel(model_a=models[1], layer_a="embed", model_b=models[0],
                                                 layer_b="embed")), abs=1e-12)
    rows = similarity_table([zoo, revs])
    assert {r["stage"] for r in rows} == {"zoo-similarity", "revision-similarity"}


def test_mismatched_samples_across_models_is_an_error_and_commits_nothing(audited):
    store_url, plans = audited
    other = _ref(store_url, "builtin:mlp-w64-s0", n=N - 10)
    repo = Store(store_url).zoo_repo()
    before = len(list(repo.ancestry(branch="main")))
    with pytest.raises(ZooauditError, match="different samples"):
        stages.run_zoo_similarity([plans[0], other], ["embed"], SSPEC)
    assert len(list(repo.ancestry(branch="main"))) == before


def test_heat_maps_for_distances_negative_values_and_nan():
    m = xr.DataArray([[0.0, 0.7], [0.7, np.nan]], dims=("layer_a", "layer_b"),
                     coords={"layer_a": ["a", "b"], "layer_b": ["a", "b"]}, attrs={"kind": "distance"})
    assert heatmap_png(m, "procrustes")[:4] == b"\x89PNG"
    assert heatmap_png(-m.fillna(0), "debiased", kind="similarity")[:4] == b"\x89PNG"


def test_streamed_metric_sets_are_a_partition():
    """Streamed (one joint pass), minibatch (every sample, b×b Grams) and sample-pair (a
    subset, n×n) metrics: each metric in exactly one group."""
    groups = [set(STREAMED_METRICS), set(MINIBATCH_METRICS), set(SAMPLE_PAIR_METRICS)]
    assert set.union(*groups) == set(METRICS)
    assert sum(len(g) for g in groups) == len(METRICS)
    assert MINIBATCH_METRICS == ("minibatch_cka",)


def _stored(store_url, plan, snapshot):
    session = Store(store_url).model_repo(plan.model_key).readonly_session(snapshot_id=snapshot)
    return {l: layout.open_activations(session.store, plan.ds_key, l).values for l in plan.sample_layers}


def test_minibatch_cka_stage_estimates_debiased_cka(audited):
    """minibatch_cka in the pipeline: the kernel's debiased CKA over every sample (exactly,
    with one minibatch), estimated from several minibatches; deterministic (seeded)."""
    from zooaudit.analysis.similarity import rbf_cka

    store_url, plans = audited
    plan = plans[2]
    repo = Store(store_url).model_repo(plan.model_key)

    def committed(metric, **opts):
        sspec = SimilaritySpec(metrics=["linear_cka_debiased", metric], control="none", **opts)
        res = stages.run_similarity(plan, sspec)
        return (_open(repo, res.snapshot, layout.similarity_group(plan.ds_key, metric)),
                _open(repo, res.snapshot, layout.similarity_group(plan.ds_key, "linear_cka_debiased")))

    several, debiased = committed("minibatch_cka", minibatch_size=40)       # 3 minibatches of 50
    assert several.attrs["n"] == N and several.attrs["batch_size"] == 40 and several.attrs["kernel"] == "linear"
    np.testing.assert_allclose(several["value"].values, debiased["value"].values, atol=0.03)
    assert np.abs(several["value"].values - debiased["value"].values).max() > 1e-6   # an estimate, not a copy
    one, _ = committed("minibatch_cka", minibatch_size=1024)                # one minibatch of all 150
    np.testing.assert_allclose(one["value"].values, debiased["value"].values, atol=1e-9)
    rbf, _ = committed("minibatch_cka", minibatch_size=1024, minibatch_kernel="rbf")
    acts = _stored(store_url, plan, plan.snapshot)
    a, b = plan.sample_layers[0], plan.sample_layers[2]
    assert rbf.attrs["kernel"] == "rbf"
    assert float(rbf["value"].sel(layer_a=a, layer_b=b)) == pytest.approx(
        rbf_cka(acts[a].reshape(N, -1), acts[b].reshape(N, -1), debiased=True), abs=1e-9)
    again, _ = committed("minibatch_cka", minibatch_size=40, random_state=0)
    np.testing.assert_array_equal(again["value"].values, several["value"].values)
    with pytest.raises(ValidationError, match="minibatch_size"):
        SimilaritySpec(metrics=["minibatch_cka"], minibatch_size=2)


def test_random_init_controls_within_model_zoo_and_revisions(audited):
    """control='random_init': each layer against a seeded random-initialised copy of the
    (second) model on the same samples — far below the trained models' similarity."""
    import torch

    from zooaudit.analysis.similarity import linear_cka
    from zooaudit.data import load_dataset
    from zooaudit.extract import forward_batches
    from zooaudit.zoo import resolve_model
    from zooaudit.zoo.builtin import RANDOM_INIT_SEED_OFFSET

    store_url, plans = audited
    sspec = SimilaritySpec(metrics=["linear_cka", "minibatch_cka"], control="random_init",
                           control_max_samples=120, minibatch_size=50)
    seed = 0 + RANDOM_INIT_SEED_OFFSET                                     # builtin training seed 0
    plan = plans[0]
    res = stages.run_similarity(plan, sspec)
    ds = _open(Store(store_url).model_repo(plan.model_key), res.snapshot,
               layout.similarity_group(plan.ds_key, "linear_cka"))
    assert ds.attrs["control"] == "random_init" and ds.attrs["random_init_seed"] == seed
    assert ds.attrs["control_n"] == 120
    # the committed control is the library's CKA of the stored layer against a fresh
    # random-init copy's activations on the same recorded subset (same seed → same copy)
    idx = np.sort(np.random.default_rng(0).choice(N, 120, replace=False))
    model = resolve_model(plan.model_uri, Store(store_url))
    torch.manual_seed(123)                                                 # the copy's seed is its own
    rand, _ = forward_batches(model.random_init(), load_dataset(plan.dataset).inputs[idx], plan.sample_layers,
                              pooling=plan.pooling, with_outputs=False)
    acts = _stored(store_url, plan, plan.snapshot)
    layer = plan.sample_layers[1]
    assert float(ds["control"].sel(layer_a=layer, layer_b=layer)) == pytest.approx(
        linear_cka(acts[layer][idx], rand[layer]), abs=1e-9)
    assert np.all(np.diag(ds["control"].values) < 0.9)                    # the value's diagonal is 1

    zoo = stages.run_zoo_similarity(plans, ["embed"], sspec)
    repo = Store(store_url).zoo_repo()
    for metric in sspec.metrics:
        z = _open(repo, zoo.snapshot, zoo.summary["groups"][metric])
        assert z.attrs["control"] == "random_init" and list(z.attrs["random_init_seed"]) == [seed] * 3
        value = z["value"].sel(layer_a="embed", layer_b="embed").values
        control = z["control"].sel(layer_a="embed", layer_b="embed").values
        assert np.isfinite(control).all() and value.min() > 0.75, metric
        assert np.all(control < value - 0.2), (metric, value, control)       # every (model_a, model_b) pair
    assert "Control (random-init copy of the second model), linear_cka" in zoo_markdown([], [zoo], "r.html")

    revs = stages.run_revision_similarity(plans, sspec)
    family = revs.summary["families"]["builtin:mlp-w32-s0"]
    for metric in sspec.metrics:
        r = _open(repo, revs.snapshot, family[metric]["group"])
        assert r.attrs["control"] == "random_init" and list(r.attrs["random_init_seed"]) == [seed]
        assert np.all(r["control"].values < r["value"].values - 0.2), metric
        assert family[metric]["control_kind"] == "random_init"


def test_degenerate_cca_is_recorded_with_the_result(shared_store):
    """More features than samples: every canonical correlation is 1; the stage says so."""
    ref = _ref(shared_store, "builtin:cnn-w8-s0", n=40)
    sspec = SimilaritySpec(metrics=["cca", "linear_cka"], control="none")
    res = stages.run_similarity(ref, sspec)
    assert any(w.startswith("DegenerateCCAWarning: cca:") and "every canonical correlation is 1" in w
               for w in res.summary["warnings"])
    assert similarity_table([res])   # the list of warnings is not mistaken for a metric


def test_stage_streams_moments_on_torch_when_the_device_is_cuda(audited, monkeypatch):
    """The run's device reaches the joint moments: stand CPU torch in for CUDA (no GPU in
    tests) and the stage accumulates on torch, committing the NumPy path's values."""
    import torch

    from zooaudit.analysis import sim_torch
    from zooaudit.stages import similarity as sim_stage

    store_url, plans = audited
    plan = plans[2]
    assert sim_stage.moments_device("cpu") is None
    if not torch.cuda.is_available():   # a CPU worker of a GPU run: NumPy, not an error
        assert sim_stage.moments_device("cuda") is None and sim_stage.moments_device("auto") is None
    sspec = SimilaritySpec(metrics=["linear_cka", "linear_cka_debiased", "cca"], control="none")
    repo = Store(store_url).model_repo(plan.model_key)
    numpy_run = stages.run_similarity(plan, sspec)
    updates = []
    real = sim_torch.TorchJointGram.update
    monkeypatch.setattr(sim_torch.TorchJointGram, "update", lambda self, *a, **k: updates.append(1) or real(self, *a, **k))
    monkeypatch.setattr(sim_stage, "moments_device", lambda device: torch.device("cpu"))
    torch_run = stages.run_similarity(plan, sspec.model_copy(update={"random_state": 1}))
    assert updates and not torch_run.skipped
    for metric in sspec.metrics:
        group = layout.similarity_group(plan.ds_key, metric)
        np.testing.assert_allclose(_open(repo, torch_run.snapshot, group)["value"].values,
                                   _open(repo, numpy_run.snapshot, group)["value"].values, atol=1e-6, err_msg=metric)
