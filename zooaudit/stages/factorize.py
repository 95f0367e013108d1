"""Factorization stage (an array stage) over committed activations: PCA, NMF, semi-NMF, TopK SAE and
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
with ``(token,)`` maps. All-tokens layers (pooling ``"tokens"``: ragged ``(token, unit)`` rows
with per-sample offsets, :mod:`zooaudit.tokens`) are factorized with every real token as a
row; the result keeps the token codes, per-sample codes (mean over the sample's tokens) and,
per component, the top-activating tokens with their text, sentence and character span (the
model source's tokenizer).

Seed stability refits every seed on a fixed random subset of at most
``FactorizeSpec.stability_rows`` rows (the stored fit uses all rows), so the default three
seeds no longer triple the cost on large layers.

Every layer is checked before anything is fitted (empty, NaN/Inf, negative minimum for
NMF, k against the features), so a bad layer fails the stage before any work is spent
and nothing is committed.
"""

from __future__ import annotations

import functools

from dataclasses import dataclass, replace

import numpy as np
import xarray as xr

from .. import layout
from ..analysis import factorize as fact_mod
from ..analysis.blocks import iter_blocks
from ..analysis.factor_methods import FACTOR_METHODS  # noqa: F401 — the declared methods, re-exported
from ..analysis.nmf import scan
from ..analysis.stability import k_sweep, stability
from ..analysis.stats import compute_here
from ..devices import resolve_device
from ..errors import ZooauditError
from ..keys import cache_key
from ..specs import FactorizeSpec
from ..store import write_dataset
from .common import commit_stage, random_subset, skipped
from .refs import ActivationsRef, StageResult

CODES_IN_MEMORY = 256 << 20  # codes larger than this (bytes, float64) stay lazy and are written chunk by chunk


@dataclass
class TokenIndex:
    """Which sample and position every row of an all-tokens layer belongs to (rows sample-major).

    ``owner (token,)``: sample index 0…N−1; ``position (token,)``: token position within the
    sample (0 = the first token the tokenizer emitted, e.g. ``[CLS]``); ``count (sample,)``;
    ``sample_ids (sample,)``.
    """

    owner: np.ndarray
    position: np.ndarray
    count: np.ndarray
    sample_ids: np.ndarray


def open_token_layer(store, ds_key: str, name: str):
    """Lazy ``(token, unit)`` Dask matrix of an all-tokens layer without its padding rows, and
    its :class:`TokenIndex`. Each shard's tokens are a prefix of its own chunk
    (:mod:`zooaudit.tokens`), so the matrix is one slice per run of adjacent samples."""
    import dask.array as dsa
    import zarr

    g = zarr.open_group(store, path=layout.acts_group(ds_key, name), mode="r")
    start, count = g["token_start"][:].astype(np.int64), g["token_count"][:].astype(np.int64)
    if np.any(start < 0):
        raise ZooauditError(f"All-tokens layer {name!r} has {int((start < 0).sum())} samples with no tokens written "
                            "(incomplete extraction); rerun the activations stage.")
    acts = g["activations"]
    full = dsa.from_array(acts, chunks=(int(g.attrs["token_rows"]), acts.shape[1]), name=False)
    runs: list[list[int]] = []
    for a, c in zip(start.tolist(), count.tolist()):
        if runs and runs[-1][1] == a:
            runs[-1][1] = a + c
        elif c:
            runs.append([a, a + c])
    if not runs:
        raise ZooauditError(f"All-tokens layer {name!r} holds no tokens; nothing to factorize.")
    matrix = dsa.concatenate([full[a:b] for a, b in runs]) if len(runs) > 1 else full[runs[0][0]:runs[0][1]]
    matrix = matrix.rechunk({1: -1})
    owner = np.repeat(np.arange(len(count)), count)
    position = np.concatenate([np.arange(c) for c in count]) if len(count) else np.zeros(0, np.int64)
    return matrix, TokenIndex(owner, position, count, np.asarray(g["sample"][:]))


