"""Flow ``backfill``: audits over a zoo's history, one deployment run per item.

    expand items ─► skip the already audited ─► run_deployment × items (idempotency key,
                                                  at most `concurrency` at once)
                 ─► checkpoints mode: trend per family × dataset (commit) ─► trend report

Modes (``BackfillSpec.mode``):

- ``checkpoints``: every checkpoint matched by ``models`` (``builtin:mlp-w32-s0@*``) becomes a run
  of ``audit-model/on-demand``; afterwards each family's headline metrics are plotted against
  the checkpoint (CKA to the final checkpoint per layer, explained variance at fixed k,
  worst-group accuracy).
- ``nights``: every date from ``start`` to ``end`` becomes a run of ``audit-zoo/nightly``
  scheduled at that night (the nightly flow reads its night from the run's scheduled time);
  a night whose ``nightly-YYYY-MM-DD`` tag exists in the zoo repository is skipped.

Idempotency: an item's key hashes (deployment, parameters, scheduled time). Rerunning the
same backfill finds every item audited and creates no run; an item interrupted earlier is
found by its key instead of being created twice. An item whose earlier run failed gets one
new run with a key derived from the failed run, so reruns of the backfill stay idempotent.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import hashlib
import os
from collections import defaultdict
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from zooaudit.errors import ZooauditError
from zooaudit.keys import canonical_json
from zooaudit.specs import AuditModelSpec, BackfillSpec
from zooaudit.store import Store
from zooaudit_tasks.analysis import checkpoint_trend, committed_refs
from zooaudit_tasks.extract import committed_audits, plan_extraction
from zooaudit_tasks.report import trend_report
from zooaudit_flows.liveness import record_process

AUDIT_MODEL_DEPLOYMENT = "audit-model/on-demand"
NIGHTLY_DEPLOYMENT = "audit-zoo/nightly"
CONCURRENCY_LIMIT = "zooaudit-backfill"   # Prefect global concurrency limit shared by all backfills
NIGHTLY_TIME = dt.time(2, 0)
GLOB_CHARS = "*?["


@dataclass
class BackfillItem:
    label: str                       # model URI or night (YYYY-MM-DD)
    deployment: str
    parameters: dict
    scheduled_time: dt.datetime | None = None

    @property
    def idempotency_key(self) -> str:
        payload = canonical_json({"deployment": self.deployment, "parameters": self.parameters,
                                  "scheduled": self.scheduled_time.isoformat() if self.scheduled_time else None})
        return f"zooaudit-backfill-{hashlib.sha256(payload.encode()).hexdigest()[:32]}"


@dataclass
class Backfill:
    items: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)        # already audited: no run created
    runs: dict[str, str] = field(default_factory=dict)      # item → flow run id
    failed: list[str] = field(default_factory=list)
    trends: list = field(default_factory=list)              # StageResult per family × dataset
    report: str | None = None


def expand_checkpoints(patterns: list[str]) -> list[str]:
    """Model URIs and checkpoint globs → model URIs (order of first match, no repeats).

    ``builtin:NAME@*`` expands to every checkpoint epoch of NAME; other schemes take
    plain URIs (their checkpoint globs belong to zoo manifests).
    """
    from zooaudit.zoo.builtin import BUILTIN_ZOO, CHECKPOINT_EPOCHS

    builtin = [f"builtin:{n}@{e}" for n, s in BUILTIN_ZOO.items() for e in s.epochs]
    out: list[str] = []
    for pat in patterns:
        if not any(c in pat for c in GLOB_CHARS):
            matched = [pat]
        elif pat.startswith("builtin:"):
            matched = [u for u in builtin if fnmatch.fnmatchcase(u, pat)]
            if not matched:
                raise ZooauditError(
                    f"Checkpoint glob {pat!r} matches no builtin checkpoint. Builtin models: "
                    f"{', '.join(sorted(BUILTIN_ZOO))}; epochs: {', '.join(map(str, CHECKPOINT_EPOCHS))} "
                    "(e.g. 'builtin:mlp-w32-s0@*').")
        else:
            raise ZooauditError(f"Checkpoint glob {pat!r}: globs are expanded for builtin: models only; "
                                "list the checkpoints of other sources one URI each.")
        out.extend(u for u in matched if u not in out)
    return out


def _plans(spec: AuditModelSpec) -> list:
    """One extraction plan per dataset the model takes (validates the model and its layers)."""
    return [p for ds in spec.datasets if (p := plan_extraction(spec, ds)) is not None]


def night_audited(store_url: str | None, night: dt.date) -> bool:
    """Whether the zoo repository carries the night's tag (``nightly-YYYY-MM-DD``)."""
    from zooaudit.versions import nightly_tag

    store = Store.open(store_url)
    if store.scheme == "file" and not os.path.exists(store.path("zoo")):
        return False
    return nightly_tag(night) in store.zoo_repo().list_tags()


