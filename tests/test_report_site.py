"""The report site (zooaudit.report): summary, model pages with a navigation by stage, zoo page.

A small zoo is audited on two "nights" through the stages themselves (no Prefect server): the
second night stores its activations as float16 (new activations, same samples: a real CKA to
the previous night) with another k. The site is then checked as HTML (every page linked, every
image with alt text and a file, tables with header cells, nothing fetched from a network) and in
a real headless Chromium: open the summary, follow a link to a model page and to the zoo page,
every image loads, no console error, sorting works; screenshots go to $ZOOAUDIT_SHOTS (default:
the test's tmp dir).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest

from zooaudit import stages, versions
from zooaudit.report import build_report, model_page_name
from zooaudit.report.page import table
from zooaudit.report.sections import MODEL_SECTIONS, Section, register
from zooaudit.specs import AuditZooSpec
from zooaudit.store import Store

CHROMIUM = os.environ.get("ZOOAUDIT_CHROMIUM", "/usr/bin/chromium")
MODELS = ["builtin:mlp-w32-s0@5", "builtin:mlp-w32-s0", "builtin:cnn-w8-s0", "builtin:cnn-colored-w16-s0"]


def _night(store_url, tag, **kw):
    """Audit MODELS through the stages (the flow's steps without Prefect), tag the night, and
    return what ``audit_zoo`` hands the report: audits, zoo results, regressions and drift."""
    from zooaudit_flows.events import activation_drift, find_regressions

    fields = dict(models=MODELS, store=store_url, shard_size=60, batch_size=32, task_runner="threads",
                  datasets=[{"name": "digits", "max_samples": 60}, {"name": "colored-digits", "max_samples": 60}],
                  factorize={"k": 3, "max_iter": 60, "methods": ["pca", "nmf"]},
                  bias={"n_boot": 20, "n_permutations": 200, "probe_cv": 2},
                  cka_drop_threshold=1e-12)
    spec = stages.validate_zoo(AuditZooSpec(**{**fields, **kw}))   # as the flow: compare layers resolved
    audits = []
    for model in MODELS:
        mspec = spec.model_spec(model)
        refs, results = [], []
        for ds in mspec.datasets:
            plan = stages.plan_extraction(mspec, ds)
            if plan is None:
                continue
            ref, res = stages.run_model_stages(plan, mspec)
            refs.append(ref)
            results.extend(res)
            for stage in stages.ARRAY_STAGES:
                if (r := stages.run_array_stage(stage.name, ref, stage.spec_of(mspec))) is not None:
                    results.append(r)
        audits.append(SimpleNamespace(model=model, refs=refs, results=results))
    by_ds = defaultdict(list)
    for a in audits:
        for ref in a.refs:
            by_ds[ref.ds_key].append(ref)
    zoo = [r for refs in by_ds.values() for st in stages.ZOO_STAGES
           for r in [stages.run_zoo_stage(st.name, refs, getattr(spec, st.spec_field),
                                          {o: getattr(spec, o) for o in st.options})] if r is not None]
    # the backfill's checkpoint trend of the mlp family on digits (epoch 5 → final)
    trend = stages.run_checkpoint_trend([audits[0].refs[0], audits[1].refs[0]], spec.factorize, spec.bias)
    drift = activation_drift.fn(audits)
    regressions = find_regressions.fn(audits, spec.cka_drop_threshold, drift)
    report = build_report(store_url, spec.model_dump(mode="json"), audits, zoo, run_id=tag,
                          regressions=regressions, drift=drift)
    versions.tag_repositories(Store.open(store_url), sorted({r.model_key for a in audits for r in a.refs}), tag)
    return SimpleNamespace(report=report, audits=audits, zoo=zoo, regressions=regressions, drift=drift, trend=trend)


@pytest.fixture(scope="module")
def two_nights(tmp_path_factory):
    store_url = "file://" + str(tmp_path_factory.mktemp("site") / "store")
    first = _night(store_url, "nightly-2026-12-01")
    second = _night(store_url, "nightly-2026-12-02", dtype="float16",
                    factorize={"k": 2, "max_iter": 60, "methods": ["pca", "nmf"]})
    return first, second


def _pages(report: str) -> dict[str, str]:
    folder = Path(report).parent
    return {p.name: p.read_text() for p in folder.glob("*.html")}


# -- fast: the registry and the page pieces ------------------------------------------------------


def test_a_stage_section_plugs_in_with_one_registration():
    before = list(MODEL_SECTIONS)
    try:
        register(Section("attribution", "Attribution", lambda ctx: ["<p>maps</p>"]), before="bias")
        stages_ = [s.stage for s in MODEL_SECTIONS]
        assert stages_.index("attribution") == stages_.index("bias") - 1
        register(Section("attribution", "Attribution maps", lambda ctx: []))      # again: replaced, moved last
        assert [s.stage for s in MODEL_SECTIONS].count("attribution") == 1 and MODEL_SECTIONS[-1].title == \
            "Attribution maps"
    finally:
        MODEL_SECTIONS[:] = before


def test_a_headline_column_plugs_into_the_summary_with_one_registration():
    from zooaudit.report.headline import SUMMARY_COLUMNS, SummaryColumn, register_column

    before = list(SUMMARY_COLUMNS)
    try:
        register_column(SummaryColumn("background reliance", lambda audit, night: ("0.1", 0.1)))
        titles = [c.title for c in SUMMARY_COLUMNS]
        assert titles.index("background reliance") == titles.index("regressions tonight") - 1
        register_column(SummaryColumn("background reliance", lambda audit, night: ("", 0)), before="nope")
        assert [c.title for c in SUMMARY_COLUMNS].count("background reliance") == 1
        assert SUMMARY_COLUMNS[-1].title == "background reliance"
    finally:
        SUMMARY_COLUMNS[:] = before


def test_tables_have_header_cells_and_sort_values():
    html = table(["model", "accuracy"], [["<a href='m.html'>m</a>", 0.25], [("<b>x</b>", 3), float("nan")]],
                 sortable=True)
    assert html.count("<th scope='col'>") == 2 and "class='sortable'" in html
    assert "data-v='0.25'>0.250</td>" in html and "<td data-v='3'><b>x</b></td>" in html and ">–</td>" in html


def test_gallery_tiles_are_nearest_neighbour_upsampled_and_sized_in_the_page():
    import numpy as np

    from zooaudit.report.factorize import TILE, _resize, gallery_png, to_rgb
    from zooaudit.report.page import png_size, with_image_sizes

    img = np.random.default_rng(0).random((1, 8, 8))
    tile = _resize(to_rgb(img), TILE, 0)
    # an 8×8 input becomes 6×6 blocks of its own pixels: no blur, no new values
    np.testing.assert_allclose(tile[..., 0], np.kron(to_rgb(img)[..., 0], np.ones((TILE // 8, TILE // 8))))
    png = gallery_png(np.repeat(img[None, None], 3, axis=1), None, np.ones((1, 3)))
    w, h = png_size(png)
    assert w >= 3 * TILE and h >= TILE
    page = with_image_sizes("<img src='g.png' alt='x'><img src='missing.png' alt='y'>", {"g.png": png})
    assert f"<img src='g.png' width='{w}' height='{h}' alt='x'>" in page and "<img src='missing.png' alt='y'>" in page


def test_previous_tag_skips_the_tag_of_the_current_version(store_url):
    import numpy as np
    import xarray as xr

    from zooaudit.keys import slug_key
    from zooaudit.report.headline import diff_since_previous_tag, previous_tag
    from zooaudit.store import commit_metadata, write_dataset

    store = Store.open(store_url)
    repository = store.model_repository(slug_key("builtin:toy"))

    def commit(key, value):
        ds = xr.Dataset({"v": ("layer", np.array([value]))}, coords={"layer": ["a"]})
        meta = commit_metadata("bias", key, {}, model="builtin:toy", dataset={"name": "d"},
                               summary={"worst_group_accuracy": value})
        repository.commit(lambda s: write_dataset(s, ds, "d/bias"), message=key, metadata=meta)

    repo = store.model_repo(slug_key("builtin:toy"))
    commit("bias-1", 0.8)
    assert previous_tag(repo) is None and diff_since_previous_tag(repo) is None
    versions.tag_version(repo, "nightly-2026-12-01")
    assert previous_tag(repo) is None               # the only tag names the current version
    commit("bias-2", 0.6)
    versions.tag_version(repo, "nightly-2026-12-02")  # tonight's tag, on the tip: compare with the night before
    tag, diff = diff_since_previous_tag(repo)
    assert tag == "nightly-2026-12-01"
    assert [(c.stage, c.status, c.metrics) for c in diff.stages] == [
        ("bias", "changed", {"worst_group_accuracy": (0.8, 0.6)})]


# -- the site of two nights ----------------------------------------------------------------------


@pytest.mark.slow
def test_site_pages_links_images_and_headlines(two_nights):
    first, second = two_nights
    pages = _pages(second.report)
    index = pages["index.html"]
    # every model has a row linking its page; every linked page exists
    for audit in second.audits:
        assert f"href='{model_page_name(audit.refs[0].model_key)}'" in index
    folder = Path(second.report).parent
    for href in set(re.findall(r"href='([^'#]+)", "".join(pages.values()))):
        assert href in pages or (folder / href).is_file(), href      # pages, and figures opened full size
    for name, html in pages.items():
        assert "http://" not in html.replace("http://www.w3.org", "") and "https://" not in html, name  # offline
        for tag in re.findall(r"<img [^>]*>", html):
            src = re.search(r"src='([^']+)'", tag).group(1)
            assert re.search(r"alt='[^']{10,}'", tag), (name, tag)
            assert (folder / src).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        for chunk in re.findall(r"<table[^>]*>(.*?)</table>", html, flags=re.S):
            assert "<th" in chunk, (name, chunk[:200])        # every table has header cells
    # headline numbers: the colour-shortcut model's worst group, with its CI; a significant disparity
    colored = next(a for a in second.audits if "colored" in a.model)
    bias = next(r for r in colored.results if r.stage == "bias")
    assert f"{bias.summary['colour']['worst_group_accuracy']:.3f}</span> <span class='ctl'>[" in index
    # CKA to the previous night: computed for the new float16 activations, beside its control
    drift = second.drift[colored.model]
    (ds_key, d), = drift.items()
    assert 0.99 < d["cka"]["embed"] <= 1 + 1e-9 and d["control"]["embed"] < 0.5
    assert json.loads((folder / "manifest.json").read_text())["cka_to_previous"] == second.drift
    assert f"embed <span class='num'>{d['cka']['embed']:.4f}</span> <span class='ctl'>(control " \
           f"{d['control']['embed']:.3f})" in index
    # the regression events of the night (threshold 1e-12: any change fires) as badges
    assert second.regressions and index.count("class='badge '") == len(second.regressions)
    assert not first.regressions and "nothing fired" in _pages(first.report)["index.html"]
    # what changed since the previous tag: the zooaudit diff of each model, k 3 → 2
    ref = second.audits[0].refs[0]
    diff = versions.diff_versions(Store.open(ref.store).model_repo(ref.model_key), "nightly-2026-12-01",
                                  "nightly-2026-12-02")
    assert {c.stage for c in diff.stages} >= {"factorize", "activations"}
    assert "since <code>nightly-2026-12-01</code>" in index and "<b>changed</b> factorize" in index
    # model page: the navigation is the registry's sections that have content, in order
    page = pages[model_page_name(colored.refs[0].model_key)]
    nav = re.findall(r"<li><a href='#([^']+)'>", page.split("</nav>")[0])
    assert nav == [s.stage for s in MODEL_SECTIONS if s.stage in nav] and {"factorize", "similarity", "bias"} <= set(nav)
    assert "open_group(Store(" in page and "Layers stored pooled have no positions" in page
    # zoo page: model × model matrix beside its control, and a history chart per headline metric
    zoo = pages["zoo.html"]
    assert "zoo-" in zoo and "-control.png" in zoo
    assert "history: worst-group accuracy" in zoo and "history: PCA explained variance at k, embed" in zoo
    assert "history: mean model × model linear_cka, embed (digits)" in zoo
    # checkpoints: similarity between consecutive checkpoints (beside its control), the backfill's trend
    assert "checkpoints: mlp-w32-s0</h2>" in zoo and "checkpoints: mlp-w32-s0 trend</h2>" in zoo
    assert "5→15" in zoo and "checkpoint-trend-" in zoo
    # the backfill's own trend report has the same chrome: alt text, header cells, the open line
    from zooaudit.report.trend import trend_report

    trend_page = Path(trend_report(ref.store, [second.trend], {})).read_text()
    assert re.search(r"<img src='trend-[^']+' width='\d+' height='\d+' alt='Line charts of CKA", trend_page)
    assert "<th scope='col'>CKA embed</th>" in trend_page and "open_group(Store(" in trend_page


SCROLL_AND_RENDER = ("y => new Promise(done => { window.scrollTo(0, y);"
                     " requestAnimationFrame(() => requestAnimationFrame(done)); })")
SHOW_PENDING_IMAGES = """async () => {
    for (const img of [...document.images].filter(i => !i.complete || i.naturalWidth === 0)) {
        img.scrollIntoView();
        await new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)));
    }
}"""


@pytest.mark.slow
def test_site_in_a_real_browser(two_nights, tmp_path):
    if not shutil.which(CHROMIUM):
        pytest.fail(f"Chromium not found at {CHROMIUM}: run `make bootstrap-ui` (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    _, second = two_nights
    shots = Path(os.environ.get("ZOOAUDIT_SHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors, requests = [], []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: requests.append(r.url))

        def check(name):
            """Screenshot the first screen; then scroll through the page (lazy images load) and
            wait until every image has loaded with a size; return the page's height."""
            page.wait_for_load_state("load")
            page.screenshot(path=str(shots / f"{name}.png"))
            height = page.evaluate("document.documentElement.scrollHeight")
            # each step waits two animation frames: a scroll and the next one inside one frame never
            # render the positions between them, so the lazy images there would never be asked for
            for y in range(0, height, 800):
                page.evaluate(SCROLL_AND_RENDER, y)
            # then, as a reader would, bring each image not yet loaded into view (a lazy image far
            # down a long page on a slow machine can still be pending after the pass above)
            page.evaluate(SHOW_PENDING_IMAGES)
            try:
                page.wait_for_function("[...document.images].every(i => i.complete && i.naturalWidth > 0)",
                                       timeout=15_000)
            except Exception:
                broken = page.evaluate("[...document.images].filter(i => !i.complete || i.naturalWidth === 0)"
                                       ".map(i => i.getAttribute('src'))")
                raise AssertionError(f"images that did not load on {name}: {broken}")
            page.evaluate("window.scrollTo(0, 0)")
            return height

        page.goto(Path(second.report).as_uri())
        heights = {"summary": check("summary")}
        # sorting: click "worst-group accuracy" — the colour-shortcut model (lowest) comes first
        page.get_by_role("columnheader", name=re.compile("worst-group accuracy")).click()
        first_row = page.locator("table.sortable tbody tr").first.inner_text()
        assert "cnn-colored" in first_row and page.locator("th[aria-sort='ascending']").count() == 1
        page.get_by_role("link", name="builtin:cnn-colored-w16-s0").click()
        heights["model"] = check("model")
        assert page.locator("nav[aria-label='sections'] a").first.is_visible()
        page.get_by_role("link", name="Bias", exact=True).click()
        assert page.locator("#bias").is_visible()
        page.locator("header").get_by_role("link", name="zoo", exact=True).click()
        heights["zoo"] = check("zoo")
        assert page.get_by_role("img", name=re.compile("between every pair of models")).count() >= 1
        browser.close()
    assert errors == []
    assert all(u.startswith("file://") for u in requests), [u for u in requests if not u.startswith("file://")]
    (shots / "heights.txt").write_text("\n".join(f"{k} {v}" for k, v in heights.items()) + "\n")
