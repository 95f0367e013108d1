"""Factorization stage over committed activations: PCA, NMF, semi-NMF, TopK SAE and
Eigen-CAM per layer, with the quality measures, seed stability, an optional k sweep and
the top-activating samples of every component; one commit, or none on error.

Layers are read lazily from the store's Zarr arrays (one Dask chunk of samples at a
time); factorizations that would not fit in memory stream (out-of-core NMF, streamed
PCA covariance) and their codes are written chunk by chunk. Spatial maps stored with
``pooling="none"`` — ``(sample, channel, y, x)`` — are factorized Deep-Feature-
Factorization style: every position is a sample, components are over channels, and the
codes come back per image as heat maps ``(sample, component, y, x)``; ``codes (sample,
component)`` are then the spatial mean of the heat maps (the codes of the mean-pooled
activations, by linearity). Token maps ``(sample, token, unit)`` are treated the same way
with ``(token,)`` maps.

Every layer is checked before anything is fitted (empty, NaN/Inf, negative minimum for
NMF, k against the features), so a bad layer fails the stage before any work is spent
and nothing is committed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import xarray as xr

from .. import layout
from ..analysis import factorize as fact_mod
from ..analysis.eigencam import iter_blocks
from ..analysis.nmf import scan
from ..analysis.quality import k_sweep, stability
from ..analysis.stats import compute_here
from ..errors import ZooauditError
from ..keys import cache_key
from ..specs import FactorizeSpec
from ..store import find_commit, write_dataset
from .common import (
    ExtractionPlan,
    StageResult,
    _commit_result,
    _read_session,
    _repo,
    skipped,
)

CODES_IN_MEMORY = 256 << 20  # codes larger than this (bytes, float64) stay lazy and are written chunk by chunk
FACTOR_METHODS = ("pca", "nmf", "semi_nmf", "sae")


@dataclass
class LayerData:
    """One layer, checked: the ``(rows, features)`` matrix to factorize and how rows map to samples.

    ``map_dims``/``map_shape`` describe the positions per sample (``("y", "x")``,
    ``("token",)``) in positions mode, or are empty when rows are samples.
    """

    name: str
    acts: xr.DataArray
    matrix: object          # (rows, features) NumPy or Dask
    map_dims: tuple
    map_shape: tuple
    unit_coord: np.ndarray
    k: int
    minimum: float
    rms: float

    @property
    def positions(self) -> int:
        return int(np.prod(self.map_shape)) if self.map_shape else 1

    @property
    def spatial(self) -> bool:
        return self.map_dims == ("y", "x")


def _layer_matrix(acts: xr.DataArray):
    """``(rows, features)`` view of a stored layer, rows = samples or (sample, position)."""
    data = acts.data
    dims = tuple(acts.dims)
    if data.ndim == 4 and dims[1:] == ("channel", "y", "x"):
        n, c, h, w = data.shape
        if hasattr(data, "dask"):
            data = data.rechunk({1: -1, 2: -1, 3: -1})
        return data.transpose(0, 2, 3, 1).reshape(n * h * w, c), ("y", "x"), (h, w), np.arange(c)
    if data.ndim == 3 and dims[1:] == ("token", "unit"):
        n, t, d = data.shape
        if hasattr(data, "dask"):
            data = data.rechunk({1: -1, 2: -1})
        return data.reshape(n * t, d), ("token",), (t,), np.arange(d)
    unit = acts["unit"].values if data.ndim == 2 and "unit" in acts.coords else np.arange(
        int(np.prod(data.shape[1:])))
    return layout.as_matrix(acts), (), (), unit


def inspect_layer(name: str, acts: xr.DataArray, spec: FactorizeSpec) -> LayerData:
    """Door checks for one layer (one streamed pass): shape, finiteness, k; records the minimum."""
    if 0 in acts.shape:
        raise ZooauditError(f"Layer {name!r} is empty (shape {dict(acts.sizes)}); nothing to factorize. "
                            "Check the layer selection and that the dataset has samples.")
    matrix, map_dims, map_shape, unit = _layer_matrix(acts)
    rows, d = matrix.shape
    if spec.k > d and spec.k_above_features == "error":
        raise ZooauditError(f"k={spec.k} components requested for layer {name!r}, which has {d} features; "
                            f"k must be ≤ {d} (or set k_above_features='clip').")
    k = min(spec.k, d, rows)
    sc = scan(matrix, name, "factorization", None)  # raises on NaN/Inf, naming the layer and the count
    layer = LayerData(name, acts, matrix, map_dims, map_shape, unit, k, float(sc.minimum),
                      float(np.sqrt(sc.ss_centred / sc.n)))
    wants_nmf = "nmf" in spec.methods
    if wants_nmf and layer.minimum < 0 and spec.on_negative == "error":
        raise ZooauditError(
            f"NMF needs non-negative activations but layer {name!r} has minimum {layer.minimum:.4g}. Use "
            "on_negative='semi_nmf' (signed components) or 'shift' (subtract the minimum), 'skip', or drop "
            "the layer.")
    return layer


def _torch_device(device: str) -> str | None:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else None
    return None if device == "cpu" else device


def _fit(method: str, layer: LayerData, spec: FactorizeSpec, device, k: int | None = None, codes: str = "numpy",
         shift: float = 0.0, seed: int | None = None):
    """One factorization of the layer's matrix; returns the library's Factorization."""
    A = layer.matrix - shift if shift else layer.matrix
    k = layer.k if k is None else k
    seed = spec.random_state if seed is None else seed
    if method == "pca":
        return fact_mod.pca(A, k, random_state=seed, codes=codes, name=layer.name)
    if method == "nmf":
        return fact_mod.nmf(A, k, random_state=seed, max_iter=spec.max_iter, device=device, codes=codes,
                            name=layer.name)
    if method == "semi_nmf":
        return fact_mod.semi_nmf(A, k, random_state=seed, max_iter=spec.max_iter, device=device, codes=codes,
                                 name=layer.name)
    return fact_mod.sae(A, **_sae_options(spec, k), random_state=seed, device=device, codes=codes, name=layer.name)


def _sae_options(spec: FactorizeSpec, k: int) -> dict:
    latents = spec.sae_latents or 4 * k
    return {"k_latents": latents, "topk": min(spec.sae_topk, latents), "epochs": spec.sae_epochs}


def _method_options(method: str, spec: FactorizeSpec, device, codes: str, k: int) -> dict:
    """Keyword options of the library call, for stability refits and the k sweep."""
    if method == "pca":
        return {"codes": codes}
    if method == "sae":
        opts = _sae_options(spec, k)
        return {"topk": opts["topk"], "epochs": opts["epochs"], "device": device, "codes": codes}
    return {"max_iter": spec.max_iter, "device": device, "codes": codes}


def top_samples(scores, n_top: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows with the largest scores per column, streamed over row blocks.

    Args:
        scores: ``(N, k)`` NumPy or Dask. n_top: how many per column (≤ N).
    Returns:
        ``(index (k, n_top) int64, value (k, n_top))``, best first per column.
    """
    k = scores.shape[1]
    n_top = min(n_top, scores.shape[0])
    best_v = np.full((0, k), -np.inf)
    best_i = np.zeros((0, k), np.int64)
    for start, stop, block in iter_blocks(scores, np.float64):
        vals = np.concatenate([best_v, block])
        idx = np.concatenate([best_i, np.broadcast_to(np.arange(start, stop)[:, None], block.shape)])
        keep = np.argsort(-vals, axis=0, kind="stable")[:n_top]
        best_v = np.take_along_axis(vals, keep, axis=0)
        best_i = np.take_along_axis(idx, keep, axis=0)
    return best_i.T.copy(), best_v.T.copy()


