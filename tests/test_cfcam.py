"""CF-CAM (zooaudit.attribution_maps, method ``cfcam``): equal to a per-image NumPy / scikit-learn
re-computation of the authors' script (jerryp-hfut/CF-CAM ``cfcam.py``), its conventions on
constructed maps (important channels, noise channels dropped, the all-important case), batch
independence and one backward per batch."""

import numpy as np
import pytest
import torch
from sklearn.cluster import DBSCAN
# the same 12 scenes and briefly trained scene CNN as the other map tests (module-scoped fixtures)
from test_attribution_maps import _bilinear, scene_cnn, scenes  # noqa: F401
from torch import nn

from zooaudit.attribution_maps import DEFAULT_METHODS, attribution_maps, cfcam, cfcam_channels


def _reference_labels(A: np.ndarray) -> np.ndarray:
    """The script's hierarchical clustering of one ``(c, h, w)`` float32 map: −2 important, −1 noise."""
    rows = A.reshape(len(A), -1)
    norms = np.linalg.norm(rows, axis=1)
    important = norms >= np.percentile(norms, 75)
    labels = np.full(len(A), -2)
    rest = np.where(~important)[0]
    if len(rest) > 1:
        r = rows[rest]
        d = np.linalg.norm(r[:, None] - r[None, :], axis=2)
        eps = max(np.percentile(d[~np.eye(len(r), dtype=bool)], 25), 1e-5)
        # zooaudit's one convention beyond the script: DBSCAN on these distances (the script lets
        # it recompute them, so the pair whose distance is eps may fall either side by rounding)
        labels[rest] = DBSCAN(eps=eps, min_samples=max(2, int(len(rest) * 0.05)), metric="precomputed").fit(d).labels_
    elif len(rest) == 1:
        labels[rest] = -1
    return labels


def _reference_filter(g: np.ndarray) -> np.ndarray:
    """The script's filter of one ``(h, w)`` gradient: one kernel the map's size, correlated with zero padding."""
    h, w = g.shape
    y, x = np.meshgrid(np.arange(h) - h / 2, np.arange(w) - w / 2, indexing="ij")
    k = np.exp(-(y**2 + x**2) / (2 * 5.0**2)) * np.exp(-((g - g.mean()) ** 2) / (2 * 0.1**2))
    k = k / (k.sum() + 1e-6)
    top, left = (h - 1) // 2, (w - 1) // 2
    padded = np.zeros((2 * h - 1, 2 * w - 1))
    padded[top:top + h, left:left + w] = g
    return np.array([[(padded[i:i + h, j:j + w] * k).sum() for j in range(w)] for i in range(h)])


