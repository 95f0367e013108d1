"""Metrics on stored attribution maps: localisation against masks, background reliance, agreement.

Pure array math (no model): maps ``(sample, y, x)`` (or ``(sample, method, y, x)``) as
:mod:`zooaudit.attribution_maps` stores them, masks ``(sample, y, x)`` bool (True on the object).

Conventions:

- *Energy* is the positive part of a map, ``Σ max(a, 0)`` (CAMs are non-negative already; for
  the signed pixel maps only evidence *for* the target counts). A map with no positive energy
  has an undefined share: NaN, left out of every mean and count.
- Energy-based pointing game (Wang et al. 2020, Score-CAM): ``Σ_in max(a,0) / Σ max(a,0)``;
  the **background share** is ``1 −`` that: the share of the energy outside the mask.
- Pointing game (Zhang et al. 2018): a hit when the map's maximum lies in the mask dilated by
  ``tolerance`` pixels (Chebyshev distance; 0 = inside the mask itself). Ties: the first
  maximum in row-major order.
- IoU: the map thresholded at ``threshold`` × its maximum (``a ≥ t·max``) against the mask.
- Deletion / insertion AUC: the trapezoid area under a curve over the fraction of pixels
  removed / inserted, ``fraction`` from 0 to 1.
- Group and model comparisons: percentile bootstrap CIs (resampling within each group), a
  permutation p-value for the difference of the group means (labels shuffled; two-sided on
  ``|difference|``), and for two models on the same samples a paired sign-flip test; p-values
  are ``(1 + #{null ≥ observed}) / (1 + n)`` (:func:`.multitest.permutation_p_value`).
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from ..errors import ZooauditError
from .multitest import permutation_p_value

# The attribution methods (computed by zooaudit.attribution_maps, the model side), declared here
# so that the specs validate names without importing torch.
# METHODS: every method that may be asked for; DEFAULT_METHODS: those computed when none are named
# (the opt-in ones, slower, stay out of it so that default runs and cache keys do not change).
CAM_METHODS = ("gradcam", "gradcam++", "layercam", "scorecam", "eigencam", "smoothgradcam++", "cfcam")
PIXEL_METHODS = ("grad_x_input", "integrated_gradients")
METHODS = CAM_METHODS + PIXEL_METHODS
DEFAULT_METHODS = ("gradcam", "gradcam++", "layercam", "scorecam", "eigencam", "grad_x_input", "integrated_gradients")

__all__ = ["CAM_METHODS", "DEFAULT_METHODS", "METHODS", "PIXEL_METHODS", "agreement_matrix", "auc",
           "background_share", "compare_groups", "compare_paired", "defined_mean", "energy_inside", "kendall_maps",
           "mask_iou", "mean_ci", "pointing_game", "spearman_maps"]


def _pair(maps, masks, what: str) -> tuple[np.ndarray, np.ndarray]:
    maps = np.asarray(maps, dtype=np.float64)
    masks = np.asarray(masks)
    if maps.ndim != 3:
        raise ZooauditError(f"{what} needs maps (sample, y, x); got shape {maps.shape}.")
    if masks.shape != maps.shape:
        raise ZooauditError(f"{what}: masks have shape {masks.shape}; expected {maps.shape} (sample, y, x), one mask "
                            "per map at the map's size.")
    return maps, masks.astype(bool)


def energy_inside(maps, masks) -> np.ndarray:
    """``(sample,)`` share of each map's positive energy inside its mask (NaN: no positive energy)."""
    maps, masks = _pair(maps, masks, "energy_inside")
    pos = np.maximum(maps, 0)
    total = pos.sum((1, 2))
    inside = (pos * masks).sum((1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, inside / np.where(total > 0, total, 1), np.nan)


def background_share(maps, masks) -> np.ndarray:
    """``(sample,)`` share of each map's positive energy outside its mask: ``1 − energy_inside``."""
    return 1.0 - energy_inside(maps, masks)


def pointing_game(maps, masks, *, tolerance: int = 0) -> np.ndarray:
    """``(sample,)`` float: 1.0 where the map's maximum falls in the mask dilated by ``tolerance`` px."""
    maps, masks = _pair(maps, masks, "pointing_game")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, np.integer)) or tolerance < 0:
        raise ZooauditError(f"pointing_game tolerance={tolerance!r}: a non-negative integer number of pixels.")
    n, h, w = maps.shape
    flat = maps.reshape(n, -1).argmax(1)
    ys, xs = np.divmod(flat, w)
    out = np.empty(n)
    for i in range(n):
        y0, y1 = max(ys[i] - tolerance, 0), min(ys[i] + tolerance + 1, h)
        x0, x1 = max(xs[i] - tolerance, 0), min(xs[i] + tolerance + 1, w)
        out[i] = float(masks[i, y0:y1, x0:x1].any())
    return out


