"""Bias-features stage: which factorization components carry the group attribute and the errors.

An array stage that runs after ``factorize`` (:data:`.registry.ARRAY_STAGES`: ``after``): it reads
the committed codes ``(sample, component)`` of every factorization method of every layer
(Eigen-CAM has no per-dataset codes and is left out) and the committed samples and predictions,
and computes each component's AUC for every group value (one-vs-rest) and for the model's
errors (:mod:`zooaudit.analysis.bias_features`), BH/Holm across every component of all layers
and methods for each target, ranked by separation ``|AUC − 0.5|``. Written to
``<ds>/bias/features``: dims ``(target, feature)`` with ``feature`` labelled by ``layer``,
``method``, ``component``. Its spec is the pair (``BiasSpec``, ``FactorizeSpec``): the latter
names the factorize result it reads (by that stage's cache key). Memory: the codes are read from the
store in blocks of components of at most ``READ_BYTES`` (stored dtype, row runs of ``ROW_BYTES``), so
1 000 components of 1M samples never sit in memory whole.
"""

from __future__ import annotations

import logging

import numpy as np
import xarray as xr

from .. import layout
from ..analysis.bias_features import component_aucs, group_targets
from ..analysis.multitest import adjust
from ..analysis.sim_stream import iter_row_blocks
from ..errors import ZooauditError
from ..keys import cache_key
from ..store import write_dataset
from .common import commit_stage, skipped
from .factorize import factorize_key
from .refs import ActivationsRef, StageResult

log = logging.getLogger("zooaudit.stages")

STAGE = "bias-features"
PARAMS = ("ci", "correction", "alpha", "min_group_size")


def _methods(fspec) -> list[str]:
    return [m for m in fspec.methods if m != "eigencam"]


def bias_features_key(ref: ActivationsRef, specs) -> str | None:
    """Cache key (None: no components asked for, no group attributes, or no factorization with codes)."""
    bspec, fspec = specs
    if "components" not in bspec.measures or not ref.has_groups or not ref.layers or not _methods(fspec):
        return None
    return cache_key(STAGE, factorize=factorize_key(ref, fspec), **{p: getattr(bspec, p) for p in PARAMS})


COMPONENT_BLOCK = 4096        # components ranked per read at most
READ_BYTES = 128 << 20        # one read: (samples, components) codes in their stored dtype, whatever N and k
ROW_BYTES = 32 << 20          # rows read at a time within one read (whole chunks of every component)


def _codes(store, ref, layer: str, method: str, ids: np.ndarray) -> xr.DataArray | None:
    """The lazy ``codes (sample, component)`` of one factorization, in the samples' order (None: skipped)."""
    try:
        ds = xr.open_zarr(store, group=layout.factors_group(ref.ds_key, layer, method), consolidated=False)
    except (FileNotFoundError, KeyError):
        return None       # the factorize stage skipped this (layer, method) and recorded why
    if "codes" not in ds:
        return None
    codes = ds["codes"]
    return codes if np.array_equal(codes["sample"].values, ids) else codes.sel(sample=ids)


