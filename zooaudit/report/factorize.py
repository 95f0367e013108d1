"""Factorization in the report: quality table, PCA and k-sweep curves, concept galleries.

A concept gallery is one PNG per (layer, method): one row per component, its top-
activating samples left to right (best first). For image datasets the tiles are the
input images; when the layer was stored as a spatial map (``pooling="none"``) the
component's heat map for that image is overlaid (jet colours, scaled per component so
rows are comparable across their images); a pooled layer has no positions, so its
gallery shows the images alone. Datasets whose inputs are not images get a table of the
top sentences (or sample ids) and labels instead; layers stored with all tokens add a table
of each component's top-activating tokens, marked in their sentence.
"""

from __future__ import annotations

import html
import io

import numpy as np

from .. import layout
from ..data import load_dataset
from .figures import _line_chart_png, curves_png, plt
from .page import figure

TILE = 48  # pixels per gallery tile side (8×8 inputs: 6× nearest-neighbour)
ALPHA = 0.55  # heat-map opacity over the image


def to_rgb(img: np.ndarray) -> np.ndarray:
    """``(C, H, W)`` input → ``(H, W, 3)`` in [0, 1]: grey for 1 channel, R/G for 2, RGB for 3
    (other channel counts show the channel mean)."""
    x = np.asarray(img, np.float64)
    c = x.shape[0]
    if c == 3:
        rgb = np.moveaxis(x, 0, -1)
    elif c == 2:  # colored digits: channel 0 red, channel 1 green
        rgb = np.stack([x[0], x[1], np.zeros_like(x[0])], axis=-1)
    else:
        rgb = np.repeat(x.mean(axis=0)[..., None], 3, axis=-1)
    lo, hi = float(rgb.min()), float(rgb.max())
    return (rgb - lo) / (hi - lo) if hi > lo else np.zeros_like(rgb)


def _resize(a: np.ndarray, size: int, order: int) -> np.ndarray:
    """``a (h, w, ...)`` resized to ``(size, size, ...)``: ``order=0`` is exact nearest-neighbour
    (output pixel i takes input pixel ``i * h // size``: an 8×8 input at 48 px is 6×6 blocks of
    equal size — scipy's zoom gives the edge pixels half-blocks), ``order=1`` bilinear."""
    if order == 0:
        rows = np.arange(size) * a.shape[0] // size
        cols = np.arange(size) * a.shape[1] // size
        return a[rows][:, cols]
    from scipy.ndimage import zoom

    return zoom(a, (size / a.shape[0], size / a.shape[1]) + (1,) * (a.ndim - 2), order=order)


