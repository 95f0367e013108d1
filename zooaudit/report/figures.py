"""Figures of the report (matplotlib, Agg backend), returned as PNG bytes."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import xarray as xr


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _line_chart_png(fig, ax, title: str, *, legend_size: int = 7) -> bytes:
    """The common finish of the line charts: light grid, small legend and title; PNG bytes."""
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    ax.set_title(title, fontsize=9)
    return _png(fig)


def _axis_label(dim: str) -> str:
    """``layer_a`` → ``layer (a)``: the axis label of a matrix dimension."""
    name, _, side = dim.rpartition("_")
    return f"{name} ({side})" if name and side in ("a", "b") else dim


def heatmap_png(mat: xr.DataArray, title: str, *, kind: str | None = None, axis: str | None = None,
                unit: str | None = None) -> bytes:
    """A labelled heat map of a 2-D similarity DataArray.

    Colour range by ``kind`` (default: ``mat.attrs["kind"]``): a ``"distance"``
    (Procrustes angle, radians) spans [0, π/2]; a similarity spans [0, 1], extended
    below 0 when values are negative (debiased CKA, RSA). NaN cells (undefined
    similarity) are left blank and labelled "–".
    """
    a, b = mat.dims
    kind = kind or mat.attrs.get("kind", "similarity")
    vals = np.asarray(mat.values, dtype=float)
    finite = vals[np.isfinite(vals)]
    if kind == "distance":
        vmin, vmax, cmap = 0.0, float(np.pi / 2), "viridis_r"
    else:
        vmin, vmax, cmap = min(0.0, float(finite.min()) if finite.size else 0.0), 1.0, "viridis"
    n = max(mat.sizes[a], mat.sizes[b])
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * n, 1.0 + 0.5 * n))
    im = ax.imshow(vals, vmin=vmin, vmax=vmax, cmap=cmap)
    ax.set_xticks(range(mat.sizes[b]), [str(v).replace("builtin:", "") for v in mat[b].values], rotation=60,
                  ha="right", fontsize=8)
    ax.set_yticks(range(mat.sizes[a]), [str(v).replace("builtin:", "") for v in mat[a].values], fontsize=8)
    mid = vmin + 0.6 * (vmax - vmin)
    for i in range(mat.sizes[a]):
        for j in range(mat.sizes[b]):
            v = float(vals[i, j])
            dark = (v > vmin + 0.4 * (vmax - vmin)) if kind == "distance" else (v < mid)
            ax.text(j, i, "–" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if dark else "black")
    ax.set_xlabel(f"{axis} (b)" if axis else _axis_label(b), fontsize=8)
    ax.set_ylabel(f"{axis} (a)" if axis else _axis_label(a), fontsize=8)
    ax.set_title(title, fontsize=9)
    label = unit or ("radians" if kind == "distance" else mat.attrs.get("metric", "similarity"))
    fig.colorbar(im, ax=ax, fraction=0.046, label=label)
    return _png(fig)


def curves_png(curves: dict[str, np.ndarray], title: str) -> bytes:
    """Cumulative explained variance of PCA against the number of components, one line per layer."""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name, curve in curves.items():
        ax.plot(np.arange(1, len(curve) + 1), curve, marker=".", label=name)
    ax.set_xlabel("components")
    ax.set_ylabel("explained variance")
    ax.set_ylim(0, 1.02)
    return _line_chart_png(fig, ax, title)


def trend_png(value: xr.DataArray, title: str, control: xr.DataArray | None = None) -> bytes:
    """Similarity between consecutive checkpoints: one line per layer over ``step``; its
    ``control`` (same dims), when given, dashed in the same colour beside it."""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    steps = [str(s) for s in value["step"].values]
    for layer in value["layer"].values:
        line, = ax.plot(steps, value.sel(layer=layer).values, marker="o", label=str(layer))
        if control is not None:
            ax.plot(steps, control.sel(layer=layer).values, marker="x", linestyle="--", color=line.get_color(),
                    label=f"{layer} control")
    ax.set_xlabel("checkpoint step")
    ax.set_ylabel(str(value.attrs.get("metric", "similarity")))
    if value.attrs.get("kind", "similarity") != "distance":
        ax.set_ylim(min(0.0, float(np.nanmin(value.values))), 1.02)
    return _line_chart_png(fig, ax, title)


def bars_png(ds: xr.Dataset, title: str) -> bytes:
    """Per-group accuracy bars with their bootstrap interval as error bars."""
    groups = [str(g) for g in ds["group"].values]
    acc = ds["accuracy"].values
    fig, ax = plt.subplots(figsize=(1.5 + 0.8 * len(groups), 3))
    if "accuracy_ci" in ds:
        lo, hi = ds["accuracy_ci"].values.T
        ax.bar(groups, acc, yerr=np.vstack([acc - lo, hi - acc]), capsize=4, color="#4c78a8")
    else:
        ax.bar(groups, acc, color="#4c78a8")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (fraction correct)")
    ax.set_xlabel("group")
    ax.set_title(title, fontsize=9)
    return _png(fig)


def sweep_png(points: list[tuple[float, float, float | None]]) -> bytes:
    """Shortcut sweep: worst-group accuracy and colour leakage against the training colour flip."""
    flips = [p[0] for p in points]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(flips, [p[1] for p in points], marker="o", label="worst-group accuracy")
    if all(p[2] is not None for p in points):
        ax.plot(flips, [p[2] for p in points], marker="s", label="colour leakage from outputs")
    ax.set_xlabel("colour flip probability in training (smaller = stronger shortcut)")
    ax.set_ylim(0, 1.02)
    return _line_chart_png(fig, ax, "shortcut sweep")


def history_png(nights: list[str], series: dict[str, list[float | None]], ylabel: str, title: str) -> bytes:
    """A headline metric across nights (the tags, oldest first): one line per model; a night
    on which the model had no result is a gap."""
    fig, ax = plt.subplots(figsize=(6, 3.2))
    x = np.arange(len(nights))
    for name, values in series.items():
        y = np.array([np.nan if v is None else v for v in values], dtype=float)
        ax.plot(x, y, marker="o", label=name.replace("builtin:", ""))
    ax.set_xticks(x, [n.removeprefix("nightly-") for n in nights], rotation=30, ha="right", fontsize=8)
    ax.set_xlabel("night (tag)")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.02)
    return _line_chart_png(fig, ax, title)


def checkpoint_panels_png(ds: xr.Dataset, panels: list[tuple[str, str, str]], title: str, *,
                          ylim: tuple[float, float] | None = None) -> bytes:
    """One panel per ``(variable, line dimension, y label)`` against the checkpoint epoch (the
    ``epoch`` dimension of a checkpoint trend), one line per value of the line dimension."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    x = [str(e) for e in ds["epoch"].values]
    for ax, (var, col, label) in zip(axes[0], panels):
        for c in ds[col].values:
            ax.plot(x, ds[var].sel({col: c}).values, marker="o", label=str(c))
        ax.set_xlabel("checkpoint (epoch)")
        ax.set_ylabel(label, fontsize=8)
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return _png(fig)
