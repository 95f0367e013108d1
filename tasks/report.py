"""Report and tag tasks (the report only reads; the tag names the version a run produced)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from zooaudit.report import build_report as _build_report


@task(name="report", cache_policy=NO_CACHE)
def build_report(store_url, spec, audits, zoo_results, run_id=None, regressions=None, drift=None):
    return _build_report(store_url, spec, audits, zoo_results, run_id, regressions=regressions, drift=drift)


@task(name="tag", cache_policy=NO_CACHE)
def tag_repositories(store_url, model_keys, tag):
    """Tag this version of every audited repository (and the zoo's): ``{repository: snapshot}``."""
    from zooaudit import versions
    from zooaudit.store import Store

    return versions.tag_repositories(Store(store_url), model_keys, tag)


@task(name="trend-report", cache_policy=NO_CACHE)
def trend_report(store_url, trends, spec, run_id=None):
    """The backfill's trend report (reads the committed trends)."""
    from zooaudit.report.trend import trend_report as _trend_report

    return _trend_report(store_url, trends, spec, run_id)
