"""Array-stage tasks: each reads committed arrays through an ActivationsRef and commits one
result. One task per registry entry kind (``zooaudit.stages.registry``)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from zooaudit import stages


@task(name="array-stage", cache_policy=NO_CACHE, task_run_name="{name}-{ref.model_key}")
def array_stage(name, ref, spec, run_id=None):
    """The per-model array stage ``name`` (factorize, similarity, bias, …) on ``ref``."""
    return stages.run_array_stage(name, ref, spec, run_id)


@task(name="zoo-stage", cache_policy=NO_CACHE, task_run_name="{name}")
def zoo_stage(name, refs, spec, options=None, run_id=None):
    """The zoo stage ``name`` (zoo-similarity, revision-similarity) over every model of a dataset."""
    return stages.run_zoo_stage(name, refs, spec, options, run_id)


@task(name="checkpoint-trend", cache_policy=NO_CACHE)
def checkpoint_trend(refs, fspec, bspec, run_id=None, family=None, stats=None):
    return stages.run_checkpoint_trend(refs, fspec, bspec, run_id, family, stats)


@task(name="model-refs", cache_policy=NO_CACHE)
def committed_refs(spec):
    """The activations references of a model audit that is committed (None when it is not)."""
    found = stages.committed_audit(spec)
    return None if found is None else found[0]
