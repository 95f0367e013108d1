"""The zoo page of the report site: model × model matrices beside their control, the
similarity between consecutive checkpoints, the shortcut sweep, and a cross-night history
chart per headline metric read from the repositories' tags.

Each part returns ``(anchor, title, html)`` so the page builds its navigation from them.
"""

from __future__ import annotations

import math

import xarray as xr

from .. import versions
from ..analysis.metrics import metric_kind
from ..keys import slug_key
from .bias import shortcut_sweep_section
from .figures import heatmap_png, history_png, trend_png
from .page import esc, figure, open_line, pair, slug, table
from .summary import CONTROL_LABELS, _mean_offdiag

HISTORY_NIGHTS = 30   # the history charts show the latest this many tags (and tonight)


def _open(repo, snapshot, group):
    return xr.open_zarr(repo.readonly_session(snapshot_id=snapshot).store, group=group, consolidated=False,
                        zarr_format=3).load()


def zoo_similarity_parts(store, z, files: dict) -> list[tuple[str, str, str]]:
    """Model × model heat maps per metric and compare layer, each beside its control."""
    repo = store.zoo_repo()
    parts = []
    for metric, group in z.summary["groups"].items():
        ds = _open(repo, z.snapshot, group)
        kind = ds.attrs.get("kind", metric_kind(metric))
        unit = metric + (" (radians)" if kind == "distance" else "")
        for layer in ds["value"]["layer_a"].values:
            figs = []
            for var in ("value", "control"):
                if var not in ds:
                    continue
                mat = ds[var].sel(layer_a=layer, layer_b=layer)
                mat = mat.dropna("model_a", how="all").dropna("model_b", how="all")
                name = f"zoo-{z.dataset}-{metric}-{layer}{'-control' if var == 'control' else ''}.png"
                label = CONTROL_LABELS.get(ds.attrs.get("control"), "control")
                title = (f"{metric}, layer {layer}" if var == "value" else
                         f"control: {label} (n={ds.attrs.get('control_n')})")
                files[name] = heatmap_png(mat, title, kind=kind, axis="model", unit=unit)
                alt = (f"Heat map of {metric} between every pair of models at layer {layer} on {z.dataset}"
                       if var == "value" else f"Heat map of the {metric} control ({label}) at layer {layer}")
                cap = (f"{esc(metric)} between models at layer <code>{esc(layer)}</code>" if var == "value" else
                       f"control ({esc(label)}): what {esc(metric)} reads for unrelated representations")
                figs.append(figure(name, alt, cap, open_line=open_line(store.url, "zoo", group, z.snapshot)
                                   if var == "value" else None))
            parts.append((slug(f"zoo-{z.dataset}-{metric}-{layer}"), f"{metric}, {layer} ({z.dataset})", pair(*figs)))
    return parts


def revision_parts(store, z, files: dict) -> list[tuple[str, str, str]]:
    """Similarity between consecutive checkpoints of each family, per layer, with its control."""
    repo = store.zoo_repo()
    parts = []
    for family, per_metric in z.summary["families"].items():
        for metric, info in per_metric.items():
            ds = _open(repo, z.snapshot, info["group"])
            value = ds["value"]
            value.attrs["metric"] = metric
            name = f"revisions-{z.dataset}-{slug_key(family, 32)}-{metric}.png"
            value.attrs["kind"] = metric_kind(metric)
            files[name] = trend_png(value, f"{family}: {metric} between consecutive checkpoints",
                                    ds["control"] if "control" in ds else None)
            rows = []
            for step in value["step"].values:
                for layer in value["layer"].values:
                    c = float(ds["control"].sel(step=step, layer=layer)) if "control" in ds else None
                    rows.append([esc(step), esc(layer), float(value.sel(step=step, layer=layer)),
                                 c if c is not None else "–"])
            html_ = pair(figure(name, f"Line chart of {metric} between consecutive checkpoints of {family}",
                                f"{esc(metric)} between consecutive checkpoints, one line per layer (x: checkpoint "
                                "step); dashed: its control",
                                open_line=open_line(store.url, "zoo", info["group"], z.snapshot)), table(
                ["step", "layer", metric, f"control ({CONTROL_LABELS.get(info.get('control_kind', 'shuffle'), 'control')})"],
                rows))
            parts.append((slug(f"rev-{z.dataset}-{family}-{metric}"), f"checkpoints: {family.replace('builtin:', '')}",
                          html_))
    return parts


def checkpoint_trend_parts(store, files: dict) -> list[tuple[str, str, str]]:
    """The latest committed checkpoint trend of each family × dataset (written by the backfill):
    CKA to the final checkpoint, explained variance at k, worst-group accuracy per checkpoint."""
    from .trend import trend_png as checkpoint_png

    repo = store.zoo_repo()
    parts = []
    for (stage, dataset), v in sorted(versions.stages_at(repo, None).items()):
        if stage != "checkpoint-trend" or "group" not in (v.summary or {}):
            continue
        family = v.summary.get("family", "?")
        ds = _open(repo, v.snapshot, v.summary["group"])
        name = f"checkpoint-trend-{slug_key(family, 32)}-{slug(dataset)}.png"
        files[name] = checkpoint_png(ds, f"{family} on {dataset}: headline metrics against the checkpoint")
        parts.append((slug(f"trend-{family}-{dataset}"), f"checkpoints: {family.replace('builtin:', '')} trend",
                      figure(name, f"Line charts of CKA to the final checkpoint, explained variance and worst-group "
                             f"accuracy against the checkpoint of {family}",
                             "against the checkpoint (epoch): linear CKA to the final checkpoint, PCA explained "
                             "variance at k, worst-group accuracy (fractions, 0–1); committed by the backfill",
                             open_line=open_line(store.url, "zoo", v.summary["group"], v.snapshot))))
    return parts


