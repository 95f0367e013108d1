"""The HTML report of a run: CKA heat maps, explained-variance curves, bias tables.

Written under ``<store>/reports/<run-id>/`` (``index.html``, PNG figures and a
``manifest.json`` with the spec and every stage's cache key and snapshot).
Reports are never overwritten: an existing run folder is an error. A run whose inputs
are exactly those of an earlier report (same spec, every stage at the same cache key and
snapshot — a warm nightly rerun with no zoo change) reuses that report and writes
nothing: ``<store>/reports/by-key/<key>`` names the folder rendered for each input key.
"""

from __future__ import annotations

import datetime as dt
import html
import json

import xarray as xr

from .. import layout
from ..analysis.metrics import metric_kind
from ..errors import ZooauditError
from ..keys import cache_key, slug_key
from ..store import Store
from .attribution import attribution_section
from .bias import bias_section, shortcut_sweep_section
from .bias_measures import bias_measures_section, measures_sweep_section, zoo_measures_table
from .factorize import factorize_section
from .figures import heatmap_png, trend_png
from .summary import CONTROL_LABELS


def _open(repo, snapshot, group):
    return xr.open_zarr(repo.readonly_session(snapshot_id=snapshot).store, group=group, consolidated=False,
                        zarr_format=3).load()


def _open_lazy(repo, snapshot, group):
    """Like ``_open`` without loading: factorizations hold (sample, ...) codes and heat maps."""
    return xr.open_zarr(repo.readonly_session(snapshot_id=snapshot).store, group=group, consolidated=False,
                        zarr_format=3)


def _layer_similarity_section(repo, plan, result, base: str, model: str, files: dict) -> list[str]:
    """Heat maps of each metric's layer × layer matrix beside its control."""
    out = []
    metrics = [m for m in result.summary if isinstance(result.summary[m], dict)]
    for metric in metrics:
        ds = _open(repo, result.snapshot, layout.similarity_group(plan.ds_key, metric))
        kind = ds.attrs.get("kind", metric_kind(metric))
        name = f"{base}-{metric}.png"
        files[name] = heatmap_png(ds["value"], f"layer × layer {metric} (n={ds.attrs.get('n')}) — {model}", kind=kind)
        out.append(f"<img src='{name}'>")
        if "control" in ds:
            cname = f"{base}-{metric}-control.png"
            files[cname] = heatmap_png(ds["control"], f"control ({ds.attrs.get('control')}, "
                                       f"n={ds.attrs.get('control_n')}) — {metric}", kind=kind)
            out.append(f"<img src='{cname}'>")
    return out


def _zoo_section(store, z, files: dict) -> list[str]:
    """Model × model heat maps per compare layer, or revision trends per family."""
    out = []
    repo = store.zoo_repo()
    if z.stage == "zoo-similarity":
        for metric, group in z.summary["groups"].items():
            ds = _open(repo, z.snapshot, group)
            kind = ds.attrs.get("kind", metric_kind(metric))
            for layer in ds["value"]["layer_a"].values:
                imgs = []
                for var in ("value", "control"):
                    if var not in ds:
                        continue
                    mat = ds[var].sel(layer_a=layer, layer_b=layer)
                    mat = mat.dropna("model_a", how="all").dropna("model_b", how="all")
                    name = f"zoo-{z.dataset}-{metric}-{layer}{'-control' if var == 'control' else ''}.png"
                    label = (f"model × model {metric} — layer {layer} on {z.dataset}" if var == "value" else
                             f"control ({CONTROL_LABELS.get(ds.attrs.get('control'), 'control')}, "
                             f"n={ds.attrs.get('control_n')}) — {metric}, layer {layer}")
                    files[name] = heatmap_png(mat, label, kind=kind)
                    imgs.append(f"<img src='{name}'>")
                out.append(f"<h2>Zoo: model × model {html.escape(metric)}, layer {html.escape(str(layer))}, "
                           f"on {html.escape(z.dataset)}</h2>" + "".join(imgs))
    elif z.stage == "revision-similarity":
        for family, per_metric in z.summary["families"].items():
            for metric, info in per_metric.items():
                value = _open(repo, z.snapshot, info["group"])["value"]
                value.attrs["metric"] = metric
                name = f"revisions-{z.dataset}-{slug_key(family, 32)}-{metric}.png"
                files[name] = trend_png(value, f"{family}: {metric} between consecutive checkpoints")
                out.append(f"<h2>Revisions of {html.escape(family)} ({html.escape(metric)})</h2><img src='{name}'>")
    return out


