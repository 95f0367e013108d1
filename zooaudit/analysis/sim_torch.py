"""Torch backend of the streamed joint second moments (:class:`~.sim_stream.JointGram`).

The same statistics as the NumPy accumulator — shifted ``T = Σ (z − c)(z − c)ᵀ``,
``s = Σ (z − c)``, ``n`` and, for debiased CKA, the row-norm sums ``A``, ``RR``,
``RZ`` — accumulated in float64 tensors on a torch device (a GPU: one
``(b, P)ᵀ(b, P)`` GEMM per row block instead of the CPU's column panels). Each block
is centred on its own mean exactly as on the CPU (mean summed in float64, the mean
rounded to the compute dtype subtracted, the rounding residue corrected in float64),
so the two backends agree to rounding: float64 inputs to ~1e-12 relative.

Float32 GEMMs on CUDA run in IEEE float32 (TF32 off for the duration of each
product): TF32's 10-bit mantissa would cost ~1e-3 relative per entry.

Finalizing copies the accumulators back into the NumPy attributes the derived
statistics read (``T``, ``s``, ``shift``, ``A``, ``RR``, ``RZ``), so
:func:`~.sim_cka.cka_from_stats` and the CCA family work unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch

from ..devices import resolve_device
from ..errors import ZooauditError
from .blocks import nonfinite_rows_error as nonfinite_error
from .blocks import width
from .sim_checks import compute_dtype
from .sim_stream import JointGram, fill

_TORCH_DTYPE = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}
_DIRECT = {np.dtype(t) for t in (np.float16, np.float32, np.float64)}   # dtypes torch.from_numpy keeps


@contextlib.contextmanager
def _ieee_fp32(dev: torch.device):
    """IEEE float32 matrix products on CUDA for the duration (restores the caller's setting)."""
    if dev.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision = before


class TorchJointGram(JointGram):
    """:class:`JointGram` accumulated with torch on ``device`` (see the module docstring).

    Parameters as :class:`JointGram`, plus ``device`` (anything ``torch.device``
    accepts). Memory on the device: ``O(P² + block·P)`` float64.
    """

    def __init__(self, widths: Sequence[int], *, device, dtype=np.float64, rownorms: bool = False,
                 names: Sequence[str] | None = None):
        self.device = resolve_device(device, what=" for the similarity moments")
        super().__init__(widths, dtype=dtype, rownorms=rownorms, names=names)
        if self.dtype not in _TORCH_DTYPE:
            raise ZooauditError(f"compute dtype must be float32 or float64; got {self.dtype}.")
        self._cd = _TORCH_DTYPE[self.dtype]

    def _allocate(self, P: int, m: int) -> None:
        z = {"dtype": torch.float64, "device": self.device}
        self._T = torch.zeros((P, P), **z)
        self._s = torch.zeros(P, **z)
        self._shift: torch.Tensor | None = None
        if self.rownorms:
            self._A = torch.zeros(m, **z)
            self._RR = torch.zeros((m, m), **z)
            self._RZ = torch.zeros((m, P), **z)

    def update(self, parts: Sequence[np.ndarray], start: int = 0) -> TorchJointGram:
        """Add one aligned row block ``[(b, p_l) ...]`` (any real dtype)."""
        b = int(parts[0].shape[0])
        if b == 0:
            return self
        dev, cd, f64 = self.device, self._cd, torch.float64
        buf = torch.empty((b, self.P), dtype=cd, device=dev)
        mean = torch.empty(self.P, dtype=f64, device=dev)
        for l, (part, sl) in enumerate(zip(parts, self.slices)):
            host = np.ascontiguousarray(part if part.dtype in _DIRECT else part.astype(np.float64))
            t = torch.from_numpy(host).to(dev, non_blocking=True)
            m = t.sum(dim=0, dtype=f64) / b
            if not bool(torch.isfinite(m).all()):
                if np.isfinite(part).all():
                    raise ZooauditError(f"{self.names[l]} holds values too large to sum in float64 in rows "
                                        f"{start}–{start + b - 1}; rescale the activations.")
                raise nonfinite_error(self.names[l], part, start)
            mean[sl] = m
            # as on the CPU: subtract the mean rounded to the compute dtype (type promotion
            # as NumPy's: float16/float32 − float32 → float32, anything − float64 → float64)
            buf[:, sl] = t - m.to(cd)
        rounded = mean.to(cd).to(f64)
        if self._shift is None:
            self._shift = rounded.clone()
        delta = buf.sum(dim=0, dtype=f64) / b       # exact column mean of buf (rounding residue)
        e = rounded - self._shift
        d = e + delta
        with _ieee_fp32(dev):
            if cd == f64:
                self._T.addmm_(buf.T, buf)
            else:
                self._T += (buf.T @ buf).to(f64)
            # Σ (z − c)(z − c)ᵀ over the block = bufᵀbuf + b (d dᵀ − δ δᵀ)
            self._T.addr_(d, d, alpha=float(b))
            self._T.addr_(delta, delta, alpha=-float(b))
            self._s += b * d
            if self.rownorms:
                self._update_rownorms_torch(buf, e)
        self.n += b
        return self

    def _update_rownorms_torch(self, buf: torch.Tensor, e: torch.Tensor) -> None:
        # ‖z − c‖² = ‖buf‖² + 2 buf·e + ‖e‖² per layer (see JointGram._update_rownorms)
        R = torch.empty((buf.shape[0], len(self.slices)), dtype=torch.float64, device=self.device)
        for l, sl in enumerate(self.slices):
            bl, el = buf[:, sl], e[sl]
            R[:, l] = (bl * bl).sum(dim=1).to(torch.float64) + 2.0 * (bl @ el.to(self._cd)).to(torch.float64) \
                + el @ el
        rsum = R.sum(dim=0)
        self._A += rsum
        self._RR += R.T @ R
        self._RZ += (R.T.to(self._cd) @ buf).to(torch.float64)
        self._RZ.addr_(rsum, e)

    def finalize(self) -> TorchJointGram:
        """Symmetrize ``T`` and copy every accumulator to NumPy float64."""
        if not self._final:
            T = self._T
            T = (T + T.T) * 0.5
            self.T = T.cpu().numpy()
            self.s = self._s.cpu().numpy()
            self.shift = None if self._shift is None else self._shift.cpu().numpy()
            if self.rownorms:
                self.A, self.RR, self.RZ = (x.cpu().numpy() for x in (self._A, self._RR, self._RZ))
            del self._T, self._s
            self._final = True
        return self


def torch_joint_gram(arrays: Sequence, *, device, names: Sequence[str] | None = None, dtype=None,
                     rownorms: bool = False) -> TorchJointGram:
    """:func:`.sim_stream.joint_gram` accumulated with torch on ``device`` (``"cuda"``,
    ``"cuda:1"``, ``"cpu"``, ``torch.device``): the same statistics, as NumPy float64."""
    dtype = compute_dtype(arrays) if dtype is None else np.dtype(dtype)
    acc = TorchJointGram([width(a) for a in arrays], device=device, dtype=dtype, rownorms=rownorms, names=names)
    return fill(acc, arrays)
