"""Headline metrics against a reference version of the same model.

- **Checkpoint trend** (written by a checkpoint backfill): for each model family and
  dataset, against the checkpoint (epoch):
    ``cka (checkpoint, layer)``                linear CKA of each layer to the *final* checkpoint's
                                               same layer, on the same samples;
    ``explained_variance (checkpoint, layer)`` PCA explained variance at the spec's fixed ``k``;
    ``worst_group_accuracy (checkpoint, attribute)`` on datasets with group attributes.
  Committed (cache-keyed: a rerun commits nothing) to the zoo repository under
  ``<ds>/trend/<family>`` and plotted in a report under ``<store>/reports/<run>/``.
- **Drift to the previous version** (used by the nightly regression alert): per layer, the
  linear CKA between a model's newly committed activations and the ones committed before
  them for the same dataset.

Everything is read back from committed results (cache keys in commit metadata):
nothing is recomputed here except CKA.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import math

import numpy as np
import xarray as xr

from .. import layout
from ..analysis.similarity import linear_cka
from ..errors import ZooauditError
from ..keys import cache_key, slug_key
from ..stages.common import ExtractionPlan, StageResult, _committed_summary
from ..store import Store, commit, commit_metadata, find_commit, write_dataset
from .figures import _png, plt


def trend_group(ds_key: str, family: str) -> str:
    """Group of one family's checkpoint trend in the zoo repository."""
    return f"{ds_key}/trend/{slug_key(family, 32)}"


def _matrix(repo, snapshot: str, ds_key: str, layer: str) -> np.ndarray:
    """``(n_samples, n_features)`` float64 activations of one layer at one snapshot."""
    session = repo.readonly_session(snapshot_id=snapshot)
    return np.asarray(layout.as_matrix(layout.open_activations(session.store, ds_key, layer)), dtype=np.float64)


def _stage_summary(repo, key: str, what: str, model: str) -> dict:
    snap = find_commit(repo, key)
    if snap is None:
        raise ZooauditError(f"{what} of {model} is not committed (cache key {key}); audit the checkpoint first.")
    return _committed_summary(repo, snap)


def checkpoint_trend(plans: list[ExtractionPlan], fspec: dict, bspec: dict, family: str | None = None) -> xr.Dataset:
    """The trend of one family on one dataset.

    ``plans``: the family's checkpoints on the dataset, sorted oldest → newest (the
    last one is the reference); ``family`` names them (default: the URI without ``@revision``). Returns a Dataset over ``checkpoint`` (model URIs,
    with an ``epoch`` coordinate), ``layer`` (layers common to all checkpoints) and,
    for datasets with groups, ``attribute``.
    """
    if not plans:
        raise ZooauditError("checkpoint trend: no checkpoints given")
    store = Store(plans[0].store)
    final = plans[-1]
    layers = [l for l in final.layers if all(l in p.layers for p in plans)]
    repos = {p.model_uri: store.model_repo(p.model_key) for p in plans}
    snaps = {}
    for p in plans:
        snaps[p.model_uri] = find_commit(repos[p.model_uri], p.cache_key)
        if snaps[p.model_uri] is None:
            raise ZooauditError(f"activations of {p.model_uri} on {p.ds_key} are not committed; audit it first.")
    cka = np.full((len(plans), len(layers)), np.nan)
    ev = np.full((len(plans), len(layers)), np.nan)
    for j, layer in enumerate(layers):
        ref = _matrix(repos[final.model_uri], snaps[final.model_uri], final.ds_key, layer)
        for i, p in enumerate(plans):
            x = ref if p is final else _matrix(repos[p.model_uri], snaps[p.model_uri], p.ds_key, layer)
            cka[i, j] = linear_cka(x, ref)
    for i, p in enumerate(plans):
        fac = _stage_summary(repos[p.model_uri], cache_key("factorize", activations=p.cache_key, **fspec),
                             "factorization", p.model_uri).get("explained_variance", {})
        for j, layer in enumerate(layers):
            v = fac.get(f"{layer}/pca")
            ev[i, j] = v if isinstance(v, (int, float)) else np.nan
    coords = {"checkpoint": [p.model_uri for p in plans], "epoch": ("checkpoint", [str(p.revision) for p in plans]),
              "layer": layers}
    data = {"cka": (("checkpoint", "layer"), cka), "explained_variance": (("checkpoint", "layer"), ev)}
    if final.has_groups and final.n_outputs is not None:
        per = [_stage_summary(repos[p.model_uri], cache_key("bias", activations=p.cache_key, **bspec), "bias audit",
                              p.model_uri) for p in plans]
        attrs = sorted({a for s in per for a in s})
        coords["attribute"] = attrs
        data["worst_group_accuracy"] = (("checkpoint", "attribute"), np.array(
            [[float(s.get(a, {}).get("worst_group_accuracy", np.nan)) for a in attrs] for s in per]).reshape(
                len(plans), len(attrs)))
    return xr.Dataset(data, coords=coords, attrs={
        "family": family or final.family, "reference": final.model_uri, "dataset": final.ds_key, "k": fspec["k"],
        "metric": "linear_cka"})


