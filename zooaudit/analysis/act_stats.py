"""Activation statistics of one layer in one streamed pass: sparsity, massive activations, spectrum.

:class:`ActivationStats` reads a ``(sample, unit)`` matrix block of rows by block of rows
and keeps, in memory independent of the number of samples ``n`` (except the per-sample
active fraction, ``n`` scalars, kept for its quantiles and the per-group figures):

- **sparsity** (Li et al. 2022, "The Lazy Neuron Phenomenon"; the activation ratio of the
  Sparsing Law): an entry is *active* when ``|a| > eps`` (``eps`` recorded; 0 = non-zero).
  Per sample: the fraction of active units ``(n,)``; per unit: the count of samples on which
  it is active ``(p,)``. A unit is **dead** when it is active on no sample of the audit set,
  **always active** when it is active on every sample. The activation ratio of the layer is
  the mean over samples of the per-sample fraction (= active entries / all entries).
- **massive activations** (Sun et al. 2024): the ``top_k`` largest ``|a|`` of the layer with
  their ``(sample row, unit)`` positions (ties broken by row, then unit), and the ratio of the
  largest ``|a|`` to the layer's median ``|a|`` over all its entries. An entry is flagged
  *massive* when ``|a| > abs_threshold`` (paper: 100) **and** ``|a| > ratio_threshold ×
  median`` (paper: 1000); ``n_massive_units`` counts the units whose largest ``|a|`` is massive
  (from the per-unit maxima, so not bounded by ``top_k``).
  The median is streamed with a bounded histogram: ``|a|`` rounded to float32, binned by the
  top 14 bits of its IEEE-754 pattern (exponent + 6 mantissa bits; monotone in the value,
  16384 bins, each spanning a relative width ≤ 2⁻⁶). The median is known to lie in
  ``[median_lo, median_hi]`` (the bins of the lower and upper middle order statistics) and is
  reported as their midpoint (relative error < 1.6 %); the flag uses ``median_hi``, so an
  entry flagged here is flagged under the exact median too. A median in the lowest bin (+0 and
  denormals below 1.8e-40: a ReLU layer more than half of whose entries are 0) is 0, and the
  ratio is then ∞ — the paper's two conditions reduce to ``|a| > abs_threshold``. Non-finite entries land in the
  histogram's top bins, which is how they are counted (the stage refuses them).
- **spectrum** of the centred representation from the streamed covariance (the similarity
  stage's accumulator, :class:`~.sim_stream.JointGram`: float64 moments of block-centred
  rows). With ``λ₁ ≥ … ≥ λ_p ≥ 0`` the eigenvalues of the covariance and ``σᵢ = √λᵢ``
  (proportional to the singular values of the centred matrix), see :func:`spectrum_stats`.
"""

from __future__ import annotations

import numpy as np

from ..errors import ZooauditError
from .sim_span import MAX_REDUCE_BYTES
from .sim_stream import JointGram

HIST_SHIFT = 17                      # float32 bits >> 17: sign dropped → 8 exponent + 6 mantissa bits
HIST_BINS = 1 << (31 - HIST_SHIFT)   # 16384
NONFINITE_BIN = 0x7F800000 >> HIST_SHIFT   # +Inf and NaN patterns start here
TOP_COMPONENTS = (1, 10, 100)
SUB_BLOCK = 1 << 18                  # entries per sub-block of the element-wise statistics


def _bin_edges(b: int) -> tuple[float, float]:
    """``[lo, hi)`` of histogram bin ``b`` as float values (bit patterns ``b << 17`` … ``(b+1) << 17``)."""
    bits = np.array([b << HIST_SHIFT, (b + 1) << HIST_SHIFT], dtype=np.uint32)
    lo, hi = bits.view(np.float32).astype(np.float64)
    return float(lo), float(hi)


def histogram_quantile_bounds(hist: np.ndarray, rank: int) -> tuple[float, float]:
    """``[lo, hi]`` holding the ``rank``-th smallest value (0-based) counted by ``hist``."""
    b = int(np.searchsorted(np.cumsum(hist), rank + 1))
    return _bin_edges(b)


