"""Versions of results: tags, history, diff, reading at a tag or snapshot (zooaudit.versions + CLI).

Fast tests build a model repository with real commits (``store.commit``) on ``file://``;
the slow test audits through the ``audit-zoo`` flow on the local stack's S3 on two
"nights" and travels back to the first night's tag."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
import xarray as xr

from zooaudit import versions
from zooaudit_infra.cli import main
from zooaudit.errors import ZooauditError
from zooaudit.keys import slug_key
from zooaudit.store import Store, commit_metadata, open_group, write_dataset

MODEL = "builtin:toy-model"
MODEL_S3 = "builtin:mlp-w32-s0"


def _commit_stage(store, stage, key, value, ds="digits"):
    """One stage result: a small array plus its headline metric in the commit summary."""
    result = xr.Dataset({"value": ("layer", np.array([value, 2 * value]))}, coords={"layer": ["a", "b"]})
    meta = commit_metadata(stage, key, {"k": 1}, model=MODEL, dataset={"name": ds}, dataset_hash="abcdef1234",
                           summary={"worst_group_accuracy": value, "layers": {"a": value}})
    return store.model_repository(slug_key(MODEL)).commit(lambda s: write_dataset(s, result, f"{ds}/{stage}"),
                  message=f"{stage} {MODEL}", metadata=meta)


@pytest.fixture
def two_nights(store_url):
    store = Store.open(store_url)
    repo = store.model_repo(slug_key(MODEL))
    s1 = _commit_stage(store, "bias", "bias-1", 0.8)
    _commit_stage(store, "similarity", "sim-1", 0.5)
    night1 = versions.tag_version(repo, versions.nightly_tag(dt.date(2026, 11, 21)))
    s3 = _commit_stage(store, "bias", "bias-2", 0.6)       # the bias result changed the next night
    night2 = versions.tag_version(repo, versions.nightly_tag(dt.date(2026, 11, 22)))
    return store, repo, s1, s3, night1, night2


def test_history_lists_versions_with_tags_and_cache_keys(two_nights):
    _store, repo, s1, s3, night1, night2 = two_nights
    assert (night1, night2) == ("nightly-2026-11-21", "nightly-2026-11-22")
    hist = versions.history(repo)
    assert [v.cache_key for v in hist] == ["bias-2", "sim-1", "bias-1"]
    assert hist[0].snapshot == s3 and hist[0].tags == [night2]
    assert hist[1].tags == [night1] and hist[-1].snapshot == s1
    assert all(v.dataset == "digits@abcdef12" for v in hist)
    # The history as of the first night stops there.
    assert [v.cache_key for v in versions.history(repo, night1)] == ["sim-1", "bias-1"]


def test_tags_are_idempotent_and_never_move(two_nights):
    _store, repo, _s1, _s3, night1, night2 = two_nights
    assert versions.tag_version(repo, night2) == night2               # same snapshot: unchanged
    assert repo.lookup_tag(night1) != repo.lookup_branch("main")
    assert versions.tag_version(repo, night1) == night1 + "-2"        # tags are immutable: a new name
    assert repo.lookup_tag(night1) != repo.lookup_tag(night1 + "-2")
    with pytest.raises(ZooauditError, match="no '/'"):
        versions.tag_version(repo, "nightly/2026-11-23")


def test_diff_names_changed_stages_and_moved_metrics(two_nights):
    _store, repo, s1, _s3, night1, night2 = two_nights
    d = versions.diff_versions(repo, night1, night2)
    assert [(c.stage, c.status, c.cache_key_a, c.cache_key_b) for c in d.stages] == [
        ("bias", "changed", "bias-1", "bias-2")]
    assert d.stages[0].metrics == {"layers.a": (0.8, 0.6), "worst_group_accuracy": (0.8, 0.6)}
    assert any(p.endswith("digits/bias/value") for p in d.arrays["updated"])
    assert versions.diff_versions(repo, night2, "main").stages == []
    # From the first commit, the similarity stage is new.
    assert {(c.stage, c.status) for c in versions.diff_versions(repo, s1, night1).stages} == {("similarity", "added")}


def test_read_at_tag_or_snapshot(two_nights):
    _store, repo, s1, _s3, night1, _night2 = two_nights
    now = open_group(repo, "digits/bias")["value"].values
    then = open_group(repo, "digits/bias", tag=night1)["value"].values
    assert now.tolist() == [0.6, 1.2] and then.tolist() == [0.8, 1.6]
    assert versions.resolve_version(repo, night1) == repo.lookup_tag(night1)
    assert versions.resolve_version(repo, s1) == s1
    at = versions.stages_at(repo, night1)
    assert at[("bias", "digits@abcdef12")].cache_key == "bias-1"
    with pytest.raises(ZooauditError, match="Unknown version 'yesterday'.*nightly-2026-11-21"):
        versions.resolve_version(repo, "yesterday")


def test_cli_history_diff_show(two_nights, capsys):
    store, _repo, s1, _s3, night1, night2 = two_nights
    assert main(["history", MODEL, "--store", store.url]) == 0
    out = capsys.readouterr().out
    assert night1 in out and "bias-2" in out and s1 in out
    assert main(["diff", MODEL, night1, night2, "--store", store.url]) == 0
    out = capsys.readouterr().out
    assert "changed" in out and "worst_group_accuracy: 0.8 → 0.6" in out and "similarity" not in out
    assert main(["show", MODEL, "--at", night1, "--store", store.url, "--group", "digits/bias"]) == 0
    assert "0.8" in capsys.readouterr().out
    assert main(["show", MODEL, "--at", "nope", "--store", store.url]) == 2
    assert "Unknown version 'nope'" in capsys.readouterr().err
    assert main(["history", "builtin:absent", "--store", store.url]) == 2
    assert "Models in this store: " + slug_key(MODEL) in capsys.readouterr().err


@pytest.mark.slow
def test_nightly_tags_and_time_travel_on_s3(local_stack, capsys):
    """Two 'nights' of the audit-zoo flow on the stack's S3, the second with another k: the
    first night's tag still reads the first night's components, and diff names what moved."""
    from zooaudit_flows.audit_zoo import audit_zoo
    from zooaudit.specs import AuditZooSpec

    store_url = f"s3://{local_stack.config.bucket}/history-{dt.datetime.now():%H%M%S%f}"
    runs = {}
    for night, k in (("2026-11-20", 4), ("2026-11-21", 3)):
        spec = AuditZooSpec(models=[MODEL_S3], store=store_url, task_runner="threads", tag=f"nightly-{night}",
                            datasets=[{"name": "digits", "max_samples": 60}],
                            factorize={"methods": ["pca"], "k": k})
        runs[night] = audit_zoo(spec)
    store = Store.open(store_url)
    _, repo = versions.model_repository(store, MODEL_S3)
    assert {"nightly-2026-11-20", "nightly-2026-11-21"} <= set(repo.list_tags())
    assert {"nightly-2026-11-20", "nightly-2026-11-21"} <= set(store.zoo_repo().list_tags())

    plan = runs["2026-11-20"].models[0].refs[0]
    group = f"{plan.ds_key}/factors/{plan.layers[0]}/pca"
    assert open_group(repo, group, tag="nightly-2026-11-20").sizes["component"] == 4
    assert open_group(repo, group).sizes["component"] == 3

    d = versions.diff_versions(repo, "nightly-2026-11-20", "nightly-2026-11-21")
    changed = {c.stage: c for c in d.stages}
    assert set(changed) == {"factorize"} and changed["factorize"].status == "changed"
    assert changed["factorize"].metrics[f"k.{plan.layers[0]}"] == (4.0, 3.0)

    assert main(["show", MODEL_S3, "--store", store_url, "--at", "nightly-2026-11-20", "--group", group]) == 0
    assert "component: 4" in capsys.readouterr().out
    assert main(["history", MODEL_S3, "--store", store_url]) == 0
    out = capsys.readouterr().out
    assert "nightly-2026-11-20" in out and "nightly-2026-11-21" in out

    # The nights' reports (HTML, figures, manifest on S3) never contain the S3 secret key.
    secret = local_stack.env["AWS_SECRET_ACCESS_KEY"].encode()
    report_files = [p for run in runs.values() for p in store.fs.find(run.report.rsplit("/", 1)[0])]
    assert any(p.endswith("index.html") for p in report_files)
    assert not [p for p in report_files if secret in store.fs.cat_file(p)]


def test_recommitting_an_older_result_is_not_skipped(store_url):
    """A result that a different one superseded is written again when it comes back (k=4, k=3, k=4):
    the commit-time duplicate check looks at the result in force, not at any old commit."""
    store = Store.open(store_url)
    repo = store.model_repo(slug_key(MODEL))
    a1 = _commit_stage(store, "bias", "bias-A", 0.8)
    assert _commit_stage(store, "bias", "bias-A", 0.8) == a1          # same result in force: no new commit
    _commit_stage(store, "bias", "bias-B", 0.6)
    a2 = _commit_stage(store, "bias", "bias-A", 0.8)
    assert a2 != a1 and repo.lookup_branch("main") == a2
    assert open_group(repo, "digits/bias")["value"].values.tolist() == [0.8, 1.6]
