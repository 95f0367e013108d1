"""Whole-model cache hits: the results of a model audit whose every stage is already committed.

A warm nightly rerun finds most models unchanged. For such a model the audit would only
re-plan and look up cache keys; :func:`committed_audit` does exactly that — the plan of
each dataset, then the cache key of every stage (activations, factorize, similarity,
bias) on ``main`` — and returns the same plans and ``skipped`` results, in the same order,
that the stage-by-stage audit returns on a full cache hit. One stage missing ⇒ None: the
model needs its audit.
"""

from __future__ import annotations

from ..specs import AuditModelSpec
from ..store import find_commit
from .analysis import factorize_key
from .bias import bias_key
from .common import ExtractionPlan, StageResult, _repo, skipped
from .extraction import plan_extraction
from .similarity import similarity_key


def stage_keys(plan: ExtractionPlan, spec: AuditModelSpec) -> list[tuple[str, str]]:
    """``(stage, cache key)`` of every stage an audit of ``plan`` with ``spec`` runs, in the order
    its results are reported (bias only where it applies)."""
    keys = [("activations", plan.cache_key), ("factorize", factorize_key(plan, spec.factorize.model_dump())),
            ("similarity", similarity_key(plan, spec.similarity.model_dump()))]
    if (bias := bias_key(plan, spec.bias.model_dump())) is not None:
        keys.append(("bias", bias))
    return keys


def committed_audit(spec: AuditModelSpec) -> tuple[list[ExtractionPlan], list[StageResult]] | None:
    """``(plans, results)`` of the audit of ``spec`` when every stage on every dataset is
    committed on ``main`` (each result ``skipped=True``, summary from its commit), else None."""
    plans: list[ExtractionPlan] = []
    found: list[tuple[ExtractionPlan, str, str, str]] = []
    for ds_spec in spec.datasets:
        plan = plan_extraction(spec, ds_spec)
        if plan is None:   # the model does not take this dataset's inputs
            continue
        _, _, repo = _repo(plan)
        for stage, key in stage_keys(plan, spec):
            if (snap := find_commit(repo, key)) is None:
                return None
            found.append((plan, stage, key, snap))
        plans.append(plan)
    if not plans:
        return None
    return plans, [skipped(stage, plan, key, snap) for plan, stage, key, snap in found]
