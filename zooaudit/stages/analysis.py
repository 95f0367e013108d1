"""Factorization stage over committed activations."""

from __future__ import annotations

import numpy as np
import xarray as xr

from .. import layout
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
    for layer in plan.sample_layers:
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
