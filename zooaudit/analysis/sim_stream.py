"""One streaming pass over row blocks: joint second moments of several representations.

:class:`JointGram` reads the column-concatenation ``Z = [X₁ … X_m]`` (``(n, P)``,
``P = Σ p_l``) once, block of rows by block of rows, and keeps in float64

- ``T = Σᵢ (zᵢ − c)(zᵢ − c)ᵀ``  (``(P, P)``), ``s = Σᵢ (zᵢ − c)`` and ``n``, where the
  shift ``c`` is the first block's column mean. Centred moments follow exactly as
  ``C = T − s sᵀ / n``; the shift only keeps the numbers small (data offset by +100
  would otherwise cancel catastrophically), and every statistic used downstream is
  translation invariant;
- optionally (``rownorms=True``, for debiased CKA) the shifted squared row norms of
  each layer, ``a⁽ˡ⁾ᵢ = ‖x⁽ˡ⁾ᵢ − c⁽ˡ⁾‖²``, through ``A_l = Σᵢ a⁽ˡ⁾ᵢ`` ``(m,)``,
  ``RR_lk = Σᵢ a⁽ˡ⁾ᵢ a⁽ᵏ⁾ᵢ`` ``(m, m)`` and ``RZ_l = Σᵢ a⁽ˡ⁾ᵢ (zᵢ − c)`` ``(m, P)``.

Speed: each block is centred on its own mean (subtracted in float64 precision, then
stored in the compute dtype), multiplied with one GEMM per upper panel pair in the
compute dtype — float32 when every input is float32, else float64 — and added to
the float64 accumulators; the rank-one mean corrections are batched into one GEMM
every :data:`LOWRANK_FLUSH` blocks. Block-centred float32 products keep ~1e-7
relative accuracy per entry whatever the offset of the data. Memory is
``O(P² + block·P)``, independent of n.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..errors import ZooauditError
from .blocks import is_dask, row_bounds, width
from .blocks import nonfinite_rows_error as nonfinite_error
from .sim_checks import compute_dtype

TARGET_BLOCK_BYTES = 128 * 2**20   # rows per block ≈ this many bytes of all layers together
MAX_BLOCK_ROWS = 65_536
MIN_BLOCK_ROWS = 256
PANEL = 640                        # column panel width for the upper-triangular GEMMs
LOWRANK_FLUSH = 64                 # blocks between batched rank-one updates


def block_rows(total_width: int, itemsize: int) -> int:
    return int(min(MAX_BLOCK_ROWS, max(MIN_BLOCK_ROWS, TARGET_BLOCK_BYTES // max(1, total_width * itemsize))))


def _load(arrays: Sequence, start: int, stop: int) -> list[np.ndarray]:
    import dask

    parts = [a[start:stop] for a in arrays]
    lazy = [i for i, p in enumerate(parts) if is_dask(p)]
    if lazy:   # one compute: inputs sharing a graph (one model's layers) are read once
        # Synchronous, on this helper thread: not the ambient distributed client (inside a
        # Dask worker task a nested cluster compute from this thread deadlocks), and no
        # further thread pool — reading overlaps the GEMMs already, and chunks read by
        # other threads would be allocated in other malloc arenas (RSS creeping with n).
        for i, value in zip(lazy, dask.compute(*[parts[i] for i in lazy], scheduler="synchronous"), strict=True):
            parts[i] = value
    return [np.asarray(p).reshape(stop - start, -1) for p in parts]


def iter_row_blocks(arrays: Sequence, rows: int) -> Iterator[tuple[int, int, list[np.ndarray]]]:
    """Yield ``(start, stop, [(b, p_l) arrays])`` in the inputs' own dtypes.

    Lazy inputs (Dask, Zarr) are read one block ahead on a helper thread, so
    reading overlaps the arithmetic on the previous block (two blocks in memory).
    """
    bounds = row_bounds(*arrays, rows=rows)
    if all(isinstance(a, np.ndarray) for a in arrays):
        for start, stop in bounds:
            yield start, stop, [a[start:stop].reshape(stop - start, -1) for a in arrays]
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(_load, arrays, *bounds[0]) if bounds else None
        for k, (start, stop) in enumerate(bounds):
            parts = pending.result()
            pending = pool.submit(_load, arrays, *bounds[k + 1]) if k + 1 < len(bounds) else None
            yield start, stop, parts


def _panels(p: int) -> list[slice]:
    k = max(1, math.ceil(p / PANEL))
    edges = np.linspace(0, p, k + 1).round().astype(int)
    return [slice(int(edges[i]), int(edges[i + 1])) for i in range(k)]


class JointGram:
    """Streamed shifted second moments of the column-concatenation of ``m`` layers.

    Parameters: ``widths`` — feature count ``p_l`` of each layer; ``dtype`` — the
    GEMM dtype (``float32`` or ``float64``; accumulation is always float64);
    ``rownorms`` — also keep the row-norm sums that debiased CKA needs.
    Use :meth:`update` per row block, then read ``n, shift, s, T`` (and ``A, RR,
    RZ``) after :meth:`finalize`.
    """

    def __init__(self, widths: Sequence[int], *, dtype=np.float64, rownorms: bool = False,
                 names: Sequence[str] | None = None):
        self.widths = [int(w) for w in widths]
        edges = np.cumsum([0, *self.widths])
        self.edges = edges
        self.slices = [slice(int(edges[i]), int(edges[i + 1])) for i in range(len(self.widths))]
        self.names = list(names) if names is not None else [f"X{i}" for i in range(len(self.widths))]
        self.dtype = np.dtype(dtype)
        P, m = int(edges[-1]), len(self.widths)
        self.P = P
        self.n = 0
        self.shift: np.ndarray | None = None
        self.rownorms = rownorms
        self._final = False
        self._allocate(P, m)

    def _allocate(self, P: int, m: int) -> None:
        self.s = np.zeros(P)
        self.T = np.zeros((P, P))
        if self.rownorms:
            self.A = np.zeros(m)
            self.RR = np.zeros((m, m))
            self.RZ = np.zeros((m, P))
        self._plus: list[np.ndarray] = []
        self._minus: list[np.ndarray] = []
        self._buf: np.ndarray | None = None
        self._panels = _panels(P)

    # -- accumulation ---------------------------------------------------------------

    def update(self, parts: Sequence[np.ndarray], start: int = 0) -> JointGram:
        """Add one aligned row block ``[(b, p_l) ...]`` (any real dtype)."""
        b = int(parts[0].shape[0])
        if b == 0:
            return self
        if self._buf is None or self._buf.shape[0] < b:
            self._buf = np.empty((b, self.P), self.dtype)
        buf = self._buf[:b]
        mean = np.empty(self.P)
        for l, (part, sl) in enumerate(zip(parts, self.slices)):
            m = np.add.reduce(part, axis=0, dtype=np.float64) / b
            if not np.isfinite(m).all():
                if np.isfinite(part).all():
                    raise ZooauditError(f"{self.names[l]} holds values too large to sum in float64 in rows "
                                        f"{start}–{start + b - 1}; rescale the activations.")
                raise nonfinite_error(self.names[l], part, start)
            mean[sl] = m
            # Subtract the mean rounded to the compute dtype: exact differences for data
            # near the mean; the rounding residue delta is corrected exactly below.
            np.subtract(part, m.astype(self.dtype), out=buf[:, sl], casting="unsafe")
        if self.shift is None:
            self.shift = mean.astype(self.dtype).astype(np.float64)
        # buf = z − m̂ with m̂ the rounded mean actually subtracted. Its exact column mean
        # δ (rounding of m̂, and the mean's own summation error) is small and is summed
        # in float64 from buf itself; d is then the exact block mean in the shifted frame.
        nb = float(b)
        delta = np.add.reduce(buf, axis=0, dtype=np.float64) / nb
        e = mean.astype(self.dtype).astype(np.float64) - self.shift
        d = e + delta

        # Σ (z − c)(z − c)ᵀ over the block = bufᵀbuf + b (d dᵀ − δ δᵀ)
        panels = self._panels
        for i, si in enumerate(panels):
            for sj in panels[i:]:
                prod = buf[:, si].T @ buf[:, sj]
                np.add(self.T[si, sj], prod, out=self.T[si, sj], casting="unsafe")
        root = math.sqrt(nb)
        self._plus.append(root * d)
        self._minus.append(root * delta)
        if len(self._plus) >= LOWRANK_FLUSH or len(self._minus) >= LOWRANK_FLUSH:
            self._flush()
        self.s += nb * d

        if self.rownorms:
            self._update_rownorms(buf, e)
        self.n += b
        return self

    def _update_rownorms(self, buf: np.ndarray, e: np.ndarray) -> None:
        # z − c = buf + e with e = (rounded block mean) − c, so per layer
        # ‖z − c‖² = ‖buf‖² + 2 buf·e + ‖e‖²; buf is small, e tiny: compute dtype suffices.
        b = buf.shape[0]
        R = np.empty((b, len(self.slices)))
        for l, sl in enumerate(self.slices):
            bl = buf[:, sl]
            el = e[sl]
            R[:, l] = np.einsum("ij,ij->i", bl, bl) + 2.0 * (bl @ el.astype(self.dtype)) + el @ el
        rsum = R.sum(axis=0)
        self.A += rsum
        self.RR += R.T @ R
        self.RZ += R.T.astype(self.dtype) @ buf
        self.RZ += np.outer(rsum, e)

    def _flush(self) -> None:
        # T += Σ d dᵀ − Σ δ δᵀ as one GEMM [D₊; D₋]ᵀ [D₊; −D₋], added panel by panel into the
        # upper panels only (the lower ones are copied from them in finalize): no (P, P) temporary
        if not self._plus:
            return
        D = np.asarray(self._plus + self._minus)
        E = np.concatenate([np.asarray(self._plus), -np.asarray(self._minus)])
        for i, si in enumerate(self._panels):
            for sj in self._panels[i:]:
                self.T[si, sj] += D[:, si].T @ E[:, sj]
        self._plus.clear()
        self._minus.clear()

    def finalize(self) -> JointGram:
        """Apply pending corrections and mirror the upper panels into the lower ones."""
        if not self._final:
            self._flush()
            panels = self._panels
            for i, si in enumerate(panels):
                # diagonal panels were summed in full; average their two triangles so T is exactly symmetric
                d = self.T[si, si]
                d += d.T.copy()
                d *= 0.5
                for sj in panels[i + 1:]:
                    self.T[sj, si] = self.T[si, sj].T
            self._buf = None
            self._final = True
        return self

    # -- derived statistics ---------------------------------------------------------

    def centred(self) -> np.ndarray:
        """Centred co-moment ``C = Σ (z − μ)(z − μ)ᵀ`` ``(P, P)`` (divide by n − ddof for a covariance)."""
        self.finalize()
        return self.T - np.outer(self.s, self.s) / self.n

    def block_sums(self, M: np.ndarray) -> np.ndarray:
        """Sum of ``M`` ``(P, P)`` over each (layer, layer) block → ``(m, m)``."""
        e = self.edges[:-1]
        return np.add.reduceat(np.add.reduceat(M, e, axis=0), e, axis=1)

    def constant_layers(self, C: np.ndarray | None = None) -> np.ndarray:
        """``(m,)`` bool: layers whose every column is constant up to rounding.

        A column counts as constant when its standard deviation is below 8 units in
        the last place of its mean (rounding noise of the input dtype).
        """
        C = self.centred() if C is None else C
        eps = np.finfo(self.dtype).eps
        mu = self.shift + self.s / self.n
        var = np.clip(np.diag(C), 0.0, None) / self.n
        const = var <= (8 * eps * np.abs(mu)) ** 2
        return np.array([bool(const[sl].all()) for sl in self.slices])


def joint_gram(arrays: Sequence, *, names: Sequence[str] | None = None, dtype=None,
               rownorms: bool = False) -> JointGram:
    """One pass over the rows of ``arrays`` (sharing rows) → finalized :class:`JointGram`.

    Accumulated with NumPy on the CPU; :func:`.sim_torch.torch_joint_gram` is the same pass
    with torch on a device, :func:`.sim_cka.joint_moments` picks one of the two.
    ``dtype``: the GEMM dtype (default :func:`.sim_checks.compute_dtype`).
    """
    dtype = compute_dtype(arrays) if dtype is None else np.dtype(dtype)
    return fill(JointGram([width(a) for a in arrays], dtype=dtype, rownorms=rownorms, names=names), arrays)


def fill(acc: JointGram, arrays: Sequence) -> JointGram:
    """Stream every row block of ``arrays`` into the accumulator ``acc`` and finalize it."""
    for start, _, parts in iter_row_blocks(arrays, block_rows(acc.P, acc.dtype.itemsize)):
        acc.update(parts, start)
    return acc.finalize()
