"""The fits of :mod:`.factorize`: PCA, NMF, semi-NMF and DFF of ``(N, D)`` activations.

Every method takes ``A`` of shape ``(N, D)`` — NumPy or Dask, extra trailing dims
flattened — and returns a :class:`~.factorization.Factorization` with
``A ≈ codes @ components + mean``, ``components (k, D)`` of unit-norm rows and
``codes (N, k)``; see :mod:`.factorize` for the whole family (SAE, stability, k sweep).
"""

from __future__ import annotations

import warnings

import numpy as np

from ..devices import cpu_threads, resolve_device
from ..errors import ZooauditError
from .blocks import iter_blocks, layer_matrix, load_rows, row_bounds
from .eigencam import check_k, check_rank, top_eigenpairs
from .factorization import Factorization
from .nmf import (
    fit_full,
    fit_minibatch,
    nndsvd_start,
    random_start,
    scan,
    solve_codes,
    to_tensor,
    torch_dtype,
)
from .quality import finish as _finish
from .quality import finish_factors
from .stats import compute_here

__all__ = ["dff", "is_nonnegative", "nmf", "pca", "semi_nmf"]

IN_MEMORY_BYTES = 1 << 30  # "auto" solvers materialise Dask inputs up to this size
WIDE_LAYER = 2048  # "auto" PCA switches to the randomized solver above this many features
TRANSFORM_ITER = 200  # HALS sweeps allowed when solving codes for fixed components


def _choice(kind: str, value, allowed, name: str):
    if value not in allowed:
        raise ZooauditError(f"Unknown {kind} {value!r} for layer {name!r}. Allowed: {', '.join(map(str, allowed))}.")
    return value


def _fits_in_memory(A) -> bool:
    return not hasattr(A, "dask") or A.shape[0] * A.shape[1] * max(np.dtype(A.dtype).itemsize, 4) <= IN_MEMORY_BYTES


def _materialise(A) -> np.ndarray:
    X = np.asarray(compute_here(A))
    return X if X.dtype in (np.float32, np.float64) else X.astype(np.float64)


def pca(A, k: int, *, solver: str = "auto", random_state: int = 0, n_passes: int = 4, oversamples: int = 10,
        codes: str = "numpy", name: str = "A") -> Factorization:
    """PCA of ``A (N, D)``: ``codes = (A − mean) @ componentsᵀ``.

    Args:
        solver: ``"covariance"`` — eigendecomposition of the streamed ``(D, D)`` centred
            co-moment, one pass, exact, O(D²) memory; ``"randomized"`` — subspace iteration
            on the streamed covariance (``n_passes`` passes, ``k + oversamples`` probe
            vectors from ``random_state``), O(D·k) memory, for wide layers; ``"auto"`` —
            randomized when ``D > 2048`` and ``k + oversamples ≤ D / 4``, else covariance.
        codes: ``"numpy"`` (computed blockwise, kept in memory), ``"dask"`` (lazy), or
            ``"none"``: no codes and no second pass — the covariance solver then reads the data
            exactly once; explained variance and MSE come exactly from the spectrum
            (``Σ_{i≤k} λ_i`` over the trace), the measures that need per-sample codes
            (``mean_cosine``, ``l0``, ``sparsity``, ``dead_components``) are NaN.
    Returns:
        Factorization with orthonormal components sorted by variance, each signed so that
        its largest-|loading| entry is positive; metrics add ``explained_variance_ratio``
        ``(k,)`` and ``explained_variance_curve`` (cumulative, up to 64 components with
        the covariance solver, ``k`` with the randomized one).
    Raises ZooauditError when the layer is empty, has NaN/Inf, or ``k`` exceeds
    ``min(N, D)`` or the rank of the centred data.
    """
    A = layer_matrix(A, name)
    n, d = A.shape
    k = check_k(k, n, d, name, "PCA")
    _choice("solver", solver, ("auto", "covariance", "randomized"), name)
    _choice("codes", codes, ("numpy", "dask", "none"), name)
    if solver == "auto":
        solver = "randomized" if d > WIDE_LAYER and k + oversamples <= d // 4 else "covariance"
    n_curve = max(k, min(64, d)) if solver == "covariance" else k
    spec = top_eigenpairs(A, n_curve, centre=True, solver=solver, oversamples=oversamples, n_passes=n_passes,
                          random_state=random_state, name=name, method="PCA")
    check_rank(spec.values[:k], k, name, "PCA", "centred activation matrix")
    comps = spec.vectors[:, :k].T.copy()
    signs = np.sign(comps[np.arange(k), np.abs(comps).argmax(axis=1)])
    comps *= np.where(signs == 0, 1.0, signs)[:, None]
    ratio = spec.values / spec.trace if spec.trace > 0 else np.full_like(spec.values, np.nan)
    mean = spec.mean
    extra = {"explained_variance_ratio": ratio[:k], "explained_variance_curve": np.cumsum(ratio)}
    params = {"solver": solver, "k": k, "random_state": random_state}
    if codes == "none":  # the residual of a PCA fit is the trace minus the kept eigenvalues
        resid = max(spec.trace - float(spec.values[:k].sum()), 0.0)
        nan = float("nan")
        metrics = {"explained_variance": 1.0 - resid / spec.trace if spec.trace > 0 else nan,
                   "reconstruction_mse": resid / (n * d), "mean_cosine": nan, "l0": nan, "sparsity": nan,
                   "dead_components": nan, **extra}
        return Factorization("pca", comps, None, metrics, mean, params=params)

    def transform(start, stop, x):
        return (np.asarray(x, np.float64) - mean) @ comps.T

    return _finish("pca", A, comps, mean, transform, codes=codes, rms=np.sqrt(spec.ss_centred / spec.n),
                   extra=extra, params=params)


