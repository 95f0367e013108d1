"""Report section of the attribution stage: per layer, a gallery of maps over the images (mask
outline drawn), the localisation and faithfulness table beside the random-order control, the
background share by group with CIs, the deletion/insertion curves (and the ROAD MoRF/LeRF
curves where the stage computed them) and the method agreement.

Reads committed results only (``open_group(group) -> xr.Dataset`` at the stage's snapshot) and
the dataset's images and masks (loaded from its spec, as the factorization gallery does).
"""

from __future__ import annotations

import html

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import xarray as xr

from ..data import load_dataset
from ..layout import attribution_group
from .figures import _png, heatmap_png
from .factorize import to_rgb

__all__ = ["attribution_section", "gallery_png"]


def _fmt(v) -> str:
    return "—" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.3f}"


def _pick(metrics: xr.Dataset, k: int, seed: int = 0) -> list[int]:
    """Rows shown: the most and least background-reliant under the first method, and random ones."""
    n = metrics.sizes["sample"]
    if "background_share" not in metrics:
        return list(range(min(n, 3 * k)))
    share = np.nan_to_num(metrics["background_share"].isel(method=0).values, nan=0.5)
    order = np.argsort(share, kind="stable")
    rest = [i for i in np.random.default_rng(seed).permutation(n) if i not in set(order[:k]) | set(order[-k:])]
    rows = [*order[-k:][::-1], *order[:k], *rest[:k]]
    return list(dict.fromkeys(int(i) for i in rows))


def gallery_png(images: np.ndarray, maps: np.ndarray, masks: np.ndarray | None, methods: list[str],
                row_labels: list[str]) -> bytes:
    """Rows of samples: the image, then each method's map over it (positive part, jet), the mask
    outline in white. ``images (n, C, H, W)``, ``maps (n, method, H, W)``, ``masks (n, H, W)``."""
    n, m = maps.shape[:2]
    fig, axes = plt.subplots(n, m + 1, figsize=(1.3 * (m + 1), 1.3 * n), squeeze=False)
    for i in range(n):
        rgb = to_rgb(images[i])
        for j in range(m + 1):
            ax = axes[i, j]
            ax.imshow(rgb)
            if j:
                heat = np.clip(maps[i, j - 1].astype(np.float64), 0, None)
                ax.imshow(heat, cmap="jet", alpha=0.5, vmin=0, vmax=max(float(heat.max()), 1e-12))
            if masks is not None:
                ax.contour(masks[i].astype(float), levels=[0.5], colors="white", linewidths=0.7)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title("image" if j == 0 else methods[j - 1], fontsize=6)
        axes[i, 0].set_ylabel(row_labels[i], fontsize=5)
    return _png(fig)


