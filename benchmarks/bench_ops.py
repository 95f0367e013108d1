"""Operations: a warm nightly rerun against the cold run, and the orchestration overhead.

On a fresh store, under a temporary Prefect server (the CLI's, unless PREFECT_API_URL is set):

1. the builtin 6-model zoo's weights are made (training, not timed);
2. **cold**: ``audit_zoo`` on the zoo — every stage computed and committed;
3. **warm**: the same nightly again with no zoo change — every stage a cache hit.

Reported: wall time of each run and the ratio warm / cold (target ≤ 0.10); the commits of
every repository and the bytes under each repository before and after the warm run (target:
unchanged — the warm run's only new files are its report); and, from the task runs the
server recorded, the cold run's orchestration overhead: flow wall time minus the sum of task
compute, and flow wall time minus the union of task intervals (the time when no task ran at
all: flow start-up, planning, API calls; tasks run two at a time, so the sum can exceed the
wall time).

    .venv/bin/python benchmarks/bench_ops.py [--max-samples N] [--task-runner threads|dask]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("AWS_REQUEST_CHECKSUM_CALCULATION", "WHEN_REQUIRED")


def repo_state(store_root: Path) -> dict[str, tuple[int, int]]:
    """``{repository: (commits on main, bytes on disk)}`` for every repository of the store."""
    from zooaudit.store import Store

    store = Store.open(str(store_root))
    out = {}
    repos = [("zoo", store_root / "zoo")] + [(f"models/{p.name}", p) for p in sorted((store_root / "models").iterdir())]
    for name, path in repos:
        repo = store.repo(*name.split("/"))
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        out[name] = (len(list(repo.ancestry(branch="main"))), size)
    return out


def task_intervals(since, until) -> list[tuple[float, float, str]]:
    """``(start, end, name)`` in seconds of every finished task run that started in [since, until]."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterStartTime

    runs: list = []
    with get_client(sync_client=True) as client:
        while True:   # the API returns at most 200 per page
            page = client.read_task_runs(task_run_filter=TaskRunFilter(
                start_time=TaskRunFilterStartTime(after_=since, before_=until)), limit=200, offset=len(runs))
            runs += page
            if len(page) < 200:
                break
    return [(r.start_time.timestamp(), r.end_time.timestamp(), r.name) for r in runs
            if r.start_time and r.end_time]


def union_length(intervals: list[tuple[float, float, str]]) -> float:
    total, cur_start, cur_end = 0.0, None, None
    for s, e, _ in sorted(intervals):
        if cur_end is None or s > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = s, e
        else:
            cur_end = max(cur_end, e)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def timed_run(spec) -> tuple[float, object, list]:
    import datetime as dt

    from zooaudit_flows.audit_zoo import audit_zoo

    since = dt.datetime.now(dt.UTC)
    t0 = time.perf_counter()
    result = audit_zoo(spec)
    wall = time.perf_counter() - t0
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)
    EventsWorker.drain_all(timeout=30)
    time.sleep(2)   # task-run end states reach the server asynchronously
    return wall, result, task_intervals(since, dt.datetime.now(dt.UTC))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-samples", type=int, default=None, help="samples per dataset (default: the whole split)")
    p.add_argument("--task-runner", choices=("threads", "dask"), default="threads")
    p.add_argument("--json", help="write the figures to this file")
    args = p.parse_args(argv)

    from zooaudit_infra.cli import prefect_api
    from zooaudit.specs import AuditZooSpec
    from zooaudit.stages import validate_zoo

    with tempfile.TemporaryDirectory(prefix="bench-ops-") as tmp:
        root = Path(tmp) / "store"
        datasets = [{"name": n, "max_samples": args.max_samples} for n in ("digits", "colored-digits")]
        spec = AuditZooSpec(store=str(root), task_runner=args.task_runner, datasets=datasets)
        assert len(spec.models) == 6, spec.models
        t0 = time.perf_counter()
        validate_zoo(spec)   # trains the builtin weights: setup, not part of the nightly
        print(f"weights ready in {time.perf_counter() - t0:.1f}s; zoo: {', '.join(spec.models)}", flush=True)
        with prefect_api():
            cold, cold_result, cold_tasks = timed_run(spec)
            before = repo_state(root)
            warm, warm_result, warm_tasks = timed_run(spec)
            after = repo_state(root)
        computed = sum(not r.skipped for a in cold_result.models for r in a.results)
        skipped = sum(r.skipped for a in warm_result.models for r in a.results) + sum(
            z.skipped for z in warm_result.zoo_results)
        total_warm = sum(1 for a in warm_result.models for _ in a.results) + len(warm_result.zoo_results)
        task_sum = sum(e - s for s, e, _ in cold_tasks)
        busy = union_length(cold_tasks)
        figures = {
            "models": len(spec.models), "task_runner": args.task_runner, "max_samples": args.max_samples,
            "cold_s": round(cold, 2), "warm_s": round(warm, 2), "warm_over_cold": round(warm / cold, 4),
            "cold_stages_committed": computed, "warm_stages_skipped": f"{skipped}/{total_warm}",
            "commits_unchanged": {k: v[0] for k, v in before.items()} == {k: v[0] for k, v in after.items()},
            "repo_bytes_unchanged": before == after,
            "cold_task_runs": len(cold_tasks), "cold_task_sum_s": round(task_sum, 2),
            "cold_task_busy_s": round(busy, 2),
            "overhead_wall_minus_sum_s": round(cold - task_sum, 2),
            "overhead_wall_minus_busy_s": round(cold - busy, 2),
            "overhead_fraction_of_wall": round((cold - busy) / cold, 4),
            "warm_task_runs": len(warm_tasks),
        }
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    ok = figures["warm_over_cold"] <= 0.10 and figures["commits_unchanged"] and figures["repo_bytes_unchanged"]
    print("targets met" if ok else "TARGET MISSED: warm/cold ≤ 0.10 with no new commits or repository bytes")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
