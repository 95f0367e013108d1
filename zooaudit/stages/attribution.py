"""Attribution stage (a model stage): maps, faithfulness, localisation and background reliance.

Runs per model × dataset × layer on the extraction placement (it needs the model:
:mod:`zooaudit.attribution_maps`, :mod:`zooaudit.faithfulness`), after the activations, in
:func:`zooaudit.stages.model.run_model_stages`. It applies to classifiers on image datasets
(``(sample, channel, y, x)`` inputs) that have a spatial layer (on a timm ViT / DeiT, the patch tokens
of a ``(token, channel)`` layer read as their grid, prefix tokens excluded: :mod:`zooaudit.patch_tokens`;
by default the last block's ``norm1``); with
``AttributionSpec.only_masked`` (default) only to datasets with foreground masks.

Written under ``<ds>/attribution/<layer>/`` (one commit, its own cache key)::

    maps       maps (sample, method, y, x) float16 at the input size (normalised by each map's
               max |value|, see zooaudit.attribution_maps), label / target / predicted and the
               group attributes per sample; coordinate sample = the dataset's sample ids; on a
               vision transformer attrs prefix_tokens_excluded and token_grid (gy, gx)
    metrics    per (sample, method): energy_inside, background_share, pointing_game, iou;
               ig_gap (sample) — Integrated Gradients' completeness gap
    curves     deletion / insertion curves (sample, order, kind, step) and their auc
               (sample, order, kind); order = the methods then ``random`` (the control)
    road       with AttributionSpec.road_samples > 0: ROAD curves (sample, order, kind, step),
               kind = morf / lerf, noisy linear imputation (zooaudit.road), and their auc
               (sample, order, kind), the same orders and fractions as curves
    reliance   per attribute and method: background share per group (mean, bootstrap CI, n), the
               group difference, its permutation p-value and the run's corrected p (p_adjusted)
    confidence average drop and increase in confidence (Chattopadhyay et al. 2018) per method,
               with the per-sample softmax probabilities full (sample) and masked (sample, method)
               (zooaudit.faithfulness.confidence_change), on every mapped sample
    agreement  method × method: spearman, top_overlap, cosine (zooaudit.analysis.attribution)
    sanity     cascading randomisation (zooaudit.sanity_checks): spearman, spearman_abs, ssim,
               ssim_abs (step, method) with the trained model's maps; flag_spearman, flag_ssim
               (method): the maps stay correlated (≥ sanity_threshold) / structurally similar
               (≥ sanity_ssim_threshold) once every layer is random; attrs flagged = either

The commit's summary holds, per layer, each metric's mean per method (the background share with its
bootstrap CI, ``background_share_ci``), ``background_share_by_group`` (group means, difference with its
CI, adjusted p) and, when the model had an earlier attribution commit on the dataset,
``previous_snapshot`` and ``background_regressions``: the methods whose background share rose
significantly by more than ``AttributionSpec.regression_background_increase``
(:mod:`.attribution_regression`; the nightly alert ``attribution:background_share:<layer>:<method>``).
"""

from __future__ import annotations

import logging

import numpy as np
import xarray as xr

from ..analysis import attribution as metrics
from ..analysis.attribution import CAM_METHODS
from ..analysis.multitest import adjust
from ..attribution_maps import attribution_maps
from ..errors import ZooauditError
from ..extract import layer_shapes
from ..keys import cache_key
from ..layout import attribution_group
from ..patch_tokens import default_token_layer, patch_token_layout
from ..specs import AttributionSpec
from ..store import commit_metadata, write_dataset
from .attribution_regression import reliance_regressions
from .attribution_text import is_text_plan, run_text_attribution, text_attribution_key
from .common import attribution_target, device_module, load_model, random_subset, shard_dataset, skipped
from .refs import StageResult

log = logging.getLogger("zooaudit.stages")

__all__ = ["attribution_key", "attribution_layers", "key_params", "run_attribution", "sanity_flags"]

STAGE = "attribution"