def night_start(night: dt.date) -> dt.datetime:
    """02:00 of ``night`` in ``$ZOOAUDIT_TIMEZONE`` (the nightly flow tags the scheduled date there)."""
    tz = ZoneInfo(os.environ.get("ZOOAUDIT_TIMEZONE", "UTC"))
    return dt.datetime.combine(night, NIGHTLY_TIME, tzinfo=tz)


def set_concurrency_limit(limit: int) -> None:
    """Create or resize the global concurrency limit that every item run holds a slot of
    (visible and adjustable under Concurrency in the Prefect UI)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import (
        GlobalConcurrencyLimitCreate,
        GlobalConcurrencyLimitUpdate,
    )
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            current = client.read_global_concurrency_limit_by_name(CONCURRENCY_LIMIT)
        except ObjectNotFound:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=CONCURRENCY_LIMIT, limit=limit))
            return
        if current.limit != limit:
            client.update_global_concurrency_limit(CONCURRENCY_LIMIT, GlobalConcurrencyLimitUpdate(limit=limit))


@task(name="backfill-item", cache_policy=NO_CACHE, task_run_name="backfill-{item.label}")
def run_item(item: BackfillItem, timeout_s: float) -> tuple[str, str]:
    """Run (or find) the item's deployment run; return ``(flow run id, final state name)``."""
    from prefect.concurrency.sync import concurrency
    from prefect.deployments import run_deployment

    logger = get_run_logger()
    key = item.idempotency_key
    for _ in range(2):
        with concurrency(CONCURRENCY_LIMIT, occupy=1, timeout_seconds=timeout_s):
            run = run_deployment(item.deployment, parameters=item.parameters, scheduled_time=item.scheduled_time,
                                 idempotency_key=key, timeout=timeout_s, poll_interval=1,
                                 flow_run_name=f"backfill-{item.label}", tags=["zooaudit-backfill"])
        state = run.state
        if state is None or not state.is_final():
            raise ZooauditError(f"backfill item {item.label}: run {run.id} did not finish within {timeout_s:.0f}s")
        if not (state.is_failed() or state.is_crashed() or state.is_cancelled()):
            return str(run.id), state.name
        logger.warning("item %s: run %s ended %s; starting it again", item.label, run.id, state.name)
        key = f"{item.idempotency_key}-after-{run.id}"
    return str(run.id), state.name


def checkpoints(spec: BackfillSpec) -> list[tuple[str, list[str] | None, str | None]]:
    """``(model URI, layer selection or None, family or None)`` of every checkpoint to audit, in
    order (a manifest's globs expand in natural order, one model per checkpoint)."""
    if spec.manifest:
        from zooaudit.zoo.manifest import load_manifest

        return [(e.uri, list(e.layers) if e.layers else None, e.family) for e in load_manifest(spec.manifest)]
    return [(uri, None, None) for uri in expand_checkpoints(spec.models)]


def _checkpoint_items(spec: BackfillSpec, result: Backfill, logger):
    """Model specs of the checkpoints still to audit; ``{uri: (family, model spec)}`` for every checkpoint."""
    entries = checkpoints(spec)
    result.items = [uri for uri, _, _ in entries]
    all_plans, todo = {}, []
    for uri, layers, family in entries:
        options = spec.audit.model_dump()
        if layers:
            options["layers"] = layers
        mspec = AuditModelSpec(model=uri, **options)
        plans = _plans(mspec)   # a bad model or layer fails here, before any run is created
        if not plans:
            raise ZooauditError(f"{uri} takes none of the datasets {[d.name for d in spec.audit.datasets]}.")
        all_plans[uri] = (family, mspec)
        if committed_audits([mspec])[0] is not None:   # every stage already committed
            logger.info("%s: every stage already committed — skipped", uri)
            result.skipped.append(uri)
        else:
            todo.append(BackfillItem(uri, AUDIT_MODEL_DEPLOYMENT, {"spec": mspec.model_dump(mode="json")}))
    return all_plans, todo


