"""Model sources on real models: torchvision / timm architectures with saved weights
files, TorchScript and torch.export programs, checkpoints, and the refusal of
pickles that would run code."""

import pathlib

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from zooaudit.errors import ZooauditError
from zooaudit.extract import forward_batches, layer_shapes, select_layers
from zooaudit.store import Store
from zooaudit.zoo import resolve_model, weights_hash

R18 = "torchvision:resnet18?num_classes=10&input_shape=3x32x32"


@pytest.fixture(scope="module")
def store():
    return Store.open("file:///nonexistent-store-never-written")


@pytest.fixture(scope="module")
def r18(store):
    return resolve_model(R18 + "&seed=3", store)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).standard_normal((70, 3, 32, 32)).astype(np.float32)


@pytest.fixture(scope="module")
def r18_files(r18, tmp_path_factory):
    d = tmp_path_factory.mktemp("weights")
    sd = {k: v.contiguous() for k, v in r18.module.state_dict().items()}
    save_file(sd, d / "r18.safetensors")
    torch.save({"state_dict": sd, "epoch": 4, "arch": "torchvision:resnet18"}, d / "r18-ckpt.pt")
    torch.save(sd, d / "r18.pt")
    return d


def test_torchvision_random_init_is_seeded_and_hashed(r18, store):
    again = resolve_model(R18 + "&seed=3", store)
    other = resolve_model(R18 + "&seed=4", store)
    assert r18.content_hash == again.content_hash == weights_hash(r18.module.state_dict())
    assert other.content_hash != r18.content_hash
    assert r18.info["random_init_seed"] == 3 and r18.input_shape == (3, 32, 32)
    assert r18.default_layers == ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4",
                                  "avgpool"]
    # the control copy is another seed: different weights, same architecture
    ctrl = r18.random_init()
    assert weights_hash(ctrl.state_dict()) != r18.content_hash
    assert ctrl.state_dict().keys() == r18.module.state_dict().keys()


@pytest.mark.parametrize("fname", ["r18.safetensors", "r18.pt", "r18-ckpt.pt"])
def test_torchvision_weights_file_round_trip(r18, r18_files, store, fname, images):
    m = resolve_model(f"torchvision:resnet18?num_classes=10&input_shape=3x32x32&weights={r18_files / fname}", store)
    assert m.content_hash == r18.content_hash, "the hash, not the name, is the identity"
    a, _ = forward_batches(m.module, images[:8], ["layer2"], batch_size=8)
    b, _ = forward_batches(r18.module, images[:8], ["layer2"], batch_size=8)
    np.testing.assert_array_equal(a["layer2"], b["layer2"])


def test_torchvision_bad_inputs(r18_files, store, tmp_path):
    with pytest.raises(ZooauditError, match=r"does not exist.*never downloads"):
        resolve_model(f"torchvision:resnet18?weights={tmp_path / 'missing.safetensors'}", store)
    # weights for 10 classes into the default 1000-class head: the mismatched keys are named
    with pytest.raises(ZooauditError, match=r"do not fit torchvision:resnet18: shape mismatches: fc\.bias \(10,\)"):
        resolve_model(f"torchvision:resnet18?weights={r18_files / 'r18.safetensors'}", store)
    with pytest.raises(ZooauditError, match=r"torchvision:resnet34: missing keys: layer1.2.bn1.bias.* \(96 in all\)"):
        resolve_model(f"torchvision:resnet34?num_classes=10&weights={r18_files / 'r18.safetensors'}", store)
    with pytest.raises(ZooauditError, match=r"Unknown torchvision architecture 'resnet1'.*resnet18"):
        resolve_model("torchvision:resnet1", store)
    with pytest.raises(ZooauditError, match=r"Unknown option\(s\) \['pretrained'\].*Allowed: input_shape"):
        resolve_model("torchvision:resnet18?pretrained=1", store)
    with pytest.raises(ZooauditError, match="both weights= and seed="):
        resolve_model(f"torchvision:resnet18?seed=1&weights={r18_files / 'r18.pt'}", store)


