"""Attribution maps (zooaudit.attribution_maps): equal to pytorch-grad-cam where the conventions
agree, to a hand-written per-sample computation, Integrated Gradients' completeness, targets,
batching (one backward per batch), conventions and bad input."""

import numpy as np
import pytest
import torch
from torch import nn

from zooaudit.analysis.eigencam import eigencam
from zooaudit.attribution_maps import DEFAULT_METHODS, attribution_maps
from zooaudit.data import load_dataset
from zooaudit.errors import ZooauditError
from zooaudit.zoo.builtin import BUILTIN_ZOO, build

CAMS = ["gradcam", "gradcam++", "layercam", "scorecam"]


def _briefly_trained(model, x, y, steps=30):
    """A few optimiser steps so the maps are not the degenerate ones of a random network."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def scenes():
    return load_dataset({"name": "scenes", "options": {"n_test": 12, "image_size": 32}})


@pytest.fixture(scope="module")
def scene_cnn(scenes):
    m = build(BUILTIN_ZOO["scene-cnn-a25-w8-s0"])
    return _briefly_trained(m, torch.from_numpy(scenes.inputs), torch.from_numpy(scenes.labels))


@pytest.fixture(scope="module")
def resnet(scenes):
    import torchvision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        m = torchvision.models.resnet18(num_classes=4)
    return _briefly_trained(m, torch.from_numpy(scenes.inputs), torch.from_numpy(scenes.labels), steps=10)


def _pgc_maps(model, layer_module, x, targets, cls):
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam = cls(model, [layer_module])
    try:
        return cam(torch.from_numpy(x), targets=[ClassifierOutputTarget(int(t)) for t in targets])
    finally:
        cam.activations_and_grads.release()


# Score-CAM on the ResNet's 256-channel layer3 is 256 forwards per sample in each library: left
# to the scene CNN (32 channels) to keep the test fast.
@pytest.mark.parametrize("which,layer,methods", [("scene_cnn", "act4", CAMS), ("resnet", "layer3", CAMS[:3])])
def test_cams_equal_pytorch_grad_cam(which, layer, methods, request, scenes):
    pgc = pytest.importorskip("pytorch_grad_cam")
    model = request.getfixturevalue(which)
    x, y = (scenes.inputs, scenes.labels) if which == "scene_cnn" else (scenes.inputs[:6], scenes.labels[:6])
    ours = attribution_maps(model, x, layer, methods=methods, target="true", labels=y,
                            normalise="minmax", batch_size=5)
    classes = {"gradcam": pgc.GradCAM, "gradcam++": pgc.GradCAMPlusPlus, "layercam": pgc.LayerCAM,
               "scorecam": pgc.ScoreCAM}
    module = dict(model.named_modules())[layer]
    for name in methods:
        ref = _pgc_maps(model, module, x, y, classes[name])
        got = ours.maps.sel({"method": name}).values
        assert (ref.reshape(len(ref), -1).max(1) > 0.5).sum() >= len(x) // 2, name   # non-degenerate maps
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0, err_msg=name)


def test_eigencam_equals_pytorch_grad_cam_projection_up_to_its_sign(scene_cnn, scenes):
    pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

    acts = []
    h = scene_cnn.act4.register_forward_hook(lambda _m, _i, o: acts.append(o.detach().numpy()))
    with torch.no_grad():
        scene_cnn(torch.from_numpy(scenes.inputs))
    h.remove()
    theirs = get_2d_projection(acts[0])          # SVD sign left to LAPACK; ours fixes it
    ours = eigencam(acts[0])
    for o, t in zip(ours, theirs):
        sign = np.sign((o * t).sum()) or 1.0
        np.testing.assert_allclose(o, sign * t, atol=1e-4)


def _bilinear(m: np.ndarray, size) -> np.ndarray:
    """Half-pixel bilinear resize of (h, w) with edge clamping (OpenCV INTER_LINEAR), in NumPy."""
    h, w = m.shape
    H, W = size

    def axis(n_in, n_out):
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, src - lo

    y0, y1, fy = axis(h, H)
    x0, x1, fx = axis(w, W)
    top = m[y0][:, x0] * (1 - fx) + m[y0][:, x1] * fx
    bot = m[y1][:, x0] * (1 - fx) + m[y1][:, x1] * fx
    return top * (1 - fy[:, None]) + bot * fy[:, None]


def test_maps_equal_a_hand_written_per_sample_computation(scene_cnn, scenes):
    """Every gradient method, one sample at a time, in NumPy from the layer's activation and gradient."""
    ours = attribution_maps(scene_cnn, scenes.inputs, "act4", methods=["gradcam", "gradcam++", "layercam",
                            "grad_x_input"], target="predicted", normalise="none", batch_size=4)
    for i in range(len(scenes)):
        x = torch.from_numpy(scenes.inputs[i:i + 1]).requires_grad_(True)
        kept = []
        h = scene_cnn.act4.register_forward_hook(lambda _m, _i, o: kept.append(o))
        logits = scene_cnn(x)
        h.remove()
        c = int(logits.argmax())
        assert ours.target.values[i] == c
        g_a, g_x = torch.autograd.grad(logits[0, c], [kept[0], x])
        A, G = kept[0][0].detach().numpy().astype(np.float64), g_a[0].numpy().astype(np.float64)
        gradcam = np.maximum(np.tensordot(G.mean((1, 2)), A, 1), 0)
        alpha = np.where(G != 0, G**2 / (2 * G**2 + A.sum((1, 2))[:, None, None] * G**3 + 1e-6), 0)
        gpp = np.maximum(np.tensordot((alpha * np.maximum(G, 0)).sum((1, 2)), A, 1), 0)
        layercam = np.maximum((np.maximum(G, 0) * A).sum(0), 0)
        for name, ref in [("gradcam", gradcam), ("gradcam++", gpp), ("layercam", layercam)]:
            np.testing.assert_allclose(ours.maps.sel({"method": name}).values[i], _bilinear(ref, (32, 32)),
                                       atol=1e-5, rtol=1e-4, err_msg=name)
        gxi = (scenes.inputs[i] * g_x[0].numpy()).sum(0)
        np.testing.assert_allclose(ours.maps.sel({"method": "grad_x_input"}).values[i], gxi, atol=1e-6, rtol=1e-5)


