"""The model stages of one (model, dataset), end to end: activations, the controls, then the
attribution maps (:mod:`.attribution`, where they apply).

This is the only place (with the modules it calls: :mod:`.activations`, :mod:`.controls`)
where the model runs. Its product is the :class:`~.refs.ActivationsRef` every array
stage takes. The Prefect flow runs the same steps as tasks on the extraction placement
(``zooaudit_flows.audit_model``); :func:`run_model_stages` runs them in this process.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from ..specs import RunOptions
from .activations import ExtractionPlan, activations_ref, cache_hit, extract_product
from . import attribution_text
from .attribution import attribution_key, run_attribution
from .common import skipped
from .controls import (
    classifier_key,
    control_plans,
    control_ref,
    run_classifier,
    run_token_text,
    run_wordsets,
    token_text_key,
    wordsets_key,
)
from .refs import ActivationsRef, ControlRef, StageResult


def unsharded_controls(plan: ExtractionPlan, spec: RunOptions, run_id: str | None = None
                       ) -> list[tuple[StageResult, ControlRef]]:
    """The small controls computed in one go (word-set embeddings, token text, classifier
    weights), where they apply."""
    done = (run_wordsets(plan, spec.bias, run_id), run_token_text(plan, run_id), run_classifier(plan, run_id))
    return [d for d in done if d is not None]


def run_model_stages(plan: ExtractionPlan, spec: RunOptions, *, run_id: str | None = None, params: dict | None = None,
                     extract: Callable[[ExtractionPlan], StageResult] | None = None,
                     hit: Callable[[ExtractionPlan], StageResult | None] = cache_hit,
                     planner: Callable = control_plans, unsharded: Callable | None = None,
                     attribute: Callable | None = None) -> tuple[ActivationsRef, list[StageResult]]:
    """Activations of ``plan`` and every control ``spec`` needs, each a cache hit or a commit.

    Controls not committed yet are extracted in the same shards as the activations when those
    are extracted too (companions: one staging branch, one commit per shard group, one
    publish); a control missing beside committed activations is extracted on its own.

    The steps are parameters so that the flow runs each as a task: ``extract(plan) ->
    StageResult`` extracts one sharded product without a cache check (default: in this
    process), ``hit(plan)`` is its cache lookup, ``planner(plan, spec)`` plans the controls,
    ``unsharded()`` computes the word-set embeddings and token text, ``attribute()`` the
    attribution stage (None where it does not apply). Returns the reference array stages take
    and the results of the activations (first), of each control and of the attribution maps."""
    extract = extract or (lambda p: extract_product(p, run_id=run_id, params=params))
    unsharded = unsharded or (lambda: unsharded_controls(plan, spec, run_id))
    attribute = attribute or (lambda: run_attribution(plan, spec.attribution, run_id))
    cplans = planner(plan, spec)
    acts = hit(plan)
    companions: list[ExtractionPlan] = []
    if acts is None:
        # companions run on the activations' inputs; a control on other inputs (counterfactuals) runs alone
        companions = [c for c in cplans if hit(c) is None and c.dataset == plan.dataset]
        acts = extract(dataclasses.replace(plan, companions=companions))
    results, controls = [acts], {}
    for cplan in cplans:
        if cplan in companions:   # published with the activations, in their snapshot
            done = StageResult(cplan.stage, cplan.model_uri, cplan.ds_key, cplan.cache_key, acts.snapshot,
                               acts.skipped, {"layers": cplan.layers, "with": "activations",
                                              "provenance": cplan.provenance})
        else:
            done = hit(cplan) or extract(cplan)
        results.append(done)
        controls[cplan.stage.split("/", 1)[1]] = control_ref(cplan, done)
    for done, ref in unsharded():
        results.append(done)
        controls[ref.kind] = ref
    if (maps := attribute()) is not None:
        results.append(maps)
    return activations_ref(plan, acts.snapshot, controls), results


def committed_model_stages(plan: ExtractionPlan, spec: RunOptions) -> tuple[ActivationsRef, list[StageResult]] | None:
    """The reference and results of :func:`run_model_stages` when every product is already
    committed on ``main`` (each result a cache hit), else None. Nothing is extracted."""
    repository = plan.repository
    if (snap := repository.find(plan.cache_key)) is None:
        return None
    results, controls = [skipped(plan.stage, plan, plan.cache_key, snap)], {}
    for cplan in control_plans(plan, spec):
        if (csnap := repository.find(cplan.cache_key)) is None:
            return None
        results.append(skipped(cplan.stage, cplan, cplan.cache_key, csnap))
        controls[cplan.stage.split("/", 1)[1]] = control_ref(cplan, results[-1])
    for key in (wordsets_key(plan, spec.bias), token_text_key(plan), classifier_key(plan)):
        if key is not None and repository.find(key) is None:
            return None
    for done, ref in unsharded_controls(plan, spec):   # all committed: cache hits only
        results.append(done)
        controls[ref.kind] = ref
    if (key := attribution_key(plan, spec.attribution)) is not None:
        if (asnap := repository.find(key)) is None:
            return None
        results.append(skipped(attribution_text.STAGE if attribution_text.is_text_plan(plan) else "attribution",
                               plan, key, asnap))
    return activations_ref(plan, snap, controls), results
