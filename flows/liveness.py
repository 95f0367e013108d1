"""Where a flow run executes, recorded on the run as it starts (``on_running`` hook).

The run's ``infrastructure_pid`` becomes ``host:pid`` (the convention of Prefect's process
worker). Prefect's server has no liveness check of its own for runs served by a runner: a
runner killed with its run's process leaves the run ``Running`` forever. With the process
recorded, the restarted runner tells such orphans from live runs and marks them Crashed
(``deployments/orphans.py``).
"""

from __future__ import annotations

import os
import socket


def process_id() -> str:
    """``host:pid`` of this process."""
    return f"{socket.gethostname()}:{os.getpid()}"


def record_process(flow, flow_run, state) -> None:
    """``on_running`` hook: store :func:`process_id` on the flow run (a failure is logged by
    Prefect and does not fail the run)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run.id, infrastructure_pid=process_id())