def test_batch_size_does_not_change_the_maps(scene_cnn, scenes):
    a = attribution_maps(scene_cnn, scenes.inputs[:6], "act4", batch_size=1, ig_steps=8)
    b = attribution_maps(scene_cnn, scenes.inputs[:6], "act4", batch_size=4, ig_steps=8)
    np.testing.assert_allclose(a.maps.values, b.maps.values, atol=2e-5)
    assert list(a.method.values) == list(DEFAULT_METHODS)   # the opt-in methods are not computed unasked


def test_one_backward_per_batch_for_the_gradient_methods(scene_cnn, scenes):
    calls = []
    h = scene_cnn.conv1.register_full_backward_hook(lambda *_: calls.append(1))
    try:
        attribution_maps(scene_cnn, scenes.inputs, "act4", methods=["gradcam", "gradcam++", "layercam",
                         "grad_x_input"], batch_size=5)
    finally:
        h.remove()
    assert len(calls) == 3   # 12 samples in batches of 5


def _smooth_cnn():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Softplus(), nn.AvgPool2d(2),
                             nn.Conv2d(8, 8, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(8, 4)).eval()


def _score(model, x, t):
    with torch.no_grad():
        return model(torch.as_tensor(x)).gather(1, torch.as_tensor(t)[:, None])[:, 0].numpy().astype(np.float64)


def test_integrated_gradients_completeness(scenes, scene_cnn):
    """On a smooth model the default 64 midpoint steps sum to s(x) − s(0) within 1e-3; on the ReLU
    scene CNN (a piecewise-linear path integrand) the gap shrinks as the steps grow."""
    model = _smooth_cnn()
    with torch.no_grad():   # scale the head so the score differences are O(1), not tiny
        model[-1].weight.mul_(20)
    r = attribution_maps(model, scenes.inputs, None, methods=["integrated_gradients"], normalise="none")
    t = r.target.values
    total = r.maps.values[:, 0].astype(np.float64).sum((1, 2))
    delta = _score(model, scenes.inputs, t) - _score(model, np.zeros_like(scenes.inputs), t)
    assert np.abs(delta).mean() > 0.1
    np.testing.assert_allclose(total, delta, atol=1e-3, rtol=0)
    gaps = []
    for steps in (4, 64):
        r = attribution_maps(scene_cnn, scenes.inputs, None, methods=["integrated_gradients"], normalise="none",
                             ig_steps=steps)
        t = r.target.values
        d = _score(scene_cnn, scenes.inputs, t) - _score(scene_cnn, np.zeros_like(scenes.inputs), t)
        gaps.append(np.abs(r.maps.values[:, 0].sum((1, 2)) - d).mean())
    assert gaps[1] < gaps[0]


