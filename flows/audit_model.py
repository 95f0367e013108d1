"""Flow ``audit-model``: the model stages of one model on each dataset, then the array stages.

    validate ─► per dataset: plan ─► cache-hit? ─► begin ─► extract-shards × groups ─► publish
                                   (activations and, in the same shards, the controls: random-init copy,
                                    input embeddings) ─► unsharded controls (word sets, token text)
                                   ─► array stages of the registry, on the ActivationsRef:
                                        ├─ factorize  → commit
                                        ├─ similarity → commit
                                        └─ bias       → commit
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prefect import flow, get_run_logger, unmapped
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from zooaudit.report.summary import (
    bias_table,
    model_markdown,
    similarity_table,
    weat_table,
)
from zooaudit.report.statistics import statistics_table
from zooaudit.specs import AuditModelSpec
from zooaudit.stages import ARRAY_STAGES, pending_shards, run_model_stages, shard_groups
from zooaudit.store import Store
from zooaudit_tasks.analysis import array_stage
from zooaudit_tasks.extract import (
    begin_activations,
    cache_hit,
    extract_shards,
    plan_controls,
    plan_extraction,
    publish_activations,
    unsharded_controls,
    validate_model,
)

from .liveness import record_process
from .runners import dask_cluster, extraction_placement, task_runner


@dataclass
class ModelAudit:
    model: str
    refs: list = field(default_factory=list)            # ActivationsRef per audited dataset
    results: list = field(default_factory=list)         # StageResult of every stage (controls included)


def _extract(plan, run_id, params):
    """One sharded product (the activations with the controls extracted beside them, or a
    control alone): every missing shard committed on a staging branch, then published all or
    nothing."""
    staging = begin_activations(plan)
    groups = shard_groups(pending_shards(plan, staging))
    with extraction_placement(plan.device):   # on GPU workers when the device may be CUDA and there are some
        shards = extract_shards.map(unmapped(plan), groups, unmapped(staging.branch))
    return publish_activations(plan, staging, run_id, params, shards.result())


def _model_stages(plan, spec, run_id, params):
    """Activations and the controls the spec needs, as tasks (``zooaudit.stages.model``);
    returns ``(ActivationsRef, results)``. One extraction per (model, plan) at a time, across
    processes and machines: a second run of the same audit waits here, then finds the committed
    products (cache hits). Runs on other models take other locks and never wait."""
    def unsharded():
        with extraction_placement(plan.device):
            return unsharded_controls.submit(plan, spec, run_id).result()

    with Store(plan.store).lock(f"extract-{plan.model_key}-{plan.cache_key}"):
        return run_model_stages(plan, spec, extract=lambda p: _extract(p, run_id, params), hit=cache_hit,
                                planner=plan_controls, unsharded=unsharded)


@flow(name="audit-model", flow_run_name="audit-model-{spec.model}", on_running=[record_process])
def audit_model(spec: AuditModelSpec) -> ModelAudit:
    logger = get_run_logger()
    run_id = str(flow_run.id) if flow_run.id else None
    validate_model(spec)
    audit = ModelAudit(spec.model)
    params = spec.model_dump(mode="json")
    for ds_spec in spec.datasets:
        plan = plan_extraction(spec, ds_spec)
        if plan is None:
            logger.info("%s does not take %s inputs; not audited on it", spec.model, ds_spec.name)
            continue
        ref, model_results = _model_stages(plan, spec, run_id, params)
        logger.info("activations %s: %s", "skipped (cached)" if model_results[0].skipped else "committed",
                    ref.snapshot)
        submitted: dict = {}
        for stage in ARRAY_STAGES:   # a stage that reads another's results waits for it (registry: after)
            submitted[stage.name] = array_stage.submit(stage.name, ref, stage.spec_of(spec), run_id,
                                                       wait_for=[submitted[a] for a in stage.after])
        futures = list(submitted.values())
        audit.refs.append(ref)
        audit.results.extend(model_results)
        audit.results.extend(r for r in (f.result() for f in futures) if r is not None)
    for r in audit.results:
        logger.info("%-11s %-28s %s", r.stage, r.dataset, "skipped (cache hit)" if r.skipped else "committed")
    create_markdown_artifact(model_markdown(audit.model, audit.results), key=None,
                             description=f"zooaudit: {spec.model}")
    if rows := bias_table(audit.results):
        create_table_artifact(rows, description=f"zooaudit bias headline: {spec.model}")
    if rows := similarity_table(audit.results):
        create_table_artifact(rows, description=f"zooaudit similarity (value beside control): {spec.model}")
    if rows := statistics_table(audit.results):
        create_table_artifact(rows, description=f"zooaudit activation statistics: {spec.model}")
    if rows := weat_table(audit.results):
        create_table_artifact(rows, description=f"zooaudit WEAT/SEAT (Holm within method × layer): {spec.model}")
    return audit


def run_audit_model(spec: AuditModelSpec) -> ModelAudit:
    """Run ``audit_model`` on the task runner the spec asks for."""
    with dask_cluster(spec) as address:
        return audit_model.with_options(task_runner=task_runner(address))(spec)
