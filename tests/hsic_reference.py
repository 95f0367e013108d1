"""Independent test reference: Song et al. (2012), eq. (5), written out literally."""

import numpy as np


def song_hsic(k, l):
    """Unbiased HSIC of two n×n Gram matrices (diagonals zeroed on copies)."""
    n = k.shape[0]
    k, l = k.copy(), l.copy()
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l, 0.0)
    one = np.ones(n)
    return (np.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * (one @ k @ l @ one)) / (n * (n - 3))
