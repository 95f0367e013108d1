"""Deployments: schedules with their own parameters, spec forms, rejection of bad values,
runs triggered through the API on a real server and runner, and the regression event with
the automation that reacts to it."""

import json
import shutil
import time
import urllib.request

import pytest

from zooaudit.errors import ZooauditError
from zooaudit.specs import AuditZooSpec

MODEL = "builtin:mlp-w32-s0"


def _small(store_url, **kw):
    return {"store": store_url, "task_runner": "threads", "shard_size": 40, "batch_size": 40,
            "datasets": [{"name": "digits", "max_samples": 80}], "factorize": {"k": 3, "methods": ["pca"]},
            "similarity": {"control": "none"}, **kw}


def test_nightly_schedules_carry_their_own_validated_parameters(tmp_path, monkeypatch):
    from zooaudit_deployments.serve import build_deployments

    schedules = tmp_path / "nightly.yaml"
    schedules.write_text(
        "timezone: Europe/Paris\nschedules:\n"
        "  - slug: builtin-zoo\n    cron: '0 2 * * *'\n    spec: {}\n"
        "  - slug: cnn-only\n    cron: '30 3 * * 1-5'\n    timezone: America/New_York\n"
        "    spec: {models: ['builtin:cnn-w8-s0'], compare_layers: [act1]}\n")
    nightly, on_demand, backfill = build_deployments(schedules)
    assert (nightly.flow_name, nightly.name) == ("audit-zoo", "nightly")
    assert (on_demand.flow_name, backfill.flow_name) == ("audit-model", "backfill")
    assert all(d.enforce_parameter_schema for d in (nightly, on_demand, backfill))
    first, second = nightly.schedules
    assert (first.schedule.cron, first.schedule.timezone) == ("0 2 * * *", "Europe/Paris")
    assert (second.schedule.cron, second.schedule.timezone) == ("30 3 * * 1-5", "America/New_York")
    assert AuditZooSpec(**second.parameters["spec"]).models == ["builtin:cnn-w8-s0"]
    assert AuditZooSpec(**first.parameters["spec"]).models == AuditZooSpec().models

    monkeypatch.setenv("ZOOAUDIT_TIMEZONE", "Asia/Tokyo")
    monkeypatch.setenv("ZOOAUDIT_NIGHTLY_CRON", "15 1 * * *")
    first, second = build_deployments(schedules)[0].schedules
    assert (first.schedule.cron, first.schedule.timezone) == ("15 1 * * *", "Asia/Tokyo")
    assert second.schedule.timezone == "Asia/Tokyo"


@pytest.mark.parametrize("body, message", [
    ("schedules:\n  - slug: bad\n    cron: '0 25 * * *'\n", "schedule #1 \\(bad\\).*bad cron expression"),
    ("schedules:\n  - slug: tz\n    timezone: Mars/Olympus\n", "unknown timezone 'Mars/Olympus'"),
    ("schedules:\n  - slug: zoo\n    spec: {batch_size: 0}\n", "schedule #1 \\(zoo\\).*batch_size"),
    ("schedules: []\n", "defines no schedules"),
])
def test_bad_schedules_file_is_refused_with_its_reason(tmp_path, body, message):
    from zooaudit_deployments.serve import nightly_schedules

    path = tmp_path / "s.yaml"
    path.write_text(body)
    with pytest.raises(ZooauditError, match=message):
        nightly_schedules(path)


def test_flow_parameters_are_the_specs_with_descriptions():
    from prefect.utilities.callables import parameter_schema

    from zooaudit_flows import audit_model
    from zooaudit_flows.backfill import backfill

    schema = parameter_schema(audit_model).model_dump()
    spec = schema["definitions"]["AuditModelSpec"]["properties"]
    assert spec["model"]["default"] == "builtin:mlp-w64-s0" and "Model URI" in spec["model"]["description"]
    bschema = parameter_schema(backfill).model_dump()["definitions"]["BackfillSpec"]["properties"]
    assert bschema["mode"]["enum"] == ["checkpoints", "nights"] and bschema["concurrency"]["minimum"] == 1


