"""Ctrl-C: SIGINT to a running ``zooaudit audit-model`` (to its whole process group, as a
terminal sends it) stops the LocalCluster and the temporary Prefect server the CLI started,
leaves no process behind, and exits non-zero with the command that resumes the run."""

from __future__ import annotations

import os
import signal

import pytest

from faults import CliRun, descendants, descendants_gone, group_gone

pytestmark = pytest.mark.slow

MODEL = "builtin:mlp-w32-s0"


def test_ctrl_c_stops_cluster_and_server_and_says_how_to_resume(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFECT_API_URL", "ZOOAUDIT_STORE", "ZOOAUDIT_DASK_ADDRESS")}
    store = "file://" + str(tmp_path / "store")
    args = ["audit-model", MODEL, "--dataset", "digits", "--max-samples", "40", "--store", store]
    run = CliRun(args, env)   # no --threads: a LocalCluster of worker processes
    # Interrupt once the Dask task runner is up (the cluster and the server are both running).
    assert run.wait_for(lambda: "begin-activations" in run.output, 300), run.output[-3000:]
    family = descendants(run.pgid) | {run.pgid}
    assert len(family) >= 3, f"expected the CLI, its Prefect server and Dask processes: {family}"
    run.signal_group(signal.SIGINT)
    try:
        rc = run.wait(90)
        left, stray = group_gone(run.pgid), descendants_gone(family)
    finally:
        run.kill()   # clean up whatever the assertions below report
        for pid in descendants_gone(family):
            os.kill(pid, signal.SIGKILL)
    out = run.output
    assert rc != 0, out[-3000:]
    assert "To resume, rerun:" in out and f"zooaudit {' '.join(args)}" in out, out[-3000:]
    assert not left, f"processes of the interrupted run are still alive: {left}"
    assert not stray, f"processes the interrupted run started are still alive: {stray}"
