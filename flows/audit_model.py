"""Flow ``audit-model``: activations of one model on each dataset, then the analyses.

    plan ─► begin ─► extract-shards × groups ─► publish (commit "activations")
                                                 ├─ factorize  → commit
                                                 ├─ similarity → commit
                                                 └─ bias       → commit
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prefect import flow, get_run_logger, unmapped
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from zooaudit import stages
from zooaudit.report.summary import (
    bias_table,
    model_markdown,
    similarity_table,
    weat_table,
)
from zooaudit.specs import AuditModelSpec
from zooaudit.store import Store
from zooaudit_tasks.analysis import bias, factorize, similarity
from zooaudit_tasks.extract import (
    begin_activations,
    extract_shards,
    plan_extraction,
    publish_activations,
)

from .runners import dask_cluster, extraction_placement, task_runner


@dataclass
class ModelAudit:
    model: str
    plans: list = field(default_factory=list)           # ExtractionPlan per audited dataset
    results: list = field(default_factory=list)         # StageResult of every stage


def _activations(plan, run_id, params):
    """Commit every missing shard on a staging branch; publish all or nothing."""
    if (snap := stages.cached_activations(plan)) is not None:
        return stages.skipped("activations", plan, plan.cache_key, snap)
    staging = begin_activations(plan)
    groups = stages.shard_groups(stages.pending_shards(plan, staging))
    with extraction_placement(plan.device):   # on GPU workers when the device may be CUDA and there are some
        shards = extract_shards.map(unmapped(plan), groups, unmapped(staging.branch))
    return publish_activations(plan, staging, run_id, params, shards.result())


@flow(name="audit-model", flow_run_name="audit-model-{spec.model}")
def audit_model(spec: AuditModelSpec) -> ModelAudit:
    logger = get_run_logger()
    run_id = str(flow_run.id) if flow_run.id else None
    stages.validate_model(spec)
    audit = ModelAudit(spec.model)
    for ds_spec in spec.datasets:
        plan = plan_extraction(spec, ds_spec)
        if plan is None:
            logger.info("%s does not take %s inputs; not audited on it", spec.model, ds_spec.name)
            continue
        # One extraction per (model, plan) at a time, across processes and machines: a second
        # run of the same audit waits here, then finds the committed activations (cache hit).
        # Runs on other models take other locks and never wait.
        with Store(plan.store).lock(f"extract-{plan.model_key}-{plan.cache_key}"):
            acts = _activations(plan, run_id, spec.model_dump(mode="json"))
        logger.info("activations %s: %s", "skipped (cached)" if acts.skipped else "committed", acts.snapshot)
        futures = [
            factorize.submit(plan, acts.snapshot, spec.factorize.model_dump(), run_id),
            similarity.submit(plan, acts.snapshot, spec.similarity.model_dump(), run_id),
            bias.submit(plan, acts.snapshot, spec.bias.model_dump(), run_id),
        ]
        audit.plans.append(plan)
        audit.results.append(acts)
        audit.results.extend(r for r in (f.result() for f in futures) if r is not None)
    for r in audit.results:
        logger.info("%-11s %-28s %s", r.stage, r.dataset, "skipped (cache hit)" if r.skipped else "committed")
    create_markdown_artifact(model_markdown(audit.model, audit.results), key=None,
                             description=f"zooaudit: {spec.model}")
    if rows := bias_table(audit.results):
        create_table_artifact(rows, description=f"zooaudit bias headline: {spec.model}")
    if rows := similarity_table(audit.results):
        create_table_artifact(rows, description=f"zooaudit similarity (value beside control): {spec.model}")
    if rows := weat_table(audit.results):
        create_table_artifact(rows, description=f"zooaudit WEAT/SEAT (Holm within method × layer): {spec.model}")
    return audit


def run_audit_model(spec: AuditModelSpec) -> ModelAudit:
    """Run ``audit_model`` on the task runner the spec asks for."""
    with dask_cluster(spec) as address:
        return audit_model.with_options(task_runner=task_runner(address))(spec)
