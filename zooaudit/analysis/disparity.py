"""Disparities between groups: differences, ratios, bootstrap CIs, permutation p-values.

Conventions (pinned by tests/test_bias*.py):

- Over the groups eligible for a rate (its denominator — samples; positives for TPR;
  negatives for FPR — has ≥ ``min_group_size`` and ≥ 2 samples): difference =
  max − min, ratio = min / max, and 1.0 when every eligible group has rate 0 (equal
  rates). Equalized odds = the larger of the TPR and FPR differences (the smaller of
  their ratios), as in fairlearn. Fewer than two eligible groups: NaN, no test.
- Permutation test: the statistic is the difference itself (for two groups,
  |difference|); the p-value is its upper tail — two-sided in the direction of the gap
  — ``(1 + #{null ≥ observed}) / (1 + n_permutations)``. Accuracy and demographic
  parity permute group labels over all samples; TPR, FPR and equalized odds permute
  them within y = pos and y ≠ pos, because their null is ŷ ⊥ group | y (this keeps the
  test valid when base rates differ between groups, and keeps each group's positive
  count fixed). BH (or Holm) adjusts across the metrics of one call;
  :func:`adjust_run` across all attributes of a run.
- ``difference_ci`` is a percentile interval of the bootstrapped max − min. A range
  is never negative, so this interval sits above 0 even when the groups are equal:
  read it as the size of the gap, and the permutation p-value as its evidence.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np
import xarray as xr

from ..errors import ZooauditError
from .multitest import adjust, permutation_p_value

_PERM_BATCH = 200  # permutations per vectorized batch: bounds memory at 200·n ints

# disparity → (rates it compares, permutation scheme)
DISPARITIES = {
    "accuracy": (("accuracy",), "global"),
    "demographic_parity": (("selection_rate",), "global"),
    "equal_opportunity": (("tpr",), "within_label"),
    "equalized_odds": (("tpr", "fpr"), "within_label"),
}


def _spread(rates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Difference (max − min) and ratio (min / max, 1 when all are 0) over the last axis."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        hi, lo = np.nanmax(rates, -1), np.nanmin(rates, -1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(hi > 0, lo / np.where(hi > 0, hi, 1), 1.0)
    return hi - lo, np.where(np.isnan(hi), np.nan, ratio)


def _permuted_numerators(codes, G, indicators, strata, n_perm, rng) -> np.ndarray:
    """``(n_perm, len(indicators), G)`` per-group sums of each indicator under group-label permutations.

    Labels are shuffled within each stratum (one stratum = a plain permutation), which
    keeps every group's size within every stratum fixed.
    """
    n = codes.size
    out = np.empty((n_perm, len(indicators), G))
    w = np.stack(indicators).astype(np.float64)
    for start in range(0, n_perm, _PERM_BATCH):
        b = min(_PERM_BATCH, n_perm - start)
        perm = np.empty((b, n), np.int64)
        for idx in strata:
            perm[:, idx] = rng.permuted(np.broadcast_to(codes[idx], (b, idx.size)), axis=1)
        flat = (perm + G * np.arange(b)[:, None]).ravel()
        for j in range(len(indicators)):
            out[start:start + b, j] = np.bincount(flat, weights=np.tile(w[j], b), minlength=b * G).reshape(b, G)
    return out


class _RateGap(NamedTuple):
    """One rate's gap over the groups eligible for it."""

    rate: str
    eligible: np.ndarray  # (G,) bool
    estimates: np.ndarray  # (G,) rates, NaN where not eligible
    difference: float  # NaN with fewer than two eligible groups
    ratio: float


def _statistic(gaps: list[_RateGap], rates_by: dict) -> np.ndarray:
    """Disparity statistic per draw: the largest spread over the metric's rates (eligible groups only).

    ``rates_by[rate]``: ``(n_draws, G)`` rates from bootstrap resamples or permutations.
    """
    return np.max([_spread(np.where(g.eligible, rates_by[g.rate], np.nan))[0] for g in gaps], 0)


