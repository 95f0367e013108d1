"""Figures of the report (matplotlib, Agg backend), returned as PNG bytes."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import xarray as xr  # noqa: E402


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


def trend_png(value: xr.DataArray, title: str) -> bytes:
    """Similarity between consecutive checkpoints: one line per layer over ``step``."""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    steps = [str(s) for s in value["step"].values]
    for layer in value["layer"].values:
        ax.plot(steps, value.sel(layer=layer).values, marker="o", label=str(layer))
    ax.set_xlabel("checkpoint step")
    ax.set_ylabel(str(value.attrs.get("metric", "similarity")))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    return _png(fig)


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
    ax.set_ylabel("accuracy")
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
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("shortcut sweep", fontsize=9)
    return _png(fig)
