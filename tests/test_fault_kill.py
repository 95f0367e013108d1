"""Kill anywhere: SIGKILL a real ``zooaudit audit-model`` CLI (its whole process group: the
temporary Prefect server included) at points aimed from the outside — a random delay past a
task-run line of its log — on the file:// store and on S3 (SeaweedFS).

After every kill: no process of the run is left; ``main`` of every repository shows only
complete commits (every array on its tip reads in full and is byte-identical to the same
array of an uninterrupted reference run; every committed cache key is one the reference
committed); no commit lock is left held (file://: flock is free; S3: a lock object the
killed run left is broken after ``$ZOOAUDIT_S3_LOCK_TTL``). Each killed run is rerun with
the same command — the rerun is the next run to kill — until one finishes; its arrays must
equal the reference's byte for byte.

The CI variant kills a few times at spread-out points of the smallest audit; with
``ZOOAUDIT_SOAK=1`` it kills ~30 times at random points (figures in docs/reliability.md).
"""

from __future__ import annotations

import json
import os
import random
import time
import uuid

import pytest

from faults import (
    CliRun,
    committed_stages,
    descendants,
    descendants_gone,
    file_locks_held,
    group_gone,
    published_reports,
    s3_lock_objects,
    store_arrays,
    store_tags,
    tagged_on_main,
)

SOAK = os.environ.get("ZOOAUDIT_SOAK") == "1"
# Kills per store: 2 in CI (spread over the run; the suite's time budget), ~30 at random points in the soak;
# $ZOOAUDIT_FAULT_KILLS overrides either.
KILLS = int(os.environ.get("ZOOAUDIT_FAULT_KILLS") or (30 if SOAK else 2))
MODEL = "builtin:mlp-w32-s0"
ARGS = ["audit-model", MODEL, "--threads", "--dataset", "digits", "--max-samples", "40"]
# The zoo flow of the same model writes the report and then tags every repository it audited.
ZOO_ARGS = ["audit-zoo", "--models", MODEL, "--threads", "--dataset", "digits", "--max-samples", "40",
            "--tag", "kill-test"]
LOCK_TTL = 3.0          # seconds: ZOOAUDIT_S3_LOCK_TTL of the runs, so a killed run's lock is broken fast
RUN_TIMEOUT = 600.0


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ZOOAUDIT_STORE", "ZOOAUDIT_DASK_ADDRESS")}
    env["ZOOAUDIT_S3_LOCK_TTL"] = str(LOCK_TTL)
    env.update(extra or {})
    return env


def _reference(store_url: str, env: dict[str, str], args: list[str] = ARGS) -> tuple[list[tuple[float, str]], dict]:
    """An uninterrupted run: its task-run markers (time, name), the arrays it committed, its tags
    and its report's file names."""
    run = CliRun([*args, "--store", store_url], env)
    rc = run.wait(RUN_TIMEOUT)
    assert rc == 0, run.output[-3000:]
    assert not group_gone(run.pgid)
    markers = run.markers()
    assert markers, run.output[-3000:]
    return markers, {"arrays": store_arrays(store_url), "stages": committed_stages(store_url),
                     "tags": {r: sorted(t) for r, t in store_tags(store_url).items()},
                     "reports": list(published_reports(store_url).values())}


def _gaps(markers: list[tuple[float, str]]) -> list[tuple[str, float]]:
    """(marker, seconds to the next marker of the reference run), ``"start"`` first."""
    points = [(0.0, "start"), *markers]
    return [(name, max(0.05, points[i + 1][0] - t) if i + 1 < len(points) else 1.0)
            for i, (t, name) in enumerate(points)]


def _targets(markers: list[tuple[float, str]], n: int, rng: random.Random) -> list[tuple[str, float]]:
    """``n`` kill points: (marker to wait for, delay past it). ``"start"`` is the process start
    (planning, validation, server start-up). The delay is drawn within the gap to the next marker
    of the reference run, so the kill lands inside the task that follows the marker."""
    gaps = _gaps(markers)
    if n <= 3 and not SOAK:
        # Spread over the run: evenly spaced markers, each visited once, in run order.
        picks = sorted({round(i * (len(gaps) - 1) / max(1, n - 1)) for i in range(n)})
        chosen = [gaps[i] for i in picks]
    else:
        chosen = [rng.choice(gaps) for _ in range(n)]
    return [(name, rng.uniform(0.0, gap)) for name, gap in chosen]


