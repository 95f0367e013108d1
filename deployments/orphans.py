"""Flow runs orphaned by a runner that died: marked Crashed when the runner starts again.

A deployment run of ``serve.py`` executes in a child process of the runner (same process
group). When the runner is SIGKILLed with its group (an OOM kill, a container or machine
stopping), the run's process dies without reporting, and Prefect's server — which has no
liveness check of its own for served runs — shows the run ``Running`` forever; a backfill
waiting on it waits out its timeout, and nothing tells the operator to rerun it.

So each flow records where it runs as it starts (``infrastructure_pid`` = ``host:pid``,
``flows/liveness.py``), and the runner, before it serves again, proposes ``Crashed`` for
every non-final run of its deployments recorded on this host whose process is gone — with
its subflow runs (the nightly's audit-model runs run in the same process). A run recorded on another host, or whose process still runs, is left
alone. A rerun with the same parameters then resumes from what was committed: the killed
extraction's staging branch is picked up and published, finished stages are cache hits.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("zooaudit.orphans")

ACTIVE_STATES = ["RUNNING", "PENDING", "CANCELLING"]
CRASH_MESSAGE = ("The deployment runner that executed this run stopped (process {pid} on {host} is gone); "
                 "marked Crashed when the runner started again. Rerun it with the same parameters: stages "
                 "already committed are cache hits.")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's process: alive
        return True
    return True


def orphaned(infrastructure_pid: str | None, host: str | None = None) -> bool:
    """Whether a run recorded as ``host:pid`` ran on this host in a process that is gone."""
    if not infrastructure_pid or infrastructure_pid.count(":") != 1:
        return False
    run_host, pid = infrastructure_pid.split(":")
    if run_host != (host or socket.gethostname()) or not pid.isdigit():
        return False
    return int(pid) != os.getpid() and not _pid_alive(int(pid))


def crash_orphaned_runs(deployment_names: list[str]) -> list[str]:
    """Propose ``Crashed`` for the orphaned runs of these deployments (``flow/deployment``) and
    their unfinished subflow runs; returns the ids of the runs marked."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    active = FlowRunFilterState(type=FlowRunFilterStateType(any_=ACTIVE_STATES))
    marked: list[str] = []
    with get_client(sync_client=True) as client:
        ids = []
        for name in deployment_names:
            try:
                ids.append(client.read_deployment_by_name(name).id)
            except ObjectNotFound:   # first start: nothing served yet
                continue
        if not ids:
            return marked
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(state=active),
                                     deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=ids)))
        for run in runs:
            if not orphaned(run.infrastructure_pid):
                continue
            host, pid = run.infrastructure_pid.split(":")
            message = CRASH_MESSAGE.format(pid=pid, host=host)
            subflows = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id]), state=active))
            for sub in [*subflows, run]:
                client.set_flow_run_state(sub.id, Crashed(message=message), force=True)
                marked.append(str(sub.id))
            log.warning("flow run %s (%s) was left %s by a runner that stopped: marked Crashed",
                        run.id, run.name, run.state.name if run.state else "?")
    return marked
