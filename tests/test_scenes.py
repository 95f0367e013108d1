"""The generated scenes dataset (shapes on textured backgrounds, with masks), and masks in the
image-folder and arrays formats."""

import numpy as np
import pytest

from zooaudit.data import load_dataset
from zooaudit.data.scenes import BACKGROUNDS, SHAPES, TEST_ID_OFFSET, counterfactual_pairs
from zooaudit.errors import ZooauditError

SMALL = {"image_size": 32, "n_train": 600, "n_test": 400}


def scenes(split="test", seed=0, **options):
    return load_dataset({"name": "scenes", "split": split, "seed": seed, "options": {**SMALL, **options}})


def test_default_shapes_and_labels():
    ds = load_dataset({"name": "scenes", "options": {"n_test": 8}})
    assert ds.inputs.shape == (8, 3, 64, 64) and ds.inputs.dtype == np.float32
    assert ds.masks.shape == (8, 64, 64) and ds.masks.dtype == bool
    assert 0.0 <= ds.inputs.min() and ds.inputs.max() <= 1.0
    assert ds.class_names == list(SHAPES[:4]) and ds.group_names["background"] == list(BACKGROUNDS[:4])
    assert ds.group_names["agrees"] == ["disagrees", "agrees"]
    assert ds.sample_ids.tolist() == list(range(TEST_ID_OFFSET, TEST_ID_OFFSET + 8))
    # the agrees attribute is exactly "background kind == class's own kind (k mod B)"
    np.testing.assert_array_equal(ds.groups["agrees"], ds.groups["background"] == ds.labels % 4)


def test_deterministic_from_the_seed():
    a, b, c = scenes(), scenes(), scenes(seed=1)
    for field in ("inputs", "labels", "masks", "sample_ids"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert a.content_hash == b.content_hash and a.key == b.key
    assert c.content_hash != a.content_hash and not np.array_equal(c.inputs, a.inputs)
    # train and test are independent draws, with distinct ids
    tr = scenes("train")
    assert not set(tr.sample_ids) & set(a.sample_ids)
    both = scenes("all")
    np.testing.assert_array_equal(both.inputs, np.concatenate([tr.inputs, a.inputs]))


def test_agreement_changes_only_the_backgrounds():
    strong, weak = scenes("train", agreement=0.95), scenes("train", agreement=0.5)
    np.testing.assert_array_equal(strong.labels, weak.labels)
    np.testing.assert_array_equal(strong.masks, weak.masks)
    np.testing.assert_array_equal(strong.inputs[:, :, strong.masks[0]][0], weak.inputs[:, :, weak.masks[0]][0])
    assert (strong.groups["background"] != weak.groups["background"]).any()


@pytest.mark.parametrize("split,agreement,n_bg", [("train", None, 4), ("test", None, 4), ("train", 0.7, 3),
                                                   ("test", 0.0, 2)])
def test_agreement_rate(split, agreement, n_bg):
    opts = {"backgrounds": n_bg, **({} if agreement is None else {"agreement": agreement})}
    ds = scenes(split, **opts)
    p = agreement if agreement is not None else (0.95 if split == "train" else 1 / n_bg)
    n = len(ds)
    rate = ds.groups["agrees"].mean()
    assert abs(rate - p) <= 4 * np.sqrt(p * (1 - p) / n) + 1e-12, (rate, p)
    # a disagreeing sample's background is uniform over the other kinds: every kind appears
    off = ds.groups["background"][ds.groups["agrees"] == 0]
    if len(off):
        assert set(np.unique(off)) == set(range(n_bg))


def test_balanced_split_is_independent_of_the_class():
    ds = scenes("test", n_test=2000)
    table = np.zeros((4, 4))
    np.add.at(table, (ds.labels, ds.groups["background"]), 1)
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    chi2 = ((table - expected) ** 2 / expected).sum()
    assert chi2 < 30.0   # 9 degrees of freedom: P(chi2 > 30) ≈ 4e-4 under independence


def test_masks_are_exactly_the_object():
    ds = scenes("test", n_test=60)
    for i in range(len(ds)):
        img, m = ds.inputs[i], ds.masks[i]
        assert m.any() and not m.all()
        obj = img[:, m]
        # flat object colour: one RGB value on every mask pixel, one channel at full value
        assert (obj == obj[:, :1]).all() and obj[:, 0].max() == 1.0
        # no pixel outside the mask carries the object's colour (the palettes are muted: < 1)
        assert not (img[:, ~m] == obj[:, :1]).all(0).any()
        ys, xs = np.nonzero(m)
        if ds.labels[i] == SHAPES.index("square"):
            # a filled axis-aligned square: the mask is its bounding box
            assert m[ys.min():ys.max() + 1, xs.min():xs.max() + 1].all()
            assert abs((ys.max() - ys.min()) - (xs.max() - xs.min())) <= 1
        if ds.labels[i] == SHAPES.index("circle"):
            # a disc: the disc of the mask's area around its centroid covers it up to the boundary pixels
            r = np.sqrt(m.sum() / np.pi)
            yy, xx = np.mgrid[:m.shape[0], :m.shape[1]]
            disc = (yy - ys.mean()) ** 2 + (xx - xs.mean()) ** 2 <= r * r
            assert (disc & m).sum() / (disc | m).sum() > 0.85


def test_counterfactual_pairs_share_the_object_and_swap_the_background():
    spec = {"name": "scenes", "split": "test", "options": {**SMALL, "n_test": 200}}
    base, swapped = counterfactual_pairs(spec)
    assert base.key == load_dataset(spec).key           # the base set is the plain one
    np.testing.assert_array_equal(base.sample_ids, swapped.sample_ids)
    np.testing.assert_array_equal(base.labels, swapped.labels)
    np.testing.assert_array_equal(base.masks, swapped.masks)
    m = base.masks[:, None].repeat(3, 1)
    np.testing.assert_array_equal(base.inputs[m], swapped.inputs[m])      # object pixels identical
    assert (base.groups["background"] != swapped.groups["background"]).all()
    # the swap flips the group: own background ↔ another kind
    np.testing.assert_array_equal(swapped.groups["agrees"], 1 - base.groups["agrees"])
    changed = (base.inputs != swapped.inputs).any(1) & ~base.masks
    assert changed.sum() / (~base.masks).sum() > 0.8                     # the background did change
    with pytest.raises(ZooauditError, match="scenes"):
        counterfactual_pairs({"name": "digits"})


def test_max_samples_slices_the_masks():
    ds = load_dataset({"name": "scenes", "max_samples": 5, "options": SMALL})
    assert len(ds) == 5 and ds.masks.shape == (5, 32, 32)


@pytest.mark.parametrize("options,match", [
    ({"classes": 7}, "classes"), ({"backgrounds": 1}, "backgrounds"), ({"agreement": 1.5}, "agreement"),
    ({"n_test": 0}, "n_test"), ({"image_size": 8}, "too small"), ({"swap_background": "yes"}, "swap_background"),
    ({"colour": 1}, "Unknown option"),
])
def test_bad_options_are_named(options, match):
    with pytest.raises(ZooauditError, match=match):
        load_dataset({"name": "scenes", "options": options})


def test_array_dataset_masks(tmp_path):
    x = np.random.default_rng(0).random((6, 3, 8, 8)).astype(np.float32)
    masks = np.zeros((6, 8, 8), np.uint8)
    masks[:, 2:5, 3:6] = 1
    np.savez(tmp_path / "d.npz", inputs=x, labels=np.arange(6), masks=masks)
    ds = load_dataset({"name": "arrays", "path": str(tmp_path / "d.npz")})
    assert ds.masks.dtype == bool and ds.masks.sum() == 6 * 9
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "m.npy", masks)
    ds = load_dataset({"name": "arrays", "path": str(tmp_path / "x.npy"), "options": {"masks": str(tmp_path / "m.npy")}})
    np.testing.assert_array_equal(ds.masks, masks.astype(bool))
    plain = load_dataset({"name": "arrays", "path": str(tmp_path / "x.npy")})
    assert plain.masks is None
    np.savez(tmp_path / "bad.npz", inputs=x, masks=masks[:, :4])
    with pytest.raises(ZooauditError, match=r"masks have shape \(6, 4, 8\); expected \(6, 8, 8\)"):
        load_dataset({"name": "arrays", "path": str(tmp_path / "bad.npz")})


