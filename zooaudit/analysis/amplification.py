"""Bias amplification: does a model exaggerate the (attribute, task) correlations of its training data?

Notation: ``A`` ``(n, G)`` multi-hot attribute (group) membership, ``T`` ``(n, T)`` multi-hot
task labels, ``T̂`` the predicted task labels and ``Â`` the predicted attribute (when the
model does not predict the attribute, ``Â = A``: the audit side's true attribute). The
training side (the dataset split named in the spec) gives ground-truth counts only; the
audit split is the test side. ``P_train`` / ``P`` are frequencies over those samples.

Measures (``MEASURES``):

- ``mals`` — Zhao et al. 2017 ("Men Also Like Shopping"):
  ``b(a, t) = c(a, t) / Σ_a' c(a', t)`` (co-occurrence counts); ``b*`` on the training labels,
  ``b̃`` on the test predictions ``(Â, T̂)``;
  ``BiasAmp = 1/|T| Σ_a Σ_{t : b*(a,t) > 1/|G|} (b̃(a, t) − b*(a, t))``.
  A task never predicted on the test side has no ``b̃`` and adds nothing.
- ``directional_at`` / ``directional_ta`` — Wang & Russakovsky 2021, ``BiasAmp→``:
  ``y_at = 1[P_train(A_a=1, T_t=1) > P_train(A_a=1) P_train(T_t=1)]``,
  ``Δ_at = P(T̂_t=1 | A_a=1) − P(T_t=1 | A_a=1)`` (A→T) or
  ``Δ_at = P(Â_a=1 | T_t=1) − P(A_a=1 | T_t=1)`` (T→A), both on the test side;
  ``BiasAmp→ = 1/(|G||T|) Σ_{a,t} y_at Δ_at + (1 − y_at)(−Δ_at)``. Pairs whose conditioning
  set is empty on the test side are left out of the mean (the authors' code: ``nanmean``).
  T→A needs the model's attribute predictions (``attr_pred``); without them it is NaN.
- ``multi_mals``, ``multi_gm``, ``multi_mg`` — Zhao, Andrews & Xiang 2023 ("Men Also Do
  Laundry"), over sets ``m`` of task labels (all sets of size 1..``max_order``; a sample has
  ``m`` when it has every label of ``m``); ``m ∈ M`` iff ``m`` co-occurs with some group at
  least once in both the training and the test ground truth.
  ``bias(m, g) = co(m, g) / Σ_g' co(m, g')``;
  ``Multi_MALS = (1/|M| Σ_g Σ_m |Δ_gm|, var(Δ_gm))`` with
  ``Δ_gm = 1[bias_train(m, g) > 1/|G|] (bias_pred(m, g) − bias_train(m, g))``;
  ``Multi→ = (1/(|G||M|) Σ_{g,m} y_gm|Δ_gm| + (1 − y_gm)|−Δ_gm|, var(Δ_gm))`` (the sum is
  ``Σ |Δ_gm|``) with ``Δ_gm = P_test(m̂=1 | g=1) − P_train(m=1 | g=1)`` (G→M, ``multi_gm``) or
  ``P_test(ĝ=1 | m=1) − P_train(g=1 | m=1)`` (M→G, ``multi_mg``). As in the paper, Δ compares
  test predictions with the *training* ground truth (the authors' code compares with the
  test ground truth). ``variance`` is over every (g, m) entry, ddof 0. M→G needs ``attr_pred``.

Uncertainty (training counts are the fixed reference; the test side is resampled):

- ``value_ci``: percentile bootstrap over test samples, drawn as multinomial counts over
  the distinct (A, Â, T, T̂) rows — exact, and O(n_boot · distinct rows), not O(n_boot · n).
- ``p_value``: one-sided permutation test of "no amplification": the predictions are
  shuffled within each stratum of their own ground truth (T̂ within T for mals, A→T,
  multi_mals, G→M; Â within A for T→A, M→G), which keeps accuracy per true label and
  breaks any dependence of the prediction on the other side. ``(1 + #{null ≥ obs}) / (1 + B)``.
  The shuffles are drawn as random contingency tables per stratum (:mod:`.contingency`), exact
  in distribution and O(B · distinct cells); per-sample shuffles only when the tables are huge.
  The multi-attribute measures' |Δ| mean has no such null (an attribute-blind model is far from
  the training bias, so its |Δ| is large): their test statistic is the signed mean
  ``1/(|G||M|) Σ y_gm Δ_gm`` (Multi_MALS: ``1/|M| Σ Δ_gm``; the authors' code's non-absolute
  option), stored as ``signed``.
  The null mean is not 0 (attribute-blind errors dilute correlations): the test asks for
  amplification beyond that.
"""

