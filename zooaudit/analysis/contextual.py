"""Contextual bias (Singh et al. 2020, "Don't Judge an Object by Its Context").

For a category ``b`` and a context ``z`` (another label, or an attribute value such as a
background kind or a colour), over the audit samples that contain ``b``:

- bias score ``bias(b, z) = mean p̂(b | b ∧ z) / mean p̂(b | b ∧ ¬z)``, with ``p̂(b)`` the
  model's score for ``b`` (its probability; hard 0/1 predictions when no scores are given).
  Above 1: the model is more confident about ``b`` when ``z`` is there.
- co-occurring accuracy ``P(b̂ = 1 | b ∧ z)`` and exclusive accuracy ``P(b̂ = 1 | b ∧ ¬z)``
  (recall of ``b`` in the two settings), with Wilson intervals.

The candidate pairs come from the co-occurrence statistics of the training split, as in the
paper: ``z`` co-occurs with ``b`` in more than ``min_cooccurrence`` (10%) of ``b``'s training
samples; ``z ≠ b`` when contexts are the categories themselves. Each category's most biased
context is the candidate with the highest bias score on the audit split; pairs are ranked
by bias score. Min-n policy (as the group metrics): a pair whose co-occurring or exclusive
audit subset has fewer than ``min_group_size`` samples is reported, flagged ``small``, never
chosen as a most-biased context and ranked after every non-small pair. ``bias_ci`` is a
percentile bootstrap stratified by the two subsets.

Memory: no ``(n, C)`` matrix is built. Each side is kept as its distinct rows and the caller's array
(:class:`.amplification._Side`); the training co-occurrence is counted per block of samples over the
distinct (category, context) row pairs, and each candidate pair's two score subsets (``O(n)``) and
hit counts are gathered per block; bootstrap resamples are drawn in bounded batches (the same draws).
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from ..errors import ZooauditError
from .amplification import _BLOCK, _pair_rows, _Side
from .fairness import CI_COORD, wilson_interval


def contextual_bias(train_category, train_context, category, context, predicted, scores=None, *,
                    category_names=None, context_names=None, contexts_are_categories: bool = False,
                    min_cooccurrence: float = 0.1, min_group_size: int = 20, n_boot: int = 200, ci: float = 0.95,
                    random_state: int = 0, top_k: int | None = None, n_categories: int | None = None,
                    n_contexts: int | None = None) -> xr.Dataset:
    """Bias scores and exclusive/co-occurring accuracy of the candidate (category, context) pairs.

    Args:
        train_category, train_context: training split, ``(m,)`` codes or ``(m, C)`` / ``(m, Z)`` 0/1.
        category, context: the audit split, same forms (``(n, C)``, ``(n, Z)``).
        predicted: ``(n,)`` predicted class codes or ``(n, C)`` 0/1 predictions.
        scores: ``(n, C)`` model scores p̂ (e.g. softmax probabilities); or, when ``category`` is ``(n,)``
            class codes, ``(n,)`` the score of each sample's own category p̂(b = category_i) — the only
            column the measure reads of a single-label sample (``O(n)`` instead of ``O(n·C)``, the same
            result); None = ``predicted``.
        contexts_are_categories: the context columns are the categories (``z = b`` is skipped).
        min_cooccurrence: a pair is a candidate when ``z`` is in more than this fraction of ``b``'s
            training samples and ``b`` also occurs without ``z`` there.
        top_k: keep only the ``top_k`` highest-ranked pairs (None: all candidates).
        n_categories, n_contexts: ``C`` / ``Z`` when the categories / contexts are given as codes (None:
            the largest code + 1); with them, codes give the same result as the ``(n, C)`` one-hot matrices
            even when the last classes never occur (a caller's ``(n, C)`` scores keep their width).

    Returns:
        Dataset over ``pair`` (coords ``category``, ``context``), in rank order: ``bias``,
        ``bias_ci``, ``n_cooccur``, ``n_exclusive``, ``acc_cooccur``, ``acc_exclusive`` (and
        ``_wilson``), ``train_cooccurrence``, ``small``, ``most_biased``.
    """
    if not 0.0 <= min_cooccurrence < 1.0:
        raise ZooauditError(f"min_cooccurrence is a fraction in [0, 1); got {min_cooccurrence!r}.")
    C = _n_cols(train_category, category, predicted, n=n_categories)
    Z = _n_cols(train_context, context, n=n_contexts)
    tr_b, tr_z = _Side(train_category, "train_category", C), _Side(train_context, "train_context", Z)
    B_, Zm = _Side(category, "category", C), _Side(context, "context", Z)
    pred = _Side(predicted, "predicted", C)
    p_hat = None if scores is None else np.asarray(scores)
    own = np.asarray(category).ndim == 1    # class codes: an (n,) score is each sample's own category's
    if p_hat is not None and p_hat.shape != (pred.n, C) and not (own and p_hat.shape == (pred.n,)):
        allowed = f"(n_samples, n_categories) = {(pred.n, C)}" + (f", or {(pred.n,)} (each sample's own "
                                                                  "category's score)" if own else "")
        raise ZooauditError(f"scores must have shape {allowed}; got {p_hat.shape}.")
    for name, x, ref in (("context", Zm, B_), ("predicted", pred, B_), ("train_context", tr_z, tr_b)):
        if x.n != ref.n:
            raise ZooauditError(f"{name} has {x.n} rows but its categories have {ref.n}: one row per sample.")
    if contexts_are_categories and Z != C:
        raise ZooauditError("contexts_are_categories needs as many context columns as categories.")
    # training co-occurrence from the distinct (category row, context row) pairs, counted per block:
    # exact integer counts in float64, as the (C, Z) product of the whole 0/1 matrices
    rows_b, rows_z, count = _pair_rows(tr_b, tr_z)
    with np.errstate(invalid="ignore", divide="ignore"):
        n_b_tr = count @ rows_b if count.size else np.zeros(C)
        co_tr = ((rows_b * count[:, None]).T @ rows_z) / np.where(n_b_tr > 0, n_b_tr, 1)[:, None]  # (C, Z)
    cand = (co_tr > min_cooccurrence) & (co_tr < 1.0) & (n_b_tr[:, None] > 0)
    if contexts_are_categories:
        np.fill_diagonal(cand, False)
    bs, zs = np.nonzero(cand)
    rng = np.random.default_rng(random_state)
    rows = []
    for b, z in zip(bs, zs):
        s_with, s_without, hit_with, hit_without = _pair_scores(B_, Zm, pred, p_hat, b, z)
        bias = _ratio(s_with.mean() if s_with.size else np.nan, s_without.mean() if s_without.size else np.nan)
        lohi = np.full(2, np.nan)
        if n_boot and s_with.size > 1 and s_without.size > 1:
            mw, mo = _boot_means(s_with, n_boot, rng), _boot_means(s_without, n_boot, rng)
            r = _ratio(mw, mo)
            r = r[np.isfinite(r)]
            if r.size:
                lohi = np.quantile(r, [(1 - ci) / 2, 1 - (1 - ci) / 2])
        rows.append((b, z, bias, lohi, s_with.size, s_without.size, hit_with, hit_without, co_tr[b, z]))
    small = np.array([min(r[4], r[5]) < min_group_size for r in rows], bool)
    bias_v = np.array([r[2] for r in rows], np.float64)
    # rank: non-small first, then by bias score (NaN last)
    order = np.lexsort((-np.nan_to_num(bias_v, nan=-np.inf), small)) if rows else np.array([], int)
    most = np.zeros(len(rows), bool)
    seen = set()
    for i in order:
        if not small[i] and np.isfinite(bias_v[i]) and rows[i][0] not in seen:
            most[i] = True
            seen.add(rows[i][0])
    if top_k is not None:
        order = order[:top_k]
    cat_names = [str(c) for c in (category_names if category_names is not None else range(C))]
    ctx_names = [str(c) for c in (context_names if context_names is not None else range(Z))]
    sel = [rows[i] for i in order]
    n_w = np.array([r[4] for r in sel], np.int64)
    n_o = np.array([r[5] for r in sel], np.int64)
    h_w = np.array([r[6] for r in sel], np.int64)
    h_o = np.array([r[7] for r in sel], np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc_w = np.where(n_w > 0, h_w / np.maximum(n_w, 1), np.nan)
        acc_o = np.where(n_o > 0, h_o / np.maximum(n_o, 1), np.nan)
    ds = xr.Dataset(
        {"bias": ("pair", bias_v[order] if len(order) else np.zeros(0)),
         "bias_ci": (("pair", "ci"), np.array([r[3] for r in sel]).reshape(-1, 2)),
         "n_cooccur": ("pair", n_w), "n_exclusive": ("pair", n_o),
         "acc_cooccur": ("pair", acc_w), "acc_exclusive": ("pair", acc_o),
         "acc_cooccur_wilson": (("pair", "ci"), wilson_interval(h_w, n_w, ci=ci).reshape(-1, 2)),
         "acc_exclusive_wilson": (("pair", "ci"), wilson_interval(h_o, n_o, ci=ci).reshape(-1, 2)),
         "train_cooccurrence": ("pair", np.array([r[8] for r in sel], np.float64)),
         "small": ("pair", small[order] if len(order) else np.zeros(0, bool)),
         "most_biased": ("pair", most[order] if len(order) else np.zeros(0, bool))},
        coords={"pair": np.arange(len(sel)), "ci": CI_COORD,
                "category": ("pair", [cat_names[r[0]] for r in sel]),
                "context": ("pair", [ctx_names[r[1]] for r in sel])})
    ds.attrs.update(min_cooccurrence=float(min_cooccurrence), min_group_size=int(min_group_size),
                    n_boot=int(n_boot), ci=float(ci), random_state=int(random_state),
                    scores="model scores" if scores is not None else "hard predictions")
    return ds


_BOOT_ELEMENTS = 1 << 20    # bootstrap draws × subset size per batch: bounds the (batch, subset) index array


def _pair_scores(B_: _Side, Zm: _Side, pred: _Side, p_hat, b: int, z: int):
    """``(scores with z (k,), scores without z (l,), hits with z, hits without z)`` over the samples that have
    category ``b``, in sample order, gathered per block of samples (no ``(n, C)`` matrix): the scores are
    column ``b`` of ``p_hat`` (``(n,)``: the own-category scores, which are column ``b`` on these samples; None:
    the 0/1 predictions), the hits the samples whose prediction has ``b``."""
    with_z, without_z, hits = [], [], [0, 0]
    for start in range(0, B_.n, _BLOCK):
        stop = start + _BLOCK
        has_b = B_.table[B_.index(start, stop), b] == 1
        in_z = Zm.table[Zm.index(start, stop), z] == 1
        hit = pred.table[pred.index(start, stop), b]
        score = hit if p_hat is None else np.asarray(p_hat[start:stop] if p_hat.ndim == 1 else p_hat[start:stop, b],
                                                     dtype=np.float64)
        for k, mask in enumerate((has_b & in_z, has_b & ~in_z)):
            (with_z, without_z)[k].append(score[mask])
            hits[k] += int(hit[mask].sum())
    join = (lambda parts: np.concatenate(parts) if parts else np.zeros(0))
    return join(with_z), join(without_z), hits[0], hits[1]


def _boot_means(s: np.ndarray, n_boot: int, rng) -> np.ndarray:
    """``(n_boot,)`` means of bootstrap resamples of ``s``: ``s[rng.integers(0, k, (n_boot, k))].mean(1)``
    drawn in batches of an even number of resamples (the same draws from ``rng``, bounded memory)."""
    batch = max(2, _BOOT_ELEMENTS // s.size // 2 * 2)
    return np.concatenate([s[rng.integers(0, s.size, (min(batch, n_boot - i), s.size))].mean(1)
                           for i in range(0, n_boot, batch)])


def _n_cols(*arrays, n: int | None = None) -> int:
    a0 = np.asarray(arrays[0])
    if a0.ndim == 2:
        return a0.shape[1]
    if n is not None:
        return int(n)   # a code ≥ n is refused by _Side
    return int(max(int(np.max(np.asarray(a))) for a in arrays if np.asarray(a).size) + 1)


def _ratio(num, den):
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(np.asarray(den) > 0, np.asarray(num) / np.where(np.asarray(den) > 0, den, 1), np.nan)
