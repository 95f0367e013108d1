"""Backfill on a real Prefect server with the deployments served by a real runner process:
every checkpoint becomes a deployment run, a rerun creates no run and no commit, the trend
is committed and plotted."""

import os

import numpy as np
import pytest

from zooaudit.errors import ZooauditError
from zooaudit.specs import BackfillSpec
from zooaudit.store import Store

FAMILY = "builtin:cnn-colored-w16-s0"


def _spec(store_url, **kw):
    audit = {"store": store_url, "task_runner": "threads", "shard_size": 40, "batch_size": 40,
             "datasets": [{"name": "colored-digits", "max_samples": 80}],
             "factorize": {"k": 3, "methods": ["pca"]},
             "bias": {"n_boot": 0, "n_permutations": 50, "probes": False, "erasure": False},
             "similarity": {"control": "none"}}
    return BackfillSpec(models=[f"{FAMILY}@*"], audit=audit, concurrency=2, timeout_s=300, **kw)


def _audit_model_runs(client, store_url):
    """Runs of audit-model on this test's store (the server is shared by the session)."""
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["audit-model"])))
    return [r for r in runs if r.parameters["spec"].get("store") == store_url]


def _commits(store):
    root = store.path("models")
    out = {k: len(list(store.model_repo(k).ancestry(branch="main"))) for k in sorted(os.listdir(root))}
    out["zoo"] = len(list(store.zoo_repo().ancestry(branch="main")))
    return out


@pytest.mark.slow
def test_checkpoint_backfill_is_idempotent_and_writes_a_trend(local_stack, store_url):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from zooaudit_flows.backfill import (
        AUDIT_MODEL_DEPLOYMENT,
        BackfillItem,
        backfill,
        expand_checkpoints,
    )

    spec = _spec(store_url)
    uris = expand_checkpoints(spec.models)
    assert uris == [f"{FAMILY}@2", f"{FAMILY}@5", f"{FAMILY}@15"]
    # An earlier backfill was interrupted after creating the first item's run: the backfill must
    # find that run by its idempotency key instead of creating a second one.
    first = BackfillItem(uris[0], AUDIT_MODEL_DEPLOYMENT,
                         {"spec": {**spec.audit.model_dump(mode="json"), "model": uris[0]}})
    early = run_deployment(first.deployment, parameters=first.parameters, idempotency_key=first.idempotency_key,
                           timeout=0, as_subflow=False)

    result = backfill(spec)
    assert result.items == uris and not result.skipped and not result.failed
    assert result.runs[uris[0]] == str(early.id)
    with get_client(sync_client=True) as client:
        runs = _audit_model_runs(client, store_url)
        assert sorted(r.parameters["spec"]["model"] for r in runs) == sorted(uris)   # one run per checkpoint
        assert all(r.state.is_completed() for r in runs)
        limit = client.read_global_concurrency_limit_by_name("zooaudit-backfill")
        assert limit.limit == 2

    store = Store.open(store_url)
    (trend,) = result.trends
    assert not trend.skipped and trend.model == FAMILY
    from zooaudit.store import open_group

    ds = open_group(store.zoo_repo(), trend.summary["group"], snapshot=trend.snapshot).load()
    assert list(ds["checkpoint"].values) == uris and list(ds["epoch"].values) == ["2", "5", "15"]
    assert ds["cka"].dims == ("checkpoint", "layer") and ds["explained_variance"].dims == ("checkpoint", "layer")
    np.testing.assert_allclose(ds["cka"].sel(checkpoint=uris[-1]).values, 1.0, atol=1e-9)  # final vs itself
    assert float(ds["cka"].sel(checkpoint=uris[0], layer="head")) < 0.99   # epoch 2's readout differs
    assert np.isfinite(ds["explained_variance"].values).all() and (ds["explained_variance"].values <= 1).all()
    wga = ds["worst_group_accuracy"]
    assert wga.dims == ("checkpoint", "attribute") and list(wga["attribute"].values) == ["colour"]
    assert ((wga.values >= 0) & (wga.values <= 1)).all()
    # the trend's numbers are the committed audits' numbers, not recomputed ones
    final_bias = next(r for r in backfill_results(store, uris[-1]) if r["stage"] == "bias")
    assert float(wga.sel(checkpoint=uris[-1], attribute="colour")) == pytest.approx(
        final_bias["summary"]["colour"]["worst_group_accuracy"])
    with open(result.report) as fh:
        html = fh.read()
    assert "<img" in html and "cnn-colored-w16-s0" in html
    assert os.path.exists(os.path.join(os.path.dirname(result.report), "manifest.json"))

    commits = _commits(store)
    again = backfill(spec)
    assert again.skipped == uris and again.runs == {}
    assert again.trends[0].skipped and again.trends[0].snapshot == trend.snapshot
    with get_client(sync_client=True) as client:
        assert len(_audit_model_runs(client, store_url)) == len(uris)   # no duplicate runs
    assert _commits(store) == commits                       # and no new commits


def backfill_results(store, uri):
    """Stage metadata of the commits of one model's repository (newest first)."""
    from zooaudit.keys import slug_key

    repo = store.model_repo(slug_key(uri))
    return [dict(info.metadata or {}) for info in repo.ancestry(branch="main") if (info.metadata or {}).get("stage")]


@pytest.mark.slow
def test_bad_backfill_input_fails_before_any_run(local_stack, store_url):
    from zooaudit_flows.backfill import backfill

    with pytest.raises(ZooauditError, match="matches no builtin checkpoint.*Builtin models"):
        backfill(_spec(store_url).model_copy(update={"models": ["builtin:no-such-model@*"]}))
    with pytest.raises(ValueError, match="nights mode needs both"):
        BackfillSpec(mode="nights", start="2026-01-01")
    with pytest.raises(ValueError, match="before `start`"):
        BackfillSpec(mode="nights", start="2026-01-05", end="2026-01-01")
    assert not os.path.exists(Store.open(store_url).path("models"))


def test_nights_are_scheduled_at_the_nightly_hour_and_tagged_nights_skipped(store_url, monkeypatch):
    import datetime as dt
    import logging

    from zooaudit_flows.backfill import Backfill, _night_items
    from zooaudit.versions import nightly_tag, tag_version

    monkeypatch.setenv("ZOOAUDIT_TIMEZONE", "Europe/Paris")
    store = Store.open(store_url)
    repo = store.zoo_repo()
    tag_version(repo, nightly_tag(dt.date(2026, 3, 2)))          # that night was audited
    zoo = {"models": ["builtin:mlp-w32-s0"], "store": store_url, "task_runner": "threads"}
    spec = BackfillSpec(mode="nights", start="2026-03-01", end="2026-03-03", zoo=zoo)
    result = Backfill()
    items = _night_items(spec, result, logging.getLogger("test"))
    assert result.items == ["2026-03-01", "2026-03-02", "2026-03-03"] and result.skipped == ["2026-03-02"]
    assert [i.label for i in items] == ["2026-03-01", "2026-03-03"]
    assert {i.deployment for i in items} == {"audit-zoo/nightly"}
    first = items[0].scheduled_time
    assert (first.date(), first.hour, first.minute, str(first.tzinfo)) == (dt.date(2026, 3, 1), 2, 0, "Europe/Paris")
    assert items[0].parameters["spec"]["models"] == ["builtin:mlp-w32-s0"]
    # one key per (deployment, parameters, night): the same backfill gives the same keys, nights differ
    again = _night_items(spec, Backfill(), logging.getLogger("test"))
    assert [i.idempotency_key for i in again] == [i.idempotency_key for i in items]
    assert items[0].idempotency_key != items[1].idempotency_key
