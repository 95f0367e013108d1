"""Multi-hot label sets and set-valued attributes: the container, the three user formats, bad input."""

import json

import numpy as np
import pytest
import xarray as xr

from zooaudit.data import AuditDataset, load_dataset
from zooaudit.errors import ZooauditError
from zooaudit.specs import DatasetSpec

LABELS = ["cat", "dog", "person"]
# 6 samples: label sets and a set-valued "context" attribute
SETS = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0], [1, 0, 0], [0, 1, 1]], np.uint8)
CONTEXT = np.array([[1, 0], [0, 1], [1, 1], [0, 0], [1, 0], [0, 1]], np.uint8)   # indoor, outdoor


def _plain(n=6, **kw):
    return AuditDataset(name="t", spec={"name": "t"}, inputs=np.zeros((n, 2), np.float32),
                        labels=np.zeros(n, np.int64), sample_ids=np.arange(n), **kw)


def test_container_validates_and_hashes_only_when_present():
    plain = _plain()
    # the digest of a dataset without multi-hot columns is the one it had before they existed
    import hashlib

    from zooaudit.keys import canonical_json

    h = hashlib.sha256(canonical_json(plain.spec).encode())
    for a in (plain.inputs, plain.labels, plain.sample_ids):
        h.update(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
    assert plain.content_hash == h.hexdigest() and not plain.multi_hot
    multi = _plain(label_sets=SETS.astype(bool), label_set_names=LABELS, group_sets={"context": CONTEXT})
    assert multi.label_sets.dtype == np.uint8 and multi.group_set_names == {"context": ["0", "1"]}
    assert multi.content_hash != plain.content_hash
    renamed = _plain(label_sets=SETS, label_set_names=["a", "b", "c"], group_sets={"context": CONTEXT})
    assert renamed.content_hash != multi.content_hash             # the names are part of the identity
    flipped = SETS.copy()
    flipped[0, 0] = 0
    assert _plain(label_sets=flipped, label_set_names=LABELS, group_sets={"context": CONTEXT}).content_hash \
        != multi.content_hash
    multi.take(4)
    assert multi.label_sets.shape == (4, 3) and multi.group_sets["context"].shape == (4, 2)

    with pytest.raises(ZooauditError, match=r"label_sets is not multi-hot: row 0, column 0 holds 2.*0 or 1 only"):
        _plain(label_sets=SETS * 2)
    with pytest.raises(ZooauditError, match=r"label_sets has shape \(6,\); expected \(6, n_values\)"):
        _plain(label_sets=np.zeros(6))
    with pytest.raises(ZooauditError, match=r"group_sets\['context'\] has shape \(5, 2\); expected \(6, n_values\)"):
        _plain(group_sets={"context": CONTEXT[:5]})
    with pytest.raises(ZooauditError, match="label_sets has 3 columns but 2 names"):
        _plain(label_sets=SETS, label_set_names=["a", "b"])
    with pytest.raises(ZooauditError, match=r"both single-valued groups and multi-hot group_sets"):
        _plain(groups={"context": np.zeros(6, np.int64)}, group_sets={"context": CONTEXT})
    with pytest.raises(ZooauditError, match=r"names of label_sets repeat \['a'\]"):
        _plain(label_sets=SETS, label_set_names=["a", "a", "b"])


def test_arrays_npz_zarr_and_npy(tmp_path):
    import zarr

    x = np.random.default_rng(0).random((6, 1, 2, 2), dtype=np.float32)
    np.savez(tmp_path / "d.npz", inputs=x, labels=np.arange(6) % 3, label_sets=SETS,
             names_label_sets=np.array(LABELS), multi_context=CONTEXT, names_multi_context=np.array(["in", "out"]),
             group_site=np.array(["a", "b"] * 3))
    ds = load_dataset(DatasetSpec(name="arrays", path=str(tmp_path / "d.npz"), max_samples=5))
    np.testing.assert_array_equal(ds.label_sets, SETS[:5])
    assert ds.label_set_names == LABELS and ds.group_set_names == {"context": ["in", "out"]}
    np.testing.assert_array_equal(ds.group_sets["context"], CONTEXT[:5])
    assert ds.groups["site"].tolist() == [0, 1, 0, 1, 0] and ds.labels.tolist() == [0, 1, 2, 0, 1]

    g = zarr.open_group(str(tmp_path / "d.zarr"), mode="w")
    g.create_array("inputs", data=x)
    g.create_array("tags", data=SETS)
    g.create_array("ctx", data=CONTEXT)
    z = load_dataset(DatasetSpec(name="arrays", path=str(tmp_path / "d.zarr"),
                                 options={"label_sets": "tags", "multi_groups": ["ctx"]}))
    np.testing.assert_array_equal(z.label_sets, SETS)
    assert z.label_set_names == ["0", "1", "2"] and list(z.group_sets) == ["ctx"]

    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "s.npy", SETS)
    n = load_dataset(DatasetSpec(name="arrays", path=str(tmp_path / "x.npy"),
                                 options={"label_sets": str(tmp_path / "s.npy")}))
    np.testing.assert_array_equal(n.label_sets, SETS)

    # labels that are not multi-hot where multi-label is asked: 1-d codes, other values, missing key
    np.savez(tmp_path / "codes.npz", inputs=x, label_sets=np.arange(6) % 3)
    with pytest.raises(ZooauditError, match=r"label_sets has shape \(6,\); expected \(6, n_values\)"):
        load_dataset(DatasetSpec(name="arrays", path=str(tmp_path / "codes.npz")))
    np.savez(tmp_path / "bad.npz", inputs=x, multi_context=CONTEXT * 3)
    with pytest.raises(ZooauditError, match=r"group_sets\['context'\] is not multi-hot.*holds 3"):
        load_dataset(DatasetSpec(name="arrays", path=str(tmp_path / "bad.npz")))
    with pytest.raises(ZooauditError, match=r"has no array 'tags'"):
        load_dataset(DatasetSpec(name="arrays", path=str(tmp_path / "d.npz"), options={"label_sets": "tags"}))
    np.savez(tmp_path / "names.npz", inputs=x, label_sets=SETS, names_label_sets=np.array(["a", "b"]))
    with pytest.raises(ZooauditError, match="3 columns but 2 names"):
        load_dataset(DatasetSpec(name="arrays", path=str(tmp_path / "names.npz")))
    with pytest.raises(ZooauditError, match="multi_groups needs a .npz file or a Zarr group"):
        load_dataset(DatasetSpec(name="arrays", path=str(tmp_path / "x.npy"), options={"multi_groups": ["c"]}))


