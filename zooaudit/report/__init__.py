"""The HTML report of a run: a small static site under ``<store>/reports/<run-id>/``.

    index.html            summary: one row per model — headline numbers beside their controls and
                          CIs, a badge per regression event fired tonight, what changed since the
                          previous tag; sortable; links to the pages below
    model-<key>.html      one per model: a left navigation by stage (``sections.MODEL_SECTIONS``)
    zoo.html              model × model matrices with their control, checkpoint trends, the
                          shortcut sweep, a cross-night history chart per headline metric
    *.png, manifest.json  figures; the spec and every stage's cache key and snapshot

Pages are plain HTML with one inline stylesheet and sort script: they open from ``file://``
with nothing fetched from the network. Reports are never overwritten: an existing run folder
is an error. A run whose inputs are exactly those of an earlier report (same spec, every stage
at the same cache key and snapshot, the same regressions and tags — a warm nightly rerun with no
zoo change) reuses that report and writes nothing: ``<store>/reports/by-key/<key>`` names the
folder rendered for each input key.
"""

from __future__ import annotations

import datetime as dt
import json

from ..errors import ZooauditError
from ..keys import cache_key
from ..store import Store
from .headline import SUMMARY_COLUMNS, Night, diff_since_previous_tag
from .page import OPEN_IMPORT, esc, frame, slug, table, with_image_sizes
from . import stage_sections  # noqa: F401 — registers the attribution and bias-measures sections
from .sections import MODEL_SECTIONS, ModelContext
from .zoo_pages import zoo_parts


def model_page_name(model_key: str) -> str:
    return f"model-{model_key}.html"


LINKS = [("index.html", "summary"), ("zoo.html", "zoo")]   # every page's header


def _model_page(store_url, audit, night, files, subtitle) -> str:
    """One model's page: a section per registered stage, a dataset heading inside each."""
    nav, body = [], []
    for section in MODEL_SECTIONS:
        chunks = []
        refs = audit.refs[:1] if not section.per_dataset else audit.refs
        for ref in refs:
            res = {r.stage: r for r in audit.results if r.dataset == ref.ds_key}
            ctx = ModelContext(store_url, audit.model, ref, res, files, night, list(audit.results))
            got = [h for h in section.render(ctx) if h]
            if got and section.per_dataset:
                chunks.append(f"<h3>{esc(ref.dataset.name)} <small class='ctl'>({esc(ref.ds_key)}, "
                              f"{ref.n_samples} samples)</small></h3>")
            chunks.extend(got)
        if chunks:
            anchor = slug(section.stage)
            nav.append((f"#{anchor}", section.title))
            body.append(f"<section id='{anchor}'><h2>{esc(section.title)}</h2>{''.join(chunks)}</section>")
    intro = (f"<p class='ctl'>Every figure shows the line that opens its data with xarray, after "
             f"<code>{esc(OPEN_IMPORT)}</code>.</p>")
    return frame(f"zooaudit: {audit.model}", intro + "".join(body), nav=nav, subtitle=subtitle,
                 links=LINKS)


def _summary_row(audit, night) -> list:
    link = (f"<a href='{model_page_name(audit.refs[0].model_key)}'>{esc(audit.model)}</a>" if audit.refs
            else esc(audit.model))
    return [(link, audit.model)] + [column.cell(audit, night) for column in SUMMARY_COLUMNS]


def _summary_page(store, audits, zoo_results, night, run, subtitle) -> str:
    rows = [_summary_row(a, night) for a in audits]
    n_regs = len(night.regressions)
    lead = (f"<p><b>{n_regs} regression event{'s' if n_regs != 1 else ''} tonight</b> across {len(audits)} models"
            + ("" if n_regs else " — nothing fired") + ". Click a column header to sort; a model's name opens its "
            "page; the <a href='zoo.html'>zoo page</a> has the model × model matrices and the history across nights."
            "</p>")
    legend = ("<p class='ctl'>Brackets: bootstrap confidence interval. Control beside CKA: the same CKA with the "
              "previous night's samples shuffled (unrelated representations). Disparities are significant after "
              "the run's multiple-testing correction. CKA to the previous night is measured only for activations "
              "extracted tonight; a cache hit is identical to the committed activations.</p>")
    zoo_links = "".join(f"<li><a href='zoo.html#{slug('zoo-' + z.dataset)}'>{esc(z.stage)} on {esc(z.dataset)}</a>"
                        f"{' (cache hit)' if z.skipped else ''}</li>" for z in zoo_results)
    body = (lead + table(["model"] + [c.title for c in SUMMARY_COLUMNS], rows, sortable=True) + legend
            + (f"<h2>Zoo</h2><ul>{zoo_links}</ul>" if zoo_links else ""))
    return frame("zooaudit: tonight's audit", body, subtitle=subtitle, links=LINKS)