def _nonneg_hook(name: str):
    def hook(sc) -> None:
        if sc.minimum < 0:
            lo = sc.minimum
            raise ZooauditError(
                f"NMF needs non-negative activations but layer {name!r} has minimum {lo:.4g}. Shift it first "
                f"(A − ({lo:.4g}), i.e. A − A.min()), pick a non-negative layer (e.g. after a ReLU), or "
                "factorize the signed layer with semi_nmf(A, k) (non-negative codes, signed components) or pca(A, k).")
    return hook


def _unit_rows(H: np.ndarray, W: np.ndarray | None = None):
    """Scale components to unit L2 norm; codes take the scale (dead zero rows stay zero)."""
    norms = np.linalg.norm(H, axis=1)
    safe = np.where(norms > 0, norms, 1.0)
    return H / safe[:, None], (None if W is None else W * safe), safe


def nmf(A, k: int, *, random_state: int = 0, max_iter: int = 400, tol: float = 1e-4, init="nndsvda",
        solver: str = "auto", device=None, batch_size: int | None = None, max_epochs: int = 30,
        codes: str = "numpy", name: str = "A") -> Factorization:
    """NMF ``A ≈ codes @ components`` with both factors ≥ 0 (Frobenius loss).

    Args:
        A: ``(N, D)`` non-negative, NumPy or Dask.
        solver: ``"hals"`` — in-memory HALS / coordinate descent in torch (the update of
            scikit-learn's ``"cd"`` solver, stopping rule included), on ``device``;
            ``"minibatch"`` — out-of-core over the row chunks of ``A`` with running
            sufficient statistics (memory flat in N; ``max_epochs`` passes at most, early
            stop when an epoch moves the components by ≤ ``tol``); ``"sklearn"`` —
            scikit-learn's ``NMF(solver="cd")`` (CPU, in memory); ``"auto"`` — ``"hals"``
            when the data takes ≤ 1 GiB, else ``"minibatch"``.
        init: ``"nndsvda"`` / ``"nndsvd"`` (from the streamed Gram's eigenvectors, as in
            scikit-learn), ``"random"`` (seeded by ``random_state``), or a pair
            ``(W (N, k), H (k, D))`` of non-negative starts (minibatch uses only ``H``).
        max_iter / tol: iterations and stopping tolerance of the in-memory solvers.
        device: torch device (``None`` = CPU, ``"cuda"`` where present). float32 data is
            factorized in float32, everything else in float64.
        batch_size: rows per minibatch update (``None`` = one Dask chunk / 8192 NumPy rows).
    Returns:
        Factorization (``mean`` zeros; components unit-norm ≥ 0, codes ≥ 0); metrics add
        ``n_iter`` (iterations, or epochs for minibatch).
    Raises ZooauditError on a negative minimum (naming it; shift or semi-NMF offered), NaN,
    an empty layer, ``k`` above ``min(N, D)`` or the data's rank, or an unknown device.
    """
    A = layer_matrix(A, name)
    n, d = A.shape
    k = check_k(k, n, d, name, "NMF")
    _choice("solver", solver, ("auto", "hals", "minibatch", "sklearn"), name)
    _choice("codes", codes, ("numpy", "dask"), name)
    custom = isinstance(init, (tuple, list))
    if not custom:
        _choice("init", init, ("nndsvda", "nndsvd", "random"), name)
    dev = resolve_device(device, what=f" for layer {name!r}")
    if solver == "auto":
        solver = "hals" if _fits_in_memory(A) else "minibatch"
    hook, rng = _nonneg_hook(name), np.random.default_rng(random_state)
    dtype = torch_dtype(A.dtype)
    params = {"solver": solver, "k": k, "random_state": random_state, "init": "custom" if custom else init}
    if solver == "sklearn":
        return _nmf_sklearn(A, k, init, random_state, max_iter, tol, hook, name, params)
    with cpu_threads(dev, _largest_block(A, solver == "hals")):
        return _nmf_torch(A, k, init=init, custom=custom, solver=solver, hook=hook, rng=rng, dev=dev,
                          dtype=dtype, max_iter=max_iter, tol=tol, max_epochs=max_epochs, batch_size=batch_size,
                          random_state=random_state, codes=codes, params=params, name=name)


