"""Task runners: one local Dask cluster per top-level run, or an existing one; and where on
that cluster the extraction tasks go (GPU workers, by Dask resource)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator

from prefect.task_runners import ThreadPoolTaskRunner

from zooaudit_infra.stack import GPU_RESOURCE


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


def extraction_resources(device: str, worker_resources: Iterable[dict]) -> dict[str, int] | None:
    """Dask resources each extract-shards task requests, given the extraction ``device`` and the
    resources every worker of the cluster advertises.

    ``{"GPU": 1}`` when the extraction may run on CUDA (``cuda[:n]``, or ``auto``, which resolves
    to CUDA on a worker that has one) and at least one worker advertises the GPU resource
    (``zooaudit up --gpu-workers``, the GPU worker group of infra/k8s): the tasks then run on GPU
    workers only, one at a time per GPU. None otherwise — ``cpu``, or no GPU worker: any worker
    takes them (a request no worker can satisfy would wait forever)."""
    if device == "cpu":
        return None
    if any(float((r or {}).get(GPU_RESOURCE, 0)) >= 1 for r in worker_resources):
        return {GPU_RESOURCE: 1}
    return None


@contextlib.contextmanager
def extraction_placement(device: str) -> Iterator[dict | None]:
    """Inside, tasks submitted to the current flow's Dask task runner carry the resources of
    :func:`extraction_resources` (``dask.annotate``, which ``Client.submit`` merges into each
    task); yields them (None: no annotation, e.g. on threads)."""
    from prefect.context import FlowRunContext

    runner = getattr(FlowRunContext.get(), "task_runner", None)
    resources = None
    if type(runner).__name__ == "DaskTaskRunner":   # no prefect_dask import when running on threads
        workers = runner.client.scheduler_info(n_workers=-1)["workers"].values()
        resources = extraction_resources(device, [w.get("resources") or {} for w in workers])
    if resources is None:
        yield None
        return
    import dask

    logging.getLogger("zooaudit.flows").info("extraction tasks request Dask resources %s (GPU workers)", resources)
    with dask.annotate(resources=resources):
        yield resources