def _phase(run: CliRun) -> str:
    """Where the kill landed: after the last finished task, i.e. inside the one that follows."""
    done = run.markers()
    return f"after {done[-1][1]}" if done else "start-up/planning"


def _check_after_kill(store_url: str, ref: dict, store_dir) -> list[str]:
    """The invariants of the store after a kill; returns the S3 lock objects left (to be broken)."""
    # A report is published by its by-key marker, written after every file of the report: each
    # published report has all the files of the reference's (a kill mid-render leaves an
    # unpublished folder, which the rerun does not reuse).
    for marker, names in published_reports(store_url).items():
        assert names in ref["reports"], f"published report {marker} is incomplete: {names}"
    # A tag names a complete version: every tagged snapshot is on main, and tagging is idempotent
    # (a rerun re-tags the same snapshot under the same name, never a name-2).
    for repo, tags in store_tags(store_url).items():
        assert set(tags) <= set(ref["tags"].get(repo, [])), f"{repo}: tags {sorted(tags)}"
        on_main = tagged_on_main(store_url, repo)
        assert all(on_main[t] for t in tags), f"{repo}: a tag names a snapshot that is not on main"
    arrays = store_arrays(store_url)
    for repo, paths in arrays.items():
        assert repo in ref["arrays"], f"repository {repo} is not one the reference run made"
        for path, digest in paths.items():
            # A partial commit would show a missing array group member, a chunk that does not
            # read, or bytes that differ from the complete result.
            assert ref["arrays"][repo].get(path) == digest, f"{repo}:{path} differs from the reference"
    for repo, keys in committed_stages(store_url).items():
        assert set(keys) <= set(ref["stages"][repo]), f"{repo}: commits {set(keys) - set(ref['stages'][repo])}"
    if store_dir is not None:
        assert not file_locks_held(store_dir), "a commit lock is still held after the kill"
        return []
    return s3_lock_objects(store_url)


def _kill_chain(store_url: str, env: dict[str, str], ref: dict, targets, store_dir=None,
                args: list[str] = ARGS) -> list[dict]:
    """Run ``args`` on ``store_url`` once per target, killing each run at its point; then rerun
    to completion and compare with the reference. Returns one record per run."""
    records = []
    for name, delay in [*targets, (None, 0.0)]:
        run = CliRun([*args, "--store", store_url], env)
        record = {"target": name, "delay_s": round(delay, 3)}
        if name is None:
            rc = run.wait(RUN_TIMEOUT)
            assert rc == 0, run.output[-3000:]
            record.update(phase="completed", elapsed_s=round(time.monotonic() - run.t0, 1))
        else:
            hit = name == "start" or run.wait_for(lambda: any(m == name for _, m in run.markers()), RUN_TIMEOUT)
            if hit:
                time.sleep(delay)
            family = descendants(run.pgid) | {run.pgid}
            finished = run.proc.poll() is not None
            record["phase"] = "finished before the kill" if finished else _phase(run)
            if finished:   # a resumed run that had nothing left to do at that point, or one that failed
                record["rc"] = run.proc.returncode
                record["tail"] = [line for _, line in run.lines if "error" in line.lower()][-3:]
            run.kill()
            assert not group_gone(run.pgid), "processes of the killed run's group are still alive"
            assert not descendants_gone(family), "a process the killed run started is still alive"
            record["locks_left"] = _check_after_kill(store_url, ref, store_dir)
        records.append(record)
        assert not group_gone(run.pgid)
    assert store_arrays(store_url) == ref["arrays"], "the resumed run's arrays differ from the reference"
    assert {r: set(k) for r, k in committed_stages(store_url).items()} == \
        {r: set(k) for r, k in ref["stages"].items()}
    assert {r: sorted(t) for r, t in store_tags(store_url).items()} == ref["tags"], "tags differ from the reference"
    assert len(published_reports(store_url)) == len(ref["reports"]), "the rerun published another report"
    return records


def _report(label: str, records: list[dict]) -> None:
    kills = [r for r in records if r["target"] is not None and r["phase"] != "finished before the kill"]
    phases = sorted({r["phase"] for r in kills})
    print(f"\n[fault-kill {label}] kills={len(kills)} distinct_points={len(phases)} phases={phases}")
    print(json.dumps(records))


