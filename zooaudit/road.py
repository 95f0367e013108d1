"""ROAD: RemOve And Debias (Rong et al. 2022, "A Consistent and Efficient Evaluation Strategy for
Attribution Methods") — removal curves with noisy linear imputation instead of black pixels.

Deletion with a constant baseline (:mod:`zooaudit.faithfulness`) puts out-of-distribution
patches into the image, and the *shape* of the removed region leaks the attribution's ranking
to the model. ROAD instead fills every removed pixel with the weighted mean of its 8
neighbours, solved jointly over all removed pixels of an image, plus a little gaussian noise.

Noisy linear imputation (:func:`noisy_linear_imputation`), the conventions of the reference
implementation (github.com/tleemann/road_evaluation, also pytorch-grad-cam's ``metrics.road``):

- weights ``1/6`` for the 4 direct neighbours and ``1/12`` for the 4 diagonal ones (they sum
  to 1); neighbours outside the image are dropped (not renormalised: a pixel's equation
  uses the weights of its in-image neighbours only);
- for every removed pixel ``i``: ``(Σ_j w_ij) x_i − Σ_{j removed} w_ij x_j = Σ_{j kept} w_ij x_j``,
  one sparse linear system per image over all its removed pixels, each channel a right-hand
  side; all images of a batch are solved as one block-diagonal system
  (``scipy.sparse.linalg.spsolve``);
- then ``N(0, sigma²)`` noise (input units, seeded, independent per pixel and channel) is
  added to the imputed pixels only; kept pixels are untouched;
- the system is singular only when every pixel of an image is removed (any smaller
  8-connected removed region touches a kept pixel, and then the system is irreducibly
  diagonally dominant); that image becomes the constant ``fill`` (the stage passes
  ``curve_baseline``: the deletion curve's endpoint) plus the noise.

Curves (:func:`road_curves`): for each sample and order (each method's map high to low, ties by
position, and one random order: the control; :func:`zooaudit.faithfulness.pixel_ranks`), at
fractions ``f = 0, 1/steps, … 1`` the first ``round(f·P)`` pixels (all channels) are removed
and imputed: **MoRF** removes the most relevant first (a faithful map makes the score fall
fast: lower AUC is better), **LeRF** the least relevant first (the reverse of the same
order: the score should stay high, higher AUC is better). Score: the softmax probability of
the sample's target class; all imputed inputs are scored in forward batches.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
import xarray as xr
from scipy.sparse.linalg import spsolve

from .errors import ZooauditError
from .faithfulness import most_relevant_first, removal_curves

__all__ = ["NEIGHBOUR_WEIGHTS", "imputation_system", "noisy_linear_imputation", "road_curves"]

# (dy, dx) → weight, as in the reference implementation
NEIGHBOUR_WEIGHTS = (((0, 1), 1 / 6), ((0, -1), 1 / 6), ((1, 0), 1 / 6), ((-1, 0), 1 / 6),
                     ((1, 1), 1 / 12), ((1, -1), 1 / 12), ((-1, 1), 1 / 12), ((-1, -1), 1 / 12))


def imputation_system(images, removed) -> tuple[sp.csc_matrix, np.ndarray, np.ndarray]:
    """The linear system of the imputation of ``removed`` pixels of ``images``.

    Args:
        images: ``(k, channel, H, W)``; removed: ``(k, H, W)`` bool, True = imputed.

    Returns ``(A, b, unknowns)``: ``A (u, u)`` sparse (block-diagonal over the images),
    ``b (u, channel)`` and ``unknowns (u,)`` the flat ``(k·H·W)`` index of each unknown pixel;
    ``A @ x = b`` holds for the imputed values ``x (u, channel)``. Images with every pixel
    removed are left out (their system is singular; :func:`noisy_linear_imputation` fills them).
    """
    images = np.asarray(images, dtype=np.float64)
    removed = np.asarray(removed, dtype=bool)
    k, c, h, w = images.shape
    if removed.shape != (k, h, w):
        raise ZooauditError(f"removed has shape {removed.shape}; expected {(k, h, w)}: one (H, W) mask per image.")
    removed = removed & ~removed.all(axis=(1, 2), keepdims=True)
    flat = removed.reshape(-1)
    unknowns = np.flatnonzero(flat)
    var = np.full(flat.shape, -1, np.int64)
    var[unknowns] = np.arange(len(unknowns))
    img, yy, xx = np.unravel_index(unknowns, (k, h, w))
    pixels = images.transpose(0, 2, 3, 1).reshape(k * h * w, c)
    diag = np.zeros(len(unknowns))
    b = np.zeros((len(unknowns), c))
    rows, cols, vals = [], [], []
    for (dy, dx), weight in NEIGHBOUR_WEIGHTS:
        ny, nx = yy + dy, xx + dx
        inside = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
        eq = np.flatnonzero(inside)
        j = (img[eq] * h + ny[eq]) * w + nx[eq]
        diag[eq] += weight
        gone = flat[j]
        rows.append(eq[gone])
        cols.append(var[j[gone]])
        vals.append(np.full(int(gone.sum()), -weight))
        np.add.at(b, eq[~gone], weight * pixels[j[~gone]])
    u = len(unknowns)
    rows.append(np.arange(u))
    cols.append(np.arange(u))
    vals.append(diag)
    a = sp.csc_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(u, u))
    return a, b, unknowns


def noisy_linear_imputation(images, removed, *, sigma: float = 0.01, fill: float = 0.0,
                            rng: np.random.Generator | int | None = 0) -> np.ndarray:
    """``images (k, channel, H, W)`` with the ``removed (k, H, W)`` pixels imputed: the 8-neighbour
    weighted mean solved jointly, plus ``N(0, sigma²)`` on the imputed pixels (module docstring);
    an image with every pixel removed becomes ``fill`` plus the noise. float32, same shape."""
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not np.isfinite(sigma) or sigma < 0:
        raise ZooauditError(f"sigma={sigma!r}: the imputation noise is a finite standard deviation ≥ 0.")
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4:
        raise ZooauditError(f"images has shape {images.shape}; expected (k, channel, H, W).")
    removed = np.asarray(removed, dtype=bool)
    k, c, h, w = images.shape
    a, b, unknowns = imputation_system(images, removed)
    out = images.transpose(0, 2, 3, 1).reshape(k * h * w, c).copy()
    if len(unknowns):
        x = spsolve(a, b)
        out[unknowns] = np.asarray(x).reshape(len(unknowns), c)
    everything = removed.all(axis=(1, 2))
    out = out.reshape(k, h, w, c)
    out[everything] = np.float32(fill)
    rng = np.random.default_rng(rng)
    if sigma > 0:
        mask = removed.reshape(k * h * w)
        flat = out.reshape(k * h * w, c)
        flat[mask] += rng.normal(0.0, sigma, size=(int(mask.sum()), c)).astype(np.float32)
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def road_curves(module: torch.nn.Module, inputs, maps: xr.DataArray, targets, *, steps: int = 10,
                sigma: float = 0.01, fill: float = 0.0, batch_size: int = 64, random_state: int = 0,
                device: str | torch.device = "cpu") -> xr.Dataset:
    """MoRF and LeRF curves ``(sample, order, kind, step)`` of every method's maps under noisy
    linear imputation (module docstring).

    Args:
        inputs: ``(n, channel, H, W)``; maps: ``(sample, method, y, x)`` at the input size;
        targets: ``(n,)`` the class whose probability is tracked (the maps' target).

    Returns ``curves`` with ``order`` = the methods then ``random``, ``kind`` = ``morf``,
    ``lerf``, and coordinate ``fraction (step,)``. The random order (and the noise) come from
    ``random_state``: the random order of sample ``i`` is the one :func:`zooaudit.faithfulness.
    faithfulness_curves` draws with the same seed.
    """
    noise_rng = np.random.default_rng([random_state, 1])

    def impute(x, removed):                 # x (c, H, W), removed (k, H, W) → (k, c, H, W)
        return noisy_linear_imputation(np.broadcast_to(x, (len(removed), *x.shape)), removed,
                                       sigma=sigma, fill=fill, rng=noise_rng)

    def least_relevant_first(ranks, counts):  # (order, P), (step,) → (order, step, P): the last counts[step]
        return ranks[:, None, :] >= (ranks.shape[1] - counts)[None, :, None]

    return removal_curves(
        module, inputs, maps, targets, kinds={"morf": most_relevant_first, "lerf": least_relevant_first},
        remove=impute, steps=steps, batch_size=batch_size, rng=np.random.default_rng(random_state),
        device=device, caller="road_curves",
        attrs={"imputation": "noisy linear (8 neighbours, 1/6 direct, 1/12 diagonal; Rong et al. 2022)",
               "sigma": float(sigma), "fill_all_removed": float(fill), "steps": steps,
               "score": "softmax probability of the target class", "random_state": random_state,
               "ties": "by pixel position (stable sort); lerf is the reverse of the morf order"})