@dataclass
class LayerData:
    """One layer, checked: the ``(rows, features)`` matrix to factorize and how rows map to samples.

    ``map_dims``/``map_shape`` describe the positions per sample (``("y", "x")``,
    ``("token",)``) in positions mode, or are empty when rows are samples.
    """

    name: str
    acts: xr.DataArray | None  # None for all-tokens layers (see ``tokens``)
    matrix: object          # (rows, features) NumPy or Dask
    map_dims: tuple
    map_shape: tuple
    unit_coord: np.ndarray
    k: int
    minimum: float
    rms: float
    tokens: TokenIndex | None = None  # all-tokens layers: rows are tokens

    @property
    def sample_ids(self) -> np.ndarray:
        return self.tokens.sample_ids if self.tokens is not None else np.asarray(self.acts["sample"].values)

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
    return _checked(name, acts, matrix, map_dims, map_shape, unit, spec)


def inspect_token_layer(name: str, store, ds_key: str, spec: FactorizeSpec) -> LayerData:
    """Door checks for an all-tokens layer: every token is a row (like DFF's positions)."""
    matrix, tokens = open_token_layer(store, ds_key, name)
    return _checked(name, None, matrix, (), (), np.arange(matrix.shape[1]), spec, tokens)


def _checked(name, acts, matrix, map_dims, map_shape, unit, spec: FactorizeSpec,
             tokens: TokenIndex | None = None) -> LayerData:
    rows, d = matrix.shape
    if spec.k > d and spec.k_above_features == "error":
        raise ZooauditError(f"k={spec.k} components requested for layer {name!r}, which has {d} features; "
                            f"k must be ≤ {d} (or set k_above_features='clip').")
    k = min(spec.k, d, rows)
    sc = scan(matrix, name, "factorization", None)  # raises on NaN/Inf, naming the layer and the count
    layer = LayerData(name, acts, matrix, map_dims, map_shape, unit, k, float(sc.minimum),
                      float(np.sqrt(sc.ss_centred / sc.n)), tokens)
    wants_nmf = "nmf" in spec.methods
    if wants_nmf and layer.minimum < 0 and spec.on_negative == "error":
        raise ZooauditError(
            f"NMF needs non-negative activations but layer {name!r} has minimum {layer.minimum:.4g}. Use "
            "on_negative='semi_nmf' (signed components) or 'shift' (subtract the minimum), 'skip', or drop "
            "the layer.")
    return layer


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


def token_per_sample(codes, tokens: TokenIndex) -> tuple[np.ndarray, np.ndarray]:
    """Token codes ``(token, k)`` → per-sample mean and max over each sample's tokens, ``(sample, k)``
    each, streamed over row blocks (rows are sample-major, so a block's owners are sorted)."""
    n, k = len(tokens.count), codes.shape[1]
    sums, best = np.zeros((n, k)), np.full((n, k), -np.inf)
    for start, stop, block in iter_blocks(codes, np.float64):
        own = tokens.owner[start:stop]
        cut = np.flatnonzero(np.r_[True, own[1:] != own[:-1]])
        seg = own[cut]
        sums[seg] += np.add.reduceat(block, cut, axis=0)
        best[seg] = np.maximum(best[seg], np.maximum.reduceat(block, cut, axis=0))
    return sums / np.maximum(tokens.count, 1)[:, None], best


def factor_dataset(method: str, layer: LayerData, f, spec: FactorizeSpec, sample_ids: np.ndarray,
                   shift: float = 0.0) -> xr.Dataset:
    """The stored result: components (component, unit), codes (sample, component), heat maps in
    positions mode, the top samples per component and the quality metrics as attributes.

    All-tokens layers (rows = tokens) add ``token_codes (token, component)`` with coords
    ``token_sample``/``token_position``, and the top tokens per component: ``top_token_row``,
    ``top_token_sample``, ``top_token_position``, ``top_token_score`` ``(component, rank)``
    (their strings come from :func:`add_token_text`). ``codes`` are then the mean over each
    sample's tokens, and the top samples are ranked by their best token."""
    heat = None
    if layer.tokens is not None:
        codes, score = token_per_sample(f.codes, layer.tokens)
        score_kind = "max over the sample's tokens"
    elif layer.map_shape:
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
    if layer.tokens is not None:
        tok = layer.tokens
        ds["token_codes"] = (("token", "component"), f.codes)
        ds = ds.assign_coords(token_sample=("token", sample_ids[tok.owner]), token_position=("token", tok.position))
        t_idx, t_val = top_samples(f.codes, spec.top_n)
        ds["top_token_row"] = (("component", "rank_token"), t_idx)
        ds["top_token_sample"] = (("component", "rank_token"), sample_ids[tok.owner[t_idx]])
        ds["top_token_position"] = (("component", "rank_token"), tok.position[t_idx])
        ds["top_token_score"] = (("component", "rank_token"), t_val)
        ds = ds.assign_coords(rank_token=np.arange(t_idx.shape[1]))
    rows = "tokens" if layer.tokens is not None else "positions" if layer.map_shape else "samples"
    ds.attrs.update({"layer": layer.name, "k": int(f.components.shape[0]), "k_requested": spec.k,
                     "top_score": score_kind, "rows": rows, "shift": float(shift)})
    if method == "pca":
        curve = np.asarray(f.metrics["explained_variance_curve"])
        ds["explained_variance_curve"] = ("rank_curve", curve)
        ds = ds.assign_coords(rank_curve=np.arange(1, len(curve) + 1))
    return ds