def _folder(root):
    from PIL import Image

    files = []
    for i in range(6):
        cls = ["cat", "dog"][i % 2]
        (root / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((4, 4, 3), 40 * i, np.uint8)).save(root / cls / f"im{i}.png")
        files.append(f"{cls}/im{i}.png")
    return sorted(files)    # the loader's sample order: sorted (class, file)


def test_image_folder_sidecars(tmp_path):
    root = tmp_path / "imgs"
    files = _folder(root)
    sets = {f: [LABELS[j] for j in np.flatnonzero(SETS[i])] for i, f in enumerate(files)}
    ctx = {f: [["in", "out"][j] for j in np.flatnonzero(CONTEXT[i])] for i, f in enumerate(files)}
    rows = ["path,labels"] + [f"{f},{';'.join(v)}" for f, v in sets.items()]
    (root / "label_sets.csv").write_text("\n".join(rows) + "\n")
    (root / "multi_groups.json").write_text(json.dumps({f: {"context": v} for f, v in ctx.items()}))
    ds = load_dataset(DatasetSpec(name="image-folder", path=str(root)))       # both found by their default names
    np.testing.assert_array_equal(ds.label_sets, SETS)
    assert ds.label_set_names == LABELS and ds.class_names == ["cat", "dog"]
    np.testing.assert_array_equal(ds.group_sets["context"], CONTEXT)
    assert ds.group_set_names == {"context": ["in", "out"]}

    # JSON label sets under another name, with a vocabulary fixing the columns
    (root / "tags.json").write_text(json.dumps(sets))
    vocab = ["person", "dog", "cat", "bird"]
    v = load_dataset(DatasetSpec(name="image-folder", path=str(root),
                                 options={"label_sets": "tags.json", "label_set_names": vocab}))
    assert v.label_set_names == vocab
    np.testing.assert_array_equal(v.label_sets[:, :3], SETS[:, ::-1])
    assert v.label_sets[:, 3].sum() == 0

    with pytest.raises(ZooauditError, match=r"names \['cat'\], not among the allowed names \['dog', 'person'\]"):
        load_dataset(DatasetSpec(name="image-folder", path=str(root), options={"label_set_names": ["dog", "person"]}))
    (root / "ragged.json").write_text(json.dumps({**sets, files[0]: [["cat"], "dog"]}))
    with pytest.raises(ZooauditError, match=r"label_sets of sample 0 is \[\['cat'\], 'dog'\]; expected a flat list"):
        load_dataset(DatasetSpec(name="image-folder", path=str(root), options={"label_sets": "ragged.json"}))
    (root / "short.csv").write_text("\n".join(rows[:-1]) + "\n")
    with pytest.raises(ZooauditError, match=r"has no entry for 1 image\(s\)"):
        load_dataset(DatasetSpec(name="image-folder", path=str(root), options={"label_sets": "short.csv"}))
    (root / "wrong.csv").write_text("path,tags\n")
    with pytest.raises(ZooauditError, match=r"needs a header with the columns 'path' and 'labels'"):
        load_dataset(DatasetSpec(name="image-folder", path=str(root), options={"label_sets": "wrong.csv"}))
    with pytest.raises(ZooauditError, match=r"options.label_sets\) does not exist"):
        load_dataset(DatasetSpec(name="image-folder", path=str(root), options={"label_sets": "none.csv"}))


