"""Zoo-level stages on one shared dataset.

- model × model: for every chosen metric, a ``(model_a, layer_a, model_b, layer_b)``
  array over the compare layers of every model audited on the dataset (linear
  CKA: all pairs from one joint pass over the data);
- revisions: for each model family with several checkpoints, the similarity of
  each layer between consecutive checkpoints, ``(step, layer)``.

Controls (``SimilaritySpec.control``), on at most ``control_max_samples`` samples:
``shuffle`` — model_a's layer against model_b's layer with the samples permuted;
``random_init`` — model_a's layer against the same layer of a random-initialised
copy of model_b (built by model_b's source from a fixed seed, recorded per
``model_b`` / per step as ``random_init_seed``) on the same samples; for revisions,
checkpoint a against a random-initialised copy of checkpoint b. The copies'
activations are the random-init controls the model stage extracted (:mod:`.controls`).

Array stages over several models: each takes the :class:`~.refs.ActivationsRef` of every
model on the dataset and commits to the zoo repository.

Sample ids must agree exactly across models: a mismatch is an error, never a
silent misalignment.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from itertools import pairwise

import numpy as np
import xarray as xr

from .. import layout
from ..analysis.metrics import SAMPLE_PAIR_METRICS, metric_kind
from ..analysis.similarity import similarity_matrices
from ..errors import ZooauditError
from ..keys import cache_key, slug_key
from ..specs import SimilaritySpec
from ..store import Repository, commit_metadata, write_dataset
from .common import read_rows, control_rows, random_subset
from .refs import ActivationsRef, StageResult
from .similarity import (
    metric_params,
    moments_device,
    shuffled_controls,
    similarity_with_subsets,
)

log = logging.getLogger("zooaudit.stages")


def zoo_similarity_group(ds_key: str, metric: str) -> str:
    """Group of the model × model array of ``metric`` in the zoo repository."""
    return f"{ds_key}/similarity/{metric}"


def revisions_group(ds_key: str, family: str, metric: str) -> str:
    return f"{ds_key}/revisions/{slug_key(family, 32)}/{metric}"


def _load_layers(refs: list[ActivationsRef], layers: list[str]) -> dict:
    """``{(model, layer): (n, p) array}`` with sample ids checked across models."""
    arrays, ids, first = {}, None, None
    for p in refs:
        session = p.repository.session(p.snapshot)
        for layer in (l for l in layers if l in p.sample_layers):
            acts = layout.open_activations(session.store, p.ds_key, layer)
            sid = acts["sample"].values
            if ids is not None and not np.array_equal(ids, sid):
                raise ZooauditError(
                    f"Models {first!r} and {p.model_uri!r} were audited on different samples of {p.ds_key!r}; "
                    "cross-model similarity needs identical sample ids in the same order.")
            ids, first = sid, first or p.model_uri
            arrays[(p.model_uri, layer)] = layout.as_matrix(acts)
    return arrays


def commit_zoo(repository: Repository, stage: str, key: str, params: dict, refs,
               results: dict[str, tuple[str, xr.Dataset]], summary: dict, run_id: str | None) -> StageResult:
    """Commit a zoo stage's ``{name: (group, Dataset)}`` to the zoo repository, one commit."""
    def write(s):
        for group, ds in results.values():
            write_dataset(s, ds, group)

    meta = commit_metadata(stage, key, params, dataset=refs[0].dataset_meta, models=[p.model_uri for p in refs],
                           flow_run_id=run_id, summary=summary)
    snap, new = repository.commit_once(write, message=f"{stage} on {refs[0].ds_key}", metadata=meta)
    return StageResult(stage, "zoo", refs[0].ds_key, key, snap, not new, summary)


def cached_zoo(repository: Repository, stage: str, ds_key: str, key: str, model: str = "zoo") -> StageResult | None:
    """The committed result of a zoo stage with cache ``key``, or None."""
    if (snap := repository.find(key)) is None:
        return None
    log.info("%s on %s: cache key %s already committed — skipped", stage, ds_key, key)
    return StageResult(stage, model, ds_key, key, snap, True, repository.summary(snap))


def _random_init_controls(refs: list[ActivationsRef], arrays: dict, metrics: list[str],
                          sspec: SimilaritySpec) -> tuple[dict, dict, list]:
    """Every ``(model, layer)`` array against the same layer of a random-initialised copy of
    every model, on one control subset: ``({metric: DataArray}, {metric: samples used},
    random_init_seed per model)``; coordinates ``"model|layer"`` on both sides."""
    n = next(iter(arrays.values())).shape[0]
    idx = random_subset(n, sspec.control_max_samples, np.random.default_rng(sspec.random_state))
    rows = {f"{m}|{l}": read_rows(a, idx) for (m, l), a in arrays.items()}
    other, seeds = {}, []
    for p in refs:
        mine = [l for (m, l) in arrays if m == p.model_uri]
        acts, provenance = control_rows(p, "random_init", mine, idx)
        other.update({f"control:{p.model_uri}|{l}": acts[l] for l in mine})
        seeds.append(provenance.get("random_init_seed", -1))
    mats, used = similarity_with_subsets(rows, other, metrics, sspec, device=refs[0].device)
    return {m: a.assign_coords(layer_b=list(rows)) for m, a in mats.items()}, used, seeds


