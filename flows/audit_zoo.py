"""Flow ``audit-zoo``: audit every model, compare them on shared datasets, report.

    validate ─► cache-check ─► audit-model × changed models
             ─► per shared dataset: the zoo stages of the registry on every model's ActivationsRef
                  (zoo-similarity: model × model; revision-similarity: consecutive checkpoints)
             ─► regression check ─► report ─► tag
"""

from __future__ import annotations

import contextlib
import os
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.runtime import deployment, flow_run

from zooaudit import versions
from zooaudit.report.summary import similarity_table, zoo_markdown
from zooaudit.specs import AuditZooSpec
from zooaudit.stages import ZOO_STAGES
from zooaudit.store import Store
from zooaudit_tasks.analysis import zoo_stage
from zooaudit_tasks.extract import committed_audits, validate_zoo
from zooaudit_tasks.report import build_report, tag_repositories

from .audit_model import ModelAudit, audit_model
from .credentials import apply_s3_credentials
from .liveness import record_process
from .events import activation_drift, emit_regressions, find_regressions
from .runners import dask_cluster, task_runner


@dataclass
class ZooAudit:
    run_id: str
    report: str
    models: list = field(default_factory=list)
    zoo_results: list = field(default_factory=list)


def report_link(report: str) -> str:
    """The report's summary page as a URL a browser opens (``file://`` for a local store)."""
    return report if "://" in report else "file://" + os.path.abspath(report)


def _run_tag(spec: AuditZooSpec) -> str | None:
    """The tag of this run: ``spec.tag``, else ``nightly-{date}`` for the nightly deployment;
    ``{date}`` is the scheduled date in ``$ZOOAUDIT_TIMEZONE`` (default UTC)."""
    template = spec.tag
    if template is None and deployment.name == "nightly":
        template = versions.NIGHTLY_PREFIX + "{date}"
    if template is None:
        return None
    when = flow_run.scheduled_start_time or datetime.now(UTC)
    when = when.astimezone(ZoneInfo(os.environ.get("ZOOAUDIT_TIMEZONE", "UTC")))
    return template.replace("{date}", when.date().isoformat())


@flow(name="audit-zoo", on_running=[record_process])
def audit_zoo(spec: AuditZooSpec) -> ZooAudit:
    logger = get_run_logger()
    run_id = str(flow_run.id) if flow_run.id else None
    apply_s3_credentials()      # a Secret block's S3 keys, before the first read of the store
    spec = validate_zoo(spec)   # bad input fails here, before any commit; compare layers resolved
    store = Store.open(spec.store)
    model_specs = [spec.model_spec(model) for model in spec.models]
    # A model whose every stage is committed gets its results from the cache check: no
    # audit-model subflow (flow-run creation, planning, artifacts) and, when no model changed,
    # no Dask cluster either. Its results are the ones the subflow returns on a full cache hit.
    committed = committed_audits(model_specs)
    cached = [s.model for s, hit in zip(model_specs, committed) if hit is not None]
    if cached:
        logger.info("every stage committed, no audit needed: %s", ", ".join(cached))
    audits = []
    changed = len(cached) < len(model_specs)
    with dask_cluster(spec) if changed else contextlib.nullcontext() as address:
        for model_spec, hit in zip(model_specs, committed):
            if hit is not None:
                audits.append(ModelAudit(model_spec.model, *hit))
                continue
            sub = audit_model.with_options(task_runner=task_runner(address))
            audits.append(sub(model_spec))
    by_dataset = defaultdict(list)
    for audit in audits:
        for ref in audit.refs:
            by_dataset[ref.ds_key].append(ref)
    futures = [zoo_stage.submit(stage.name, refs, getattr(spec, stage.spec_field),
                                {o: getattr(spec, o) for o in stage.options}, run_id=run_id)
               for refs in by_dataset.values() for stage in ZOO_STAGES]
    zoo_results = [r for r in (f.result() for f in futures) if r is not None]
    drift = activation_drift(audits)
    regressions = find_regressions(audits, spec.cka_drop_threshold, drift)
    emit_regressions(regressions, {a.model: a.refs[0].model_key for a in audits if a.refs}, store.url)
    for reg in regressions:
        logger.warning("regression: %s %s on %s", reg["model"], reg["metric"], reg["dataset"])
    report = build_report(store.url, spec.model_dump(mode="json"), audits, zoo_results, run_id,
                          regressions=regressions, drift=drift)
    markdown = zoo_markdown(audits, zoo_results, report_link(report))
    if cached:   # their per-model artifacts are those of the run that committed their stages
        markdown += "\n\nServed from committed results (no audit-model run): " + ", ".join(f"`{m}`" for m in cached)
    create_markdown_artifact(markdown, description="zooaudit: zoo audit")
    create_link_artifact(report_link(report), link_text="zooaudit report: summary (index.html)",
                         description="zooaudit: report site")
    if rows := similarity_table(zoo_results):
        create_table_artifact(rows, description="zooaudit zoo similarity (value beside control)")
    if (tag := _run_tag(spec)) is not None:
        # After every commit of the run: the tag names the version this run produced.
        tagged = tag_repositories(store.url, sorted({r.model_key for a in audits for r in a.refs}), tag)
        logger.info("tagged %d repositories: %s", len(tagged), ", ".join(sorted(set(tagged.values()))))
    logger.info("report: %s", report)
    return ZooAudit(run_id=run_id or "", report=report, models=audits, zoo_results=zoo_results)