def _per_sample(codes, layer: LayerData):
    """Positions mode: codes ``(N·P, k)`` → heat maps ``(N, k, *map)`` and per-sample scores."""
    n = layer.acts.shape[0]
    k = codes.shape[1]
    maps = codes.reshape(n, *layer.map_shape, k)
    order = (0, len(layer.map_shape) + 1, *range(1, len(layer.map_shape) + 1))
    heat = maps.transpose(order)
    flat = codes.reshape(n, layer.positions, k)
    return heat, flat.mean(axis=1), flat.max(axis=1)


def factor_dataset(method: str, layer: LayerData, f, spec: FactorizeSpec, sample_ids: np.ndarray,
                   shift: float = 0.0) -> xr.Dataset:
    """The stored result: components (component, unit), codes (sample, component), heat maps in
    positions mode, the top samples per component and the quality metrics as attributes."""
    heat = None
    if layer.map_shape:
        heat, codes, score = _per_sample(f.codes, layer)
        score_kind = "spatial max of the heat map" if layer.spatial else "max over tokens"
    else:
        codes = score = f.codes
        score_kind = "code"
    ds = replace(f, codes=codes).to_dataset(sample_ids)
    ds = ds.assign_coords(unit=layer.unit_coord)
    if heat is not None:
        ds["heatmaps"] = (("sample", "component", *layer.map_dims), heat)
    idx, val = top_samples(score, spec.top_n)
    ds["top_sample"] = (("component", "rank"), sample_ids[idx])
    ds["top_score"] = (("component", "rank"), val)
    ds = ds.assign_coords(rank=np.arange(idx.shape[1]))
    if heat is not None:
        # only the chunks holding the chosen samples are (re)computed
        uniq, inverse = np.unique(idx.ravel(), return_inverse=True)
        picked = heat[uniq]
        picked = np.asarray(compute_here(picked))
        out = picked[inverse.ravel(), np.repeat(np.arange(idx.shape[0]), idx.shape[1])]
        ds["top_heatmap"] = (("component", "rank", *layer.map_dims), out.reshape(*idx.shape, *layer.map_shape))
    ds.attrs.update({"layer": layer.name, "k": int(f.components.shape[0]), "k_requested": spec.k,
                     "top_score": score_kind, "rows": "positions" if layer.map_shape else "samples",
                     "shift": float(shift)})
    if method == "pca":
        curve = np.asarray(f.metrics["explained_variance_curve"])
        ds["explained_variance_curve"] = ("rank_curve", curve)
        ds = ds.assign_coords(rank_curve=np.arange(1, len(curve) + 1))
    return ds


