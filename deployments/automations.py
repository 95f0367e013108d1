"""An automation that reacts to ``zooaudit.audit.regression`` (emitted by the nightly audit,
see ``flows/events.py``): re-audit the regressed model on demand with a more thorough bias
spec (more bootstrap resamples and permutations), so that the regression is confirmed or
dismissed with tighter intervals by the morning.

    PREFECT_API_URL=http://127.0.0.1:4200/api .venv/bin/python -m zooaudit_deployments.automations

creates (or replaces) the automation on the server; it needs the ``audit-model/on-demand``
deployment (``deployments/serve.py``). The model and store come from the event's resource
labels through Prefect's Jinja templating of action parameters.
"""

from __future__ import annotations

from datetime import timedelta

from prefect.automations import Automation
from prefect.events.actions import RunDeployment
from prefect.events.schemas.automations import EventTrigger, Posture

from zooaudit_flows.events import EVENT

NAME = "zooaudit: re-audit a regressed model"
CONFIRM_BIAS = {"n_boot": 1000, "n_permutations": 5000}


def _jinja(template: str) -> dict:
    return {"__prefect_kind": "jinja", "template": template}


def regression_automation(deployment_id) -> Automation:
    """The automation object (not yet created on the server)."""
    return Automation(
        name=NAME,
        description="On zooaudit.audit.regression, run audit-model/on-demand for the regressed model "
                    "with a more thorough bias audit.",
        trigger=EventTrigger(
            expect={EVENT},
            match={"prefect.resource.id": "zooaudit.model.*"},
            for_each={"prefect.resource.id"},
            # Fires on the first regression of a model, then stays quiet for that model for an hour:
            # one re-audit per model per night, however many layers and metrics regressed.
            posture=Posture.Reactive,
            threshold=1,
            within=timedelta(hours=1),
        ),
        actions=[RunDeployment(
            source="selected", deployment_id=deployment_id,
            parameters={"spec": {
                "model": _jinja("{{ event.resource['zooaudit.model'] }}"),
                "store": _jinja("{{ event.resource['zooaudit.store'] }}"),
                "bias": CONFIRM_BIAS,
            }},
        )],
    )


def create_regression_automation() -> Automation:
    """Create the automation on the current Prefect server (replacing one of the same name)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("audit-model/on-demand")
        for existing in client.read_automations_by_name(NAME):
            client.delete_automation(existing.id)
    return regression_automation(deployment.id).create()


if __name__ == "__main__":
    created = create_regression_automation()
    print(f"created automation {created.name!r} ({created.id})")