def zoo_similarity_key(refs: list[ActivationsRef], layers: list[str], sspec: SimilaritySpec) -> str:
    return cache_key("zoo-similarity", dataset=refs[0].ds_hash, layers=layers, **sspec.model_dump(),
                     models=sorted((p.model_uri, p.cache_key) for p in refs))


def run_zoo_similarity(refs: list[ActivationsRef], layers: list[str], sspec: SimilaritySpec,
                       run_id: str | None = None) -> StageResult | None:
    """Model × model similarity of the compare ``layers`` for every metric, beside its
    control (see the module docstring; ``control='none'`` skips it); one commit.
    ``refs``: the activations of every model on one dataset."""
    refs = [p for p in refs if any(l in p.layers for l in layers)]
    if len(refs) < 2:
        return None
    repository = Repository.zoo(refs[0].store)
    ds_key = refs[0].ds_key
    metrics = sspec.metrics
    key = zoo_similarity_key(refs, layers, sspec)
    if (hit := cached_zoo(repository, "zoo-similarity", ds_key, key)) is not None:
        return hit
    arrays = _load_layers(refs, layers)
    models = [p.model_uri for p in refs]
    names = {f"{m}|{l}": a for (m, l), a in arrays.items()}
    results, summary = {}, {"models": models, "layers": layers, "groups": {}, "control_kind": sspec.control}
    def to_4d(full: xr.DataArray) -> xr.DataArray:
        value = np.full((len(models), len(layers), len(models), len(layers)), np.nan)
        for (ma, la) in arrays:
            for (mb, lb) in arrays:
                value[models.index(ma), layers.index(la), models.index(mb), layers.index(lb)] = float(
                    full.sel(layer_a=f"{ma}|{la}", layer_b=f"{mb}|{lb}"))
        return xr.DataArray(value, dims=("model_a", "layer_a", "model_b", "layer_b"),
                            coords={"model_a": models, "layer_a": layers, "model_b": models, "layer_b": layers})

    # streamed metrics: one joint pass over every model × layer for all of them
    values, used = similarity_with_subsets(names, None, metrics, sspec, device=refs[0].device)
    controls, ctrl_used, provenance = {}, {}, {}
    if sspec.control == "shuffle":
        controls, ctrl_used = shuffled_controls(names, metrics, sspec)
    elif sspec.control == "random_init":
        controls, ctrl_used, seeds = _random_init_controls(refs, arrays, metrics, sspec)
        provenance = {"random_init_seed": seeds}     # one per model_b
    for metric in metrics:
        data = {"value": to_4d(values[metric])}
        attrs = {"metric": metric, "dataset": ds_key, "control": "none", "n": used[metric],
                 "kind": values[metric].attrs.get("kind", "similarity")}
        if metric in controls:
            data["control"] = to_4d(controls[metric])
            attrs.update(control=sspec.control, control_n=ctrl_used[metric], **provenance)
        group = zoo_similarity_group(ds_key, metric)
        results[metric] = (group, xr.Dataset(data, attrs=attrs))
        summary["groups"][metric] = group
        summary[metric] = {l: data["value"].sel(layer_a=l, layer_b=l).values.round(6).tolist() for l in layers}
        if "control" in data:
            summary.setdefault("control", {})[metric] = {
                l: data["control"].sel(layer_a=l, layer_b=l).values.round(6).tolist() for l in layers}
    return commit_zoo(repository, "zoo-similarity", key, {"layers": layers, **sspec.model_dump()}, refs, results,
                      summary, run_id)


def _control_pair(xs: dict, ys: dict, sspec: SimilaritySpec, ref_b: ActivationsRef) -> tuple[dict, dict, dict]:
    """``(xs, ys, provenance)`` on the control subset: ys with its samples shuffled, or
    replaced by the same layers of a random-initialised copy of checkpoint b."""
    n = next(iter(xs.values())).shape[0]
    rng = np.random.default_rng(sspec.random_state)
    idx = random_subset(n, sspec.control_max_samples, rng)
    xs = {k: read_rows(v, idx) for k, v in xs.items()}
    if sspec.control == "random_init":
        ys, provenance = control_rows(ref_b, "random_init", list(ys), idx)
        return xs, ys, provenance
    perm = rng.permutation(len(idx))
    return xs, {k: read_rows(v, idx)[perm] for k, v in ys.items()}, {}