def _add_stability(ds: xr.Dataset, method: str, layer: LayerData, f, spec, device, codes, shift) -> None:
    seeds = list(dict.fromkeys(spec.seeds))
    if len(seeds) < 2:
        return
    A = layer.matrix - shift if shift else layer.matrix
    opts = _method_options(method, spec, device, codes, layer.k)
    s = stability(method, A, f.components.shape[0], seeds, name=layer.name, reference=f.components, **opts)
    ds["stability_pairwise"] = (("seed", "seed_b"), s.pairwise)
    ds["stability_per_component"] = ("component", s.per_component)
    ds.coords["seed"] = list(s.seeds)
    ds.coords["seed_b"] = list(s.seeds)
    ds.attrs.update({"stability_mean": s.mean, "stability_min": s.min})


def _add_sweep(ds: xr.Dataset, method: str, layer: LayerData, spec, device, codes, shift) -> None:
    ks = [k for k in spec.k_sweep if k <= min(layer.matrix.shape)]
    if not ks:
        return
    A = layer.matrix - shift if shift else layer.matrix
    opts = _method_options(method, spec, device, codes, layer.k)
    if method == "sae":  # sweep the dictionary size; topk fixed
        opts["topk"] = min(opts["topk"], min(ks))
    seeds = list(dict.fromkeys(spec.seeds))
    sw = k_sweep(A, ks, method, seeds=seeds if len(seeds) >= 2 else None, random_state=spec.random_state,
                 name=layer.name, **opts)
    for var in sw.data_vars:
        ds[f"sweep_{var}"] = ("k_sweep", sw[var].values)
    ds.coords["k_sweep"] = ks


