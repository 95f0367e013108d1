"""The :class:`Factorization` record and the quality measures stored with it.

Every factorization of ``A (N, D)`` reconstructs ``Â = codes @ components + mean``.
Its ``metrics`` dict always holds (computed in one streamed pass, float64):

- ``explained_variance`` = ``1 − Σ‖x − x̂‖² / Σ‖x − x̄‖²``, both sums over *all*
  samples before dividing (FIELD-NOTES: per-batch ratios and variance about zero
  are known bugs). Predicting the mean scores 0, perfect reconstruction 1.
- ``reconstruction_mse`` = ``Σ‖x − x̂‖² / (N·D)``.
- ``mean_cosine``: mean over samples of ``cos(x, x̂)`` in the original (uncentred)
  space; samples where ``x`` or ``x̂`` is the zero vector are left out of the mean.
- ``l0``: mean number of active codes per sample; ``sparsity`` = ``1 − l0 / k``.
  A code is *active* when ``|c| > 1e-6 · rms`` where ``rms = sqrt(mean ‖x − x̄‖²)``:
  components have unit norm, so ``|c|`` is the size of that component's
  contribution, and multiplicative/HALS updates leave tiny positive values where
  an exact solver would put zeros.
- ``dead_components``: components whose code is active for no sample.

Seed stability (:func:`stability`) and the quality curve over k (:func:`k_sweep`)
refit the method and are computed on request only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np
import xarray as xr

from ..errors import ZooauditError
from .eigencam import iter_blocks, row_bounds
from .stats import ROW_BLOCK, compute_here

ACTIVE_RTOL = 1e-6  # a code is active above this fraction of the RMS distance to the mean


@dataclass
class Factorization:
    """``A ≈ codes @ components + mean``.

    Attributes:
        method: ``"pca"``, ``"nmf"``, ``"semi_nmf"``, ``"sae"`` or ``"dff"``.
        components: ``(k, D)``, rows of unit L2 norm (a dead NMF/SAE row may be zero).
            PCA rows are orthonormal; NMF rows are ≥ 0; semi-NMF/SAE rows are signed.
        codes: ``(N, k)`` NumPy, or a lazy Dask array when asked for ``codes="dask"``.
            PCA codes are signed; NMF, semi-NMF and SAE codes are ≥ 0. For ``dff``
            the rows are spatial positions ``(N·H·W, k)`` and ``maps`` holds them
            per image.
        metrics: see the module docstring, plus per-method extras (PCA:
            ``explained_variance_ratio`` ``(k,)`` and ``explained_variance_curve``;
            iterative methods: ``n_iter``).
        mean: ``(D,)``: the data mean for PCA, the (rescaled) decoder bias for SAE,
            zeros for NMF and semi-NMF.
        maps: ``(N, k, H, W)`` per-image heat maps (DFF only), else ``None``.
        params: the solver settings that produced it (JSON-serialisable scalars).
    """

    method: str
    components: np.ndarray
    codes: np.ndarray
    metrics: dict = field(default_factory=dict)
    mean: np.ndarray | None = None
    maps: np.ndarray | None = None
    params: dict = field(default_factory=dict)

    def reconstruct(self, codes=None) -> np.ndarray:
        """``(N, D)`` reconstruction ``codes @ components + mean``."""
        codes = self.codes if codes is None else codes
        mean = 0.0 if self.mean is None else self.mean
        return np.asarray(codes) @ self.components + mean

    def to_dataset(self, sample_ids=None) -> xr.Dataset:
        """Labelled result: ``components (component, unit)``, ``codes (sample, component)``
        (``heatmaps (sample, component, y, x)`` instead for DFF), ``mean (unit)``,
        per-component metrics as variables, scalar metrics and params as attributes."""
        k, d = self.components.shape
        coords = {"component": np.arange(k), "unit": np.arange(d)}
        if sample_ids is not None:
            coords["sample"] = np.asarray(sample_ids)
        data = {"components": (("component", "unit"), self.components)}
        if self.maps is not None:
            data["heatmaps"] = (("sample", "component", "y", "x"), self.maps)
        else:
            data["codes"] = (("sample", "component"), self.codes)
        if self.mean is not None:
            data["mean"] = ("unit", np.asarray(self.mean, np.float64))
        for key, value in self.metrics.items():
            if np.ndim(value) == 1 and len(value) == k and key != "explained_variance_curve":
                data[key] = ("component", np.asarray(value))
        scalars = {key: float(v) for key, v in self.metrics.items() if np.ndim(v) == 0}
        params = {f"param_{key}": (v if isinstance(v, (int, float, str)) else str(v))
                  for key, v in self.params.items()}
        return xr.Dataset(data, coords=coords, attrs={"method": self.method, **scalars, **params})


class QualityAccumulator:
    """Streams the module-level metrics over row blocks of ``(x, x̂, codes)``.

    The total sum of squares about the mean is merged across blocks with Chan et al.'s
    update (each block centred on its own mean first), so it stays accurate on data
    far from the origin without knowing the mean in advance.
    """

    def __init__(self, k: int, rms: float):
        self.k = k
        self.tol = ACTIVE_RTOL * float(rms)
        self.n = 0
        self.mean: np.ndarray | None = None
        self.ss_total = 0.0
        self.ss_resid = 0.0
        self.cos_sum = 0.0
        self.cos_n = 0
        self.active = 0
        self.ever_active = np.zeros(k, bool)

    def update(self, x: np.ndarray, x_hat: np.ndarray, codes: np.ndarray) -> None:
        x = np.asarray(x, np.float64)
        x_hat = np.asarray(x_hat, np.float64)
        b = x.shape[0]
        if b == 0:
            return
        mean_b = x.mean(axis=0)
        centred = x - mean_b
        ss_b = float(np.einsum("ij,ij->", centred, centred))
        if self.mean is None:
            self.mean, self.ss_total = mean_b, ss_b
        else:
            n = self.n + b
            delta = mean_b - self.mean
            self.ss_total += ss_b + float(delta @ delta) * self.n * b / n
            self.mean = self.mean + delta * (b / n)
        self.n += b
        np.subtract(x, x_hat, out=centred)  # reuse the buffer for the residual
        self.ss_resid += float(np.einsum("ij,ij->", centred, centred))
        nx = np.sqrt(np.einsum("ij,ij->i", x, x))
        nh = np.sqrt(np.einsum("ij,ij->i", x_hat, x_hat))
        ok = (nx > 0) & (nh > 0)
        dots = np.einsum("ij,ij->i", x, x_hat)
        self.cos_sum += float(np.sum(dots[ok] / (nx[ok] * nh[ok])))
        self.cos_n += int(ok.sum())
        act = np.abs(np.asarray(codes, np.float64)) > self.tol
        self.active += int(act.sum())
        self.ever_active |= act.any(axis=0)

    def metrics(self) -> dict:
        return quality_metrics(n=self.n, d=0 if self.mean is None else len(self.mean), k=self.k,
                               ss_resid=self.ss_resid, ss_total=self.ss_total, cos_sum=self.cos_sum,
                               cos_n=self.cos_n, active=self.active, dead=int((~self.ever_active).sum()))


def quality_metrics(*, n: int, d: int, k: int, ss_resid: float, ss_total: float, cos_sum: float, cos_n: int,
                    active: int, dead: int) -> dict:
    """The module-level metrics from their sums over ``n`` samples of ``d`` features and ``k``
    codes: residual and total (about the mean) sums of squares, the sum and count of per-sample
    cosines, the count of active codes, the number of never-active components."""
    l0 = active / n if n else float("nan")
    return {
        "explained_variance": 1.0 - ss_resid / ss_total if ss_total > 0 else float("nan"),
        "reconstruction_mse": ss_resid / (n * d) if n and d else float("nan"),
        "mean_cosine": cos_sum / cos_n if cos_n else float("nan"),
        "l0": l0,
        "sparsity": 1.0 - l0 / k,
        "dead_components": dead,
    }


def explained_variance(X, X_hat) -> float:
    """``1 − Σ‖x − x̂‖² / Σ‖x − x̄‖²`` over all samples (float64).

    ``X`` and ``X_hat`` are ``(N, D)`` NumPy or Dask arrays; sums are streamed over
    row blocks and divided once at the end. ``nan`` when ``X`` has no variance.
    """
    if tuple(X.shape) != tuple(X_hat.shape):
        raise ZooauditError(f"explained_variance needs equal shapes; got {tuple(X.shape)} and {tuple(X_hat.shape)}.")
    acc = QualityAccumulator(1, 0.0)
    for (start, stop, x) in iter_blocks(X, np.float64):
        x_hat = compute_here(X_hat[start:stop])
        acc.update(x, np.asarray(x_hat).reshape(x.shape), np.zeros((x.shape[0], 1)))
    return float(acc.metrics()["explained_variance"])


def finish(method: str, A, comps: np.ndarray, mean: np.ndarray, transform, *, codes: str, rms: float,
            extra: dict, params: dict) -> Factorization:
    """One pass computing codes block by block (``transform(start, stop, x) -> (b, k)``) and
    the quality metrics; codes kept in memory or returned as a lazy Dask array."""
    k = comps.shape[0]
    acc = QualityAccumulator(k, rms)
    kept = []
    for start, stop, x in iter_blocks(A):
        c = np.asarray(transform(start, stop, x), np.float64)
        acc.update(x, c @ comps + mean, c)
        if codes == "numpy":
            kept.append(c)
    if codes == "numpy":
        out = np.concatenate(kept)
    else:
        import dask.array as da

        lazy = A if hasattr(A, "dask") else da.from_array(A, chunks=(row_bounds(A)[0][1], -1))
        lazy = lazy.rechunk({1: -1})
        out = lazy.map_blocks(lambda x: np.asarray(transform(None, None, x), np.float64),
                              chunks=(lazy.chunks[0], (k,)), dtype=np.float64)
    return Factorization(method=method, components=comps, codes=out, mean=mean,
                         metrics={**acc.metrics(), **extra}, params=params)


def finish_factors(method: str, X, Wt, H, *, rms: float, extra: dict, params: dict,
                   ss_total: float | None = None) -> Factorization:
    """:func:`finish` for an in-memory fit ``X (N, D) ≈ Wtᵀ H`` (torch tensors, ``Wt (k, N)``,
    ``H (k, D)``, mean zero), without forming the reconstruction.

    Same metrics, same definitions, from the factors: per sample ``‖x − x̂‖² = ‖x‖² − 2 x·x̂ +
    ‖x̂‖²`` with ``x·x̂ = c · (x Cᵀ)`` and ``‖x̂‖² = c (C Cᵀ) cᵀ`` (``C`` the unit components,
    ``c`` the rescaled codes). The only product with the data is ``x Cᵀ`` (one ``N·D·k`` GEMM
    in the data's dtype; every sum over samples is taken in float64 and each sample's residual is
    clipped at 0), instead of ``N·D·k`` float64 reconstructions plus four float64 passes
    over ``(N, D)``. ``Σ‖x − x̄‖²`` is ``ss_total`` when the caller has it (the input scan's
    exact float64 value), else ``Σ‖x‖² − N‖x̄‖²`` from float64 sums. Per-sample ``‖x‖²`` is
    summed in the data's dtype and then promoted (float32: relative error ~1e-7, the order of
    the float32 GEMM's ``x·x̂``; a float64-typed reduction of float32 data runs ~10× slower).

    Returns a Factorization with unit-norm components and NumPy codes ``(N, k)``.
    """
    import torch

    k = H.shape[0]
    H64 = H.double()
    scale = torch.linalg.vector_norm(H64, dim=1)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    C64 = H64 / safe[:, None]
    C = C64.to(X.dtype)
    gram = C64 @ C64.T
    tol = ACTIVE_RTOL * float(rms)
    n, d = X.shape
    total_sq = torch.zeros((), dtype=torch.float64, device=X.device)
    col_sum = torch.zeros(d, dtype=torch.float64, device=X.device)
    resid = torch.zeros((), dtype=torch.float64, device=X.device)
    cos_sum = torch.zeros((), dtype=torch.float64, device=X.device)
    cos_n = active = 0
    ever = torch.zeros(k, dtype=torch.bool, device=X.device)
    codes = torch.empty((n, k), dtype=torch.float64, device=X.device)
    for start in range(0, n, ROW_BLOCK):
        stop = min(start + ROW_BLOCK, n)
        x = X[start:stop]
        c = Wt[:, start:stop].T.double() * safe  # (b, k) codes of the unit components
        codes[start:stop] = c
        xx = x.square().sum(1).double()
        cross = ((x @ C.T).double() * c).sum(1)
        hh = ((c @ gram) * c).sum(1).clamp_(min=0)
        resid += (xx - 2 * cross + hh).clamp_(min=0).sum()
        if ss_total is None:
            total_sq += xx.sum()
            col_sum += x.sum(0).double()
        ok = (xx > 0) & (hh > 0)
        cos_sum += (cross[ok] / torch.sqrt(xx[ok] * hh[ok])).sum()
        cos_n += int(ok.sum())
        act = c.abs() > tol
        active += int(act.sum())
        ever |= act.any(0)
    if ss_total is None:
        ss_total = float(total_sq) - float(col_sum @ col_sum) / n
    metrics = quality_metrics(n=n, d=d, k=k, ss_resid=float(resid), ss_total=ss_total, cos_sum=float(cos_sum),
                              cos_n=cos_n, active=active, dead=int((~ever).sum()))
    return Factorization(method=method, components=C64.cpu().numpy(), codes=codes.cpu().numpy(),
                         mean=np.zeros(d), metrics={**metrics, **extra}, params=params)


def matched_cosine(C1: np.ndarray, C2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hungarian matching of two component sets by cosine.

    Args:
        C1: ``(k1, D)``; C2: ``(k2, D)``.
    Returns:
        ``(cos, match)``, each ``(min(k1, k2),)``: for row ``i`` of ``C1`` (all rows when
        ``k1 ≤ k2``), the matched row ``match[i]`` of ``C2`` and their cosine. The
        assignment maximises the summed (signed) cosine; zero rows have cosine 0.
    """
    from scipy.optimize import linear_sum_assignment

    def unit(c):
        c = np.asarray(c, np.float64)
        norm = np.linalg.norm(c, axis=1, keepdims=True)
        return np.divide(c, norm, out=np.zeros_like(c), where=norm > 0)

    cos = unit(C1) @ unit(C2).T
    rows, cols = linear_sum_assignment(-cos)
    return cos[rows, cols], cols


