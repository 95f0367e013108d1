"""The stages without Prefect: shards written through forks equal a direct forward pass."""

import numpy as np
import pytest
import torch
import xarray as xr

from zooaudit import layout, stages
from zooaudit.data import load_dataset
from zooaudit.errors import ZooauditError
from zooaudit.extract import forward_batches, select_layers
from zooaudit.specs import AuditModelSpec, DatasetSpec, SimilaritySpec
from zooaudit.store import Store, find_commit


def _spec(store_url, **kw):
    kw.setdefault("datasets", [DatasetSpec(name="digits", max_samples=150)])
    return AuditModelSpec(model="builtin:cnn-w8-s0", store=store_url, shard_size=64, batch_size=20,
                          task_runner="threads", **kw)


def _run_activations(plan):
    return stages.run_activations(plan)


def test_sharded_activations_equal_direct_forward(shared_store):
    spec = _spec(shared_store, layers=["act*", "embed"], pooling="flatten")
    plan = stages.plan_extraction(spec, spec.datasets[0])
    assert plan.layers == ["act1", "act2", "embed"] and len(plan.shards) == 3
    res = _run_activations(plan)
    assert res.summary["nonfinite"] == {layer: 0 for layer in plan.layers}
    model = stages.load_model(spec.model, plan.store).module
    data = load_dataset(spec.datasets[0])
    captured = {}
    hooks = [dict(model.named_modules())[n].register_forward_hook(
        lambda m, i, o, n=n: captured.__setitem__(n, o.detach().flatten(1).numpy())) for n in plan.layers]
    with torch.no_grad():
        logits = model(torch.from_numpy(data.inputs)).numpy()
    for h in hooks:
        h.remove()
    repo = Store(plan.store).model_repo(plan.model_key)
    session = repo.readonly_session(snapshot_id=res.snapshot)
    for layer in plan.layers:
        stored = layout.open_activations(session.store, plan.ds_key, layer)
        assert stored.dims[0] == "sample"
        np.testing.assert_array_equal(stored["sample"].values, data.sample_ids)
        np.testing.assert_allclose(stored.values, captured[layer], rtol=1e-5, atol=1e-6)
    out = xr.open_zarr(session.store, group=layout.outputs_group(plan.ds_key), consolidated=False).load()
    np.testing.assert_allclose(out["logits"].values, logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out["prediction"].values, logits.argmax(1))
    # no staging branch is left behind, main carries the cache key
    assert repo.list_branches() == {"main"}
    assert find_commit(repo, plan.cache_key) == res.snapshot


def test_batch_size_invariance(shared_store):
    model = stages.load_model("builtin:cnn-w8-s0", Store.open(shared_store).url).module
    x = load_dataset(DatasetSpec(name="digits", max_samples=70)).inputs
    ref, _ = forward_batches(model, x, ["act2", "embed"], batch_size=64)
    for bs in (1, 7):
        got, _ = forward_batches(model, x, ["act2", "embed"], batch_size=bs)
        for k in ref:
            np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-6)


def test_bf16_autocast_forward_is_close_to_float32_and_keyed_apart(shared_store):
    """bf16 autocast (CPU here; the same path runs on CUDA): float32 results within bf16
    precision (8 mantissa bits), a cache key of its own, and a clear error for bad names."""
    model = stages.load_model("builtin:cnn-w8-s0", Store.open(shared_store).url).module
    x = load_dataset(DatasetSpec(name="digits", max_samples=40)).inputs
    ref, ref_out = forward_batches(model, x, ["act2", "embed"], batch_size=16)
    got, got_out = forward_batches(model, x, ["act2", "embed"], batch_size=16, autocast="bf16")
    for k in ref:
        assert got[k].dtype == np.float32
        assert not np.array_equal(got[k], ref[k])          # autocast really ran in bf16
        scale = np.abs(ref[k]).max()
        np.testing.assert_allclose(got[k], ref[k], atol=0.05 * scale)
    np.testing.assert_array_equal(got_out.argmax(1), ref_out.argmax(1))
    with pytest.raises(ZooauditError, match="Allowed: none, bf16, fp16"):
        forward_batches(model, x, ["embed"], autocast="fp8")
    plain = stages.plan_extraction(_spec(shared_store), DatasetSpec(name="digits", max_samples=150))
    mixed = stages.plan_extraction(_spec(shared_store, autocast="bf16"), DatasetSpec(name="digits", max_samples=150))
    assert mixed.autocast == "bf16" and mixed.cache_key != plain.cache_key


def test_forward_stops_after_last_layer_when_outputs_not_needed(shared_store):
    model = stages.load_model("builtin:mlp-w32-s0", Store.open(shared_store).url).module
    called = []
    h = model.head.register_forward_hook(lambda *a: called.append(1))
    acts, out = forward_batches(model, np.zeros((4, 1, 8, 8), np.float32), ["act1"], with_outputs=False)
    h.remove()
    assert out is None and not called and acts["act1"].shape == (4, 32)


