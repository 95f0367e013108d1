"""The HTML report of a run: CKA heat maps, explained-variance curves, bias tables.

Written under ``<store>/reports/<run-id>/`` (``index.html``, PNG figures and a
``manifest.json`` with the spec and every stage's cache key and snapshot).
Reports are never overwritten: an existing run folder is an error.
"""

from __future__ import annotations

import datetime as dt
import html
import io
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import xarray as xr  # noqa: E402

from .. import layout  # noqa: E402
from ..errors import ZooauditError  # noqa: E402
from ..store import Store  # noqa: E402


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def heatmap_png(mat: xr.DataArray, title: str) -> bytes:
    """A labelled heat map of a 2-D similarity DataArray (values in [0, 1])."""
    a, b = mat.dims
    n = max(mat.sizes[a], mat.sizes[b])
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * n, 1.0 + 0.5 * n))
    im = ax.imshow(mat.values, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(mat.sizes[b]), [str(v).replace("builtin:", "") for v in mat[b].values], rotation=60,
                  ha="right", fontsize=8)
    ax.set_yticks(range(mat.sizes[a]), [str(v).replace("builtin:", "") for v in mat[a].values], fontsize=8)
    for i in range(mat.sizes[a]):
        for j in range(mat.sizes[b]):
            v = float(mat.values[i, j])
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _png(fig)


def curves_png(curves: dict[str, np.ndarray], title: str) -> bytes:
    """Cumulative explained variance of PCA against the number of components, one line per layer."""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name, curve in curves.items():
        ax.plot(np.arange(1, len(curve) + 1), curve, marker=".", label=name)
    ax.set_xlabel("components")
    ax.set_ylabel("explained variance")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    return _png(fig)


def _open(repo, snapshot, group):
    return xr.open_zarr(repo.readonly_session(snapshot_id=snapshot).store, group=group, consolidated=False,
                        zarr_format=3).load()


def _bias_rows(ds: xr.Dataset) -> list[str]:
    rows = []
    for i, g in enumerate(ds["group"].values):
        ci = ds["accuracy_ci"].values[i] if "accuracy_ci" in ds else (np.nan, np.nan)
        small = " (small)" if bool(ds["small"].values[i]) else ""
        rows.append(f"<tr><td>{html.escape(str(g))}</td><td>{ds['accuracy'].values[i]:.3f}</td>"
                    f"<td>[{ci[0]:.3f}, {ci[1]:.3f}]</td><td>{int(ds['count'].values[i])}{small}</td></tr>")
    for i, c in enumerate(ds["cell"].values):
        ci = ds["cell_accuracy_ci"].values[i] if "cell_accuracy_ci" in ds else (np.nan, np.nan)
        rows.append(f"<tr class=cell><td>{html.escape(str(c))}</td><td>{ds['cell_accuracy'].values[i]:.3f}</td>"
                    f"<td>[{ci[0]:.3f}, {ci[1]:.3f}]</td><td>{int(ds['cell_count'].values[i])}</td></tr>")
    return rows


def build_report(store_url: str, spec: dict, audits, zoo_results, run_id: str | None = None) -> str:
    """Render the run's report; return the path/URL of its ``index.html``."""
    store = Store(store_url)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    run = f"{stamp}-{(run_id or 'local')[:8]}"
    fs = store.fs
    folder = store.path("reports", run)
    if fs.exists(folder):
        raise ZooauditError(f"Report folder {folder} already exists; reports are never overwritten.")
    files: dict[str, bytes] = {}
    body: list[str] = []
    manifest = {"run": run, "flow_run_id": run_id, "spec": spec, "models": [], "zoo": []}

    for z in zoo_results:
        mat = _open(store.zoo_repo(), z.snapshot, z.summary["group"])["linear_cka"]
        name = f"zoo-{z.dataset}.png"
        files[name] = heatmap_png(mat, f"model × model linear CKA — layer {mat.attrs.get('layer')} on {z.dataset}")
        body.append(f"<h2>Zoo: model × model linear CKA on {html.escape(z.dataset)}</h2><img src='{name}'>")
        manifest["zoo"].append({"dataset": z.dataset, "cache_key": z.cache_key, "snapshot": z.snapshot})

    for audit in audits:
        repo = store.model_repo(audit.plans[0].model_key) if audit.plans else None
        body.append(f"<h2>Model {html.escape(audit.model)}</h2>")
        manifest["models"].append({"model": audit.model, "stages": [r.to_dict() for r in audit.results]})
        for plan in audit.plans:
            res = {r.stage: r for r in audit.results if r.dataset == plan.ds_key}
            body.append(f"<h3>{html.escape(plan.dataset['name'])} <small>({plan.ds_key}, "
                        f"{plan.n_samples} samples)</small></h3>")
            base = f"{plan.model_key}-{plan.ds_key}"
            if "similarity" in res:
                mat = _open(repo, res["similarity"].snapshot,
                            layout.similarity_group(plan.ds_key, "linear_cka"))["linear_cka"]
                files[f"{base}-cka.png"] = heatmap_png(mat, f"layer × layer linear CKA — {audit.model}")
                body.append(f"<img src='{base}-cka.png'>")
            if "factorize" in res:
                curves = {}
                for layer in plan.layers:
                    try:
                        ds = _open(repo, res["factorize"].snapshot, layout.factors_group(plan.ds_key, layer, "pca"))
                        curves[layer] = ds["explained_variance_curve"].values
                    except (KeyError, FileNotFoundError):
                        continue
                if curves:
                    files[f"{base}-pca.png"] = curves_png(curves, f"PCA explained variance — {audit.model}")
                    body.append(f"<img src='{base}-pca.png'>")
                ev = res["factorize"].summary.get("explained_variance", {}) if res["factorize"].summary else {}
                if ev:
                    body.append("<table><tr><th>layer/method</th><th>explained variance (k)</th></tr>" + "".join(
                        f"<tr><td>{html.escape(k)}</td><td>{v if isinstance(v, str) else f'{v:.4f}'}</td></tr>"
                        for k, v in ev.items()) + "</table>")
            if "bias" in res:
                for attr in (res["bias"].summary or {}):
                    ds = _open(repo, res["bias"].snapshot, layout.bias_group(plan.ds_key, attr))
                    body.append(
                        f"<h4>Bias: accuracy by {html.escape(attr)} — overall {ds.attrs['overall_accuracy']:.3f}, "
                        f"worst-group {ds.attrs['worst_group_accuracy']:.3f} ({html.escape(ds.attrs['worst_group'])})"
                        "</h4><table><tr><th>group / cell</th><th>accuracy</th><th>bootstrap CI</th><th>n</th></tr>"
                        + "".join(_bias_rows(ds)) + "</table>")

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
    return f"{folder}/index.html"
