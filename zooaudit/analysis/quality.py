"""The quality measures stored with every :class:`~.factorization.Factorization`.

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

Seed stability and the quality curve over k refit the method and are computed on
request only (:mod:`.stability`).
"""

from __future__ import annotations

import numpy as np

from ..errors import ZooauditError
from .blocks import ROW_BLOCK, compute_here, iter_blocks, row_bounds
from .factorization import Factorization

__all__ = ["ACTIVE_RTOL", "Factorization", "QualityAccumulator", "explained_variance", "finish", "finish_factors",
           "quality_metrics"]

ACTIVE_RTOL = 1e-6  # a code is active above this fraction of the RMS distance to the mean


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
