"""CAMs on vision transformers (zooaudit.patch_tokens): the patch tokens read as their grid, prefix
tokens (CLS, DeiT's distillation token) excluded; equal to pytorch-grad-cam with its ViT
``reshape_transform`` (Eigen-CAM up to its sign, which pytorch-grad-cam leaves to LAPACK); a gradient on the prefix tokens alone leaves the maps unchanged; a token
count that does not match is named; the attribution stage end to end on a timm ViT on scenes.

Models are random-init timm ViT / DeiT at 32×32 inputs and 8×8 patches (a 4×4 grid), 2 blocks,
built in a few milliseconds with pretrained=False (nothing is downloaded)."""

import copy

import numpy as np
import pytest
import torch

from zooaudit.attribution_maps import attribution_maps
from zooaudit.errors import ZooauditError
from zooaudit.patch_tokens import PatchTokenLayout, default_token_layer, patch_token_layout

timm = pytest.importorskip("timm")

GRADIENT_CAMS = ["gradcam", "gradcam++", "layercam"]
ARCHS = {"vit": ("vit_tiny_patch16_224", 1), "deit": ("deit_tiny_distilled_patch16_224", 2)}   # (arch, prefix)


def _model(which: str) -> torch.nn.Module:
    arch, _ = ARCHS[which]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return timm.create_model(arch, pretrained=False, img_size=32, patch_size=8, num_classes=4, depth=2).eval()


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(0).normal(size=(4, 3, 32, 32)).astype(np.float32)


@pytest.mark.parametrize("which", list(ARCHS))
def test_layout_and_default_layer_come_from_the_model(which):
    m = _model(which)
    assert patch_token_layout(m) == PatchTokenLayout(ARCHS[which][1], (4, 4))
    assert default_token_layer(m) == "blocks.1.norm1"
    assert patch_token_layout(torch.nn.Conv2d(3, 3, 1)) is None


@pytest.mark.parametrize("which", list(ARCHS))
def test_cams_equal_pytorch_grad_cam_with_its_vit_reshape_transform(which, x):
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    m, n_prefix = _model(which), ARCHS[which][1]
    methods = GRADIENT_CAMS + ["scorecam"]
    ours = attribution_maps(m, x, "blocks.1.norm1", methods=methods, target=2, normalise="minmax", batch_size=3)
    assert ours.maps.shape == (len(x), len(methods), 32, 32)
    assert ours.attrs["layer_size"] == [4, 4] and ours.attrs["token_grid"] == [4, 4]
    assert ours.attrs["prefix_tokens_excluded"] == n_prefix and "excluded" in ours.attrs["token_layout"]

    def reshape_transform(t, h=4, w=4):   # pytorch-grad-cam's ViT example, with DeiT's two prefix tokens
        r = t[:, n_prefix:, :].reshape(t.size(0), h, w, t.size(2))
        return r.transpose(2, 3).transpose(1, 2)

    classes = {"gradcam": pgc.GradCAM, "gradcam++": pgc.GradCAMPlusPlus, "layercam": pgc.LayerCAM,
               "scorecam": pgc.ScoreCAM}
    for name in methods:
        cam = classes[name](m, [m.blocks[-1].norm1], reshape_transform=reshape_transform)
        try:
            ref = cam(torch.from_numpy(x), targets=[ClassifierOutputTarget(2)] * len(x))
        finally:
            cam.activations_and_grads.release()
        assert (ref.reshape(len(ref), -1).max(1) > 0.5).all(), name   # non-degenerate maps
        np.testing.assert_allclose(ours.maps.sel({"method": name}).values, ref, atol=1e-5, rtol=0, err_msg=name)


def test_every_cam_method_runs_on_the_grid(x):
    m = _model("deit")
    out = attribution_maps(m, x, "blocks.1.norm1", methods=["eigencam", "smoothgradcam++", "gradcam++",
                           "cfcam"], smooth_samples=2, smooth_sigma=0.0, normalise="none")
    assert np.isfinite(out.maps.values).all() and (out.maps.sel({"method": "eigencam"}).values > 0).any()
    assert (out.maps.sel({"method": "cfcam"}).values > 0).any()   # clustered on the patch grid's channels
    # σ = 0: Smooth Grad-CAM++ is Grad-CAM++ (its noisy forwards go through the same grid hook)
    np.testing.assert_allclose(out.maps.sel({"method": "smoothgradcam++"}).values,
                               out.maps.sel({"method": "gradcam++"}).values, rtol=1e-4, atol=1e-7)


