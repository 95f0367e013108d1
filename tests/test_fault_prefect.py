"""Fault injection, part 3 (issue 18): a Dask worker of the stack is SIGKILLed mid-extraction,
the Prefect server is SIGKILLed and restarted during a deployment run, and the deployment
runner is SIGKILLed (with the run's process, its process group) during a deployment run. The
deployment runs are triggered through the API (``run_deployment``) on the stack's runner.

An audit runs on the stack's Dask cluster with many small shards; as soon as a shard task is
processing on a worker, that worker process is SIGKILLed (its nanny starts a new one). The run
must either complete (Dask reruns the lost task elsewhere) or fail cleanly; a rerun then
completes, every stage committed exactly once on ``main``, and no staging branch is left.

What Prefect does when the runner dies: nothing — the server has no liveness check of its
own for served runs, so the run stays ``Running``. The restarted runner marks it Crashed
(``deployments/orphans.py``); a new run with the same parameters then completes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

from zooaudit.keys import slug_key
from zooaudit.store import Store
from zooaudit.versions import history

pytestmark = pytest.mark.slow

MODEL = "builtin:mlp-w32-s0"


def _kill_a_worker_running(client, marker: str, stop: threading.Event, killed: list) -> None:
    """SIGKILL the worker process that is processing a task whose key contains ``marker``."""
    while not stop.is_set():
        for addr, keys in client.processing().items():
            if any(marker in str(k) for k in keys):
                pid = client.run(os.getpid, workers=[addr])[addr]
                os.kill(pid, signal.SIGKILL)
                killed.append((addr, pid))
                return
        time.sleep(0.02)


def test_worker_killed_mid_shard_then_rerun_commits_each_stage_once(local_stack, tmp_path):
    from distributed import Client

    from zooaudit.specs import AuditModelSpec
    from zooaudit_flows.audit_model import run_audit_model

    store_url = "file://" + str(tmp_path / "store")
    spec = AuditModelSpec(model=MODEL, store=store_url, shard_size=10, batch_size=10,
                          datasets=[{"name": "digits", "max_samples": 160}], factorize={"k": 3, "methods": ["pca"]},
                          similarity={"control": "none"}, task_runner="dask",
                          dask_address=local_stack.config.dask_address)
    killed: list = []
    stop = threading.Event()
    with Client(local_stack.config.dask_address, timeout=10) as client:
        watcher = threading.Thread(target=_kill_a_worker_running, args=(client, "extract", stop, killed))
        watcher.start()
        try:
            first = run_audit_model(spec)
            outcome = "completed"
        except Exception as err:  # noqa: BLE001 — a clean failure is allowed; the rerun must complete
            first, outcome = None, f"failed: {type(err).__name__}: {str(err)[:200]}"
        finally:
            stop.set()
            watcher.join(10)
        assert killed, "no extraction task was seen running on a worker"
        deadline = time.monotonic() + 120   # the nanny restarts the worker (preloads import torch)
        while len(client.scheduler_info(n_workers=-1)["workers"]) < local_stack.config.dask_workers:
            assert time.monotonic() < deadline, "the killed worker was not restarted"
            time.sleep(1)
    again = run_audit_model(spec)
    repo = Store.open(store_url).model_repo(slug_key(MODEL))
    keys = Counter(v.cache_key for v in history(repo) if v.cache_key)
    assert keys and max(keys.values()) == 1, keys
    assert sum(v.stage == "activations" for v in history(repo)) == 1
    assert not [b for b in repo.list_branches() if b.startswith("staging-")], repo.list_branches()
    if first is not None:   # the first run survived the kill: the rerun is all cache hits
        assert all(r.skipped for r in again.results)
    print(f"fault: Dask worker SIGKILLed mid-shard ({killed[0][0]}) -> first run {outcome}; rerun completed, "
          f"{len(keys)} stages committed once each")


FINAL_BOUND_S = 240   # a faulted deployment run is in a final state this long after the fault


def _read_state(run_id):
    """The flow run's state, or None while the server does not answer."""
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            return client.read_flow_run(run_id).state
    except Exception:  # noqa: BLE001 — the server is down or restarting
        return None


def _deployment_spec(store_url: str, max_samples: int):
    from zooaudit.specs import AuditModelSpec

    return AuditModelSpec(model=MODEL, store=store_url, shard_size=20, batch_size=20, task_runner="threads",
                          datasets=[{"name": "digits", "max_samples": max_samples}],
                          factorize={"k": 3, "methods": ["pca"]}, similarity={"control": "none"})


