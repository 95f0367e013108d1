"""NMF and semi-NMF solvers in torch: the same code on the CPU or a GPU.

Convention: ``X (N, D) ≈ Wᵀ H`` with the codes stored transposed, ``Wt (k, N)``, and
``H (k, D)``, so that every factor row a sweep touches is contiguous in memory.
``W ≥ 0`` always; ``H ≥ 0`` for NMF, free for semi-NMF (Ding et al. 2010).

- :func:`hals_rows` is one sweep of HALS / cyclic coordinate descent over the rows of
  a factor. It is the element update of scikit-learn's ``solver="cd"``
  (``_update_cdnmf_fast``) vectorised over samples, and returns the same
  projected-gradient "violation" so that ``tol`` means what it means in scikit-learn.
  The W step is valid for signed ``H`` too (it is an exact NNLS coordinate step).
- :func:`fit_full` alternates W and H steps on an in-memory tensor; its two data products
  per iteration come from :func:`data_products` (the fastest BLAS layout, timed).
- :func:`fit_minibatch` streams row blocks: per block it solves the codes for the
  current ``H``, folds ``WᵀW`` and ``WᵀX`` into running sufficient statistics with a
  running sufficient statistics (Mairal et al. 2010; the role of scikit-learn's
  MiniBatchNMF statistics), and updates ``H`` from the statistics alone. Instead of a
  forgetting factor, last epoch's statistics stand in for the samples not yet seen
  this epoch, which converges faster here. Memory is one block plus O(k·D).
- :func:`nndsvd_start` builds NNDSVD(a) starts (Boutsidis & Gallopoulos 2008, as in
  scikit-learn) from the streamed Gram's eigenvectors; ``H`` needs one extra pass,
  ``W`` only when the data is in memory.
"""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import os

import numpy as np
import torch

from ..devices import cpu_threads
from .blocks import iter_blocks, load_rows, row_bounds
from .eigencam import Scan, check_rank, finish_scan, top_eigenpairs

NNDSVD_EPS = 1e-6  # scikit-learn zeroes NNDSVD entries below this before filling


def torch_dtype(np_dtype) -> torch.dtype:
    """float32 data is factorized in float32 (GPU speed); everything else in float64."""
    return torch.float32 if np.dtype(np_dtype) == np.float32 else torch.float64


def to_tensor(x: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(x)).to(device=device, dtype=dtype)


def hals_rows(F: torch.Tensor, G: torch.Tensor, S: torch.Tensor, nonneg: bool = True,
              work: torch.Tensor | None = None) -> torch.Tensor:
    """One HALS sweep over the rows of ``F (k, n)``, in place.

    Minimises ``½‖X − Fᵀ B‖²`` over ``F`` given ``G = B Xᵀ (k, n)`` and ``S = B Bᵀ (k, k)``:
    ``F_t ← max(0, F_t + (G_t − S_t F) / S_tt)``, rows in order. Returns the summed
    |projected gradient| before each row's update (scikit-learn's violation), float64.

    Three calls per row (one fused GEMV writing the step ``(G_t − S_t F) / S_tt`` into
    ``work (k, n)``, reused between sweeps when given; an in-place add; an in-place clip);
    the violation comes from the stored steps after the sweep (``grad = −S_tt · step``).
    Every column of ``F`` is updated independently of the others, so on a CPU with more than
    one torch thread and at least ``PARALLEL_COLUMNS`` columns the columns are split into one
    part per thread, each swept by a Python thread on one torch thread (torch releases the GIL
    in its kernels); below that, one thread (short vector ops: a pool only adds overhead).
    """
    step = torch.empty_like(F) if work is None else work
    threads = torch.get_num_threads()
    if F.device.type != "cpu" or threads == 1:
        return _sweep(F, G, S, nonneg, step)
    with cpu_threads(F.device, 0):
        n = F.shape[1]
        parts = min(threads, n // PARALLEL_COLUMNS)
        if parts <= 1:
            return _sweep(F, G, S, nonneg, step)
        cols = [slice(int(a), int(b)) for a, b in itertools.pairwise(np.linspace(0, n, parts + 1).astype(int))]
        pool = _sweep_pool(parts, os.getpid())
        done = [pool.submit(_sweep, F[:, c], G[:, c], S, nonneg, step[:, c]) for c in cols]
        return sum(f.result() for f in done)


PARALLEL_COLUMNS = 1 << 15  # columns per thread below which a sweep runs on one thread


@functools.cache
def _sweep_pool(threads: int, pid: int) -> concurrent.futures.ThreadPoolExecutor:
    """One pool per thread count and process (a forked child gets its own: threads do not survive fork)."""
    return concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="zooaudit-hals")


