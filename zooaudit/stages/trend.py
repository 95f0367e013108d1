"""Checkpoint trends and drift: zoo-level array stages over committed results.

- **Checkpoint trend** (written by a checkpoint backfill): for each model family and
  dataset, against the checkpoint (epoch):
    ``cka (checkpoint, layer)``                linear CKA of each layer to the *final* checkpoint's
                                               same layer, on the same samples;
    ``explained_variance (checkpoint, layer)`` PCA explained variance at the spec's fixed ``k``;
    ``worst_group_accuracy (checkpoint, attribute)`` on datasets with group attributes.
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
from ..specs import BiasSpec, FactorizeSpec
from ..store import Repository, commit_metadata, write_dataset
from .refs import ActivationsRef, StageResult


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


def checkpoint_trend(plans: list[ActivationsRef], fspec: FactorizeSpec, bspec: BiasSpec,
                     family: str | None = None) -> xr.Dataset:
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
        fac = _stage_summary(repos[p.model_uri], cache_key("factorize", activations=p.cache_key, **fspec.model_dump()),
                             "factorization", p.model_uri).get("explained_variance", {})
        for j, layer in enumerate(layers):
            v = fac.get(f"{layer}/pca")
            ev[i, j] = v if isinstance(v, (int, float)) else np.nan
    coords = {"checkpoint": [p.model_uri for p in plans], "epoch": ("checkpoint", [str(p.revision) for p in plans]),
              "layer": layers}
    data = {"cka": (("checkpoint", "layer"), cka), "explained_variance": (("checkpoint", "layer"), ev)}
    if final.has_groups and final.n_outputs is not None:
        per = [_stage_summary(repos[p.model_uri], cache_key("bias", activations=p.cache_key, **bspec.model_dump()), "bias audit",
                              p.model_uri) for p in plans]
        attrs = sorted({a for s in per for a in s})
        coords["attribute"] = attrs
        data["worst_group_accuracy"] = (("checkpoint", "attribute"), np.array(
            [[float(s.get(a, {}).get("worst_group_accuracy", np.nan)) for a in attrs] for s in per]).reshape(
                len(plans), len(attrs)))
    return xr.Dataset(data, coords=coords, attrs={
        "family": family or final.family, "reference": final.model_uri, "dataset": final.ds_key, "k": fspec.k,
        "metric": "linear_cka"})


def run_checkpoint_trend(plans: list[ActivationsRef], fspec: FactorizeSpec, bspec: BiasSpec,
                         run_id: str | None = None, family: str | None = None) -> StageResult:
    """Compute one family's trend on one dataset and commit it to the zoo repository (skipped when
    the same checkpoints and parameters were committed before)."""
    final = plans[-1]
    family = family or final.family
    key = cache_key("checkpoint-trend", checkpoints=[(p.model_uri, p.cache_key) for p in plans],
                    factorize=fspec.model_dump(), bias=bspec.model_dump())
    repository = Repository.zoo(final.store)
    if (snap := repository.find(key)) is not None:
        return StageResult("checkpoint-trend", family, final.ds_key, key, snap, True, repository.summary(snap))
    ds = checkpoint_trend(plans, fspec, bspec, family)
    group = trend_group(final.ds_key, family)
    summary = {"group": group, "family": family, "checkpoints": ds["checkpoint"].values.tolist(),
               "cka": _rounded(ds["cka"]), "explained_variance": _rounded(ds["explained_variance"])}
    if "worst_group_accuracy" in ds:
        summary["worst_group_accuracy"] = _rounded(ds["worst_group_accuracy"])
    meta = commit_metadata("checkpoint-trend", key, {"factorize": fspec.model_dump(), "bias": bspec.model_dump()},
                           dataset=final.dataset_meta, models=[p.model_uri for p in plans], flow_run_id=run_id,
                           summary=summary)
    snap = repository.commit(lambda s: write_dataset(s, ds, group),
                             message=f"checkpoint trend of {family} on {final.ds_key}", metadata=meta)
    return StageResult("checkpoint-trend", family, final.ds_key, key, snap, False, summary)


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
