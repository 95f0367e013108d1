"""Test helper: start the real local stack (``zooaudit_infra.stack``) on free ports, stop it afterwards.

    from stack import running_stack

    @pytest.fixture(scope="module")
    def local_stack(tmp_path_factory):
        with running_stack(tmp_path_factory.mktemp("stack"), runner=False) as st:
            yield st

While the context is open, ``os.environ`` holds the stack's PREFECT_API_URL and
AWS_* settings, so flows run in the test process report to the stack's Prefect
server and can use its S3 (pass ``stack.config.store_url`` / ``dask_address``
explicitly; ``stack.env`` has the full environment for subprocesses).
On exit every process the stack started is stopped and the environment restored;
the helper asserts that nothing is left running.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator

from zooaudit_infra.stack import Stack, StackConfig, _alive, _group_members, down, up


def _free_port_block(n: int) -> int:
    """Start of ``n`` consecutive free loopback ports (best effort: checked, then released)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n >= 65000:
            continue
        socks = []
        try:
            for port in range(base, base + n):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no block of free loopback ports found")


@contextlib.contextmanager
def running_stack(data_dir, *, runner: bool = True, dask_workers: int = 2) -> Iterator[Stack]:
    """Start the stack in ``data_dir`` on free ports; yield it with its env applied to ``os.environ``."""
    base = _free_port_block(10)
    cfg = StackConfig(data_dir=str(data_dir), prefect_port=base, s3_port=base + 1, dask_port=base + 2,
                      weed_port=base + 3, dask_workers=dask_workers, runner=runner, timeout=240)
    stack = up(cfg)
    # Only the Prefect API and the S3 settings go into os.environ: a default store or Dask address
    # would silently redirect every other test of the session to the stack.
    applied = {k: v for k, v in stack.env.items() if k not in ("ZOOAUDIT_STORE", "ZOOAUDIT_DASK_ADDRESS")}
    saved = {k: os.environ.get(k) for k in applied}
    os.environ.update(applied)
    try:
        # Prefect reads its settings once at import: point the running process at the stack too.
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: stack.env["PREFECT_API_URL"]}):
            yield stack
            from prefect.events.worker import EventsWorker
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=10)
            EventsWorker.drain_all(timeout=10)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        down(cfg.data_dir)
        left = [name for name, p in stack.processes.items() if _alive(p) or _group_members(p["pid"])]
        assert not left, f"stack processes still running after down: {left}"
