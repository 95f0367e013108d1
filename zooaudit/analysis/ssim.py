"""Structural similarity (SSIM, Wang et al. 2004) of image-like arrays, batched over samples.

Pure NumPy (no scikit-image). Conventions, those of Wang et al.'s reference implementation
(``ssim_index.m``):

- the local statistics are weighted by an ``win_size × win_size`` window — ``"gaussian"``
  (default, ``σ = 1.5``, 11 × 11, weights normalised to sum 1) or ``"uniform"`` (all
  ``1 / win_size²``) — evaluated only where the window lies wholly inside the image (no
  padding: ``(H − win + 1) × (W − win + 1)`` positions);
- ``μ`` the weighted means, ``σ²``, ``σ_xy`` the weighted (population) variances and covariance;
- ``SSIM = (2 μ_x μ_y + C₁)(2 σ_xy + C₂) / ((μ_x² + μ_y² + C₁)(σ_x² + σ_y² + C₂))`` with
  ``C₁ = (K₁ L)²``, ``C₂ = (K₂ L)²``, ``K₁ = 0.01``, ``K₂ = 0.03``, ``L = data_range`` (1: the
  inputs are scaled to [0, 1]);
- the image's SSIM is the mean of the local values (MSSIM).

:func:`ssim_maps` compares attribution maps: each map min–max scaled to [0, 1] first (so
``L = 1``); a constant map has no structure to compare and gives NaN.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..errors import ZooauditError

__all__ = ["WINDOWS", "ssim", "ssim_maps"]

WINDOWS = ("gaussian", "uniform")


def _weights(window: str, win_size: int, sigma: float) -> np.ndarray:
    """``(win_size,)`` 1-D weights summing to 1; the 2-D window is their outer product."""
    if window == "uniform":
        return np.full(win_size, 1.0 / win_size)
    g = np.exp(-((np.arange(win_size) - (win_size - 1) / 2) ** 2) / (2 * sigma**2))
    return g / g.sum()


def _filter(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``(n, H, W)`` → ``(n, H − k + 1, W − k + 1)``: the separable weighted sum over every window."""
    k = len(w)
    rows = sliding_window_view(x, k, axis=1) @ w          # (n, H − k + 1, W)
    return sliding_window_view(rows, k, axis=2) @ w       # (n, H − k + 1, W − k + 1)


def ssim(a, b, *, window: str = "gaussian", win_size: int = 11, sigma: float = 1.5, k1: float = 0.01,
         k2: float = 0.03, data_range: float = 1.0) -> np.ndarray:
    """``(sample,)`` mean SSIM between ``a`` and ``b`` ``(sample, y, x)`` (conventions: module doc)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 3:
        raise ZooauditError(f"ssim needs two (sample, y, x) arrays of the same shape; got {a.shape}, {b.shape}.")
    if window not in WINDOWS:
        raise ZooauditError(f"Unknown SSIM window {window!r}. Allowed: {', '.join(WINDOWS)}.")
    if isinstance(win_size, bool) or not isinstance(win_size, (int, np.integer)) or win_size < 1:
        raise ZooauditError(f"ssim win_size={win_size!r}: a positive integer.")
    if win_size > min(a.shape[1:]):
        raise ZooauditError(f"ssim win_size={win_size} exceeds the images' size {a.shape[1:]}: the window must fit "
                            "inside the image (no padding).")
    if not data_range > 0 or not sigma > 0:
        raise ZooauditError(f"ssim needs data_range > 0 and sigma > 0; got {data_range!r}, {sigma!r}.")
    w = _weights(window, int(win_size), sigma)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mu_a, mu_b = _filter(a, w), _filter(b, w)
    var_a = _filter(a * a, w) - mu_a**2
    var_b = _filter(b * b, w) - mu_b**2
    cov = _filter(a * b, w) - mu_a * mu_b
    local = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return local.mean((1, 2))


def _unit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-map min–max scaling to [0, 1] and ``(sample,)`` whether the map is non-constant."""
    lo = x.min((1, 2), keepdims=True)
    span = x.max((1, 2), keepdims=True) - lo
    ok = span[:, 0, 0] > 0
    return (x - lo) / np.where(span > 0, span, 1), ok


def ssim_maps(a, b, *, win_size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """``(sample,)`` SSIM between two map sets ``(sample, y, x)`` after min–max scaling each map
    to [0, 1] (``data_range`` 1, gaussian window); NaN where either map is constant."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 3:
        raise ZooauditError(f"ssim_maps needs two map sets (sample, y, x) of the same shape; got {a.shape}, "
                            f"{b.shape}.")
    (ua, ok_a), (ub, ok_b) = _unit(a), _unit(b)
    return np.where(ok_a & ok_b, ssim(ua, ub, win_size=win_size, sigma=sigma), np.nan)
