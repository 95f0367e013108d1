"""Activation-statistics section of the report: sparsity by layer (with the dead-unit share), the
massive-activation table, the spectrum and effective rank by layer, and the NC1–NC4 panel —
all read from what :mod:`zooaudit.stages.statistics` committed (a report only reads)."""

from __future__ import annotations

import html

import numpy as np
import xarray as xr

from .. import layout
from .figures import _png, checkpoint_panels_png, plt


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    v = float(v)
    if not np.isfinite(v):
        return "∞" if v == np.inf else "–"
    return f"{v:.{digits}g}" if abs(v) >= 1e4 or (v and abs(v) < 1e-3) else f"{v:.{digits}f}"


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c if isinstance(c, str) else _fmt(c)}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def spectrum_png(layers: dict[str, xr.Dataset], summary: xr.Dataset, title: str) -> bytes:
    """Left: cumulative variance share against the number of components per layer; right:
    effective rank and participation ratio by layer."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(8.4, 3.2))
    for name, ds in layers.items():
        if "eigenvalues" not in ds:
            continue
        lam = np.clip(ds["eigenvalues"].values, 0, None)
        if lam.sum() > 0:
            a.plot(np.arange(1, len(lam) + 1), np.cumsum(lam) / lam.sum(), label=name)
    a.set_xscale("log")
    a.set_xlabel("components")
    a.set_ylabel("cumulative variance share", fontsize=8)
    a.grid(alpha=0.3)
    a.legend(fontsize=7)
    names = [str(n) for n in summary["layer"].values]
    b.plot(names, summary["effective_rank"].values, marker="o", label="effective rank (Roy & Vetterli)")
    b.plot(names, summary["participation_ratio"].values, marker="s", label="participation ratio")
    b.set_ylabel("dimensions", fontsize=8)
    b.tick_params(axis="x", labelsize=7, rotation=30)
    b.grid(alpha=0.3)
    b.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return _png(fig)


def collapse_png(c: xr.Dataset, title: str) -> bytes:
    """NC1 (log scale) and NC2/NC3/NC4 against the NC layers, in layer order."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(8.4, 3.2))
    names = [str(n) for n in c["nc_layer"].values]
    a.plot(names, c["nc1"].values, marker="o")
    a.set_yscale("log")
    a.set_ylabel("NC1 tr(Σ_W Σ_B⁺)/C", fontsize=8)
    for var, label in (("nc2_equinorm", "NC2 equinorm"), ("nc2_equiangular", "NC2 equiangular"),
                       ("nc3", "NC3 self-duality"), ("nc4", "NC4 NCC agreement")):
        if np.isfinite(c[var].values).any():
            b.plot(names, c[var].values, marker="o", label=label)
    for ax in (a, b):
        ax.tick_params(axis="x", labelsize=7, rotation=30)
        ax.grid(alpha=0.3)
    b.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return _png(fig)