def spectrum_stats(eigenvalues: np.ndarray, top: tuple[int, ...] = TOP_COMPONENTS) -> dict[str, float]:
    """Scalar summaries of a covariance spectrum ``(p,)`` (any order; negatives from rounding set to 0).

    - ``effective_rank`` (Roy & Vetterli 2007): ``exp(−Σ qᵢ log qᵢ)`` with ``qᵢ = σᵢ / Σσ`` the
      normalised *singular values* ``σᵢ = √λᵢ`` (not the eigenvalues); 1 … rank.
    - ``participation_ratio``: ``(Σλ)² / Σλ²`` on the eigenvalues.
    - ``stable_rank``: ``‖X‖²_F / ‖X‖²₂ = Σλ / λ₁``.
    - ``variance_top_k``: ``Σ_{i≤k} λᵢ / Σλ`` for each ``k`` in ``top`` (k clipped to p).
    Eigenvalues below ``p · ε_float64 · λ₁`` (rounding noise of the covariance, the cut of
    ``numpy.linalg.matrix_rank``) count as 0: the square root in the effective rank would
    otherwise lift them to ~1e-8 of the largest singular value. A zero spectrum (a constant
    layer) gives NaN for all of them.
    """
    lam = np.sort(np.clip(np.asarray(eigenvalues, dtype=np.float64), 0.0, None))[::-1]
    if len(lam):
        lam[lam < len(lam) * np.finfo(np.float64).eps * lam[0]] = 0.0
    total = lam.sum()
    out = {f"variance_top_{k}": np.nan for k in top}
    if not total > 0:
        return {"effective_rank": np.nan, "participation_ratio": np.nan, "stable_rank": np.nan, **out}
    sigma = np.sqrt(lam)
    q = sigma / sigma.sum()
    q = q[q > 0]
    out.update({f"variance_top_{k}": float(lam[:k].sum() / total) for k in top})
    return {"effective_rank": float(np.exp(-(q * np.log(q)).sum())),
            "participation_ratio": float(total ** 2 / (lam ** 2).sum()),
            "stable_rank": float(total / lam[0]), **out}


GRAM_MIN_WIDTH = 1024   # narrower layers keep the covariance route whatever their row count
GRAM_MAX_ROWS = 4096    # beyond this many rows the Gram's n×n eigh is no cheap substitute
SPECTRUM_ROUTE_RULE = 3   # bump when spectrum_route's logic changes (3: the row cap of fbb105f)


def spectrum_routing(budget: int = MAX_REDUCE_BYTES) -> dict[str, int]:
    """What :func:`spectrum_route` decides by besides a layer's shape and ``max_width``: its rule
    version and thresholds. Part of the statistics stage's cache key, so that a result computed
    under other routes (another zooaudit's rule: a layer skipped there, from the Gram here) is
    never served as this one's."""
    return {"rule": SPECTRUM_ROUTE_RULE, "gram_min_width": GRAM_MIN_WIDTH, "gram_max_rows": GRAM_MAX_ROWS,
            "gram_budget_bytes": int(budget)}


def spectrum_route(n: int, p: int, max_width: int, budget: int = MAX_REDUCE_BYTES) -> tuple[str | None, str]:
    """How a layer of ``n`` rows × ``p`` units gets its spectrum: ``("covariance" | "gram" | None, why)``.

    ``p ≤ max_width``: the streamed ``p × p`` covariance. Wider, with ``n < p`` and the rows
    within ``budget`` float64 bytes: the ``n × n`` Gram (:class:`ActivationStats` ``gram_rows``).
    Otherwise none, with the reason. Within ``max_width`` too, a layer of at least
    :data:`GRAM_MIN_WIDTH` units with at most half as many rows takes the Gram: the same nonzero
    eigenvalues for ``O(n²p)`` instead of ``O(np² + p³)`` (a 4096-unit map on 40 samples: an
    ``eigh`` of 40 × 40 instead of 4096 × 4096)."""
    if max_width == 0:
        return None, "skipped: max_spectrum_width=0"
    if p <= max_width:
        if p >= GRAM_MIN_WIDTH and 2 * n <= p and n * p * 8 <= budget:
            return "gram", f"from the {n}×{n} Gram of the centred rows ({n} rows ≤ half of {p} units: cheaper)"
        return "covariance", ""
    if n >= p:
        return None, f"skipped: {p} units > max_spectrum_width {max_width} and {n} rows ≥ {p} units (no smaller Gram)"
    if n > GRAM_MAX_ROWS:   # the n×n eigh would be the very cost max_spectrum_width caps
        return None, (f"skipped: {p} units > max_spectrum_width {max_width}, and its {n} rows exceed the "
                      f"{GRAM_MAX_ROWS} of the Gram route")
    if n * p * 8 <= budget:
        return "gram", f"from the {n}×{n} Gram of the centred rows ({p} units > max_spectrum_width {max_width})"
    return None, (f"skipped: {p} units > max_spectrum_width {max_width}, and the rows ({n}×{p} float64) exceed "
                  f"the {budget / 2**30:.1f} GiB Gram budget")