def mask_iou(maps, masks, *, threshold: float = 0.5) -> np.ndarray:
    """``(sample,)`` IoU of ``map ≥ threshold · max(map)`` with the mask (NaN for a map with max ≤ 0)."""
    maps, masks = _pair(maps, masks, "mask_iou")
    if not 0.0 < threshold <= 1.0:
        raise ZooauditError(f"mask_iou threshold={threshold!r}: a fraction of the map's maximum in (0, 1].")
    top = maps.reshape(len(maps), -1).max(1)
    on = maps >= (threshold * top)[:, None, None]
    inter = (on & masks).sum((1, 2))
    union = (on | masks).sum((1, 2))
    return np.where(top > 0, inter / np.maximum(union, 1), np.nan)


def auc(curves, fractions) -> np.ndarray:
    """Trapezoid area under ``curves (..., step)`` over ``fractions (step,)`` increasing from 0 to 1."""
    curves = np.asarray(curves, dtype=np.float64)
    f = np.asarray(fractions, dtype=np.float64)
    if f.ndim != 1 or curves.shape[-1] != len(f) or len(f) < 2 or np.any(np.diff(f) <= 0):
        raise ZooauditError(f"auc needs increasing fractions (step,) matching the curves' last axis; got "
                            f"{f.shape} for curves {curves.shape}.")
    return ((curves[..., 1:] + curves[..., :-1]) / 2 * np.diff(f)).sum(-1)


def _bootstrap_means(values: np.ndarray, n_boot: int, rng) -> np.ndarray:
    """``(n_boot,)`` means of resamples with replacement (NaN-free ``values``)."""
    if n_boot == 0 or len(values) == 0:
        return np.full(n_boot, np.nan)
    idx = rng.integers(0, len(values), (n_boot, len(values)))
    return values[idx].mean(1)


