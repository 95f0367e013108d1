"""The store on real S3 (the local stack's SeaweedFS): audits, concurrency, secrets, Dask.

All tests share the session's stack (``local_stack`` in conftest.py); each writes under its
own prefix of the bucket."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from zooaudit.errors import ZooauditError
from zooaudit.keys import slug_key
from zooaudit.store import (
    Store,
    commit_metadata,
    find_commit,
    open_group,
    write_dataset,
)
from zooaudit.versions import history

pytestmark = pytest.mark.slow

MODEL = "builtin:mlp-w32-s0"


def _prefix_url(stack) -> str:
    return f"s3://{stack.config.bucket}/t-{uuid.uuid4().hex[:8]}"


def test_audit_on_s3_via_stack_dask_cluster_keeps_secrets_out(local_stack):
    from distributed import Client
    from prefect.client.orchestration import get_client

    from zooaudit_flows.audit_model import run_audit_model
    from zooaudit.specs import AuditModelSpec

    store_url = _prefix_url(local_stack)
    spec = AuditModelSpec(model=MODEL, store=store_url, datasets=[{"name": "digits", "max_samples": 120}],
                          factorize={"methods": ["pca"]},
                          task_runner="dask", dask_address=local_stack.config.dask_address)
    with Client(local_stack.config.dask_address, timeout=10) as client:
        before = client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.transition_counter)
        audit = run_audit_model(spec)
        after = client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.transition_counter)
    assert after > before, "no task ran on the stack's Dask cluster"
    assert {r.stage for r in audit.results} >= {"activations", "factorize", "similarity"}
    assert not any(r.skipped for r in audit.results)

    # Read the results back from S3 (a fresh Store object: nothing cached in-process).
    store = Store.open(store_url)
    plan = audit.refs[0]
    acts = open_group(store.model_repo(plan.model_key), f"{plan.ds_key}/acts/{plan.layers[0]}")["activations"]
    assert acts.dims == ("sample", "unit") and acts.sizes["sample"] == 120
    assert np.isfinite(acts.values).all()
    keys = {v.cache_key for v in history(store.model_repo(plan.model_key))}
    assert {r.cache_key for r in audit.results} <= keys

    # Credentials never appear in the run's logs, artifacts, commit metadata or the stack's logs.
    secret = local_stack.env["AWS_SECRET_ACCESS_KEY"]
    from prefect.client.schemas.filters import LogFilter

    with get_client(sync_client=True) as api:
        runs = api.read_flow_runs()
        logs = api.read_logs(log_filter=LogFilter(), limit=200)
        artifacts = api.read_artifacts()
    assert runs and logs and artifacts
    texts = [str(log.message) for log in logs] + [str(a.data) + str(a.description) for a in artifacts]
    texts += [str(r.parameters) for r in runs]
    texts += [str(info.metadata) for info in store.model_repo(plan.model_key).ancestry(branch="main")]
    for root, _, files in os.walk(os.path.join(local_stack.config.data_dir, "logs")):
        texts += [Path(root, f).read_text(errors="replace") for f in files]
    leaks = [t[:80] for t in texts if secret in t]
    assert not leaks, leaks


def _stage_commit(store, key, group, value):
    ds = xr.Dataset({"v": ("i", np.full(3, value))})
    meta = commit_metadata("toy", key, {"value": value}, summary={"value": value})
    return store.model_repository("toy").commit(lambda s: write_dataset(s, ds, group),
                  message=f"toy {key}", metadata=meta)


def test_concurrent_commits_to_one_repository_lose_nothing(local_stack):
    """Eight writers at once on one S3 repository: four groups, two different results each."""
    store = Store.open(_prefix_url(local_stack))
    store.model_repo("toy")
    jobs = [(f"key-{g}-{i}", f"g{g}", float(10 * g + i)) for g in range(4) for i in range(2)]
    errors: list[BaseException] = []

    def run(job):
        try:
            _stage_commit(store, *job)
        except BaseException as err:  # noqa: BLE001 — reported by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    repo = store.model_repo("toy")
    assert sorted(v.cache_key for v in history(repo)) == sorted(k for k, _, _ in jobs)
    # Each group holds the last of its two commits, and both are in its history.
    for g in range(4):
        last = next(v for v in history(repo) if v.cache_key.startswith(f"key-{g}-"))
        assert open_group(repo, f"g{g}")["v"].values[0] == last.summary["value"]


def test_different_models_never_wait_for_each_other(local_stack):
    store = Store.open(_prefix_url(local_stack))
    store.model_repo("slow-model"), store.model_repo("fast-model")
    done = threading.Event()
    with store.lock("models/slow-model"):      # another run holds model A's repository
        t0 = time.monotonic()
        th = threading.Thread(target=lambda: (_stage_commit_on(store, "fast-model"), done.set()))
        th.start()
        assert done.wait(30), "a commit to model B waited for model A's lock"
        elapsed = time.monotonic() - t0
        th.join()
    assert find_commit(store.model_repo("fast-model"), "fast-1") is not None
    assert elapsed < 30


def _stage_commit_on(store, model):
    ds = xr.Dataset({"v": ("i", np.zeros(2))})
    store.model_repository(model).commit(lambda s: write_dataset(s, ds, "g"),
           message="x", metadata=commit_metadata("toy", "fast-1", {}))


def test_two_flows_auditing_one_model_at_once(local_stack):
    """Two processes audit the same model concurrently on S3: both succeed, every stage's result
    is committed on main, and the activations are extracted and committed once."""
    store_url = _prefix_url(local_stack)
    cmd = [sys.executable, "-m", "zooaudit_infra.cli", "audit-model", MODEL, "--threads", "--dataset", "digits",
           "--max-samples", "60", "--store", store_url]
    env = {**os.environ, **local_stack.env}
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    repo = Store.open(store_url).model_repo(slug_key(MODEL))
    hist = history(repo)
    stages = {v.stage for v in hist}
    assert {"activations", "factorize", "similarity"} <= stages
    # Each stage's result is committed exactly once, whichever run got there first.
    keys = [v.cache_key for v in hist]
    assert len(keys) == len(set(keys)), keys
    assert sum(v.stage == "activations" for v in hist) == 1
    # The second run found the first one's activations (it waited on the extraction lock).
    assert sum("activations" in o and "skipped (cache hit)" in o for o in outs) >= 1
    assert local_stack.env["AWS_SECRET_ACCESS_KEY"] not in "".join(outs)


def test_credentials_from_a_prefect_secret_block(local_stack, monkeypatch):
    """Keys from a Secret block (ZOOAUDIT_S3_SECRET_BLOCK) reach this process and the stack's
    Dask workers; without them the S3 server refuses the store."""
    import json

    import icechunk
    from distributed import Client
    from prefect.blocks.system import Secret

    from zooaudit_flows.credentials import apply_s3_credentials

    env = local_stack.env
    Secret(value=json.dumps({"aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
                             "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"]})).save(
        "zooaudit-s3-test", overwrite=True)
    addr = local_stack.config.dask_address
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    store = Store.open(_prefix_url(local_stack))
    with pytest.raises((icechunk.IcechunkError, PermissionError, ZooauditError)):   # StoreUnavailable
        store.model_repo("cred")
    with Client(addr, timeout=10) as client:
        # Lambdas run in the workers (a bound ``os.environ.pop`` would act on a pickled copy).
        client.run(lambda: os.environ.pop("AWS_SECRET_ACCESS_KEY", None))
        assert set(client.run(lambda: os.environ.get("AWS_SECRET_ACCESS_KEY")).values()) == {None}
        monkeypatch.setenv("ZOOAUDIT_S3_SECRET_BLOCK", "zooaudit-s3-test")
        assert apply_s3_credentials(addr)
        on_workers = set(client.run(lambda: os.environ.get("AWS_SECRET_ACCESS_KEY")).values())
    assert on_workers == {env["AWS_SECRET_ACCESS_KEY"]}
    _stage_commit_on(store, "cred")
    assert find_commit(store.model_repo("cred"), "fast-1") is not None
    monkeypatch.setenv("ZOOAUDIT_S3_SECRET_BLOCK", "no-such-block")
    with pytest.raises(ZooauditError, match="no-such-block"):
        apply_s3_credentials()