def stability_subset(layer: LayerData, spec: FactorizeSpec) -> np.ndarray | None:
    """Rows of the layer's matrix used by the seed-stability refits: a fixed random subset
    of at most ``spec.stability_rows`` (drawn from ``spec.random_state``), or ``None`` = all."""
    n = layer.matrix.shape[0]
    if not spec.stability_rows or n <= spec.stability_rows:
        return None
    return random_subset(n, spec.stability_rows, spec.random_state)


def add_token_text(ds: xr.Dataset, ref: ActivationsRef, layer: LayerData) -> None:
    """The strings of the top tokens: ``top_token_text``, their sentence ``top_token_sentence``
    and the token's character span in it ``top_token_char_start``/``_end`` (``(component,
    rank_token)``; span ``(0, 0)`` for special tokens such as ``[CLS]``), read from the token
    text the model stage stored (:func:`zooaudit.stages.controls.run_token_text`: the model
    source's tokenizer). A token count that disagrees with the stored one is an error."""
    samples = ds["top_token_sample"].values
    positions = ds["top_token_position"].values
    control = ref.controls.get("tokens")
    if control is None:
        raise ZooauditError(f"The token text of {ref.model_uri!r} on {ref.ds_key!r} was not extracted; rerun the "
                            "audit (the model stage stores it beside all-tokens layers).")
    text_ds = ref.repository.open(control.group, control.snapshot).load()
    where = {int(s): i for i, s in enumerate(text_ds["sample"].values)}
    offset, n_tok = text_ds["token_offset"].values, text_ds["token_count"].values
    has_tokens = bool(text_ds.attrs.get("tokenizer", True))
    count = dict(zip(layer.tokens.sample_ids.tolist(), layer.tokens.count.tolist()))
    text = np.empty(samples.shape, object)
    sent = np.empty(samples.shape, object)
    lo, hi = np.zeros(samples.shape, np.int64), np.zeros(samples.shape, np.int64)
    for idx in np.ndindex(samples.shape):
        s, p = int(samples[idx]), int(positions[idx])
        i = where[s]
        if has_tokens and int(n_tok[i]) != count[s]:
            raise ZooauditError(f"Sample {s} of layer {layer.name!r}: the tokenizer of {ref.model_uri!r} gives "
                                f"{int(n_tok[i])} tokens but {count[s]} were stored; the model or dataset changed "
                                "since extraction — rerun the activations stage.")
        row = int(offset[i]) + p
        text[idx] = str(text_ds["token_text"].values[row]) if has_tokens else f"#{p}"
        sent[idx] = str(text_ds["text"].values[i])
        lo[idx], hi[idx] = (int(text_ds["char_start"].values[row]), int(text_ds["char_end"].values[row])) \
            if has_tokens else (0, 0)
    dims = ("component", "rank_token")
    ds["top_token_text"] = (dims, text.astype(str))
    ds["top_token_sentence"] = (dims, sent.astype(str))
    ds["top_token_char_start"] = (dims, lo)
    ds["top_token_char_end"] = (dims, hi)


