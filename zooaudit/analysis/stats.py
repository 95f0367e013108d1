"""Streaming sufficient statistics over chunked arrays.

:class:`Moments` keeps the count, the mean and the *centred* co-moment matrix
``M2 = Σ (x − μ)(x − μ)ᵀ`` in float64 and merges blocks with Chan et al.'s
pairwise update. Centring each block before accumulating keeps ~1e-8 accuracy on
data offset by +100, where raw float32 moments ``XᵀX − nμμᵀ`` lose ~1e-3.
One pass over the rows; memory O(p²) for p = total feature count, independent of n.
"""

from __future__ import annotations

import numpy as np

from .blocks import ROW_BLOCK, compute_here  # re-exported: the stages import compute_here from here

__all__ = ["ROW_BLOCK", "Moments", "compute_here"]


class Moments:
    """Count, mean ``(p,)`` and centred co-moment ``(p, p)`` of rows seen so far."""

    def __init__(self, p: int):
        self.n = 0
        self.mean = np.zeros(p, np.float64)
        self.m2 = np.zeros((p, p), np.float64)

    def update(self, block: np.ndarray) -> Moments:
        """Add a ``(b, p)`` block of rows."""
        block = np.asarray(block, dtype=np.float64)
        b = block.shape[0]
        if b == 0:
            return self
        mean_b = block.mean(axis=0)
        centred = block - mean_b
        m2_b = centred.T @ centred
        n = self.n + b
        delta = mean_b - self.mean
        self.m2 += m2_b + np.outer(delta, delta) * (self.n * b / n)
        self.mean += delta * (b / n)
        self.n = n
        return self

    def cov(self, ddof: int = 0) -> np.ndarray:
        """Covariance ``M2 / (n − ddof)``."""
        return self.m2 / (self.n - ddof)
