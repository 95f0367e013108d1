"""Centred kernel alignment: linear (streamed, biased and debiased), RBF, minibatch.

Conventions (X: ``(n, p)``, Y: ``(n, q)``, rows = the same samples):

- **Biased CKA** (Kornblith et al. 2019): ``HSIC₀(K, L) = tr(K H L H)/(n−1)²`` with the
  centring matrix ``H``; ``CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))``. For the
  linear kernel this is ``‖X̃ᵀỸ‖²_F / (‖X̃ᵀX̃‖_F ‖ỸᵀỸ‖_F)`` on column-centred data.
- **Debiased CKA** replaces HSIC₀ by the unbiased estimator of Song et al. (2012),
  ``HSIC₁(K, L) = [tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1/((n−1)(n−2)) − 2·1ᵀK̃L̃1/(n−2)] / (n(n−3))``
  with ``K̃``, ``L̃`` the Gram matrices with zeroed diagonals (needs n ≥ 4). It can be
  negative. For the linear kernel every term is computed in feature space from one
  streamed pass (:class:`~zooaudit.analysis.sim_stream.JointGram`): ``tr(K̃L̃) =
  ‖XᵀY‖²_F − Σᵢ aᵢbᵢ``, ``1ᵀK̃1 = ‖Xᵀ1‖² − Σᵢ aᵢ``, ``1ᵀK̃L̃1 = (Xs_x − a)ᵀ(Ys_y − b)``
  with row norms ``aᵢ = ‖xᵢ‖²``, ``bᵢ = ‖yᵢ‖²`` and ``s = Σᵢ rows`` — on data shifted by
  the first block's mean (HSIC₁ is exactly translation invariant).
- **Undefined values**: a representation with zero variance (every column constant)
  — or, debiased, a non-positive self-HSIC — makes CKA 0/0. The function then warns
  with :class:`~zooaudit.analysis.sim_checks.UndefinedSimilarityWarning` and returns
  NaN (in a matrix: NaN in that layer's row and column). Never a silent NaN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from ..errors import ZooauditError
from .blocks import as_matrix, is_dask, width
from .sim_checks import (
    check_bool,
    check_choice,
    check_gram_size,
    check_int,
    check_real,
    check_sample_ids,
    check_samples,
    dense,
    warn_undefined,
)
from .sim_stream import JointGram, joint_gram

KERNELS = ("linear", "rbf")
BANDWIDTH_SAMPLES = 2048   # rows used to pick the minibatch RBF bandwidth
MAX_BATCH = 10_000         # largest minibatch (a (b, b) Gram matrix in memory)


# -- linear CKA from streamed statistics -------------------------------------------------


def cka_from_stats(acc: JointGram, *, debiased: bool) -> np.ndarray:
    """``(m, m)`` linear CKA of every pair of layers in a finalized :class:`JointGram`."""
    C = acc.centred()
    const = acc.constant_layers(C)
    if debiased:
        H = _unbiased_hsic_from_stats(acc)
        bad = const | ~(np.diag(H) > 0)
    else:
        H = acc.block_sums(C * C)
        bad = const
    del C
    why = "zero variance or non-positive unbiased self-HSIC" if debiased else "zero variance"
    return _normalise_hsic(H, bad, acc.names, f"{'debiased' if debiased else 'biased'} linear CKA", f" ({why})")


def _normalise_hsic(H: np.ndarray, bad: np.ndarray, names, what: str, why: str) -> np.ndarray:
    """``(m, m)`` CKA ``H_ij / sqrt(H_ii H_jj)`` from the HSIC matrix ``H``; the rows and columns
    of the ``bad`` layers (undefined CKA) are NaN, with one warning naming them."""
    d = np.sqrt(np.where(bad, 1.0, np.abs(np.diag(H))))
    out = H / np.outer(d, d)
    if bad.any():
        out[bad, :] = np.nan
        out[:, bad] = np.nan
        which = ", ".join(repr(names[i]) for i in np.flatnonzero(bad))
        warn_undefined(f"{what} is undefined for {which}{why}; returning NaN for every pair involving it.")
    return out


def _unbiased_hsic_from_stats(acc: JointGram) -> np.ndarray:
    """``(m, m)`` Song et al.'s unbiased HSIC of the linear Gram matrices, from streamed sums."""
    n, T, s = acc.n, acc.T, acc.s
    Ts = T * s[None, :]
    W = acc.block_sums(Ts * s[:, None])                        # s_xᵀ T_xy s_y
    Fr = acc.block_sums(T * T)                                  # ‖T_xy‖²_F
    del Ts
    e = acc.edges[:-1]
    V = np.add.reduceat(acc.RZ * s[None, :], e, axis=1)         # V[x, y] = s_yᵀ RZ[x, y-block]
    S2 = np.add.reduceat(s * s, e)
    tr_kl = Fr - acc.RR
    sum_k = S2 - acc.A
    ones_kl = W - V - V.T + acc.RR
    h = tr_kl + np.outer(sum_k, sum_k) / ((n - 1) * (n - 2)) - 2.0 * ones_kl / (n - 2)
    return h / (n * (n - 3))


