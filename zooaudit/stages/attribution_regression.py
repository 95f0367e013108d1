"""Regression of the attribution stage against the previous audit: "this model began looking at the
background".

The rule, per layer and method, on the per-sample background shares (``<ds>/attribution/<layer>/metrics``,
``background_share (sample, method)``) of the audit being committed and of the previous attribution
commit of the same model on the same dataset (another cache key: other weights or other parameters):

- the rise, mean(current) − mean(previous) over the samples whose share is defined, is above
  ``AttributionSpec.regression_background_increase`` (absolute, a share in [0, 1]), AND
- its percentile bootstrap CI at ``AttributionSpec.ci`` lies above 0.

Both audits usually mapped the same fixed subset (:func:`.common.random_subset` of the same dataset,
``max_samples`` and ``random_state``): then the comparison is paired, sample id by sample id
(:func:`~zooaudit.analysis.attribution.compare_paired` on current − previous: bootstrap of the mean
difference, one-sided sign-flip p for a rise). When the sample ids differ it is unpaired
(:func:`~zooaudit.analysis.attribution.compare_groups` with previous / current as the two groups:
bootstrap within each audit, permutation p on |difference|, two-sided). The p-value is recorded beside
the CI; the rule reads the CI.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from ..analysis.attribution import compare_groups, compare_paired
from ..layout import attribution_group
from ..specs import AttributionSpec

__all__ = ["background_rise", "background_regressions", "previous_attribution", "reliance_regressions"]

STAGE = "attribution"


def previous_attribution(plan, current_key: str) -> tuple[str, dict] | None:
    """``(snapshot, summary)`` of the most recent attribution commit of ``plan``'s model on its dataset
    with another cache key than ``current_key``; None on the model's first attribution audit."""
    dataset = plan.dataset.model_dump()
    for info in plan.repository.ancestry():
        meta = info.metadata or {}
        if meta.get("stage") == STAGE and meta.get("cache_key") != current_key and meta.get("dataset") == dataset:
            return info.id, dict(meta.get("summary") or {})
    return None


def background_rise(current: xr.DataArray, previous: xr.DataArray, *, n_boot: int, n_permutations: int,
                    ci: float, random_state: int) -> dict | None:
    """How far the mean background share rose from ``previous`` to ``current`` (both ``(sample,)`` with
    sample-id coordinates): ``{previous, current, difference, ci_low, ci_high, p_value, n_previous,
    n_current, paired}``; None when either side has fewer than two defined values."""
    cur_ids, prev_ids = current["sample"].values, previous["sample"].values
    cur, prev = np.asarray(current.values, np.float64), np.asarray(previous.values, np.float64)
    if min(np.isfinite(cur).sum(), np.isfinite(prev).sum()) < 2:
        return None
    paired = len(cur_ids) == len(prev_ids) == len(np.unique(cur_ids)) and set(cur_ids) == set(prev_ids)
    if paired:
        prev = np.asarray(previous.sel(sample=cur_ids).values, np.float64)
        both = np.isfinite(cur) & np.isfinite(prev)
        if both.sum() < 2:
            return None
        got = compare_paired(cur, prev, n_boot=n_boot, n_permutations=n_permutations, ci=ci,
                             random_state=random_state)
        diff, lo, hi, p = got["difference"], got["ci_low"], got["ci_high"], got["p_value"]
        cur, prev = cur[both], prev[both]
    else:
        values = np.concatenate([prev, cur])
        got = compare_groups(values, np.r_[np.zeros(len(prev), int), np.ones(len(cur), int)],
                             names=["previous", "current"], n_boot=n_boot, n_permutations=n_permutations, ci=ci,
                             random_state=random_state)
        diff, lo, hi, p = (got.attrs[k] for k in ("difference", "difference_ci_low", "difference_ci_high", "p_value"))
        cur, prev = cur[np.isfinite(cur)], prev[np.isfinite(prev)]
    return {"previous": float(prev.mean()), "current": float(cur.mean()), "difference": float(diff),
            "ci_low": float(lo), "ci_high": float(hi), "p_value": float(p), "n_previous": int(prev.size),
            "n_current": int(cur.size), "paired": bool(paired)}


def background_regressions(current: xr.Dataset, previous: xr.Dataset, aspec: AttributionSpec) -> list[dict]:
    """The methods whose mean background share rose significantly by more than
    ``aspec.regression_background_increase`` from ``previous`` to ``current`` (two ``metrics`` datasets
    of the attribution stage, ``background_share (sample, method)``); methods in both only.

    One dict per method that fires: ``method``, ``threshold``, ``test`` ("paired" / "unpaired"), ``ci``
    and the numbers of :func:`background_rise` (rounded)."""
    if "background_share" not in current or "background_share" not in previous:
        return []
    found = []
    before = [str(m) for m in previous["method"].values]
    for method in (str(m) for m in current["method"].values):
        if method not in before:
            continue
        rise = background_rise(current["background_share"].sel({"method": method}),
                               previous["background_share"].sel({"method": method}), n_boot=aspec.n_boot,
                               n_permutations=aspec.n_permutations, ci=aspec.ci, random_state=aspec.random_state)
        if rise is None or not (rise["difference"] > aspec.regression_background_increase and rise["ci_low"] > 0):
            continue
        found.append({"method": method, "threshold": aspec.regression_background_increase, "ci": aspec.ci,
                      "test": "paired" if rise.pop("paired") else "unpaired",
                      **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in rise.items()}})
    return found


def reliance_regressions(plan, key: str, metrics_by_layer: dict[str, xr.Dataset],
                         aspec: AttributionSpec) -> tuple[str | None, dict[str, list[dict]]]:
    """``(previous snapshot, {layer: background_regressions})`` of the audit about to be committed
    under ``key`` (``metrics_by_layer``: its ``metrics`` per layer) against the model's previous
    attribution commit on the dataset; ``(None, {})`` on a first audit. Layers the previous audit did
    not map are left out."""
    prev = previous_attribution(plan, key)
    if prev is None:
        return None, {}
    snapshot, summary = prev
    out = {}
    for layer, metrics in metrics_by_layer.items():
        if layer not in summary or "background_share" not in metrics:
            continue
        try:
            before = plan.repository.open(attribution_group(plan.ds_key, layer, "metrics"), snapshot).load()
        except (FileNotFoundError, KeyError):
            continue
        out[layer] = background_regressions(metrics, before, aspec)
    return snapshot, out