@dataclass
class Stability:
    """Agreement of one method's components across seeds.

    Attributes:
        seeds: the seeds, in order.
        pairwise: ``(S, S)`` mean Hungarian-matched cosine per pair of seeds (1 on the diagonal).
        per_component: ``(k,)`` for each component of the first seed's fit (or of the
            ``reference`` passed to :func:`stability`), its matched cosine averaged over the
            other seeds (all seeds for a reference).
        mean / min: mean and minimum of the off-diagonal ``pairwise`` entries.
        rows: how many rows of ``A`` the seed fits used (all, or the ``rows`` subset).
    """

    seeds: tuple
    pairwise: np.ndarray
    per_component: np.ndarray
    mean: float
    min: float
    rows: int = 0


def _fit(method: str, A, k: int, seed: int, name: str, options: dict) -> Factorization:
    from . import factorize as fz

    methods = {"pca": fz.pca, "nmf": fz.nmf, "semi_nmf": fz.semi_nmf, "sae": fz.sae}
    if method not in methods:
        raise ZooauditError(f"Unknown factorization method {method!r} for layer {name!r}. "
                            f"Allowed: {', '.join(sorted(methods))}.")
    return methods[method](A, k, random_state=seed, name=name, **options)


def take_rows(A, rows: np.ndarray | None):
    """Rows ``rows`` (sorted indices) of ``A`` as an in-memory NumPy array; ``A`` itself when ``None``."""
    if rows is None:
        return A
    rows = np.asarray(rows, np.int64)
    if rows.ndim != 1 or len(rows) == 0 or rows.min() < 0 or rows.max() >= A.shape[0]:
        raise ZooauditError(f"rows must be a non-empty 1-D array of indices in [0, {A.shape[0]}); got "
                            f"{len(rows)} indices" + (f" from {rows.min()} to {rows.max()}" if len(rows) else "") + ".")
    return np.asarray(compute_here(A[rows]))