def gallery_png(images: np.ndarray, heat: np.ndarray | None, scores: np.ndarray) -> bytes:
    """Mosaic of ``images (k, n, C, H, W)`` with optional ``heat (k, n, h, w)`` overlays.

    Images are upsampled nearest-neighbour to ``TILE`` pixels (an 8×8 digit becomes 6×6
    pixel blocks, not a blur); heat maps are bilinearly resized to the tile, clipped at 0
    (only where the concept is present is coloured) and divided by the row's maximum.
    ``scores (k, n)``: tiles with a non-finite score (fewer samples than ``n``) stay blank.
    Rows are labelled with their component, the horizontal axis with the rank.
    """
    k, n = images.shape[:2]
    gap = 2
    mosaic = np.ones((k * (TILE + gap), n * (TILE + gap), 3))
    cmap = plt.get_cmap("jet")
    for i in range(k):
        row_max = float(np.nanmax(heat[i])) if heat is not None else 0.0
        for j in range(n):
            if not np.isfinite(scores[i, j]):
                continue
            tile = _resize(to_rgb(images[i, j]), TILE, 0)
            if heat is not None:
                h = np.clip(_resize(np.asarray(heat[i, j], np.float64), TILE, 1), 0, None)
                h = h / row_max if row_max > 0 else h
                tile = (1 - ALPHA * h[..., None]) * tile + ALPHA * h[..., None] * cmap(h)[..., :3]
            y, x = i * (TILE + gap), j * (TILE + gap)
            mosaic[y:y + TILE, x:x + TILE] = np.clip(tile, 0, 1)
    dpi = 100
    fig = plt.figure(figsize=((mosaic.shape[1] + 90) / dpi, (mosaic.shape[0] + 50) / dpi), dpi=dpi)
    ax = fig.add_axes([70 / (mosaic.shape[1] + 90), 40 / (mosaic.shape[0] + 50),
                       mosaic.shape[1] / (mosaic.shape[1] + 90), mosaic.shape[0] / (mosaic.shape[0] + 50)])
    ax.imshow(mosaic, interpolation="nearest")
    centre = TILE / 2
    ax.set_yticks([i * (TILE + gap) + centre for i in range(k)], [f"c{i}" for i in range(k)], fontsize=8)
    ax.set_xticks([j * (TILE + gap) + centre for j in range(n)], [str(j + 1) for j in range(n)], fontsize=8)
    ax.set_ylabel("component", fontsize=8)
    ax.set_xlabel("rank of the top-activating samples (1 = strongest)", fontsize=8)
    for side in ax.spines.values():
        side.set_visible(False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def sweep_png(curves: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]], title: str) -> bytes:
    """Quality over k: explained variance (solid) and seed stability (dashed) per layer."""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name, (ks, ev, stab) in curves.items():
        line, = ax.plot(ks, ev, marker="o", label=f"{name} explained variance")
        if stab is not None:
            ax.plot(ks, stab, marker="s", linestyle="--", color=line.get_color(), label=f"{name} stability")
    ax.set_xticks(sorted({int(k) for c in curves.values() for k in c[0]}))
    ax.set_xlabel("k (components)")
    ax.set_ylim(min(0.0, *(float(np.nanmin(c[1])) for c in curves.values())), 1.02)
    return _line_chart_png(fig, ax, title, legend_size=6)


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    return f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))


QUALITY_COLUMNS = [("k", "k"), ("explained_variance", "explained var."), ("reconstruction_mse", "MSE"),
                   ("mean_cosine", "cosine"), ("l0", "L0"), ("dead_components", "dead"),
                   ("stability_mean", "seed stability (mean)"), ("stability_min", "(min)")]


class _Images:
    """The plan's dataset inputs by sample id, loaded once (None when they are not images)."""

    def __init__(self, dataset_spec: dict):
        self.spec = dataset_spec
        self._data = None

    def get(self):
        if self._data is None:
            data = load_dataset(self.spec)
            self._data = (data, {int(s): i for i, s in enumerate(data.sample_ids)})
        return self._data

    def images(self, ids: np.ndarray) -> np.ndarray | None:
        data, where = self.get()
        if data.inputs.ndim != 4:
            return None
        return data.inputs[[where[int(s)] for s in ids.ravel()]].reshape(*ids.shape, *data.inputs.shape[1:])

    def texts(self, ids: np.ndarray) -> np.ndarray | None:
        """The input strings of text datasets, ``(sample,)`` unicode inputs; else None."""
        data, where = self.get()
        if data.inputs.ndim != 1 or data.inputs.dtype.kind not in "UO":
            return None
        return data.inputs[[where[int(s)] for s in ids.ravel()]].reshape(ids.shape)

    def labels(self, ids: np.ndarray) -> np.ndarray:
        data, where = self.get()
        return data.labels[[where[int(s)] for s in ids.ravel()]].reshape(ids.shape)


def token_in_context(sentence: str, start: int, stop: int, token: str, width: int = 60) -> str:
    """HTML of ``sentence`` with the characters ``[start, stop)`` marked, cut to ``width`` characters
    either side; a token with no span (special tokens such as ``[CLS]``) is shown before the sentence."""
    if not 0 <= start < stop <= len(sentence):
        return f"<mark>{html.escape(token)}</mark> {html.escape(sentence[:2 * width])}"
    left, right = sentence[max(0, start - width):start], sentence[stop:stop + width]
    return ("…" if start > width else "") + html.escape(left) + f"<mark>{html.escape(sentence[start:stop])}</mark>" \
        + html.escape(right) + ("…" if stop + width < len(sentence) else "")


