"""Fault injection, part 6 (issue 18): after the S3 stack ran audits, the secrets appear nowhere.

The secret values are the stack's (``Stack.secret_values``): the S3 secret key, and the
Prefect API auth string when the stack has one. The session stack binds loopback, where
``zooaudit up`` sets no auth string (it does beyond loopback: test_stack.py), so here the
S3 secret key (and the access key id, which should not leak either) is searched for in:

- every object of the stack's bucket, read whole (store repositories, reports, locks);
- every file under the stack's data directory (component logs, Dask worker directories,
  the Prefect server's database with its flow runs, task runs, logs and artifacts), except
  the two files that hold the keys by design: ``stack.env`` (0600) and SeaweedFS's identities;
- every flow run's parameters, every log and artifact, as the Prefect API returns them;
- the CLI's output.

Runs after the other S3 tests of the session (file order), and runs an audit of its own on
the stack's Dask cluster so that it has something to search when run alone.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

KEPT_BY_DESIGN = {"stack.env", "s3-identities.json"}


def _needles(stack) -> dict[str, bytes]:
    found = {"AWS_SECRET_ACCESS_KEY": stack.env["AWS_SECRET_ACCESS_KEY"].encode(),
             "AWS_ACCESS_KEY_ID": stack.env["AWS_ACCESS_KEY_ID"].encode()}
    if "PREFECT_API_AUTH_STRING" in stack.env:
        found["PREFECT_API_AUTH_STRING"] = stack.env["PREFECT_API_AUTH_STRING"].encode()
    assert set(stack.secret_values) <= {v.decode() for v in found.values()}
    return found


def _hits(blob: bytes, needles: dict[str, bytes]) -> list[str]:
    return [name for name, value in needles.items() if value in blob]


def test_no_secret_anywhere_after_audits_on_the_s3_stack(local_stack):
    needles = _needles(local_stack)
    cfg = local_stack.config
    env = {k: v for k, v in {**os.environ, **local_stack.env}.items() if k != "ZOOAUDIT_STORE"}
    store_url = f"s3://{cfg.bucket}/secrets-{uuid.uuid4().hex[:8]}"
    cmd = [sys.executable, "-m", "zooaudit_infra.cli", "audit-model", "builtin:mlp-w32-s0", "--dataset", "digits",
           "--max-samples", "60", "--factorize", "pca", "--store", store_url, "--dask-address", cfg.dask_address]
    run = subprocess.run(cmd, env=env, capture_output=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    leaks: list[str] = [f"CLI output: {h}" for h in _hits(run.stdout + run.stderr, needles)]

    import s3fs

    fs = s3fs.S3FileSystem(key=local_stack.env["AWS_ACCESS_KEY_ID"], secret=local_stack.env["AWS_SECRET_ACCESS_KEY"],
                           client_kwargs={"endpoint_url": cfg.s3_endpoint}, skip_instance_cache=True)
    objects = fs.find(cfg.bucket)
    assert any(p.startswith(f"{store_url[5:]}/") for p in objects), "the audit wrote nothing to the bucket"
    for path in objects:
        leaks += [f"s3://{path}: {h}" for h in _hits(fs.cat_file(path), needles)]

    files = 0
    for root, dirs, names in os.walk(cfg.data_dir):
        dirs[:] = [d for d in dirs if d != "seaweedfs"]   # its volumes are the bucket, read above through S3
        for name in names:
            if name in KEPT_BY_DESIGN:
                continue
            path = Path(root, name)
            try:
                blob = path.read_bytes()
            except OSError:   # a socket or a file removed meanwhile
                continue
            files += 1
            leaks += [f"{path}: {h}" for h in _hits(blob, needles)]

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter

    with get_client(sync_client=True) as api:
        runs = api.read_flow_runs(limit=200)
        logs = api.read_logs(log_filter=LogFilter(), limit=200)
        artifacts = api.read_artifacts(limit=200)
    assert runs and logs and artifacts
    for r in runs:
        leaks += [f"flow run {r.name} parameters: {h}" for h in _hits(repr(r.parameters).encode(), needles)]
    for item in [*logs, *artifacts]:
        leaks += [f"Prefect API {type(item).__name__}: {h}" for h in _hits(item.model_dump_json().encode(), needles)]
    print(f"secrets: searched {len(objects)} objects, {files} files, {len(runs)} flow runs, {len(logs)} logs, "
          f"{len(artifacts)} artifacts for {sorted(needles)}: {len(leaks)} hits")
    assert not leaks, leaks