def _layer_gradient(m, layer, x, target: int) -> torch.Tensor:
    """``(b, token, channel)`` gradient of logit ``target`` with respect to ``layer``'s output."""
    kept = {}
    handle = layer.register_forward_hook(lambda _m, _i, out: kept.update(out=out))
    try:
        logits = m(torch.from_numpy(x))
        return torch.autograd.grad(logits[:, target].sum(), kept["out"])[0]
    finally:
        handle.remove()


@pytest.mark.parametrize("which", list(ARCHS))
def test_a_gradient_on_the_prefix_tokens_alone_does_not_change_the_maps(which, x):
    """A term of the score that reads only the prefix tokens at the layer: their gradient changes,
    the patch tokens' does not, and neither do the maps (a CAM that averaged its weights over
    every token, CLS included, would change)."""
    m, n_prefix = _model(which), ARCHS[which][1]
    layer = m.blocks[-1].norm1
    plain = attribution_maps(m, x, "blocks.1.norm1", methods=GRADIENT_CAMS, target=1, normalise="none")
    without = _layer_gradient(m, layer, x, 1)
    # + 50 Σ tanh(prefix tokens) on every class's logit, the prefix tokens as the layer passes them on
    # (the input of the attention it feeds)
    kept = {}
    keep = m.blocks[-1].attn.register_forward_pre_hook(lambda _m, args: kept.update(prefix=args[0][:, :n_prefix]))
    plant = m.head.register_forward_hook(
        lambda _m, _i, logits: logits + 50.0 * torch.tanh(kept["prefix"]).sum((1, 2))[:, None])
    try:
        planted = attribution_maps(m, x, "blocks.1.norm1", methods=GRADIENT_CAMS, target=1, normalise="none")
        with_plant = _layer_gradient(m, layer, x, 1)
    finally:
        keep.remove()
        plant.remove()
    assert (with_plant[:, :n_prefix] - without[:, :n_prefix]).abs().max() > 1.0
    torch.testing.assert_close(with_plant[:, n_prefix:], without[:, n_prefix:], rtol=1e-4, atol=1e-6)
    assert np.abs(plain.maps.values).max() > 0
    np.testing.assert_allclose(planted.maps.values, plain.maps.values, rtol=1e-4, atol=1e-6)


def test_the_last_blocks_output_has_no_patch_gradient_so_norm1_is_the_default(x):
    """Why the default is the last block's norm1: after the last block only CLS reaches the head."""
    m = _model("vit")
    out = attribution_maps(m, x, "blocks.1", methods=["gradcam"], target=0, normalise="none")
    assert np.abs(out.maps.values).max() == 0
    out = attribution_maps(m, x, default_token_layer(m), methods=["gradcam"], target=0, normalise="none")
    assert np.abs(out.maps.values).max() > 0


def test_a_token_count_that_does_not_match_the_grid_is_named(x):
    layout = PatchTokenLayout(1, (4, 4))
    with pytest.raises(ZooauditError, match=r"17 tokens = 1 prefix .*4×4 patches"):
        layout.to_grid(torch.zeros(2, 16, 8), "blocks.0")
    m = copy.deepcopy(_model("deit"))
    m.patch_embed.grid_size = (3, 3)   # a grid the blocks' 18 tokens do not have
    with pytest.raises(ZooauditError, match=r"'blocks.1.norm1' gives \(4, 18, 192\).*11 tokens = 2 prefix"):
        attribution_maps(m, x, "blocks.1.norm1", methods=["gradcam"])


def test_a_dynamic_size_vit_takes_the_grid_of_its_input():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = timm.create_model("test_vit", pretrained=False, img_size=32, patch_size=8, num_classes=3).eval()
    assert m.dynamic_img_size and patch_token_layout(m, (48, 32)).grid == (6, 4)
    x = np.random.default_rng(1).normal(size=(2, 3, 48, 32)).astype(np.float32)
    out = attribution_maps(m, x, default_token_layer(m), methods=["gradcam"], normalise="none")
    assert out.attrs["token_grid"] == [6, 4] and out.maps.shape == (2, 1, 48, 32)


# -- the stage, end to end (about 10 s: 16 64×64 scenes, timm's 6-block test_vit, the report section) --