def _layerwise(xs: dict, ys: dict, metrics: list[str], sspec: SimilaritySpec, device: str | None = None) -> dict[str, np.ndarray]:
    """``{metric: (layers,) values}`` of each layer of ``xs`` against the same layer of ``ys``.
    Streamed metrics: all layers of both checkpoints in one joint pass, read off the
    diagonal (minibatch CKA: one sweep of minibatches); sample-pair metrics: layer by layer."""
    layers = list(xs)
    n = next(iter(xs.values())).shape[0]
    out = {}
    streamed = [m for m in metrics if m not in SAMPLE_PAIR_METRICS]
    if streamed:
        mats = similarity_matrices(xs, {f"b:{k}": v for k, v in ys.items()}, metrics=streamed,
                                   params=metric_params(streamed, sspec), device=moments_device(device))
        out.update({m: np.diag(mats[m].values).copy() for m in streamed})
    sample_pair = [m for m in metrics if m in SAMPLE_PAIR_METRICS]
    if sample_pair:
        idx = random_subset(n, sspec.pairwise_max_samples, sspec.random_state)
        per_layer = [similarity_matrices({l: read_rows(xs[l], idx)}, {l: read_rows(ys[l], idx)}, metrics=sample_pair)
                     for l in layers]
        out.update({m: np.array([float(r[m].values[0, 0]) for r in per_layer]) for m in sample_pair})
    return out


def revision_families(refs: list[ActivationsRef]) -> dict[str, list[ActivationsRef]]:
    """``{family: checkpoints sorted by revision}`` of the families with at least two checkpoints."""
    families = defaultdict(list)
    for p in refs:
        families[p.family].append(p)
    return {f: sorted(ps, key=lambda p: (isinstance(p.revision, str), p.revision))
            for f, ps in families.items() if len(ps) >= 2}


def run_revision_similarity(refs: list[ActivationsRef], sspec: SimilaritySpec,
                            run_id: str | None = None) -> StageResult | None:
    """Per layer, the similarity between consecutive checkpoints of each model family, beside its
    control (see the module docstring); one commit. ``refs``: every model on one dataset."""
    families = revision_families(refs)
    if not families:
        return None
    every = [p for ps in families.values() for p in ps]
    repository = Repository.zoo(every[0].store)
    ds_key = every[0].ds_key
    metrics = sspec.metrics
    key = cache_key("revision-similarity", dataset=every[0].ds_hash, **sspec.model_dump(),
                    models=sorted((p.model_uri, p.cache_key) for p in every))
    if (hit := cached_zoo(repository, "revision-similarity", ds_key, key)) is not None:
        return hit
    results, summary = {}, {"families": {}}
    for family, revs in families.items():
        layers = [l for l in revs[0].layers if all(l in r.layers for r in revs)]
        arrays = _load_layers(revs, layers)
        steps = [f"{a.revision}→{b.revision}" for a, b in pairwise(revs)]
        coords = {"step": steps, "layer": layers, "revision_a": ("step", [a.model_uri for a in revs[:-1]]),
                  "revision_b": ("step", [b.model_uri for b in revs[1:]])}
        kinds = ("value", "control") if sspec.control != "none" else ("value",)
        per_step = {kind: [] for kind in kinds}
        seeds = []
        for a, b in pairwise(revs):
            xs, ys = {l: arrays[(a.model_uri, l)] for l in layers}, {l: arrays[(b.model_uri, l)] for l in layers}
            per_step["value"].append(_layerwise(xs, ys, metrics, sspec, a.device))
            if "control" in per_step:
                cx, cy, provenance = _control_pair(xs, ys, sspec, b)
                per_step["control"].append(_layerwise(cx, cy, metrics, sspec, a.device))
                seeds.append(provenance.get("random_init_seed", -1))
        for metric in metrics:
            data = {kind: xr.DataArray([step[metric] for step in per_step[kind]], dims=("step", "layer"),
                                       coords=coords) for kind in kinds}
            attrs = {"family": family, "metric": metric, "control": sspec.control if "control" in data else "none",
                     "kind": metric_kind(metric)}
            if sspec.control == "random_init":
                attrs["random_init_seed"] = seeds          # one per step (of its checkpoint b)
            value = data["value"].values
            group = revisions_group(ds_key, family, metric)
            results[f"{family}/{metric}"] = (group, xr.Dataset(data, attrs=attrs))
            info = {"group": group, "steps": steps, "layers": layers, "value": value.round(6).tolist()}
            if "control" in data:
                info.update(control=data["control"].values.round(6).tolist(), control_kind=sspec.control)
            summary["families"].setdefault(family, {})[metric] = info
    return commit_zoo(repository, "revision-similarity", key, sspec.model_dump(), every, results, summary, run_id)
