"""End to end under a real (temporary) Prefect server: audit_zoo on a reduced zoo,
every result reopened with xarray from its Icechunk snapshot, and the rerun skips."""

import os
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from zooaudit import layout
from zooaudit.errors import ZooauditError
from zooaudit.specs import AuditModelSpec, AuditZooSpec, DatasetSpec
from zooaudit.stages import zoo_similarity_group
from zooaudit.store import Store

pytestmark = pytest.mark.slow

MODELS = ["builtin:mlp-w32-s0", "builtin:cnn-w8-s0", "builtin:cnn-colored-w16-s0", "builtin:mlp-w32-s0@5"]


@pytest.fixture(scope="module")
def prefect(local_stack):
    """The session stack's Prefect server: one server for the whole suite rather than a
    temporary one per module (each costs ~15 s to start on the 2-core CI box)."""
    yield local_stack


def _spec(store_url, **kw):
    return AuditZooSpec(
        models=MODELS, store=store_url, shard_size=50, batch_size=32, task_runner="threads",
        datasets=[DatasetSpec(name="digits", max_samples=120), DatasetSpec(name="colored-digits", max_samples=120)],
        factorize={"k": 4, "max_iter": 100}, bias={"n_boot": 30}, **kw)


def _commit_counts(store):
    counts = {}
    for key in os.listdir(store.path("models")):
        counts[key] = len(list(store.model_repo(key).ancestry(branch="main")))
    counts["zoo"] = len(list(store.zoo_repo().ancestry(branch="main")))
    return counts


def _flow_run_count(name):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        return client.count_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[name])))


def _open(repo, snapshot, group):
    return xr.open_zarr(repo.readonly_session(snapshot_id=snapshot).store, group=group, consolidated=False)