def stability(method: str, A, k: int, seeds: Sequence[int] = (0, 1, 2), *, name: str = "A",
              reference: np.ndarray | None = None, rows: np.ndarray | None = None, **options) -> Stability:
    """Fit ``method`` once per seed and compare the component sets pairwise.

    Components are matched one-to-one by the Hungarian algorithm on their cosines
    (``scipy.optimize.linear_sum_assignment``). For ``"nmf"`` the default ``init`` here is
    ``"random"`` (the deterministic NNDSVD start would make every seed agree by
    construction); pass ``init=`` to override. PCA is deterministic: stability 1.

    Args:
        A: ``(N, D)`` NumPy or Dask. ``seeds``: at least two distinct ints.
        reference: optional ``(k, D)`` components of a fit kept elsewhere (e.g. the stored
            one); ``per_component`` is then each reference row's matched cosine averaged
            over all the seeds' fits, so it lines up with the stored components.
        rows: optional sorted row indices: every seed is fitted on these rows only (one fixed
            subset shared by all seeds, so the seeds differ only in their start). A bounded
            subset makes the ``len(seeds)`` refits cost O(len(rows)) instead of O(N) each; the
            measure is then the agreement of fits on that subset (with ``reference``: how
            well the full-data components are recovered from it).
        options: passed to the method (``max_iter``, ``solver``, ``epochs`` ...).
    """
    seeds = tuple(int(s) for s in seeds)
    if len(set(seeds)) < 2:
        raise ZooauditError(f"stability of layer {name!r} needs at least two distinct seeds; got {seeds}.")
    if method == "nmf":
        options.setdefault("init", "random")
    A = take_rows(A, rows)
    comps = [_fit(method, A, k, s, name, options).components for s in seeds]
    n = len(seeds)
    pairwise = np.eye(n)
    per = np.zeros((n - 1, comps[0].shape[0]))
    for i, j in combinations(range(n), 2):
        cos, _ = matched_cosine(comps[i], comps[j])
        pairwise[i, j] = pairwise[j, i] = float(cos.mean())
        if i == 0:
            per[j - 1] = cos
    if reference is not None:
        per = np.stack([matched_cosine(reference, c)[0] for c in comps])
    off = pairwise[~np.eye(n, dtype=bool)]
    return Stability(seeds, pairwise, per.mean(axis=0), float(off.mean()), float(off.min()), int(A.shape[0]))