def _prepare(named: Mapping[str, object], debiased: bool):
    names = [str(k) for k in named]
    check_sample_ids(list(named.values()), names)
    arrays = [as_matrix(v, name) for name, v in zip(names, named.values())]
    if not arrays:
        raise ZooauditError("No representations given: pass a mapping {name: (n_samples, n_features) array}.")
    check_samples(arrays, names, min_samples=4 if debiased else 2)
    return names, arrays


def linear_cka(X, Y, *, debiased: bool = False) -> float:
    """Linear CKA between ``X (n, p)`` and ``Y (n, q)`` in one streamed pass.

    ``debiased=False``: Kornblith et al.'s biased estimator (in [0, 1]; inflated at
    small n). ``debiased=True``: the unbiased-HSIC estimator of Song et al. (2012),
    near 0 for independent data, possibly negative; needs n ≥ 4. Both are exact
    (float64 accumulation; float32 inputs are multiplied in float32 after per-block
    centring), invariant to orthogonal maps, isotropic scaling and translation.
    NumPy or Dask inputs; memory independent of n. A zero-variance input warns
    (:class:`UndefinedSimilarityWarning`) and gives NaN.
    """
    debiased = check_bool("debiased", debiased)
    names, arrays = _prepare({"X": X, "Y": Y}, debiased)
    acc = joint_gram(arrays, names=names, rownorms=debiased)
    return float(cka_from_stats(acc, debiased=debiased)[0, 1])


def cka_matrix(named: Mapping[str, object], *, debiased: bool = False, device=None) -> np.ndarray:
    """All-pairs linear CKA ``(m, m)`` of ``{name: (n, p_i)}`` from one joint pass over the rows.

    Row/column order follows the mapping. See :func:`linear_cka` for the estimators.
    ``device``: ``None`` = NumPy on the CPU; a torch device accumulates with torch there.
    """
    debiased = check_bool("debiased", debiased)
    names, arrays = _prepare(named, debiased)
    acc = joint_moments(arrays, names=names, rownorms=debiased, device=device)
    return cka_from_stats(acc, debiased=debiased)


def joint_moments(arrays, *, names=None, dtype=None, rownorms: bool = False, device=None) -> JointGram:
    """The streamed joint moments of ``arrays`` with NumPy (``device=None``, :func:`.sim_stream.joint_gram`)
    or with torch on ``device`` (:func:`.sim_torch.torch_joint_gram`, imported only then: torch is
    not needed on the NumPy path)."""
    if device is None:
        return joint_gram(arrays, names=names, dtype=dtype, rownorms=rownorms)
    from .sim_torch import torch_joint_gram

    return torch_joint_gram(arrays, device=device, names=names, dtype=dtype, rownorms=rownorms)


# -- Gram-matrix estimators (n × n, moderate n) --------------------------------------


def centre_gram(K: np.ndarray) -> np.ndarray:
    """``H K H`` in place (double centring of a symmetric ``(n, n)`` matrix)."""
    r = K.mean(axis=0)
    K -= r[None, :]
    K -= r[:, None]
    K += r.mean()
    return K


