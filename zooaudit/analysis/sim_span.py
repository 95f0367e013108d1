"""Wide layers in the streamed similarity pass: replace ``(n, p)`` by its row space ``(n, r)``.

The streamed pass keeps the joint ``(P, P)`` second moments of every layer (``P = Σ p``):
for a 16×32×32 feature map stored unpooled that is 16 384² float64 = 2 GiB per layer, and
more for the cross-layer blocks, whatever the number of samples — an audit of 60 samples
was killed for memory. When a layer has more features than samples, its centred rows
``Xc`` span at most ``r ≤ n − 1`` directions; with ``Xc Xcᵀ = Q Λ Qᵀ`` the ``(n, r)``
matrix ``Y = Q Λ^{1/2}`` has the same Gram matrix, so ``Y = Xc V`` for an orthonormal
``V (p, r)``: Y is X rotated into its own span and centred.

Every metric that depends on the rows only through inner products after column centring
is unchanged — linear CKA (biased and debiased), CCA, SVCCA and Procrustes (their
covariances are V-rotations of X's, restricted to the support their pseudo-inverses use).
PWCCA is not (its weights use the original units), so a request that includes it keeps
the original arrays.
"""

from __future__ import annotations

import numpy as np

from .blocks import nonfinite_rows_error, width
from .sim_stream import iter_row_blocks

# Row-space reduction when the layer is wider than its rows and its rows fit in this many
# float64 bytes (read once); otherwise the layer stays as it is.
MAX_REDUCE_BYTES = 2 * 2**30
ROTATION_INVARIANT = frozenset({"linear_cka", "linear_cka_debiased", "cca", "svcca", "procrustes"})


def reducible(x, metrics) -> bool:
    """Whether ``x (n, ...)`` is worth replacing by its row space for ``metrics``."""
    n, p = x.shape[0], width(x)
    return p > n and set(metrics) <= ROTATION_INVARIANT and n * p * 8 <= MAX_REDUCE_BYTES


def row_space(x, name: str = "X") -> np.ndarray:
    """``(n, r)`` float64 ``Y`` with ``Yc Ycᵀ = Xc Xcᵀ`` (centred columns), ``r ≤ n − 1``.

    ``x``: an ``(n, ...)`` array (NumPy, Dask or Zarr; trailing dims flattened), read once
    in row blocks. Directions with eigenvalue below ``n · eps · λ_max`` are dropped (at
    least one column is kept, so a constant layer stays a constant layer).
    """
    n = x.shape[0]
    rows = np.empty((n, width(x)), np.float64)
    for start, stop, (block,) in iter_row_blocks([x], rows=4096):
        if not np.isfinite(block).all():
            raise nonfinite_rows_error(name, block, start)
        rows[start:stop] = block
    rows -= rows.mean(0)
    gram = rows @ rows.T
    del rows
    lam, q = np.linalg.eigh((gram + gram.T) / 2)
    keep = lam > max(lam.max(initial=0.0), 0.0) * n * np.finfo(np.float64).eps
    if not keep.any():
        return np.zeros((n, 1))
    return q[:, keep] * np.sqrt(lam[keep])