# -- history across nights ---------------------------------------------------------------------


def _headlines_of(stages: dict, compare_layers: list[str]) -> dict[str, float]:
    """Headline metrics from the commit summaries of one version's stages."""
    out: dict[str, float] = {}
    wga = [s["worst_group_accuracy"] for (stage, _), v in stages.items() if stage == "bias"
           for s in (v.summary or {}).values() if isinstance(s, dict) and "worst_group_accuracy" in s]
    if wga:
        out["worst-group accuracy"] = min(wga)
    flagged = [abs(d["difference"]) for (stage, _), v in stages.items() if stage == "bias"
               for s in (v.summary or {}).values() if isinstance(s, dict)
               for d in (s.get("disparities") or {}).values() if d.get("flagged")]
    if any(isinstance(s, dict) and s.get("disparities") for (stage, _), v in stages.items() if stage == "bias"
           for s in (v.summary or {}).values()):
        out["largest significant disparity"] = max(flagged, default=0.0)
    for (stage, _), v in stages.items():
        if stage != "factorize":
            continue
        ev = (v.summary or {}).get("explained_variance", {})
        for layer in compare_layers:
            val = ev.get(f"{layer}/pca")
            if isinstance(val, (int, float)) and not math.isnan(val):
                out.setdefault(f"PCA explained variance at k, {layer}", float(val))
    return out


def _zoo_headlines_of(stages: dict) -> dict[str, float]:
    """Mean off-diagonal model × model similarity per metric and compare layer (zoo-similarity summaries)."""
    out = {}
    for (stage, dataset), v in stages.items():
        s = v.summary or {}
        if stage != "zoo-similarity":
            continue
        for metric in s.get("groups", {}):
            for layer, mat in (s.get(metric) or {}).items():
                out[f"mean model × model {metric}, {layer} ({dataset.split('@')[0]})"] = _mean_offdiag(mat)
    return out


def history_parts(store, audits, compare_layers: list[str], files: dict) -> list[tuple[str, str, str]]:
    """One chart per headline metric: its value per model on each tagged night, and tonight (main);
    the zoo's mean model × model similarity as the line "zoo"."""
    per_model: dict[str, dict[str, dict[str, float]]] = {}
    nights: set[str] = set()
    for audit in audits:
        if not audit.refs:
            continue
        repo = store.model_repo(audit.refs[0].model_key)
        tags = sorted(repo.list_tags())[-HISTORY_NIGHTS:]
        nights.update(tags)
        per_model[audit.model] = {t: _headlines_of(versions.stages_at(repo, t), compare_layers) for t in tags}
        per_model[audit.model]["tonight"] = _headlines_of(versions.stages_at(repo, None), compare_layers)
    zoo_repo = store.zoo_repo()
    zoo_tags = sorted(zoo_repo.list_tags())[-HISTORY_NIGHTS:]
    nights.update(zoo_tags)
    per_model["zoo"] = {t: _zoo_headlines_of(versions.stages_at(zoo_repo, t)) for t in zoo_tags}
    per_model["zoo"]["tonight"] = _zoo_headlines_of(versions.stages_at(zoo_repo, None))
    axis = sorted(nights)[-HISTORY_NIGHTS:] + ["tonight"]
    metrics = sorted({m for by_night in per_model.values() for h in by_night.values() for m in h})
    parts = []
    for metric in metrics:
        series = {model: [by_night.get(n, {}).get(metric) for n in axis] for model, by_night in per_model.items()}
        series = {m: v for m, v in series.items() if any(x is not None for x in v)}
        name = f"history-{slug(metric)}.png"
        files[name] = history_png(axis, series, metric, f"{metric} across nights")
        rows = [[esc(m.replace("builtin:", ""))] + [x if x is not None else "–" for x in v] for m, v in series.items()]
        zero = " (|difference| of the flagged disparity; 0: none significant)" if "disparity" in metric else ""
        parts.append((slug(f"history-{metric}"), f"history: {metric}", pair(figure(
            name, f"Line chart of {metric} per model across the tagged nights",
            f"{esc(metric)}{zero} per model on each tagged night (read from the tags' commit summaries) and "
            "tonight; a gap: no result that night."),
            table(["model"] + [n.removeprefix("nightly-") for n in axis], rows, sortable=True))))
    return parts


def zoo_parts(store, audits, zoo_results, compare_layers: list[str], files: dict) -> list[tuple[str, str, str]]:
    """Every part of the zoo page, in order."""
    parts = []
    for z in zoo_results:
        if z.stage == "zoo-similarity":
            parts.extend(zoo_similarity_parts(store, z, files))
    for z in zoo_results:
        if z.stage == "revision-similarity":
            parts.extend(revision_parts(store, z, files))
    parts.extend(checkpoint_trend_parts(store, files))
    sweep = shortcut_sweep_section(audits, files)
    if sweep:
        parts.append(("shortcut-sweep", "shortcut sweep", "".join(sweep)))
    from .bias_measures import measures_sweep_section, zoo_biasamp_section, zoo_measures_table

    if measures := (measures_sweep_section(audits, files) + zoo_biasamp_section(audits, files)
                    + zoo_measures_table(audits)):
        parts.append(("bias-measures", "bias beyond accuracy across the zoo", "".join(measures)))
    from .reliance_zoo import zoo_reliance_section

    if reliance := zoo_reliance_section(audits):
        parts.append(("background-reliance", "background reliance across the zoo", "".join(reliance)))
    parts.extend(history_parts(store, audits, compare_layers, files))
    return parts
