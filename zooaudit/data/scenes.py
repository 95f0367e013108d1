"""Generated scenes: shapes on textured backgrounds, with a foreground mask (Waterbirds-style).

Dataset name ``scenes``. Each sample is one object of class ``k`` (a flat-coloured shape:
circle, square, triangle, cross, ring, diamond) at a random scale, position and colour,
painted over a textured background of kind ``b`` (stripes, checks, dots, waves, blocks,
rings) with a random frequency, phase and palette jitter. Class ``k``'s *own* background is
kind ``k mod B``; with probability ``agreement`` a sample gets its class's own background,
otherwise one of the other ``B − 1`` kinds uniformly. ``agreement = 1/B`` makes the
background independent of the class (every class × background cell equally likely: the
balanced audit split); a high agreement (0.95, the training default) makes the background a
shortcut that predicts the class as well as the shape does.

Options (``DatasetSpec.options``; all optional):

- ``image_size``: ``"HxW"`` or one integer (default 64);
- ``classes`` K (2–6, default 4), ``backgrounds`` B (2–6, default 4);
- ``agreement``: probability of the class's own background (default 0.95 for ``train``,
  ``1/B`` for ``test``; ``all`` is train then test, each at its default unless given);
- ``n_train`` (default 2048), ``n_test`` (default 512): samples per split;
- ``swap_background``: ``true`` gives the **counterfactual** set: the same samples (same
  sample ids, object pixels, mask and texture jitter) with the background kind swapped — a
  sample on its class's own background moves to another kind (uniform), one on another
  kind moves to its class's own. Pairs are matched by sample id (:func:`counterfactual_pairs`).

``DatasetSpec.seed`` seeds every draw; a split draws from its own streams, and the
object, background-kind, texture and swap draws are separate streams, so changing the
agreement changes only the background kinds and never an object.

Arrays: inputs ``(sample, 3, y, x)`` float32 in [0, 1]; labels ``(sample,)`` the object
class; masks ``(sample, y, x)`` bool, True exactly on the object's pixels (the object is
painted flat, without anti-aliasing, so every masked pixel has the object's colour and no
other pixel is changed by it); groups ``background`` (the kind, names in
:data:`BACKGROUNDS`) and ``agrees`` (0 = ``disagrees``, 1 = ``agrees``: whether the
background is the class's own). Sample ids: ``i`` in train, ``1_000_000 + i`` in test.
"""

from __future__ import annotations

import numpy as np

from ..errors import ZooauditError
from .images import check_options, parse_size
from .registry import register
from .types import AuditDataset

__all__ = ["BACKGROUNDS", "SHAPES", "counterfactual_pairs", "load_scenes", "render_scenes"]

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")
BACKGROUNDS = ("stripes", "checks", "dots", "waves", "blocks", "rings")
OPTIONS = {"image_size", "classes", "backgrounds", "agreement", "n_train", "n_test", "swap_background"}
TEST_ID_OFFSET = 1_000_000
DEFAULTS = {"image_size": 64, "classes": 4, "backgrounds": 4, "n_train": 2048, "n_test": 512}
TRAIN_AGREEMENT = 0.95

# Two palette colours per background kind (RGB in [0, 1]); muted, so the saturated
# objects stand out. Each sample jitters them (texture stream).
_PALETTES = np.array([
    [[0.10, 0.15, 0.45], [0.35, 0.45, 0.70]],   # stripes: blues
    [[0.10, 0.35, 0.10], [0.40, 0.60, 0.30]],   # checks: greens
    [[0.40, 0.20, 0.10], [0.65, 0.45, 0.30]],   # dots: browns
    [[0.30, 0.10, 0.35], [0.55, 0.35, 0.60]],   # waves: purples
    [[0.40, 0.40, 0.10], [0.65, 0.60, 0.30]],   # blocks: olives
    [[0.10, 0.35, 0.40], [0.30, 0.60, 0.60]],   # rings: teals
], np.float32)
_STREAMS = {"objects": 0, "backgrounds": 1, "textures": 2, "swap": 3}
_SPLITS = {"train": 0, "test": 1}


def _int_option(options: dict, name: str, lo: int, hi: int | None = None) -> int:
    value = options.get(name, DEFAULTS[name])
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        allowed = f"an integer in [{lo}, {hi}]" if hi is not None else f"an integer ≥ {lo}"
        raise ZooauditError(f"Dataset 'scenes': option {name}={value!r} is not allowed; expected {allowed}.")
    return value


