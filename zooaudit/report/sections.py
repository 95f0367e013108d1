"""The stage sections of a model's page, and the one list they are registered in.

A model page (``model-<model key>.html``) has a left navigation by stage; its entries are
:data:`MODEL_SECTIONS`, in order. A section is ``Section(stage, title, render)``:
``render(ctx: ModelContext) -> list[str]`` returns the HTML fragments of one model on one
dataset (``per_dataset=True``, the default; the page puts a dataset heading above them) or of
the whole model (``per_dataset=False``: ``ctx.ref`` is the model's first dataset). A section
that returns nothing for every dataset gets no navigation entry. To add a stage's section:
write ``zooaudit/report/<stage>.py`` with its render function and append one ``Section`` here.

``render`` reads committed results only (``ctx.open(stage, group)``), adds its PNGs to
``ctx.files`` (names prefixed with ``ctx.base``), and gives each figure the line that opens its
data (``ctx.open_line(stage, group)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import xarray as xr

from .. import layout
from ..analysis.metrics import metric_kind
from .bias import bias_section
from .factorize import factorize_section
from .figures import heatmap_png
from .page import badge, esc, figure, open_line, pair, table


@dataclass
class ModelContext:
    """What a section renders from: one model's committed results on one dataset.

    ``results``: this dataset's ``StageResult`` by stage; ``night``: the headline facts of
    the run (:class:`zooaudit.report.headline.Night`: regressions fired, CKA to the previous
    night, what changed since the previous tag)."""

    store_url: str
    model: str
    ref: object                      # ActivationsRef
    results: dict
    files: dict
    night: object = None
    all_results: list = field(default_factory=list)

    @property
    def base(self) -> str:
        return f"{self.ref.model_key}-{self.ref.ds_key}"

    def snapshot(self, stage: str) -> str | None:
        r = self.results.get(stage)
        return r.snapshot if r is not None else self.ref.snapshot

    def open(self, stage: str, group: str, *, load: bool = True) -> xr.Dataset:
        """``group`` of this model's repository at the snapshot of ``stage``'s result."""
        repo = self.ref.repository.icechunk
        ds = xr.open_zarr(repo.readonly_session(snapshot_id=self.snapshot(stage)).store, group=group,
                          consolidated=False, zarr_format=3)
        return ds.load() if load else ds

    def open_line(self, stage: str, group: str) -> str:
        return open_line(self.store_url, self.ref.model_key, group, self.snapshot(stage))


@dataclass(frozen=True)
class Section:
    stage: str
    title: str
    render: Callable[[ModelContext], list[str]]
    per_dataset: bool = True


def activations_section(ctx: ModelContext) -> list[str]:
    """What was extracted (layers, shapes, pooling, controls) and how far it moved since the
    previous night (linear CKA per layer beside its shuffled-sample control)."""
    ref, res = ctx.ref, ctx.results.get("activations")
    s = (res.summary if res is not None else None) or {}
    drift = ctx.night.drift_of(ctx.model, ref.ds_key) if ctx.night is not None else None
    rows = []
    for layer in ref.layers:
        shape = (ref.shapes or {}).get(layer)
        bad = (s.get("nonfinite") or {}).get(layer)
        cka = ctl = None
        if drift and layer in drift.get("cka", {}):
            cka, ctl = drift["cka"][layer], drift.get("control", {}).get(layer)
        rows.append([esc(layer), esc(tuple(shape) if shape is not None else "–"),
                     badge(f"{bad} NaN/Inf") if bad else "0", cka if cka is not None else "–",
                     ctl if ctl is not None else "–"])
    note = ("CKA to the previous night: " + (
        "activations were a cache hit (identical to the committed ones, CKA 1 by construction)"
        if res is not None and res.skipped else "first audit of this model on this dataset (nothing to compare)"
        if not drift else f"previous activations at snapshot <code>{esc(drift['previous'][:12])}</code>"))
    controls = ", ".join(sorted(getattr(ref, "controls", {}) or {})) or "none"
    out = [f"<p>{ref.n_samples} samples · pooling <code>{esc(ref.pooling)}</code> · snapshot "
           f"<code>{esc(str(ctx.snapshot('activations'))[:12])}</code> · controls extracted: {esc(controls)}</p>",
           table(["layer", "per-sample shape", "non-finite values", "linear CKA to previous night",
                  "control (shuffled samples)"], rows),
           f"<p class='ctl'>{note}.</p>",
           f"<code class='open'>{esc(ctx.open_line('activations', layout.acts_group(ref.ds_key, ref.layers[0])))}"
           f"['activations']</code>"]
    return out


def similarity_section(ctx: ModelContext) -> list[str]:
    """Each metric's layer × layer matrix beside its control, with the line that opens it."""
    res = ctx.results.get("similarity")
    if res is None:
        return []
    out = []
    for metric in [m for m in (res.summary or {}) if isinstance(res.summary[m], dict)]:
        group = layout.similarity_group(ctx.ref.ds_key, metric)
        ds = ctx.open("similarity", group)
        kind = ds.attrs.get("kind", metric_kind(metric))
        unit = "radians (smaller = more alike)" if kind == "distance" else "unitless, 1 = identical"
        name = f"{ctx.base}-{metric}.png"
        ctx.files[name] = heatmap_png(ds["value"], f"layer × layer {metric} (n={ds.attrs.get('n')})", kind=kind,
                                      axis="layer", unit=metric + (" (radians)" if kind == "distance" else ""))
        figs = [figure(name, f"Heat map of {metric} between every pair of layers of {ctx.model}",
                       f"{esc(metric)}, {unit}", open_line=ctx.open_line("similarity", group))]
        if "control" in ds:
            cname = f"{ctx.base}-{metric}-control.png"
            ctx.files[cname] = heatmap_png(ds["control"], f"control: {ds.attrs.get('control')} "
                                           f"(n={ds.attrs.get('control_n')})", kind=kind, axis="layer",
                                           unit=metric + (" (radians)" if kind == "distance" else ""))
            figs.append(figure(cname, f"Heat map of the {metric} control ({ds.attrs.get('control')}) of {ctx.model}",
                               f"control: {esc(ds.attrs.get('control'))} — what {esc(metric)} reads when the "
                               "representations are unrelated"))
        out.append(f"<h4>{esc(metric)}</h4>" + pair(*figs))
    return out


