"""Checkpoint trends and drift: zoo-level array stages over committed results.

- **Checkpoint trend** (written by a checkpoint backfill): for each model family and
  dataset, against the checkpoint (epoch):
    ``cka (checkpoint, layer)``                linear CKA of each layer to the *final* checkpoint's
                                               same layer, on the same samples;
    ``explained_variance (checkpoint, layer)`` PCA explained variance at the spec's fixed ``k``;
    ``worst_group_accuracy (checkpoint, attribute)`` on datasets with group attributes;
  with a :class:`~zooaudit.specs.StatisticsSpec` (the statistics stage committed per checkpoint):
    ``activation_ratio``, ``dead_fraction``, ``effective_rank``, ``max_to_median`` ``(checkpoint, layer)``,
    ``massive_first_epoch (layer)`` (the first checkpoint with a massive activation, "" if none),
    ``nc1``, ``nc4`` ``(checkpoint, nc_layer)`` on labelled datasets.
  Committed (cache-keyed: a rerun commits nothing) to the zoo repository under
  ``<ds>/trend/<family>``; :mod:`zooaudit.report.trend` plots it (reports only read).
- **Drift to the previous version** (used by the nightly regression alert): per layer, the
  linear CKA between a model's newly committed activations and the ones committed before
  them for the same dataset.

Everything is read back from committed results (cache keys in commit metadata): nothing
is recomputed here except CKA. ``refs``: the :class:`~.refs.ActivationsRef` of each checkpoint.
"""

from __future__ import annotations

import math

import numpy as np
import xarray as xr

from .. import layout
from ..analysis.similarity import linear_cka
from ..errors import ZooauditError
from ..keys import cache_key, slug_key
from ..specs import BiasSpec, FactorizeSpec, StatisticsSpec
from ..store import Repository, commit_metadata, write_dataset
from .refs import ActivationsRef, StageResult
from .bias import bias_key
from .factorize import factorize_key


def trend_group(ds_key: str, family: str) -> str:
    """Group of one family's checkpoint trend in the zoo repository."""
    return f"{ds_key}/trend/{slug_key(family, 32)}"


def _matrix(ref: ActivationsRef, layer: str) -> np.ndarray:
    """``(n_samples, n_features)`` float64 activations of one layer of ``ref``."""
    session = ref.repository.session(ref.snapshot)
    return np.asarray(layout.as_matrix(layout.open_activations(session.store, ref.ds_key, layer)), dtype=np.float64)


def _stage_summary(repository: Repository, key: str, what: str, model: str) -> dict:
    snap = repository.find(key)
    if snap is None:
        raise ZooauditError(f"{what} of {model} is not committed (cache key {key}); audit the checkpoint first.")
    return repository.summary(snap)


def _statistics_trend(plans: list[ActivationsRef], layers: list[str], stats: StatisticsSpec) -> tuple[dict, dict]:
    """``(coords, data)`` of the statistics-stage trends (see the module docstring)."""
    from .statistics import statistics_key

    per = []
    for p in plans:
        key = statistics_key(p, stats)
        per.append({} if key is None else _stage_summary(p.repository, key, "activation statistics", p.model_uri))
    data = {}
    for var in ("activation_ratio", "dead_fraction", "effective_rank", "max_to_median"):
        data[var] = (("checkpoint", "layer"), np.array(
            [[_num(s.get(var, {}).get(l)) for l in layers] for s in per]).reshape(len(plans), len(layers)))
    first = []
    for l in layers:
        hits = [str(p.revision) for p, s in zip(plans, per) if (s.get("n_massive_units", {}).get(l) or 0) > 0]
        first.append(hits[0] if hits else "")
    data["massive_first_epoch"] = ("layer", np.array(first, dtype=object))
    nc_layers = [l for l in (per[-1].get("collapse", {}).get("nc1") or {}) if all(
        l in (s.get("collapse", {}).get("nc1") or {}) for s in per)]
    coords = {}
    if nc_layers:
        coords["nc_layer"] = nc_layers
        for var in ("nc1", "nc4"):
            data[var] = (("checkpoint", "nc_layer"), np.array(
                [[_num(s["collapse"].get(var, {}).get(l)) for l in nc_layers] for s in per]))
    return coords, data


def _num(v) -> float:
    return float(v) if isinstance(v, (int, float)) else np.nan


def checkpoint_trend(plans: list[ActivationsRef], fspec: FactorizeSpec, bspec: BiasSpec,
                     family: str | None = None, stats: StatisticsSpec | None = None) -> xr.Dataset:
    """The trend of one family on one dataset.

    ``plans``: the family's checkpoints on the dataset, sorted oldest → newest (the
    last one is the reference); ``family`` names them (default: the URI without ``@revision``). Returns a Dataset over ``checkpoint`` (model URIs,
    with an ``epoch`` coordinate), ``layer`` (layers common to all checkpoints) and,
    for datasets with groups, ``attribute``.
    """
    if not plans:
        raise ZooauditError("checkpoint trend: no checkpoints given")
    final = plans[-1]
    layers = [l for l in final.layers if all(l in p.layers for p in plans)]
    repos = {p.model_uri: p.repository for p in plans}
    cka = np.full((len(plans), len(layers)), np.nan)
    ev = np.full((len(plans), len(layers)), np.nan)
    for j, layer in enumerate(layers):
        ref = _matrix(final, layer)
        for i, p in enumerate(plans):
            x = ref if p is final else _matrix(p, layer)
            cka[i, j] = linear_cka(x, ref)
    for i, p in enumerate(plans):
        fac = _stage_summary(repos[p.model_uri], factorize_key(p, fspec),
                             "factorization", p.model_uri).get("explained_variance", {})
        for j, layer in enumerate(layers):
            v = fac.get(f"{layer}/pca")
            ev[i, j] = v if isinstance(v, (int, float)) else np.nan
    coords = {"checkpoint": [p.model_uri for p in plans], "epoch": ("checkpoint", [str(p.revision) for p in plans]),
              "layer": layers}
    data = {"cka": (("checkpoint", "layer"), cka), "explained_variance": (("checkpoint", "layer"), ev)}
    if final.has_groups and final.n_outputs is not None:
        per = [_stage_summary(repos[p.model_uri], bias_key(p, bspec), "bias audit",
                              p.model_uri) for p in plans]
        attrs = sorted({a for s in per for a in s})
        coords["attribute"] = attrs
        data["worst_group_accuracy"] = (("checkpoint", "attribute"), np.array(
            [[float(s.get(a, {}).get("worst_group_accuracy", np.nan)) for a in attrs] for s in per]).reshape(
                len(plans), len(attrs)))
    if stats is not None and stats.enabled:
        more_coords, more = _statistics_trend(plans, layers, stats)
        coords.update(more_coords)
        data.update(more)
    return xr.Dataset(data, coords=coords, attrs={
        "family": family or final.family, "reference": final.model_uri, "dataset": final.ds_key, "k": fspec.k,
        "metric": "linear_cka"})


