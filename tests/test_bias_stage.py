"""The bias stage end to end without Prefect: prediction-level, representation-level, regression."""

import pytest
import xarray as xr

from zooaudit import layout, stages
from zooaudit.specs import AuditModelSpec, DatasetSpec
from zooaudit.stages.bias import regressions
from zooaudit.store import Store


@pytest.fixture(scope="module")
def audited(shared_store):
    spec = AuditModelSpec(model="builtin:cnn-colored-w16-s0", store=shared_store, shard_size=100,
                          datasets=[DatasetSpec(name="colored-digits", max_samples=300)],
                          bias={"n_boot": 50, "n_permutations": 200, "probe_cv": 3})
    ref, _ = stages.run_model_stages(stages.plan_extraction(spec, spec.datasets[0]), spec)
    return spec, ref, ref


def test_bias_stage_writes_every_table_and_flags_the_shortcut(audited):
    spec, plan, acts = audited
    res = stages.run_bias(plan, spec.bias)
    s = res.summary["colour"]
    assert s["worst_group_accuracy"] < 0.3 < s["overall_accuracy"]
    assert s["disparities"]["demographic_parity"]["flagged"]          # the colour shortcut is detected
    probes = s["probe_accuracy"]
    assert set(probes) == {"activations", "shuffled_labels", "inputs", "random_init"}
    assert all(abs(v - 0.5) < 0.15 for v in probes["shuffled_labels"].values())   # chance
    assert s["output_leakage"]["leakage"] > s["output_leakage"]["chance"] + 0.2
    repo = Store(plan.store).model_repo(plan.model_key)
    snap = repo.readonly_session(snapshot_id=res.snapshot).store
    for group, dims in [(layout.bias_group(plan.ds_key, "colour"), {"group", "cell", "metric", "ci"}),
                        (f"{layout.bias_group(plan.ds_key, 'probes')}/colour", {"layer", "probe"}),
                        (f"{layout.bias_group(plan.ds_key, 'erasure')}/colour", {"layer", "stage"}),
                        (layout.bias_group(plan.ds_key, "adjusted"), {"metric"})]:
        ds = xr.open_zarr(snap, group=group, consolidated=False)
        assert dims <= set(ds.dims), (group, ds.dims)
    # rerun: cache hit, same summary
    again = stages.run_bias(plan, spec.bias)
    assert again.skipped and again.summary == res.summary


def test_regression_against_previous_audit_is_detected(audited):
    spec, plan, acts = audited
    first = stages.run_bias(plan, spec.bias.model_copy(update={"n_boot": 40, "probes": False}))
    second = stages.run_bias(plan, spec.bias.model_copy(update={"n_boot": 41, "probes": False}))
    assert second.summary["colour"]["previous_snapshot"] is not None
    assert second.summary["colour"]["regressions"] == []     # same model: nothing got worse
    assert first.snapshot != second.snapshot


def test_regressions_rule():
    metric = ["demographic_parity", "accuracy"]
    prev = xr.Dataset({"difference": ("metric", [0.1, 0.05]),
                       "difference_ci": (("metric", "ci"), [[0.05, 0.15], [0.01, 0.09]]),
                       "reject": ("metric", [True, False])}, coords={"metric": metric})
    cur = xr.Dataset({"difference": ("metric", [0.4, 0.08]), "reject": ("metric", [True, True])},
                     coords={"metric": metric})
    assert regressions(cur, prev) == ["demographic_parity"]   # 0.08 is inside the previous interval
    assert regressions(cur.assign(reject=("metric", [False, False])), prev) == []
