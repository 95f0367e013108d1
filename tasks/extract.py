"""Model-stage tasks: validate, plan, extract the activations and the controls (the only
tasks that run the model; the flow places them on the extraction placement)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from zooaudit import stages


@task(name="validate-model", cache_policy=NO_CACHE)
def validate_model(spec):
    """Bad input fails here, with one clear paragraph, before anything is committed."""
    stages.validate_model(spec)


@task(name="validate-zoo", cache_policy=NO_CACHE)
def validate_zoo(spec):
    return stages.validate_zoo(spec)


@task(name="plan-extraction", cache_policy=NO_CACHE)
def plan_extraction(spec, ds_spec):
    return stages.plan_extraction(spec, ds_spec)


@task(name="plan-controls", cache_policy=NO_CACHE)
def plan_controls(plan, spec):
    """The sharded controls (random-init copy, input embeddings) the audit reads, as plans."""
    return stages.control_plans(plan, spec)


@task(name="cache-check", cache_policy=NO_CACHE)
def committed_audits(specs):
    """One task for the whole zoo: per model spec, ``(refs, results)`` when every stage of
    every dataset is already committed (no audit needed), else None."""
    return [stages.committed_audit(spec) for spec in specs]


@task(name="extract-shards", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2,
      task_run_name="extract-shards-{plan.stage}-{shards[0].index}")
def extract_shards(plan, shards, branch):
    """Each shard is committed on the staging branch as soon as it is written
    (a retry or a rerun recomputes only the shards not yet committed)."""
    return stages.extract_shards(plan, shards, branch)


@task(name="begin-activations", cache_policy=NO_CACHE, task_run_name="begin-{plan.stage}")
def begin_activations(plan):
    """Create or resume the staging branch; returns a Staging (which shards are done)."""
    return stages.begin_activations(plan)


@task(name="publish-activations", cache_policy=NO_CACHE, task_run_name="publish-{plan.stage}")
def publish_activations(plan, staging, run_id=None, params=None, wait_for_shards=None):
    return stages.publish_activations(plan, staging, run_id=run_id, params=params)


@task(name="unsharded-controls", cache_policy=NO_CACHE)
def unsharded_controls(plan, spec, run_id=None):
    """Word-set embeddings and token text, where they apply: ``[(StageResult, ControlRef)]``."""
    return stages.unsharded_controls(plan, spec, run_id)


@task(name="cache-hit", cache_policy=NO_CACHE, task_run_name="cache-hit-{plan.stage}")
def cache_hit(plan):
    """The committed result of this sharded product (activations or a control), or None."""
    return stages.cache_hit(plan)