def _token_table(ds, caption: str) -> str:
    """Top-activating tokens per component (all-tokens layers): the token marked in its sentence."""
    text, sent = ds["top_token_text"].values, ds["top_token_sentence"].values
    lo, hi = ds["top_token_char_start"].values, ds["top_token_char_end"].values
    ids, scores = ds["top_token_sample"].values, ds["top_token_score"].values
    rows = "".join(
        f"<tr><td>{c}</td><td>" + "<br>".join(
            f"{token_in_context(str(sent[c, j]), int(lo[c, j]), int(hi[c, j]), str(text[c, j]))} "
            f"<small>({html.escape(str(text[c, j]))}, sample {int(ids[c, j])}, {scores[c, j]:.3g})</small>"
            for j in range(text.shape[1]) if np.isfinite(scores[c, j])) + "</td></tr>"
        for c in range(text.shape[0]))
    return (f"<p>{html.escape(caption)}: top-activating tokens</p><table><tr><th>component</th><th>top tokens in "
            f"their sentence, best first (token, sample, code)</th></tr>{rows}</table>")


def _gallery(ds, images: _Images, name: str, files: dict, caption: str, open_line: str | None = None) -> list[str]:
    tokens = [_token_table(ds, caption)] if "top_token_text" in ds else []
    ids = ds["top_sample"].values
    scores = ds["top_score"].values
    imgs = images.images(ids)
    if imgs is None:  # text or feature datasets: the top sentences (or ids) in a table
        labels = images.labels(ids)
        texts = images.texts(ids)

        def cell(c, j):
            what = html.escape(str(texts[c, j])[:120]) if texts is not None else f"sample {int(ids[c, j])}"
            return f"{what} <small>(label {int(labels[c, j])}, {scores[c, j]:.3g})</small>"

        rows = "".join(f"<tr><td>{c}</td><td>" + "<br>".join(cell(c, j) for j in range(ids.shape[1])
                                                             if np.isfinite(scores[c, j])) + "</td></tr>"
                       for c in range(len(ids)))
        return [(f"<p>{html.escape(caption)}</p><table><tr><th>component</th><th>top-activating samples, best "
                 f"first (label, score: {html.escape(str(ds.attrs.get('top_score', 'code')))})</th></tr>{rows}"
                 "</table>")] + tokens
    heat = ds["top_heatmap"].values if "top_heatmap" in ds else None
    files[name] = gallery_png(imgs, heat, scores)
    what = "heat map of the concept overlaid (jet: warmer = stronger)" if heat is not None else "images only"
    return [figure(name, f"Concept gallery {caption}: the top-activating images of each of {len(ids)} components",
                   f"{html.escape(caption)}: rows = components c0–c{len(ids) - 1}, their top-activating samples "
                   f"left to right, {what}; score: {html.escape(str(ds.attrs.get('top_score', 'code')))}.",
                   open_line=open_line, pixelated=True)]


POOLED_NOTE = ("Layers stored pooled have no positions, so their galleries show the images alone (no heat "
               "map): {layers}. Extract with <code>--pooling none</code> for heat maps.")