def _add_stability(ds: xr.Dataset, method: str, layer: LayerData, f, spec, device, codes, shift) -> None:
    seeds = list(dict.fromkeys(spec.seeds))
    if len(seeds) < 2:
        return
    A = layer.matrix - shift if shift else layer.matrix
    rows = stability_subset(layer, spec)
    opts = _method_options(method, spec, device, codes if rows is None else "numpy", layer.k)
    s = stability(method, A, f.components.shape[0], seeds, name=layer.name, reference=f.components, rows=rows,
                  **opts)
    ds["stability_pairwise"] = (("seed", "seed_b"), s.pairwise)
    ds["stability_per_component"] = ("component", s.per_component)
    ds.coords["seed"] = list(s.seeds)
    ds.coords["seed_b"] = list(s.seeds)
    ds.attrs.update({"stability_mean": s.mean, "stability_min": s.min, "stability_rows": s.rows,
                     "stability_subset": "all rows" if rows is None else
                     f"random {s.rows} of {A.shape[0]} rows (seed {spec.random_state}); stored fit on all rows"})


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
                 name=layer.name, stability_rows=stability_subset(layer, spec), **opts)
    for var in sw.data_vars:
        ds[f"sweep_{var}"] = ("k_sweep", sw[var].values)
    ds.coords["k_sweep"] = ks


def _eigencam_dataset(layer: LayerData, sample_ids: np.ndarray) -> xr.Dataset:
    """Per-image Eigen-CAM maps ``(sample, y, x)``, computed chunk by chunk."""
    data = layer.acts.data
    if hasattr(data, "dask"):
        data = data.rechunk({1: -1, 2: -1, 3: -1})
        # a partial of a module-level function, not a lambda: the graph must pickle when a
        # distributed scheduler is the default one (the stage runs on a Dask worker)
        maps = data.map_blocks(functools.partial(fact_mod.eigencam, name=layer.name), drop_axis=1,
                               dtype=np.float64)
    else:
        maps = fact_mod.eigencam(np.asarray(data), name=layer.name)
    ds = xr.Dataset({"heatmap": (("sample", "y", "x"), maps)}, coords={"sample": sample_ids})
    ds.attrs.update({"layer": layer.name, "method": "eigencam",
                     "sign": "positive correlation with the centred channel-sum map"})
    return ds


def factorize_key(target, fspec: FactorizeSpec) -> str:
    """Cache key of the factorize stage of ``target`` (plan or reference) with ``fspec``."""
    return cache_key("factorize", activations=target.cache_key, **fspec.model_dump())


def run_factorize(ref: ActivationsRef, spec: FactorizeSpec, run_id: str | None = None) -> StageResult:
    """Every requested method on every layer, with quality, stability, sweep and top samples; one commit."""
    key = factorize_key(ref, spec)
    if (snap := ref.repository.find(key)) is not None:
        return skipped("factorize", ref, key, snap)
    session = ref.repository.session(ref.snapshot)
    layers = [inspect_layer(name, layout.open_activations(session.store, ref.ds_key, name), spec)
              if name in ref.sample_layers else inspect_token_layer(name, session.store, ref.ds_key, spec)
              for name in ref.layers]
    device = resolve_device(ref.device, cpu_as_none=True, missing_cuda="defer")
    results: dict[tuple[str, str], xr.Dataset] = {}
    ev: dict = {}
    stab: dict = {}
    for layer in layers:
        sample_ids = layer.sample_ids
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
            if layer.tokens is not None:
                add_token_text(ds, ref, layer)
            ds.attrs["requested_method"] = method
            _add_stability(ds, fit_as, layer, f, spec, device, codes, shift)
            _add_sweep(ds, fit_as, layer, spec, device, codes, shift)
            results[(layer.name, fit_as)] = ds
            ev[f"{layer.name}/{fit_as}"] = round(float(f.metrics["explained_variance"]), 6)
            if "stability_mean" in ds.attrs:
                stab[f"{layer.name}/{fit_as}"] = round(float(ds.attrs["stability_mean"]), 6)

    def write(s):
        for (layer_name, method), ds in results.items():
            write_dataset(s, ds, layout.factors_group(ref.ds_key, layer_name, method))

    summary = {"explained_variance": ev, "stability": stab,
               "groups": {f"{ln}/{m}": layout.factors_group(ref.ds_key, ln, m) for ln, m in results},
               "k": {layer.name: layer.k for layer in layers}}
    return commit_stage(ref, "factorize", key, spec.model_dump(), write, summary, run_id)