def attribution_layers(plan, aspec: AttributionSpec) -> list[str]:
    """The layers the CAMs read: ``aspec.layers``, or the last of the plan's layers whose output is
    a ``(channel, y, x)`` map (one dry forward); [] when there is none.

    On a vision transformer (:func:`zooaudit.patch_tokens.patch_token_layout`: timm ViT / DeiT) a
    ``(token, channel)`` layer with the model's prefix + patch-grid token count is spatial too (its
    patch tokens are read as the grid), and the default is the last block's ``norm1``
    (:func:`zooaudit.patch_tokens.default_token_layer` says why not the last block's output)."""
    model = load_model(plan.model_uri, plan.store)
    layout = patch_token_layout(model.module, tuple(model.input_shape[-2:]))
    token_default = default_token_layer(model.module) if layout is not None else None
    candidates = list(aspec.layers) if aspec.layers else [token_default] if token_default else list(plan.layers)
    shapes = layer_shapes(model.module, model.input_shape, candidates, "none")

    def spatial_shape(shape) -> bool:
        return len(shape) == 3 or (layout is not None and len(shape) == 2 and shape[0] == layout.n_tokens)

    spatial = [name for name in candidates if spatial_shape(shapes[name])]
    if aspec.layers:
        if bad := [name for name in candidates if name not in spatial]:
            tokens = (f" or, on this vision transformer, ({layout.n_tokens} tokens = {layout.n_prefix} prefix + "
                      f"{layout.grid[0]}×{layout.grid[1]} patches, channel)") if layout is not None else ""
            raise ZooauditError(f"AttributionSpec.layers {bad} of {plan.model_uri!r} are not spatial: CAM methods "
                                f"need a (channel, y, x) output{tokens}; their shapes are "
                                f"{ {n: shapes[n] for n in bad} }. Spatial layers here: {spatial or 'none'}.")
        return spatial
    return spatial[-1:]


def _applies(plan, aspec: AttributionSpec) -> tuple[bool, str]:
    if not aspec.enabled:
        return False, "disabled"
    if plan.n_outputs is None:
        return False, "the model outputs no class scores"
    data = shard_dataset(plan)
    if data.inputs.ndim != 4:
        return False, "the dataset's inputs are not images"
    if aspec.only_masked and data.masks is None:
        return False, "the dataset has no foreground masks (AttributionSpec.only_masked)"
    return True, ""


def attribution_key(plan, aspec: AttributionSpec) -> str | None:
    """Cache key of the attribution stage of ``plan`` (None: it does not apply); a text encoder on
    texts gets its token attributions' key (:mod:`.attribution_text`)."""
    if aspec.enabled and is_text_plan(plan):
        return text_attribution_key(plan, aspec)
    ok, _ = _applies(plan, aspec)
    if not ok:
        return None
    layers = attribution_layers(plan, aspec) if any(m in CAM_METHODS for m in aspec.methods) else []
    if not layers and any(m in CAM_METHODS for m in aspec.methods):
        return None
    return cache_key(STAGE, model=plan.model_hash, dataset=plan.ds_hash, resolved_layers=layers, **key_params(aspec))


def key_params(aspec: AttributionSpec) -> dict:
    """The spec's fields in the cache key: all but the ROAD and Smooth Grad-CAM++ fields, the
    regression threshold and the text reference (token attributions have their own key) at their
    defaults (the key it had before those existed, so earlier commits stay cache hits)."""
    params = aspec.model_dump()
    for name in ("road_samples", "road_sigma", "smooth_samples", "smooth_sigma", "regression_background_increase",
                 "text_reference"):
        if params[name] == AttributionSpec.model_fields[name].default:
            del params[name]
    return params


def _smooth_options(aspec: AttributionSpec) -> dict:
    """Smooth Grad-CAM++'s settings for :func:`attribution_maps` (its noise seeded by the spec's random_state)."""
    return {"smooth_samples": aspec.smooth_samples, "smooth_sigma": aspec.smooth_sigma,
            "random_state": aspec.random_state}