def _curves_png(curves: xr.Dataset, kind: str) -> bytes:
    mean = curves["curves"].sel(kind=kind).mean("sample")
    fig, ax = plt.subplots(figsize=(4, 3))
    for order in mean["order"].values:
        style = {"color": "black", "linestyle": "--"} if order == "random" else {}
        ax.plot(curves["fraction"].values, mean.sel(order=order).values, label=str(order), **style)
    what = {"deletion": "removed", "insertion": "inserted", "morf": "removed, most relevant first (imputed)",
            "lerf": "removed, least relevant first (imputed)"}[kind]
    ax.set_xlabel(f"fraction of pixels {what}", fontsize=8)
    ax.set_ylabel("p(target)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    title = f"ROAD {kind.upper()}" if kind in ("morf", "lerf") else kind
    ax.set_title(f"{title} curves (dashed: random order)", fontsize=9)
    return _png(fig)


def _reliance_png(rel: xr.Dataset, attr: str) -> bytes:
    methods = [str(m) for m in rel["method"].values]
    groups = [str(g) for g in rel["group"].values]
    fig, ax = plt.subplots(figsize=(1.5 + 0.9 * len(methods), 3))
    width = 0.8 / len(groups)
    for k, g in enumerate(groups):
        sel = rel.sel({"group": g})
        mean, lo, hi = sel["mean"].values, sel["ci_low"].values, sel["ci_high"].values
        ax.bar(np.arange(len(methods)) + k * width, mean, width, yerr=np.vstack([mean - lo, hi - mean]), capsize=3,
               label=g)
    ax.set_xticks(np.arange(len(methods)) + width * (len(groups) - 1) / 2, methods, rotation=30, fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("background share of attribution")
    ax.legend(fontsize=6, title=attr, title_fontsize=6)
    ax.set_title(f"background share by {attr} ({rel.attrs.get('ci', 0.95):.0%} bootstrap CI)", fontsize=9)
    return _png(fig)


def _sanity_png(sanity: xr.Dataset) -> bytes:
    stats = [("spearman", "Spearman", "threshold"), ("ssim", "SSIM", "ssim_threshold")]
    stats = [st for st in stats if st[0] in sanity]
    fig, axes = plt.subplots(1, len(stats), figsize=(5 * len(stats), 3), squeeze=False)
    steps = [str(v) for v in sanity["step"].values]
    for ax, (var, label, threshold) in zip(axes[0], stats):
        for m in sanity["method"].values:
            ax.plot(range(len(steps)), sanity[var].sel({"method": m}).values, marker="o", ms=3, label=str(m))
        ax.set_xticks(range(len(steps)), steps, rotation=45, fontsize=6)
        ax.axhline(sanity.attrs.get(threshold, 0.5), color="grey", linestyle=":", linewidth=1)
        ax.set_ylabel(f"{label} with trained maps")
        ax.set_xlabel("randomised down to layer (cascading from the top)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
        ax.set_title(f"sanity check: cascading randomisation ({label})", fontsize=9)
    return _png(fig)


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c) if isinstance(c, str) else _fmt(c)}</td>" for c in r)
                   + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _layer(open_group, plan, layer: str, s: dict, base: str, files: dict, data) -> list[str]:
    out = [f"<h4>Attribution maps at {html.escape(layer)}</h4>"]
    maps = open_group(attribution_group(plan.ds_key, layer, "maps"))
    metrics = open_group(attribution_group(plan.ds_key, layer, "metrics"))
    methods = [str(m) for m in maps["method"].values]
    where = {int(v): i for i, v in enumerate(data.sample_ids)}
    rows = _pick(metrics, 2)
    ids = maps["sample"].values[rows]
    pos = [where[int(v)] for v in ids]
    labels = [f"id {int(v)} y={int(data.labels[p])}" for v, p in zip(ids, pos)]
    name = f"{base}-attribution-{layer}-gallery.png"
    files[name] = gallery_png(data.inputs[pos], maps["maps"].values[rows], None if data.masks is None
                              else data.masks[pos], methods, labels)
    out.append(f"<p>Most and least background-reliant samples (under {html.escape(methods[0])}), then random ones; "
               f"maps normalised by their max, positive part shown, mask outlined.</p><img src='{name}' alt='Gallery: each sample's image, then one attribution map per method over it, mask outlined'>")
    if "token_grid" in maps.attrs:   # a vision transformer: say what the maps are of
        gy, gx = (int(g) for g in maps.attrs["token_grid"])
        n = int(maps.attrs.get("prefix_tokens_excluded", 0))
        out.append(f"<p>Vision transformer: the CAMs read this layer's patch tokens as their {gy}×{gx} patch grid; "
                   f"the {n} prefix token{'s' if n != 1 else ''} (CLS{', distillation' if n > 1 else ''}) "
                   f"{'are' if n != 1 else 'is'} excluded from the maps.</p>")
    auc, road = s.get("auc", {}), s.get("road_auc", {})
    header = ["method", "background share", "pointing game", "IoU"]
    if auc:
        header += ["deletion AUC ↓", "insertion AUC ↑"]
    if road:
        header += ["ROAD MoRF AUC ↓", "ROAD LeRF AUC ↑"]
    table = []
    for m in [*methods, "random"] if auc or road else methods:
        row = ([m, *(s.get(v, {}).get(m) for v in ("background_share", "pointing_game", "iou"))] if m != "random"
               else ["random order (control)", None, None, None])
        if auc:
            row += [auc.get("deletion", {}).get(m), auc.get("insertion", {}).get(m)]
        if road:
            row += [road.get("morf", {}).get(m), road.get("lerf", {}).get(m)]
        table.append(row)
    out.append(_table(header, table))
    if regs := s.get("background_regressions"):
        out.append(f"<p><b>Background share up since the previous audit</b> (snapshot "
                   f"{html.escape(str(s.get('previous_snapshot'))[:12])}; rise above "
                   f"{_fmt(regs[0]['threshold'])} with its {regs[0]['ci']:.0%} bootstrap CI above 0):</p>" + _table(
                       ["method", "previous", "current", "rise", "CI low", "CI high", "test"],
                       [[r["method"], r["previous"], r["current"], r["difference"], r["ci_low"], r["ci_high"],
                         r["test"]] for r in regs]))
    if road:
        out.append("<p>ROAD (Rong et al. 2022): removed pixels are replaced by the noisy linear imputation of their "
                   "8 neighbours instead of a constant, so the removal stays closer to the data; MoRF removes the "
                   "most relevant pixels first, LeRF the least relevant first.</p>")
    if "ig_gap_mean_abs" in s:
        out.append(f"<p>Integrated Gradients completeness gap (mean |Σ IG − (s(x) − s(x₀))|): "
                   f"{_fmt(s['ig_gap_mean_abs'])}.</p>")
    for attr, by_method in (s.get("background_share_by_group") or {}).items():
        rel = open_group(attribution_group(plan.ds_key, layer, f"reliance/{attr}"))
        name = f"{base}-attribution-{layer}-reliance-{attr}.png"
        files[name] = _reliance_png(rel, attr)
        groups = [str(g) for g in rel["group"].values]
        out.append(f"<img src='{name}' alt='Background share of attribution energy per group with confidence intervals, per method'>" + _table(
            ["method", *groups, "difference", "adjusted p"],
            [[m, *(v.get(g) for g in groups), v.get("difference"), v.get("p_adjusted")] for m, v in by_method.items()]))
    if auc:
        curves = open_group(attribution_group(plan.ds_key, layer, "curves"))
        for kind in ("deletion", "insertion"):
            name = f"{base}-attribution-{layer}-{kind}.png"
            files[name] = _curves_png(curves, kind)
            out.append(f"<img src='{name}' alt='Deletion or insertion curve: model score against the fraction of pixels removed or added, beside the random order'>")
    if road:
        curves = open_group(attribution_group(plan.ds_key, layer, "road"))
        for kind in ("morf", "lerf"):
            name = f"{base}-attribution-{layer}-road-{kind}.png"
            files[name] = _curves_png(curves, kind)
            out.append(f"<img src='{name}' alt='ROAD {kind.upper()} curve: model score against the fraction of "
                       f"pixels removed and imputed, beside the random order'>")
    if "sanity_flagged" in s:
        sanity = open_group(attribution_group(plan.ds_key, layer, "sanity"))
        name = f"{base}-attribution-{layer}-sanity.png"
        files[name] = _sanity_png(sanity)
        flagged = s["sanity_flagged"]
        by = s.get("sanity_flagged_by", {})
        listed = ", ".join(f"{m} ({' and '.join(by[m])})" if by.get(m) else m for m in flagged)
        out.append(f"<img src='{name}' alt='Sanity check: rank correlation and SSIM of each method's maps with the trained model's as layers are randomised'><p>Sanity check: "
                   + (f"<b>flagged (maps barely change when the model is randomised):</b> "
                      f"{html.escape(listed)}" if flagged else "no method flagged") + ".</p>")
    if "average_drop" in s:
        out.append("<p>Confidence on the image multiplied by the map (Chattopadhyay et al. 2018; softmax of the "
                   "target class):</p>" + _table(
                       ["method", "average drop %", "increase in confidence %"],
                       [[m, v, s["increase_in_confidence"].get(m)] for m, v in s["average_drop"].items()]))
    agreement = open_group(attribution_group(plan.ds_key, layer, "agreement"))
    name = f"{base}-attribution-{layer}-agreement.png"
    measure, label = ("kendall", "Kendall τ-b") if "kendall" in agreement else ("spearman", "Spearman")
    files[name] = heatmap_png(agreement[measure], f"method agreement (pixel {label}, mean over samples)")
    out.append(f"<img src='{name}' alt='Method by method agreement of the attribution maps ({label} rank correlation)'>")
    return out


def attribution_section(open_group, plan, result, base: str, files: dict) -> list[str]:
    """HTML (and PNGs into ``files``) for one model's attribution stage on one dataset."""
    data = load_dataset(plan.dataset.model_dump())
    out = []
    for layer, s in (result.summary or {}).items():
        out.extend(_layer(open_group, plan, layer, s, base, files, data))
    return out
