"""Factorization of ``(n_samples, n_features)`` activations: PCA, NMF, semi-NMF, DFF,
sparse autoencoders, plus Eigen-CAM and the quality measures.

Every method takes ``A`` of shape ``(N, D)`` — NumPy or Dask, extra trailing dims
flattened — and returns a :class:`Factorization` with ``A ≈ codes @ components + mean``,
``components (k, D)`` of unit-norm rows and ``codes (N, k)``. Its ``metrics`` are those
of :mod:`.quality` (explained variance with sums taken before the ratio, MSE, mean
cosine, L0, sparsity, dead components), computed in one streamed pass at the end.

Large Dask inputs are never materialised by ``pca`` (2 passes with the exact covariance
solver, ``n_passes + 1`` with the randomized one) nor by ``nmf`` / ``semi_nmf`` with
``solver="minibatch"``; pass ``codes="dask"`` to get the codes as a lazy Dask array
too (memory then stays flat in N). Errors for bad input are :class:`ZooauditError`
naming the layer (``name=``) and what is allowed.

The fits live in :mod:`.decompose` (PCA, NMF, semi-NMF, DFF) and :mod:`.sae`, the
record in :mod:`.factorization`, the measures in :mod:`.quality`, seed stability and
the k sweep in :mod:`.stability`, the method declarations in :mod:`.factor_methods`;
this module is the one place to import them from.
"""

from __future__ import annotations

from .decompose import dff, is_nonnegative, nmf, pca, semi_nmf
from .eigencam import eigencam
from .factor_methods import FACTOR_METHODS, FactorMethod, factor_method
from .factorization import Factorization
from .quality import explained_variance
from .sae import sae
from .stability import Stability, k_sweep, matched_cosine, stability

__all__ = ["FACTOR_METHODS", "FactorMethod", "Factorization", "Stability", "dff", "eigencam", "explained_variance",
           "factor_method", "is_nonnegative", "k_sweep", "matched_cosine", "nmf", "pca", "sae", "semi_nmf",
           "stability"]
