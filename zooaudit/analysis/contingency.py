"""Permutation nulls as random contingency tables: shuffling one label among the units of a
stratum leaves both margins of the stratum's (row key × column key) count table fixed, and every
such table arises with the multivariate-hypergeometric probability. Drawing the tables directly
costs O(draws · cells) instead of O(draws · samples) and needs no per-sample arrays."""

from __future__ import annotations

import numpy as np


def random_tables(N: np.ndarray, n_draws: int, rng) -> np.ndarray:
    """``(n_draws, R, C)`` tables with the row and column sums of ``N`` ``(R, C)``, each distributed as the
    table after a uniform random permutation of the column labels among the ``N.sum()`` units.

    Sequential: row ``r`` takes a multivariate-hypergeometric draw of its size from the columns'
    remaining counts (one vectorised call for the first row; per draw for rows 2..R−1)."""
    N = np.asarray(N, dtype=np.int64)
    R, C = N.shape
    out = np.zeros((n_draws, R, C), np.int64)
    rows, cols = N.sum(1), N.sum(0)
    if R == 1 or C == 1:
        out[:] = N
        return out
    out[:, 0] = rng.multivariate_hypergeometric(cols, int(rows[0]), size=n_draws)
    remaining = cols[None, :] - out[:, 0]
    for r in range(1, R - 1):
        for b in range(n_draws):
            out[b, r] = rng.multivariate_hypergeometric(remaining[b], int(rows[r]))
        remaining -= out[:, r]
    out[:, R - 1] = remaining
    return out


def permuted_tables(strata, row_keys, col_keys, counts, n_draws: int, rng):
    """Random tables within each stratum, over the distinct (row key, column key) cells.

    Args:
        strata, row_keys, col_keys, counts: ``(k,)`` per distinct cell (a row key determines its stratum).
    Returns:
        ``(row_keys (K,), col_keys (K,), weights (n_draws, K))`` over every (row, column) pair of a stratum.
    """
    strata, row_keys, col_keys = (np.asarray(a) for a in (strata, row_keys, col_keys))
    counts = np.asarray(counts, dtype=np.int64)
    out_r, out_c, out_w = [], [], []
    for s in np.unique(strata):
        m = strata == s
        r_u, r_i = np.unique(row_keys[m], return_inverse=True)
        c_u, c_i = np.unique(col_keys[m], return_inverse=True)
        N = np.zeros((len(r_u), len(c_u)), np.int64)
        np.add.at(N, (r_i.ravel(), c_i.ravel()), counts[m])
        rr, cc = np.meshgrid(r_u, c_u, indexing="ij")
        out_r.append(rr.ravel())
        out_c.append(cc.ravel())
        out_w.append(random_tables(N, n_draws, rng).reshape(n_draws, -1))
    return np.concatenate(out_r), np.concatenate(out_c), np.concatenate(out_w, axis=1)


def table_cells(strata, row_keys, col_keys) -> int:
    """How many cells :func:`permuted_tables` returns (Σ over strata of rows × columns)."""
    strata, row_keys, col_keys = (np.asarray(a) for a in (strata, row_keys, col_keys))
    return int(sum(np.unique(row_keys[strata == s]).size * np.unique(col_keys[strata == s]).size
                   for s in np.unique(strata)))
