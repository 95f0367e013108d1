"""Per-model analyses over committed activations: factorization, similarity, bias."""

from __future__ import annotations

import numpy as np
import xarray as xr

from .. import layout
from ..analysis import bias as bias_mod
from ..analysis import factorize as fact_mod
from ..keys import cache_key
from ..store import find_commit, write_dataset
from .common import ExtractionPlan, StageResult, _commit_result, _read_session, _repo, skipped


def run_factorize(plan: ExtractionPlan, acts_snapshot: str, fspec: dict, run_id: str | None = None) -> StageResult:
    """PCA (all layers) and NMF (non-negative layers) with explained variance; one commit."""
    key = cache_key("factorize", activations=plan.cache_key, **fspec)
    _, _, repo = _repo(plan)
    if (snap := find_commit(repo, key)) is not None:
        return skipped("factorize", plan, key, snap)
    session = _read_session(plan, acts_snapshot)
    results: dict[tuple[str, str], xr.Dataset] = {}
    summary: dict = {}
    for layer in plan.layers:
        acts = layout.open_activations(session.store, plan.ds_key, layer)
        A = layout.as_matrix(acts)
        k = min(fspec["k"], *A.shape)
        for method in fspec["methods"]:
            if method == "nmf" and not fact_mod.is_nonnegative(A):
                summary[f"{layer}/nmf"] = "skipped: layer has negative values"
                continue
            if method == "pca":
                f = fact_mod.pca(A, k, name=layer)
            else:
                f = fact_mod.nmf(A, k, random_state=fspec["random_state"], max_iter=fspec["max_iter"], name=layer)
            ds = f.to_dataset(acts["sample"].values)
            if method == "pca":
                curve = f.metrics["explained_variance_curve"]
                ds["explained_variance_curve"] = ("rank", curve)
                ds = ds.assign_coords(rank=np.arange(1, len(curve) + 1))
            ds.attrs.update({"layer": layer, "k": k})
            results[(layer, method)] = ds
            summary[f"{layer}/{method}"] = round(float(f.metrics["explained_variance"]), 6)

    def write(s):
        for (layer, method), ds in results.items():
            write_dataset(s, ds, layout.factors_group(plan.ds_key, layer, method))

    return _commit_result(plan, "factorize", key, fspec, write, {"explained_variance": summary}, run_id)



def run_bias(plan: ExtractionPlan, acts_snapshot: str, bspec: dict, run_id: str | None = None) -> StageResult | None:
    """Accuracy per group with bootstrap CIs and worst-group accuracy, per group attribute."""
    if not plan.has_groups or plan.n_outputs is None:
        return None
    key = cache_key("bias", activations=plan.cache_key, **bspec)
    _, _, repo = _repo(plan)
    if (snap := find_commit(repo, key)) is not None:
        return skipped("bias", plan, key, snap)
    session = _read_session(plan, acts_snapshot)
    samples = xr.open_zarr(session.store, group=layout.samples_group(plan.ds_key), consolidated=False,
                           zarr_format=3).load()
    outputs = xr.open_zarr(session.store, group=layout.outputs_group(plan.ds_key), consolidated=False,
                           zarr_format=3).load()
    reports, summary = {}, {}
    for attr in samples.attrs.get("group_attributes", []):
        rep = bias_mod.group_metrics(samples["label"].values, outputs["prediction"].values, samples[attr].values,
                                     n_boot=bspec["n_boot"], random_state=bspec["random_state"], ci=bspec["ci"],
                                     min_group_size=bspec["min_group_size"],
                                     group_names=samples.attrs["group_names"].get(attr))
        reports[attr] = rep
        summary[attr] = {"overall_accuracy": round(rep.overall_accuracy, 6),
                         "worst_group_accuracy": round(rep.worst_group_accuracy, 6),
                         "worst_group": rep.worst_group,
                         "accuracy": dict(zip(rep.table["group"].values.tolist(),
                                              rep.table["accuracy"].values.round(6).tolist()))}

    def write(s):
        for attr, rep in reports.items():
            ds = xr.merge([rep.table, rep.cells.rename({v: f"cell_{v}" for v in rep.cells.data_vars})])
            ds.attrs.update({"attribute": attr, "overall_accuracy": rep.overall_accuracy,
                             "worst_group_accuracy": rep.worst_group_accuracy, "worst_group": rep.worst_group,
                             **{k: v for k, v in bspec.items()}})
            write_dataset(s, ds, layout.bias_group(plan.ds_key, attr))

    return _commit_result(plan, "bias", key, bspec, write, summary, run_id)