def _largest_block(A, in_memory: bool) -> int:
    rows = A.shape[0] if in_memory else max(b - a for a, b in row_bounds(A))
    return rows * A.shape[1]


def _nmf_torch(A, k: int, *, init, custom: bool, solver: str, hook, rng: np.random.Generator, dev, dtype,
               max_iter: int, tol: float, max_epochs: int, batch_size: int | None, random_state: int, codes: str,
               params: dict, name: str) -> Factorization:
    """The torch solvers of :func:`nmf` (``solver`` ``"hals"`` or ``"minibatch"``) on ``A (N, D)``,
    options as there; ``dev``/``dtype`` resolved, ``hook`` refuses negative data after the first pass."""
    n, d = A.shape
    X = to_tensor(_materialise(A), dev, dtype) if solver == "hals" else None
    if custom or init == "random":
        sc = scan(A, name, "NMF", hook)
        ss_total = sc.ss_centred
        rms = np.sqrt(sc.ss_centred / sc.n)
        if custom:
            W0 = None if init[0] is None else np.asarray(init[0], np.float64).T
            H0 = np.asarray(init[1], np.float64)
            need_w = X is not None
            if H0.shape != (k, d) or (H0 < 0).any() or (need_w and (W0 is None or W0.shape != (k, n) or (W0 < 0).any())):
                raise ZooauditError(
                    f"Custom NMF start for layer {name!r} must be non-negative H ({k}, {d})"
                    + (f" and W ({n}, {k})" if need_w else "") + f"; got H {H0.shape}"
                    + ("" if W0 is None else f", W {W0.T.shape}") + ".")
        else:
            W0, H0 = random_start(sc, k, d, n if X is not None else None, rng)
        Wt = None if X is None else to_tensor(W0, dev, dtype)
    else:
        eig = "randomized" if d > WIDE_LAYER else "covariance"
        Wt, H0, spec = nndsvd_start(A, k, variant=init, X=X, eig_solver=eig, random_state=random_state,
                                    name=name, hook=hook)
        ss_total = spec.ss_centred
        rms = np.sqrt(spec.ss_centred / spec.n)
    H = to_tensor(H0, dev, dtype)
    if X is not None:
        n_iter = fit_full(X, Wt, H, max_iter=max_iter, tol=tol)
        if codes == "numpy":  # metrics from the factors: no float64 reconstruction pass
            with cpu_threads(dev, 0):  # short per-block ops: one thread (a second only adds barrier waits)
                return finish_factors("nmf", X, Wt, H, rms=rms, extra={"n_iter": int(n_iter)}, params=params,
                                      ss_total=ss_total)
        W_fit = Wt.T.double().cpu().numpy()
        del X, Wt
    else:
        n_iter = fit_minibatch(A, H, signed=False, max_epochs=max_epochs, tol=tol, batch_size=batch_size,
                               inner_iter=10, rng=rng, device=dev, dtype=dtype)
        W_fit = None
    return _nmf_result("nmf", A, H, W_fit, codes, rms, dev, dtype, n_iter, params, tol)


