"""Multi-hot label sets and set-valued attributes: the container, the three user formats, bad input."""

import json

import numpy as np
import pytest

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
