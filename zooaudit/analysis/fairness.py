"""Prediction-level bias audit: per-group rates with CIs, worst-group accuracy, disparities.

Conventions (the tests pin each one):

- Rates per group: ``accuracy``, and — when a positive label is known (labels in
  {0, 1}, {False, True} or {-1, 1}, or ``pos_label`` given; one-vs-rest for more
  classes) — ``selection_rate`` P(ŷ=pos), ``tpr`` P(ŷ=pos | y=pos) and ``fpr``
  P(ŷ=pos | y≠pos). A rate whose denominator is empty is NaN (fairlearn reports 0
  there, which reads as "never detects positives").
- All rates come from one table of per-sample categories (y=pos, ŷ=pos, correct),
  so point estimates, bootstrap CIs and permutation nulls use one definition.
  fairlearn's ``MetricFrame`` is the cross-check in the tests, not the engine: its
  bootstrap resamples the whole set (group sizes vary, tiny groups vanish from
  resamples) and it has no notion of a minimum group size.
- CIs: ``<rate>_ci`` is a percentile bootstrap stratified by group (each group
  resampled at its own size, drawn as multinomial counts — exact and O(n_boot)),
  NaN for one-sample groups; ``<rate>_wilson`` is the Wilson score interval, the
  one to read for small cells, where bootstrap intervals collapse to a point.
- Groups: one attribute, or several (a dict / DataFrame / ``(n, k)`` array), in which
  case groups are the observed intersections, named ``"attr=value&attr=value"``.
  Missing group labels (None/NaN) are an error. A group with one sample is allowed
  (intersections produce them) but raises :class:`BiasAuditWarning`.
- Minimum size: a group enters a disparity only when the rate's denominator
  (samples; positives for TPR; negatives for FPR) has ≥ ``min_group_size`` samples,
  and never with a single one (whatever ``min_group_size``).
  Smaller groups and cells are reported (``small``) but never drive a disparity, a
  rejection, or the worst group (unless every cell is small: then ``worst_group_small``).
- All predictions one class: rates are all 0 (or all 1), so parity differences are 0
  and ratios 1.0 (0/0 is read as equal rates); a :class:`BiasAuditWarning` says so.
- Disparities (difference, ratio, permutation p-value, BH/Holm): :mod:`.disparity`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import xarray as xr
from scipy.stats import norm

from ..errors import ZooauditError
from .disparity import DISPARITIES, disparities

CI_COORD = ["lower", "upper"]


class BiasAuditWarning(UserWarning):
    """A bias audit ran but part of it is degenerate (one-sample group, one-class predictions)."""


@dataclass
class GroupReport:
    """Results of :func:`group_metrics`.

    Attributes:
        table: Dataset over dim ``group`` (and ``ci`` = lower/upper): ``count``,
            ``small``, ``accuracy``, ``accuracy_ci``, ``accuracy_wilson``, and for a
            known positive label ``n_pos``, ``n_neg``, ``selection_rate``, ``tpr``,
            ``fpr`` with their ``_ci`` / ``_wilson`` intervals.
        cells: ``count``, ``small``, ``accuracy``, ``accuracy_ci``,
            ``accuracy_wilson`` over (label × group) cells, dim ``cell``, labelled
            ``"label=<y>|<group>"``.
        disparities: Dataset over dim ``metric`` (accuracy, demographic_parity,
            equal_opportunity, equalized_odds): ``difference``, ``difference_ci``,
            ``ratio``, ``n_groups``, ``p_value``, ``p_adjusted``, ``reject``,
            ``max_group``, ``min_group``.
        overall_accuracy, worst_group_accuracy, worst_group: headline numbers; the
            worst group is the lowest-accuracy non-small cell.
        worst_group_small: True when every cell was small and the worst was taken over all.
        pos_label: the positive label used for the binary rates (None: accuracy only).
    """

    table: xr.Dataset
    cells: xr.Dataset
    overall_accuracy: float
    worst_group_accuracy: float
    worst_group: str
    disparities: xr.Dataset | None = None
    worst_group_small: bool = False
    pos_label: object = None


def wilson_interval(successes, n, *, ci: float = 0.95) -> np.ndarray:
    """Wilson score interval for a binomial proportion.

    Args:
        successes, n: arrays of counts (broadcast together); ``n = 0`` gives NaN.
    Returns:
        ``(..., 2)`` array of (lower, upper).
    """
    k, n = np.broadcast_arrays(np.asarray(successes, np.float64), np.asarray(n, np.float64))
    z = norm.ppf(1 - (1 - ci) / 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = k / n
        denom = 1 + z**2 / n
        centre = (p + z**2 / (2 * n)) / denom
        half = z / denom * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    # at k = 0 and k = n the bounds are exactly 0 and 1; rounding would leave 1 − 1e-16
    lo = np.where(k == 0, 0.0, np.clip(centre - half, 0, 1))
    hi = np.where(k == n, 1.0, np.clip(centre + half, 0, 1))
    out = np.stack([lo, hi], axis=-1)
    out[n == 0] = np.nan
    return out


# -- input handling ----------------------------------------------------------------------


def label_column(values, what: str, n: int | None = None, *, ref: str | None = None) -> np.ndarray:
    """``values`` as a 1-d ``(n,)`` array of per-sample labels with none missing (None/NaN).

    ``n``: the number of samples, taken from ``ref`` (named in the error, e.g. ``"y_true"``)
    or, without it, from the dataset. Shared by the group metrics and the probes.
    """
    import pandas as pd

    a = np.asarray(values)
    if a.ndim != 1:
        raise ZooauditError(f"{what} must be a 1-d array of per-sample labels (length n_samples); got shape "
                            f"{a.shape}.")
    if n is not None and len(a) != n:
        raise ZooauditError(f"{what} has {len(a)} entries but {f'{ref} has {n}' if ref else f'there are {n} samples'}: "
                            "every array must have one entry per sample, in the same order.")
    missing = np.flatnonzero(pd.isna(a))
    if missing.size:
        raise ZooauditError(f"{what} has {missing.size} missing values (None/NaN), first at index {missing[0]}. "
                            f"Every sample needs a label; drop or impute those samples before the audit.")
    return a


def _attributes(groups, n: int) -> dict[str, np.ndarray]:
    """Normalize ``groups`` to ``{attribute: (n,) labels}``."""
    if hasattr(groups, "columns"):  # pandas DataFrame
        groups = {str(c): groups[c].to_numpy() for c in groups.columns}
    elif not isinstance(groups, dict):
        a = np.asarray(groups)
        if a.ndim == 2:
            groups = {f"attribute_{j}": a[:, j] for j in range(a.shape[1])}
        else:
            groups = {"group": a}
    if not groups:
        raise ZooauditError("groups is empty: give one array of group labels, or a dict/DataFrame of several.")
    return {str(k): label_column(v, f"group labels {k!r}", n, ref="y_true") for k, v in groups.items()}


def _value_names(attr: str, values: np.ndarray, names) -> list[str]:
    if names is None:
        return [str(v) for v in values]
    out = []
    for v in values:
        if not (np.issubdtype(np.asarray(v).dtype, np.integer) and 0 <= int(v) < len(names)):
            raise ZooauditError(f"group_names for {attr!r} maps integer codes 0..{len(names) - 1} to names, but the "
                                f"group labels contain {_json_scalar(v)!r}. Pass integer codes in that range, or no group_names.")
        out.append(str(names[int(v)]))
    return out


def encode_groups(groups, n: int, group_names=None) -> tuple[np.ndarray, list[str]]:
    """Integer group codes ``(n,)`` and display names (intersections when several attributes)."""
    attrs = _attributes(groups, n)
    if group_names is not None and not isinstance(group_names, dict):
        if len(attrs) != 1:
            raise ZooauditError("group_names must be a dict {attribute: names} when several attributes are given.")
        group_names = {next(iter(attrs)): group_names}
    group_names = group_names or {}
    codes, names = [], []
    for attr, labels in attrs.items():
        try:
            values, code = np.unique(labels, return_inverse=True)
        except TypeError as e:
            raise ZooauditError(f"group labels {attr!r} mix types that cannot be ordered ({e}); use one type.") from e
        codes.append(code.ravel())
        shown = _value_names(attr, values, group_names.get(attr))
        names.append(shown if len(attrs) == 1 else [f"{attr}={s}" for s in shown])
    if len(codes) == 1:
        return codes[0], names[0]
    combos, code = np.unique(np.stack(codes, axis=1), axis=0, return_inverse=True)
    return code.ravel(), ["&".join(names[j][c] for j, c in enumerate(row)) for row in combos]


def _infer_pos_label(y_true, y_pred, pos_label):
    classes = np.unique(np.concatenate([y_true, y_pred]))
    if pos_label is not None:
        if not np.any(classes == pos_label):
            raise ZooauditError(f"pos_label {pos_label!r} occurs in neither y_true nor y_pred; "
                                f"labels present: {classes.tolist()[:20]}.")
        return pos_label
    numeric = classes.dtype == bool or np.issubdtype(classes.dtype, np.number)
    if numeric and (set(classes.tolist()) <= {0, 1} or set(classes.tolist()) <= {-1, 1}):
        return True if classes.dtype == bool else 1
    return None  # multiclass or non-numeric labels: accuracy only unless pos_label is given


# -- rates from category counts ----------------------------------------------------------

# Each sample falls in one of 8 categories: bit 2 = (y = pos), bit 1 = (ŷ = pos), bit 0 = correct.
_CAT = np.arange(8)
_IS_POS, _PRED_POS, _CORRECT = (_CAT >> 2) & 1, (_CAT >> 1) & 1, _CAT & 1
_ALL = np.ones(8, bool)
# rate name → (numerator mask, denominator mask) over the 8 categories
RATES = {
    "accuracy": (_CORRECT == 1, _ALL),
    "selection_rate": (_PRED_POS == 1, _ALL),
    "tpr": ((_PRED_POS == 1) & (_IS_POS == 1), _IS_POS == 1),
    "fpr": ((_PRED_POS == 1) & (_IS_POS == 0), _IS_POS == 0),
}


def _rate(counts: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rate, numerator, denominator) from ``(..., 8)`` category counts; NaN rate where den = 0."""
    num_mask, den_mask = RATES[name]
    num, den = counts[..., num_mask].sum(-1), counts[..., den_mask].sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan), num, den