def test_hf_disk_list_and_vector_columns(tmp_path):
    datasets = pytest.importorskip("datasets")

    rows = [[LABELS[j] for j in np.flatnonzero(r)] for r in SETS]
    features = datasets.Features({
        "x": datasets.List(datasets.Value("float32"), length=2),
        "tags": datasets.List(datasets.Value("string")),
        "coded": datasets.List(datasets.ClassLabel(names=LABELS)),
        "context": datasets.List(datasets.Value("int8"), length=2), "site": datasets.Value("string")})
    d = datasets.Dataset.from_dict({"x": [[0.0, float(i)] for i in range(6)], "tags": rows,
                                    "coded": [list(np.flatnonzero(r)) for r in SETS],
                                    "context": CONTEXT.tolist(), "site": list("ababab")}, features=features)
    d.save_to_disk(str(tmp_path / "hf"))
    spec = {"name": "hf-disk", "path": str(tmp_path / "hf"), "options": {"inputs": "x"}}
    ds = load_dataset(DatasetSpec(**{**spec, "options": {"inputs": "x", "label_sets": "tags",
                                                         "multi_groups": ["context"]}}))
    np.testing.assert_array_equal(ds.label_sets, SETS)
    assert ds.label_set_names == LABELS and ds.group_set_names == {"context": ["0", "1"]}
    np.testing.assert_array_equal(ds.group_sets["context"], CONTEXT)
    coded = load_dataset(DatasetSpec(**{**spec, "options": {"inputs": "x", "label_sets": "coded"}}))
    np.testing.assert_array_equal(coded.label_sets, SETS)
    assert coded.label_set_names == LABELS                   # the ClassLabel's names
    again = load_dataset(DatasetSpec(**{**spec, "options": {"inputs": "x", "label_sets": "tags",
                                                            "label_set_names": ["person", "cat", "dog"]}}))
    np.testing.assert_array_equal(again.label_sets, SETS[:, [2, 0, 1]])

    with pytest.raises(ZooauditError, match=r"names \['person'\], not among the allowed names \['cat', 'dog'\]"):
        load_dataset(DatasetSpec(**{**spec, "options": {"inputs": "x", "label_sets": "tags",
                                                        "label_set_names": ["cat", "dog"]}}))
    with pytest.raises(ZooauditError, match=r"no multi-hot column 'nope'.*columns are"):
        load_dataset(DatasetSpec(**{**spec, "options": {"inputs": "x", "multi_groups": ["nope"]}}))
    bad = datasets.Dataset.from_dict({"x": [[0.0, 1.0]] * 3, "ragged": [[0, 1], [1], [1, 0]],
                                      "codes": [[0, 2], [1, 0], [0, 0]]})
    bad.save_to_disk(str(tmp_path / "bad"))
    bspec = {"name": "hf-disk", "path": str(tmp_path / "bad")}
    with pytest.raises(ZooauditError, match=r"column 'ragged' is ragged: sample 0 has 2 entries, sample 1 has 1"):
        load_dataset(DatasetSpec(**bspec, options={"inputs": "x", "label_sets": "ragged"}))
    with pytest.raises(ZooauditError, match=r"column 'codes' is not multi-hot: row 0, column 1 holds 2"):
        load_dataset(DatasetSpec(**bspec, options={"inputs": "x", "label_sets": "codes"}))
    with pytest.raises(ZooauditError, match=r"has feature .*a multi-hot column holds a list per sample"):
        load_dataset(DatasetSpec(**{**spec, "options": {"inputs": "x", "multi_groups": ["site"]}}))


