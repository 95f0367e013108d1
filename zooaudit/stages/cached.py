"""Whole-model cache hits: the results of a model audit whose every stage is already committed.

A warm nightly rerun finds most models unchanged. For such a model the audit would only
re-plan and look up cache keys; :func:`committed_audit` does exactly that — the plan of
each dataset, then the cache key of every model stage product (activations, controls)
and of every array stage of the registry on ``main`` — and returns the same references
and ``skipped`` results, in the same order, that the stage-by-stage audit returns on a
full cache hit. One stage missing ⇒ None: the model needs its audit.
"""

from __future__ import annotations

from ..specs import AuditModelSpec
from .activations import plan_extraction
from .common import skipped
from .model import committed_model_stages
from .refs import ActivationsRef, StageResult
from .registry import ARRAY_STAGES


def committed_audit(spec: AuditModelSpec) -> tuple[list[ActivationsRef], list[StageResult]] | None:
    """``(refs, results)`` of the audit of ``spec`` when every stage on every dataset is
    committed on ``main`` (each result ``skipped=True``, summary from its commit), else None."""
    refs: list[ActivationsRef] = []
    results: list[StageResult] = []
    for ds_spec in spec.datasets:
        plan = plan_extraction(spec, ds_spec)
        if plan is None:   # the model does not take this dataset's inputs
            continue
        found = committed_model_stages(plan, spec)
        if found is None:
            return None
        ref, model_results = found
        repository = ref.repository
        for stage in ARRAY_STAGES:
            key = stage.key(ref, stage.spec_of(spec))
            if key is None:
                continue
            if (snap := repository.find(key)) is None:
                return None
            model_results.append(skipped(stage.name, ref, key, snap))
        refs.append(ref)
        results.extend(model_results)
    if not refs:
        return None
    return refs, results