def _check_stats(n_boot, n_permutations, ci):
    for name, v in (("n_boot", n_boot), ("n_permutations", n_permutations)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ZooauditError(f"{name}={v!r}: a non-negative integer.")
    if not 0.0 < ci < 1.0:
        raise ZooauditError(f"ci={ci!r}: a confidence level in (0, 1).")


def compare_groups(values, groups, *, names=None, n_boot: int = 1000, n_permutations: int = 1000,
                   ci: float = 0.95, random_state: int = 0) -> xr.Dataset:
    """Per-group mean of ``values (sample,)`` with bootstrap CIs, and how far apart the groups are.

    ``groups (sample,)`` int codes, at least two present (e.g. background disagrees = 0 /
    agrees = 1). NaN values are dropped. Returns ``mean, ci_low, ci_high, n`` over ``group``
    and attrs ``difference`` — for two groups the mean of the higher code minus the lower, for
    more the range (largest − smallest group mean) — its bootstrap CI ``difference_ci_low/high``
    and ``p_value``, a permutation test of "no difference" on ``|difference|`` / the range.
    """
    _check_stats(n_boot, n_permutations, ci)
    v = np.asarray(values, dtype=np.float64)
    g = np.asarray(groups)
    if g.shape != v.shape:
        raise ZooauditError(f"groups has shape {g.shape}; expected {v.shape}, one code per value.")
    keep = np.isfinite(v)
    v, g = v[keep], g[keep]
    codes, inverse = np.unique(g, return_inverse=True)
    if len(codes) < 2:
        raise ZooauditError(f"compare_groups needs at least two groups with defined values; got codes "
                            f"{codes.tolist()}.")
    rng = np.random.default_rng(random_state)
    q = [(1 - ci) / 2, 1 - (1 - ci) / 2]
    parts = [v[inverse == k] for k in range(len(codes))]
    boots = np.stack([_bootstrap_means(p, n_boot, rng) for p in parts], 1)       # (n_boot, group)
    means = np.array([p.mean() for p in parts])

    def statistic(m):
        return m[..., 1] - m[..., 0] if m.shape[-1] == 2 else m.max(-1) - m.min(-1)

    diff = float(statistic(means))
    counts = np.bincount(inverse, minlength=len(codes))
    null = np.empty(n_permutations)
    for k in range(n_permutations):
        perm = rng.permutation(inverse)
        null[k] = abs(statistic(np.bincount(perm, weights=v, minlength=len(codes)) / counts))
    lohi = np.quantile(boots, q, axis=0).T if n_boot else np.full((len(codes), 2), np.nan)
    dboot = statistic(boots)
    labels = [str(c) for c in codes] if names is None else [str(names[int(c)]) for c in codes]
    return xr.Dataset(
        {"mean": ("group", means), "ci_low": ("group", lohi[:, 0]), "ci_high": ("group", lohi[:, 1]),
         "n": ("group", counts)},
        coords={"group": labels},
        attrs={"difference": diff,
               "difference_ci_low": float(np.quantile(dboot, q[0])) if n_boot else float("nan"),
               "difference_ci_high": float(np.quantile(dboot, q[1])) if n_boot else float("nan"),
               "p_value": permutation_p_value(abs(diff), null) if n_permutations else float("nan"),
               "ci": ci, "n_boot": n_boot, "n_permutations": n_permutations,
               "test": "permutation of group labels on |difference| (range for > 2 groups); percentile "
                       "bootstrap within groups"},
    )


def compare_paired(a, b, *, n_boot: int = 1000, n_permutations: int = 1000, ci: float = 0.95,
                   random_state: int = 0) -> dict:
    """Mean of ``a − b`` over the same samples (two models' values), its bootstrap CI and a
    one-sided sign-flip p-value for ``mean(a − b) > 0``. Pairs with a NaN are dropped."""
    _check_stats(n_boot, n_permutations, ci)
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ZooauditError(f"compare_paired needs two (sample,) arrays of the same samples; got {a.shape}, {b.shape}.")
    d = (a - b)[np.isfinite(a) & np.isfinite(b)]
    if len(d) == 0:
        raise ZooauditError("compare_paired: no sample has both values defined.")
    rng = np.random.default_rng(random_state)
    boot = _bootstrap_means(d, n_boot, rng)
    signs = rng.choice([-1.0, 1.0], (n_permutations, len(d)))
    null = (signs * d).mean(1)
    q = [(1 - ci) / 2, 1 - (1 - ci) / 2]
    lo, hi = np.quantile(boot, q) if n_boot else (np.nan, np.nan)
    return {"difference": float(d.mean()), "ci_low": float(lo), "ci_high": float(hi), "n": int(len(d)),
            "p_value": permutation_p_value(float(d.mean()), null) if n_permutations else float("nan")}


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks along the last axis (ties share their mean rank)."""
    from scipy.stats import rankdata

    return rankdata(x, axis=-1)


def spearman_maps(a, b) -> np.ndarray:
    """``(sample,)`` Spearman rank correlation between two map sets ``(sample, y, x)``, pixel-wise
    (NaN where a map is constant)."""
    a = np.asarray(a, dtype=np.float64).reshape(len(a), -1)
    b = np.asarray(b, dtype=np.float64).reshape(len(b), -1)
    if a.shape != b.shape:
        raise ZooauditError(f"spearman_maps needs two map sets of the same shape; got {a.shape}, {b.shape}.")
    return _spearman_ranked(_ranks(a), _ranks(b))


def _spearman_ranked(ra: np.ndarray, rb: np.ndarray) -> np.ndarray:
    """``(B,)`` Pearson correlation of average ranks ``(B, P)`` (NaN where a row is constant)."""
    ra = ra - ra.mean(1, keepdims=True)
    rb = rb - rb.mean(1, keepdims=True)
    den = np.sqrt((ra * ra).sum(1) * (rb * rb).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (ra * rb).sum(1) / np.where(den > 0, den, 1), np.nan)


def _tied_pairs(s: np.ndarray) -> np.ndarray:
    """``(B,)`` number of pairs with equal values, ``Σ_groups t(t − 1)/2``, of ``s (B, P)`` sorted
    along the last axis: each element counts its predecessors in its run of ties."""
    idx = np.arange(s.shape[1])
    start = np.where(np.concatenate([np.ones((len(s), 1), bool), np.diff(s, axis=1) != 0], axis=1), idx, 0)
    return (idx - np.maximum.accumulate(start, axis=1)).sum(1)


def _dense_ranks(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Of ``x (B, P)`` along the last axis: int64 dense ranks (0 for the smallest; ties share a
    rank), ``(B,)`` the number of tied pairs, and the average ranks (1-based, ties share their
    mean: SciPy's ``rankdata``)."""
    order = np.argsort(x, axis=1, kind="stable")
    s = np.take_along_axis(x, order, axis=1)
    new = np.diff(s, axis=1) > 0
    r = np.concatenate([np.zeros((len(x), 1), np.int64), np.cumsum(new, axis=1)], axis=1)
    idx = np.arange(x.shape[1])
    first = np.maximum.accumulate(np.where(np.concatenate([np.ones((len(x), 1), bool), new], 1), idx, 0), axis=1)
    last = np.minimum.accumulate(np.where(np.concatenate([new, np.ones((len(x), 1), bool)], 1), idx,
                                          x.shape[1])[:, ::-1], axis=1)[:, ::-1]
    ranks, average = np.empty_like(r), np.empty(x.shape, np.float64)
    np.put_along_axis(ranks, order, r, axis=1)
    np.put_along_axis(average, order, (first + last) / 2 + 1, axis=1)
    return ranks, (idx - first).sum(1), average


def _inversions(y: np.ndarray, top: int) -> np.ndarray:
    """``(B,)`` number of pairs ``i < j`` with ``y_i > y_j`` of ``y (B, P)`` int in [0, top), by a
    bottom-up merge sort vectorised over the rows: at each level every right half counts, with one
    ``searchsorted``, the elements of its (sorted) left half above each of its own."""
    b, p = y.shape
    size = 1 << max(p - 1, 1).bit_length()
    arr = np.concatenate([y, np.full((b, size - p), top, y.dtype)], axis=1)   # padding: larger, last: no pairs
    total = np.zeros(b, np.int64)
    h = 1
    while h < size:
        blocks = arr.reshape(b * size // (2 * h), 2, h)
        bid = np.arange(len(blocks), dtype=np.int64)[:, None] * (top + 1)
        keys = (bid + blocks[:, 0]).ravel()                    # left halves, sorted, offset per block
        at_most = np.searchsorted(keys, (bid + blocks[:, 1]).ravel(), side="right").reshape(-1, h)
        above = h - (at_most - (bid // (top + 1)) * h)
        total += above.reshape(b, -1).sum(1)
        arr = np.sort(blocks.reshape(b, size // (2 * h), 2 * h), axis=-1).reshape(b, size)
        h *= 2
    return total


def _kendall_ranked(ra, n1, rb, n2) -> np.ndarray:
    """τ-b of rows from their dense ranks ``(B, P)`` and tied-pair counts ``(B,)``."""
    p = ra.shape[1]
    joint = np.sort(ra * p + rb, axis=1)            # ordered by (a, b)
    n0 = p * (p - 1) // 2
    s = (n0 - n1 - n2 + _tied_pairs(joint) - 2 * _inversions(joint % p, p)).astype(np.float64)
    den = np.sqrt((n0 - n1).astype(np.float64) * (n0 - n2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, s / np.where(den > 0, den, 1), np.nan)


def kendall_maps(a, b) -> np.ndarray:
    """``(sample,)`` Kendall τ-b between two map sets ``(sample, y, x)``, pixel-wise (NaN where a
    map is constant): ``(n_c − n_d) / √((n₀ − n₁)(n₀ − n₂))`` with ``n₀ = P(P − 1)/2`` pairs of the
    ``P`` pixels, ``n₁``, ``n₂`` the pairs tied in ``a``, in ``b``. Knight's O(P log P) algorithm,
    vectorised over the samples: ``n_c − n_d = n₀ − n₁ − n₂ + n₃ − 2 n_d`` (``n₃``: tied in both),
    ``n_d`` the inversions of ``b`` in the order of ``(a, b)``."""
    a = np.asarray(a, dtype=np.float64).reshape(len(a), -1)
    b = np.asarray(b, dtype=np.float64).reshape(len(b), -1)
    if a.shape != b.shape:
        raise ZooauditError(f"kendall_maps needs two map sets of the same shape; got {a.shape}, {b.shape}.")
    if len(a) == 0:
        return np.zeros(0)
    return _kendall_ranked(*_dense_ranks(a)[:2], *_dense_ranks(b)[:2])


def defined_mean(values) -> tuple[float, int]:
    """Mean of the finite ``values`` and how many there are: ``(NaN, 0)`` — no warning — when
    none is (every sample's value undefined, e.g. constant or all-zero maps)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return (float(v.mean()), int(v.size)) if v.size else (float("nan"), 0)


def mean_ci(values, *, n_boot: int = 1000, ci: float = 0.95, random_state: int = 0) -> tuple[float, float, float, int]:
    """``(mean, ci_low, ci_high, n)`` of the finite ``values (sample,)``: their mean with a percentile
    bootstrap CI at level ``ci`` (NaN bounds when ``n_boot`` is 0 or no value is finite)."""
    _check_stats(n_boot, 0, ci)
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if not v.size:
        return float("nan"), float("nan"), float("nan"), 0
    boot = _bootstrap_means(v, n_boot, np.random.default_rng(random_state))
    lo, hi = np.quantile(boot, [(1 - ci) / 2, 1 - (1 - ci) / 2]) if n_boot else (np.nan, np.nan)
    return float(v.mean()), float(lo), float(hi), int(v.size)


def agreement_matrix(maps: xr.DataArray, *, top_fraction: float = 0.1) -> xr.Dataset:
    """Method × method agreement of ``maps (sample, method, y, x)``, averaged over samples.

    ``spearman``: pixel-wise rank correlation; ``kendall``: pixel-wise Kendall τ-b
    (:func:`kendall_maps`; ties count as in τ-b); ``top_overlap``: |top-k ∩ top-k| / k with
    ``k = top_fraction`` of the pixels (ties broken by position); ``cosine`` of the flattened maps.
    Means ignore samples where a value is undefined (constant maps have no ranking, zero maps no
    direction); ``n_spearman``, ``n_kendall``, ``n_cosine`` count the samples each mean is over,
    and a mean over none is NaN.
    """
    if tuple(maps.dims) != ("sample", "method", "y", "x"):
        raise ZooauditError(f"agreement_matrix needs maps with dims (sample, method, y, x); got {maps.dims}.")
    if not 0.0 < top_fraction <= 1.0:
        raise ZooauditError(f"top_fraction={top_fraction!r}: a fraction of the pixels in (0, 1].")
    values = maps.values.astype(np.float64)
    n, m = values.shape[:2]
    flat = values.reshape(n, m, -1)
    k = max(1, int(round(top_fraction * flat.shape[-1])))
    top = np.argsort(-flat, axis=-1, kind="stable")[..., :k]
    hot = np.zeros(flat.shape, bool)
    np.put_along_axis(hot, top, True, axis=-1)
    norms = np.linalg.norm(flat, axis=-1)
    ranked = [_dense_ranks(flat[:, i]) for i in range(m)] if n else []      # once per method
    names = ("spearman", "kendall", "top_overlap", "cosine")
    out = {name: np.full((m, m), np.nan) for name in names}
    count = {name: np.zeros((m, m), np.int64) for name in ("spearman", "kendall", "cosine")}
    for i in range(m):
        # the diagonal: 1 on every sample whose map is not constant (τ-b and ρ of a map with itself)
        if n:
            self_defined = np.where(ranked[i][0].max(1) > 0, 1.0, np.nan)
        for j in range(i, m):
            with np.errstate(invalid="ignore", divide="ignore"):
                cos = np.where(norms[:, i] * norms[:, j] > 0,
                               (flat[:, i] * flat[:, j]).sum(-1) / (norms[:, i] * norms[:, j]), np.nan)
            if not n:
                rho = tau = np.zeros(0)
            elif i == j:
                rho = tau = self_defined
            else:
                rho = _spearman_ranked(ranked[i][2], ranked[j][2])
                tau = _kendall_ranked(*ranked[i][:2], *ranked[j][:2])
            per_sample = {"spearman": rho, "kendall": tau, "cosine": cos}
            for name, v in per_sample.items():   # symmetric measures: one pair, both cells
                out[name][i, j], count[name][i, j] = out[name][j, i], count[name][j, i] = defined_mean(v)
            out["top_overlap"][i, j] = out["top_overlap"][j, i] = (
                (hot[:, i] & hot[:, j]).sum(-1).mean() / k if n else np.nan)
    methods = list(maps["method"].values)
    dims = ("method", "method_other")
    return xr.Dataset({**{name: (dims, v) for name, v in out.items()},
                       **{f"n_{name}": (dims, v) for name, v in count.items()}},
                      coords={"method": methods, "method_other": methods},
                      attrs={"top_fraction": top_fraction, "kendall": "tau-b",
                             "undefined": "NaN where no sample has the value defined (n_<measure> = 0): a constant "
                                          "map has no ranking, an all-zero map no direction"})