def _night_items(spec: BackfillSpec, result: Backfill, logger) -> list[BackfillItem]:
    nights = [spec.start + dt.timedelta(days=i) for i in range((spec.end - spec.start).days + 1)]
    result.items = [n.isoformat() for n in nights]
    store = spec.zoo.store if spec.zoo else spec.audit.store
    params = {"spec": spec.zoo.model_dump(mode="json")} if spec.zoo else {}
    todo = []
    for night in nights:
        if night_audited(store, night):
            logger.info("night %s: already tagged — skipped", night)
            result.skipped.append(night.isoformat())
        else:
            todo.append(BackfillItem(night.isoformat(), NIGHTLY_DEPLOYMENT, params,
                                     night_start(night)))
    return todo


def _trends(spec: BackfillSpec, all_plans: dict[str, tuple], run_id) -> list:
    """One committed trend per model family × dataset with at least two checkpoints (in checkpoint
    order: epoch when the source knows it, else the manifest's natural order)."""
    fams = defaultdict(lambda: defaultdict(list))
    for uri, (family, mspec) in all_plans.items():
        refs = committed_refs(mspec)
        if refs is None:
            raise ZooauditError(f"The audit of {uri} is not committed; audit the checkpoint first.")
        for ref in refs:
            fams[family or ref.family][ref.ds_key].append(ref)
    out = []
    for family, per_ds in fams.items():
        for refs in per_ds.values():
            if len(refs) < 2:
                continue
            ordered = sorted(refs, key=lambda p: (isinstance(p.revision, str), p.revision))   # stable
            out.append(checkpoint_trend(ordered, spec.audit.factorize, spec.audit.bias, run_id, family,
                                        spec.audit.statistics))
    return out


# Threads only submit and wait on deployment runs; the global limit caps how many run at once.
@flow(name="backfill", flow_run_name="backfill-{spec.mode}", task_runner=ThreadPoolTaskRunner(max_workers=16),
      on_running=[record_process])
def backfill(spec: BackfillSpec) -> Backfill:
    logger = get_run_logger()
    run_id = str(flow_run.id) if flow_run.id else None
    result = Backfill()
    if spec.mode == "checkpoints":
        all_plans, todo = _checkpoint_items(spec, result, logger)
    else:
        all_plans, todo = {}, _night_items(spec, result, logger)
    if todo:
        set_concurrency_limit(spec.concurrency)
        futures = {item.label: run_item.submit(item, spec.timeout_s) for item in todo}
        for label, fut in futures.items():
            run, state = fut.result()
            result.runs[label] = run
            if state != "Completed":
                result.failed.append(label)
    logger.info("backfill: %d items, %d already audited, %d runs, %d failed", len(result.items),
                len(result.skipped), len(result.runs), len(result.failed))
    if result.failed:
        raise ZooauditError(f"backfill: items failed: {', '.join(result.failed)} (see their flow runs)")
    if spec.mode == "checkpoints":
        result.trends = _trends(spec, all_plans, run_id)
        if result.trends:
            result.report = trend_report(Store.open(spec.audit.store).url, result.trends,
                                         spec.model_dump(mode="json"), run_id)
            logger.info("trend report: %s", result.report)
    create_markdown_artifact(_markdown(spec, result), description="zooaudit: backfill")
    return result


def _markdown(spec: BackfillSpec, result: Backfill) -> str:
    lines = [f"# Backfill ({spec.mode})", "", "| item | outcome |", "|---|---|"]
    for item in result.items:
        outcome = ("already audited — skipped" if item in result.skipped else
                   f"failed (run `{result.runs.get(item)}`)" if item in result.failed else f"run `{result.runs[item]}`")
        lines.append(f"| `{item}` | {outcome} |")
    for t in result.trends:
        lines.append(f"\nTrend of `{t.model}` on `{t.dataset}`: {'unchanged (cached)' if t.skipped else 'committed'} "
                     f"— snapshot `{t.snapshot}`")
    if result.report:
        lines.append(f"\nReport: {result.report}")
    return "\n".join(lines)
