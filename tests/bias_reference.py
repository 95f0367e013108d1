"""Frozen copies of ``analysis.contextual.contextual_bias`` and ``analysis.bias_features.delong_auc`` /
``component_aucs`` as they were at 30d50b3 (whole ``(n, C)`` matrices, whole ``(n, components)`` blocks):
the references the streamed and blocked versions must reproduce (bitwise, or to 1e-12 where a reduction
order changes). Not imported by the package."""

from __future__ import annotations

import numpy as np
import xarray as xr
from scipy.stats import norm, rankdata

from zooaudit.analysis.amplification import multi_hot
from zooaudit.analysis.fairness import CI_COORD, wilson_interval
from zooaudit.errors import ZooauditError


def contextual_bias(train_category, train_context, category, context, predicted, scores=None, *,
                    category_names=None, context_names=None, contexts_are_categories: bool = False,
                    min_cooccurrence: float = 0.1, min_group_size: int = 20, n_boot: int = 200, ci: float = 0.95,
                    random_state: int = 0, top_k: int | None = None) -> xr.Dataset:
    """Bias scores and exclusive/co-occurring accuracy of the candidate (category, context) pairs.

    Args:
        train_category, train_context: training split, ``(m,)`` codes or ``(m, C)`` / ``(m, Z)`` 0/1.
        category, context: the audit split, same forms (``(n, C)``, ``(n, Z)``).
        predicted: ``(n,)`` predicted class codes or ``(n, C)`` 0/1 predictions.
        scores: ``(n, C)`` model scores p̂ (e.g. softmax probabilities); None = ``predicted``.
        contexts_are_categories: the context columns are the categories (``z = b`` is skipped).
        min_cooccurrence: a pair is a candidate when ``z`` is in more than this fraction of ``b``'s
            training samples and ``b`` also occurs without ``z`` there.
        top_k: keep only the ``top_k`` highest-ranked pairs (None: all candidates).

    Returns:
        Dataset over ``pair`` (coords ``category``, ``context``), in rank order: ``bias``,
        ``bias_ci``, ``n_cooccur``, ``n_exclusive``, ``acc_cooccur``, ``acc_exclusive`` (and
        ``_wilson``), ``train_cooccurrence``, ``small``, ``most_biased``.
    """
    if not 0.0 <= min_cooccurrence < 1.0:
        raise ZooauditError(f"min_cooccurrence is a fraction in [0, 1); got {min_cooccurrence!r}.")
    C = _n_cols(train_category, category, predicted)
    Z = _n_cols(train_context, context)
    tr_b, tr_z = multi_hot(train_category, "train_category", C), multi_hot(train_context, "train_context", Z)
    B_, Zm = multi_hot(category, "category", C), multi_hot(context, "context", Z)
    pred = multi_hot(predicted, "predicted", C)
    p_hat = pred if scores is None else np.asarray(scores, dtype=np.float64)
    if p_hat.shape != pred.shape:
        raise ZooauditError(f"scores must have shape (n_samples, n_categories) = {pred.shape}; got {p_hat.shape}.")
    for name, x, ref in (("context", Zm, B_), ("predicted", pred, B_), ("train_context", tr_z, tr_b)):
        if len(x) != len(ref):
            raise ZooauditError(f"{name} has {len(x)} rows but its categories have {len(ref)}: one row per sample.")
    if contexts_are_categories and Z != C:
        raise ZooauditError("contexts_are_categories needs as many context columns as categories.")
    with np.errstate(invalid="ignore", divide="ignore"):
        n_b_tr = tr_b.sum(0)
        co_tr = (tr_b.T @ tr_z) / np.where(n_b_tr > 0, n_b_tr, 1)[:, None]        # (C, Z) fraction
    cand = (co_tr > min_cooccurrence) & (co_tr < 1.0) & (n_b_tr[:, None] > 0)
    if contexts_are_categories:
        np.fill_diagonal(cand, False)
    bs, zs = np.nonzero(cand)
    rng = np.random.default_rng(random_state)
    rows = []
    for b, z in zip(bs, zs):
        has_b = B_[:, b] == 1
        with_z, without_z = has_b & (Zm[:, z] == 1), has_b & (Zm[:, z] == 0)
        s_with, s_without = p_hat[with_z, b], p_hat[without_z, b]
        bias = _ratio(s_with.mean() if s_with.size else np.nan, s_without.mean() if s_without.size else np.nan)
        lohi = np.full(2, np.nan)
        if n_boot and s_with.size > 1 and s_without.size > 1:
            mw = s_with[rng.integers(0, s_with.size, (n_boot, s_with.size))].mean(1)
            mo = s_without[rng.integers(0, s_without.size, (n_boot, s_without.size))].mean(1)
            r = _ratio(mw, mo)
            r = r[np.isfinite(r)]
            if r.size:
                lohi = np.quantile(r, [(1 - ci) / 2, 1 - (1 - ci) / 2])
        hit_with, hit_without = int(pred[with_z, b].sum()), int(pred[without_z, b].sum())
        rows.append((b, z, bias, lohi, int(with_z.sum()), int(without_z.sum()), hit_with, hit_without, co_tr[b, z]))
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