def u_centre_gram(K: np.ndarray) -> np.ndarray:
    """U-centring in place (Székely & Rizzo 2014): ``⟨K*, L*⟩/(n(n−3))`` is Song's unbiased HSIC."""
    n = K.shape[0]
    np.fill_diagonal(K, 0.0)
    r = K.sum(axis=0)
    total = r.sum()
    K -= r[None, :] / (n - 2)
    K -= r[:, None] / (n - 2)
    K += total / ((n - 1) * (n - 2))
    np.fill_diagonal(K, 0.0)
    return K


def _cka_of_centred(Kc: np.ndarray, Lc: np.ndarray, what: str) -> float:
    kl, kk, ll = float(np.vdot(Kc, Lc)), float(np.vdot(Kc, Kc)), float(np.vdot(Lc, Lc))
    if not (kk > 0 and ll > 0):
        return warn_undefined(f"{what} is undefined: a kernel has zero (or negative unbiased) self-HSIC; "
                              "returning NaN.")
    return kl / math.sqrt(kk * ll)


def _sq_distances(x: np.ndarray) -> np.ndarray:
    """``(n, n)`` squared Euclidean distances of centred rows (clipped at 0, zero diagonal)."""
    x = x - x.mean(axis=0)
    sq = np.einsum("ij,ij->i", x, x)
    D = x @ x.T
    D *= -2.0
    D += sq[:, None]
    D += sq[None, :]
    np.maximum(D, 0.0, out=D)
    np.fill_diagonal(D, 0.0)
    return D


