"""Serve zooaudit's deployments from this process (``prefect serve`` style).

    PREFECT_API_URL=http://127.0.0.1:4200/api .venv/bin/python -m deployments.serve

- ``audit-zoo/nightly``: the builtin zoo every night (cron, default 02:00 UTC;
  ``ZOOAUDIT_NIGHTLY_CRON`` and ``ZOOAUDIT_TIMEZONE`` override);
- ``audit-model/on-demand``: one model, parameters from the UI form.

The flow parameters are the pydantic specs, so the Prefect UI renders a form.
"""

from __future__ import annotations

import os

from prefect.schedules import Cron

from flows import audit_model, audit_zoo
from zooaudit.specs import AuditModelSpec, AuditZooSpec


def build_deployments():
    cron = os.environ.get("ZOOAUDIT_NIGHTLY_CRON", "0 2 * * *")
    tz = os.environ.get("ZOOAUDIT_TIMEZONE", "UTC")
    nightly = audit_zoo.to_deployment(
        name="nightly", schedules=[Cron(cron, timezone=tz)],
        parameters={"spec": AuditZooSpec().model_dump(mode="json")},
        description="Audit the zoo every night; stages already committed are skipped.",
    )
    on_demand = audit_model.to_deployment(
        name="on-demand", parameters={"spec": AuditModelSpec().model_dump(mode="json")},
        description="Audit one model on demand (fill the form in the UI).",
    )
    return [nightly, on_demand]


if __name__ == "__main__":
    from prefect import serve

    serve(*build_deployments())