def run_checkpoint_trend(plans: list[ExtractionPlan], fspec: dict, bspec: dict,
                         run_id: str | None = None, family: str | None = None) -> StageResult:
    """Compute one family's trend on one dataset and commit it to the zoo repository (skipped when
    the same checkpoints and parameters were committed before)."""
    store = Store(plans[0].store)
    final = plans[-1]
    family = family or final.family
    key = cache_key("checkpoint-trend", checkpoints=[(p.model_uri, p.cache_key) for p in plans],
                    factorize=fspec, bias=bspec)
    repo = store.zoo_repo()
    if (snap := find_commit(repo, key)) is not None:
        return StageResult("checkpoint-trend", family, final.ds_key, key, snap, True,
                           _committed_summary(repo, snap))
    ds = checkpoint_trend(plans, fspec, bspec, family)
    group = trend_group(final.ds_key, family)
    summary = {"group": group, "family": family, "checkpoints": ds["checkpoint"].values.tolist(),
               "cka": _rounded(ds["cka"]), "explained_variance": _rounded(ds["explained_variance"])}
    if "worst_group_accuracy" in ds:
        summary["worst_group_accuracy"] = _rounded(ds["worst_group_accuracy"])
    meta = commit_metadata("checkpoint-trend", key, {"factorize": fspec, "bias": bspec}, dataset=final.dataset,
                           models=[p.model_uri for p in plans], flow_run_id=run_id, summary=summary)
    snap = commit(store, "zoo", repo, lambda s: write_dataset(s, ds, group),
                  message=f"checkpoint trend of {family} on {final.ds_key}", metadata=meta)
    return StageResult("checkpoint-trend", family, final.ds_key, key, snap, False, summary)


def _rounded(da: xr.DataArray) -> dict:
    """``{column label: [value per checkpoint]}`` (NaN → None) for commit metadata."""
    col = da.dims[1]
    return {str(c): [None if not math.isfinite(v) else round(float(v), 6) for v in da.sel({col: c}).values]
            for c in da[col].values}