def test_audit_zoo_end_to_end_and_rerun_skips(prefect, store_url):
    from zooaudit_flows.audit_zoo import audit_zoo

    spec = _spec(store_url)
    result = audit_zoo(spec)
    store = Store.open(store_url)

    assert [a.model for a in result.models] == MODELS
    for audit in result.models:
        assert audit.refs, audit.model
        repo = store.model_repo(audit.refs[0].model_key)
        for plan in audit.refs:
            res = {r.stage: r for r in audit.results if r.dataset == plan.ds_key}
            assert {"activations", "factorize", "similarity"} <= set(res)
            assert not any(r.skipped for r in res.values())
            for layer in plan.layers:
                acts = _open(repo, res["activations"].snapshot, layout.acts_group(plan.ds_key, layer))
                assert acts["activations"].dims[0] == "sample" and acts.sizes["sample"] == 120
                assert np.isfinite(acts["activations"].values).all()
                pca = _open(repo, res["factorize"].snapshot, layout.factors_group(plan.ds_key, layer, "pca"))
                assert pca["components"].dims == ("component", "unit")
                assert 0 < pca.attrs["explained_variance"] <= 1 + 1e-9
            cka = _open(repo, res["similarity"].snapshot, layout.similarity_group(plan.ds_key, "linear_cka"))
            m = cka["value"]
            assert m.dims == ("layer_a", "layer_b") and list(m.layer_a.values) == plan.layers
            np.testing.assert_allclose(np.diag(m.values), 1.0, atol=1e-9)
            np.testing.assert_allclose(m.values, m.values.T, atol=1e-12)
            # the shuffled-sample control sits near 0, far below the real similarities
            assert cka["control"].dims == m.dims and float(cka["control"].max()) < 0.2
            assert float(np.diag(cka["control"].values).mean()) < float(m.values.mean())
            if plan.has_groups:
                b = _open(repo, res["bias"].snapshot, layout.bias_group(plan.ds_key, "colour")).load()
                assert set(b["group"].values) == {"red", "green"}
                assert b.attrs["worst_group_accuracy"] <= b.attrs["overall_accuracy"]
                assert b["accuracy_ci"].dims == ("group", "ci")
        meta = repo.lookup_snapshot(audit.results[0].snapshot).metadata
        assert meta["cache_key"] == audit.results[0].cache_key and meta["params"]["model"] == audit.model

    # The colour-shortcut model fails on the balanced set's minority cells.
    colored = next(a for a in result.models if "colored" in a.model)
    bias = next(r for r in colored.results if r.stage == "bias")
    assert bias.summary["colour"]["worst_group_accuracy"] < 0.3

    # only digits is shared by ≥ 2 models; mlp-w32-s0 has two revisions there
    zoo, revs = sorted(result.zoo_results, key=lambda r: r.stage, reverse=True)
    assert (zoo.stage, revs.stage) == ("zoo-similarity", "revision-similarity")
    zm = _open(store.zoo_repo(), zoo.snapshot, zoo_similarity_group(zoo.dataset, "linear_cka"))["value"]
    assert zm.dims == ("model_a", "layer_a", "model_b", "layer_b")
    digits_models = [MODELS[0], MODELS[1], MODELS[3]]
    assert list(zm.model_a.values) == digits_models and list(zm.layer_a.values) == ["embed"]
    emb = zm.sel(layer_a="embed", layer_b="embed")
    np.testing.assert_allclose(np.diag(emb.values), 1.0, atol=1e-9)
    np.testing.assert_allclose(emb.values, emb.values.T, atol=1e-12)
    zc = _open(store.zoo_repo(), zoo.snapshot, zoo_similarity_group(zoo.dataset, "linear_cka"))["control"]
    assert zc.dims == zm.dims and float(zc.max()) < 0.2   # shuffled samples: unrelated representations
    family = revs.summary["families"]["builtin:mlp-w32-s0"]["linear_cka"]
    rv = _open(store.zoo_repo(), revs.snapshot, family["group"])["value"]
    assert rv.dims == ("step", "layer") and list(rv["step"].values) == ["5→15"]
    assert list(rv["revision_a"].values) == ["builtin:mlp-w32-s0@5"]
    rc = _open(store.zoo_repo(), revs.snapshot, family["group"])["control"]
    assert rc.dims == rv.dims and float(rc.max()) < 0.2
    assert float(rv.sel(layer="embed").values[0]) == pytest.approx(float(emb.sel(model_a=MODELS[3], model_b=MODELS[0])),
                                                         abs=1e-12)
    # the report site: the summary links every model's page, whose figures are beside it
    index = Path(result.report).read_text()
    for audit in result.models:
        page = Path(result.report).with_name(f"model-{audit.refs[0].model_key}.html")
        assert f"href='{page.name}'" in index and "<img" in page.read_text()

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts()
    # the session's server holds other tests' zoo audits too: this run's artifact links its report
    zoo_md = [a for a in arts if a.type == "markdown" and a.description == "zooaudit: zoo audit"
              and result.report in (a.data or "")]
    assert len(zoo_md) == 1 and "Model × model linear_cka, layer `embed`" in zoo_md[0].data
    assert any(a.description == "zooaudit: builtin:mlp-w32-s0" for a in arts)
    # Other tests on the same server may have audited colored-digits models too: every
    # such bias table must carry the headline columns, and this run's must be among them.
    colored = [m for m in MODELS if "cnn-colored" in m]
    tables = [a for a in arts if a.type == "table" and a.description in
              {f"zooaudit bias headline: {m}" for m in colored}]
    assert tables
    for table in tables:
        assert "demographic_parity" in str(table.data) and "worst_group_accuracy" in str(table.data)
    # similarity beside its control as table artifacts: per model, and model × model / revisions for the zoo
    assert any(a.type == "table" and a.description == "zooaudit similarity (value beside control): builtin:cnn-w8-s0"
               and "control" in str(a.data) for a in arts)
    assert any(a.type == "table" and a.description == "zooaudit zoo similarity (value beside control)" for a in arts)

    before = _commit_counts(store)
    subflows_before = _flow_run_count("audit-model")
    again = audit_zoo(spec)
    assert all(r.skipped for a in again.models for r in a.results)
    assert all(z.skipped for z in again.zoo_results)
    assert _commit_counts(store) == before
    # every stage was committed: the cache check served each model, no audit-model subflow ran …
    assert _flow_run_count("audit-model") == subflows_before
    # … with the results the subflow itself returns on a full cache hit (plans, keys, summaries)
    from zooaudit_flows.audit_model import audit_model

    for i in (0, 2):   # a digits model, and the colored one (bias stage)
        assert audit_model(spec.model_spec(MODELS[i])) == again.models[i]
    assert [a.refs for a in again.models] == [a.refs for a in result.models]
    # one stage key not committed (another k) ⇒ no whole-model cache hit: the model gets its audit
    from zooaudit.stages import committed_audit

    other_k = spec.model_copy(update={"factorize": spec.factorize.model_copy(update={"k": 3})})
    assert committed_audit(other_k.model_spec(MODELS[0])) is None
    assert committed_audit(spec.model_spec(MODELS[0])) == (again.models[0].refs, again.models[0].results)
    # nothing changed: the earlier report is reused, not rendered again
    assert again.report == result.report
    reports = Store.open(store_url).path("reports")
    assert len([d for d in os.listdir(reports) if d != "by-key"]) == 1


def test_empty_zoo_fails_before_any_commit(prefect, store_url):
    from zooaudit_flows.audit_zoo import audit_zoo

    with pytest.raises(ZooauditError, match="zoo is empty"):
        audit_zoo(_spec(store_url).model_copy(update={"models": []}))
    assert not os.path.exists(Store.open(store_url).path("models"))


def test_audit_model_on_a_dask_cluster(prefect, store_url):
    """Shard tasks run in Dask worker processes; forks travel there and back."""
    from zooaudit_flows.audit_model import run_audit_model

    spec = AuditModelSpec(model="builtin:mlp-w32-s0", store=store_url, shard_size=40, task_runner="dask",
                          datasets=[DatasetSpec(name="digits", max_samples=120)], factorize={"k": 3})
    audit = run_audit_model(spec)
    (plan,) = audit.refs
    acts = next(r for r in audit.results if r.stage == "activations")
    assert acts.summary["shards"] == 3 and not acts.skipped
    repo = Store.open(store_url).model_repo(plan.model_key)
    stored = _open(repo, acts.snapshot, layout.acts_group(plan.ds_key, "embed"))["activations"].values
    assert stored.shape == (120, 32) and np.isfinite(stored).all()