def test_bad_layer_lists_valid_layers(shared_store):
    model = stages.load_model("builtin:mlp-w32-s0", Store.open(shared_store).url).module
    with pytest.raises(ZooauditError, match=r"'conv9' is not in the model.*fc1, act1, fc2, embed, head"):
        select_layers(model, ["conv9"])


def test_model_dataset_shape_mismatch_is_explained(shared_store):
    spec = _spec(shared_store, datasets=[DatasetSpec(name="colored-digits")])
    with pytest.raises(ZooauditError, match=r"takes inputs of shape \(1, 8, 8\)"):
        stages.validate_model(spec)


def test_colored_digits_construction():
    flip = load_dataset(DatasetSpec(name="colored-digits", split="train", color_flip=0.1, label_noise=0.25))
    balanced = load_dataset(DatasetSpec(name="colored-digits", split="test"))
    agree = (flip.groups["colour"] == flip.labels).mean()
    assert 0.85 < agree < 0.95
    assert 0.4 < (balanced.groups["colour"] == balanced.labels).mean() < 0.6
    # the image sits in the channel named by its colour; the other channel is empty
    x, c = flip.inputs, flip.groups["colour"]
    assert np.all(x[np.arange(len(c)), 1 - c].max(axis=(1, 2)) == 0)
    assert set(np.unique(flip.labels)) == {0, 1}


def test_concurrent_extraction_on_a_shared_model_does_not_mix_batches(shared_store):
    """Tasks on threads share the cached module; each must record only its own pass."""
    from concurrent.futures import ThreadPoolExecutor

    model = stages.load_model("builtin:mlp-w32-s0", Store.open(shared_store).url).module
    rng = np.random.default_rng(0)
    inputs = [rng.random((50, 1, 8, 8), dtype=np.float32) for _ in range(8)]
    ref = [forward_batches(model, x, ["act1", "embed"], batch_size=7)[0] for x in inputs]
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda x: forward_batches(model, x, ["act1", "embed"], batch_size=7)[0], inputs))
    for r, g in zip(ref, got):
        for k in r:
            np.testing.assert_array_equal(r[k], g[k])


@pytest.mark.parametrize("control", ["shuffle", "random_init"])
def test_similarity_controls(shared_store, control):
    """Every similarity is reported beside a control; trained-vs-untrained CKA is lower than self-CKA."""
    from zooaudit.stages.similarity import layer_similarity

    sspec = SimilaritySpec(metrics=["linear_cka"], control=control, control_max_samples=150, random_state=0)
    spec = _spec(shared_store, datasets=[DatasetSpec(name="digits", max_samples=200)], similarity=sspec)
    plan, _ = stages.run_model_stages(stages.plan_extraction(spec, spec.datasets[0]), spec)  # the control too
    model = stages.load_model(spec.model, plan.store).module
    acts, _ = forward_batches(model, load_dataset(spec.datasets[0]).inputs, list(plan.layers), with_outputs=False)
    layers = {k: v.reshape(len(v), -1) for k, v in acts.items()}
    ds = layer_similarity(plan, layers, sspec)["linear_cka"]
    assert ds["control"].dims == ("layer_a", "layer_b") and ds.attrs["control_n"] == 150
    assert list(ds["control"].layer_b.values) == list(plan.layers)
    np.testing.assert_allclose(np.diag(ds["value"].values), 1.0, atol=1e-9)
    ctrl_diag = np.diag(ds["control"].values)
    assert np.all(ctrl_diag < 0.999)
    if control == "shuffle":
        assert np.all(ds["control"].values < 0.2)


def test_nonfinite_activations_are_counted_per_layer(shared_store, monkeypatch):
    spec = _spec(shared_store, layers=["act1", "embed"], datasets=[DatasetSpec(name="digits", max_samples=100)])
    plan = stages.plan_extraction(spec, spec.datasets[0])
    model = stages.load_model(spec.model, plan.store).module
    # make act1 produce NaN for inputs whose first pixel is non-zero (a real model bug, simulated)
    h = model.act1.register_forward_hook(lambda m, i, o: o.masked_fill(i[0][:, :1, :1, :1] > 0, float("nan")))
    try:
        res = _run_activations(plan)
    finally:
        h.remove()
    assert res.summary["nonfinite"]["embed"] > 0 or res.summary["nonfinite"]["act1"] > 0
    repo = Store(plan.store).model_repo(plan.model_key)
    acts = layout.open_activations(repo.readonly_session(snapshot_id=res.snapshot).store, plan.ds_key, "act1")
    assert int(np.isnan(acts.values).sum()) == res.summary["nonfinite"]["act1"]