def _factorize(ctx: ModelContext) -> list[str]:
    res = ctx.results.get("factorize")
    if res is None:
        return []
    return factorize_section(lambda g: ctx.open("factorize", g, load=False), ctx.ref, res, ctx.base, ctx.model,
                             ctx.files, open_line=lambda g: ctx.open_line("factorize", g))


def _bias(ctx: ModelContext) -> list[str]:
    res = ctx.results.get("bias")
    if res is None:
        return []
    return bias_section(lambda g: ctx.open("bias", g), ctx.ref, res, ctx.base, ctx.files,
                        open_line=lambda g: ctx.open_line("bias", g))


def changes_section(ctx: ModelContext) -> list[str]:
    """Regression events fired tonight and what changed since the previous tag (``zooaudit diff``)."""
    from .headline import changes_html, regressions_html

    if ctx.night is None:
        return []
    return [regressions_html(ctx.night.regressions_of(ctx.model)) or "<p>No regression event tonight.</p>",
            changes_html(ctx.night.diff_of(ctx.model), full=True)]


# The model page's navigation, in order. Other stages append their Section here.
MODEL_SECTIONS: list[Section] = [
    Section("changes", "Tonight", changes_section, per_dataset=False),
    Section("activations", "Activations", activations_section),
    Section("factorize", "Factorize", _factorize),
    Section("similarity", "Similarity", similarity_section),
    Section("bias", "Bias", _bias),
]


def register(section: Section, *, before: str | None = None) -> None:
    """Add a stage's section to the model pages (before the section of stage ``before``, else last);
    registering a stage twice replaces it."""
    MODEL_SECTIONS[:] = [s for s in MODEL_SECTIONS if s.stage != section.stage]
    at = next((i for i, s in enumerate(MODEL_SECTIONS) if s.stage == before), len(MODEL_SECTIONS))
    MODEL_SECTIONS.insert(at, section)


__all__ = ["MODEL_SECTIONS", "ModelContext", "Section", "register"]