def _agreement(options: dict, split: str, n_backgrounds: int) -> float:
    if "agreement" not in options:
        return TRAIN_AGREEMENT if split == "train" else 1.0 / n_backgrounds
    value = options["agreement"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ZooauditError(f"Dataset 'scenes': option agreement={value!r} is not allowed; expected a probability "
                            "in [0, 1] (1/backgrounds = background independent of the class).")
    return float(value)


def _shape_mask(kind: int, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    """``(y, x)`` bool mask of shape ``kind`` centred at (cy, cx) with half-size ``r`` pixels."""
    dy, dx = yy - cy, xx - cx
    if kind == 0:                                   # circle
        return dy * dy + dx * dx <= r * r
    if kind == 1:                                   # square (same area order as the circle)
        return np.maximum(np.abs(dy), np.abs(dx)) <= 0.85 * r
    if kind == 2:                                   # triangle, apex up
        t = (dy + r) / (2 * r)                      # 0 at the apex, 1 at the base
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= t * r)
    if kind == 3:                                   # plus-shaped cross
        arm = r / 3
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    if kind == 4:                                   # ring
        d2 = dy * dy + dx * dx
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    return np.abs(dy) + np.abs(dx) <= r             # diamond


def _texture(kind: int, yy: np.ndarray, xx: np.ndarray, freq: float, phase: float, angle: float,
             noise: np.ndarray) -> np.ndarray:
    """``(y, x)`` texture weight in [0, 1] of background ``kind``; ``freq`` in cycles per pixel."""
    w = 2 * np.pi * freq
    if kind == 0:                                   # horizontal stripes
        return 0.5 + 0.5 * np.sin(w * yy + phase)
    if kind == 1:                                   # checkerboard
        return ((np.floor(yy * freq * 2 + phase) + np.floor(xx * freq * 2 + phase)) % 2).astype(np.float32)
    if kind == 2:                                   # dots on a lattice
        return (np.sin(w * yy + phase) * np.sin(w * xx + phase) > 0.6).astype(np.float32)
    if kind == 3:                                   # diagonal waves at a jittered angle
        return 0.5 + 0.5 * np.sin(w * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)
    if kind == 4:                                   # blocky noise (nearest-upsampled 8×8 field)
        h, w_ = yy.shape
        iy = np.minimum((yy[:, :1] * 8 / h).astype(int), 7)
        ix = np.minimum((xx[:1, :] * 8 / w_).astype(int), 7)
        return noise[iy, ix]
    cy, cx = yy.shape[0] / 2, yy.shape[1] / 2       # concentric rings
    return 0.5 + 0.5 * np.sin(w * np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) + phase)


def _draws(seed: int, split: str, n: int, n_classes: int, n_backgrounds: int, agreement: float):
    """Per-sample parameters, each group of draws from its own stream (see the module doc)."""
    def rng(stream: str):
        return np.random.default_rng([seed, _SPLITS[split], _STREAMS[stream]])

    obj, bg, tex, swap = rng("objects"), rng("backgrounds"), rng("textures"), rng("swap")
    labels = obj.integers(0, n_classes, n)
    objects = {"scale": obj.uniform(0.14, 0.26, n), "cy": obj.random(n), "cx": obj.random(n),
               # saturated colours: a random hue at full value, then one channel lifted
               "colour": obj.uniform(0.0, 1.0, (n, 3)), "bright": obj.integers(0, 3, n)}
    own = labels % n_backgrounds
    agrees = bg.random(n) < agreement
    other = (own + 1 + bg.integers(0, n_backgrounds - 1, n)) % n_backgrounds
    kinds = np.where(agrees, own, other)
    textures = {"freq": tex.uniform(0.08, 0.16, n), "phase": tex.uniform(0, 2 * np.pi, n),
                "angle": tex.uniform(0.3, 1.2, n), "jitter": tex.uniform(-0.08, 0.08, (n, 2, 3)),
                "noise": tex.random((n, 8, 8))}
    # Counterfactual kinds: own background ↔ another (uniform over the other B − 1).
    swapped = np.where(agrees, (own + 1 + swap.integers(0, n_backgrounds - 1, n)) % n_backgrounds, own)
    return labels, objects, kinds, swapped, textures


