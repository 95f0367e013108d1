"""Extraction tasks: plan, one task per shard, publish."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from zooaudit import stages


@task(name="plan-extraction", cache_policy=NO_CACHE)
def plan_extraction(spec, ds_spec):
    return stages.plan_extraction(spec, ds_spec)


@task(name="extract-shard", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2,
      task_run_name="extract-shard-{shard.index}")
def extract_shard(plan, shard, fork):
    return stages.extract_shard(plan, shard, fork)


@task(name="begin-activations", cache_policy=NO_CACHE)
def begin_activations(plan):
    """Runs in the flow's process (called directly): returns a writable session."""
    return stages.begin_activations(plan)


@task(name="publish-activations", cache_policy=NO_CACHE)
def publish_activations(plan, session, base, shards, run_id=None, params=None):
    return stages.publish_activations(plan, session, base, shards, run_id=run_id, params=params)
