"""Model-side faithfulness curves of attribution maps: deletion and insertion (Petsiuk et al. 2018).

For each sample and each pixel order — every method's map, high to low (ties by position),
and one random order (the control, the same permutation for every method of a sample) —
the ``steps + 1`` inputs with the first ``round(f·P)`` pixels (all channels) replaced by
``baseline`` (deletion) or kept over a ``baseline`` image (insertion), ``f = 0, 1/steps, … 1``,
are scored: the softmax probability of the sample's target class. A faithful map makes the
deletion curve fall faster (lower AUC) and the insertion curve rise faster (higher AUC) than
the random order. All perturbed inputs are scored in forward batches of ``batch_size``.

The baseline is a constant image (default 0, black); black patches are out of distribution
for most models (the ROAD critique), so the curves are compared with the random control
computed on the same perturbations, never read alone. AUCs: :func:`zooaudit.analysis.attribution.auc`.

Average drop and increase in confidence (Chattopadhyay et al. 2018, the Grad-CAM++ paper):
:func:`confidence_change` scores each sample once whole and once multiplied by each method's
explanation map (:func:`confidence_change` states the conventions).
"""

from __future__ import annotations

import numpy as np
import torch
import xarray as xr

from .attribution_maps import class_scores
from .errors import ZooauditError

__all__ = ["confidence_change", "explanation_masks", "faithfulness_curves"]


def pixel_ranks(maps: np.ndarray, rng) -> np.ndarray:
    """``(order, P)`` pixel ranks: position of each pixel in each order (methods, then random)."""
    m, h, w = maps.shape
    flat = maps.reshape(m, h * w)
    order = np.argsort(-flat, axis=1, kind="stable")
    order = np.concatenate([order, rng.permutation(h * w)[None]])
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(h * w)[None].repeat(len(order), 0), axis=1)
    return ranks