def _layer_products(module, dev, data, idx, layer, aspec: AttributionSpec, target) -> dict[str, xr.Dataset]:
    """The maps, metrics, curves and agreement of one layer (reliance is assembled across layers)."""
    from ..faithfulness import confidence_change, faithfulness_curves
    from ..sanity_checks import randomisation_maps

    x, labels = data.inputs[idx], data.labels[idx]
    ids = data.sample_ids[idx]
    out = attribution_maps(module, x, layer, methods=aspec.methods, target=target, labels=labels,
                           batch_size=aspec.batch_size, ig_steps=aspec.ig_steps, ig_baseline=aspec.ig_baseline,
                           normalise="max", device=dev, **_smooth_options(aspec))
    methods = list(aspec.methods)
    maps = out["maps"].assign_coords(sample=ids)
    per_sample = {"label": ("sample", labels), "target": ("sample", out["target"].values),
                  "predicted": ("sample", out["predicted"].values),
                  **{f"group_{k}": ("sample", v[idx]) for k, v in data.groups.items()}}
    maps_ds = xr.Dataset({"maps": maps.astype(np.float16), **per_sample}, attrs=dict(out.attrs))
    metric_vars: dict = {}
    if "ig_gap" in out:
        metric_vars["ig_gap"] = ("sample", out["ig_gap"].values)
    if data.masks is not None:
        masks = data.masks[idx]
        values = maps.values
        for name, fn in (("energy_inside", metrics.energy_inside), ("background_share", metrics.background_share),
                         ("pointing_game", metrics.pointing_game),
                         ("iou", lambda m, k: metrics.mask_iou(m, k, threshold=aspec.iou_threshold))):
            metric_vars[name] = (("sample", "method"), np.stack([fn(values[:, j], masks) for j in range(len(methods))],
                                                                1))
    products = {"maps": maps_ds,
                "metrics": xr.Dataset(metric_vars, coords={"sample": ids, "method": methods},
                                      attrs={"energy": "positive part", "iou_threshold": aspec.iou_threshold}),
                "agreement": metrics.agreement_matrix(maps),
                "confidence": confidence_change(module, x, maps, out["target"].values,
                                                batch_size=max(aspec.batch_size, 64), device=dev).assign_coords(
                                                    sample=ids)}
    n_curve = min(aspec.curve_samples, len(idx))
    if n_curve:
        curves = faithfulness_curves(module, x[:n_curve], maps.isel(sample=slice(0, n_curve)),
                                     out["target"].values[:n_curve], steps=aspec.curve_steps,
                                     baseline=aspec.curve_baseline, batch_size=max(aspec.batch_size, 64),
                                     random_state=aspec.random_state, device=dev)
        curves = curves.assign_coords(sample=ids[:n_curve])
        curves["auc"] = (("sample", "order", "kind"), metrics.auc(curves["curves"].values, curves["fraction"].values))
        products["curves"] = curves
    n_road = min(aspec.road_samples, len(idx))
    if n_road:
        from ..road import road_curves

        road = road_curves(module, x[:n_road], maps.isel(sample=slice(0, n_road)), out["target"].values[:n_road],
                           steps=aspec.curve_steps, sigma=aspec.road_sigma, fill=aspec.curve_baseline,
                           batch_size=max(aspec.batch_size, 64), random_state=aspec.random_state, device=dev)
        road = road.assign_coords(sample=ids[:n_road])
        road["auc"] = (("sample", "order", "kind"), metrics.auc(road["curves"].values, road["fraction"].values))
        products["road"] = road
    n_sanity = min(aspec.sanity_samples, len(idx))
    from ..sanity_checks import cascade_layers

    if n_sanity and not cascade_layers(module):
        # an exported or scripted program has no resettable layers to randomise: the check does
        # not apply (recorded beside the maps), the rest of the stage does
        for ds in products.values():
            ds.attrs["sanity"] = "skipped: no layer with parameters and reset_parameters() to randomise"
        n_sanity = 0
    if n_sanity:
        sanity = randomisation_maps(module, x[:n_sanity], layer, methods=methods,
                                    targets=out["target"].values[:n_sanity], seed=aspec.random_state,
                                    batch_size=aspec.batch_size, ig_steps=aspec.ig_steps,
                                    ig_baseline=aspec.ig_baseline, device=dev, **_smooth_options(aspec))
        products["sanity"] = sanity_flags(sanity, aspec.sanity_threshold, aspec.sanity_ssim_threshold)
    return products


def sanity_flags(sanity: xr.Dataset, spearman_threshold: float, ssim_threshold: float) -> xr.Dataset:
    """``sanity`` with the flags of the methods whose maps do not change once every layer is random:
    ``flag_spearman``, ``flag_ssim`` ``(method)`` — the mean Spearman, the mean SSIM with the trained
    maps still ≥ its threshold at the last step — and ``attrs["flagged"]``, the methods flagged by
    either (a NaN, every randomised map constant, flags nothing: no ranking or structure is left)."""
    final = sanity.isel(step=-1)
    with np.errstate(invalid="ignore"):
        out = sanity.assign(flag_spearman=final["spearman"] >= spearman_threshold,
                            flag_ssim=final["ssim"] >= ssim_threshold)
    either = out["flag_spearman"] | out["flag_ssim"]
    out.attrs.update({"flagged": [str(m) for m in out["method"].values[either.values]],
                      "threshold": spearman_threshold, "ssim_threshold": ssim_threshold})
    return out


