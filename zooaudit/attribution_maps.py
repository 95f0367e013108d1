"""Model-side attribution maps: the CAM family and two pixel-space baselines, batched.

This module runs the model (forward hooks, autograd), so it lives on the model side beside
:mod:`zooaudit.extract` and :mod:`zooaudit.gradients`; the metrics on the stored maps are
:mod:`zooaudit.analysis.attribution`, the model-running faithfulness curves
:mod:`zooaudit.faithfulness`.

Methods (``A`` the layer's output ``(c, h, w)`` for one sample, ``g = ∂ s / ∂ A`` the gradient
of the target score ``s`` — the target class's logit, before any softmax):

- ``gradcam`` (Selvaraju et al. 2017): ``ReLU(Σ_c mean_hw(g_c) A_c)``;
- ``gradcam++`` (Chattopadhay et al. 2018, eq. 19 with the exponential-score closed form, as
  pytorch-grad-cam): ``α = g² / (2 g² + Σ_hw A · g³ + 1e-6)`` (0 where ``g = 0``), channel
  weights ``Σ_hw α ReLU(g)``, map ``ReLU(Σ_c w_c A_c)``;
- ``smoothgradcam++`` (Omeiza et al. 2019; opt-in, not in :data:`DEFAULT_METHODS`): Grad-CAM++
  with its derivative terms averaged over ``smooth_samples`` noisy copies ``x + ε``,
  ``ε ~ N(0, σ²)`` per pixel and channel, ``σ = smooth_sigma · (max x − min x)`` — a fraction of
  each sample's own input range (SmoothGrad's "noise level", Smilkov et al. 2017; default 0.15).
  ``D¹ = mean_n g_n``, ``D² = mean_n g_n²``, ``D³ = mean_n g_n³`` (``g_n`` the layer gradient of
  the target logit on copy ``n``, the exponential-score closed form as for ``gradcam++``), then
  ``α = D² / (2 D² + Σ_hw A · D³ + 1e-6)`` (0 where ``D² = 0``), weights ``Σ_hw α ReLU(D¹)``
  and the map ``ReLU(Σ_c w_c A_c)`` of the **clean** input's activations ``A`` (as torch-cam's
  ``SmoothGradCAMpp``, which keeps the clean feature map). The paper's eq. for ``α`` has ``D¹`` in
  the numerator; ``D²`` is used, as torch-cam does ("personal correction"), so that ``σ = 0``
  gives Grad-CAM++ itself. The target is the clean input's, kept for every copy. The draws of a
  sample depend only on ``(random_state, its position in inputs, n)`` (not on the batching);
  each noise draw ``n`` is one forward and one backward of the whole batch. On a layer followed
  only by global average pooling and a linear head the gradient does not depend on the input:
  there Smooth Grad-CAM++ is Grad-CAM++ (up to rounding);
- ``layercam`` (Jiang et al. 2021): ``ReLU(Σ_c ReLU(g_c) ⊙ A_c)``;
- ``cfcam`` (CF-CAM, Cluster Filter CAM, 2025; as its authors' script jerryp-hfut/CF-CAM
  ``cfcam.py``; opt-in, not in :data:`DEFAULT_METHODS`): per sample, on the ``(c, h·w)`` rows of
  ``A`` — (1) the channels whose L2 norm is ≥ the 75th percentile of the channel norms (numpy's
  linear interpolation) are "important": they keep their raw gradient and weight
  ``mean_hw(g_c)``; (2) the other channels are clustered by DBSCAN (sklearn, euclidean) on those
  same rows, ``eps`` = the 25th percentile of their pairwise distances (each ordered pair ``i ≠ j``
  counted, as the reference's full distance matrix off its diagonal), at least ``1e-5``;
  ``min_samples = max(2, ⌊0.05 · n_rest⌋)``, DBSCAN given that same distance matrix
  (``metric="precomputed"``; the script lets sklearn recompute the distances, and since every
  distance is listed twice the percentile is often one of them exactly, so that pair fell either
  side of ``eps`` by rounding — 3 of 24 scene-CNN maps clustered differently; here it is a
  neighbour, ``d ≤ eps``, in any batch); DBSCAN's noise channels get no weight (dropped
  from the map); a lone remaining channel (no pair to measure) is noise; (3) each cluster's
  mean gradient ``ḡ (h, w)`` is filtered with one ``(h, w)`` kernel, the reference's
  "bilateral filter": ``K(i, j) ∝ exp(−((i − h/2)² + (j − w/2)²) / (2·5²)) ·
  exp(−(ḡ(i, j) − mean ḡ)² / (2·0.1²))``, normalised by ``Σ K + 1e-6``, applied as a
  cross-correlation with zero padding ``'same'`` (for an even side one row/column more after
  than before, as ``torch.nn.functional.conv2d``) — a fixed kernel per cluster, not OpenCV's
  per-pixel ``bilateralFilter``; every channel of the cluster gets the weight
  ``mean_hw(filtered ḡ)``; (4) the weights of the kept channels (important + clustered) are
  softmaxed over those channels, map ``ReLU(Σ_c w_c A_c)``. The softmax makes every weight
  positive, so there is no setting in which CF-CAM is Grad-CAM: with every channel important
  (all norms equal) it is ``ReLU(Σ_c softmax_c(mean_hw g_c) A_c)``. The reference's optional
  ``noise_level`` is not used (its default, None). One forward and backward per batch (shared
  with the gradient methods); clustering per sample on CPU, all clusters' filters of the batch
  in one grouped convolution. The script's finish (ReLU at the layer's resolution, bilinear
  ``align_corners=False`` upsampling, ÷ max) is ``normalise="max"``. (The repository's README
  describes an older variant, ``ver6.py``: a guided filter and plain GAP weights, no important
  channels, no softmax; ``cfcam.py`` is followed here);
- ``scorecam`` (Wang et al. 2020): each channel upsampled to the input (bilinear,
  ``align_corners=True``, as ``nn.UpsamplingBilinear2d``), min–max scaled to [0, 1] (``+1e-8``),
  multiplied into the input; the target logits of those masked inputs, softmaxed over
  channels, weight the channels: ``ReLU(Σ_c w_c A_c)``. All masked inputs of a batch are
  scored in forward batches of ``batch_size``;
- ``eigencam`` (Muhammad & Yeasin 2020): :func:`zooaudit.analysis.eigencam.eigencam` (first
  principal component of the centred ``(h·w, c)`` map, sign fixed so its loadings sum > 0),
  then ReLU. Gradient-free: it ignores the target;
- ``grad_x_input`` (Shrikumar et al. 2016): ``Σ_channels x ⊙ ∂s/∂x`` — signed, no ReLU;
- ``integrated_gradients`` (Sundararajan et al. 2017): ``Σ_channels (x − x₀) ⊙ mean_k
  ∂s/∂x (x₀ + α_k (x − x₀))`` with the midpoint rule ``α_k = (k + ½) / steps``; baseline
  ``x₀`` a constant image (``ig_baseline``, default 0 = black). Signed, no ReLU. Completeness:
  the map sums to ``s(x) − s(x₀)`` up to the quadrature error.

One forward and one backward per batch serve every gradient method (``gradcam``,
``gradcam++``, ``layercam``, ``grad_x_input``: the backward takes the layer's and the input's
gradients at once); Integrated Gradients backpropagates once per chunk of ``batch_size``
interpolated inputs. Targets: ``"predicted"`` (the argmax of the logits, default), ``"true"``
(the labels), or a class index.

Vision transformers (timm ViT / DeiT: a model with ``num_prefix_tokens`` and
``patch_embed.grid_size``): a ``(batch, token, channel)`` layer is read as its ``(batch, channel,
gy, gx)`` patch grid, the prefix tokens (CLS, DeiT's distillation token) dropped
(:mod:`zooaudit.patch_tokens`, pytorch-grad-cam's ``reshape_transform``), so the maps have the
grid's resolution before upsampling and explain the patches only; the attrs record
``prefix_tokens_excluded`` and ``token_grid``.

Maps are returned at the input's size ``(sample, method, y, x)``. CAM maps are computed at the
layer's resolution, ReLU'd, then upsampled bilinearly (``align_corners=False``, which equals
OpenCV's ``INTER_LINEAR`` used by pytorch-grad-cam). ``normalise``:

- ``"max"`` (default): each map divided by its largest absolute value (a zero map stays 0):
  rankings, signs and energy shares are unchanged, maps lie in [0, 1] (CAMs) or [−1, 1];
- ``"minmax"``: pytorch-grad-cam's convention for CAMs: min–max scale (``+1e-7``) at the
  layer's resolution, upsample, min–max scale again; pixel maps ``(a − min)/(max − min)``;
- ``"none"``: the raw values (Integrated Gradients' completeness holds on these).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr

from .analysis.attribution import CAM_METHODS, DEFAULT_METHODS, METHODS, PIXEL_METHODS
from .analysis.eigencam import eigencam
from .errors import ZooauditError
from .extract import _first_tensor
from .heap import return_freed_heap
from .patch_tokens import PatchTokenLayout, patch_token_layout

__all__ = ["CAM_METHODS", "DEFAULT_METHODS", "GRADIENT_METHODS", "METHODS", "NORMALISATIONS", "PIXEL_METHODS",
           "attribution_maps", "resolve_targets", "smoothing_noise"]

GRADIENT_METHODS = ("gradcam", "gradcam++", "layercam", "cfcam", "grad_x_input")  # served by the batch's one backward
NORMALISATIONS = ("max", "minmax", "none")
LAYER_GRADIENT_CAMS = ("gradcam", "gradcam++", "layercam", "cfcam")  # read the layer gradient of that backward


def resolve_targets(target, logits: torch.Tensor, labels) -> torch.Tensor:
    """``(b,)`` int64 target classes of a batch: ``"predicted"``, ``"true"`` (``labels``) or a class index."""
    n_classes = logits.shape[1]
    if isinstance(target, str) and target == "predicted":
        return logits.argmax(1)
    if isinstance(target, str) and target == "true":
        if labels is None:
            raise ZooauditError("target='true' needs the samples' labels.")
        t = torch.as_tensor(np.asarray(labels), dtype=torch.int64, device=logits.device)
    elif isinstance(target, (int, np.integer)) and not isinstance(target, bool):
        t = torch.full((logits.shape[0],), int(target), dtype=torch.int64, device=logits.device)
    else:
        raise ZooauditError(f"Unknown attribution target {target!r}. Allowed: 'predicted', 'true', or a class index "
                            f"in [0, {n_classes}).")
    if len(t) and (t.min() < 0 or t.max() >= n_classes):
        bad = int(t[(t < 0) | (t >= n_classes)][0])
        raise ZooauditError(f"Target class {bad} is out of range: the model has {n_classes} outputs "
                            f"(allowed: 0 … {n_classes - 1}).")
    return t


def class_scores(out) -> torch.Tensor:
    logits = _first_tensor(out)
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or not logits.is_floating_point():
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ZooauditError(f"Attribution maps need a classifier whose output is class scores (batch, n_classes); "
                            f"this model's output is {shape}. Wrap the model so it returns logits.")
    return logits


def _check(methods, normalise, ig_steps, smooth_samples=8, smooth_sigma=0.15, random_state=0) -> tuple[str, ...]:
    methods = tuple(methods)
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ZooauditError(f"Unknown attribution method(s) {bad or '(none given)'}. Allowed: {', '.join(METHODS)}.")
    if normalise not in NORMALISATIONS:
        raise ZooauditError(f"Unknown normalise {normalise!r}. Allowed: {', '.join(NORMALISATIONS)}.")
    if isinstance(ig_steps, bool) or not isinstance(ig_steps, int) or ig_steps < 1:
        raise ZooauditError(f"ig_steps={ig_steps!r}: Integrated Gradients needs a positive integer step count.")
    if "smoothgradcam++" in methods:
        if isinstance(smooth_samples, bool) or not isinstance(smooth_samples, (int, np.integer)) or smooth_samples < 1:
            raise ZooauditError(f"smooth_samples={smooth_samples!r}: Smooth Grad-CAM++ needs a positive integer "
                                "number of noisy copies.")
        if isinstance(smooth_sigma, bool) or not isinstance(smooth_sigma, (int, float)) or \
                not np.isfinite(smooth_sigma) or smooth_sigma < 0:
            raise ZooauditError(f"smooth_sigma={smooth_sigma!r}: the noise level must be a finite number ≥ 0 (a "
                                "fraction of each input's range; 0 = no noise).")
        if isinstance(random_state, bool) or not isinstance(random_state, (int, np.integer)) or random_state < 0:
            raise ZooauditError(f"random_state={random_state!r}: Smooth Grad-CAM++'s noise needs an integer seed "
                                "≥ 0.")
    return methods


def _minmax(m: torch.Tensor, eps: float) -> torch.Tensor:
    flat = m.flatten(1)
    lo, hi = flat.min(1).values, None
    flat = flat - lo[:, None]
    hi = flat.max(1).values
    return (flat / (hi[:, None] + eps)).view_as(m)


def _finish_cam(cam: torch.Tensor, size: tuple[int, int], normalise: str) -> torch.Tensor:
    """``(b, h, w)`` layer-resolution CAM → ReLU'd ``(b, H, W)`` at the input size, normalised."""
    cam = cam.clamp_min(0)
    if normalise == "minmax":
        cam = _minmax(cam, 1e-7)
    up = F.interpolate(cam[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    if normalise == "minmax":
        return _minmax(up.clamp_min(0), 1e-7)
    return _scale_max(up) if normalise == "max" else up


def _scale_max(m: torch.Tensor) -> torch.Tensor:
    top = m.flatten(1).abs().max(1).values
    return m / torch.where(top > 0, top, torch.ones_like(top))[:, None, None]


def _finish_pixel(a: torch.Tensor, normalise: str) -> torch.Tensor:
    if normalise == "minmax":
        return _minmax(a, 1e-7)
    return _scale_max(a) if normalise == "max" else a


class _Hook:
    """Keeps the layer's output of the last forward (graph attached).

    With a patch-token ``layout`` (a vision transformer), a ``(batch, token, channel)`` output is
    kept as its ``(batch, channel, gy, gx)`` patch grid, prefix tokens dropped, and the layer's
    output is replaced by the same values rebuilt from that grid, so the grid is in the autograd
    graph and every CAM's gradient with respect to it is the patch tokens' gradient."""

    def __init__(self, module: torch.nn.Module, layout: PatchTokenLayout | None = None, name: str = ""):
        self.out = None
        self.layout, self.name, self.reshaped = layout, name, False
        self.handle = module.register_forward_hook(self._keep)

    def _keep(self, _m, _i, out):
        self.out = _first_tensor(out)
        if self.layout is None or not isinstance(out, torch.Tensor) or out.ndim != 3:
            return None
        self.out = self.layout.to_grid(out, self.name)
        self.reshaped = True
        return self.layout.to_tokens(out, self.out)


def _layer(module: torch.nn.Module, layer: str) -> torch.nn.Module:
    modules = dict(module.named_modules())
    if layer not in modules:
        raise ZooauditError(f"Layer {layer!r} is not in the model. Valid layers: {', '.join(n for n in modules if n)}.")
    return modules[layer]


def _spatial(a: torch.Tensor, layer: str) -> None:
    if a is None or a.ndim != 4:
        shape = None if a is None else tuple(a.shape)
        raise ZooauditError(f"CAM methods need a spatial layer whose output is (batch, channel, y, x) (or, on a "
                            f"vision transformer with num_prefix_tokens and patch_embed.grid_size, (batch, token, "
                            f"channel) patch tokens); layer {layer!r} gives {shape}. Choose a convolutional layer "
                            "(e.g. the last conv block's activation), "
                            "or use only the pixel methods (grad_x_input, integrated_gradients).")


def _gradcampp(a: torch.Tensor, d1: torch.Tensor, d2: torch.Tensor, d3: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ ``(b, h, w)`` before its ReLU from ``A`` and the 1st/2nd/3rd-order terms
    ``(b, c, h, w)`` (``g, g², g³``; their noise averages for Smooth Grad-CAM++); α = 0 where ``D² = 0``."""
    alpha = d2 / (2 * d2 + a.sum((2, 3), keepdim=True) * d3 + 1e-6)
    alpha = torch.where(d2 != 0, alpha, torch.zeros_like(alpha))
    w = (alpha * d1.clamp_min(0)).sum((2, 3), keepdim=True)
    return (w * a).sum(1)


def _gradient_cams(a: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """Grad-CAM, Grad-CAM++ and Layer-CAM ``(b, h, w)`` before their final ReLU, from ``A`` and ``g``."""
    g2 = g * g
    return {"gradcam": (g.mean((2, 3), keepdim=True) * a).sum(1), "gradcam++": _gradcampp(a, g, g2, g2 * g),
            "layercam": (g.clamp_min(0) * a).sum(1)}


def _cfcam_distances(rows: np.ndarray) -> tuple[np.ndarray, float]:
    """``(m, m)`` euclidean distances of ``rows`` ``(m, h·w)`` and CF-CAM's DBSCAN radius from them:
    the 25th percentile off the diagonal (both orders of each pair), at least 1e-5."""
    d = np.linalg.norm(rows[:, None] - rows[None, :], axis=2)
    return d, max(float(np.percentile(d[~np.eye(len(rows), dtype=bool)], 25)), 1e-5)


def cfcam_channels(fmap: np.ndarray) -> np.ndarray:
    """CF-CAM's channel labels ``(c,)`` for one sample's ``(c, h, w)`` map: −2 important (norm ≥ the
    75th percentile), −1 DBSCAN noise (dropped), ``k ≥ 0`` the cluster of the other channels."""
    from sklearn.cluster import DBSCAN

    rows = fmap.reshape(len(fmap), -1)
    norms = np.linalg.norm(rows, ord=2, axis=1)
    important = norms >= np.percentile(norms, 75)
    labels = np.full(len(rows), -2, dtype=np.int64)
    rest = np.flatnonzero(~important)
    if len(rest) == 1:
        labels[rest] = -1                       # no pair to set eps from; one channel is no cluster
    elif len(rest) > 1:
        # each distance is listed twice, so eps is often one of them exactly: DBSCAN reads the
        # same matrix (precomputed) so that pair is a neighbour (d ≤ eps) whatever the rounding
        # of a recomputed distance (a batch's forward differs from one image's in the last bits)
        d, eps = _cfcam_distances(rows[rest])
        labels[rest] = DBSCAN(eps=eps, min_samples=max(2, int(len(rest) * 0.05)), metric="precomputed").fit(d).labels_
    return labels


def _cfcam_filter(g: torch.Tensor, sigma_spatial: float = 5.0, sigma_range: float = 0.1) -> torch.Tensor:
    """CF-CAM's gradient filter of ``(p, h, w)`` cluster-mean gradients, each by its own ``(h, w)``
    kernel (spatial gaussian about the centre × range gaussian about the map's mean), in one
    grouped convolution."""
    p, h, w = g.shape
    iy = torch.arange(h, device=g.device, dtype=g.dtype) - h / 2
    ix = torch.arange(w, device=g.device, dtype=g.dtype) - w / 2
    spatial = torch.exp(-(iy[:, None] ** 2 + ix[None, :] ** 2) / (2 * sigma_spatial ** 2))
    rng = torch.exp(-(g - g.mean((1, 2), keepdim=True)) ** 2 / (2 * sigma_range ** 2))
    k = spatial * rng
    k = k / (k.sum((1, 2), keepdim=True) + 1e-6)
    # conv2d's padding="same", written out: for an even side the extra zero goes after
    pad = ((w - 1) // 2, w - 1 - (w - 1) // 2, (h - 1) // 2, h - 1 - (h - 1) // 2)
    return F.conv2d(F.pad(g[None], pad), k[:, None], groups=p)[0]


def cfcam(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """CF-CAM ``(b, h, w)`` before its final ReLU from the layer's ``A`` and gradient ``g``
    ``(b, c, h, w)``; the conventions are in the module docstring."""
    b, c = a.shape[:2]
    labels = [cfcam_channels(m) for m in a.detach().cpu().float().numpy()]
    weights = g.mean((2, 3)).clone()            # (b, c): the important channels' weights
    # one (sample, cluster) row per cluster of the batch: its channels' mean gradient
    members = [(i, torch.as_tensor(np.flatnonzero(lab == k), device=g.device))
               for i, lab in enumerate(labels) for k in np.unique(lab[lab >= 0])]
    if members:
        filtered = _cfcam_filter(torch.stack([g[i, chans].mean(0) for i, chans in members])).mean((1, 2))
        for (i, chans), wk in zip(members, filtered):
            weights[i, chans] = wk
    kept = torch.as_tensor(np.stack([lab != -1 for lab in labels]), device=g.device).reshape(b, c)
    w = torch.softmax(weights.masked_fill(~kept, float("-inf")), dim=1)
    return (w[..., None, None] * a).sum(1)


def smoothing_noise(shape, index: int, draw: int, random_state: int = 0) -> torch.Tensor:
    """Standard normal ``shape`` (float32, CPU): noise draw ``draw`` of the sample at position
    ``index`` of the inputs, seeded by ``(random_state, index, draw)`` alone — the same whatever
    batch the sample is in (scaled by Smooth Grad-CAM++'s σ by the caller)."""
    seed = int(np.random.SeedSequence([int(random_state), int(index), int(draw)]).generate_state(1, np.uint64)[0])
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))


def _smooth_gradcampp(module, hook: _Hook, x: torch.Tensor, a: torch.Tensor, targets: torch.Tensor, first: int,
                      samples: int, sigma: float, random_state: int) -> torch.Tensor:
    """Smooth Grad-CAM++ ``(b, h, w)`` before its ReLU: ``samples`` forward+backward passes of the
    batch's noisy copies (rows ``first …`` of the inputs), the derivative terms averaged, on ``A``
    of the clean input."""
    b = x.shape[0]
    flat = x.flatten(1)
    scale = (sigma * (flat.max(1).values - flat.min(1).values)).view(b, *([1] * (x.ndim - 1)))
    d1, d2, d3 = torch.zeros_like(a), torch.zeros_like(a), torch.zeros_like(a)
    for n in range(samples):
        noise = torch.stack([smoothing_noise(x.shape[1:], first + i, n, random_state) for i in range(b)])
        z = (x + scale * noise.to(device=x.device, dtype=x.dtype)).requires_grad_(True)
        with torch.enable_grad():
            score = class_scores(module(z)).gather(1, targets[:, None]).sum()
            (g,) = torch.autograd.grad(score, hook.out)
        g2 = g * g
        d1 += g
        d2 += g2
        d3 += g2 * g
    return _gradcampp(a, d1 / samples, d2 / samples, d3 / samples)


def _scorecam(module, x: torch.Tensor, a: torch.Tensor, targets: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Score-CAM ``(b, h, w)`` before its ReLU: every (sample, channel) masked input scored in batches."""
    b, c = a.shape[:2]
    up = F.interpolate(a, size=x.shape[-2:], mode="bilinear", align_corners=True)
    flat = up.flatten(2)
    lo, hi = flat.min(2).values[..., None, None], flat.max(2).values[..., None, None]
    up = (up - lo) / (hi - lo + 1e-8)
    scores = torch.empty(b * c, dtype=a.dtype, device=a.device)
    rows = targets.repeat_interleave(c)
    for start in range(0, b * c, batch_size):
        idx = torch.arange(start, min(start + batch_size, b * c), device=a.device)
        masked = x[idx // c] * up.flatten(0, 1)[idx][:, None]
        scores[idx] = class_scores(module(masked)).gather(1, rows[idx, None])[:, 0]
    w = torch.softmax(scores.view(b, c), dim=1)
    return (w[..., None, None] * a).sum(1)


def _integrated_gradients(module, x: torch.Tensor, targets: torch.Tensor, steps: int, baseline: float,
                          batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(b, H, W)`` Integrated Gradients summed over channels (midpoint rule, constant baseline),
    and ``(b,)`` the target scores at the baseline."""
    b = x.shape[0]
    x0 = torch.full_like(x, float(baseline))
    alphas = (torch.arange(steps, dtype=x.dtype, device=x.device) + 0.5) / steps
    total = torch.zeros_like(x)
    # rows of the (step, sample) grid, batch_size of them per forward and backward
    grid = [(k, i) for k in range(steps) for i in range(b)]
    for start in range(0, len(grid), batch_size):
        part = grid[start:start + batch_size]
        ks = torch.tensor([k for k, _ in part], device=x.device)
        ids = torch.tensor([i for _, i in part], device=x.device)
        z = (x0[ids] + alphas[ks].view(-1, 1, 1, 1) * (x[ids] - x0[ids])).requires_grad_(True)
        score = class_scores(module(z)).gather(1, targets[ids, None]).sum()
        (gz,) = torch.autograd.grad(score, z)
        total.index_add_(0, ids, gz)
    with torch.no_grad():
        at_baseline = class_scores(module(x0)).gather(1, targets[:, None])[:, 0]
    return ((x - x0) * total / steps).sum(1), at_baseline


def attribution_maps(module: torch.nn.Module, inputs, layer: str | None, *, methods=DEFAULT_METHODS,
                     target="predicted", labels=None, batch_size: int = 32, ig_steps: int = 64,
                     ig_baseline: float = 0.0, smooth_samples: int = 8, smooth_sigma: float = 0.15,
                     random_state: int = 0, normalise: str = "max",
                     device: str | torch.device = "cpu") -> xr.Dataset:
    """Attribution maps of ``methods`` for every input, with the targets and scores they explain.

    Args:
        module: a classifier (output ``(batch, n_classes)`` scores), in eval mode, on ``device``.
        inputs: ``(n, channel, H, W)`` float array.
        layer: module path of the spatial layer the CAM methods read (``(b, c, h, w)`` output; on a
            vision transformer a ``(b, token, c)`` layer, read as its ``(b, c, gy, gx)`` patch grid
            with the prefix tokens dropped: :mod:`zooaudit.patch_tokens`); may be None when only
            pixel methods are asked for.
        target: ``"predicted"``, ``"true"`` (needs ``labels`` ``(n,)``) or a class index.
        methods: names from :data:`METHODS` (default :data:`DEFAULT_METHODS`).
        batch_size: samples per forward/backward; also the masked inputs per Score-CAM forward
            and the interpolated inputs per Integrated Gradients forward.
        smooth_samples, smooth_sigma, random_state: Smooth Grad-CAM++'s noisy copies per sample,
            noise standard deviation as a fraction of each input's range, and the noise seed.

    Returns an ``xarray.Dataset`` with ``maps (sample, method, y, x)`` float32, ``target
    (sample,)`` the class explained, ``predicted (sample,)``, ``logits (sample, class)``, and
    with Integrated Gradients ``ig_gap (sample,)``: ``Σ IG − (s(x) − s(x₀))`` on the raw map;
    attrs record the layer, the layer's map size, the upsampling, normalisation and IG settings
    (on a patch-token layer also ``token_layout``, ``prefix_tokens_excluded`` and ``token_grid``).
    """
    methods = _check(methods, normalise, ig_steps, smooth_samples, smooth_sigma, random_state)
    x_all = np.asarray(inputs)
    if x_all.ndim != 4:
        raise ZooauditError(f"Attribution maps need image inputs (sample, channel, y, x); got shape {x_all.shape}.")
    if labels is not None and len(labels) != len(x_all):
        raise ZooauditError(f"labels has {len(labels)} values for {len(x_all)} inputs; one per input.")
    cams = [m for m in methods if m in CAM_METHODS]
    if cams and layer is None:
        raise ZooauditError(f"CAM methods {cams} need a layer (a spatial layer of the model).")
    size = tuple(x_all.shape[-2:])
    layout = patch_token_layout(module, size) if cams else None
    hook = _Hook(_layer(module, layer), layout, layer) if layer is not None else None
    # filled batch by batch: the (n, method, H, W) result is the only O(n) buffer (no list of
    # per-batch arrays concatenated at the end, which held the maps twice at the peak)
    maps = np.empty((len(x_all), len(methods), *size), np.float32)
    targets, preds, logits_all, gaps, layer_hw = [], [], [], [], None
    module.eval()
    try:
        for start in range(0, len(x_all), batch_size):
            x = torch.as_tensor(np.ascontiguousarray(x_all[start:start + batch_size]), dtype=torch.float32,
                                device=device)
            lab = None if labels is None else np.asarray(labels)[start:start + batch_size]
            need_grad = any(m in GRADIENT_METHODS for m in methods)
            with torch.enable_grad():
                x.requires_grad_("grad_x_input" in methods)
                logits = class_scores(module(x))
                t = resolve_targets(target, logits, lab)
                a = hook.out if hook is not None else None
                if cams:
                    _spatial(a, layer)
                    layer_hw = tuple(a.shape[-2:])
                out: dict[str, torch.Tensor] = {}
                if need_grad:
                    wrt = ([a] if any(m in LAYER_GRADIENT_CAMS for m in methods) else []) + \
                          ([x] if "grad_x_input" in methods else [])
                    grads = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), wrt)
                    if "grad_x_input" in methods:
                        out["grad_x_input"] = _finish_pixel((x * grads[-1]).sum(1).detach(), normalise)
                    if wrt and wrt[0] is a:
                        for name, cam in _gradient_cams(a.detach(), grads[0]).items():
                            if name in methods:
                                out[name] = _finish_cam(cam, size, normalise)
                        if "cfcam" in methods:
                            out["cfcam"] = _finish_cam(cfcam(a.detach(), grads[0]), size, normalise)
            xd = x.detach()
            if "smoothgradcam++" in methods:
                out["smoothgradcam++"] = _finish_cam(
                    _smooth_gradcampp(module, hook, xd, a.detach(), t, start, smooth_samples, float(smooth_sigma),
                                      random_state), size, normalise)
            with torch.no_grad():
                if "scorecam" in methods:
                    out["scorecam"] = _finish_cam(_scorecam(module, xd, a.detach(), t, batch_size), size, normalise)
                if "eigencam" in methods:
                    ec = torch.as_tensor(eigencam(a.detach().cpu().numpy(), name=layer), dtype=torch.float32)
                    out["eigencam"] = _finish_cam(ec.to(device), size, normalise)
            if "integrated_gradients" in methods:
                with torch.enable_grad():
                    ig, at_baseline = _integrated_gradients(module, xd, t, ig_steps, ig_baseline, batch_size)
                # completeness gap: Σ IG − (s(x) − s(x₀)), the quadrature error of this sample
                gaps.append((ig.sum((1, 2)) - (logits.detach().gather(1, t[:, None])[:, 0] - at_baseline))
                            .cpu().numpy())
                out["integrated_gradients"] = _finish_pixel(ig.detach(), normalise)
            maps[start:start + len(x)] = torch.stack([out[m] for m in methods], 1).float().cpu().numpy()
            targets.append(t.cpu().numpy())
            preds.append(logits.argmax(1).detach().cpu().numpy())
            logits_all.append(logits.detach().float().cpu().numpy())
            del x, xd, logits, out, a
            # glibc kept the freed pages of Score-CAM's masked batches: the working memory grew with N
            # (2048 samples held ~130 MiB more than 256); trimming per batch keeps it flat
            return_freed_heap()
    finally:
        if hook is not None:
            hook.handle.remove()
    n = len(x_all)
    smooth = {"smooth_samples": int(smooth_samples), "smooth_sigma": float(smooth_sigma), "random_state": int(
        random_state), "smooth_noise": "gaussian, sigma = smooth_sigma x each input's (max - min); clean activations"} \
        if "smoothgradcam++" in methods else {}
    extra = {"ig_gap": ("sample", np.concatenate(gaps).astype(np.float64))} if gaps else {}
    return xr.Dataset(
        {"maps": (("sample", "method", "y", "x"), maps),
         "target": ("sample", np.concatenate(targets) if targets else np.zeros(0, np.int64)),
         "predicted": ("sample", np.concatenate(preds) if preds else np.zeros(0, np.int64)),
         "logits": (("sample", "class"), np.concatenate(logits_all) if logits_all else np.zeros((0, 0))), **extra},
        coords={"sample": np.arange(n), "method": list(methods)},
        attrs={"layer": layer or "", "layer_size": list(layer_hw or ()), "input_size": list(size),
               "upsampling": "bilinear, align_corners=False (ReLU at the layer's resolution first)",
               "normalise": normalise, "target": str(target), "ig_steps": ig_steps, "ig_baseline": float(ig_baseline),
               "ig_rule": "midpoint Riemann sum", "pixel_maps": "summed over input channels, signed", **smooth,
               **(layout.attrs() if hook is not None and hook.reshaped else {})},
    )