def _nmf_result(method, A, H, W_fit, codes, rms, dev, dtype, n_iter, params, tol) -> Factorization:
    """Unit components and the streamed quality pass (codes from ``W_fit (N, k)`` when the fit
    kept them, else solved per block for the fixed components)."""
    comps, _, scale = _unit_rows(H.double().cpu().numpy())
    H_unit = to_tensor(comps, dev, dtype)

    def transform(start, stop, x):
        if W_fit is not None and start is not None:
            return W_fit[start:stop] * scale
        Wt = solve_codes(to_tensor(x, dev, dtype), H_unit, max_iter=TRANSFORM_ITER, tol=tol)
        return Wt.T.double().cpu().numpy()

    return _finish(method, A, comps, np.zeros(comps.shape[1]), transform, codes=codes, rms=rms,
                   extra={"n_iter": int(n_iter)}, params=params)


def _nmf_sklearn(A, k, init, random_state, max_iter, tol, hook, name, params) -> Factorization:
    from sklearn.decomposition import NMF
    from sklearn.exceptions import ConvergenceWarning

    sc = scan(A, name, "NMF", hook)
    X = _materialise(A)
    kwargs = {"init": init}
    if isinstance(init, (tuple, list)):
        kwargs = {"init": "custom"}
    model = NMF(n_components=k, random_state=random_state, max_iter=max_iter, tol=tol, solver="cd", **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if kwargs["init"] == "custom":
            W = model.fit_transform(X, W=np.asarray(init[0], X.dtype), H=np.asarray(init[1], X.dtype))
        else:
            W = model.fit_transform(X)
    comps, W, _ = _unit_rows(model.components_.astype(np.float64), W.astype(np.float64))
    return _finish("nmf", A, comps, np.zeros(comps.shape[1]), lambda s, e, x: W[s:e], codes="numpy",
                   rms=np.sqrt(sc.ss_centred / sc.n), extra={"n_iter": int(model.n_iter_)}, params=params)


def semi_nmf(A, k: int, *, random_state: int = 0, max_iter: int = 500, tol: float = 1e-6, update: str = "mu",
             solver: str = "auto", device=None, batch_size: int | None = None, max_epochs: int = 30,
             codes: str = "numpy", name: str = "A") -> Factorization:
    """Semi-NMF (Ding, Li & Jordan 2010) for signed activations: ``A ≈ codes @ components``
    with ``codes ≥ 0`` and components of any sign (Ding's ``X ≈ F Gᵀ`` with ``X = Aᵀ``,
    ``F = componentsᵀ``, ``G = codes``).

    Start: k-means (seeded by ``random_state``, on at most 20 000 rows) gives the
    components (centroids), as Ding et al. recommend; the codes start at the
    non-negative least-squares codes of the centroids plus a floor of 1e-3 × their mean
    (Ding's ``indicator + 0.2`` start mixes the components and often stalls there).
    Semi-NMF optima are not unique (any non-negative invertible mixing ``M`` with
    ``codes·M ≥ 0`` fits equally well); planted components are recovered when codes are
    sparse and the start is near them. Each iteration sets the components to the least-squares solution ``(GᵀG)⁻¹GᵀA`` and
    updates ``G`` by Ding's multiplicative rule with positive/negative parts
    (``update="mu"``) or by one HALS sweep (``"hals"``, faster convergence).
    ``solver``: ``"full"`` (in memory, on ``device``), ``"minibatch"`` (out of core, HALS
    codes per chunk, components from running statistics) or ``"auto"`` (``"full"`` up to
    1 GiB). Other arguments as in :func:`nmf`.
    """
    A = layer_matrix(A, name)
    n, d = A.shape
    k = check_k(k, n, d, name, "semi-NMF")
    _choice("solver", solver, ("auto", "full", "minibatch"), name)
    _choice("update", update, ("mu", "hals"), name)
    _choice("codes", codes, ("numpy", "dask"), name)
    dev = resolve_device(device, what=f" for layer {name!r}")
    if solver == "auto":
        solver = "full" if _fits_in_memory(A) else "minibatch"
    with cpu_threads(dev, _largest_block(A, solver == "full")):
        return _semi_nmf_torch(A, k, solver=solver, update=update, random_state=random_state, max_iter=max_iter,
                               tol=tol, max_epochs=max_epochs, batch_size=batch_size, dev=dev, codes=codes,
                               name=name)


def _semi_nmf_torch(A, k: int, *, solver: str, update: str, random_state: int, max_iter: int, tol: float,
                    max_epochs: int, batch_size: int | None, dev, codes: str, name: str) -> Factorization:
    n = A.shape[0]
    sc = scan(A, name, "semi-NMF", None)
    if sc.ss_centred <= 0:
        raise ZooauditError(f"Layer {name!r} is constant over its {n} samples; semi-NMF has nothing to factorize.")
    rng = np.random.default_rng(random_state)
    dtype = torch_dtype(A.dtype)
    centroids = _kmeans_start(A, k, rng, random_state)
    H = to_tensor(centroids, dev, dtype)
    params = {"solver": solver, "k": k, "random_state": random_state, "update": update}
    if solver == "full":
        Xnp = _materialise(A)
        X = to_tensor(Xnp, dev, dtype)
        # Non-negative least-squares codes for the centroids, floored so that the
        # multiplicative update can still move every entry. (Ding's indicator + 0.2 start
        # mixes the components and often stalls in a mixed optimum.)
        Wt = solve_codes(X, H, max_iter=10)
        Wt += 1e-3 * Wt.mean()
        n_iter = fit_full(X, Wt, H, max_iter=max_iter, tol=tol, signed=True, update=update)
        if codes == "numpy":
            with cpu_threads(dev, 0):  # as for NMF: the quality pass on one thread
                return finish_factors("semi_nmf", X, Wt, H, rms=np.sqrt(sc.ss_centred / sc.n),
                                      extra={"n_iter": int(n_iter)}, params=params, ss_total=sc.ss_centred)
        W_fit = Wt.T.double().cpu().numpy()
    else:
        n_iter = fit_minibatch(A, H, signed=True, max_epochs=max_epochs, tol=max(tol, 1e-4), batch_size=batch_size,
                               inner_iter=10, rng=rng, device=dev, dtype=dtype)
        W_fit = None
    return _nmf_result("semi_nmf", A, H, W_fit, codes, np.sqrt(sc.ss_centred / sc.n), dev, dtype, n_iter, params,
                       max(tol, 1e-4))


def _kmeans_start(A, k: int, rng: np.random.Generator, random_state: int):
    """k-means on up to 20 000 rows taken from whole chunks in a seeded order."""
    from sklearn.cluster import KMeans

    rows, got = [], 0
    for i in rng.permutation(len(row_bounds(A))):
        start, stop = row_bounds(A)[i]
        rows.append(load_rows(A, start, stop, np.float64))
        got += stop - start
        if got >= 20_000:
            break
    sample = np.concatenate(rows)[:20_000]
    return KMeans(n_clusters=k, n_init=3, random_state=random_state).fit(sample).cluster_centers_


def dff(acts, k: int, *, random_state: int = 0, max_iter: int = 400, name: str = "A", **nmf_options) -> Factorization:
    """Deep Feature Factorization (Collins, Achanta & Süsstrunk 2018).

    NMF of a non-negative spatial layer ``acts (N, C, H, W)`` with every spatial position
    as a sample: ``(N·H·W, C) ≈ codes @ components``. Components ``(k, C)`` are the
    concepts; ``maps (N, k, H, W)`` are the per-image heat maps (codes reshaped);
    ``codes`` are ``(N·H·W, k)`` with positions in ``(n, y, x)`` order. Options as in
    :func:`nmf` (only ``codes="numpy"``).
    """
    shape = tuple(getattr(acts, "shape", np.shape(acts)))
    if len(shape) != 4:
        raise ZooauditError(f"DFF of layer {name!r} needs a spatial map (N, C, H, W); got shape {shape}.")
    n, c, h, w = shape
    if 0 in shape:
        raise ZooauditError(f"Layer {name!r} is empty (shape {shape}); nothing to factorize.")
    if hasattr(acts, "dask"):
        flat = acts.rechunk({1: -1, 2: -1, 3: -1}).transpose(0, 2, 3, 1).reshape(n * h * w, c)
    else:
        flat = np.asarray(acts).transpose(0, 2, 3, 1).reshape(n * h * w, c)
    f = nmf(flat, k, random_state=random_state, max_iter=max_iter, name=name, **{**nmf_options, "codes": "numpy"})
    maps = f.codes.reshape(n, h, w, f.components.shape[0]).transpose(0, 3, 1, 2)
    return Factorization("dff", f.components, f.codes, f.metrics, f.mean, maps=maps,
                         params={**f.params, "map_shape": f"{h}x{w}"})


def is_nonnegative(A) -> bool:
    """Whether every entry of ``A`` is ≥ 0 (streamed; NaN counts as not non-negative)."""
    A = A.reshape(A.shape[0], -1) if A.ndim > 2 else A
    return all(float(x.min()) >= 0 for _, _, x in iter_blocks(A)) if A.shape[0] and A.shape[1] else True