def test_the_attribution_stage_runs_on_a_vit(store_url):
    from zooaudit.layout import attribution_group
    from zooaudit.report.attribution import attribution_section
    from zooaudit.specs import AttributionSpec, AuditModelSpec, DatasetSpec
    from zooaudit.stages.activations import plan_extraction
    from zooaudit.stages.attribution import attribution_layers, run_attribution

    scenes = DatasetSpec(name="scenes", split="test", options={"n_test": 16})
    spec = AuditModelSpec(model="timm:test_vit?img_size=64&patch_size=8&num_classes=4", store=store_url,
                          datasets=[scenes])
    plan = plan_extraction(spec, scenes)
    aspec = AttributionSpec(max_samples=8, ig_steps=2, curve_samples=2, curve_steps=3, n_boot=20,
                            n_permutations=20, sanity_samples=1, batch_size=8)
    assert attribution_layers(plan, aspec) == ["blocks.5.norm1"]
    assert attribution_layers(plan, AttributionSpec(layers=["blocks.2"])) == ["blocks.2"]
    with pytest.raises(ZooauditError, match=r"not spatial.*65 tokens = 1 prefix \+ 8×8 patches"):
        attribution_layers(plan, AttributionSpec(layers=["blocks.2", "fc_norm"]))
    result = run_attribution(plan, aspec)
    maps = plan.repository.open(attribution_group(plan.ds_key, "blocks.5.norm1", "maps"), result.snapshot)
    assert maps["maps"].shape == (8, len(aspec.methods), 64, 64) and maps["maps"].dims == ("sample", "method", "y", "x")
    assert maps.attrs["prefix_tokens_excluded"] == 1 and list(maps.attrs["token_grid"]) == [8, 8]
    assert list(maps.attrs["layer_size"]) == [8, 8]
    assert result.summary["blocks.5.norm1"]["patch_tokens"] == {"prefix_tokens_excluded": 1, "token_grid": [8, 8]}
    assert np.isfinite(maps["maps"].values.astype(np.float32)).all()
    # and the report says what the maps leave out
    html = "".join(attribution_section(lambda g: plan.repository.open(g, result.snapshot).load(), plan, result,
                                       "m-ds", {}))
    assert "the 1 prefix token (CLS) is excluded from the maps" in html


@pytest.mark.parametrize("which", list(ARCHS))
def test_eigencam_on_the_patch_grid_equals_pytorch_grad_cam_up_to_its_sign(which, x):
    """Eigen-CAM has no gradient to fix the projection's sign: pytorch-grad-cam leaves it to LAPACK's SVD,
    zooaudit makes the map correlate with the channel sum (analysis.eigencam). Per image, ours equals
    pytorch-grad-cam's EigenCAM (its ViT reshape_transform, ReLU, min-max, resize) where the two signs
    agree, and the same pipeline applied to the negated projection where they do not."""
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.image import scale_cam_image
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

    from zooaudit.analysis.eigencam import eigencam

    m, n_prefix = _model(which), ARCHS[which][1]

    def reshape_transform(t, h=4, w=4):
        r = t[:, n_prefix:, :].reshape(t.size(0), h, w, t.size(2))
        return r.transpose(2, 3).transpose(1, 2)

    ours = attribution_maps(m, x, "blocks.1.norm1", methods=["eigencam"], normalise="minmax", batch_size=3)
    cam = pgc.EigenCAM(m, [m.blocks[-1].norm1], reshape_transform=reshape_transform)
    try:
        theirs = cam(torch.from_numpy(x), targets=None)   # gradient-free: the targets are unused
    finally:
        cam.activations_and_grads.release()
    grids = []
    h = m.blocks[-1].norm1.register_forward_hook(lambda _m, _i, o: grids.append(reshape_transform(o).detach()))
    with torch.no_grad():
        m(torch.from_numpy(x))
    h.remove()
    grid = grids[0].numpy()                      # (sample, channel, 4, 4): the patch tokens, prefix excluded
    projection = get_2d_projection(grid.copy())
    flipped = scale_cam_image(scale_cam_image(np.maximum(-projection, 0), (32, 32)))   # their pipeline on −p
    ours_grid = eigencam(grid)
    got = ours.maps.sel({"method": "eigencam"}).values
    agree = np.array([np.sign((o * p).sum()) for o, p in zip(ours_grid, projection)])
    assert set(agree) <= {-1.0, 1.0}
    for i in range(len(x)):
        np.testing.assert_allclose(np.abs(ours_grid[i]), np.abs(projection[i]), atol=1e-4)
        want = theirs[i] if agree[i] > 0 else flipped[i]
        assert want.max() > 0.5   # non-degenerate
        np.testing.assert_allclose(got[i], want, atol=1e-5, rtol=0, err_msg=f"{which} image {i} sign {agree[i]}")