def _zoo_page(store, audits, zoo_results, compare_layers, files, subtitle) -> str:
    parts = zoo_parts(store, audits, zoo_results, compare_layers, files)
    nav = [(f"#{a}", t) for a, t, _ in parts]
    body = "".join(f"<section id='{a}'><h2>{esc(t)}</h2>{h}</section>" for a, t, h in parts)
    anchors = "".join(f"<span id='{slug('zoo-' + z.dataset)}'></span>" for z in zoo_results
                      if z.stage == "zoo-similarity")
    return frame("zooaudit: the zoo", anchors + (body or "<p>No zoo-level results in this run.</p>"), nav=nav,
                 subtitle=subtitle, links=LINKS)


def night_of(store, audits, regressions=None, drift=None, compare_layers=()) -> Night:
    """The run's regressions and drift, and each model's changes since its previous tag."""
    diffs = {}
    for audit in audits:
        if audit.refs:
            diffs[audit.model] = diff_since_previous_tag(store.model_repo(audit.refs[0].model_key))
    return Night(list(regressions or []), dict(drift or {}), diffs, list(compare_layers))


def build_report(store_url: str, spec: dict, audits, zoo_results, run_id: str | None = None, *,
                 regressions: list | None = None, drift: dict | None = None) -> str:
    """Render the run's report site; return the path/URL of its ``index.html`` (the summary).

    ``regressions``: the run's regression events (``zooaudit_flows.events.find_regressions``);
    ``drift``: CKA to the previous night per model, dataset and layer. Reuses (and returns) an
    earlier report rendered from the same inputs instead of rendering it again (see the module
    docstring)."""
    store = Store(store_url)
    fs = store.fs
    compare_layers = list(spec.get("compare_layers") or [])
    night = night_of(store, audits, regressions, drift, compare_layers)
    inputs = report_key(spec, audits, zoo_results, regressions=regressions, drift=drift,
                        tags={m: d[0] for m, d in night.diffs.items() if d})
    marker = store.path("reports", "by-key", inputs)
    if fs.exists(marker):
        earlier = fs.cat_file(marker).decode().strip()
        if fs.exists(earlier):
            return earlier
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    run = f"{stamp}-{(run_id or 'local')[:8]}"
    folder = store.path("reports", run)
    if fs.exists(folder):
        raise ZooauditError(f"Report folder {folder} already exists; reports are never overwritten.")
    files: dict[str, bytes] = {}
    manifest = {"run": run, "flow_run_id": run_id, "spec": spec, "models": [], "zoo": [],
                "regressions": list(regressions or []), "cka_to_previous": dict(drift or {})}
    subtitle = (f"run {esc(run)} · {len(audits)} models · store <code>{esc(store.url)}</code>")
    for z in zoo_results:
        manifest["zoo"].append({"stage": z.stage, "dataset": z.dataset, "cache_key": z.cache_key,
                                "snapshot": z.snapshot})
    for audit in audits:
        manifest["models"].append({"model": audit.model, "stages": [r.to_dict() for r in audit.results]})
        if audit.refs:
            files[model_page_name(audit.refs[0].model_key)] = _model_page(store.url, audit, night, files,
                                                                          subtitle).encode()
    files["zoo.html"] = _zoo_page(store, audits, zoo_results, compare_layers, files, subtitle).encode()
    files["index.html"] = _summary_page(store, audits, zoo_results, night, run, subtitle).encode()
    for name in [n for n in files if n.endswith(".html")]:
        files[name] = with_image_sizes(files[name].decode(), files).encode()
    files["manifest.json"] = json.dumps(manifest, indent=2, default=str).encode()
    for name, data in files.items():
        with fs.open(f"{folder}/{name}", "wb") as fh:
            fh.write(data)
    # Written last: a crash mid-render leaves no marker, so the next run renders afresh.
    with fs.open(marker, "wb") as fh:
        fh.write(f"{folder}/index.html".encode())
    return f"{folder}/index.html"


def report_key(spec: dict, audits, zoo_results, *, regressions=None, drift=None, tags=None) -> str:
    """Content key of a report's inputs: the spec, every (stage, dataset, cache key, snapshot) it
    shows, the regressions and drift of the run and the previous tag of each model. Equal keys
    render equal reports (up to the run stamp)."""
    stages = [[a.model, r.stage, r.dataset, r.cache_key, r.snapshot] for a in audits for r in a.results]
    zoo = [[z.stage, z.dataset, z.cache_key, z.snapshot] for z in zoo_results]
    extra = {"regressions": regressions, "drift": drift, "tags": tags} if (regressions or drift or tags) else {}
    return cache_key("report", spec=spec, stages=stages, zoo=zoo, **extra)