def _sweep(F: torch.Tensor, G: torch.Tensor, S: torch.Tensor, nonneg: bool, step: torch.Tensor) -> torch.Tensor:
    """:func:`hals_rows` on the calling thread, ``step`` the ``(k, n)`` work buffer."""
    hess = S.diagonal().tolist()  # one host sync per sweep, not per row
    # row t changes only at its own update, so its sign pattern now is the one its gradient is projected on
    was_pos = F > 0 if nonneg else None
    FT = F.T  # a view: Fᵀ S_t is one GEMV, no copy
    for h, row, g, s, st in zip(hess, F, G, S, step):  # iterating a tensor gives row views
        if h > 0:
            torch.addmv(g, FT, s, beta=1.0 / h, alpha=-1.0 / h, out=st)
            row.add_(st)
            if nonneg:
                row.clamp_(min=0)
        else:  # S_tt = 0: row t of B is zero, so are S_t and G_t, and the gradient
            st.zero_()
    # |pg| / S_tt: |step| where the entry was > 0; where it was 0 only a step up counts (grad < 0).
    # Row sums in the data's dtype (torch sums in cascades), the weighted total in float64.
    pg = torch.where(was_pos, step, step.clamp(min=0)).abs_() if nonneg else step.abs()
    return pg.sum(1).double() @ S.diagonal().to(device=F.device, dtype=torch.float64)