def test_image_folder_masks(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        (tmp_path / "masks" / cls).mkdir(parents=True)
        for j in range(2):
            Image.fromarray((rng.random((12, 12, 3)) * 255).astype(np.uint8)).save(tmp_path / cls / f"{j}.jpg")
            m = np.zeros((12, 12), np.uint8)
            m[j:j + 4, 2:8] = 255
            Image.fromarray(m).save(tmp_path / "masks" / cls / f"{j}.png")
    spec = {"name": "image-folder", "path": str(tmp_path), "options": {"masks": "masks", "image_size": 6}}
    ds = load_dataset(spec)
    assert ds.class_names == ["a", "b"] and ds.labels.tolist() == [0, 0, 1, 1]   # the masks folder is no class
    assert ds.masks.shape == (4, 6, 6) and ds.masks[0].sum() == 2 * 3            # nearest resize keeps it binary
    (tmp_path / "masks" / "b" / "1.png").unlink()
    with pytest.raises(ZooauditError, match="b/1.jpg.*has no mask"):
        load_dataset(spec)


def test_scene_models_rely_on_the_background_as_much_as_they_were_trained_to(shared_store):
    """The scenes sweep: the 0.95-agreement model is right only where the background agrees with
    the class; the independent-background model is right in both groups; worst-group accuracy
    rises as the training agreement falls."""
    import torch

    from zooaudit.store import Store
    from zooaudit.zoo import resolve_model
    from zooaudit.zoo.builtin import scenes_sweep

    test = load_dataset({"name": "scenes", "split": "test"})
    agrees = test.groups["agrees"] == 1
    worst = {}
    for agreement, uri in scenes_sweep().items():
        model = resolve_model(uri, Store.open(shared_store))
        assert model.input_shape == (3, 64, 64) and model.default_layers[1] == "act4"
        with torch.no_grad():
            right = model.module(torch.from_numpy(test.inputs)).argmax(1).numpy() == test.labels
        worst[agreement] = min(right[agrees].mean(), right[~agrees].mean())
        if agreement == 0.95:
            assert right[agrees].mean() > 0.9 and right[~agrees].mean() < 0.2
        if agreement == 0.25:
            assert right[~agrees].mean() > 0.7
    assert worst[0.95] < worst[0.75] < worst[0.25]