from __future__ import annotations

import itertools

import numpy as np
import xarray as xr

from ..errors import ZooauditError
from .fairness import CI_COORD
from .contingency import permuted_tables, table_cells
from .multitest import adjust, permutation_p_value

MEASURES = ("mals", "directional_at", "directional_ta", "multi_mals", "multi_gm", "multi_mg")
# which prediction each permutation null shuffles, within strata of its own ground truth
_PERMUTED = {"mals": "task", "directional_at": "task", "multi_mals": "task", "multi_gm": "task",
             "directional_ta": "attr", "multi_mg": "attr"}
_NEEDS_ATTR_PRED = {"directional_ta", "multi_mg"}
_TABLE_CELLS = 1_000_000     # larger permutation tables (cells × label sets): per-sample shuffles instead
_PERM_ELEMENTS = 20_000_000   # permutations per batch × samples: bounds the batch's index arrays (~160 MB each)
MAX_SETS = 20_000


def multi_hot(values, field: str, n_classes: int | None = None, *, multi_label: bool = False) -> np.ndarray:
    """``(n, C)`` float64 0/1 matrix from ``(n,)`` integer class codes (one-hot) or an ``(n, C)`` 0/1 matrix.

    ``multi_label``: the field was asked to be multi-hot; a 1-d array is then an error."""
    a = np.asarray(values)
    if a.ndim == 1 and not multi_label:
        if not np.issubdtype(a.dtype, np.integer) or (a.size and a.min() < 0):
            raise ZooauditError(f"{field} must hold non-negative integer class codes (or an (n, C) 0/1 matrix); "
                                f"got dtype {a.dtype}.")
        C = int(n_classes if n_classes is not None else (a.max() + 1 if a.size else 0))
        if a.size and a.max() >= C:
            raise ZooauditError(f"{field} has class code {int(a.max())} but only {C} classes are known.")
        out = np.zeros((a.size, C))
        out[np.arange(a.size), a] = 1.0
        return out
    check_multi_hot(a, field, n_classes, multi_label=multi_label)
    return a.astype(np.float64)


_CHECK_ELEMENTS = 1 << 20   # entries of a multi-hot matrix validated (and packed) at a time


