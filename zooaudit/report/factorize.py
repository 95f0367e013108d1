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

TILE = 48  # pixels per gallery tile side
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
    from scipy.ndimage import zoom

    return zoom(a, (size / a.shape[0], size / a.shape[1]) + (1,) * (a.ndim - 2), order=order)


def gallery_png(images: np.ndarray, heat: np.ndarray | None, scores: np.ndarray) -> bytes:
    """Mosaic of ``images (k, n, C, H, W)`` with optional ``heat (k, n, h, w)`` overlays.

    Heat maps are bilinearly resized to the tile, clipped at 0 (only where the concept is
    present is coloured) and divided by the row's maximum. ``scores (k, n)``: tiles with a
    non-finite score (fewer samples than ``n``) stay blank.
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
    buf = io.BytesIO()
    plt.imsave(buf, mosaic, format="png")
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


def _gallery(ds, images: _Images, name: str, files: dict, caption: str) -> list[str]:
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
    note = "heat map of the concept overlaid" if heat is not None else \
        "layer stored pooled: no positions, images only (extract with pooling='none' for heat maps)"
    return [(f"<figure><img src='{name}' style='max-width:96%'><figcaption>{html.escape(caption)}: rows = "
             f"components 0–{len(ids) - 1}, top-activating samples left to right ({note}; score: "
             f"{html.escape(str(ds.attrs.get('top_score', 'code')))}).</figcaption></figure>")]


def factorize_section(open_group, plan, result, base: str, model: str, files: dict) -> list[str]:
    """HTML for one model × dataset's factorize commit. ``open_group(group) -> xr.Dataset`` (lazy:
    only the small variables — top samples, sweep, curve — and attributes are read)."""
    summary = result.summary or {}
    groups = summary.get("groups") or {f"{t}": layout.factors_group(plan.ds_key, *t.split("/", 1))
                                       for t, v in summary.get("explained_variance", {}).items()
                                       if not isinstance(v, str)}
    out = [f"<h4>Factorization — {html.escape(model)}</h4>"]
    opened = {}
    for tag, group in groups.items():
        try:
            opened[tag] = open_group(group)
        except (KeyError, FileNotFoundError):
            continue
    curves = {t.split("/")[0]: ds["explained_variance_curve"].values for t, ds in opened.items()
              if t.endswith("/pca") and "explained_variance_curve" in ds}
    if curves:
        files[f"{base}-pca.png"] = curves_png(curves, f"PCA explained variance — {model}")
        out.append(f"<img src='{base}-pca.png'>")
    by_method: dict[str, dict] = {}
    for tag, ds in opened.items():
        if "k_sweep" in ds.coords:
            stab = ds["sweep_stability_mean"].values if "sweep_stability_mean" in ds else None
            by_method.setdefault(tag.split("/")[1], {})[tag.split("/")[0]] = (
                ds["k_sweep"].values, ds["sweep_explained_variance"].values, stab)
    for method, curves_k in by_method.items():
        name = f"{base}-sweep-{method}.png"
        files[name] = sweep_png(curves_k, f"{method}: quality over k — {model}")
        out.append(f"<img src='{name}'>")
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
        out.append("<table><tr><th>layer/method</th>" + "".join(f"<th>{h}</th>" for _, h in QUALITY_COLUMNS)
                   + "</tr>" + "".join(rows) + "</table>")
    images = _Images(plan.dataset)
    for tag, ds in opened.items():
        if "top_sample" not in ds:
            continue
        name = f"{base}-gallery-{tag.replace('/', '-')}.png"
        out.extend(_gallery(ds, images, name, files, f"{tag}: concepts"))
    for tag, ds in opened.items():
        if ds.attrs.get("method") == "eigencam":
            name = f"{base}-eigencam-{tag.split('/')[0]}.png"
            n = min(8, ds.sizes["sample"])
            ids = ds["sample"].values[:n][None]
            imgs = images.images(ids)
            if imgs is not None:
                heat = ds["heatmap"][:n].values[None]
                files[name] = gallery_png(imgs, heat, np.ones(ids.shape))
                out.append(f"<figure><img src='{name}' style='max-width:96%'><figcaption>{html.escape(tag)}: "
                           f"Eigen-CAM maps of the first {n} samples (first principal component of each "
                           "image's map, no gradients).</figcaption></figure>")
    return out