def factorize_section(open_group, plan, result, base: str, model: str, files: dict, *,
                      open_line=None) -> list[str]:
    """HTML for one model × dataset's factorize commit. ``open_group(group) -> xr.Dataset`` (lazy:
    only the small variables — top samples, sweep, curve — and attributes are read);
    ``open_line(group) -> str``: the line that opens a group's data, shown under its figures."""
    line = open_line or (lambda group: None)
    summary = result.summary or {}
    groups = summary.get("groups") or {f"{t}": layout.factors_group(plan.ds_key, *t.split("/", 1))
                                       for t, v in summary.get("explained_variance", {}).items()
                                       if not isinstance(v, str)}
    out = []
    opened = {}
    for tag, group in sorted(groups.items()):   # layer/method in a stable order
        try:
            opened[tag] = open_group(group)
        except (KeyError, FileNotFoundError):
            continue
    curves = {t.split("/")[0]: ds["explained_variance_curve"].values for t, ds in opened.items()
              if t.endswith("/pca") and "explained_variance_curve" in ds}
    if curves:
        files[f"{base}-pca.png"] = curves_png(curves, f"PCA explained variance — {model}")
        first = next(t for t in opened if t.endswith("/pca") and "explained_variance_curve" in opened[t])
        out.append(figure(f"{base}-pca.png", f"Cumulative PCA explained variance against the number of components "
                          f"for layers {', '.join(curves)}", "PCA: cumulative explained variance (fraction of the "
                          "total variance, 0–1) against the number of components, one line per layer.",
                          open_line=line(groups[first])))
    by_method: dict[str, dict] = {}
    for tag, ds in opened.items():
        if "k_sweep" in ds.coords:
            stab = ds["sweep_stability_mean"].values if "sweep_stability_mean" in ds else None
            by_method.setdefault(tag.split("/")[1], {})[tag.split("/")[0]] = (
                ds["k_sweep"].values, ds["sweep_explained_variance"].values, stab)
    for method, curves_k in by_method.items():
        name = f"{base}-sweep-{method}.png"
        files[name] = sweep_png(curves_k, f"{method}: quality over k — {model}")
        out.append(figure(name, f"{method} explained variance and seed stability against k",
                          f"{html.escape(method)}: explained variance (solid, fraction 0–1) and seed stability "
                          "(dashed, matched cosine 0–1) against k."))
    rows = []
    for tag, ds in opened.items():
        if ds.attrs.get("method") == "eigencam":
            continue
        cells = [_fmt(int(v) if key in ("k", "dead_components") and isinstance(v, (int, float)) and np.isfinite(v)
                      else v) for key, _ in QUALITY_COLUMNS for v in [ds.attrs.get(key)]]
        rows.append(f"<tr><td>{html.escape(tag)}</td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    skipped = {t: v for t, v in summary.get("explained_variance", {}).items() if isinstance(v, str)}
    rows += [f"<tr><td>{html.escape(t)}</td><td colspan='{len(QUALITY_COLUMNS)}'>{html.escape(v)}</td></tr>"
             for t, v in skipped.items()]
    if rows:
        out.append("<table><thead><tr><th scope='col'>layer/method</th>" + "".join(
            f"<th scope='col'>{h}</th>" for _, h in QUALITY_COLUMNS) + "</tr></thead><tbody>" + "".join(rows)
            + "</tbody></table>")
    images = _Images(plan.dataset)
    pooled = sorted({t.split("/")[0] for t, ds in opened.items() if "top_sample" in ds and "top_heatmap" not in ds})
    galleries = []
    for tag, ds in opened.items():
        if "top_sample" not in ds:
            continue
        name = f"{base}-gallery-{tag.replace('/', '-')}.png"
        galleries.extend(_gallery(ds, images, name, files, f"{tag}: concepts", line(groups[tag])))
    if pooled and any(name.endswith(".png") for name in files if name.startswith(f"{base}-gallery-")):
        out.append(f"<p class='note'>{POOLED_NOTE.format(layers=html.escape(', '.join(pooled)))}</p>")
    out.extend(galleries)
    for tag, ds in opened.items():
        if ds.attrs.get("method") == "eigencam":
            name = f"{base}-eigencam-{tag.split('/')[0]}.png"
            n = min(8, ds.sizes["sample"])
            ids = ds["sample"].values[:n][None]
            imgs = images.images(ids)
            if imgs is not None:
                heat = ds["heatmap"][:n].values[None]
                files[name] = gallery_png(imgs, heat, np.ones(ids.shape))
                out.append(figure(name, f"Eigen-CAM heat maps of the first {n} samples of layer {tag.split('/')[0]}",
                                  f"{html.escape(tag)}: Eigen-CAM maps of the first {n} samples (first principal "
                                  "component of each image's map, no gradients).", open_line=line(groups[tag]),
                                  pixelated=True))
    return out