def render_scenes(labels, objects, kinds, textures, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Paint the scenes: ``(inputs (n, 3, h, w) float32, masks (n, h, w) bool)``."""
    h, w = size
    n = len(labels)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    inputs = np.empty((n, 3, h, w), np.float32)
    masks = np.empty((n, h, w), bool)
    side = min(h, w)
    for i in range(n):
        kind = int(kinds[i])
        t = _texture(kind, yy, xx, textures["freq"][i], textures["phase"][i], textures["angle"][i],
                     textures["noise"][i])
        c0, c1 = np.clip(_PALETTES[kind] + textures["jitter"][i], 0.0, 1.0)
        img = c0[:, None, None] * (1 - t) + c1[:, None, None] * t
        r = objects["scale"][i] * side
        cy = r + 1 + objects["cy"][i] * (h - 2 * r - 3)   # the whole shape inside the frame
        cx = r + 1 + objects["cx"][i] * (w - 2 * r - 3)
        m = _shape_mask(int(labels[i]), yy, xx, cy, cx, r)
        colour = 0.45 + 0.55 * objects["colour"][i]
        colour[objects["bright"][i]] = 1.0
        img[:, m] = colour[:, None]
        inputs[i], masks[i] = img, m
    return inputs, masks


def _split(spec, options: dict, split: str, size, n_classes: int, n_backgrounds: int) -> dict:
    n = _int_option(options, f"n_{split}", 1)
    agreement = _agreement(options, split, n_backgrounds)
    labels, objects, kinds, swapped, textures = _draws(spec.seed, split, n, n_classes, n_backgrounds, agreement)
    if options.get("swap_background", False):
        kinds = swapped
    inputs, masks = render_scenes(labels, objects, kinds, textures, size)
    ids = np.arange(n, dtype=np.int64) + (TEST_ID_OFFSET if split == "test" else 0)
    return {"inputs": inputs, "masks": masks, "labels": labels.astype(np.int64), "ids": ids,
            "background": kinds.astype(np.int64), "agrees": (kinds == labels % n_backgrounds).astype(np.int64)}


@register("scenes")
def load_scenes(spec) -> AuditDataset:
    options = dict(spec.options)
    check_options(options, OPTIONS, "scenes")
    if not isinstance(options.get("swap_background", False), bool):
        raise ZooauditError(f"Dataset 'scenes': option swap_background={options['swap_background']!r} is not "
                            "allowed; expected true or false.")
    size = parse_size(options.get("image_size", DEFAULTS["image_size"]))
    if min(size) < 16:
        raise ZooauditError(f"Dataset 'scenes': image_size {size[0]}x{size[1]} is too small; at least 16x16.")
    n_classes = _int_option(options, "classes", 2, len(SHAPES))
    n_backgrounds = _int_option(options, "backgrounds", 2, len(BACKGROUNDS))
    parts = [_split(spec, options, s, size, n_classes, n_backgrounds)
             for s in (("train", "test") if spec.split == "all" else (spec.split,))]
    cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return AuditDataset(
        name="scenes",
        spec=spec.model_dump(),
        inputs=cat["inputs"],
        labels=cat["labels"],
        sample_ids=cat["ids"],
        groups={"background": cat["background"], "agrees": cat["agrees"]},
        group_names={"background": list(BACKGROUNDS[:n_backgrounds]), "agrees": ["disagrees", "agrees"]},
        masks=cat["masks"],
        class_names=list(SHAPES[:n_classes]),
    )


def counterfactual_pairs(spec) -> tuple[AuditDataset, AuditDataset]:
    """``(scenes, the same scenes on swapped backgrounds)`` of a ``scenes`` spec: row ``i`` of
    both is the same sample (same id, label, mask and object pixels), only the background differs."""
    from ..specs import DatasetSpec

    spec = DatasetSpec(**spec) if isinstance(spec, dict) else spec
    if spec.name != "scenes":
        raise ZooauditError(f"counterfactual_pairs needs a 'scenes' dataset spec; got {spec.name!r}.")
    from .base import load_dataset

    options = {k: v for k, v in spec.options.items() if k != "swap_background"}
    base = spec.model_copy(update={"options": options})
    swapped = spec.model_copy(update={"options": {**options, "swap_background": True}})
    return load_dataset(base), load_dataset(swapped)