def _n_cols(*arrays) -> int:
    a0 = np.asarray(arrays[0])
    if a0.ndim == 2:
        return a0.shape[1]
    return int(max(int(np.max(np.asarray(a))) for a in arrays if np.asarray(a).size) + 1)


def _ratio(num, den):
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(np.asarray(den) > 0, np.asarray(num) / np.where(np.asarray(den) > 0, den, 1), np.nan)


def delong_auc(scores: np.ndarray, target: np.ndarray, *, ci: float = 0.95):
    """``(auc (k,), ci (k, 2), p (k,))`` of each column of ``scores`` ``(n, k)`` for the binary ``target`` ``(n,)``."""
    X = np.asarray(scores, dtype=np.float64)
    t = np.asarray(target).astype(bool)
    if X.ndim != 2 or len(t) != X.shape[0]:
        raise ZooauditError(f"scores must be (n_samples, n_components) with one target per sample; got scores "
                            f"{X.shape} and target {t.shape}.")
    m, n = int(t.sum()), int((~t).sum())
    k = X.shape[1]
    if m == 0 or n == 0:
        return np.full(k, np.nan), np.full((k, 2), np.nan), np.full(k, np.nan)
    r_all = rankdata(X, axis=0)
    r_pos, r_neg = rankdata(X[t], axis=0), rankdata(X[~t], axis=0)
    auc = (r_all[t].sum(0) - m * (m + 1) / 2) / (m * n)
    v10 = (r_all[t] - r_pos) / n
    v01 = 1.0 - (r_all[~t] - r_neg) / m
    var = (v10.var(0, ddof=1) / m if m > 1 else 0.0) + (v01.var(0, ddof=1) / n if n > 1 else 0.0)
    se = np.sqrt(var)
    z = norm.ppf(1 - (1 - ci) / 2)
    lohi = np.clip(np.stack([auc - z * se, auc + z * se], 1), 0.0, 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.where(se > 0, 2 * norm.sf(np.abs(auc - 0.5) / np.where(se > 0, se, 1)), np.where(auc == 0.5, 1.0, 0.0))
    return auc, lohi, p


def component_aucs(codes: np.ndarray, targets: dict[str, np.ndarray], *, component_names=None, ci: float = 0.95,
                   min_group_size: int = 20) -> xr.Dataset:
    """AUC of every component for every binary target.

    Args:
        codes: ``(n_samples, n_components)``.
        targets: ``{target name: (n_samples,) bool}`` (e.g. ``"colour=red"``, ``"error"``).
    Returns:
        Dataset over ``(target, component)``: ``auc``, ``auc_ci`` (+ ``ci``), ``separation``,
        ``p_value``; ``n_pos``, ``small`` per target. No correction (the caller's family).
    """
    codes = np.asarray(codes, dtype=np.float64)
    k = codes.shape[1]
    names = list(targets)
    auc, lohi, p = np.full((len(names), k), np.nan), np.full((len(names), k, 2), np.nan), np.full((len(names), k), np.nan)
    n_pos, small = np.zeros(len(names), np.int64), np.zeros(len(names), bool)
    for i, name in enumerate(names):
        t = np.asarray(targets[name]).astype(bool)
        n_pos[i] = t.sum()
        small[i] = min(t.sum(), (~t).sum()) < max(min_group_size, 2)
        auc[i], lohi[i], p[i] = delong_auc(codes, t, ci=ci)
        if small[i]:
            p[i] = np.nan
    comps = component_names if component_names is not None else np.arange(k)
    return xr.Dataset({"auc": (("target", "component"), auc), "auc_ci": (("target", "component", "ci"), lohi),
                       "separation": (("target", "component"), np.abs(auc - 0.5)),
                       "p_value": (("target", "component"), p), "n_pos": ("target", n_pos),
                       "small": ("target", small)},
                      coords={"target": names, "component": comps, "ci": CI_COORD},
                      attrs={"ci": float(ci), "min_group_size": int(min_group_size),
                             "ci_method": "DeLong (midrank structural components)",
                             "test": "two-sided DeLong z-test of AUC = 0.5"})