def test_integrated_gradients_baseline_is_used(scenes):
    model = _smooth_cnn()
    r = attribution_maps(model, scenes.inputs, None, methods=["integrated_gradients"], normalise="none",
                         ig_baseline=0.5)
    t = r.target.values
    delta = _score(model, scenes.inputs, t) - _score(model, np.full_like(scenes.inputs, 0.5), t)
    np.testing.assert_allclose(r.maps.values[:, 0].astype(np.float64).sum((1, 2)), delta, atol=1e-3)
    assert r.attrs["ig_baseline"] == 0.5 and r.attrs["ig_steps"] == 64


def test_targets(scene_cnn, scenes):
    pred = attribution_maps(scene_cnn, scenes.inputs, "act4", methods=["gradcam"])
    np.testing.assert_array_equal(pred.target.values, pred.logits.values.argmax(1))
    true = attribution_maps(scene_cnn, scenes.inputs, "act4", methods=["gradcam"], target="true",
                            labels=scenes.labels)
    np.testing.assert_array_equal(true.target.values, scenes.labels)
    fixed = attribution_maps(scene_cnn, scenes.inputs, "act4", methods=["gradcam"], target=2)
    assert (fixed.target.values == 2).all()
    # the target changes the gradient maps (class 2 vs the predicted class, where they differ)
    differ = pred.target.values != 2
    assert differ.any()
    assert not np.allclose(fixed.maps.values[differ], pred.maps.values[differ])


def test_normalisation_conventions(scene_cnn, scenes):
    kw = dict(methods=["gradcam", "layercam", "grad_x_input"], target="true", labels=scenes.labels)
    raw = attribution_maps(scene_cnn, scenes.inputs, "act4", normalise="none", **kw).maps.values
    mx = attribution_maps(scene_cnn, scenes.inputs, "act4", normalise="max", **kw).maps.values
    top = np.abs(raw).reshape(*raw.shape[:2], -1).max(-1)
    np.testing.assert_allclose(mx * np.where(top > 0, top, 1)[..., None, None], raw, rtol=1e-5, atol=1e-7)
    assert (raw[:, :2] >= 0).all()                         # CAMs are ReLU'd, pixel maps are signed
    assert (raw[:, 2] < 0).any()
    mm = attribution_maps(scene_cnn, scenes.inputs, "act4", normalise="minmax", **kw).maps.values
    assert mm.min() >= 0 and mm.max() <= 1


@pytest.mark.parametrize("kwargs,match", [
    ({"layer": "embed"}, "spatial layer"),
    ({"layer": "nope"}, "Valid layers"),
    ({"target": 4}, "out of range.*4 outputs"),
    ({"target": "true"}, "needs the samples' labels"),
    ({"target": "best"}, "Unknown attribution target"),
    ({"methods": ["gradcam", "xgradcam"]}, "Unknown attribution method"),
    ({"normalise": "l2"}, "Unknown normalise"),
    ({"ig_steps": 0}, "positive integer"),
    ({"methods": ["smoothgradcam++"], "smooth_samples": 0}, "smooth_samples=0.*positive integer"),
    ({"methods": ["smoothgradcam++"], "smooth_sigma": -0.1}, "smooth_sigma=-0.1.*≥ 0"),
    ({"methods": ["smoothgradcam++"], "smooth_sigma": float("nan")}, "smooth_sigma=nan.*finite"),
    ({"layer": None}, "need a layer"),
])
def test_bad_input_is_named(kwargs, match, scene_cnn, scenes):
    args = {"layer": "act4", "methods": ["gradcam", "integrated_gradients"], **kwargs}
    with pytest.raises(ZooauditError, match=match):
        attribution_maps(scene_cnn, scenes.inputs[:2], args.pop("layer"), **args)


def test_a_model_that_does_not_output_class_scores_is_refused(scenes):
    encoder = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())   # (b, c, y, x) output, no class scores
    with pytest.raises(ZooauditError, match="class scores"):
        attribution_maps(encoder, scenes.inputs[:2], "1", methods=["gradcam"])