CURVE_METRICS = ("explained_variance", "reconstruction_mse", "mean_cosine", "l0", "sparsity", "dead_components")


def k_sweep(A, ks: Sequence[int], method: str = "pca", *, seeds: Sequence[int] | None = None,
            random_state: int = 0, name: str = "A", stability_rows: np.ndarray | None = None,
            **options) -> xr.Dataset:
    """Quality curve over the number of components.

    Fits ``method`` once per ``k`` (plus once per seed when ``seeds`` is given, adding
    ``stability_mean`` and ``stability_min``; those seed fits use only the rows
    ``stability_rows`` when given, see :func:`stability`).

    Returns:
        ``xr.Dataset`` with dim ``k`` and variables ``explained_variance``,
        ``reconstruction_mse``, ``mean_cosine``, ``l0``, ``sparsity``, ``dead_components``;
        attrs ``method`` and ``layer``.
    """
    ks = [int(k) for k in ks]
    if not ks or len(set(ks)) != len(ks):
        raise ZooauditError(f"k_sweep of layer {name!r} needs a non-empty list of distinct k; got {ks}.")
    rows = {m: [] for m in CURVE_METRICS}
    stab = {"stability_mean": [], "stability_min": []}
    sub = take_rows(A, stability_rows) if seeds is not None else None  # read once for every k
    for k in ks:
        f = _fit(method, A, k, random_state, name, dict(options))
        for m in CURVE_METRICS:
            rows[m].append(float(f.metrics[m]))
        if seeds is not None:
            s = stability(method, sub, k, seeds, name=name, **dict(options))
            stab["stability_mean"].append(s.mean)
            stab["stability_min"].append(s.min)
    data = {m: ("k", np.asarray(v)) for m, v in rows.items()}
    if seeds is not None:
        data.update({m: ("k", np.asarray(v)) for m, v in stab.items()})
    return xr.Dataset(data, coords={"k": ks}, attrs={"method": method, "layer": name})
