"""Task runners: one local Dask cluster per top-level run, or an existing one."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

from prefect.task_runners import ThreadPoolTaskRunner


@contextlib.contextmanager
def dask_cluster(options) -> Iterator[str | None]:
    """Yield a scheduler address: ``options.dask_address``, else ``$ZOOAUDIT_DASK_ADDRESS`` (set by
    ``zooaudit up`` for the runner it starts), or a LocalCluster we start
    (worker processes) and close afterwards; None when tasks run on threads."""
    from .credentials import apply_s3_credentials

    # S3 keys from a Prefect Secret block (if configured) reach this process before any
    # LocalCluster worker is spawned (they inherit them) …
    apply_s3_credentials()
    if options.task_runner != "dask":
        yield None
        return
    if address := options.dask_address or os.environ.get("ZOOAUDIT_DASK_ADDRESS"):
        apply_s3_credentials(address)   # … and the workers of an existing cluster in memory
        yield address
        return
    from distributed import LocalCluster
    from prefect.settings import PREFECT_API_URL

    # Worker processes inherit the environment at spawn: point them at this run's
    # Prefect API so their task runs land on the same server (else each worker
    # would start an ephemeral server of its own).
    api = PREFECT_API_URL.value()
    if api:
        os.environ["PREFECT_API_URL"] = api
    n = max(1, min(2, os.cpu_count() or 1))
    logging.getLogger("distributed").setLevel(logging.WARNING)
    with LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=logging.WARNING) as cluster:
        yield cluster.scheduler_address


def task_runner(address: str | None):
    if address is None:
        return ThreadPoolTaskRunner(max_workers=2)
    from prefect_dask import DaskTaskRunner

    return DaskTaskRunner(address=address)