def test_cascading_randomisation_changes_the_gradient_maps_and_not_the_model(scene_cnn, scenes):
    from zooaudit.sanity_checks import cascade_layers, randomisation_maps
    from zooaudit.zoo import weights_hash

    before = weights_hash(scene_cnn.state_dict())
    layers = cascade_layers(scene_cnn)
    assert layers[0] == "head" and layers[-1] == "conv1"       # top first
    targets = attribution_maps(scene_cnn, scenes.inputs[:6], "act4", methods=["gradcam"]).target.values
    out = randomisation_maps(scene_cnn, scenes.inputs[:6], "act4", methods=["gradcam", "grad_x_input"],
                             targets=targets, batch_size=6)
    assert out["spearman"].dims == ("step", "method") and list(out["step"].values) == ["none", *layers]
    np.testing.assert_allclose(out["spearman"].isel(step=0), 1.0)
    # the maps follow the weights they explain (NaN: every randomised map constant, nothing left)
    assert not (out["spearman"].isel(step=-1) >= 0.9).any()
    assert (out["spearman"].isel(step=1) < 1.0).all()
    assert weights_hash(scene_cnn.state_dict()) == before      # randomised a copy
    again = randomisation_maps(scene_cnn, scenes.inputs[:6], "act4", methods=["gradcam", "grad_x_input"],
                               targets=targets, batch_size=6)
    np.testing.assert_array_equal(again["spearman"].values, out["spearman"].values)   # seeded
    np.testing.assert_array_equal(again["ssim"].values, out["ssim"].values)
    # SSIM beside the rank correlation: 1 for the trained model, lower once the model is random
    assert out["ssim"].dims == ("step", "method") and out.attrs["ssim_window"] == 11
    np.testing.assert_allclose(out[["ssim", "ssim_abs"]].isel(step=0).to_array(), 1.0)
    assert not (out["ssim"].isel(step=-1) >= 0.9).any()
    assert float(out["ssim"].sel({"method": "gradcam"}).min()) < 0.5


def test_a_method_whose_maps_do_not_change_is_flagged_by_both_statistics(scene_cnn, scenes):
    """Randomising only the head leaves the gradient-free Eigen-CAM of the layer below exactly as
    it was (Spearman and SSIM 1: flagged by both), while Grad-CAM's maps follow the head."""
    from zooaudit.sanity_checks import randomisation_maps
    from zooaudit.stages.attribution import sanity_flags

    targets = attribution_maps(scene_cnn, scenes.inputs[:6], "act4", methods=["gradcam"]).target.values
    out = randomisation_maps(scene_cnn, scenes.inputs[:6], "act4", methods=["gradcam", "eigencam"], targets=targets,
                             batch_size=6, max_steps=1)
    assert list(out["step"].values) == ["none", "head"]
    np.testing.assert_allclose(out[["spearman", "ssim"]].sel({"method": "eigencam"}).isel(step=1).to_array(), 1.0,
                               atol=1e-6)
    assert float(out["ssim"].sel({"method": "gradcam"}).isel(step=1)) < 1.0 - 1e-3
    flagged = sanity_flags(out, 0.5, 0.5)
    assert "eigencam" in flagged.attrs["flagged"]
    assert bool(flagged["flag_spearman"].sel({"method": "eigencam"}))
    assert bool(flagged["flag_ssim"].sel({"method": "eigencam"}))
    # the two statistics flag independently: a threshold only SSIM passes
    only_ssim = sanity_flags(out, 1.0, -1.0)
    assert set(only_ssim.attrs["flagged"]) == {"gradcam", "eigencam"} and not only_ssim["flag_spearman"].sel(
        {"method": "gradcam"})


# Smooth Grad-CAM++ on act3: on act4 (then global average pooling and a linear head) the layer
# gradient does not depend on the input, and Smooth Grad-CAM++ is Grad-CAM++ there.
SMOOTH = dict(methods=["gradcam++", "smoothgradcam++"], normalise="none")


def test_smooth_gradcampp_without_noise_is_gradcampp(scene_cnn, scenes):
    one = attribution_maps(scene_cnn, scenes.inputs, "act3", smooth_samples=1, smooth_sigma=0.0, batch_size=5,
                           **SMOOTH).maps.values
    np.testing.assert_array_equal(one[:, 1], one[:, 0])            # one noiseless copy: the same arithmetic
    eight = attribution_maps(scene_cnn, scenes.inputs, "act3", smooth_samples=8, smooth_sigma=0.0, batch_size=5,
                             **SMOOTH).maps.values
    assert one[:, 0].max() > 0
    np.testing.assert_allclose(eight[:, 1], eight[:, 0], rtol=1e-5, atol=1e-7 * one[:, 0].max())   # mean of 8 equal
    noisy = attribution_maps(scene_cnn, scenes.inputs, "act3", smooth_sigma=0.15, **SMOOTH).maps.values
    assert np.abs(noisy[:, 1] - noisy[:, 0]).max() > 0.05 * noisy[:, 0].max()   # the noise does change the maps