def test_activations_equal_create_feature_extractor(r18, images):
    from torchvision.models.feature_extraction import create_feature_extractor

    layers = ["layer1", "layer3.1.conv2", "layer4", "avgpool"]
    assert select_layers(r18.module, ["layer3.1.conv2", "layer[14]", "avgpool"]) == layers
    ours, _ = forward_batches(r18.module, images[:16], layers, pooling="none", batch_size=16, with_outputs=False)
    fx = create_feature_extractor(r18.module, return_nodes=layers)
    with torch.no_grad():
        ref = fx(torch.from_numpy(images[:16]))
    for name in layers:
        np.testing.assert_allclose(ours[name], ref[name].numpy(), rtol=1e-5, atol=1e-6)


def test_batch_size_invariance_torchvision(r18, images):
    layers = ["layer2", "layer4", "fc"]
    images = images[:20]   # 20 single-sample forwards for batch size 1 keep this cheap
    ref, out_ref = forward_batches(r18.module, images, layers, batch_size=64)
    for bs in (1, 7):
        got, out = forward_batches(r18.module, images, layers, batch_size=bs)
        for k in layers:
            np.testing.assert_allclose(got[k], ref[k], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(out, out_ref, rtol=1e-4, atol=1e-5)


def test_timm_weights_file(store, tmp_path, images):
    m = resolve_model("timm:test_resnet?input_shape=3x32x32&num_classes=5", store)
    # timm's feature_info names the stage outputs
    assert m.default_layers == ["act1", "layer1", "layer2", "layer3", "layer4"]
    save_file({k: v.contiguous() for k, v in m.module.state_dict().items()}, tmp_path / "t.safetensors")
    back = resolve_model(f"timm:test_resnet?input_shape=3x32x32&num_classes=5&weights={tmp_path}/t.safetensors",
                         store)
    assert back.content_hash == m.content_hash
    shapes = layer_shapes(back.module, back.input_shape, back.default_layers, "none")
    assert shapes["layer4"][1:] == (1, 1) and len(shapes) == 5
    with pytest.raises(ZooauditError, match="Unknown timm architecture"):
        resolve_model("timm:no_such_net", store)


def test_torchscript_file(r18, tmp_path, store, images):
    path = tmp_path / "r18.ts"
    torch.jit.save(torch.jit.script(r18.module), str(path))
    m = resolve_model(f"file:{path}?input_shape=3x32x32", store)
    assert m.info["format"] == "torchscript" and m.input_shape == (3, 32, 32)
    assert m.content_hash == resolve_model(f"file://{path}?input_shape=3x32x32", store).content_hash
    a, out_a = forward_batches(m.module, images[:8], ["layer2", "layer4.1.conv1"], batch_size=4)
    b, out_b = forward_batches(r18.module, images[:8], ["layer2", "layer4.1.conv1"], batch_size=4)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out_a, out_b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ZooauditError, match="does not say its input shape"):
        resolve_model(f"file:{path}", store)


def test_torch_export_program(r18, tmp_path, store, images):
    path = tmp_path / "r18.pt2"
    x = torch.from_numpy(images[:2])
    torch.export.save(torch.export.export(r18.module, (x,)), str(tmp_path / "static.pt2"))
    with pytest.raises(ZooauditError, match="fixed batch size 2"):
        resolve_model(f"file:{tmp_path / 'static.pt2'}", store)
    torch.export.save(torch.export.export(r18.module, (x,), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},)),
                      str(path))
    m = resolve_model(f"file:{path}", store)
    assert m.info["format"] == "torch.export" and m.input_shape == (3, 32, 32)   # from the example input
    a, out_a = forward_batches(m.module, images[:8], ["layer1", "layer3"], batch_size=8)
    b, out_b = forward_batches(r18.module, images[:8], ["layer1", "layer3"], batch_size=8)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out_a, out_b, rtol=1e-5, atol=1e-5)


