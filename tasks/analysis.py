"""Analysis tasks: factorization, similarity, bias (each its own commit)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from zooaudit import stages


@task(name="factorize", cache_policy=NO_CACHE, task_run_name="factorize-{plan.model_key}")
def factorize(plan, acts_snapshot, fspec, run_id=None):
    return stages.run_factorize(plan, acts_snapshot, fspec, run_id)


@task(name="similarity", cache_policy=NO_CACHE, task_run_name="similarity-{plan.model_key}")
def similarity(plan, acts_snapshot, sspec, run_id=None):
    return stages.run_similarity(plan, acts_snapshot, sspec, run_id)


@task(name="bias", cache_policy=NO_CACHE, task_run_name="bias-{plan.model_key}")
def bias(plan, acts_snapshot, bspec, run_id=None):
    return stages.run_bias(plan, acts_snapshot, bspec, run_id)


@task(name="zoo-similarity", cache_policy=NO_CACHE)
def zoo_similarity(store_url, plans, snapshots, layers, sspec, run_id=None):
    return stages.run_zoo_similarity(store_url, plans, snapshots, layers, sspec, run_id)


@task(name="revision-similarity", cache_policy=NO_CACHE)
def revision_similarity(store_url, plans, snapshots, sspec, run_id=None):
    return stages.run_revision_similarity(store_url, plans, snapshots, sspec, run_id)
