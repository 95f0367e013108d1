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
"""

from __future__ import annotations

import numpy as np
import torch
import xarray as xr

from .attribution_maps import _logits
from .errors import ZooauditError

__all__ = ["faithfulness_curves"]


def _orders(maps: np.ndarray, rng) -> np.ndarray:
    """``(order, P)`` pixel ranks: position of each pixel in each order (methods, then random)."""
    m, h, w = maps.shape
    flat = maps.reshape(m, h * w)
    order = np.argsort(-flat, axis=1, kind="stable")
    order = np.concatenate([order, rng.permutation(h * w)[None]])
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(h * w)[None].repeat(len(order), 0), axis=1)
    return ranks


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
    x_all = np.asarray(inputs, dtype=np.float32)
    if tuple(maps.dims) != ("sample", "method", "y", "x"):
        raise ZooauditError(f"faithfulness_curves needs maps with dims (sample, method, y, x); got {maps.dims}.")
    if maps.shape[0] != len(x_all) or maps.shape[2:] != x_all.shape[2:]:
        raise ZooauditError(f"maps {maps.shape} do not match inputs {x_all.shape}: one map per input, at its size.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ZooauditError(f"steps={steps!r}: the curves need an integer ≥ 2 steps.")
    targets = np.asarray(targets, dtype=np.int64)
    rng = np.random.default_rng(random_state)
    values = maps.values.astype(np.float32)
    n, c, h, w = x_all.shape
    fractions = np.arange(steps + 1) / steps
    counts = np.round(fractions * h * w).astype(int)
    n_orders = values.shape[1] + 1
    out = np.empty((n, n_orders, 2, steps + 1), np.float32)
    module.eval()
    with torch.no_grad():
        for i in range(n):
            ranks = _orders(values[i], rng)                                   # (order, P)
            gone = ranks[:, None, :] < counts[None, :, None]                  # (order, step, P)
            x = x_all[i].reshape(c, h * w)
            deleted = np.where(gone[:, :, None, :], np.float32(baseline), x[None, None])
            inserted = np.where(gone[:, :, None, :], x[None, None], np.float32(baseline))
            batch = np.stack([deleted, inserted], 1).reshape(-1, c, h, w)      # (order·kind·step, c, h, w)
            probs = []
            for start in range(0, len(batch), batch_size):
                z = torch.as_tensor(batch[start:start + batch_size], device=device)
                probs.append(torch.softmax(_logits(module(z)).float(), 1)[:, targets[i]].cpu().numpy())
            out[i] = np.concatenate(probs).reshape(n_orders, 2, steps + 1)
    return xr.Dataset(
        {"curves": (("sample", "order", "kind", "step"), out)},
        coords={"order": [*map(str, maps["method"].values), "random"], "kind": ["deletion", "insertion"],
                "fraction": ("step", fractions)},
        attrs={"baseline": float(baseline), "steps": steps, "score": "softmax probability of the target class",
               "random_state": random_state, "ties": "by pixel position (stable sort)"},
    )