def _rate_dataset(counts, labels, dim, rates, *, n_boot, ci, rng, min_size) -> tuple[xr.Dataset, dict]:
    """Point estimates, stratified-bootstrap and Wilson intervals of ``rates`` per row of ``counts``."""
    total = counts.sum(-1)
    q = [(1 - ci) / 2, 1 - (1 - ci) / 2]
    boot = None
    if n_boot:
        # Resampling a group at its own size = multinomial counts over its categories.
        boot = rng.multinomial(total.astype(np.int64), counts / total[:, None], size=(n_boot, len(total)))
    data = {"count": (dim, total.astype(np.int64)), "small": (dim, total < min_size)}
    boot_rates = {}
    for name in rates:
        est, num, den = _rate(counts, name)
        data[name] = (dim, est)
        data[f"{name}_wilson"] = ((dim, "ci"), wilson_interval(num, den, ci=ci))
        if boot is not None:
            b = _rate(boot, name)[0]
            boot_rates[name] = b
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: rate undefined
                lohi = np.nanquantile(b, q, axis=0).T
            lohi[total < 2] = np.nan  # one sample: the bootstrap has nothing to resample
            data[f"{name}_ci"] = ((dim, "ci"), lohi)
    return xr.Dataset(data, coords={dim: labels, "ci": CI_COORD}), boot_rates


