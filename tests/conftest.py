import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("AWS_REQUEST_CHECKSUM_CALCULATION", "WHEN_REQUIRED")

import pytest


@pytest.fixture
def store_url(tmp_path):
    return "file://" + str(tmp_path / "store")


@pytest.fixture(scope="session")
def shared_store(tmp_path_factory):
    """A store whose builtin weights are trained once for the whole session."""
    return "file://" + str(tmp_path_factory.mktemp("shared") / "store")


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory):
    """The real local stack (``zooaudit up``): Prefect server + UI, SeaweedFS S3, a Dask scheduler
    with 2 workers and the deployment runner, on free loopback ports; one per test session,
    stopped at the end (nothing left running). ``os.environ`` holds its PREFECT_API_URL and AWS_*
    settings meanwhile; ``stack.env`` the full environment (ZOOAUDIT_STORE=s3://…,
    ZOOAUDIT_DASK_ADDRESS). Yields a ``zooaudit_infra.stack.Stack``."""
    from stack import running_stack

    with running_stack(tmp_path_factory.mktemp("stack"), runner=True) as st:
        yield st