def statistics_section(open_group, plan, result, base: str, files: dict) -> list[str]:
    """HTML for one model's statistics stage on one dataset. ``open_group(group) -> Dataset``
    at the stage's snapshot; ``files`` receives the figures."""
    s = open_group(layout.statistics_group(plan.ds_key, "summary"))
    names = [str(n) for n in s["layer"].values]
    layers = {n: open_group(layout.statistics_group(plan.ds_key, f"layers/{n}")) for n in names}
    out = [f"<h4>Activation statistics (|a| &gt; {_fmt(s.attrs.get('eps'))} counts as active; "
           f"n={s.attrs.get('n')})</h4>"]
    rows_of = dict(zip(names, s["rows"].values)) if "rows" in s.coords else dict.fromkeys(names, "sample")
    out.append(_table(["layer", "rows", "units", "activation ratio", "per-row p10", "median", "p90", "dead units",
                       "always active"],
                      [[n, str(rows_of[n]), str(int(s["n_units"].sel(layer=n))), *(s[v].sel(layer=n).item() for v in (
                          "activation_ratio", "sample_fraction_p10", "sample_fraction_median", "sample_fraction_p90",
                          "dead_fraction", "always_active_fraction"))] for n in names]))
    rows = []
    for n in names:
        ds = layers[n]
        for r in range(min(3, ds.sizes["rank"])):
            rows.append([n, ds["top_value"].values[r], ds["top_ratio"].values[r], str(int(ds["top_sample"].values[r])),
                         str(int(ds["top_unit"].values[r])), bool(ds["top_massive"].values[r])])
    out.append(f"<h4>Massive activations (Sun et al. 2024: |a| &gt; {_fmt(s.attrs.get('massive_abs_threshold'))} "
               f"and &gt; {_fmt(s.attrs.get('massive_ratio_threshold'))} × the layer's median |a|)</h4>"
               + _table(["layer", "|a|", "× median", "sample", "unit", "massive"], rows))
    name = f"{base}-statistics-spectrum.png"
    files[name] = spectrum_png(layers, s, f"spectrum by layer — {plan.model_uri}")
    out.append(f"<img src='{name}' alt='Spectrum of each layer's representation: normalised eigenvalues against component index, log scale'>")
    out.append(_table(["layer", "effective rank", "participation ratio", "stable rank", "top-1 share", "top-10 share"],
                      [[n, *(s[v].sel(layer=n).item() for v in ("effective_rank", "participation_ratio",
                                                                "stable_rank", "variance_top_1", "variance_top_10"))]
                       for n in names]))
    collapse = (result.summary or {}).get("collapse")
    if collapse:
        c = open_group(layout.statistics_group(plan.ds_key, "collapse"))
        if c.sizes["nc_layer"] > 1:   # the layer-by-layer progression of collapse
            name = f"{base}-statistics-collapse.png"
            files[name] = collapse_png(c, f"neural collapse by layer — {plan.model_uri}")
            out.append(f"<img src='{name}' alt='Neural collapse NC1 to NC4 against the layer, from input side to output'>")
        out.append("<h4>Neural collapse (Papyan et al. 2020; NC1–NC3 → 0 and NC4 → 1 under collapse)</h4>" + _table(
            ["layer", "NC1 tr(Σ_W Σ_B⁺)/C", "NC2 equinorm CV", "NC2 equiangular", "NC3 self-duality",
             "NC4 NCC agreement"],
            [[str(n), *(c[v].sel(nc_layer=n).item() for v in ("nc1", "nc2_equinorm", "nc2_equiangular", "nc3", "nc4"))]
             for n in c["nc_layer"].values]))
    for attr in (result.summary or {}).get("groups", []):
        g = open_group(layout.statistics_group(plan.ds_key, f"groups/{attr}"))
        groups = [str(x) for x in g["group"].values]
        header = ["layer"] + [f"{v} ({x}, n={int(c)})" for v in ("activation ratio", "dead units")
                              for x, c in zip(groups, g["count"].values)]
        rows = [[n, *g["activation_ratio"].sel(layer=n).values, *g["dead_fraction"].sel(layer=n).values]
                for n in names]
        out.append(f"<h4>By {html.escape(attr)}: does a group get a different representation?</h4>"
                   + _table(header, rows))
        if "nc1" in g:
            out.append(_table(["NC layer"] + [f"NC1 within {x}" for x in groups],
                              [[str(n), *g["nc1"].sel(nc_layer=n).values] for n in g["nc_layer"].values]))
    notes = (result.summary or {}).get("notes") or {}
    if notes:
        out.append("<p><small>" + "<br>".join(html.escape(f"{k}: {v}") for k, v in notes.items()) + "</small></p>")
    return out


def statistics_trend_section(ds: xr.Dataset, base: str, files: dict) -> list[str]:
    """The statistics panels of a checkpoint trend (:func:`zooaudit.stages.trend.checkpoint_trend`
    with a statistics spec): NC1, dead-unit fraction and effective rank against the checkpoint,
    and the first checkpoint with a massive activation per layer. Nothing when the trend has none."""
    panels = [(v, col, label) for v, col, label in (
        ("nc1", "nc_layer", "NC1 tr(Σ_W Σ_B⁺)/C"), ("activation_ratio", "layer", "activation ratio"),
        ("dead_fraction", "layer", "dead-unit fraction"), ("effective_rank", "layer", "effective rank")) if v in ds]
    if not panels:
        return []
    name = f"{base}-statistics.png"
    files[name] = checkpoint_panels_png(
        ds, panels, f"{ds.attrs.get('family', '')}: activation statistics against the checkpoint")
    out = [f"<img src='{name}' alt='Activation statistics of the family against the checkpoint epoch: activation ratio, dead units, effective rank, NC1'>"]
    if "massive_first_epoch" in ds:
        out.append(_table(["layer", "first checkpoint with a massive activation"],
                          [[str(l), html.escape(str(e)) or "none"] for l, e in
                           zip(ds["layer"].values, ds["massive_first_epoch"].values)]))
    return out


def statistics_table(results) -> list[dict]:
    """Headline activation statistics as table rows (one per dataset × layer) for the run's
    Prefect table artifact, from the statistics stages' commit summaries."""
    rows = []
    for r in results:
        if r.stage != "statistics":
            continue
        s = r.summary or {}
        nc1 = (s.get("collapse") or {}).get("nc1") or {}
        for layer in s.get("layers", []):
            rows.append({"dataset": r.dataset, "layer": layer,
                         **{k: (s.get(k) or {}).get(layer) for k in ("activation_ratio", "dead_fraction",
                                                                    "effective_rank", "n_massive_units")},
                         "nc1": nc1.get(layer), "regressions": sum(x["layer"] == layer for x in s.get("regressions", []))})
    return rows