def _wait_extracting(client, run_id, t0: float) -> None:
    """Until an extraction shard task of the run exists (the run is inside the audit)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterName

    while not client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])),
                                    task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="extract-shards"))):
        assert time.monotonic() - t0 < 180, f"no extraction started: {client.read_flow_run(run_id).state}"
        time.sleep(0.2)


def _committed_once(store_url: str) -> int:
    """Every stage's cache key once in ``main``'s history, the activations once, no staging
    branch left; the number of stages."""
    repo = Store.open(store_url).model_repo(slug_key(MODEL))
    keys = Counter(v.cache_key for v in history(repo) if v.cache_key)
    assert keys and max(keys.values()) == 1, keys
    assert sum(v.stage == "activations" for v in history(repo)) == 1
    assert not [b for b in repo.list_branches() if b.startswith("staging-")], repo.list_branches()
    return len(keys)


def test_prefect_server_restarted_during_a_deployment_run_then_rerun_commits_each_stage_once(local_stack, tmp_path):
    """A run of ``audit-model/on-demand`` triggered through the API; once an extraction shard
    task runs, the Prefect server is SIGKILLed and started again on the same database. The run
    reaches a final state within the bound (completed, or failed/crashed — never Running
    forever: the runner's subprocess retries its API calls), and a new run with the same
    parameters completes, every stage committed once."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from s3proxy import start_component, stop_component

    from zooaudit_flows.backfill import AUDIT_MODEL_DEPLOYMENT
    from zooaudit_infra.stack import _http_ok

    cfg = local_stack.config
    store_url = "file://" + str(tmp_path / "store")
    params = {"spec": _deployment_spec(store_url, 160).model_dump(mode="json")}
    t0 = time.monotonic()
    run = run_deployment(AUDIT_MODEL_DEPLOYMENT, parameters=params, timeout=0, as_subflow=False)
    with get_client(sync_client=True) as client:
        _wait_extracting(client, run.id, t0)
    killed_at = time.monotonic()
    stop_component(cfg.data_dir, "prefect-server")
    start_component(local_stack, "prefect-server", lambda: _http_ok(cfg.api_url + "/health").strip() == b"true")
    down_for = time.monotonic() - killed_at
    state = None
    while not (state is not None and state.is_final()):
        assert time.monotonic() - killed_at < FINAL_BOUND_S, f"run not final {FINAL_BOUND_S}s after the kill: {state}"
        state = _read_state(run.id) or state
        time.sleep(1)
    to_final = time.monotonic() - killed_at
    assert state.is_completed() or state.is_failed() or state.is_crashed(), state
    t1 = time.monotonic()
    again = run_deployment(AUDIT_MODEL_DEPLOYMENT, parameters=params, timeout=300, poll_interval=1,
                           as_subflow=False)
    assert again.state.is_completed(), again.state
    n = _committed_once(store_url)
    print(f"fault: Prefect server SIGKILLed {killed_at - t0:.0f}s into a deployment run (mid-extraction), back "
          f"after {down_for:.0f}s -> run {state.name} {to_final:.0f}s after the kill; rerun completed in "
          f"{time.monotonic() - t1:.0f}s, {n} stages committed once each")


def test_a_run_recorded_on_this_host_in_a_dead_process_is_orphaned():
    """``orphans.orphaned``: only a ``host:pid`` of this host whose process is gone."""
    import socket

    from zooaudit_deployments.orphans import orphaned
    from zooaudit_flows.liveness import process_id

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    assert orphaned(f"{host}:{dead.pid}")
    assert not orphaned(process_id())                         # this process
    assert not orphaned(f"{host}:{os.getppid()}")             # a live one
    assert not orphaned(f"elsewhere-{host}:{dead.pid}")       # another host: not ours to judge
    assert not orphaned(None) and not orphaned("") and not orphaned("12345") and not orphaned(f"{host}:x")


RUNNER_BOUND_S = 60   # the restarted runner marks the orphaned run Crashed before serving again


def test_runner_killed_mid_deployment_run_then_the_run_crashes_and_a_rerun_commits_each_stage_once(
        local_stack, tmp_path):
    """A run of ``audit-model/on-demand`` triggered through the API; once an extraction shard
    task runs, the runner's process group (the runner and the run's process) is SIGKILLed.
    The run stays Running while no runner is up (Prefect does not notice); the restarted runner
    marks it Crashed within the bound; a new run with the same parameters completes, every stage
    committed once, the activations once, no staging branch left."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from s3proxy import start_component, stop_component

    from zooaudit_flows.backfill import AUDIT_MODEL_DEPLOYMENT

    cfg = local_stack.config
    store_url = "file://" + str(tmp_path / "store")
    params = {"spec": _deployment_spec(store_url, 400).model_dump(mode="json")}
    t0 = time.monotonic()
    run = run_deployment(AUDIT_MODEL_DEPLOYMENT, parameters=params, timeout=0, as_subflow=False)
    with get_client(sync_client=True) as client:
        _wait_extracting(client, run.id, t0)
        killed_at = time.monotonic() - t0
        stop_component(cfg.data_dir, "runner")          # SIGKILL the group: the runner and the run's process
        time.sleep(5)
        left = client.read_flow_run(run.id)
        assert left.state.is_running(), left.state     # what Prefect does on its own: nothing
        assert left.infrastructure_pid, "the served run did not record its process"
        t1 = time.monotonic()
        start_component(local_stack, "runner", lambda: client.read_flow_run(run.id).state.is_final(),
                        timeout=RUNNER_BOUND_S)
        crashed_after = time.monotonic() - t1
        state = client.read_flow_run(run.id).state
        assert state.is_crashed() and "runner" in state.message, state
        again = run_deployment(AUDIT_MODEL_DEPLOYMENT, parameters=params, timeout=300, poll_interval=1,
                               as_subflow=False)
        assert again.state.is_completed(), again.state
    n = _committed_once(store_url)
    print(f"fault: runner SIGKILLed {killed_at:.0f}s into a deployment run (mid-extraction) -> run left "
          f"{left.state.name}; restarted runner marked it {state.name} after {crashed_after:.0f}s; rerun "
          f"completed ({time.monotonic() - t0:.0f}s in all), {n} stages committed once each")