def _eigencam_dataset(layer: LayerData, sample_ids: np.ndarray) -> xr.Dataset:
    """Per-image Eigen-CAM maps ``(sample, y, x)``, computed chunk by chunk."""
    data = layer.acts.data
    if hasattr(data, "dask"):
        data = data.rechunk({1: -1, 2: -1, 3: -1})
        maps = data.map_blocks(lambda b: fact_mod.eigencam(b, name=layer.name), drop_axis=1, dtype=np.float64)
    else:
        maps = fact_mod.eigencam(np.asarray(data), name=layer.name)
    ds = xr.Dataset({"heatmap": (("sample", "y", "x"), maps)}, coords={"sample": sample_ids})
    ds.attrs.update({"layer": layer.name, "method": "eigencam",
                     "sign": "positive correlation with the centred channel-sum map"})
    return ds


def factorize_key(plan: ExtractionPlan, fspec: dict) -> str:
    """Cache key of the factorize stage of ``plan`` with ``fspec``."""
    return cache_key("factorize", activations=plan.cache_key, **FactorizeSpec(**fspec).model_dump())


def run_factorize(plan: ExtractionPlan, acts_snapshot: str, fspec: dict, run_id: str | None = None) -> StageResult:
    """Every requested method on every layer, with quality, stability, sweep and top samples; one commit."""
    spec = FactorizeSpec(**fspec)
    key = factorize_key(plan, fspec)
    _, _, repo = _repo(plan)
    if (snap := find_commit(repo, key)) is not None:
        return skipped("factorize", plan, key, snap)
    session = _read_session(plan, acts_snapshot)
    layers = [inspect_layer(name, layout.open_activations(session.store, plan.ds_key, name), spec)
              for name in plan.sample_layers]
    device = _torch_device(plan.device)
    results: dict[tuple[str, str], xr.Dataset] = {}
    ev: dict = {}
    stab: dict = {}
    for layer in layers:
        sample_ids = np.asarray(layer.acts["sample"].values)
        for method in spec.methods:
            tag = f"{layer.name}/{method}"
            if method == "eigencam":
                if layer.spatial:
                    results[(layer.name, method)] = _eigencam_dataset(layer, sample_ids)
                else:
                    ev[tag] = "skipped: not a spatial map (extract with pooling='none')"
                continue
            fit_as, shift = method, 0.0
            if method == "nmf" and layer.minimum < 0:
                if spec.on_negative == "skip":
                    ev[tag] = (f"skipped: minimum {layer.minimum:.4g} < 0 (use semi_nmf, or on_negative="
                               "'shift' / 'semi_nmf')")
                    continue
                if spec.on_negative == "shift":
                    shift = layer.minimum
                else:
                    fit_as = "semi_nmf"
            rows = layer.matrix.shape[0]
            width = _sae_options(spec, layer.k)["k_latents"] if fit_as == "sae" else layer.k
            codes = "numpy" if rows * width * 8 <= CODES_IN_MEMORY else "dask"
            f = _fit(fit_as, layer, spec, device, codes=codes, shift=shift)
            ds = factor_dataset(fit_as, layer, f, spec, sample_ids, shift)
            ds.attrs["requested_method"] = method
            _add_stability(ds, fit_as, layer, f, spec, device, codes, shift)
            _add_sweep(ds, fit_as, layer, spec, device, codes, shift)
            results[(layer.name, fit_as)] = ds
            ev[f"{layer.name}/{fit_as}"] = round(float(f.metrics["explained_variance"]), 6)
            if "stability_mean" in ds.attrs:
                stab[f"{layer.name}/{fit_as}"] = round(float(ds.attrs["stability_mean"]), 6)

    def write(s):
        for (layer_name, method), ds in results.items():
            write_dataset(s, ds, layout.factors_group(plan.ds_key, layer_name, method))

    summary = {"explained_variance": ev, "stability": stab,
               "groups": {f"{ln}/{m}": layout.factors_group(plan.ds_key, ln, m) for ln, m in results},
               "k": {layer.name: layer.k for layer in layers}}
    return _commit_result(plan, "factorize", key, spec.model_dump(), write, summary, run_id)
