"""Serve zooaudit's deployments from this process (``prefect serve`` style).

    PREFECT_API_URL=http://127.0.0.1:4200/api .venv/bin/python -m zooaudit_deployments.serve

- ``audit-zoo/nightly``: one cron schedule per entry of ``deployments/nightly.yaml`` (default:
  the builtin zoo at 02:00 UTC), each with its own parameters. ``ZOOAUDIT_SCHEDULES`` names
  another schedules file, ``ZOOAUDIT_TIMEZONE`` sets the timezone and ``ZOOAUDIT_NIGHTLY_CRON``
  the cron of the default ``builtin-zoo`` schedule;
- ``audit-model/on-demand``: one model, parameters from the UI form;
- ``backfill/on-demand``: audits over every checkpoint of some models or over past nights.

The flow parameters are the pydantic specs, so the Prefect UI renders a validated form
(descriptions and defaults from the specs); the server rejects a run whose parameters do
not match the schema (``enforce_parameter_schema``), and the flow validates again at start.
``ZOOAUDIT_RUN_LIMIT`` caps the flow runs this process executes at once (default 4).
Each run records its process (``infrastructure_pid``, flows/liveness.py); on start, the runs an earlier
runner left ``Running`` when it was killed are marked Crashed (``deployments/orphans.py``).
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from prefect.schedules import Cron
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from zooaudit_deployments.orphans import crash_orphaned_runs
from zooaudit_flows import audit_model, audit_zoo
from zooaudit_flows.backfill import backfill
from zooaudit.errors import ZooauditError, problems
from zooaudit.specs import AuditModelSpec, AuditZooSpec, BackfillSpec

SCHEDULES_FILE = Path(__file__).with_name("nightly.yaml")
DEPLOYMENT_NAMES = ["audit-zoo/nightly", "audit-model/on-demand", "backfill/on-demand"]
DEFAULT_CRON = "0 2 * * *"


class NightlySchedule(BaseModel):
    """One entry of the schedules file: when, in which timezone, with which zoo spec."""

    model_config = ConfigDict(extra="forbid")

    slug: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    cron: str = DEFAULT_CRON
    timezone: str | None = None
    description: str = ""
    active: bool = True
    spec: dict = Field(default_factory=dict)

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        import datetime as dt

        from cronsim import CronSim, CronSimError

        try:
            CronSim(v, dt.datetime(2026, 1, 1))
        except CronSimError as err:
            raise ValueError(f"bad cron expression {v!r}: {err}") from None
        return v

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown timezone {v!r}; use an IANA name such as 'UTC' or 'Europe/Paris'") from None
        return v


def nightly_schedules(path: str | os.PathLike | None = None) -> list:
    """The nightly deployment's schedules, each carrying its validated ``AuditZooSpec`` as parameters."""
    path = Path(path or os.environ.get("ZOOAUDIT_SCHEDULES") or SCHEDULES_FILE)
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ZooauditError(f"Cannot read the nightly schedules file {path}: {err}") from err
    tz_env = os.environ.get("ZOOAUDIT_TIMEZONE")
    default_tz = tz_env or doc.get("timezone") or "UTC"
    out = []
    for i, raw in enumerate(doc.get("schedules") or []):
        try:
            entry = NightlySchedule(**raw)
            if entry.slug == "builtin-zoo" and os.environ.get("ZOOAUDIT_NIGHTLY_CRON"):
                entry = entry.model_copy(update={"cron": NightlySchedule._cron(os.environ["ZOOAUDIT_NIGHTLY_CRON"])})
            tz = tz_env or entry.timezone or default_tz
            NightlySchedule._tz(tz)
            spec = AuditZooSpec(**entry.spec)
        except (ValidationError, ValueError, TypeError) as err:
            raise ZooauditError(f"{path}: schedule #{i + 1} ({(raw or {}).get('slug', '?')}) is invalid: "
                                f"{problems(err)}.") from err
        out.append(Cron(entry.cron, timezone=tz, active=entry.active, slug=entry.slug,
                        parameters={"spec": spec.model_dump(mode="json")}))
    if not out:
        raise ZooauditError(f"{path} defines no schedules; the nightly deployment needs at least one.")
    return out


def build_deployments(schedules_file: str | os.PathLike | None = None):
    """``[audit-zoo/nightly, audit-model/on-demand, backfill/on-demand]`` as runner deployments."""
    tags = ["zooaudit"]
    nightly = audit_zoo.to_deployment(
        name="nightly", schedules=nightly_schedules(schedules_file), tags=tags, enforce_parameter_schema=True,
        parameters={"spec": AuditZooSpec().model_dump(mode="json")},
        description="Audit the zoo every night; stages already committed are skipped. A regression "
                    "(a bias disparity significantly worse, or CKA to the previous night dropping) "
                    "emits the event zooaudit.audit.regression.",
    )
    on_demand = audit_model.to_deployment(
        name="on-demand", tags=tags, enforce_parameter_schema=True,
        parameters={"spec": AuditModelSpec().model_dump(mode="json")},
        description="Audit one model on demand (fill the form in the UI).",
    )
    backfill_dep = backfill.to_deployment(
        name="on-demand", tags=tags, enforce_parameter_schema=True,
        parameters={"spec": BackfillSpec().model_dump(mode="json")},
        description="Audit every checkpoint of some models (and plot their trend) or rerun past nights; "
                    "idempotent: items already audited are skipped.",
    )
    return [nightly, on_demand, backfill_dep]


def main() -> None:
    from prefect import serve

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("AWS_REQUEST_CHECKSUM_CALCULATION", "WHEN_REQUIRED")
    deployments = build_deployments()
    crash_orphaned_runs(DEPLOYMENT_NAMES)   # runs a killed runner left Running: Crashed, before serving again
    # Stopping the runner must not change the server's state (pause_on_shutdown would pause the
    # nightly schedule until someone resumes it).
    serve(*deployments, limit=int(os.environ.get("ZOOAUDIT_RUN_LIMIT", "4")), pause_on_shutdown=False)


if __name__ == "__main__":
    main()