def upper_triangle(D: np.ndarray) -> np.ndarray:
    """Condensed upper triangle (``i < j``, row-major, like ``scipy.spatial.distance.squareform``)."""
    n = D.shape[0]
    out = np.empty(n * (n - 1) // 2, D.dtype)
    off = 0
    for i in range(n - 1):
        out[off:off + n - 1 - i] = D[i, i + 1:]
        off += n - 1 - i
    return out


def median_sq_distance(x: np.ndarray) -> float:
    """Median of the squared distances over distinct pairs ``i < j`` (diagonal excluded)."""
    D = _sq_distances(x)
    return float(np.median(upper_triangle(D), overwrite_input=True))


def rbf_gram(x: np.ndarray, sigma2: float) -> np.ndarray:
    """``K_ij = exp(−‖xᵢ − xⱼ‖² / (2σ²))`` ``(n, n)``."""
    K = _sq_distances(x)
    K *= -1.0 / (2.0 * sigma2)
    return np.exp(K, out=K)


def _bandwidth2(x: np.ndarray, threshold: float, name: str) -> float | None:
    med = median_sq_distance(x)
    if not med > 0:
        return None
    return threshold * threshold * med


def rbf_cka(X, Y, *, threshold: float = 1.0, debiased: bool = False) -> float:
    """CKA with Gaussian RBF kernels between ``X (n, p)`` and ``Y (n, q)``.

    Kernel ``k(x, x') = exp(−‖x − x'‖² / (2σ²))`` with bandwidth
    ``σ = threshold · sqrt(median squared pairwise distance)``, the median taken over
    the n(n−1)/2 distinct pairs (Kornblith et al.'s reference code also counts the
    zero diagonal), separately for X and Y. ``debiased`` selects Song et al.'s
    unbiased HSIC (needs n ≥ 4) instead of the biased ``tr(KHLH)``.

    Exact, from n×n matrices held in memory: refused above
    :data:`~zooaudit.analysis.sim_checks.MAX_GRAM_SAMPLES` samples — use
    :func:`minibatch_cka` with ``kernel="rbf"`` there. Invariant to translation,
    orthogonal maps and isotropic scaling (the bandwidth scales with the data).
    A representation whose median pairwise distance is 0 warns and gives NaN.
    """
    threshold = check_real("threshold", threshold, low=0.0, low_open=True)
    debiased = check_bool("debiased", debiased)
    check_sample_ids([X, Y], ["X", "Y"])
    X, Y = as_matrix(X, "X"), as_matrix(Y, "Y")
    n = check_samples([X, Y], ["X", "Y"], min_samples=4 if debiased else 2)
    check_gram_size(n, "rbf_cka", "Use minibatch_cka(X, Y, kernel='rbf', batch_size=...) for large n.")
    x, y = dense(X, "X"), dense(Y, "Y")
    s2x, s2y = _bandwidth2(x, threshold, "X"), _bandwidth2(y, threshold, "Y")
    if s2x is None or s2y is None:
        return warn_undefined("RBF CKA is undefined: the median pairwise distance of "
                              f"{'X' if s2x is None else 'Y'} is 0 (zero variance or mostly duplicate rows); "
                              "returning NaN.")
    K, L = rbf_gram(x, s2x), rbf_gram(y, s2y)
    centre = u_centre_gram if debiased else centre_gram
    return _cka_of_centred(centre(K), centre(L), "RBF CKA")


# -- minibatch CKA (Nguyen et al. 2021) ----------------------------------------------


def _batch_gram(rows: np.ndarray, kernel: str, sigma2: float | None) -> np.ndarray:
    if kernel == "linear":
        rows = rows - rows.mean(axis=0)      # HSIC₁ is translation invariant; this only helps precision
        return rows @ rows.T
    return rbf_gram(rows, sigma2)


def minibatch_cka(X, Y, *, kernel: str = "linear", batch_size: int = 1024, random_state=None,
                  threshold: float = 1.0, shuffle: bool = True) -> float:
    """Minibatch CKA (Nguyen, Raghu & Kornblith 2021) between ``X (n, p)`` and ``Y (n, q)``.

    The samples are split into ``n // batch_size`` disjoint minibatches of near-equal
    size (between ``batch_size`` and ``2·batch_size − 1`` rows; all samples used; one
    minibatch of all rows when ``batch_size ≥ n``),
    at random (``random_state``) unless ``shuffle=False`` (contiguous rows, in
    order — for data already in random order; cheaper on chunked Dask arrays, where
    a shuffled minibatch is gathered from every chunk). Per minibatch, the unbiased
    HSIC₁ (Song et al. 2012) of K·L, K·K and L·L is computed from ``(b, b)`` Grams;
    numerators and denominators are summed over minibatches, then divided:
    ``Σ HSIC₁(K, L) / sqrt(Σ HSIC₁(K, K) · Σ HSIC₁(L, L))`` — never an average of
    per-batch CKAs, which is biased. Memory ``O(batch_size² + batch_size·(p + q))``.

    ``kernel="linear"`` (the default: an estimate of ``linear_cka(X, Y,
    debiased=True)``) or ``"rbf"`` (of ``rbf_cka(X, Y, debiased=True)``); the RBF
    bandwidth is fixed per representation
    for all minibatches: ``σ = threshold · sqrt(median squared pairwise distance)``
    over a random subsample of :data:`BANDWIDTH_SAMPLES` rows (all rows when n is
    smaller, matching :func:`rbf_cka`). With one minibatch and ``kernel="linear"``
    this equals ``linear_cka(X, Y, debiased=True)``.
    """
    check_sample_ids([X, Y], ["X", "Y"])
    X, Y = as_matrix(X, "X"), as_matrix(Y, "Y")
    check_samples([X, Y], ["X", "Y"], min_samples=4)
    return float(minibatch_cka_pairs([X, Y], ["X", "Y"], kernel=kernel, batch_size=batch_size,
                                     random_state=random_state, threshold=threshold, shuffle=shuffle)[0, 1])


def minibatch_cka_pairs(arrays, names, *, kernel: str = "linear", batch_size: int = 1024, random_state=None,
                        threshold: float = 1.0, shuffle: bool = True) -> np.ndarray:
    """``(m, m)`` minibatch CKA of every pair of ``arrays`` (``(n, p_i)``, validated, same rows).

    The same minibatches (one permutation from ``random_state``) and the same
    bandwidth subsample serve every pair, so entry ``[i, j]`` equals
    ``minibatch_cka(arrays[i], arrays[j], ...)`` with the same options. Per
    minibatch every array's U-centred Gram is built once and all pairwise inner
    products come from one GEMM: memory ``O(m·b²)``. Lazy (Dask/Zarr) inputs are
    read a group of minibatches at a time (about ``TARGET_BLOCK_BYTES`` of rows;
    each group is one gather over the chunks). Representations whose summed self-HSIC
    is not positive get NaN rows/columns and an :class:`UndefinedSimilarityWarning`.
    """
    from sklearn.utils import check_random_state

    from .sim_stream import TARGET_BLOCK_BYTES

    kernel = check_choice("kernel", kernel, KERNELS)
    threshold = check_real("threshold", threshold, low=0.0, low_open=True)
    shuffle = check_bool("shuffle", shuffle)
    n = int(arrays[0].shape[0])
    batch_size = min(n, check_int("batch_size", batch_size, low=4, high=MAX_BATCH,
                                  hint=f"Minibatches need at least 4 samples; each is an in-memory Gram matrix "
                                       f"(at most {MAX_BATCH} rows)."))
    rng = check_random_state(random_state)
    order = rng.permutation(n) if shuffle else np.arange(n)
    batches = [np.sort(b) for b in np.array_split(order, n // batch_size)]
    s2: list[float | None] = [None] * len(arrays)
    if kernel == "rbf":
        sub = np.sort(rng.choice(n, BANDWIDTH_SAMPLES, replace=False)) if n > BANDWIDTH_SAMPLES else np.arange(n)
        s2 = [_bandwidth2(_rows(a, sub, name), threshold, name) for a, name in zip(arrays, names)]
    m = len(arrays)
    H = np.zeros((m, m))
    # RBF: an array without a bandwidth (median distance 0) keeps self-HSIC 0 → NaN below
    live = [i for i in range(m) if kernel == "linear" or s2[i] is not None]
    lazy = not all(isinstance(a, np.ndarray) for a in arrays)
    row_bytes = 8 * sum(width(a) for a in arrays)
    per_group = max(1, TARGET_BLOCK_BYTES // max(1, row_bytes * batch_size)) if lazy else 1
    for g in range(0, len(batches), per_group):
        group = batches[g:g + per_group]
        rows = np.concatenate(group) if len(group) > 1 else group[0]
        order_g = np.argsort(rows, kind="stable")
        rows = rows[order_g]
        # one gather per group of minibatches: a shuffled minibatch touches every chunk
        data = [_rows(arrays[i], rows, names[i]) for i in live]
        for idx in group:
            pos = np.searchsorted(rows, idx)
            G = np.empty((len(live), len(idx) * len(idx)))
            for r, (i, d) in enumerate(zip(live, data)):
                K = u_centre_gram(_batch_gram(d[pos], kernel, s2[i]))
                G[r] = K.ravel()
            scale = 1.0 / (len(idx) * (len(idx) - 3))   # ⟨K*, L*⟩ / (b(b−3)) is this batch's HSIC₁
            H[np.ix_(live, live)] += scale * (G @ G.T)
    # off the bad layers the self-HSIC is > 0, so the abs in _normalise_hsic changes nothing
    return _normalise_hsic(H, ~(np.diag(H) > 0), names, f"minibatch {kernel} CKA",
                           ": " + ("a zero median pairwise distance or " if kernel == "rbf" else "")
                           + "zero unbiased self-HSIC in every minibatch")


def _rows(A, idx: np.ndarray, name: str) -> np.ndarray:
    if is_dask(A) or not isinstance(A, np.ndarray):
        if len(idx) and idx[-1] - idx[0] + 1 == len(idx):   # contiguous: a plain slice reads fewer chunks
            part = A[int(idx[0]):int(idx[-1]) + 1]
        elif is_dask(A) or not hasattr(A, "oindex"):
            part = A[idx]
        else:                                                # Zarr: orthogonal selection of rows
            part = A.oindex[idx]
        return dense(part, name)
    return dense(A[idx], name)