def test_s3_lock_ttl_from_the_environment(monkeypatch):
    """The TTL after which a killed run's S3 lock is broken: 300 s, or ``$ZOOAUDIT_S3_LOCK_TTL``;
    a value that is not a positive number is refused, naming the variable."""
    from zooaudit import store
    from zooaudit.errors import ZooauditError

    monkeypatch.delenv("ZOOAUDIT_S3_LOCK_TTL", raising=False)
    assert store.lock_ttl() == store.S3_LOCK_TTL == 300.0
    monkeypatch.setenv("ZOOAUDIT_S3_LOCK_TTL", "2.5")
    assert store.lock_ttl() == 2.5
    for bad in ("0", "-1", "soon", "nan", "0.01"):   # under 1 s: shorter than a PUT's round trip
        monkeypatch.setenv("ZOOAUDIT_S3_LOCK_TTL", bad)
        with pytest.raises(ZooauditError, match="ZOOAUDIT_S3_LOCK_TTL.*positive number"):
            store.lock_ttl()


@pytest.mark.slow
def test_kill_anywhere_file_store(tmp_path):
    """``audit-zoo --tag`` of one model on file://, killed at spread-out points of the audit
    (start-up, then inside a model stage), then inside the report (after the regression check)
    and inside the tagging (after the report): after each, only complete reports are published
    and every tag names a snapshot on main; the rerun publishes one report and the reference's
    tags, no ``name-2``. One chain for all four points (one reference run, one final rerun)."""
    env = _env({"PREFECT_API_URL": ""})   # the CLI starts (and must not leave) its own Prefect server
    env = {k: v for k, v in env.items() if v != ""}
    store_dir = tmp_path / "killed"
    _kill_report_and_tag("file", "file://" + str(tmp_path / "ref"), "file://" + str(store_dir), env,
                         random.Random(18), store_dir)


@pytest.fixture(scope="module")
def small_stack(tmp_path_factory):
    from stack import running_stack

    with running_stack(tmp_path_factory.mktemp("stack"), runner=False, dask_workers=1) as st:
        yield st


@pytest.mark.slow
def test_kill_anywhere_s3_store(small_stack):
    rng = random.Random(7)
    env = _env(small_stack.env)
    env.pop("ZOOAUDIT_STORE", None)
    env.pop("ZOOAUDIT_DASK_ADDRESS", None)
    bucket = small_stack.config.bucket
    markers, ref = _reference(f"s3://{bucket}/ref-{uuid.uuid4().hex[:6]}", env)
    targets = _targets(markers, KILLS, rng)
    records = _kill_chain(f"s3://{bucket}/killed-{uuid.uuid4().hex[:6]}", env, ref, targets)
    _report("s3", records)


def _kill_report_and_tag(label: str, ref_url: str, url: str, env: dict[str, str], rng, store_dir=None) -> None:
    """Kill ``audit-zoo --tag`` first at ``KILLS`` points of the audit before its report (spread
    out in CI, random in the soak), then inside the report and inside the tagging."""
    markers, ref = _reference(ref_url, env, ZOO_ARGS)
    assert len(ref["reports"]) == 1 and ref["tags"], (ref["reports"], ref["tags"])
    names = [name for _, name in markers]
    # The spread-out kills land in the model's audit (start-up .. its last stage), as the
    # audit-model variant's do; the zoo stages, report and tag follow.
    audit = markers[:names.index("revision-similarity" if "revision-similarity" in names else "regression-check")]
    gaps = dict(_gaps(markers))
    tail = [("regression-check", rng.uniform(0.0, gaps["regression-check"])),
            ("report", rng.uniform(0.0, gaps["report"]))]
    records = _kill_chain(url, env, ref, [*_targets(audit, KILLS, rng), *tail], store_dir=store_dir,
                          args=ZOO_ARGS)
    _report(label, records)
    report_kill, tag_kill = records[-3], records[-2]
    assert report_kill["phase"] == "after regression-check", report_kill   # the kill landed in the report
    assert tag_kill["phase"] in ("after report", "after tag"), tag_kill


@pytest.mark.slow
@pytest.mark.skipif(not SOAK, reason="soak variant (ZOOAUDIT_SOAK=1): the CI budget holds the file:// one")
def test_kill_during_report_and_tag_s3_store(small_stack):
    env = _env(small_stack.env)
    env.pop("ZOOAUDIT_STORE", None)
    env.pop("ZOOAUDIT_DASK_ADDRESS", None)
    bucket = small_stack.config.bucket
    _kill_report_and_tag("zoo-s3", f"s3://{bucket}/zref-{uuid.uuid4().hex[:6]}",
                         f"s3://{bucket}/zkilled-{uuid.uuid4().hex[:6]}", env, random.Random(22))
