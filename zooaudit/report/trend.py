"""The backfill's trend report: one figure and table per family × dataset of the checkpoint
trends that :mod:`zooaudit.stages.trend` committed (CKA to the final checkpoint, explained
variance at k, worst-group accuracy), under ``<store>/reports/<run>/``. A report only reads.
"""

from __future__ import annotations

import datetime as dt
import html
import json

import xarray as xr

from ..errors import ZooauditError
from ..keys import slug_key
from ..stages.refs import StageResult
from ..store import Store
from .figures import checkpoint_panels_png
from .page import figure, frame, open_line, table, with_image_sizes
from .statistics import statistics_trend_section


def trend_png(ds: xr.Dataset, title: str) -> bytes:
    """Three panels against the checkpoint: CKA to the final checkpoint, explained variance at k,
    worst-group accuracy (when the dataset has groups)."""
    panels = [("cka", "layer", f"linear CKA to {ds.attrs['reference'].split(':', 1)[-1]}"),
              ("explained_variance", "layer", f"PCA explained variance (k={ds.attrs['k']})")]
    if "worst_group_accuracy" in ds:
        panels.append(("worst_group_accuracy", "attribute", "worst-group accuracy"))
    return checkpoint_panels_png(ds, panels, title, ylim=(0, 1.02))


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
        rows = [[html.escape(str(c)), html.escape(str(e))] + [float(ds["cka"].sel(checkpoint=c, layer=l))
                                                             for l in ds["layer"].values]
                for c, e in zip(ds["checkpoint"].values, ds["epoch"].values)]
        body.append(f"<h2>{html.escape(r.model)} on {html.escape(r.dataset)}</h2>" + figure(
            name, f"Line charts of CKA to the final checkpoint, explained variance and worst-group accuracy against "
            f"the checkpoint of {r.model}", "against the checkpoint (epoch): linear CKA to the final checkpoint, PCA "
            "explained variance at k, worst-group accuracy (fractions, 0–1)",
            open_line=open_line(store.url, "zoo", r.summary["group"], r.snapshot), lazy=False)
            + table(["checkpoint", "epoch"] + [f"CKA {l}" for l in ds["layer"].values], rows, sortable=True))
        body.extend(statistics_trend_section(ds, name[:-4], files))
    page = frame("zooaudit backfill: checkpoint trends", "".join(body), subtitle=f"run {html.escape(run)}")
    files["index.html"] = with_image_sizes(page, files).encode()
    files["manifest.json"] = json.dumps({"run": run, "flow_run_id": run_id, "spec": spec,
                                         "trends": [r.to_dict() for r in results]}, indent=2, default=str).encode()
    for name, data in files.items():
        with fs.open(f"{folder}/{name}", "wb") as fh:
            fh.write(data)
    return f"{folder}/index.html"


