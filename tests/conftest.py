import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("AWS_REQUEST_CHECKSUM_CALCULATION", "WHEN_REQUIRED")

import pytest  # noqa: E402


@pytest.fixture
def store_url(tmp_path):
    return "file://" + str(tmp_path / "store")


@pytest.fixture(scope="session")
def shared_store(tmp_path_factory):
    """A store whose builtin weights are trained once for the whole session."""
    return "file://" + str(tmp_path_factory.mktemp("shared") / "store")