@pytest.mark.slow
def test_served_deployments_schedule_validation_and_api_run(local_stack, store_url):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from zooaudit.store import Store, find_commit

    with get_client(sync_client=True) as client:
        deps = {f"{client.read_flow(d.flow_id).name}/{d.name}": d for d in client.read_deployments()}
        assert {"audit-zoo/nightly", "audit-model/on-demand", "backfill/on-demand"} <= set(deps)
        nightly = deps["audit-zoo/nightly"]
        (sched,) = nightly.schedules
        assert sched.schedule.cron == "0 2 * * *" and sched.schedule.timezone == "UTC"
        assert sched.parameters["spec"]["models"] == AuditZooSpec().models
        assert "AuditZooSpec" in json.dumps(nightly.parameter_openapi_schema)
        # the scheduler service plans the coming nights from the cron, at 02:00 UTC
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

        deadline = time.monotonic() + 30
        while not (upcoming := client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[nightly.id])))):
            assert time.monotonic() < deadline, "the scheduler created no run of audit-zoo/nightly"
            time.sleep(1)
        assert all(r.state.is_scheduled() and r.expected_start_time.hour == 2 and
                   r.expected_start_time.minute == 0 for r in upcoming)
        assert upcoming[0].parameters["spec"]["models"] == AuditZooSpec().models

        # A bad value is rejected by the server with the field and the reason, and no run is created.
        on_demand = deps["audit-model/on-demand"]
        with pytest.raises(Exception, match="batch_size") as err:
            client.create_flow_run_from_deployment(
                on_demand.id, parameters={"spec": {**_small(store_url), "model": MODEL, "batch_size": 0}})
        assert "minimum of 1" in str(err.value)
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[on_demand.id])))
        assert not [r for r in runs if r.parameters["spec"].get("store") == store_url]

    run = run_deployment("audit-model/on-demand", parameters={"spec": {**_small(store_url), "model": MODEL}},
                         timeout=240, poll_interval=1, as_subflow=False)
    assert run.state.is_completed(), run.state
    from zooaudit.keys import slug_key

    repo = Store.open(store_url).model_repo(slug_key(MODEL))
    stages = [(i.metadata or {}).get("stage") for i in repo.ancestry(branch="main")]
    assert {"activations", "factorize", "similarity"} <= set(stages)
    acts = next(i for i in repo.ancestry(branch="main") if (i.metadata or {}).get("stage") == "activations")
    assert acts.metadata["flow_run_id"] == str(run.id) and find_commit(repo, acts.metadata["cache_key"])


def _events(api: str, name: str, **resource_labels) -> list[dict]:
    """Events named ``name`` from the server's events API (``resource_labels``: label → value filter)."""
    flt = {"event": {"name": [name]}}
    if resource_labels:
        flt["resource"] = {"labels": {k: [v] for k, v in resource_labels.items()}}
    body = json.dumps({"filter": flt, "limit": 50}).encode()
    req = urllib.request.Request(api + "/events/filter", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())["events"]


@pytest.mark.slow
def test_nightly_cka_drop_emits_regression_event_and_the_automation_reacts(local_stack, store_url):
    from prefect.events.worker import EventsWorker

    from zooaudit_deployments.automations import create_regression_automation
    from zooaudit_flows.audit_zoo import audit_zoo
    from zooaudit_flows.events import EVENT

    spec = AuditZooSpec(models=[MODEL], compare_layers=["embed"], cka_drop_threshold=0.01,
                        **_small(store_url))
    audit_zoo(spec)                               # night 1: first audit, nothing to compare with
    audit_zoo(spec)                               # unchanged zoo: every stage skipped, no alert
    EventsWorker.drain_all(timeout=10)
    api = local_stack.env["PREFECT_API_URL"]
    assert not [e for e in _events(api, EVENT) if e["resource"]["zooaudit.store"] == spec.store]

    automation = create_regression_automation()
    try:
        _regression_and_reaction(spec, store_url, api)
    finally:
        # the stack is shared by the session: leave no automation reacting to other tests' events
        automation.delete()