def _read_width(codes: xr.DataArray) -> int:
    """Components per read: ``READ_BYTES`` of codes in their stored dtype (at least one, at most
    ``COMPONENT_BLOCK``)."""
    n, k = codes.sizes["sample"], codes.sizes["component"]
    return int(max(1, min(k, COMPONENT_BLOCK, READ_BYTES // max(1, n * codes.dtype.itemsize))))


def _read_columns(codes: xr.DataArray, j: int, stop: int) -> np.ndarray:
    """Components ``[j, stop)`` of the lazy codes as one ``(sample, stop − j)`` array in the stored dtype,
    filled run of rows by run of rows (each run: whole chunks, read one ahead on a helper thread), so
    no more than the block and two runs are held."""
    data = codes.transpose("sample", "component").data[:, j:stop]
    out = np.empty(data.shape, data.dtype)
    rows = max(1, ROW_BYTES // max(1, codes.sizes["component"] * codes.dtype.itemsize))
    for start, end, (block,) in iter_row_blocks([data], rows):
        out[start:end] = block
    return out


def _block_aucs(codes: xr.DataArray, targets: dict, bspec) -> xr.Dataset:
    """:func:`component_aucs` over column blocks of the lazy codes (:func:`_read_width` components per
    read), concatenated along ``component``. Memory: one block (``READ_BYTES``) and O(samples) per column."""
    k, w = codes.sizes["component"], _read_width(codes)
    return xr.concat([component_aucs(_read_columns(codes, j, min(j + w, k)), targets, ci=bspec.ci,
                                     min_group_size=bspec.min_group_size,
                                     component_names=np.arange(j, min(j + w, k)))
                      for j in range(0, k, w)], dim="component", data_vars="minimal",
                     coords="minimal", compat="override", combine_attrs="override")


def run_bias_features(ref: ActivationsRef, specs, run_id: str | None = None) -> StageResult | None:
    """AUCs of every component for the group values and the errors; one commit."""
    bspec, fspec = specs
    if (key := bias_features_key(ref, specs)) is None:
        return None
    if (snap := ref.repository.find(key)) is not None:
        return skipped(STAGE, ref, key, snap)
    if (fsnap := ref.repository.find(factorize_key(ref, fspec))) is None:
        raise ZooauditError(f"The bias-features stage of {ref.model_uri!r} on {ref.ds_key!r} reads the factorize "
                            "results, which are not committed for this FactorizeSpec; run the factorize stage first "
                            "(the audit flow runs it before).")
    store = ref.repository.session(fsnap).store
    samples = xr.open_zarr(store, group=layout.samples_group(ref.ds_key), consolidated=False).load()
    ids = samples["sample"].values
    targets: dict[str, np.ndarray] = {}
    for attr in samples.attrs.get("group_attributes", []):
        targets.update(group_targets(samples[attr].values, samples.attrs["group_names"].get(attr, []), attr))
    if ref.n_outputs is not None:
        outputs = xr.open_zarr(store, group=layout.outputs_group(ref.ds_key), consolidated=False).load()
        targets["error"] = outputs["prediction"].values != samples["label"].values
    parts, missing = [], []
    for layer in ref.layers:
        for method in _methods(fspec):
            codes = _codes(store, ref, layer, method, ids)
            if codes is None:
                missing.append(f"{layer}/{method}")
                continue
            ds = _block_aucs(codes, targets, bspec)
            k = ds.sizes["component"]
            parts.append(ds.rename(component="feature").assign_coords(
                layer=("feature", [layer] * k), method=("feature", [method] * k),
                component=("feature", np.arange(k))).drop_vars("feature"))
    if not parts:   # every (layer, method) was skipped by factorize: record that, so reruns are cache hits
        log.warning("%s on %s: no factorization codes to rank (skipped by factorize: %s)", ref.model_uri,
                    ref.ds_key, ", ".join(missing))
        empty = xr.Dataset(attrs={"skipped": missing, "reason": "every layer × method was skipped by factorize"})
        return commit_stage(ref, STAGE, key, {p_: getattr(bspec, p_) for p_ in PARAMS},
                            lambda s: write_dataset(s, empty, layout.bias_group(ref.ds_key, "features")),
                            {"top_components": {}, "skipped": missing}, run_id)
    out = xr.concat(parts, dim="feature", data_vars="minimal", coords="minimal", compat="override",
                    combine_attrs="drop_conflicts")
    p = out["p_value"].values
    adjusted = [adjust(row, method=bspec.correction, alpha=bspec.alpha) for row in p]   # one family per target
    out["p_adjusted"] = (("target", "feature"), np.stack([a.p_adjusted for a in adjusted]))
    out["reject"] = (("target", "feature"), np.stack([a.reject for a in adjusted]))
    sep = np.nan_to_num(out["separation"].values, nan=-1.0)
    out["rank"] = (("target", "feature"), np.argsort(np.argsort(-sep, axis=1, kind="stable"), axis=1))
    out.attrs.update(skipped=missing, correction=bspec.correction,
                     adjusted_over="every component of every layer and method, per target")
    summary = {}
    for t in out["target"].values:
        row = out.sel(target=t)
        order = np.argsort(row["rank"].values)[:3]
        summary[str(t)] = [{"layer": str(row["layer"].values[i]), "method": str(row["method"].values[i]),
                            "component": int(row["component"].values[i]),
                            "auc": round(float(row["auc"].values[i]), 4),
                            "p_adjusted": None if np.isnan(row["p_adjusted"].values[i])
                            else round(float(row["p_adjusted"].values[i]), 6),
                            "flagged": bool(row["reject"].values[i])} for i in order]
    out = out.assign_coords(feature=np.arange(out.sizes["feature"]))
    params = {**{p_: getattr(bspec, p_) for p_ in PARAMS}, "factorize_key": factorize_key(ref, fspec)}
    return commit_stage(ref, STAGE, key, params,
                        lambda s: write_dataset(s, out, layout.bias_group(ref.ds_key, "features")),
                        {"top_components": summary, "skipped": missing}, run_id)