def run_checkpoint_trend(plans: list[ActivationsRef], fspec: FactorizeSpec, bspec: BiasSpec,
                         run_id: str | None = None, family: str | None = None,
                         stats: StatisticsSpec | None = None) -> StageResult:
    """Compute one family's trend on one dataset and commit it to the zoo repository (skipped when
    the same checkpoints and parameters were committed before). ``stats``: also the trends of the
    statistics stage (it must be committed for every checkpoint)."""
    final = plans[-1]
    family = family or final.family
    with_stats = {"statistics": stats.model_dump()} if stats is not None and stats.enabled else {}
    key = cache_key("checkpoint-trend", checkpoints=[(p.model_uri, p.cache_key) for p in plans],
                    factorize=fspec.model_dump(), bias=bspec.model_dump(), **with_stats)
    repository = Repository.zoo(final.store)
    if (snap := repository.find(key)) is not None:
        return StageResult("checkpoint-trend", family, final.ds_key, key, snap, True, repository.summary(snap))
    ds = checkpoint_trend(plans, fspec, bspec, family, stats)
    group = trend_group(final.ds_key, family)
    summary = {"group": group, "family": family, "checkpoints": ds["checkpoint"].values.tolist(),
               "cka": _rounded(ds["cka"]), "explained_variance": _rounded(ds["explained_variance"])}
    for var in ("worst_group_accuracy", "activation_ratio", "dead_fraction", "effective_rank", "nc1", "nc4"):
        if var in ds:
            summary[var] = _rounded(ds[var])
    if "massive_first_epoch" in ds:
        summary["massive_first_epoch"] = dict(zip(ds["layer"].values.tolist(),
                                                  ds["massive_first_epoch"].values.tolist()))
    meta = commit_metadata("checkpoint-trend", key, {"factorize": fspec.model_dump(), "bias": bspec.model_dump(),
                                                     **with_stats},
                           dataset=final.dataset_meta, models=[p.model_uri for p in plans], flow_run_id=run_id,
                           summary=summary)
    snap, new = repository.commit_once(lambda s: write_dataset(s, ds, group),
                                       message=f"checkpoint trend of {family} on {final.ds_key}", metadata=meta)
    return StageResult("checkpoint-trend", family, final.ds_key, key, snap, not new, summary)


def _rounded(da: xr.DataArray) -> dict:
    """``{column label: [value per checkpoint]}`` (NaN → None) for commit metadata."""
    col = da.dims[1]
    return {str(c): [None if not math.isfinite(v) else round(float(v), 6) for v in da.sel({col: c}).values]
            for c in da[col].values}


def drift_to_previous(plan: ActivationsRef, snapshot: str | None = None, *,
                      controls: dict[str, float] | None = None,
                      random_state: int = 0) -> tuple[str, dict[str, float]] | None:
    """Per layer, linear CKA between the activations committed at ``snapshot`` and the most recent
    earlier activations of the same model on the same dataset (same sample ids and layer).

    Returns ``(previous snapshot, {layer: cka})``, or None when there is no earlier version
    (a model's first audit) or its samples differ. When ``controls`` is a dict it receives, per
    layer, the same CKA with the earlier activations' samples shuffled (seeded by
    ``random_state``): what the number reads for unrelated representations of the same shape.
    """
    snapshot = snapshot or plan.snapshot
    repo = plan.repository.icechunk
    previous = None
    for info in repo.ancestry(branch="main"):
        meta = info.metadata or {}
        if meta.get("stage") == "activations" and meta.get("cache_key") != plan.cache_key and \
                meta.get("dataset") == plan.dataset_meta:
            previous = info.id
            break
    if previous is None:
        return None
    out = {}
    rng = np.random.default_rng(random_state)
    for layer in plan.layers:
        try:
            cur = layout.open_activations(repo.readonly_session(snapshot_id=snapshot).store, plan.ds_key, layer)
            old = layout.open_activations(repo.readonly_session(snapshot_id=previous).store, plan.ds_key, layer)
        except (FileNotFoundError, KeyError):
            continue
        if not np.array_equal(cur["sample"].values, old["sample"].values) or cur.shape[1:] != old.shape[1:]:
            continue
        a = np.asarray(layout.as_matrix(cur), dtype=np.float64)
        b = np.asarray(layout.as_matrix(old), dtype=np.float64)
        out[layer] = float(linear_cka(a, b))
        if controls is not None:
            controls[layer] = float(linear_cka(a, b[rng.permutation(len(b))]))
    return previous, out