def test_smooth_gradcampp_equals_a_hand_loop(scene_cnn, scenes):
    """Per sample and per noise draw, plain autograd on one noisy copy; the 1st/2nd/3rd-order terms
    averaged in float64, Grad-CAM++'s α on the clean activations, σ a fraction of the input range."""
    from zooaudit.attribution_maps import smoothing_noise

    samples, sigma, seed = 5, 0.2, 3
    ours = attribution_maps(scene_cnn, scenes.inputs, "act3", methods=["smoothgradcam++"], normalise="none",
                            smooth_samples=samples, smooth_sigma=sigma, random_state=seed, batch_size=5)
    assert ours.attrs["smooth_samples"] == samples and ours.attrs["smooth_sigma"] == sigma

    def layer_and_logits(x):
        kept = []
        h = scene_cnn.act3.register_forward_hook(lambda _m, _i, o: kept.append(o))
        logits = scene_cnn(x)
        h.remove()
        return kept[0], logits

    for i in range(len(scenes)):
        x = torch.from_numpy(scenes.inputs[i:i + 1])
        a, logits = layer_and_logits(x)
        c = int(logits.argmax())
        assert ours.target.values[i] == c
        A = a[0].detach().numpy().astype(np.float64)
        std = sigma * float(x.max() - x.min())
        d = [np.zeros_like(A) for _ in range(3)]
        for n in range(samples):
            z = (x + std * smoothing_noise(x.shape[1:], i, n, seed)[None]).requires_grad_(True)
            a_n, logits_n = layer_and_logits(z)
            (g,) = torch.autograd.grad(logits_n[0, c], a_n)
            G = g[0].numpy().astype(np.float64)
            for p in range(3):
                d[p] += G ** (p + 1) / samples
        alpha = np.where(d[1] != 0, d[1] / (2 * d[1] + A.sum((1, 2))[:, None, None] * d[2] + 1e-6), 0)
        ref = np.maximum(np.tensordot((alpha * np.maximum(d[0], 0)).sum((1, 2)), A, 1), 0)
        np.testing.assert_allclose(ours.maps.values[i, 0], _bilinear(ref, (32, 32)), atol=1e-5, rtol=1e-4)
    # the seed is used, and the draws do not depend on the batching
    other = attribution_maps(scene_cnn, scenes.inputs, "act3", methods=["smoothgradcam++"], normalise="none",
                             smooth_samples=samples, smooth_sigma=sigma, random_state=seed + 1, batch_size=5)
    assert not np.allclose(other.maps.values, ours.maps.values)
    rebatched = attribution_maps(scene_cnn, scenes.inputs, "act3", methods=["smoothgradcam++"], normalise="none",
                                 smooth_samples=samples, smooth_sigma=sigma, random_state=seed, batch_size=12)
    np.testing.assert_allclose(rebatched.maps.values, ours.maps.values, atol=1e-6, rtol=1e-5)


def test_smooth_gradcampp_is_one_forward_and_backward_per_batch_and_noise_draw(scene_cnn, scenes):
    forwards, backwards = [], []
    hf = scene_cnn.register_forward_hook(lambda *_: forwards.append(1))
    hb = scene_cnn.head.register_full_backward_hook(lambda *_: backwards.append(1))
    try:
        attribution_maps(scene_cnn, scenes.inputs, "act3", methods=["smoothgradcam++"], smooth_samples=3,
                         batch_size=5)
    finally:
        hf.remove()
        hb.remove()
    assert len(forwards) == 3 * (1 + 3) and len(backwards) == 3 * 3   # 12 samples in 3 batches; 1 clean forward each


@pytest.mark.parametrize("field,value", [("smooth_sigma", -0.1), ("smooth_samples", 0), ("smooth_sigma", 1.5)])
def test_spec_refuses_bad_smoothing(field, value):
    from pydantic import ValidationError

    from zooaudit.specs import AttributionSpec

    with pytest.raises(ValidationError, match=rf"(?s){field}.*(greater|less) than or equal to"):
        AttributionSpec(methods=["smoothgradcam++"], **{field: value})