def _regression_and_reaction(spec, store_url, api):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.events.worker import EventsWorker

    from zooaudit_deployments.automations import CONFIRM_BIAS
    from zooaudit_flows.audit_zoo import audit_zoo
    from zooaudit_flows.events import EVENT
    from zooaudit.stages.common import _cached_model
    from zooaudit.store import Store
    from zooaudit.zoo.builtin import weights_file

    # Overnight the model was replaced by an earlier, less trained checkpoint of itself.
    store = Store.open(store_url)
    shutil.copyfile(weights_file(store, "mlp-w32-s0", 2), weights_file(store, "mlp-w32-s0", 15))
    _cached_model.cache_clear()
    night2 = audit_zoo(spec)
    (acts,) = [r for r in night2.models[0].results if r.stage == "activations"]
    assert not acts.skipped
    EventsWorker.drain_all(timeout=10)

    # One event per regressed layer, sent one by one: wait for the head's, not just the first.
    deadline = time.monotonic() + 60
    while True:
        events = [e for e in _events(api, EVENT) if e["resource"]["zooaudit.store"] == night2.models[0].refs[0].store]
        metrics = {e["resource"]["zooaudit.metric"]: e for e in events}
        if "cka_to_previous:head" in metrics:
            break
        assert time.monotonic() < deadline, f"no head regression event reached the server (got {sorted(metrics)})"
        time.sleep(1)
    assert all(e["resource"]["zooaudit.model"] == MODEL for e in events)
    assert "cka_to_previous:head" in metrics
    payload = metrics["cka_to_previous:head"]["payload"]
    assert payload["kind"] == "cka_drop" and payload["cka"] < 0.99 and payload["threshold"] == 0.01
    assert payload["snapshot"] == acts.snapshot and payload["previous_snapshot"] != acts.snapshot

    # The automation re-audits the regressed model with the thorough bias spec.
    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + 120
        while True:
            runs = [r for r in client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["audit-model"])))
                    if r.deployment_id and r.parameters["spec"].get("bias", {}).get("n_boot") == CONFIRM_BIAS["n_boot"]
                    and r.parameters["spec"].get("store") == store.url]
            if runs and runs[0].state.is_final():
                break
            assert time.monotonic() < deadline, "the automation did not run audit-model/on-demand"
            time.sleep(1)
    (rerun,) = runs
    assert rerun.parameters["spec"]["model"] == MODEL and rerun.parameters["spec"]["store"] == store.url
    assert rerun.state.is_completed(), rerun.state


@pytest.mark.slow
def test_nightly_bias_regression_emits_an_event_with_model_and_metric(local_stack, store_url):
    """Night 1 audits the balanced colored-digits CNN (colour flip 0.5 in training); overnight its
    weights are replaced by the colour-shortcut CNN's (flip 0.1). Night 2's bias stage finds the
    colour disparities significantly worse and the flow emits ``zooaudit.audit.regression`` for
    each, read back from the server's events API with the model and the metric."""
    from prefect.events.worker import EventsWorker

    from zooaudit_flows.audit_zoo import audit_zoo
    from zooaudit_flows.events import EVENT
    from zooaudit.stages.common import _cached_model
    from zooaudit.store import Store
    from zooaudit.zoo.builtin import SHORTCUT_SWEEP, ensure_weights, weights_file

    balanced, shortcut = SHORTCUT_SWEEP[0.5], SHORTCUT_SWEEP[0.1]
    model = f"builtin:{balanced}"
    spec = AuditZooSpec(models=[model], compare_layers=["embed"], **{
        **_small(store_url, datasets=[{"name": "colored-digits", "max_samples": 200}]),
        "bias": {"n_boot": 50, "n_permutations": 200, "probes": False, "erasure": False}})
    night1 = audit_zoo(spec)
    (bias1,) = [r for r in night1.models[0].results if r.stage == "bias"]
    assert not bias1.skipped and bias1.summary["colour"]["regressions"] == []

    store = Store.open(store_url)
    ensure_weights(store, shortcut)
    shutil.copyfile(weights_file(store, shortcut, 15), weights_file(store, balanced, 15))
    _cached_model.cache_clear()
    night2 = audit_zoo(spec)
    (bias2,) = [r for r in night2.models[0].results if r.stage == "bias"]
    assert not bias2.skipped and bias2.summary["colour"]["previous_snapshot"] == bias1.snapshot
    worse = bias2.summary["colour"]["regressions"]
    assert worse, bias2.summary["colour"]["disparities"]
    EventsWorker.drain_all(timeout=10)

    api = local_stack.env["PREFECT_API_URL"]
    expected = {f"bias:colour:{m}" for m in worse}
    deadline = time.monotonic() + 60
    while True:
        events = [e for e in _events(api, EVENT, **{"zooaudit.store": store.url})
                  if e["resource"]["zooaudit.metric"].startswith("bias:")]
        if {e["resource"]["zooaudit.metric"] for e in events} >= expected:
            break
        assert time.monotonic() < deadline, f"bias regression events {expected} did not reach the server: {events}"
        time.sleep(1)
    for e in events:
        assert e["resource"]["zooaudit.model"] == model and e["payload"]["model"] == model
        assert e["payload"]["kind"] == "bias" and e["payload"]["attribute"] == "colour"
        assert e["payload"]["snapshot"] == bias2.snapshot and e["payload"]["previous_snapshot"] == bias1.snapshot
        assert e["payload"]["difference"] == bias2.summary["colour"]["disparities"][e["payload"]["disparity"]]["difference"]
    # one event per (model, metric) of this night: nothing was emitted on night 1
    assert sorted(e["resource"]["zooaudit.metric"] for e in events) == sorted(expected)