def _solve_sym(S: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """``S⁻¹ G`` for a PSD ``S (k, k)``; the pseudo-inverse keeps dead components finite."""
    return torch.linalg.pinv(S, hermitian=True) @ G


def _codes_rhs(x: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """``H xᵀ (k, b)``, contiguous, computed as ``(x Hᵀ)ᵀ``."""
    return (x @ H.T).T.contiguous()


LAYOUT_COPY_BYTES = 1 << 30  # largest column-major copy of the data the CPU full-batch loop makes


def data_products(X: torch.Tensor):
    """The two data products of an alternating iteration on ``X (N, D)``, as two functions:
    ``rhs_w(H) = H Xᵀ (k, N)`` and ``rhs_h(Wt) = Wt X (k, D)``, both contiguous.

    On the CPU (copy ≤ ``LAYOUT_COPY_BYTES``) both products are computed from one column-major
    copy of ``X``: BLAS runs these skinny GEMMs (k ≪ D ≪ N) with different kernels per layout,
    and on the 2-core dev box (MKL, 100k × 512, k = 16) the column-major layout took 22 / 21 ms
    against 34 / 28 ms for the best row-major one at 2 threads (39 / 35 against 48 / 36 at 1
    thread) — 20 ms saved per iteration for a one-off transposing copy. The cost is memory: one
    more ``N × D`` array while the fit runs. Without the copy (GPU, or larger data) the row-major
    products are used.

    The layout is chosen by this fixed rule, never by timing: the layouts are mathematically
    equal but not bitwise (a few ulps apart), and a resumed audit must reproduce the arrays of an
    uninterrupted one bit for bit (an earlier version timed the layouts against each other and
    picked the faster, so machine noise changed the committed codes).
    """
    if X.device.type == "cpu" and X.numel() * X.element_size() <= LAYOUT_COPY_BYTES:
        Xc = X.T.contiguous().T  # (N, D) view of column-major storage
        return (lambda H: _codes_rhs(Xc, H)), (lambda Wt: (Xc.T @ Wt.T).T.contiguous())
    return (lambda H: _codes_rhs(X, H)), (lambda Wt: Wt @ X)


def solve_codes(x: torch.Tensor, H: torch.Tensor, *, max_iter: int, tol: float = 0.0) -> torch.Tensor:
    """Codes ``Wt (k, b) ≥ 0`` of a block ``x (b, D)`` for fixed ``H (k, D)`` (any sign).

    Starts from the clipped least-squares solution and runs HALS sweeps until the
    violation falls to ``tol`` of the first sweep's (or ``max_iter`` sweeps).
    """
    P = _codes_rhs(x, H)
    Q = H @ H.T
    Wt = _solve_sym(Q, P).clamp_(min=0)
    work = torch.empty_like(Wt)
    v0 = None
    for _ in range(max_iter):
        v = float(hals_rows(Wt, P, Q, work=work))
        v0 = v if v0 is None else v0
        if v0 == 0 or v <= tol * v0:
            break
    return Wt


def fit_full(X: torch.Tensor, Wt: torch.Tensor, H: torch.Tensor, *, max_iter: int, tol: float,
             signed: bool = False, update: str = "hals") -> int:
    """Alternate W and H steps on an in-memory ``X (N, D)``; ``Wt``, ``H`` updated in place.

    NMF (``signed=False``): HALS on both factors (scikit-learn's CD), stop when the
    violation falls to ``tol`` of the first iteration's. Semi-NMF (``signed=True``):
    ``H`` is the least-squares solution ``(WᵀW)⁻¹ WᵀX``; ``W`` by Ding et al.'s
    multiplicative update (``update="mu"``) or one HALS sweep (``"hals"``); stop when the
    objective's decrease over 10 iterations falls below ``tol`` of the initial objective.
    Returns the number of iterations.
    """
    rhs_w, rhs_h = data_products(X)
    if not signed:
        work_w, work_h = torch.empty_like(Wt), torch.empty_like(H)  # the sweeps' step buffers, reused
        v0 = None
        for it in range(1, max_iter + 1):
            v = hals_rows(Wt, rhs_w(H), H @ H.T, work=work_w)
            v += hals_rows(H, rhs_h(Wt), Wt @ Wt.T, work=work_h)
            v0 = float(v) if v0 is None else v0
            if v0 == 0 or float(v) <= tol * v0:
                return it
        return max_iter
    norm_x = float(torch.sum(X.double() ** 2))
    first = last = None
    for it in range(1, max_iter + 1):
        S = Wt @ Wt.T
        H.copy_(_solve_sym(S, rhs_h(Wt)))
        P, Q = rhs_w(H), H @ H.T
        if update == "hals":
            hals_rows(Wt, P, Q)
        else:  # Ding et al. (2010) eq. 9, transposed: G ← G ∘ sqrt((P⁺ + Q⁻G) / (P⁻ + Q⁺G))
            num = P.clamp(min=0) + (-Q).clamp(min=0) @ Wt
            den = (-P).clamp(min=0) + Q.clamp(min=0) @ Wt
            # as sqrt(G · num · (G / den)): den ≥ Q_tt·G, so G / den stays bounded where
            # num / den would overflow for vanishing G
            ratio = torch.where(den > 0, Wt / torch.where(den > 0, den, 1.0), 0.0)
            Wt.copy_(torch.sqrt(Wt * num * ratio))
        if it % 10 == 1 or it == max_iter:
            # ‖X − WᵀH‖² from the factors' statistics, in float64
            obj = norm_x - 2 * float((Wt.double() * P.double()).sum()) \
                + float(((Wt @ Wt.T).double() * Q.double()).sum())
            if first is None:
                first = last = obj
            elif last - obj <= tol * first:
                return it
            last = obj
    return max_iter


def fit_minibatch(A, H: torch.Tensor, *, signed: bool, max_epochs: int, tol: float, batch_size: int | None,
                  inner_iter: int, rng: np.random.Generator, device, dtype, h_sweeps: int = 5) -> int:
    """Out-of-core fit of ``H (k, D)`` (updated in place) over the row chunks of ``A``.

    Each epoch visits the chunks in a seeded random order (rows of a chunk split into
    ``batch_size`` rows). Per batch the codes are solved for the current ``H`` and their
    statistics ``WᵀW``, ``WᵀX`` added to this epoch's sums; ``H`` is then refit to
    ``this epoch's sums + (unseen fraction of N) × last epoch's sums`` — every sample
    counted once, with its freshest codes — by ``h_sweeps`` HALS sweeps (NMF) or least
    squares (semi-NMF). Memory: one chunk plus four O(k·D) arrays, independent of N.
    Stops when an epoch changes ``H`` by at most ``tol`` (relative Frobenius norm).
    Returns the number of epochs run.
    """
    k, d = H.shape
    n = A.shape[0]
    S_old = torch.zeros((k, k), dtype=torch.float64, device=device)
    G_old = torch.zeros((k, d), dtype=torch.float64, device=device)
    bounds = row_bounds(A)
    for epoch in range(1, max_epochs + 1):
        before, seen = H.clone(), 0
        S_new, G_new = torch.zeros_like(S_old), torch.zeros_like(G_old)
        for i in rng.permutation(len(bounds)):
            start, stop = bounds[i]
            x_all = to_tensor(load_rows(A, start, stop), device, dtype)
            for x in torch.split(x_all, batch_size or len(x_all)):
                Wt = solve_codes(x, H, max_iter=inner_iter)
                S_new += (Wt @ Wt.T).double()
                G_new += (Wt @ x).double()
                seen += x.shape[0]
                unseen = (n - seen) / n
                S, G = S_new + unseen * S_old, G_new + unseen * G_old
                if signed:
                    H.copy_(_solve_sym(S, G))
                else:
                    H64 = H.double()
                    work = torch.empty_like(H64)
                    for _ in range(h_sweeps):
                        hals_rows(H64, G, S, work=work)
                    H.copy_(H64)
        S_old, G_old = S_new, G_new
        change = float(torch.linalg.norm(H - before) / torch.linalg.norm(before).clamp(min=1e-300))
        if change <= tol:
            return epoch
    return max_epochs


def scan(A, name: str, method: str, hook) -> Scan:
    """One pass for the count, sums, minimum and finiteness (random starts need no Gram)."""
    sc = Scan(A.shape[1])
    for _, _, x in iter_blocks(A):
        sc.update(x)
    finish_scan(sc, name, method, hook)
    return sc


def random_start(sc: Scan, k: int, d: int, n: int | None, rng: np.random.Generator):
    """scikit-learn's ``init="random"``: ``|N(0, 1)| · sqrt(mean(X) / k)``; ``W`` only if ``n``."""
    avg = np.sqrt(max(sc.sum.sum() / (sc.n * d), 0.0) / k)
    H = avg * np.abs(rng.standard_normal((k, d)))
    W = avg * np.abs(rng.standard_normal((k, n))) if n is not None else None
    return W, H


def nndsvd_start(A, k: int, *, variant: str, X: torch.Tensor | None, eig_solver: str, random_state: int,
                 name: str, hook):
    """NNDSVD(a) start from the top-k eigenpairs of the streamed Gram ``Σ x xᵀ``.

    Returns ``(Wt (k, N) tensor or None, H (k, D) float64 ndarray, spectrum)``. ``Wt`` is
    built only when the data is in memory as ``X``; otherwise one pass over ``A`` gives
    the norms of the positive and negative parts of ``u_j = X v_j / s_j`` that ``H`` needs.
    """
    spec = top_eigenpairs(A, k, centre=False, solver=eig_solver, random_state=random_state,
                          name=name, method="NMF", after_first_pass=hook)
    check_rank(spec.values, k, name, "NMF", "activation matrix")
    s = np.sqrt(spec.values)
    V = spec.vectors
    if X is not None:
        XV = (X @ torch.as_tensor(V, dtype=X.dtype, device=X.device)).double()
        pos_sq = XV.clamp(min=0).pow(2).sum(0).cpu().numpy()
        neg_sq = XV.clamp(max=0).pow(2).sum(0).cpu().numpy()
    else:
        pos_sq, neg_sq = np.zeros(k), np.zeros(k)
        for _, _, x in iter_blocks(A, np.float64):
            xv = x @ V
            pos_sq += (np.maximum(xv, 0) ** 2).sum(0)
            neg_sq += (np.minimum(xv, 0) ** 2).sum(0)
    H = np.zeros((k, V.shape[0]))
    w_scale, w_sign = np.zeros(k), np.zeros(k)  # W[:, j] = w_scale[j] · part(w_sign[j] · XV[:, j])
    for j in range(k):
        xp, xn = np.sqrt(pos_sq[j]) / s[j], np.sqrt(neg_sq[j]) / s[j]
        if j == 0:  # the leading pair of non-negative data is single-signed: take |u|, |v|
            H[0] = np.sqrt(s[0]) * np.abs(V[:, 0])
            w_scale[0], w_sign[0] = 1.0 / np.sqrt(s[0]), 1.0 if xp >= xn else -1.0
            continue
        y = V[:, j]
        yp, yn = np.maximum(y, 0), np.maximum(-y, 0)
        mp, mn = xp * np.linalg.norm(yp), xn * np.linalg.norm(yn)
        sign, part, xnorm, sigma = (1.0, yp, xp, mp) if mp > mn else (-1.0, yn, xn, mn)
        if sigma <= 0:
            continue
        lbd = np.sqrt(s[j] * sigma)
        H[j] = lbd * part / np.linalg.norm(part)
        w_scale[j], w_sign[j] = lbd / (xnorm * s[j]), sign
    H[H < NNDSVD_EPS] = 0
    avg = float(spec.mean.mean())
    if variant == "nndsvda":
        H[H == 0] = avg
    Wt = None
    if X is not None:
        sign_t = torch.as_tensor(w_sign, dtype=torch.float64, device=X.device)
        scale_t = torch.as_tensor(w_scale, dtype=torch.float64, device=X.device)
        Wt = ((XV * sign_t).clamp(min=0) * scale_t).T.contiguous()
        Wt[Wt < NNDSVD_EPS] = 0
        if variant == "nndsvda":
            Wt[Wt == 0] = avg
        Wt = Wt.to(X.dtype)
    return Wt, H, spec