class ActivationStats:
    """Streamed sparsity, massive-activation and spectrum statistics of one ``(n, p)`` layer.

    Args:
        width: ``p``, units per sample. eps: activity threshold (``|a| > eps``).
        top_k: how many of the largest ``|a|`` to keep with their positions.
        spectrum: also accumulate the covariance (``O(p²)`` memory).
        gram_rows: with ``spectrum``, the layer's row count ``n < p``: keep the rows ``(n, p)``
            float64 instead and take the spectrum from the ``(n, n)`` centred Gram ``Xc Xcᵀ``,
            whose nonzero eigenvalues are the covariance's (``XcᵀXc`` and ``XcXcᵀ`` share them),
            for layers too wide for a ``p × p`` covariance (see :func:`spectrum_route`).
        device: a torch device for the covariance GEMMs (:class:`~.sim_torch.TorchJointGram`, a GPU);
            None = NumPy on the CPU.
        groups: ``{attribute: number of codes}``; with per-row codes passed to :meth:`update`,
            per-group unit activity counts ``(codes, p)`` of each attribute.
    Call :meth:`update` on consecutive row blocks, then :meth:`result`.
    """

    def __init__(self, width: int, *, eps: float = 0.0, top_k: int = 16, spectrum: bool = True,
                 groups: dict[str, int] | None = None, name: str = "layer", device=None,
                 gram_rows: int | None = None):
        if eps < 0:
            raise ZooauditError(f"eps must be ≥ 0 (|a| > eps counts as active); got {eps}.")
        self.p, self.eps, self.top_k, self.name = int(width), float(eps), int(top_k), name
        self.n = 0
        self.unit_active = np.zeros(self.p, np.int64)
        self.unit_max = np.zeros(self.p, np.float64)
        self.sample_fraction: list[np.ndarray] = []
        self.hist = np.zeros(HIST_BINS, np.int64)
        self.top_val = np.zeros(0, np.float64)
        self.top_row = np.zeros(0, np.int64)
        self.top_unit = np.zeros(0, np.int64)
        self.groups = dict(groups or {})
        self.group_unit_active = {a: np.zeros((g, self.p), np.int64) for a, g in self.groups.items()}
        self.group_n = {a: np.zeros(g, np.int64) for a, g in self.groups.items()}
        self.gram: JointGram | None = None
        self.spectrum = spectrum
        self.device = device
        # the Gram route: rows kept as they stream by (one read), centred at the end
        self.rows = np.empty((int(gram_rows), self.p), np.float64) if spectrum and gram_rows is not None else None

    def update(self, block: np.ndarray, start: int, groups: dict[str, np.ndarray] | None = None) -> ActivationStats:
        """Add rows ``[start, start + b)``: ``block (b, p)`` (float32 or float64); ``groups``:
        ``{attribute: (b,) int codes}`` of these rows."""
        block = np.asarray(block).reshape(block.shape[0], -1)
        b = block.shape[0]
        if b == 0:
            return self
        # The element-wise statistics go over sub-blocks of ~SUB_BLOCK entries, whose temporaries
        # (|a|, activity, histogram bins) stay in cache: ~1.5x faster than whole 128 MB blocks.
        step = max(1, SUB_BLOCK // self.p)
        for lo in range(0, b, step):
            hi = min(b, lo + step)
            codes = {a: np.asarray(c[lo:hi], np.int64) for a, c in (groups or {}).items()}
            self._elementwise(block[lo:hi], start + lo, codes)
        if self.rows is not None:
            if start + b > len(self.rows):
                raise ZooauditError(f"Layer {self.name!r}: rows {start}..{start + b} exceed the gram_rows="
                                    f"{len(self.rows)} it was opened with.")
            self.rows[start:start + b] = block
        elif self.spectrum:
            if self.gram is None:
                self.gram = self._new_gram(block.dtype)
            self.gram.update([block], start)
        self.n += b
        return self

    def _elementwise(self, block: np.ndarray, start: int, groups: dict[str, np.ndarray]) -> None:
        # |a| in the block's own precision (float16 widened); the histogram bins its float32 rounding
        mag = np.abs(block if block.dtype in (np.float32, np.float64) else block.astype(np.float32))
        bits = (mag if mag.dtype == np.float32 else mag.astype(np.float32)).view(np.uint32)
        hist = np.bincount((bits >> HIST_SHIFT).ravel(), minlength=HIST_BINS)
        self.hist += hist
        if hist[NONFINITE_BIN:].any():   # refused here, before the covariance sees it
            raise self._nonfinite_error()
        active = mag > self.eps
        self.unit_active += np.count_nonzero(active, axis=0)
        self.sample_fraction.append(np.count_nonzero(active, axis=1) / self.p)
        for attr, g in groups.items():
            for code in range(self.groups[attr]):
                rows = g == code
                self.group_unit_active[attr][code] += np.count_nonzero(active[rows], axis=0)
                self.group_n[attr][code] += int(rows.sum())
        col_max = mag.max(axis=0)
        np.maximum(self.unit_max, col_max, out=self.unit_max)
        self._update_top(mag, col_max, start)

    def _new_gram(self, dtype) -> JointGram:
        # float32 GEMMs for wide float32 layers (as the similarity stage: ~1e-7 relative), else float64
        dt = np.float32 if dtype in (np.float32, np.float16) and self.p >= 256 else np.float64
        if self.device is None:
            return JointGram([self.p], dtype=dt, names=[self.name])
        from .sim_torch import TorchJointGram

        return TorchJointGram([self.p], device=self.device, dtype=dt, names=[self.name])

    def _update_top(self, mag: np.ndarray, col_max: np.ndarray, start: int) -> None:
        k = self.top_k
        if k == 0:
            return
        # Only entries at or above a bound on the k-th largest can enter: the current k-th best,
        # or the k-th largest column maximum (k distinct entries of this block) — a handful per block.
        thr = self.top_val[-1] if len(self.top_val) >= k else -1.0
        if len(col_max) >= k:
            thr = max(thr, float(np.partition(col_max, len(col_max) - k)[len(col_max) - k]))
        flat = mag.ravel()
        cand = np.flatnonzero(flat >= thr) if thr >= 0 else np.arange(flat.size)
        if len(cand) > k:   # the k largest, and every entry tied with the k-th (ties go by position)
            kth = flat[cand[np.argpartition(-flat[cand], k - 1)[k - 1]]]
            cand = cand[flat[cand] >= kth]
        vals = np.concatenate([self.top_val, flat[cand].astype(np.float64)])
        rows = np.concatenate([self.top_row, cand // self.p + start])
        units = np.concatenate([self.top_unit, cand % self.p])
        order = np.lexsort((units, rows, -vals))[:k]
        self.top_val, self.top_row, self.top_unit = vals[order], rows[order], units[order]

    # -- results ---------------------------------------------------------------------

    @property
    def nonfinite(self) -> int:
        """Entries that were NaN or ±Inf."""
        return int(self.hist[NONFINITE_BIN:].sum())

    def _nonfinite_error(self) -> ZooauditError:
        return ZooauditError(f"Layer {self.name!r} contains NaN or Inf activations ({self.nonfinite} values so far); "
                             "activation statistics need finite values. Drop or impute the affected samples and "
                             "rerun.")

    def median_bounds(self) -> tuple[float, float]:
        """``[lo, hi]`` holding the median of ``|a|`` over all ``n·p`` entries (see the module docstring)."""
        total = self.n * self.p
        lo, _ = histogram_quantile_bounds(self.hist, (total - 1) // 2)
        _, hi = histogram_quantile_bounds(self.hist, total // 2)
        return lo, hi

    def per_sample_fraction(self) -> np.ndarray:
        """``(n,)`` fraction of active units of every sample, in row order."""
        return np.concatenate(self.sample_fraction) if self.sample_fraction else np.zeros(0)

    def eigenvalues(self) -> np.ndarray | None:
        """``(p,)`` eigenvalues of the covariance (ddof 0), descending; None without a spectrum.

        On the Gram route the ``n`` eigenvalues of ``Xc Xcᵀ / n`` are padded with the ``p − n``
        zeros the covariance has beyond its rank (≤ n − 1)."""
        if self.rows is not None:
            if self.n != len(self.rows):
                raise ZooauditError(f"Layer {self.name!r}: saw {self.n} rows, opened with gram_rows={len(self.rows)}.")
            self.rows -= self.rows.mean(0)   # in place, no second (n, p) copy; centring twice is a no-op
            # one (n, n) array: scaled in place, and eigvalsh reads one triangle (no symmetrised
            # copy) — n reaches ~11 600 within the budget when max_width is raised (1 GiB each)
            g = self.rows @ self.rows.T
            g /= self.n
            eig = np.clip(np.linalg.eigvalsh(g), 0.0, None)
            return np.concatenate([np.sort(eig)[::-1], np.zeros(max(self.p - len(eig), 0))])
        if self.gram is None:
            return None
        C = self.gram.centred() / self.n
        return np.sort(np.clip(np.linalg.eigvalsh((C + C.T) / 2), 0.0, None))[::-1]

    def result(self, abs_threshold: float = 100.0, ratio_threshold: float = 1000.0) -> dict:
        """Every statistic as NumPy values and floats (the stage labels them).

        Raises :class:`~zooaudit.errors.ZooauditError` when no rows were seen or an entry was
        NaN/±Inf (activity, medians and spectra of such a layer mean nothing)."""
        if self.n == 0:
            raise ZooauditError(f"Layer {self.name!r} has no samples; activation statistics need at least one.")
        if self.nonfinite:
            raise self._nonfinite_error()
        frac = self.per_sample_fraction()
        lo, hi = self.median_bounds()
        # bin 0 holds +0 and the float32 denormals below 1.8e-40: a median there counts as 0
        median = 0.0 if hi <= _bin_edges(0)[1] else (lo + hi) / 2
        top = self.top_val
        peak = float(top[0]) if len(top) else 0.0
        ratio = np.divide(top, median) if median > 0 else np.where(top > 0, np.inf, np.nan)
        flagged = (top > abs_threshold) & (top > ratio_threshold * hi)
        out = {
            "n": self.n, "eps": self.eps,
            "sample_active_fraction": frac,
            "unit_active_fraction": self.unit_active / self.n,
            "unit_max_abs": self.unit_max.copy(),
            "activation_ratio": float(self.unit_active.sum() / (self.n * self.p)),
            "sample_fraction_median": float(np.median(frac)),
            "sample_fraction_p10": float(np.quantile(frac, 0.1)),
            "sample_fraction_p90": float(np.quantile(frac, 0.9)),
            "dead_fraction": float((self.unit_active == 0).mean()),
            "always_active_fraction": float((self.unit_active == self.n).mean()),
            "median_abs": median, "median_abs_lo": lo, "median_abs_hi": hi,
            "max_abs": peak, "max_to_median": float(ratio[0]) if len(top) else np.nan,
            "top_value": top.copy(), "top_row": self.top_row.copy(), "top_unit": self.top_unit.copy(),
            "top_ratio": np.asarray(ratio, np.float64), "top_massive": flagged,
            # every unit whose largest |a| is massive (not only those among the top k)
            "n_massive_units": int(((self.unit_max > abs_threshold) & (self.unit_max > ratio_threshold * hi)).sum()),
        }
        if self.groups:
            out["group_unit_active_fraction"] = {a: c / np.maximum(self.group_n[a], 1)[:, None]
                                                 for a, c in self.group_unit_active.items()}
            out["group_n"] = {a: n.copy() for a, n in self.group_n.items()}
        eig = self.eigenvalues()
        if eig is not None:
            out["eigenvalues"] = eig
            out.update(spectrum_stats(eig))
        return out
