"""Page heights and load times of a report site in headless Chromium, against an earlier report.

    .venv/bin/python benchmarks/bench_report_pages.py --before STORE/reports/OLD/index.html \
        --after STORE/reports/NEW/index.html [--out benchmarks/out/report-site]

Every ``*.html`` of each report folder is opened from its ``file://`` URL at 1400×1800 (the
viewport the issue counts screens in); the script scrolls through the page so lazy images load,
then records the page's height (px and screens), its load time (``loadEventEnd`` of the
navigation), image count, images that failed, console errors, and a screenshot of the first
screen under ``--out``. The ratio printed is the tallest page before over the tallest after, and
the summary page before over after (what a reader opens first).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

W, H = 1400, 1800
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


def measure(browser, index: Path, out: Path, label: str) -> list[dict]:
    rows = []
    page = browser.new_page(viewport={"width": W, "height": H})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    names = ["index.html"] + sorted(p.name for p in index.parent.glob("*.html") if p.name != "index.html")
    for name in names:
        errors.clear()
        page.goto((index.parent / name).as_uri(), wait_until="load")
        load_ms = page.evaluate("performance.getEntriesByType('navigation')[0].loadEventEnd")
        page.screenshot(path=str(out / f"{label}-{name}.png"))
        height = page.evaluate("document.documentElement.scrollHeight")
        for y in range(0, height, H // 2):
            page.evaluate(f"window.scrollTo(0, {y})")
        page.wait_for_function("[...document.images].every(i => i.complete)", timeout=30_000)
        broken = page.evaluate("[...document.images].filter(i => i.naturalWidth === 0).length")
        rows.append({"report": label, "page": name, "height_px": height, "screens": round(height / H, 1),
                     "load_ms": round(load_ms), "images": page.evaluate("document.images.length"),
                     "broken_images": broken, "console_errors": len(errors)})
    page.close()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, type=Path, help="index.html of the earlier report")
    p.add_argument("--after", required=True, type=Path, help="index.html of the report site")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/report-site"))
    p.add_argument("--chromium", default="/usr/bin/chromium")
    args = p.parse_args()
    if not shutil.which(args.chromium):
        raise SystemExit(f"Chromium not found at {args.chromium}: run `make bootstrap-ui`")
    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.chromium, headless=True, args=ARGS)
        rows = measure(browser, args.before, args.out, "before") + measure(browser, args.after, args.out, "after")
        browser.close()
    for r in rows:
        print(f"{r['report']:6s} {r['page']:55s} {r['height_px']:6d} px {r['screens']:5.1f} screens "
              f"{r['load_ms']:5d} ms  {r['images']:3d} images ({r['broken_images']} broken), "
              f"{r['console_errors']} console errors")
    before = [r for r in rows if r["report"] == "before"]
    after = [r for r in rows if r["report"] == "after"]
    tallest = max(r["height_px"] for r in before) / max(r["height_px"] for r in after)
    first = before[0]["height_px"] / after[0]["height_px"]
    print(f"tallest page before / after: {tallest:.1f}x; summary (index.html) before / after: {first:.1f}x; "
          f"slowest load after: {max(r['load_ms'] for r in after)} ms")
    (args.out / "pages.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