# --- through the bias stage -------------------------------------------------------------------------------

MODEL = "builtin:mlp-w32-s0"     # digits (1, 8, 8) → 10 logits; multi-label predictions: sigmoid ≥ 0.5
CTX = ["kitchen", "street", "park"]


def _multi_label_split(path, split: str, seed: int, strength: float):
    """Digits as a multi-label set: each image has its digit and, in its context, the label 'next digit';
    a set-valued context attribute (kitchen/street/park) that goes with even digits at ``strength``."""
    d = load_dataset(DatasetSpec(name="digits", split=split))
    rng = np.random.default_rng(seed)
    n = len(d)
    sets = np.zeros((n, 10), np.uint8)
    sets[np.arange(n), d.labels] = 1
    even = d.labels % 2 == 0
    kitchen = np.where(rng.random(n) < strength, even, ~even)
    ctx = np.stack([kitchen, ~kitchen, rng.random(n) < 0.3], axis=1).astype(np.uint8)
    nxt = (d.labels + 1) % 10
    add = kitchen & (rng.random(n) < 0.6)
    sets[np.flatnonzero(add), nxt[add]] = 1
    np.savez(path, inputs=d.inputs, labels=d.labels, label_sets=sets,
             names_label_sets=np.array([f"d{i}" for i in range(10)]), multi_context=ctx,
             names_multi_context=np.array(CTX), group_site=np.where(rng.random(n) < 0.5, "a", "b"))
    return np.load(path)


def _hand_directional_at(tr_a, tr_t, a, t, p):
    """Wang & Russakovsky's BiasAmp→ (A→T) straight from its definition, pair by pair."""
    total, count = 0.0, 0
    for i in range(a.shape[1]):
        for j in range(t.shape[1]):
            y = np.mean(tr_a[:, i] * tr_t[:, j]) > np.mean(tr_a[:, i]) * np.mean(tr_t[:, j])
            has = a[:, i] == 1
            if not has.any():
                continue
            delta = p[has, j].mean() - t[has, j].mean()
            total += delta if y else -delta
            count += 1
    return total / count