def test_checkpoint_files(r18, r18_files, store, tmp_path):
    m = resolve_model(f"file:{r18_files / 'r18-ckpt.pt'}?num_classes=10&input_shape=3x32x32", store)
    assert m.content_hash == r18.content_hash and m.info["epoch"] == 4 and m.info["arch"] == "torchvision:resnet18"
    # safetensors naming its architecture in the metadata
    sd = {k: v.contiguous() for k, v in r18.module.state_dict().items()}
    save_file(sd, tmp_path / "meta.safetensors", metadata={"zooaudit.arch": "torchvision:resnet18"})
    m2 = resolve_model(f"file:{tmp_path / 'meta.safetensors'}?num_classes=10&input_shape=3x32x32", store)
    assert m2.content_hash == r18.content_hash
    with pytest.raises(ZooauditError, match=r"no architecture: add '\?arch=torchvision:<name>'"):
        resolve_model(f"file:{r18_files / 'r18.pt'}", store)
    with pytest.raises(ZooauditError, match="does not exist"):
        resolve_model(f"file:{tmp_path / 'nope.pt'}", store)


class _Evil:
    """Unpickling this calls ``Path.touch`` — the shape of every code-executing pickle."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.target),))


@pytest.mark.parametrize("wrap", ["checkpoint", "weights"])
def test_malicious_pickle_is_refused_never_executed(tmp_path, store, wrap):
    target = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"arch": "torchvision:resnet18", "state_dict": {"fc.weight": torch.zeros(1)}, "x": _Evil(target)},
               evil)
    uri = f"file:{evil}" if wrap == "checkpoint" else f"torchvision:resnet18?weights={evil}"
    with pytest.raises(ZooauditError, match=r"Refused to load .*could run arbitrary code"):
        resolve_model(uri, store)
    assert not target.exists()


def test_pickled_module_is_refused(tmp_path, store):
    path = tmp_path / "full.pt"
    torch.save(torch.nn.Sequential(torch.nn.Linear(2, 2)), path)
    with pytest.raises(ZooauditError, match=r"Refused to load.*state_dict"):
        resolve_model(f"file:{path}?arch=torchvision:resnet18", store)


# -- datasets ----------------------------------------------------------------------------

def _image_folder(root, sizes=((6, 5),) * 6):
    from PIL import Image

    rng = np.random.default_rng(1)
    rows = ["path,site"]
    for i, (h, w) in enumerate(sizes):
        cls = ["cat", "dog"][i % 2]
        (root / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / cls / f"im{i}.png")
        rows.append(f"{cls}/im{i}.png,{'ab'[i % 3 == 0]}")
    (root / "groups.csv").write_text("\n".join(rows) + "\n")
    return root


def test_image_folder_dataset(tmp_path):
    from zooaudit.data import load_dataset
    from zooaudit.specs import DatasetSpec

    root = _image_folder(tmp_path / "imgs")
    ds = load_dataset(DatasetSpec(name="image-folder", path=str(root)))
    assert ds.inputs.shape == (6, 3, 6, 5) and ds.inputs.dtype == np.float32 and 0 <= ds.inputs.min() <= 1
    np.testing.assert_array_equal(ds.labels, [0, 0, 0, 1, 1, 1])            # cat = 0, dog = 1 (sorted folders)
    assert ds.group_names == {"site": ["a", "b"]} and ds.groups["site"].tolist() == [1, 0, 0, 0, 1, 0]
    from PIL import Image

    first = np.asarray(Image.open(root / "cat" / "im0.png"), np.float32).transpose(2, 0, 1) / 255
    np.testing.assert_array_equal(ds.inputs[0], first)
    small = load_dataset(DatasetSpec(name="image-folder", path=f"file://{root}", options={"image_size": "4x4",
                                                                                             "mode": "L"}))
    assert small.inputs.shape == (6, 1, 4, 4) and small.key != ds.key

    (root / "dog" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ZooauditError, match=r"Cannot read image .*broken\.png.*on_error='skip'"):
        load_dataset(DatasetSpec(name="image-folder", path=str(root), options={"groups": "none.csv"}))
    (root / "groups.csv").unlink()
    skipped = load_dataset(DatasetSpec(name="image-folder", path=str(root), options={"on_error": "skip"}))
    assert len(skipped) == 6 and 3 not in skipped.sample_ids                  # the broken file's position
    mixed = _image_folder(tmp_path / "mixed", sizes=[(6, 5), (6, 5), (7, 5)])
    with pytest.raises(ZooauditError, match=r"images differ in size.*options.image_size"):
        load_dataset(DatasetSpec(name="image-folder", path=str(mixed)))
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ZooauditError, match="holds no readable images"):
        load_dataset(DatasetSpec(name="image-folder", path=str(tmp_path / "empty")))


def test_array_datasets(tmp_path):
    import zarr

    from zooaudit.data import load_dataset
    from zooaudit.specs import DatasetSpec

    rng = np.random.default_rng(0)
    x = rng.random((10, 2, 4, 4), dtype=np.float32)
    y = np.arange(10) % 3
    colour = np.array(["red", "green"] * 5)
    np.savez(tmp_path / "d.npz", inputs=x, labels=y, group_colour=colour, sample_ids=np.arange(100, 110))
    ds = load_dataset(DatasetSpec(name="arrays", path=str(tmp_path / "d.npz")))
    np.testing.assert_array_equal(ds.inputs, x)
    assert ds.labels.tolist() == y.tolist() and ds.sample_ids[0] == 100
    assert ds.group_names == {"colour": ["green", "red"]} and ds.groups["colour"][:2].tolist() == [1, 0]

    g = zarr.open_group(str(tmp_path / "d.zarr"), mode="w")
    g.create_array("x", data=x)
    g.create_array("y", data=y)
    z = load_dataset(DatasetSpec(name="arrays", path=str(tmp_path / "d.zarr"), options={"inputs": "x",
                                                                                       "labels": "y"}))
    np.testing.assert_array_equal(z.inputs, x)
    assert z.labels.tolist() == y.tolist()

    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y[:9])
    with pytest.raises(ZooauditError, match=r"labels has shape \(9,\); expected \(10,\)"):
        load_dataset(DatasetSpec(name="arrays", path=str(tmp_path / "x.npy"), options={"labels": str(tmp_path /
                                                                                                      "y.npy")}))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ZooauditError, match="without unpickling"):
        load_dataset(DatasetSpec(name="arrays", path=str(tmp_path / "obj.npy")))
    np.save(tmp_path / "empty.npy", np.zeros((0, 3), np.float32))
    with pytest.raises(ZooauditError, match="is empty"):
        load_dataset(DatasetSpec(name="arrays", path=str(tmp_path / "empty.npy")))
    with pytest.raises(ZooauditError, match=r"Unknown option\(s\) \['color'\]"):
        load_dataset(DatasetSpec(name="arrays", path=str(tmp_path / "d.npz"), options={"color": "x"}))


def test_hf_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    from zooaudit.data import load_dataset
    from zooaudit.specs import DatasetSpec

    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (5, 5, 3), dtype=np.uint8)) for _ in range(4)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["no", "yes"]),
                                  "region": datasets.ClassLabel(names=["north", "south"])})
    d = datasets.DatasetDict({
        "test": datasets.Dataset.from_dict({"image": imgs, "label": [0, 1, 1, 0], "region": [1, 1, 0, 0]},
                                           features=features),
        "train": datasets.Dataset.from_dict({"image": imgs[:1], "label": [1], "region": [0]}, features=features),
    })
    d.save_to_disk(str(tmp_path / "hf"))
    ds = load_dataset(DatasetSpec(name="hf-disk", path=str(tmp_path / "hf"), options={"groups": ["region"]}))
    assert ds.inputs.shape == (4, 3, 5, 5) and ds.labels.tolist() == [0, 1, 1, 0]
    np.testing.assert_array_equal(ds.inputs[1], np.asarray(imgs[1], np.float32).transpose(2, 0, 1) / 255)
    assert ds.group_names == {"region": ["north", "south"]} and ds.groups["region"].tolist() == [1, 1, 0, 0]
    assert len(load_dataset(DatasetSpec(name="hf-disk", path=str(tmp_path / "hf"), split="all"))) == 5
    with pytest.raises(ZooauditError, match=r"no group column 'sex'.*columns are"):
        load_dataset(DatasetSpec(name="hf-disk", path=str(tmp_path / "hf"), options={"groups": ["sex"]}))


def test_torchvision_model_audited_on_an_image_folder(tmp_path):
    """End to end through the stages: a torchvision model with a weights file on an image folder."""
    from zooaudit import stages
    from zooaudit.specs import AuditModelSpec, DatasetSpec

    root = _image_folder(tmp_path / "imgs")
    ds_spec = DatasetSpec(name="image-folder", path=str(root), options={"image_size": "16x16"})
    spec = AuditModelSpec(model="torchvision:resnet18?num_classes=2&input_shape=3x16x16&seed=1",
                          store="file://" + str(tmp_path / "store"), datasets=[ds_spec], layers=["layer?"],
                          shard_size=4, batch_size=3, task_runner="threads")
    plan = stages.plan_extraction(spec, ds_spec)
    assert plan.layers == ["layer1", "layer2", "layer3", "layer4"] and len(plan.shards) == 2
    res = stages.run_activations(plan)
    assert res.summary["nonfinite"] == dict.fromkeys(plan.layers, 0) and res.summary["n_samples"] == 6
    assert stages.run_activations(plan).skipped


# -- zoo manifests ----------------------------------------------------------------------

def test_zoo_manifest_lists_and_globs_checkpoints(r18, tmp_path, store):
    from zooaudit.specs import AuditZooSpec
    from zooaudit.zoo.manifest import load_manifest

    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    sd = {k: v.contiguous() for k, v in r18.module.state_dict().items()}
    for epoch in (10, 2):
        save_file(sd, ckpts / f"e{epoch}.safetensors")
    (ckpts / "notes.txt").write_text("not a checkpoint")
    manifest = tmp_path / "zoo.yaml"
    manifest.write_text(
        "layers: [embed]\n"
        "models:\n"
        "  - builtin:mlp-w32-s0\n"
        "  - uri: torchvision:resnet18?num_classes=10&input_shape=3x32x32\n"
        "    family: r18\n"
        "families:\n"
        "  - name: r18\n"
        "    layers: ['layer?']\n"
        "    glob: ckpts/*.safetensors\n"
        "    arch: torchvision:resnet18?num_classes=10&input_shape=3x32x32\n")
    entries = load_manifest(str(manifest))
    assert [e.uri.rsplit("/", 1)[-1] for e in entries[2:]] == [
        "e2.safetensors?arch=torchvision:resnet18%3Fnum_classes%3D10%26input_shape%3D3x32x32",
        "e10.safetensors?arch=torchvision:resnet18%3Fnum_classes%3D10%26input_shape%3D3x32x32"]  # natural order
    assert [e.layers for e in entries] == [("embed",), ("layer?",), ("layer?",), ("layer?",)]
    # a globbed checkpoint is a loadable model whose hash is its weights'
    m = resolve_model(entries[2].uri, store)
    assert m.content_hash == r18.content_hash and m.input_shape == (3, 32, 32)

    spec = AuditZooSpec(manifest=str(manifest))
    assert spec.models == [e.uri for e in entries]
    assert spec.model_spec(entries[3].uri).layers == ["layer?"]
    assert spec.model_spec("builtin:mlp-w32-s0").layers == ["embed"]
    assert AuditZooSpec.model_validate(spec.model_dump()).models == spec.models   # re-validation is stable
    with pytest.raises(ValueError, match="either `models` or `manifest`"):
        AuditZooSpec(manifest=str(manifest), models=["builtin:mlp-w64-s0"])

    bad = tmp_path / "bad.yaml"
    bad.write_text("families:\n  - name: x\n    glob: nothing/*.pt\n")
    with pytest.raises(ZooauditError, match=r"glob .*nothing/\*\.pt' matched no checkpoints"):
        load_manifest(str(bad))
    bad.write_text("models:\n  - uri: builtin:mlp-w32-s0\n    family: nope\n")
    with pytest.raises(ZooauditError, match=r"unknown family 'nope'"):
        load_manifest(str(bad))
    bad.write_text("modles: []\n")
    with pytest.raises(ZooauditError, match=r"unknown key\(s\) \['modles'\]"):
        load_manifest(str(bad))


@pytest.mark.slow
def test_weights_and_checkpoint_glob_on_s3(local_stack, r18, tmp_path):
    """Weights files and manifest globs on real S3 (the local stack's SeaweedFS)."""
    import uuid

    from zooaudit.zoo.manifest import load_manifest

    prefix = f"s3://{local_stack.config.bucket}/w-{uuid.uuid4().hex[:8]}"
    fs = Store.open(prefix).fs
    save_file({k: v.contiguous() for k, v in r18.module.state_dict().items()}, tmp_path / "w.safetensors")
    for name in ("e1.safetensors", "e3.safetensors"):
        fs.put(str(tmp_path / "w.safetensors"), f"{prefix}/ckpts/{name}")
    store = Store.open(prefix)
    m = resolve_model(f"torchvision:resnet18?num_classes=10&input_shape=3x32x32&weights={prefix}/ckpts/e1.safetensors",
                      store)
    assert m.content_hash == r18.content_hash
    with pytest.raises(ZooauditError, match="does not exist"):
        resolve_model(f"torchvision:resnet18?weights={prefix}/ckpts/missing.safetensors", store)
    (tmp_path / "zoo.yaml").write_text(
        f"families:\n  - name: r18\n    glob: {prefix}/ckpts/*.safetensors\n"
        "    arch: torchvision:resnet18?num_classes=10&input_shape=3x32x32\n")
    fs.put(str(tmp_path / "zoo.yaml"), f"{prefix}/zoo.yaml")
    entries = load_manifest(f"{prefix}/zoo.yaml")
    assert [e.uri.split("?")[0] for e in entries] == [f"file:{prefix}/ckpts/e1.safetensors",
                                                      f"file:{prefix}/ckpts/e3.safetensors"]
    assert resolve_model(entries[1].uri, store).content_hash == r18.content_hash


def test_timm_vit_options(store):
    """img_size / patch_size reach timm's create_model (a ViT's position embedding fixes its input
    size); img_size sets the default input shape; refused where they do not apply."""
    m = resolve_model("timm:vit_tiny_patch16_224?img_size=32&patch_size=8&num_classes=3", store)
    assert m.input_shape == (3, 32, 32) and tuple(m.module.patch_embed.grid_size) == (4, 4)
    assert m.info["img_size"] == 32 and m.info["patch_size"] == 8
    assert tuple(m.module(torch.zeros(1, 3, 32, 32)).shape) == (1, 3)
    with pytest.raises(ZooauditError, match=r"'test_resnet' does not take img_size="):
        resolve_model("timm:test_resnet?img_size=32", store)
    with pytest.raises(ZooauditError, match=r"Unknown option\(s\) \['img_size'\]"):
        resolve_model("torchvision:resnet18?img_size=32", store)
    with pytest.raises(ZooauditError, match=r"Option patch_size='x' in .* must be an integer"):
        resolve_model("timm:vit_tiny_patch16_224?patch_size=x", store)
