"""The bias stage's amplification, contextual-bias and shortcut tables on the colored-digits builtin models."""

from types import SimpleNamespace

import pydantic
import pytest
import xarray as xr

from zooaudit import layout, stages
from zooaudit.errors import ZooauditError
from zooaudit.report.bias_measures import measures_sweep_section, zoo_measures_table
from zooaudit.specs import AuditModelSpec, BiasSpec, DatasetSpec
from zooaudit.stages.amplification import training_spec
from zooaudit.store import Store
from zooaudit.zoo.catalog import shortcut_sweep

FAST = {"n_boot": 40, "n_permutations": 100, "probes": False, "measures": ["amplification", "contextual", "shortcut"]}


def _ref(store, model):
    spec = AuditModelSpec(model=model, store=store, shard_size=100,
                          datasets=[DatasetSpec(name="colored-digits", max_samples=300)], bias=FAST)
    return spec, stages.run_model_stages(stages.plan_extraction(spec, spec.datasets[0]), spec)[0]


def test_amplification_tables_of_the_colour_shortcut(shared_store):
    spec, ref = _ref(shared_store, "builtin:cnn-colored-w16-s0")
    # auto: the builtin records its training data (colour agrees with the label 90% of the time)
    assert training_spec(ref, spec.bias).color_flip == 0.1
    res = stages.run_bias(ref, spec.bias)
    amp = res.summary["colour"]["amplification"]
    assert amp["directional_at"]["value"] > 0.3 and amp["directional_at"]["flagged"]
    assert amp["mals"]["flagged"] and amp["directional_ta"]["value"] is None   # colour is not predicted
    top = res.summary["colour"]["contextual"][0]
    assert top["bias"] > 2 and top["acc_exclusive"] < 0.3 < top["acc_cooccur"]
    snap = Store(ref.store).model_repo(ref.model_key).readonly_session(snapshot_id=res.snapshot).store
    ds = xr.open_zarr(snap, group=f"{layout.bias_group(ref.ds_key, 'amplification')}/colour", consolidated=False)
    assert {"measure", "ci", "attribute", "task", "label_set"} <= set(ds.dims)
    assert ds.attrs["adjusted_over"].startswith("every amplification measure")
    ctx = xr.open_zarr(snap, group=f"{layout.bias_group(ref.ds_key, 'contextual')}/colour", consolidated=False)
    assert set(ctx["context"].values) == {"red", "green"} and bool(ctx["most_biased"][0])
    # shortcut: the partners (same digits, the other colour) were predicted on the model side
    assert "counterfactual" in ref.controls
    cut = res.summary["colour"]["shortcut"]
    assert cut["flip_rate"] > 0.8 and cut["cf_accuracy"] < cut["accuracy"]
    assert cut["worst_minority_counterfactual"] < 0.2
    sc = xr.open_zarr(snap, group=f"{layout.bias_group(ref.ds_key, 'shortcut')}/colour", consolidated=False)
    assert {"group", "cell", "ci"} <= set(sc.dims) and sc["minority"].values.sum() == 2
    again = stages.run_bias(ref, spec.bias)
    assert again.skipped and again.summary == res.summary


def test_amplification_contextual_bias_and_flip_rate_rise_with_the_shortcut_strength(shared_store):
    amp, ctx, flips, audits = [], [], [], []
    for flip, uri in shortcut_sweep().items():   # strongest shortcut (smallest flip) first
        spec, ref = _ref(shared_store, uri)
        res = stages.run_bias(ref, spec.bias.model_copy(update={"n_boot": 0, "n_permutations": 0}))
        audits.append(SimpleNamespace(model=uri, refs=[ref], results=[res]))
        s = res.summary["colour"]
        amp.append(s["amplification"]["directional_at"]["value"])
        ctx.append(s["contextual"][0]["bias"])
        flips.append(s["shortcut"]["flip_rate"])
    assert amp == sorted(amp, reverse=True) and amp[0] > 2 * amp[-1]
    assert ctx == sorted(ctx, reverse=True)
    assert flips == sorted(flips, reverse=True) and flips[0] > 2 * flips[-1]
    files: dict = {}
    (sweep,) = measures_sweep_section(audits, files)
    assert files["bias-measures-sweep.png"][:8] == b"\x89PNG\r\n\x1a\n" and "bias-measures-sweep.png" in sweep
    (table,) = zoo_measures_table(audits)
    assert table.index(shortcut_sweep()[0.1]) < table.index(shortcut_sweep()[0.5])   # ranked, strongest first


def test_training_side_errors(shared_store):
    _, ref = _ref(shared_store, "builtin:cnn-colored-w16-s0")
    with pytest.raises(pydantic.ValidationError, match="need a training side"):
        BiasSpec(train_split=None)
    assert BiasSpec(train_split=None, measures=["shortcut"]).measures == ["shortcut"]
    with pytest.raises(ZooauditError, match="train_options"):
        training_spec(ref, BiasSpec(train_split="train", train_options={"colour_flip": 0.1}))
    assert training_spec(ref, BiasSpec(train_split="train", train_options={"color_flip": 0.2})).color_flip == 0.2
    no_record = type(ref)(**{**ref.__dict__, "model_info": {}})
    with pytest.raises(ZooauditError, match="records no training data"):
        training_spec(no_record, BiasSpec(train_split="model"))
    assert training_spec(no_record, BiasSpec()).split == "train"


def test_amplification_regression_rule_and_event():
    import numpy as np

    from zooaudit.stages.amplification import as_disparities
    from zooaudit.stages.bias import regressions
    from zooaudit_flows.events import find_regressions

    def table(values, ci, reject):
        return xr.Dataset({"value": ("measure", values), "value_ci": (("measure", "ci"), ci),
                           "reject": ("measure", reject)}, coords={"measure": ["mals", "directional_at"]})

    prev = table([0.1, 0.2], [[0.05, 0.15], [0.1, 0.3]], [True, True])
    cur = table([0.4, 0.25], np.full((2, 2), np.nan), [True, True])
    assert regressions(as_disparities(cur), as_disparities(prev)) == ["mals"]   # 0.25 is inside [0.1, 0.3]
    assert regressions(as_disparities(cur.assign(reject=("measure", [False, False]))), as_disparities(prev)) == []
    summary = {"colour": {"regressions": [], "measure_regressions": ["amplification:mals"],
                          "amplification": {"mals": {"value": 0.4, "p_adjusted": 0.01, "flagged": True}}}}
    result = SimpleNamespace(stage="bias", skipped=False, dataset="ds", snapshot="S", summary=summary)
    (event,) = find_regressions.fn([SimpleNamespace(model="m", refs=[], results=[result])], 0.1)
    assert event["metric"] == "bias:colour:amplification:mals"
    assert event["payload"]["kind"] == "bias-amplification" and event["payload"]["value"] == 0.4