def most_relevant_first(ranks: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``(order, step, P)`` bool: the first ``counts[step]`` pixels of each order (``ranks (order, P)``
    from :func:`pixel_ranks`, ``counts (step,)``): deletion's and MoRF's removed pixels."""
    return ranks[:, None, :] < counts[None, :, None]


def removal_curves(module: torch.nn.Module, inputs, maps: xr.DataArray, targets, *, kinds: dict, remove,
                   steps: int, batch_size: int, rng: np.random.Generator, device: str | torch.device,
                   caller: str, attrs: dict) -> xr.Dataset:
    """Curves ``(sample, order, kind, step)`` of every method's maps under one way of removing pixels:
    the loop that :func:`faithfulness_curves` and :func:`zooaudit.road.road_curves` share.

    For each sample, its orders (:func:`pixel_ranks`: the methods, then one random order drawn
    from ``rng``) and fractions ``f = 0, 1/steps, … 1`` (``counts = round(f·P)`` pixels), each
    kind's removed pixels are replaced by ``remove`` and the ``order·kind·step`` inputs are scored
    in forward batches of ``batch_size``: the softmax probability of the sample's target class.

    Args:
        inputs: ``(n, channel, H, W)``; maps: ``(sample, method, y, x)`` at the input size;
        targets: ``(n,)`` the class whose probability is tracked.
        kinds: kind name → ``rule(ranks (order, P), counts (step,)) → removed (order, step, P)``
            bool, the pixels that kind removes at each step; the curves' ``kind`` follows its order.
        remove: ``remove(x (channel, H, W), removed (k, H, W) bool) → (k, channel, H, W)``
            float32, the input with the removed pixels replaced (``k = order·kind·step``, that
            order, order-major), called once per sample in sample order.
        caller: the public function's name, for the error messages; attrs: the Dataset's attributes.

    Returns ``curves`` with ``order`` = the methods then ``random``, ``kind`` = the names of
    ``kinds``, and coordinate ``fraction (step,)``.
    """
    x_all = np.asarray(inputs, dtype=np.float32)
    if tuple(maps.dims) != ("sample", "method", "y", "x"):
        raise ZooauditError(f"{caller} needs maps with dims (sample, method, y, x); got {maps.dims}.")
    if x_all.ndim != 4 or maps.shape[0] != len(x_all) or maps.shape[2:] != x_all.shape[2:]:
        raise ZooauditError(f"maps {maps.shape} do not match inputs {x_all.shape}: one map per input, at its size.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ZooauditError(f"steps={steps!r}: the curves need an integer ≥ 2 steps.")
    targets = np.asarray(targets, dtype=np.int64)
    if targets.shape != (len(x_all),):
        raise ZooauditError(f"targets has shape {targets.shape}; expected ({len(x_all)},), one class per input.")
    values = maps.values.astype(np.float32)
    n, c, h, w = x_all.shape
    fractions = np.arange(steps + 1) / steps
    counts = np.round(fractions * h * w).astype(int)
    n_orders = values.shape[1] + 1
    out = np.empty((n, n_orders, len(kinds), steps + 1), np.float32)
    module.eval()
    with torch.no_grad():
        for i in range(n):
            ranks = pixel_ranks(values[i], rng)                                   # (order, P): 0 = most relevant
            removed = np.stack([rule(ranks, counts) for rule in kinds.values()], 1)  # (order, kind, step, P)
            batch = remove(x_all[i], removed.reshape(-1, h, w))                # (order·kind·step, c, h, w)
            probs = []
            for start in range(0, len(batch), batch_size):
                z = torch.as_tensor(batch[start:start + batch_size], device=device)
                p = torch.softmax(class_scores(module(z)).float(), 1)
                if not 0 <= targets[i] < p.shape[1]:
                    raise ZooauditError(f"targets must be class indices in [0, {p.shape[1]}); got {targets[i]}.")
                probs.append(p[:, targets[i]].cpu().numpy())
            out[i] = np.concatenate(probs).reshape(n_orders, len(kinds), steps + 1)
    return xr.Dataset(
        {"curves": (("sample", "order", "kind", "step"), out)},
        coords={"order": [*map(str, maps["method"].values), "random"], "kind": list(kinds),
                "fraction": ("step", fractions)},
        attrs=attrs,
    )


def faithfulness_curves(module: torch.nn.Module, inputs, maps: xr.DataArray, targets, *, steps: int = 10,
                        baseline: float = 0.0, batch_size: int = 64, random_state: int = 0,
                        device: str | torch.device = "cpu") -> xr.Dataset:
    """Deletion and insertion curves ``(sample, order, kind, step)`` of every method's maps.

    Args:
        inputs: ``(n, channel, H, W)``; ``maps``: ``(sample, method, y, x)`` at the input size;
        targets: ``(n,)`` the class whose probability is tracked (the maps' target).

    Returns ``curves`` with ``order`` = the methods then ``random``, ``kind`` = ``deletion``,
    ``insertion``, and coordinate ``fraction (step,)``.
    """
    fill = np.float32(baseline)

    def to_baseline(x, removed):            # x (c, H, W), removed (k, H, W) → (k, c, H, W)
        return np.where(removed[:, None], fill, x[None])

    def not_yet_inserted(ranks, counts):    # insertion: all but the first counts[step] pixels are the baseline
        return ~most_relevant_first(ranks, counts)

    return removal_curves(
        module, inputs, maps, targets, kinds={"deletion": most_relevant_first, "insertion": not_yet_inserted},
        remove=to_baseline, steps=steps, batch_size=batch_size, rng=np.random.default_rng(random_state),
        device=device, caller="faithfulness_curves",
        attrs={"baseline": float(baseline), "steps": steps, "score": "softmax probability of the target class",
               "random_state": random_state, "ties": "by pixel position (stable sort)"})


def explanation_masks(maps) -> np.ndarray:
    """``(..., y, x)`` maps → the explanation masks ``E`` in [0, 1] of :func:`confidence_change`:
    the positive part divided by its maximum (a map with no positive value gives ``E = 0``)."""
    pos = np.maximum(np.asarray(maps, dtype=np.float32), 0)
    top = pos.max(axis=(-2, -1), keepdims=True)
    return np.where(top > 0, pos / np.where(top > 0, top, 1), np.float32(0)).astype(np.float32)


def confidence_change(module: torch.nn.Module, inputs, maps: xr.DataArray, targets, *, batch_size: int = 64,
                      device: str | torch.device = "cpu") -> xr.Dataset:
    """Average drop and increase in confidence (Chattopadhyay et al. 2018) of every method's maps.

    Conventions: the explanation ``E`` of a map is its positive part scaled to [0, 1] by its
    maximum (:func:`explanation_masks`; the CAMs are non-negative, so for them this is the
    max-normalised map; a signed pixel map keeps only its evidence *for* the target; a map
    with no positive value gives ``E = 0``, a black image). The maps are at the input's size
    already (:func:`zooaudit.attribution_maps.attribution_maps` upsamples the CAMs
    bilinearly). ``E`` multiplies every channel of the input: ``x ⊙ E``. Confidence is the
    **softmax probability** of the sample's **own target class** ``targets[i]`` (the class the
    map explains): ``Y`` on the full image, ``O`` on ``x ⊙ E``.

    - average drop ``= 100 · mean_i max(0, Y_i − O_i) / Y_i`` (lower is better);
    - increase in confidence ``= 100 · mean_i [O_i > Y_i]`` (higher is better).

    Args:
        inputs: ``(n, channel, H, W)``; ``maps``: ``(sample, method, y, x)`` at ``(H, W)``;
        targets: ``(n,)`` class indices.

    Returns a Dataset with ``full (sample)`` = Y, ``masked (sample, method)`` = O,
    ``drop (sample, method)`` = ``max(0, Y − O) / Y`` (NaN where Y underflows to 0, left out of
    the means), ``average_drop (method)`` and ``increase_in_confidence (method)`` in percent.
    The ``n · method`` masked inputs are scored in forward batches of ``batch_size``.
    """
    x_all = np.asarray(inputs, dtype=np.float32)
    if tuple(maps.dims) != ("sample", "method", "y", "x"):
        raise ZooauditError(f"confidence_change needs maps with dims (sample, method, y, x); got {maps.dims}.")
    if x_all.ndim != 4 or maps.shape[0] != len(x_all) or maps.shape[2:] != x_all.shape[2:]:
        raise ZooauditError(f"maps {maps.shape} do not match inputs {x_all.shape}: one map per input, at its size.")
    targets = np.asarray(targets, dtype=np.int64)
    if targets.shape != (len(x_all),):
        raise ZooauditError(f"targets has shape {targets.shape}; expected ({len(x_all)},), one class per input.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ZooauditError(f"batch_size={batch_size!r}: a positive integer.")
    n, m = maps.shape[:2]
    masks = explanation_masks(maps.values)                                  # (n, m, H, W)

    def probs(batch: np.ndarray, rows: np.ndarray) -> np.ndarray:
        z = torch.as_tensor(batch, device=device)
        p = torch.softmax(class_scores(module(z)).float(), 1)
        if int(targets.max(initial=0)) >= p.shape[1] or int(targets.min(initial=0)) < 0:
            raise ZooauditError(f"targets must be class indices in [0, {p.shape[1]}); got "
                                f"{int(targets.min())} … {int(targets.max())}.")
        return p[torch.arange(len(rows)), torch.as_tensor(targets[rows], device=p.device)].cpu().numpy()

    module.eval()
    full = np.empty(n, np.float32)
    masked = np.empty(n * m, np.float32)
    with torch.no_grad():
        for start in range(0, n, batch_size):
            rows = np.arange(start, min(start + batch_size, n))
            full[rows] = probs(x_all[rows], rows)
        for start in range(0, n * m, batch_size):   # flat (sample, method) index, sample-major
            flat = np.arange(start, min(start + batch_size, n * m))
            i, j = np.divmod(flat, m)
            masked[flat] = probs(x_all[i] * masks[i, j][:, None], i)
    masked = masked.reshape(n, m)
    with np.errstate(invalid="ignore", divide="ignore"):
        drop = np.where(full[:, None] > 0, np.maximum(0.0, full[:, None] - masked) / full[:, None], np.nan)
    increase = masked > full[:, None]
    defined = np.isfinite(drop).sum(0)
    average_drop = np.where(defined > 0, 100.0 * np.where(np.isfinite(drop), drop, 0).sum(0) / np.maximum(defined, 1),
                            np.nan)
    return xr.Dataset(
        {"full": ("sample", full), "masked": (("sample", "method"), masked), "drop": (("sample", "method"), drop),
         "increase": (("sample", "method"), increase),
         "average_drop": ("method", average_drop),
         "increase_in_confidence": ("method", 100.0 * increase.mean(0) if n else np.full(m, np.nan))},
        coords={"method": [str(v) for v in maps["method"].values]},
        attrs={"score": "softmax probability of each sample's target class",
               "explanation": "positive part of the map divided by its max, multiplied into every channel",
               "average_drop": "100 · mean max(0, Y − O) / Y", "increase_in_confidence": "100 · mean [O > Y]",
               "reference": "Chattopadhyay et al. 2018 (Grad-CAM++), section 5.1"},
    )
