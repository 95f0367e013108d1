"""House rules: the core imports no Prefect; the deployments build."""

import subprocess
import sys


def test_core_library_imports_no_prefect():
    code = ("import sys, zooaudit_infra.cli, zooaudit.stages, zooaudit.report, zooaudit.analysis.bias, "
            "zooaudit.analysis.factorize, zooaudit.analysis.similarity, zooaudit.zoo.builtin; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'prefect'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_deployments_build_with_schedule_and_spec_parameters():
    from zooaudit_deployments.serve import build_deployments

    nightly, on_demand, backfill = build_deployments()
    assert nightly.name == "nightly" and on_demand.name == "on-demand" and backfill.flow_name == "backfill"
    assert nightly.schedules and nightly.schedules[0].schedule.cron == "0 2 * * *"
    assert "models" in nightly.parameters["spec"]
    from prefect.utilities.callables import parameter_schema

    from zooaudit_flows import audit_model

    schema = parameter_schema(audit_model).model_dump()
    assert "spec" in schema["properties"]   # the UI renders the pydantic spec as a form
    assert "AuditModelSpec" in str(schema["definitions"])