def trend_png(ds: xr.Dataset, title: str) -> bytes:
    """Three panels against the checkpoint: CKA to the final checkpoint, explained variance at k,
    worst-group accuracy (when the dataset has groups)."""
    panels = [("cka", "layer", f"linear CKA to {ds.attrs['reference'].split(':', 1)[-1]}"),
              ("explained_variance", "layer", f"PCA explained variance (k={ds.attrs['k']})")]
    if "worst_group_accuracy" in ds:
        panels.append(("worst_group_accuracy", "attribute", "worst-group accuracy"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    x = [str(e) for e in ds["epoch"].values]
    for ax, (var, col, label) in zip(axes[0], panels):
        for c in ds[col].values:
            ax.plot(x, ds[var].sel({col: c}).values, marker="o", label=str(c))
        ax.set_xlabel("checkpoint (epoch)")
        ax.set_ylabel(label, fontsize=8)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return _png(fig)


def trend_report(store_url: str, results: list[StageResult], spec: dict, run_id: str | None = None) -> str:
    """Write the backfill's trend report (``index.html``, one PNG per family × dataset and a
    ``manifest.json``) under ``<store>/reports/<run>/``; return the ``index.html`` location."""
    store = Store(store_url)
    run = f"{dt.datetime.now(dt.UTC).strftime('%Y%m%dT%H%M%SZ')}-backfill-{(run_id or 'local')[:8]}"
    folder = store.path("reports", run)
    fs = store.fs
    if fs.exists(folder):
        raise ZooauditError(f"Report folder {folder} already exists; reports are never overwritten.")
    repo = store.zoo_repo()
    files: dict[str, bytes] = {}
    body = []
    for r in results:
        ds = xr.open_zarr(repo.readonly_session(snapshot_id=r.snapshot).store, group=r.summary["group"],
                          consolidated=False, zarr_format=3).load()
        name = f"trend-{slug_key(r.model, 32)}-{r.dataset}.png"
        files[name] = trend_png(ds, f"{r.model} on {r.dataset}: headline metrics against the checkpoint")
        rows = "".join(
            f"<tr><td>{html.escape(str(c))}</td><td>{html.escape(str(e))}</td>"
            + "".join(f"<td>{float(ds['cka'].sel(checkpoint=c, layer=l)):.4f}</td>" for l in ds["layer"].values)
            + "</tr>" for c, e in zip(ds["checkpoint"].values, ds["epoch"].values))
        head = "".join(f"<th>CKA {html.escape(str(l))}</th>" for l in ds["layer"].values)
        body.append(f"<h2>{html.escape(r.model)} on {html.escape(r.dataset)}</h2><img src='{name}'>"
                    f"<table><tr><th>checkpoint</th><th>epoch</th>{head}</tr>{rows}</table>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>zooaudit backfill trend</title><style>"
            "body{font-family:sans-serif;margin:2em;max-width:1200px}img{max-width:100%}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}"
            f"</style></head><body><h1>zooaudit backfill: checkpoint trends</h1><p>run {html.escape(run)}</p>"
            + "".join(body) + "</body></html>")
    files["index.html"] = page.encode()
    files["manifest.json"] = json.dumps({"run": run, "flow_run_id": run_id, "spec": spec,
                                         "trends": [r.to_dict() for r in results]}, indent=2, default=str).encode()
    for name, data in files.items():
        with fs.open(f"{folder}/{name}", "wb") as fh:
            fh.write(data)
    return f"{folder}/index.html"


def drift_to_previous(plan: ExtractionPlan, snapshot: str) -> tuple[str, dict[str, float]] | None:
    """Per layer, linear CKA between the activations committed at ``snapshot`` and the most recent
    earlier activations of the same model on the same dataset (same sample ids and layer).

    Returns ``(previous snapshot, {layer: cka})``, or None when there is no earlier version
    (a model's first audit) or its samples differ.
    """
    store = Store(plan.store)
    repo = store.model_repo(plan.model_key)
    previous = None
    for info in repo.ancestry(branch="main"):
        meta = info.metadata or {}
        if meta.get("stage") == "activations" and meta.get("cache_key") != plan.cache_key and \
                meta.get("dataset") == plan.dataset:
            previous = info.id
            break
    if previous is None:
        return None
    out = {}
    for layer in plan.layers:
        try:
            cur = layout.open_activations(repo.readonly_session(snapshot_id=snapshot).store, plan.ds_key, layer)
            old = layout.open_activations(repo.readonly_session(snapshot_id=previous).store, plan.ds_key, layer)
        except (FileNotFoundError, KeyError):
            continue
        if not np.array_equal(cur["sample"].values, old["sample"].values) or cur.shape[1:] != old.shape[1:]:
            continue
        out[layer] = float(linear_cka(np.asarray(layout.as_matrix(cur), dtype=np.float64),
                                      np.asarray(layout.as_matrix(old), dtype=np.float64)))
    return previous, out