# -- public ------------------------------------------------------------------------------


def _check_params(n_boot, ci, min_group_size, n_permutations):
    for name, v, lo in (("n_boot", n_boot, 0), ("min_group_size", min_group_size, 1),
                        ("n_permutations", n_permutations, 0)):
        if not isinstance(v, (int, np.integer)) or v < lo:
            raise ZooauditError(f"{name} must be an integer ≥ {lo}; got {v!r}.")
    if not 0.0 < ci < 1.0:
        raise ZooauditError(f"ci is a confidence level and must be in (0, 1); got {ci!r}.")


def _json_scalar(v):
    return v.item() if isinstance(v, np.generic) else v


def group_metrics(y_true, y_pred, groups, *, n_boot: int = 200, random_state: int = 0, ci: float = 0.95,
                  min_group_size: int = 20, group_names=None, pos_label=None, n_permutations: int = 1000,
                  correction: str = "bh", alpha: float = 0.05) -> GroupReport:
    """Per-group rates with CIs, (label × group) cell accuracy, and tested disparities.

    Args:
        y_true, y_pred: ``(n,)`` labels (any hashable type, no missing values).
        groups: ``(n,)`` group labels; or several attributes as a dict ``{name: (n,)}``,
            a DataFrame, or an ``(n, k)`` array — then groups are their intersections.
        n_boot: bootstrap resamples for ``_ci`` intervals (0: none).
        random_state: seeds the bootstrap and the permutations (reruns are identical;
            they use independent streams, so changing one does not move the other).
        ci: confidence level of all intervals.
        min_group_size: groups/cells smaller than this are reported, flagged
            ``small``, and left out of disparities and the worst group.
        group_names: names for integer group codes (a list), or ``{attribute: list}``.
        pos_label: positive label for selection rate / TPR / FPR (inferred for
            {0,1}, {False,True}, {-1,1}; otherwise accuracy only unless given).
        n_permutations: permutations per disparity test (0: no p-values).
        correction, alpha: "bh" or "holm" across this call's disparities.

    Returns:
        :class:`GroupReport`.

    Raises:
        ZooauditError: misaligned lengths, missing labels, empty input, bad parameters.
    Warns:
        BiasAuditWarning: a group with one sample; all predictions one class.
    """
    _check_params(n_boot, ci, min_group_size, n_permutations)
    y_true = label_column(y_true, "y_true")
    y_pred = label_column(y_pred, "y_pred", len(y_true), ref="y_true")
    if len(y_true) == 0:
        raise ZooauditError("group_metrics needs at least one sample; got empty y_true.")
    codes, names = encode_groups(groups, len(y_true), group_names)
    G = len(names)
    pos_label = _infer_pos_label(y_true, y_pred, pos_label)
    correct = y_true == y_pred
    is_pos = (y_true == pos_label) if pos_label is not None else np.zeros(len(y_true), bool)
    pred_pos = (y_pred == pos_label) if pos_label is not None else np.zeros(len(y_true), bool)
    cat = (is_pos.astype(np.int64) << 2) | (pred_pos.astype(np.int64) << 1) | correct.astype(np.int64)

    boot_ss, perm_ss = np.random.SeedSequence(random_state).spawn(2)
    boot_rng = np.random.default_rng(boot_ss)
    rates = ["accuracy"] + (["selection_rate", "tpr", "fpr"] if pos_label is not None else [])
    counts = np.zeros((G, 8))
    np.add.at(counts, (codes, cat), 1)
    table, boot_rates = _rate_dataset(counts, names, "group", rates, n_boot=n_boot, ci=ci, rng=boot_rng,
                                      min_size=min_group_size)
    if pos_label is not None:
        table["n_pos"] = ("group", counts[:, _IS_POS == 1].sum(1).astype(np.int64))
        table["n_neg"] = ("group", counts[:, _IS_POS == 0].sum(1).astype(np.int64))
    table.attrs.update(pos_label=str(_json_scalar(pos_label)), min_group_size=int(min_group_size), ci=float(ci),
                       n_boot=int(n_boot), random_state=int(random_state),
                       ci_method="percentile bootstrap stratified by group; *_wilson: Wilson score")

    singles = [nm for nm, c in zip(names, counts.sum(1)) if c == 1]
    if singles:
        warnings.warn(f"{len(singles)} group(s) have a single sample ({', '.join(singles[:10])}): they are reported "
                      f"and flagged small, their bootstrap CIs are NaN, and they take part in no disparity.",
                      BiasAuditWarning, stacklevel=2)
    if pos_label is not None and np.unique(y_pred).size == 1:
        warnings.warn(f"All predictions are the single class {_json_scalar(y_pred[0])!r}: selection rate, TPR and "
                      f"FPR are all 0 or all 1, so parity differences are 0 and ratios are defined as 1.0.",
                      BiasAuditWarning, stacklevel=2)

    # Cells: (true label × group); within a cell the label is fixed, so only accuracy is meaningful.
    labels, label_code = np.unique(y_true, return_inverse=True)
    cell_code = label_code.ravel() * G + codes
    present = np.unique(cell_code)
    cell_counts = np.zeros((len(labels) * G, 8))
    np.add.at(cell_counts, (cell_code, cat), 1)
    cell_names = [f"label={labels[c // G]}|{names[c % G]}" for c in present]
    cells, _ = _rate_dataset(cell_counts[present], cell_names, "cell", ["accuracy"], n_boot=n_boot, ci=ci,
                             rng=boot_rng, min_size=min_group_size)

    acc, big = cells["accuracy"].values, ~cells["small"].values
    pool = np.flatnonzero(big) if big.any() else np.arange(acc.size)
    worst = int(pool[np.argmin(acc[pool])])

    metrics = list(DISPARITIES) if pos_label is not None else ["accuracy"]
    disp = disparities(cat, codes, G, names, table, boot_rates, metrics=metrics, min_size=min_group_size,
                        n_perm=n_permutations, rng=np.random.default_rng(perm_ss), correction=correction,
                        alpha=alpha)
    return GroupReport(table=table, cells=cells, overall_accuracy=float(correct.mean()),
                       worst_group_accuracy=float(acc[worst]), worst_group=str(cells["cell"].values[worst]),
                       disparities=disp, worst_group_small=not big.any(), pos_label=_json_scalar(pos_label))
