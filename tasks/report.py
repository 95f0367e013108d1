"""Report task."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from zooaudit.report import build_report as _build_report


@task(name="report", cache_policy=NO_CACHE)
def build_report(store_url, spec, audits, zoo_results, run_id=None):
    return _build_report(store_url, spec, audits, zoo_results, run_id)
