"""The local stack (``zooaudit up`` / ``down``): every component healthy, secrets kept out of
logs and command lines, bad configuration refused, and nothing left running afterwards."""

from __future__ import annotations

import json
import os
import stat
import urllib.request
from pathlib import Path

import pytest

from zooaudit_infra.cli import main
from zooaudit.errors import ZooauditError
from zooaudit_infra.stack import ENV_FILE, STATE_FILE, StackConfig, deployment_names, up


@pytest.mark.slow
def test_stack_components_are_healthy(local_stack):
    cfg = local_stack.config
    assert urllib.request.urlopen(cfg.api_url + "/health", timeout=5).read().strip() == b"true"
    # The UI is served by the same server.
    assert b"<html" in urllib.request.urlopen(cfg.ui_url + "/", timeout=5).read().lower()
    names = deployment_names(cfg)
    assert {"audit-model/on-demand", "audit-zoo/nightly"} <= set(names), names

    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": cfg.s3_endpoint})
    assert fs.cat(f"{cfg.bucket}/.zooaudit-health") == b"ok"
    # The S3 server enforces its keys: an anonymous client is refused.
    anon = s3fs.S3FileSystem(anon=True, client_kwargs={"endpoint_url": cfg.s3_endpoint}, skip_instance_cache=True)
    with pytest.raises((PermissionError, OSError)):
        anon.cat(f"{cfg.bucket}/.zooaudit-health")

    from distributed import Client

    with Client(cfg.dask_address, timeout=10) as client:
        assert len(client.scheduler_info(n_workers=-1)["workers"]) == cfg.dask_workers
        # Workers inherit the stack's environment (they must reach S3 and the Prefect API).
        # (a lambda runs there; a bound ``os.environ.get`` would ship this process's environment)
        assert set(client.run(lambda: os.environ.get("ZOOAUDIT_STORE")).values()) == {cfg.store_url}


@pytest.mark.slow
def test_stack_secrets_stay_private(local_stack):
    cfg = local_stack.config
    env_file = Path(cfg.data_dir, ENV_FILE)
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    secret = local_stack.env["AWS_SECRET_ACCESS_KEY"]
    state = json.loads(Path(cfg.data_dir, STATE_FILE).read_text())
    for name, proc in state["processes"].items():
        assert secret not in " ".join(proc["argv"]), name
        cmdline = Path(f"/proc/{proc['pid']}/cmdline").read_bytes().decode(errors="replace")
        assert secret not in cmdline, name
    for log in Path(cfg.data_dir, "logs").iterdir():
        assert secret not in log.read_text(errors="replace"), log.name


@pytest.mark.slow
def test_second_stack_on_same_ports_or_dir_is_refused(local_stack, tmp_path, capsys):
    cfg = local_stack.config
    with pytest.raises(ZooauditError, match="already running"):
        up(StackConfig(data_dir=cfg.data_dir, prefect_port=cfg.prefect_port))
    code = main(["up", "--data-dir", str(tmp_path / "other"), "--prefect-port", str(cfg.prefect_port),
                 "--s3-port", str(cfg.s3_port), "--weed-port", str(cfg.weed_port + 100),
                 "--dask-port", str(cfg.dask_port)])
    assert code == 2
    err = capsys.readouterr().err
    assert "already in use" in err and f"prefect_port={cfg.prefect_port}" in err
    assert not (tmp_path / "other" / STATE_FILE).exists()


def test_bad_stack_config_is_refused():
    with pytest.raises(ZooauditError, match="ports must be"):
        StackConfig(prefect_port=80)
    with pytest.raises(ZooauditError, match="3–63"):
        StackConfig(bucket="ab")


def test_down_without_stack_is_a_no_op(tmp_path, capsys):
    assert main(["down", "--data-dir", str(tmp_path)]) == 0
    assert "no running stack" in capsys.readouterr().out


def test_beyond_loopback_requires_api_auth_and_keeps_keys(tmp_path):
    """Bound beyond loopback, the stack generates a Prefect API auth string (clients get it as
    PREFECT_API_AUTH_STRING); S3 keys are generated in every case and kept across restarts."""
    from zooaudit_infra.stack import _load_or_create_secrets, stack_env

    local = StackConfig(data_dir=str(tmp_path / "a"))
    assert local.loopback and "PREFECT_API_AUTH_STRING" not in _load_or_create_secrets(local)
    wide = StackConfig(data_dir=str(tmp_path / "b"), host="0.0.0.0")
    assert not wide.loopback
    secrets = _load_or_create_secrets(wide)
    env = stack_env(wide, secrets)
    assert env["PREFECT_API_AUTH_STRING"].startswith("zooaudit:") and len(env["AWS_SECRET_ACCESS_KEY"]) >= 30
    # Written once to the 0600 env file, the same keys come back on the next start.
    Path(wide.data_dir).mkdir(parents=True)
    Path(wide.data_dir, ENV_FILE).write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    assert _load_or_create_secrets(wide) == secrets
