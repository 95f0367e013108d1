"""Extraction on GPU workers: the Dask resource ``GPU`` that ``zooaudit up --gpu-workers`` (and the
GPU worker group of infra/k8s) advertises is requested by the extract-shards tasks when the
extraction may run on CUDA. On this CPU-only machine a worker that declares ``GPU=1`` stands
in for a GPU worker: device ``auto`` resolves to the CPU there, the placement is the same."""

from __future__ import annotations

import pytest

from zooaudit_infra.stack import GPU_RESOURCE, StackConfig, dask_worker_argv


def test_extraction_requests_a_gpu_only_when_it_may_use_cuda_and_a_gpu_worker_exists():
    from zooaudit_flows.runners import extraction_resources

    gpu, cpu = {GPU_RESOURCE: 1.0}, {}
    assert extraction_resources("auto", [cpu, gpu]) == {GPU_RESOURCE: 1}
    assert extraction_resources("cuda", [gpu]) == {GPU_RESOURCE: 1}
    assert extraction_resources("cuda:1", [cpu, gpu]) == {GPU_RESOURCE: 1}
    assert extraction_resources("cpu", [cpu, gpu]) is None          # never pinned to GPU workers
    assert extraction_resources("cuda", [cpu, cpu]) is None         # no GPU worker: nothing could run it
    assert extraction_resources("auto", []) is None
    assert extraction_resources("auto", [{"MEMORY": 4e9}, None]) is None


def test_up_starts_one_gpu_worker_per_gpu_advertising_the_resource(tmp_path):
    from zooaudit_infra.cli import build_parser

    args = build_parser().parse_args(["up", "--data-dir", str(tmp_path), "--gpu-workers", "2"])
    assert args.gpu_workers == 2
    cfg = StackConfig(data_dir=str(tmp_path), gpu_workers=2)
    gpu_argv, cpu_argv = dask_worker_argv(cfg, gpu=True), dask_worker_argv(cfg)
    assert gpu_argv[gpu_argv.index("--resources") + 1] == f"{GPU_RESOURCE}=1"
    assert gpu_argv[gpu_argv.index("--nworkers") + 1] == "1"
    assert "--resources" not in cpu_argv and cpu_argv[cpu_argv.index("--nworkers") + 1] == str(cfg.dask_workers)
    from zooaudit.errors import ZooauditError

    with pytest.raises(ZooauditError, match="gpu_workers"):
        StackConfig(data_dir=str(tmp_path), gpu_workers=-1)


def _executed(client, prefix: str) -> dict[str, set[str]]:
    """``{worker address: keys starting with prefix that it executed}`` (from each worker's state log)."""
    def keys(dask_worker, prefix=prefix):
        return sorted({str(entry[0]) for entry in dask_worker.state.log
                       if str(entry[0]).startswith(prefix) and "executing" in entry[1:3]})

    return {addr: set(ks) for addr, ks in client.run(keys).items()}


@pytest.mark.slow
def test_shards_run_on_the_gpu_worker_of_the_stack_cluster(local_stack, tmp_path, store_url):
    """The stack's Dask part (scheduler, one CPU worker, ``--gpu-workers 1``) as ``up`` starts it;
    an audit with device ``auto`` runs every extract-shards task on the GPU worker. The flow reports
    to the session stack's Prefect server (the stack's own Dask cluster has no GPU worker)."""
    from distributed import Client
    from stack import _free_port_block

    from zooaudit_flows.audit_model import run_audit_model
    from zooaudit.specs import AuditModelSpec, DatasetSpec
    from zooaudit_infra.stack import _spawn_dask, _wait_dask_workers, down

    base = _free_port_block(3)
    cfg = StackConfig(data_dir=str(tmp_path / "stack"), dask_port=base, dask_workers=1, gpu_workers=1,
                      timeout=240)
    state = {"config": {}, "processes": {}}
    (tmp_path / "stack").mkdir()
    try:
        # the workers report their task runs to the stack's Prefect server
        workers = _spawn_dask(cfg, {"PREFECT_API_URL": local_stack.env["PREFECT_API_URL"]}, state)
        assert set(state["processes"]) == {"dask-scheduler", "dask-workers", "dask-gpu-worker-0"}
        _wait_dask_workers(cfg, workers, state)
        with Client(cfg.dask_address, timeout=30) as client:
            info = client.scheduler_info(n_workers=-1)["workers"]
            gpu_workers = {a for a, w in info.items() if w.get("resources", {}).get(GPU_RESOURCE)}
            assert len(info) == 2 and len(gpu_workers) == 1
            spec = AuditModelSpec(model="builtin:mlp-w32-s0", store=store_url, shard_size=30, batch_size=30,
                                  device="auto", task_runner="dask", dask_address=cfg.dask_address,
                                  datasets=[DatasetSpec(name="digits", max_samples=120)],
                                  factorize={"k": 3, "methods": ["pca"]}, similarity={"control": "none"},
                                  # the placement is what is tested: the analyses run at their cheapest
                                  bias={"n_boot": 0, "n_permutations": 50, "probes": False, "erasure": False})
            audit = run_audit_model(spec)
            acts = next(r for r in audit.results if r.stage == "activations")
            assert not acts.skipped and acts.summary["shards"] == 4
            ran = _executed(client, "extract")
            assert sum(len(k) for k in ran.values()) >= 2, ran    # the shard groups
            assert {a for a, k in ran.items() if k} == gpu_workers, ran
            # the analysis tasks are not pinned: the CPU worker ran some of them or could have
            assert all(not r.skipped for r in audit.results)
    finally:
        down(cfg.data_dir)