def build_report(store_url: str, spec: dict, audits, zoo_results, run_id: str | None = None) -> str:
    """Render the run's report; return the path/URL of its ``index.html``.

    Reuses (and returns) an earlier report rendered from the same inputs instead of
    rendering it again (see the module docstring)."""
    store = Store(store_url)
    fs = store.fs
    inputs = report_key(spec, audits, zoo_results)
    marker = store.path("reports", "by-key", inputs)
    if fs.exists(marker):
        earlier = fs.cat_file(marker).decode().strip()
        if fs.exists(earlier):
            return earlier
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    run = f"{stamp}-{(run_id or 'local')[:8]}"
    folder = store.path("reports", run)
    if fs.exists(folder):
        raise ZooauditError(f"Report folder {folder} already exists; reports are never overwritten.")
    files: dict[str, bytes] = {}
    body: list[str] = []
    manifest = {"run": run, "flow_run_id": run_id, "spec": spec, "models": [], "zoo": []}

    for z in zoo_results:
        body.extend(_zoo_section(store, z, files))
        manifest["zoo"].append({"stage": z.stage, "dataset": z.dataset, "cache_key": z.cache_key,
                                "snapshot": z.snapshot})

    for audit in audits:
        repo = store.model_repo(audit.refs[0].model_key) if audit.refs else None
        body.append(f"<h2>Model {html.escape(audit.model)}</h2>")
        manifest["models"].append({"model": audit.model, "stages": [r.to_dict() for r in audit.results]})
        for plan in audit.refs:
            res = {r.stage: r for r in audit.results if r.dataset == plan.ds_key}
            body.append(f"<h3>{html.escape(plan.dataset.name)} <small>({plan.ds_key}, "
                        f"{plan.n_samples} samples)</small></h3>")
            base = f"{plan.model_key}-{plan.ds_key}"
            if "similarity" in res:
                body.extend(_layer_similarity_section(repo, plan, res["similarity"], base, audit.model, files))
            if "factorize" in res:
                body.extend(factorize_section(lambda g, _s=res["factorize"].snapshot, _r=repo: _open_lazy(_r, _s, g), plan,
                                              res["factorize"], base, audit.model, files))
            if "bias" in res:
                body.extend(bias_section(lambda g, _s=res["bias"].snapshot, _r=repo: _open(_r, _s, g), plan,
                                         res["bias"], base, files))
            if "attribution" in res:
                body.extend(attribution_section(lambda g, _s=res["attribution"].snapshot, _r=repo: _open(_r, _s, g),
                                                plan, res["attribution"], base, files))
            if "bias" in res or "bias-features" in res:
                body.extend(bias_measures_section(lambda g, s, _r=repo: _open_lazy(_r, s, g), plan, res.get("bias"),
                                                  res.get("bias-features"), base, files))

    body.extend(shortcut_sweep_section(audits, files))
    body.extend(measures_sweep_section(audits, files))
    body.extend(zoo_measures_table(audits))

    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>zooaudit report</title><style>"
        "body{font-family:sans-serif;margin:2em;max-width:1100px}img{max-width:48%;margin:4px}"
        "table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}"
        "tr.cell td{color:#555}</style></head><body>"
        f"<h1>zooaudit report</h1><p>run {html.escape(run)} · {len(audits)} models</p>"
        + "".join(body) + "</body></html>"
    )
    files["index.html"] = page.encode()
    files["manifest.json"] = json.dumps(manifest, indent=2, default=str).encode()
    for name, data in files.items():
        with fs.open(f"{folder}/{name}", "wb") as fh:
            fh.write(data)
    # Written last: a crash mid-render leaves no marker, so the next run renders afresh.
    with fs.open(marker, "wb") as fh:
        fh.write(f"{folder}/index.html".encode())
    return f"{folder}/index.html"


def report_key(spec: dict, audits, zoo_results) -> str:
    """Content key of a report's inputs: the spec and every (stage, dataset, cache key,
    snapshot) it shows. Equal keys render equal reports (up to the run stamp)."""
    stages = [[a.model, r.stage, r.dataset, r.cache_key, r.snapshot] for a in audits for r in a.results]
    zoo = [[z.stage, z.dataset, z.cache_key, z.snapshot] for z in zoo_results]
    return cache_key("report", spec=spec, stages=stages, zoo=zoo)
