"""Extraction tasks: plan, one task per shard, publish."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from zooaudit import stages


@task(name="plan-extraction", cache_policy=NO_CACHE)
def plan_extraction(spec, ds_spec):
    return stages.plan_extraction(spec, ds_spec)


@task(name="cache-check", cache_policy=NO_CACHE)
def committed_audits(specs):
    """One task for the whole zoo: per model spec, ``(plans, results)`` when every stage of
    every plan is already committed (no audit needed), else None."""
    return [stages.committed_audit(spec) for spec in specs]


@task(name="extract-shards", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2,
      task_run_name="extract-shards-{shards[0].index}")
def extract_shards(plan, shards, branch):
    """Each shard is committed on the staging branch as soon as it is written
    (a retry or a rerun recomputes only the shards not yet committed)."""
    return stages.extract_shards(plan, shards, branch)


@task(name="begin-activations", cache_policy=NO_CACHE)
def begin_activations(plan):
    """Create or resume the staging branch; returns a Staging (which shards are done)."""
    return stages.begin_activations(plan)


@task(name="publish-activations", cache_policy=NO_CACHE)
def publish_activations(plan, staging, run_id=None, params=None, wait_for_shards=None):
    return stages.publish_activations(plan, staging, run_id=run_id, params=params)