def disparities(cat, codes, G, names, table, boot_rates, *, metrics, min_size, n_perm, rng, correction,
                alpha) -> xr.Dataset:
    """Dataset over dim ``metric`` of differences, ratios, bootstrap CIs and permutation p-values.

    Args:
        cat: ``(n,)`` per-sample category codes (bit 2: y = pos, bit 1: ŷ = pos, bit 0: correct).
        codes: ``(n,)`` group codes in ``range(G)``; names: their ``G`` labels.
        table: the per-group Dataset (rates, ``count``, ``n_pos``, ``n_neg``; attrs ``ci``).
        boot_rates: ``{rate: (n_boot, G)}`` stratified-bootstrap rates (empty: no CIs).
        metrics: names from :data:`DISPARITIES`.
    """
    is_pos = ((cat >> 2) & 1).astype(bool)
    ind = {"accuracy": (cat & 1).astype(bool), "selection_rate": ((cat >> 1) & 1).astype(bool)}
    ind["tpr"], ind["fpr"] = ind["selection_rate"] & is_pos, ind["selection_rate"] & ~is_pos
    dens = {"accuracy": table["count"].values, "selection_rate": table["count"].values}
    if "tpr" in table:
        dens["tpr"], dens["fpr"] = table["n_pos"].values, table["n_neg"].values
    null = {}
    if n_perm:
        for scheme, strata in (("global", [np.arange(codes.size)]),
                               ("within_label", [np.flatnonzero(is_pos), np.flatnonzero(~is_pos)])):
            rates = sorted({r for m in metrics if DISPARITIES[m][1] == scheme for r in DISPARITIES[m][0]})
            if rates:
                nums = _permuted_numerators(codes, G, [ind[r] for r in rates], strata, n_perm, rng)
                with np.errstate(invalid="ignore", divide="ignore"):
                    null.update({r: nums[:, j] / dens[r] for j, r in enumerate(rates)})
    q = [(1 - table.attrs["ci"]) / 2, (1 + table.attrs["ci"]) / 2]
    rows = {k: [] for k in ("difference", "ratio", "n_groups", "p_value", "difference_ci", "max_group", "min_group")}
    for m in metrics:
        gaps = []
        for r in DISPARITIES[m][0]:
            eligible = dens[r] >= max(min_size, 2)  # one sample's rate is 0 or 1: an extreme, not a rate
            est = np.where(eligible, table[r].values, np.nan)
            d, ratio = _spread(est)
            gaps.append(_RateGap(r, eligible, est, float(d) if eligible.sum() >= 2 else np.nan, float(ratio)))
        rows["n_groups"].append(min(int(g.eligible.sum()) for g in gaps))
        if not all(np.isfinite(g.difference) for g in gaps):
            for k, v in (("difference", np.nan), ("ratio", np.nan), ("p_value", np.nan),
                         ("difference_ci", [np.nan, np.nan]), ("max_group", ""), ("min_group", "")):
                rows[k].append(v)
            continue
        widest = max(gaps, key=lambda g: g.difference)
        rows["difference"].append(widest.difference)
        rows["ratio"].append(min(g.ratio for g in gaps))
        rows["max_group"].append(names[int(np.nanargmax(widest.estimates))])
        rows["min_group"].append(names[int(np.nanargmin(widest.estimates))])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # draws where a rate is undefined
            rows["difference_ci"].append(np.nanquantile(_statistic(gaps, boot_rates), q) if boot_rates
                                         else [np.nan, np.nan])
        rows["p_value"].append(permutation_p_value(widest.difference, _statistic(gaps, null)) if null else np.nan)
    p_adj, reject = adjust(np.array(rows["p_value"]), method=correction, alpha=alpha)
    data = {k: ("metric", np.asarray(v)) for k, v in rows.items() if k != "difference_ci"}
    data.update(p_adjusted=("metric", p_adj), reject=("metric", reject),
                difference_ci=(("metric", "ci"), np.asarray(rows["difference_ci"], np.float64)))
    attrs = {"correction": correction, "alpha": alpha, "n_permutations": n_perm, "min_group_size": min_size,
             "statistic": "max - min rate over groups with >= min_group_size in the rate's denominator",
             "alternative": "greater (upper tail of the difference; two-sided in the gap's direction)",
             "permutation": "; ".join(f"{m}: {DISPARITIES[m][1]}" for m in metrics)}
    return xr.Dataset(data, coords={"metric": list(metrics), "ci": table["ci"].values}, attrs=attrs)


def adjust_run(reports, *, method: str = "bh", alpha: float = 0.05) -> xr.Dataset:
    """Adjust the disparity p-values of all attributes of one run together.

    Args:
        reports: ``{attribute: GroupReport}`` from :func:`group_metrics`.
        method: "bh" (default: FDR across the run) or "holm".
    Returns:
        Dataset over dims (``attribute``, ``metric``): ``difference``, ``ratio``,
        ``p_value``, ``p_adjusted`` (over every finite p-value of the run), ``reject``.
    """
    if not reports:
        raise ZooauditError("adjust_run needs at least one GroupReport; got none.")
    ds = xr.concat([r.disparities[["difference", "ratio", "p_value"]] for r in reports.values()],
                   dim=xr.DataArray(list(map(str, reports)), dims="attribute", name="attribute"), join="outer")
    p_adj, reject = adjust(ds["p_value"].values, method=method, alpha=alpha)
    ds["p_adjusted"] = (("attribute", "metric"), p_adj)
    ds["reject"] = (("attribute", "metric"), reject)
    ds.attrs.update(correction=method, alpha=alpha)
    return ds