def _reference_cfcam(A: np.ndarray, G: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One sample's CF-CAM at the layer's resolution (ReLU'd, not normalised), and its labels."""
    labels = _reference_labels(A)
    weights = {}
    for c in np.where(labels == -2)[0]:
        weights[c] = G[c].astype(np.float64).mean()
    for k in sorted(set(labels[labels >= 0])):
        members = np.where(labels == k)[0]
        filtered = _reference_filter(G[members].astype(np.float64).mean(0))
        for c in members:
            weights[c] = filtered.mean()
    kept = sorted(weights)
    w = np.array([weights[c] for c in kept])
    w = np.exp(w - w.max()) / np.exp(w - w.max()).sum()
    return np.maximum(np.tensordot(w, A[kept].astype(np.float64), 1), 0), labels


@pytest.mark.parametrize("layer", ["act3", "act4"])
def test_cfcam_equals_a_per_image_recomputation_of_the_reference(scene_cnn, scenes, layer):
    """One image at a time, as the script does: forward, backward of the predicted logit, the
    clustering, filtering and softmax weighting in NumPy, bilinear upsampling, divided by the max."""
    ours = attribution_maps(scene_cnn, scenes.inputs, layer, methods=["cfcam"], batch_size=5)
    module = dict(scene_cnn.named_modules())[layer]
    n_clusters, n_noise = 0, 0
    for i in range(len(scenes)):
        kept = []
        h = module.register_forward_hook(lambda _m, _i, o: kept.append(o))
        logits = scene_cnn(torch.from_numpy(scenes.inputs[i:i + 1]))
        h.remove()
        (g,) = torch.autograd.grad(logits[0, int(logits.argmax())], kept[0])
        ref, labels = _reference_cfcam(kept[0][0].detach().numpy(), g[0].numpy())
        n_clusters += len(set(labels[labels >= 0]))
        n_noise += int((labels == -1).sum())
        up = _bilinear(ref, (32, 32))
        up = up / up.max() if up.max() > 0 else up
        np.testing.assert_allclose(ours.maps.values[i, 0], up, atol=1e-5, err_msg=f"sample {i}")
    assert n_clusters > 0 and n_noise > 0      # both the cluster and the noise paths were taken


def _constructed(seed=0):
    """A ``(1, 8, 5, 5)`` map: channels 0–1 of large norm (important), 2–6 near copies of one
    pattern (one DBSCAN cluster), channel 7 far from them (noise), and a spatially varying gradient."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.5, 1.0, (5, 5))
    a = np.stack([10 + rng.uniform(0, 1, (5, 5)), 12 + rng.uniform(0, 1, (5, 5)),
                  *[base + 1e-3 * rng.standard_normal((5, 5)) for _ in range(5)], 3 * rng.uniform(0, 1, (5, 5))])
    g = 0.1 * rng.standard_normal((8, 5, 5))
    return torch.tensor(a[None], dtype=torch.float32), torch.tensor(g[None], dtype=torch.float32)


def test_cfcam_channel_roles_on_a_constructed_map():
    a, g = _constructed()
    labels = cfcam_channels(a[0].numpy())
    assert list(labels) == [-2, -2, 0, 0, 0, 0, 0, -1]
    cam = cfcam(a, g)
    # the noise channel is dropped: neither its activation nor its gradient moves the map
    a2, g2 = a.clone(), g.clone()
    a2[0, 7] *= 1.1
    g2[0, 7] += 5.0
    assert list(cfcam_channels(a2[0].numpy())) == list(labels)
    torch.testing.assert_close(cfcam(a2, g2), cam)
    # the cluster's channels share one weight (its filtered mean gradient's mean), the important
    # channels keep mean_hw(g_c): the pre-ReLU map is the softmax of those over the 7 kept channels
    wc = _reference_filter(g[0, 2:7].double().mean(0).numpy()).mean()
    w = torch.softmax(torch.tensor([g[0, 0].double().mean(), g[0, 1].double().mean(), *[wc] * 5]), 0)
    torch.testing.assert_close(cfcam(a, g)[0], (w[:, None, None] * a[0, :7].double()).sum(0).float())


def test_cfcam_with_every_channel_important_is_softmax_weighted_gradcam():
    """No setting makes CF-CAM Grad-CAM (its weights are softmaxed); the degenerate case of equal
    channel norms (every channel ≥ the 75th percentile: no clustering, no filtering) gives
    ReLU(Σ_c softmax_c(mean_hw g_c) A_c) — Grad-CAM's weights through a softmax."""
    rng = np.random.default_rng(1)
    pattern = rng.uniform(0, 1, 16)
    a = np.stack([rng.permutation(pattern) for _ in range(6)]).reshape(1, 6, 4, 4)   # equal norms
    a = torch.tensor(a, dtype=torch.float32)
    g = torch.tensor(rng.standard_normal((1, 6, 4, 4)), dtype=torch.float32)
    assert (cfcam_channels(a[0].numpy()) == -2).all()
    expected = (torch.softmax(g.mean((2, 3)), 1)[..., None, None] * a).sum(1)
    torch.testing.assert_close(cfcam(a, g), expected)
    gradcam = (g.mean((2, 3), keepdim=True) * a).sum(1)
    assert not torch.allclose(cfcam(a, g).clamp_min(0), gradcam.clamp_min(0))


def test_cfcam_of_a_sample_does_not_depend_on_its_batch(scene_cnn, scenes):
    x = scenes.inputs[:8]
    alone = np.concatenate([attribution_maps(scene_cnn, x[i:i + 1], "act3", methods=["cfcam"]).maps.values
                            for i in range(len(x))])
    order = np.array([5, 2, 7, 0, 3, 6, 1, 4])
    together = attribution_maps(scene_cnn, x[order], "act3", methods=["cfcam"], batch_size=8).maps.values
    np.testing.assert_allclose(together, alone[order], atol=1e-5)


def test_cfcam_is_opt_in_and_shares_the_batch_backward(scene_cnn, scenes):
    assert "cfcam" not in DEFAULT_METHODS
    calls = []
    h = scene_cnn.conv4.register_full_backward_hook(lambda *_: calls.append(1))   # on the way to act3
    try:
        out = attribution_maps(scene_cnn, scenes.inputs, "act3", methods=["gradcam", "cfcam"], batch_size=5)
    finally:
        h.remove()
    assert len(calls) == 3   # 12 samples in batches of 5: one backward each, both methods
    assert list(out.method.values) == ["gradcam", "cfcam"]
    assert not np.allclose(out.maps.values[:, 0], out.maps.values[:, 1])


def test_cfcam_on_a_layer_without_space_is_refused():
    from zooaudit.errors import ZooauditError

    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    with pytest.raises(ZooauditError, match="spatial layer"):
        attribution_maps(model, np.zeros((2, 3, 2, 2), np.float32), "1", methods=["cfcam"])