def check_multi_hot(a: np.ndarray, field: str, n_classes: int | None = None, *, multi_label: bool = False) -> None:
    """Raise unless ``a`` is an ``(n, C)`` 0/1 matrix (``C = n_classes`` when given); the entries are checked
    block by block of rows, so no ``(n, C)`` temporary is made (the first bad entry in row order is named)."""
    if a.ndim != 2:
        raise ZooauditError(f"{field} must be a multi-hot (n_samples, n_labels) matrix of 0/1"
                            f"{'' if multi_label else ' or (n_samples,) class codes'}; got shape {a.shape}.")
    step = max(1, _CHECK_ELEMENTS // max(a.shape[1], 1))
    for start in range(0, a.shape[0], step):
        block = a[start:start + step]
        ok = np.isin(block, (0, 1))
        if not ok.all():
            bad = block[~ok].ravel()[0]
            raise ZooauditError(f"{field} must be multi-hot (every entry 0 or 1); found {bad!r}.")
    if n_classes is not None and a.shape[1] != n_classes:
        raise ZooauditError(f"{field} has {a.shape[1]} columns but {n_classes} labels are known.")


_BLOCK = 1 << 16          # samples per block of the streamed counts: bounds the per-sample temporaries


class _Side:
    """One side's distinct label rows: ``table`` ``(p, C)`` float64 0/1 (the distinct rows of
    :func:`multi_hot` ``(values)``) and :meth:`index` — each sample's row, per block of samples.

    Class codes keep only the caller's ``(n,)`` codes and a ``(C,)`` lookup table: the per-sample rows
    are built one block at a time, so no ``(n,)`` index (nor an ``(n, C)`` matrix) is held.
    ``multi_label``: the field was asked to be multi-hot; a 1-d array is then an error."""

    def __init__(self, values, field: str, n_classes: int, *, multi_label: bool = False):
        a = np.asarray(values)
        self.n = len(a)
        if a.ndim == 1 and not multi_label:
            if a.size == 0:
                a = a.astype(np.int64)   # no samples: no codes, whatever dtype the empty array got
            if a.size and (not np.issubdtype(a.dtype, np.integer) or a.min() < 0 or a.max() >= n_classes):
                multi_hot(a, field, n_classes)       # raises the error that names the bad dtype or code
            # a lookup table over the class codes instead of np.unique: no sorted copy or inverse per sample.
            # Codes in descending order: the one-hot row of code k is 2^(C−1−k) packed (first column most
            # significant), so this is np.unique's lexicographic order of the one-hot rows; the cells, and so
            # the multinomial bootstrap draws over them, are then the same as for the one-hot matrix.
            values_u = np.flatnonzero(np.bincount(a, minlength=n_classes))[::-1]
            self._lut = np.zeros(n_classes, np.int32)
            self._lut[values_u] = np.arange(values_u.size, dtype=np.int32)
            self._codes, self._index = a, None
            self.table = multi_hot(values_u, field, n_classes)
            return
        check_multi_hot(a, field, n_classes, multi_label=multi_label)
        self._codes = self._index = None
        if a.shape[1] > _PACKED_LABELS:   # rows too wide to pack into one int64: the whole-matrix sort
            table, index = np.unique(a.astype(np.int8), axis=0, return_inverse=True)
            self.table, self._index = table.astype(np.float64), index.ravel()
            return
        # each row packed into one int64 (first column most significant: numeric order = np.unique's
        # lexicographic row order), packed and counted per block of rows: no (n, C) copy
        self._mat, self._step = a, max(1, _CHECK_ELEMENTS // max(a.shape[1], 1))
        self._cells, _ = _count_blocks((_pack_rows(a[s:s + self._step]) for s in range(0, self.n, self._step)),
                                       1 << a.shape[1])
        self.table = _unpack_rows(self._cells, a.shape[1])

    def index(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """``(stop − start,)`` row of each sample in ``[start, stop)`` (all samples by default)."""
        if self._index is not None:
            return self._index[start:stop]
        if self._codes is not None:
            return self._lut[self._codes[start:stop]]
        stop = self.n if stop is None else min(stop, self.n)
        parts = [np.searchsorted(self._cells, _pack_rows(self._mat[s:min(s + self._step, stop)]))
                 for s in range(start, stop, self._step)]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)


_PACKED_LABELS = 62        # multi-hot rows up to this wide are packed into int64 codes


def _pack_rows(block: np.ndarray) -> np.ndarray:
    """``(b,)`` int64 code of each 0/1 row of ``block`` ``(b, C)``, ``C ≤ 62``, first column most significant."""
    code = np.zeros(block.shape[0], np.int64)
    for j in range(block.shape[1]):
        code <<= 1
        code |= block[:, j].astype(np.int64)     # one (b,) column at a time: no (b, C) int copy
    return code


def _unpack_rows(codes: np.ndarray, C: int) -> np.ndarray:
    """``(p, C)`` float64 0/1 rows of packed ``codes`` (the inverse of :func:`_pack_rows`)."""
    shifts = np.arange(C - 1, -1, -1, dtype=np.int64)
    return ((np.asarray(codes, np.int64)[:, None] >> shifts[None, :]) & 1).astype(np.float64)


def patterns(values, field: str, n_classes: int, *, multi_label: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(table (p, C) float64 0/1, index (n,))``: the distinct rows of :func:`multi_hot` ``(values)`` and each
    sample's row, without building the ``(n, C)`` matrix for class codes (memory O(n) ints, not O(n·C) floats)."""
    side = _Side(values, field, n_classes, multi_label=multi_label)
    return side.table, side.index()


def _pair_rows(pa: _Side, pt: _Side) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct (attribute row, task row) pairs of a split: ``(attr rows, task rows, counts)``, counted
    block by block."""
    q = len(pt.table)

    def keys():
        for start in range(0, pa.n, _BLOCK):
            key = pa.index(start, start + _BLOCK).astype(np.int64)
            key *= q
            key += pt.index(start, start + _BLOCK)
            yield key
    pair, count = _count_blocks(keys(), len(pa.table) * q)
    return pa.table[pair // q], pt.table[pair % q], count.astype(np.float64)


_DENSE_CODES = 1 << 24     # codes below this are counted with bincount (no per-sample sort or inverse)


def _distinct(codes: np.ndarray, n_codes: int) -> tuple[np.ndarray, np.ndarray]:
    """``(distinct codes, counts)`` of ``(n,)`` non-negative integer codes below ``n_codes``, as
    ``np.unique``; both ``(0,)`` int64 for no codes (an empty array of any dtype: ``np.array([])``
    is float64, which ``np.bincount`` refuses)."""
    codes = np.asarray(codes)
    if codes.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if not np.issubdtype(codes.dtype, np.integer):
        raise ZooauditError(f"pattern codes must be integers; got dtype {codes.dtype}.")
    if n_codes <= _DENSE_CODES:
        count = np.bincount(codes, minlength=n_codes)
        cells = np.flatnonzero(count)
        return cells, count[cells]
    return np.unique(codes, return_counts=True)


_DENSE_BLOCKS = 1 << 20    # streamed counts: a running dense table up to this many codes, else merged uniques


def _count_blocks(blocks, n_codes: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_distinct` of the concatenation of ``blocks`` (an iterable of ``(b,)`` integer code arrays
    below ``n_codes``) without concatenating them: a running ``bincount`` for few codes, else the
    blocks' own ``(distinct, counts)`` merged once at the end (memory O(distinct codes))."""
    if n_codes <= _DENSE_BLOCKS:
        total = np.zeros(n_codes, np.int64)
        for codes in blocks:
            if codes.size:
                total += np.bincount(codes, minlength=n_codes)
        cells = np.flatnonzero(total)
        return cells, total[cells]
    parts = [np.unique(codes, return_counts=True) for codes in blocks if codes.size]
    if len(parts) <= 1:
        return parts[0] if parts else _distinct(np.zeros(0, np.int64), n_codes)
    cells, inv = np.unique(np.concatenate([c for c, _ in parts]), return_inverse=True)
    counts = np.bincount(inv.ravel(), weights=np.concatenate([w for _, w in parts]), minlength=len(cells))
    return cells, counts.astype(np.int64)


def label_sets(train_task: np.ndarray, test_task: np.ndarray, train_attr: np.ndarray, test_attr: np.ndarray,
               max_order: int, train_count=None, test_count=None) -> list[tuple[int, ...]]:
    """The sets ``M`` of Multi-MALS: task-label sets of size 1..``max_order`` that co-occur with some
    group at least once in the training and in the test ground truth. Rows may be distinct rows
    weighted by ``*_count``."""
    train_count = np.ones(len(train_task)) if train_count is None else train_count
    test_count = np.ones(len(test_task)) if test_count is None else test_count
    T = train_task.shape[1]
    sizes = [sum(1 for _ in itertools.combinations(range(T), r)) for r in range(1, max_order + 1)]
    if sum(sizes) > MAX_SETS:
        raise ZooauditError(f"max_order={max_order} over {T} task labels gives {sum(sizes)} label sets "
                            f"(limit {MAX_SETS}); lower max_order.")
    out = []
    for r in range(1, max_order + 1):
        for m in itertools.combinations(range(T), r):
            idx = list(m)
            ok = all(((np.all(task[:, idx] == 1, axis=1) * count)[:, None] * attr).sum() >= 1
                     for task, attr, count in ((train_task, train_attr, train_count), (test_task, test_attr, test_count)))
            if ok:
                out.append(m)
    return out


def _membership(task: np.ndarray, sets: list[tuple[int, ...]]) -> np.ndarray:
    """``(n, |M|)``: 1 where a row has every label of the set."""
    out = np.ones((task.shape[0], len(sets)))
    for j, m in enumerate(sets):
        out[:, j] = np.prod(task[:, list(m)], axis=1)
    return out


def _co(w: np.ndarray, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """``(B, p, q)`` weighted co-occurrence counts ``Σ_k w_bk X_kp Y_kq``."""
    k, p, q = X.shape[0], X.shape[1], Y.shape[1]
    return (w @ (X[:, :, None] * Y[:, None, :]).reshape(k, p * q)).reshape(-1, p, q)


def _div(a, b):
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), np.nan)


class _Train:
    """Training-side counts: ``n``, ``n_a`` (G,), ``n_t`` (T,), ``n_at`` (G, T); the same over label sets."""

    def __init__(self, attr, task, sets, count=None):
        ones = (np.ones(attr.shape[0]) if count is None else np.asarray(count, np.float64))[None, :]
        self.n = float(ones.sum())
        self.n_a, self.n_t = (ones @ attr)[0], (ones @ task)[0]
        self.n_at = _co(ones, attr, task)[0]
        member = _membership(task, sets)
        self.n_m, self.n_gm = (ones @ member)[0], _co(ones, attr, member)[0]


def _stats(w, f: dict, tr: _Train, G: int, measures) -> dict[str, tuple[np.ndarray, ...]]:
    """``{measure: (value (B,), variance (B,), per-pair (B, G, ·), test statistic (B,))}`` from test-side
    cell weights ``w`` (B, k). The test statistic is the value, except for the multi-attribute measures,
    whose |Δ| mean has no "no amplification" null: their signed mean (``y·Δ``; Δ itself for Multi_MALS)."""
    out = {}
    n_a = w @ f["A"]                                             # (B, G)
    if "mals" in measures:
        b_star = _div(tr.n_at, tr.n_at.sum(0, keepdims=True))
        c = _co(w, f["Ahat"], f["P"])
        pair = np.where(b_star > 1 / G, _div(c, c.sum(1, keepdims=True)) - b_star, 0.0)
        pair = np.where(np.isnan(pair), 0.0, pair)               # tasks never predicted: no b̃
        value = pair.sum((1, 2)) / tr.n_at.shape[1]
        out["mals"] = (value, np.full(len(w), np.nan), pair, value)
    y_at = tr.n_at / tr.n > np.outer(tr.n_a / tr.n, tr.n_t / tr.n)   # (G, T)
    if "directional_at" in measures:
        delta = _div(_co(w, f["A"], f["P"]) - _co(w, f["A"], f["T"]), n_a[:, :, None])
        pair = np.where(y_at, delta, -delta)
        out["directional_at"] = (_nanmean(pair), np.full(len(w), np.nan), pair, _nanmean(pair))
    if "directional_ta" in measures:
        n_t = (w @ f["T"])[:, None, :]
        delta = _div(_co(w, f["Ahat"], f["T"]) - _co(w, f["A"], f["T"]), n_t)
        pair = np.where(y_at, delta, -delta)
        out["directional_ta"] = (_nanmean(pair), np.full(len(w), np.nan), pair, _nanmean(pair))
    if "multi_mals" in measures:
        bias_tr = _div(tr.n_gm, tr.n_gm.sum(0, keepdims=True))
        c = _co(w, f["Ahat"], f["Pm"])
        delta = np.where(bias_tr > 1 / G, _div(c, c.sum(1, keepdims=True)) - bias_tr, 0.0)
        size = max(tr.n_m.size, 1)
        out["multi_mals"] = (np.nansum(np.abs(delta), (1, 2)) / size, _nanvar(delta), delta,
                             np.nansum(delta, (1, 2)) / size)
    y_gm = tr.n_gm / tr.n > np.outer(tr.n_a / tr.n, tr.n_m / tr.n)
    if "multi_gm" in measures:
        delta = _div(_co(w, f["A"], f["Pm"]), n_a[:, :, None]) - _div(tr.n_gm, tr.n_a[:, None])
        out["multi_gm"] = (_nanmean(np.abs(delta)), _nanvar(delta), delta, _nanmean(np.where(y_gm, delta, -delta)))
    if "multi_mg" in measures:
        n_m = (w @ f["Tm"])[:, None, :]
        delta = _div(_co(w, f["Ahat"], f["Tm"]), n_m) - _div(tr.n_gm, tr.n_m[None, :])
        out["multi_mg"] = (_nanmean(np.abs(delta)), _nanvar(delta), delta, _nanmean(np.where(y_gm, delta, -delta)))
    return out


def _nanmean(x):
    ok = np.isfinite(x)
    return np.where(ok.any((1, 2)), np.where(ok, x, 0).sum((1, 2)) / np.maximum(ok.sum((1, 2)), 1), np.nan)


def _nanvar(x):
    mean = _nanmean(x)[:, None, None]
    ok = np.isfinite(x)
    return _nanmean(np.where(ok, (x - mean) ** 2, np.nan))


class _Rows:
    """The test side as distinct patterns: per side a pattern table and each sample's row (:class:`_Side`);
    the per-sample cell codes are built and counted block by block (:meth:`observed`)."""

    def __init__(self, **sides: _Side):
        self.sides = sides
        self.tables = {name: side.table for name, side in sides.items()}
        self.n = sides[next(iter(sides))].n
        self.order = list(sides)
        self.sizes = [len(self.tables[s]) for s in self.order]
        if np.prod(np.asarray(self.sizes, dtype=np.float64)) > 2.0 ** 62:
            raise ZooauditError("too many distinct label patterns for the amplification tables; "
                                "fewer labels or samples are needed.")

    def code(self, index: dict) -> np.ndarray:
        c = np.zeros(np.shape(index[self.order[0]]), dtype=np.int64)
        for s, size in zip(self.order, self.sizes):
            c *= size                # in place: one int64 array per sample, no temporaries
            c += index[s]
        return c

    def index(self) -> dict[str, np.ndarray]:
        """Every sample's row per side, ``{side: (n,)}`` (the per-sample shuffles only)."""
        return {name: side.index() for name, side in self.sides.items()}

    def observed(self) -> tuple[np.ndarray, np.ndarray]:
        """The distinct cell codes of the test samples and their ``(1, k)`` counts, counted per block of
        samples (as :meth:`counts` of all the codes at once, without an ``(n,)`` code array)."""
        def blocks():
            for start in range(0, self.n, _BLOCK):
                yield self.code({name: side.index(start, start + _BLOCK) for name, side in self.sides.items()})
        cells, w = _count_blocks(blocks(), int(np.prod(self.sizes, dtype=np.int64)))
        return cells, w[None, :].astype(np.float64)

    def multiplier(self, side: str) -> int:
        """What one step of ``side``'s index adds to a code."""
        return int(np.prod(self.sizes[self.order.index(side) + 1:], dtype=np.int64))

    def decode(self, codes: np.ndarray) -> dict:
        out, c = {}, codes.copy()
        for s, size in reversed(list(zip(self.order, self.sizes))):
            out[s] = c % size
            c //= size
        return out

    def features(self, codes: np.ndarray, sets) -> dict:
        idx = self.decode(codes)
        f = {"A": self.tables["A"][idx["A"]], "Ahat": self.tables["Ahat"][idx["Ahat"]],
             "T": self.tables["T"][idx["T"]], "P": self.tables["P"][idx["P"]]}
        f["Tm"], f["Pm"] = _membership(f["T"], sets), _membership(f["P"], sets)
        return f

    def counts(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Distinct codes of a ``(B, n)`` batch and their ``(B, k)`` counts."""
        if codes.shape[0] == 1:     # the observed counts: no (n,) inverse needed
            cells, w = _distinct(codes[0], int(np.prod(self.sizes, dtype=np.int64)))
            return cells, w[None, :].astype(np.float64)
        cells, inv = np.unique(codes, return_inverse=True)
        B = codes.shape[0]
        w = np.bincount((inv.reshape(B, -1) + np.arange(B)[:, None] * len(cells)).ravel(),
                        minlength=B * len(cells)).reshape(B, len(cells))
        return cells, w.astype(np.float64)


def _within_strata(strata: np.ndarray, B: int, rng) -> np.ndarray:
    """``(B, n)`` index arrays, each a permutation of ``range(n)`` that only mixes samples of one stratum."""
    order = np.argsort(strata, kind="stable")
    s_sorted = strata[order].astype(np.float64)
    perm = np.argsort(s_sorted[None, :] + rng.random((B, strata.size)), axis=1)
    out = np.empty((B, strata.size), np.int64)
    out[:, order] = order[perm]
    return out


def bias_amplification(train_attr, train_task, attr, task, task_pred, attr_pred=None, *,
                       measures=MEASURES, attr_names=None, task_names=None, max_order: int = 2,
                       n_boot: int = 200, n_permutations: int = 1000, ci: float = 0.95, random_state: int = 0,
                       correction: str = "bh", alpha: float = 0.05, multi_label: bool = False,
                       n_groups: int | None = None, n_tasks: int | None = None) -> xr.Dataset:
    """Bias amplification measures with bootstrap CIs and permutation p-values (module docstring).

    Args:
        train_attr, train_task: training split: ``(m,)`` class codes or ``(m, G)`` / ``(m, T)`` 0/1.
        attr, task, task_pred: the audit (test) split: true attribute, true and predicted task.
        attr_pred: the model's predicted attribute (None: the true one; T→A and M→G are then NaN).
        measures: a subset of :data:`MEASURES`.
        max_order: largest label set of the multi-attribute measures.
        n_boot, n_permutations, ci, random_state: resampling (0 = none); independent streams.
        correction, alpha: BH or Holm across the measures of this call.
        multi_label: the task labels must be multi-hot matrices (a 1-d array is an error).
        n_groups, n_tasks: ``G`` / ``T`` when the attribute / task are given as codes (None: the largest
            code + 1), so that codes give the same tables as the one-hot matrices when the last classes
            never occur.

    Returns:
        Dataset over ``measure``: ``value``, ``value_ci`` (measure, ci), ``variance`` (multi
        measures), ``signed`` (the test statistic), ``p_value``, ``p_adjusted``, ``reject``; per-pair tables ``pairs_<measure>``
        over ``(attribute, task)`` or ``(attribute, label_set)``.
    """
    bad = [m for m in measures if m not in MEASURES]
    if bad or not measures:
        raise ZooauditError(f"Unknown amplification measure(s) {bad}; allowed: {', '.join(MEASURES)}.")
    if not isinstance(max_order, int) or max_order < 1:
        raise ZooauditError(f"max_order must be an integer ≥ 1; got {max_order!r}.")
    for name, v in (("n_boot", n_boot), ("n_permutations", n_permutations)):
        if not isinstance(v, (int, np.integer)) or v < 0:
            raise ZooauditError(f"{name} must be an integer ≥ 0; got {v!r}.")
    # before any max over the labels: an empty split would fail there with NumPy's own message
    for side, fields in (("training", {"train_attr": train_attr, "train_task": train_task}),
                         ("test", {"attr": attr, "task": task, "task_pred": task_pred})):
        if empty := [name for name, v in fields.items() if np.asarray(v).size == 0]:
            raise ZooauditError(f"bias_amplification needs samples on both the training and the test side; "
                                f"{', '.join(empty)} ({side} side) {'is' if len(empty) == 1 else 'are'} empty.")
    # with codes and a given width, a code ≥ the width is refused by _Side
    G = np.asarray(attr).shape[1] if np.asarray(attr).ndim != 1 else int(n_groups) if n_groups is not None else \
        int(max(np.max(np.asarray(train_attr)) + 1, np.max(np.asarray(attr)) + 1))
    T = np.asarray(task).shape[1] if np.asarray(task).ndim != 1 else int(n_tasks) if n_tasks is not None else \
        int(max(np.max(np.asarray(train_task)), np.max(np.asarray(task)), np.max(np.asarray(task_pred))) + 1)
    tr_a, A = _Side(train_attr, "train_attr", G), _Side(attr, "attr", G)
    tr_t = _Side(train_task, "train_task", T, multi_label=multi_label)
    Tt = _Side(task, "task", T, multi_label=multi_label)
    P = _Side(task_pred, "task_pred", T, multi_label=multi_label)
    Ahat = A if attr_pred is None else _Side(attr_pred, "attr_pred", G)
    for name, x, ref in (("attr", A, Tt), ("task_pred", P, Tt), ("attr_pred", Ahat, Tt), ("train_attr", tr_a, tr_t)):
        if x.n != ref.n:
            raise ZooauditError(f"{name} has {x.n} rows but {'train_task' if name == 'train_attr' else 'task'} "
                                f"has {ref.n}: one row per sample, in the same order.")
    for name, x in (("train_attr", tr_a), ("attr", A)):
        if (x.table.sum(0) > 0).sum() < 2:
            raise ZooauditError(f"{name} has a single attribute value: amplification compares at least two "
                                "groups; give an attribute with two or more observed values.")
    if tr_t.n == 0 or Tt.n == 0:
        raise ZooauditError("bias_amplification needs samples on both the training and the test side.")
    measures = [m for m in MEASURES if m in measures]
    train_rows, test_rows = _pair_rows(tr_a, tr_t), _pair_rows(A, Tt)
    sets = label_sets(train_rows[1], test_rows[1], train_rows[0], test_rows[0], max_order, train_rows[2],
                      test_rows[2])
    train = _Train(*train_rows[:2], sets, train_rows[2])
    rows = _Rows(A=A, Ahat=Ahat, T=Tt, P=P)
    cells, w_obs = rows.observed()
    obs = _stats(w_obs, rows.features(cells, sets), train, G, measures)

    boot_ss, perm_ss = np.random.SeedSequence(random_state).spawn(2)
    q = [(1 - ci) / 2, 1 - (1 - ci) / 2]
    value_ci = np.full((len(measures), 2), np.nan)
    if n_boot:
        wb = np.random.default_rng(boot_ss).multinomial(rows.n, w_obs[0] / w_obs[0].sum(), size=n_boot)
        boot = _stats(wb.astype(np.float64), rows.features(cells, sets), train, G, measures)
        for i, m in enumerate(measures):
            vals = boot[m][0][np.isfinite(boot[m][0])]
            if vals.size:
                value_ci[i] = np.quantile(vals, q)
    p = np.full(len(measures), np.nan)
    if n_permutations:
        rng = np.random.default_rng(perm_ss)
        for side in ("task", "attr"):
            todo = [m for m in measures if _PERMUTED[m] == side and not (m in _NEEDS_ATTR_PRED and attr_pred is None)]
            if not todo:
                continue
            moved, stratum = ("P", "T") if side == "task" else ("Ahat", "A")
            null = {m: [] for m in todo}
            idx, mult = rows.decode(cells), rows.multiplier(moved)
            fixed = cells - idx[moved] * mult          # the cell's code with the moved side at 0
            if table_cells(idx[stratum], fixed, idx[moved]) * max(1, len(sets)) <= _TABLE_CELLS:
                # random contingency tables per stratum: O(permutations · cells), no per-sample arrays
                batch = max(1, min(n_permutations, _PERM_ELEMENTS // max(table_cells(idx[stratum], fixed,
                                                                                      idx[moved]), 1)))
                for start in range(0, n_permutations, batch):
                    f_k, m_k, w = permuted_tables(idx[stratum], fixed, idx[moved], w_obs[0],
                                                  min(batch, n_permutations - start), rng)
                    st = _stats(w.astype(np.float64), rows.features(f_k + m_k * mult, sets), train, G, todo)
                    for m in todo:
                        null[m].append(st[m][3])
            else:   # too many distinct patterns for tables: shuffle per-sample indices, in bounded batches
                per_sample = rows.index()
                strata = per_sample[stratum]
                batch = max(1, min(100, _PERM_ELEMENTS // max(rows.n, 1)))
                for start in range(0, n_permutations, batch):
                    perm = _within_strata(strata, min(batch, n_permutations - start), rng)
                    index = {s: np.broadcast_to(v, perm.shape) for s, v in per_sample.items()}
                    index[moved] = per_sample[moved][perm]
                    c, w = rows.counts(rows.code(index))
                    st = _stats(w, rows.features(c, sets), train, G, todo)
                    for m in todo:
                        null[m].append(st[m][3])
            for m in todo:
                p[measures.index(m)] = permutation_p_value(float(obs[m][3][0]), np.concatenate(null[m]))
    value = np.array([obs[m][0][0] for m in measures])
    variance = np.array([obs[m][1][0] for m in measures])
    signed = np.array([obs[m][3][0] for m in measures])
    for i, m in enumerate(measures):
        if m in _NEEDS_ATTR_PRED and attr_pred is None:
            value[i], value_ci[i], variance[i], signed[i] = np.nan, np.nan, np.nan, np.nan
    adj = adjust(p, method=correction, alpha=alpha)
    attr_names = [str(a) for a in (attr_names if attr_names is not None else range(G))]
    task_names = [str(t) for t in (task_names if task_names is not None else range(T))]
    set_names = ["+".join(task_names[i] for i in m) for m in sets]
    ds = xr.Dataset(
        {"value": ("measure", value), "value_ci": (("measure", "ci"), value_ci),
         "variance": ("measure", variance), "signed": ("measure", signed),
         "p_value": ("measure", p), "p_adjusted": ("measure", adj.p_adjusted), "reject": ("measure", adj.reject)},
        coords={"measure": measures, "ci": CI_COORD, "attribute": attr_names, "task": task_names,
                "label_set": set_names})
    for m in measures:
        ds[f"pairs_{m}"] = (("attribute", "label_set" if m.startswith("multi") else "task"), obs[m][2][0])
    ds.attrs.update(n_train=int(train.n), n_test=int(rows.n), n_boot=int(n_boot),
                    n_permutations=int(n_permutations), ci=float(ci), random_state=int(random_state),
                    max_order=int(max_order), attr_pred_given=attr_pred is not None, correction=correction,
                    ci_method="percentile bootstrap over test samples (training counts fixed)",
                    null="predictions shuffled within strata of their own ground truth")
    return ds