def test_multi_label_amplification_through_the_stage_equals_the_analysis(shared_store, tmp_path):
    from zooaudit import layout, stages
    from zooaudit.analysis.amplification import bias_amplification
    from zooaudit.specs import AuditModelSpec, BiasSpec
    from zooaudit.stages.amplification import task_side
    from zooaudit.stages.bias import bias_key
    from zooaudit.store import Store

    test = _multi_label_split(tmp_path / "test.npz", "test", 1, 0.8)
    train = _multi_label_split(tmp_path / "train.npz", "train", 2, 0.9)
    bias = {"n_boot": 30, "n_permutations": 50, "probes": False, "measures": ["amplification", "contextual"],
            "train_options": {"path": str(tmp_path / "train.npz")}}
    spec = AuditModelSpec(model=MODEL, store=shared_store, shard_size=200,
                          datasets=[DatasetSpec(name="arrays", path=str(tmp_path / "test.npz"))], bias=bias)
    ref = stages.run_model_stages(stages.plan_extraction(spec, spec.datasets[0]), spec)[0]
    assert ref.has_group_sets
    res = stages.run_bias(ref, spec.bias)
    snap = Store(ref.store).model_repo(ref.model_key).readonly_session(snapshot_id=res.snapshot).store
    samples = xr.open_zarr(snap, group=layout.samples_group(ref.ds_key), consolidated=False)
    assert samples["label_sets"].dims == ("sample", "class") and samples.attrs["multi_hot_attributes"] == ["context"]
    assert samples["multi_context"].dims == ("sample", "context_value")
    np.testing.assert_array_equal(samples["label_sets"].values, test["label_sets"])
    assert list(samples["context_value"].values) == CTX
    logits = xr.open_zarr(snap, group=layout.outputs_group(ref.ds_key), consolidated=False)["logits"].values
    pred = (logits >= 0).astype(np.uint8)     # sigmoid(z) ≥ 0.5 ⇔ z ≥ 0
    assert 0 < pred.sum() < pred.size
    kw = dict(max_order=2, n_boot=30, n_permutations=50, ci=0.95, random_state=0, correction="bh", alpha=0.05,
              multi_label=True)
    for attr, tr_a, a in [("context", train["multi_context"], test["multi_context"]),
                          ("site", np.eye(2, dtype=np.uint8)[(train["group_site"] == "b").astype(int)],
                           np.eye(2, dtype=np.uint8)[(test["group_site"] == "b").astype(int)])]:
        got = xr.open_zarr(snap, group=f"{layout.bias_group(ref.ds_key, 'amplification')}/{attr}",
                           consolidated=False).load()
        want = bias_amplification(tr_a, train["label_sets"], a, test["label_sets"], pred, **kw)
        for var in ("value", "value_ci", "variance", "signed", "p_value"):
            np.testing.assert_allclose(got[var].values, want[var].values, rtol=1e-12, equal_nan=True, err_msg=var)
        np.testing.assert_allclose(got["pairs_mals"].values, want["pairs_mals"].values, rtol=1e-12)
        assert got.attrs["multi_label"] and got.attrs["multi_label_threshold"] == 0.5
        assert list(got["task"].values) == [f"d{i}" for i in range(10)]
        hand = _hand_directional_at(tr_a, train["label_sets"], a, test["label_sets"], pred)
        assert float(got["value"].sel(measure="directional_at")) == pytest.approx(hand, abs=1e-12)
    assert list(got["attribute"].values) == ["a", "b"]
    ctx_amp = res.summary["context"]["amplification"]
    assert res.summary["context"]["multi_hot"] and ctx_amp["mals"]["value"] is not None
    assert "contextual" in res.summary["context"] and "overall_accuracy" in res.summary["site"]
    ctx = xr.open_zarr(snap, group=f"{layout.bias_group(ref.ds_key, 'contextual')}/context", consolidated=False)
    assert set(ctx["context"].values) <= set(CTX) and ctx.attrs["multi_label"]

    # the report: the set-valued attribute has its amplification table, no group-accuracy section
    from zooaudit.report.bias import bias_section
    from zooaudit.report.bias_measures import bias_measures_section

    def opened(group, snapshot=res.snapshot):
        return xr.open_zarr(Store(ref.store).model_repo(ref.model_key).readonly_session(snapshot_id=snapshot).store,
                            group=group, consolidated=False)

    files: dict = {}
    html = "".join(bias_section(opened, ref, res, "m", files) + bias_measures_section(opened, ref, res, None, "m",
                                                                                      files))
    assert "Bias amplification of context" in html and "accuracy by site" in html
    assert "accuracy by context" not in html and "probe accuracy of context" not in html
    # single labels when asked (or for a dataset without label sets): the run's one-hot path, another key
    single = stages.run_bias(ref, BiasSpec(**{**bias, "multi_label": False}))
    assert single.cache_key != res.cache_key and single.summary["context"]["amplification"]["mals"] != ctx_amp["mals"]
    # bad input: a training side without the label sets — an error, nothing committed
    np.savez(tmp_path / "nosets.npz", **{k: train[k] for k in train.files if k not in ("label_sets",
                                                                                      "names_label_sets")})
    bspec = BiasSpec(**{**bias, "train_options": {"path": str(tmp_path / "nosets.npz")}})
    with pytest.raises(ZooauditError, match="training side .* has no multi-hot label_sets.*BiasSpec.train_split"):
        stages.run_bias(ref, bspec)
    assert ref.repository.find(bias_key(ref, bspec)) is None
    renamed = {**{k: train[k] for k in train.files}, "names_label_sets": np.array([f"e{i}" for i in range(10)])}
    np.savez(tmp_path / "renamed.npz", **renamed)
    with pytest.raises(ZooauditError, match=r"training side's label_sets has the name\(s\) \['e0'"):
        stages.run_bias(ref, BiasSpec(**{**bias, "train_options": {"path": str(tmp_path / "renamed.npz")}}))
    # multi-label asked of single labels; label sets that do not match the model's outputs
    plain = samples.load().drop_vars(["label_sets", "class"])
    outputs = xr.open_zarr(snap, group=layout.outputs_group(ref.ds_key), consolidated=False).load()
    train_ds = load_dataset(DatasetSpec(name="arrays", path=str(tmp_path / "train.npz")))
    with pytest.raises(ZooauditError, match=r"multi_label=True, but the audit dataset has no multi-hot label sets"):
        task_side(plain, outputs, BiasSpec(multi_label=True), train_ds)
    assert not task_side(plain, outputs, BiasSpec(), train_ds).multi_label
    with pytest.raises(ZooauditError, match="label_sets have 9 labels but the model has 10 outputs"):
        task_side(samples.load().isel({"class": slice(0, 9)}), outputs, BiasSpec(), train_ds)


def test_bias_key_unchanged_at_the_new_defaults_and_set_attributes_make_the_stage_apply():
    from types import SimpleNamespace

    from zooaudit.keys import cache_key
    from zooaudit.specs import BiasSpec
    from zooaudit.stages.bias import applies, bias_key

    target = SimpleNamespace(has_groups=True, n_outputs=10, cache_key="activations-x", model_info={},
                             sample_layers=["fc"])
    old = {k: v for k, v in BiasSpec().model_dump().items() if k not in ("multi_label", "multi_label_threshold")}
    assert bias_key(target, BiasSpec()) == cache_key("bias", activations="activations-x", **old)
    assert bias_key(target, BiasSpec(multi_label=True)) != bias_key(target, BiasSpec())
    assert bias_key(target, BiasSpec(multi_label_threshold=0.7)) != bias_key(target, BiasSpec())
    only_sets = SimpleNamespace(**{**target.__dict__, "has_groups": False, "has_group_sets": True})
    assert applies(only_sets, BiasSpec()) and not applies(SimpleNamespace(**{**only_sets.__dict__,
                                                                             "has_group_sets": False}), BiasSpec())
