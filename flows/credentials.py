"""S3 credentials from a Prefect Secret block (the alternative to plain environment variables).

    ZOOAUDIT_S3_SECRET_BLOCK=zooaudit-s3   # a Secret block holding
        {"aws_access_key_id": "...", "aws_secret_access_key": "...", "aws_session_token": "..."?}

The core library reads credentials from the environment only (``zooaudit.store``); this module,
in the flows layer because it needs Prefect, copies the block's values into the environment of
the flow's process and of the Dask workers that run its tasks. The values are never logged,
returned from a task, or put in a result.
"""

from __future__ import annotations

import json
import os

from zooaudit.errors import ZooauditError

ENV_BLOCK = "ZOOAUDIT_S3_SECRET_BLOCK"
FIELDS = {"aws_access_key_id": "AWS_ACCESS_KEY_ID", "aws_secret_access_key": "AWS_SECRET_ACCESS_KEY",
          "aws_session_token": "AWS_SESSION_TOKEN"}


def s3_credentials_from_block(name: str | None = None) -> dict[str, str]:
    """``{AWS_*: value}`` from the Secret block ``name`` (default ``$ZOOAUDIT_S3_SECRET_BLOCK``); {} if none."""
    name = name or os.environ.get(ENV_BLOCK)
    if not name:
        return {}
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(name).get()
    except ValueError as err:   # e.g. "Unable to find block document named …": never holds the value
        raise ZooauditError(f"Could not load the Prefect Secret block {name!r} (from ${ENV_BLOCK}): {err}") from None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = None
    if not isinstance(value, dict) or not {"aws_access_key_id", "aws_secret_access_key"} <= set(value):
        # Name the expected shape, never the value.
        raise ZooauditError(f"Secret block {name!r} must hold a JSON object with aws_access_key_id and "
                            "aws_secret_access_key (optionally aws_session_token).")
    return {FIELDS[k]: str(v) for k, v in value.items() if k in FIELDS and v}


def _set_env(values: dict[str, str]) -> None:
    os.environ.update(values)


def apply_s3_credentials(dask_address: str | None = None) -> bool:
    """Load the Secret block (if configured) into this process and, given a scheduler address,
    into every worker of that Dask cluster. True when credentials were applied."""
    creds = s3_credentials_from_block()
    if not creds:
        return False
    _set_env(creds)
    if dask_address:
        from distributed import Client

        with Client(dask_address, timeout=30) as client:
            client.run(_set_env, creds)
    return True