def _reliance(metric_ds: xr.Dataset, data, idx, aspec: AttributionSpec) -> list[xr.Dataset]:
    """Background share per group of each attribute, per method: one Dataset per attribute."""
    out = []
    share = metric_ds["background_share"].values
    for attr, codes in sorted(data.groups.items()):
        if len(np.unique(codes[idx])) < 2:   # one group in the mapped subset: nothing to compare
            continue
        rows = []
        for j, method in enumerate(metric_ds["method"].values):
            defined = np.isfinite(share[:, j])
            if len(np.unique(codes[idx][defined])) < 2:
                continue
            cmp = metrics.compare_groups(share[:, j], codes[idx],
                                         names=data.group_names.get(attr), n_boot=aspec.n_boot,
                                         n_permutations=aspec.n_permutations, ci=aspec.ci,
                                         random_state=aspec.random_state)
            rows.append(cmp.assign(difference=cmp.attrs["difference"], p_value=cmp.attrs["p_value"],
                                   difference_ci_low=cmp.attrs["difference_ci_low"],
                                   difference_ci_high=cmp.attrs["difference_ci_high"]).expand_dims(method=[method]))
        if rows:
            ds = xr.concat(rows, dim="method", join="outer", combine_attrs="drop")
            ds.attrs.update({"attribute": attr, "ci": aspec.ci, "test": rows[0].attrs.get("test", "")})
            out.append(ds)
    return out


def run_attribution(plan, aspec: AttributionSpec, run_id: str | None = None) -> StageResult | None:
    """The attribution stage of one model on one dataset (every layer in one commit), or None
    when it does not apply; a cache hit when its key is already on ``main``. A text encoder on
    texts gets token attributions instead (:func:`.attribution_text.run_text_attribution`)."""
    if aspec.enabled and is_text_plan(plan):
        return run_text_attribution(plan, aspec, run_id)
    ok, why = _applies(plan, aspec)
    if not ok:
        log.info("attribution of %s on %s: not applicable (%s)", plan.model_uri, plan.ds_key, why)
        return None
    if (key := attribution_key(plan, aspec)) is None:
        log.info("attribution of %s on %s: no spatial layer for the CAM methods", plan.model_uri, plan.ds_key)
        return None
    repository = plan.repository
    if (snap := repository.find(key)) is not None:
        return skipped(STAGE, plan, key, snap)
    model = load_model(plan.model_uri, plan.store)
    data = shard_dataset(plan)
    target = attribution_target(aspec.target, data.class_names, plan.n_outputs)
    idx = random_subset(len(data), aspec.max_samples, aspec.random_state)
    module, dev = device_module(model.module, plan.device, " for the attribution stage")
    cam_layers = attribution_layers(plan, aspec) if any(m in CAM_METHODS for m in aspec.methods) else []
    groups_out: dict[str, xr.Dataset] = {}
    reliance_rows, summary, metrics_by_layer = [], {}, {}
    for layer in cam_layers or [None]:
        name = layer or "input"
        products = _layer_products(module, dev, data, idx, layer, aspec, target)
        for part, ds in products.items():
            groups_out[attribution_group(plan.ds_key, name, part)] = ds
        summary[name] = _layer_summary(products, aspec)
        metrics_by_layer[name] = products["metrics"]
        if "background_share" in products["metrics"]:
            for ds in _reliance(products["metrics"], data, idx, aspec):
                reliance_rows.append((name, ds))
    # one correction over every (layer, attribute, method) comparison of the run
    pvals = np.concatenate([ds["p_value"].values for _, ds in reliance_rows]) if reliance_rows else np.zeros(0)
    if len(pvals):
        adj = adjust(pvals, method=aspec.correction, alpha=aspec.alpha)
        start = 0
        for name, ds in reliance_rows:
            k = ds.sizes["method"]
            ds["p_adjusted"] = ("method", adj.p_adjusted[start:start + k])
            ds["reject"] = ("method", adj.reject[start:start + k])
            start += k
            attr = ds.attrs["attribute"]
            groups_out[attribution_group(plan.ds_key, name, f"reliance/{attr}")] = ds
            summary[name].setdefault("background_share_by_group", {})[attr] = {
                str(m): {**{str(g): round(float(ds["mean"].sel({"method": m, "group": g})), 4)
                            for g in ds["group"].values},
                         "difference": round(float(ds["difference"].sel({"method": m})), 4),
                         "difference_ci": [_rounded(ds[f"difference_ci_{e}"].sel({"method": m}))
                                           for e in ("low", "high")],
                         "p_adjusted": round(float(ds["p_adjusted"].sel({"method": m})), 6)}
                for m in ds["method"].values}

    previous, worse = reliance_regressions(plan, key, metrics_by_layer, aspec)
    for name, found in worse.items():
        summary[name]["previous_snapshot"] = previous
        summary[name]["background_regressions"] = found
        if found:
            log.warning("%s on %s at %s: background share up significantly since the previous audit: %s",
                        plan.model_uri, plan.ds_key, name,
                        ", ".join(f"{r['method']} {r['previous']:.3f} → {r['current']:.3f}" for r in found))

    def write(session):
        for group, ds in groups_out.items():
            write_dataset(session, ds, group)

    params = aspec.model_dump()
    meta = commit_metadata(STAGE, key, params, model=plan.model_uri, model_hash=plan.model_hash,
                           dataset=plan.dataset.model_dump(), dataset_hash=plan.ds_hash, flow_run_id=run_id,
                           summary=summary, layers=cam_layers)
    snap, new = repository.commit_once(write, message=f"{STAGE} {plan.model_uri} on {plan.dataset.name}",
                                       metadata=meta)
    return StageResult(STAGE, plan.model_uri, plan.ds_key, key, snap, not new, summary)


def _rounded(value, digits: int = 4) -> float | None:
    """A summary number: rounded, or None (JSON null) where it is undefined (NaN)."""
    value = float(value)
    return round(value, digits) if np.isfinite(value) else None


def _layer_summary(products: dict[str, xr.Dataset], aspec: AttributionSpec) -> dict:
    """Headline numbers of one layer for the commit metadata: per method, the mean of each metric
    (the background share's with its bootstrap CI, ``background_share_ci``) and the deletion /
    insertion AUC beside the random order's; on a ViT layer ``patch_tokens`` (the prefix tokens
    excluded and the grid)."""
    out: dict = {}
    if "token_grid" in (attrs := products["maps"].attrs):   # a ViT layer: what the maps exclude, for the report
        out["patch_tokens"] = {"prefix_tokens_excluded": attrs["prefix_tokens_excluded"],
                               "token_grid": list(attrs["token_grid"])}
    m = products["metrics"]
    undefined: dict = {}
    for var in ("background_share", "pointing_game", "iou", "energy_inside"):
        if var in m:
            out[var] = {}
            for k in m["method"].values:
                mean, n = metrics.defined_mean(m[var].sel({"method": k}).values)
                out[var][str(k)] = round(mean, 4) if n else None
                if not n:
                    undefined.setdefault(var, {})[str(k)] = "no sample's map has positive energy (or a maximum > 0)"
    if "background_share" in m:
        out["background_share_ci"] = {}
        for k in m["method"].values:
            _, lo, hi, _ = metrics.mean_ci(m["background_share"].sel({"method": k}).values, n_boot=aspec.n_boot,
                                           ci=aspec.ci, random_state=aspec.random_state)
            out["background_share_ci"][str(k)] = [_rounded(lo), _rounded(hi)]
    if "ig_gap" in m:
        out["ig_gap_mean_abs"] = round(float(np.abs(m["ig_gap"].values).mean()), 6)
    conf = products["confidence"]
    for var in ("average_drop", "increase_in_confidence"):
        out[var] = {str(k): _rounded(conf[var].sel({"method": k})) for k in conf["method"].values}
    agreement = products["agreement"]
    out["agreement_kendall"] = {}   # each method's mean τ-b with the other methods
    for k in agreement["method"].values:
        others = agreement["kendall"].sel({"method": k}).drop_sel({"method_other": k}).values
        mean, n = metrics.defined_mean(others)
        out["agreement_kendall"][str(k)] = round(mean, 4) if n else None
        if not n:
            undefined.setdefault("agreement_kendall", {})[str(k)] = "constant maps: no ranking to compare"
    if "sanity" in products:
        final = products["sanity"]["spearman"].isel(step=-1)
        out["sanity_spearman_all_random"] = {str(m): _rounded(final.sel({"method": m}))
                                             for m in final["method"].values}
        out["sanity_ssim_all_random"] = {str(m): _rounded(products["sanity"]["ssim"].isel(step=-1).sel({"method": m}))
                                         for m in final["method"].values}
        out["sanity_flagged"] = list(products["sanity"].attrs["flagged"])
        out["sanity_flagged_by"] = {str(m): [s for s in ("spearman", "ssim")
                                             if bool(products["sanity"][f"flag_{s}"].sel({"method": m}))]
                                    for m in out["sanity_flagged"]}
    if undefined:
        out["undefined"] = undefined
    for part, name in (("curves", "auc"), ("road", "road_auc")):   # deletion/insertion, ROAD morf/lerf
        if part in products:
            auc = products[part]["auc"].mean("sample")
            out[name] = {kind: {str(o): round(float(auc.sel(kind=kind, order=o)), 4) for o in auc["order"].values}
                         for kind in auc["kind"].values}
    return out
