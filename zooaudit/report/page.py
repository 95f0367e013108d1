"""The chrome of the report site: one stylesheet and one sort script (inline, no CDN), the
page frame with its left navigation, and the small HTML pieces every page uses (figures
with alt text and the line that opens their data, tables with header cells, badges).

Pages are plain files that open from ``file://`` (the store) as from any static server:
links are relative, nothing is fetched from the network, images are PNG files beside the
pages (``loading="lazy"`` below the first screen).
"""

from __future__ import annotations

import html
import math
import re

CSS = """
:root{--fg:#1b1f24;--muted:#57606a;--line:#d0d7de;--bad:#b42318;--ok:#1a7f37;--warn:#9a6700;--bg2:#f6f8fa}
*{box-sizing:border-box}body{font:14px/1.45 system-ui,sans-serif;color:var(--fg);margin:0}
header{padding:10px 20px;border-bottom:1px solid var(--line);background:var(--bg2)}
header h1{font-size:18px;margin:0 0 2px}header p{margin:0;color:var(--muted)}
header a{margin-right:14px}
.wrap{display:flex;align-items:flex-start}
nav{position:sticky;top:0;min-width:190px;max-width:220px;padding:14px 12px;border-right:1px solid var(--line);
 height:100vh;overflow:auto;font-size:13px}
nav ul{list-style:none;padding:0;margin:0}nav li{margin:2px 0}nav a{text-decoration:none}
nav h2{font-size:12px;text-transform:uppercase;color:var(--muted);margin:10px 0 4px}
main{padding:12px 24px;max-width:1200px;flex:1}
h2{font-size:17px;border-bottom:1px solid var(--line);padding-bottom:3px;margin-top:26px}
h3{font-size:15px;margin:18px 0 6px}h4{font-size:14px;margin:14px 0 4px}
table{border-collapse:collapse;margin:6px 0 10px}
td,th{border:1px solid var(--line);padding:3px 8px;font-size:13px;vertical-align:top;text-align:left}
th{background:var(--bg2)}tr.cell td{color:var(--muted)}
table.sortable th{cursor:pointer}table.sortable th:after{content:" \\2195";color:var(--muted)}
.num{font-variant-numeric:tabular-nums;white-space:nowrap}
.ctl{color:var(--muted);font-size:12px}
.badge{display:inline-block;border-radius:9px;padding:0 7px;margin:1px 2px;font-size:12px;color:#fff;
 background:var(--bad);white-space:nowrap}
.badge.ok{background:var(--ok)}.badge.info{background:#57606a}
figure{margin:8px 0 14px;display:inline-block;vertical-align:top;max-width:100%}
figure img{max-width:100%;height:auto;border:1px solid var(--line)}
img.px{image-rendering:pixelated}
figcaption{font-size:12px;color:var(--muted);max-width:540px}
figure+figure{margin-left:14px}
.pair{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}.pair figure{margin:4px 0}
code.open{display:block;font-size:11px;background:var(--bg2);padding:3px 6px;margin-top:3px;
 white-space:pre-wrap;word-break:break-all;color:var(--fg)}
.note{border-left:3px solid var(--warn);background:#fff8c5;padding:4px 10px;margin:6px 0}
ul.changes{margin:2px 0;padding-left:18px}
"""

# Click (or Enter on) a header cell of a table.sortable: rows sort by the cells' data-v
# (a number where one was given) or their text; a second click reverses.
SORT_JS = """
document.querySelectorAll('table.sortable').forEach(function(t){
 t.querySelectorAll('thead th').forEach(function(th,i){
  th.tabIndex=0;
  function go(){var b=t.tBodies[0],up=th.getAttribute('aria-sort')!=='ascending';
   t.querySelectorAll('thead th').forEach(function(h){h.removeAttribute('aria-sort')});
   th.setAttribute('aria-sort',up?'ascending':'descending');
   function key(r){var c=r.cells[i],v=c.getAttribute('data-v');v=v===null?c.textContent.trim():v;
    var n=parseFloat(v);return isNaN(n)?[1,v]:[0,n]}
   Array.prototype.slice.call(b.rows).sort(function(x,y){var p=key(x),q=key(y);
    var d=p[0]-q[0]||(p[0]?String(p[1]).localeCompare(q[1]):p[1]-q[1]);return up?d:-d})
   .forEach(function(r){b.appendChild(r)})}
  th.addEventListener('click',go);th.addEventListener('keydown',function(e){if(e.key==='Enter')go()});
 })});
"""


def esc(v) -> str:
    return html.escape(str(v))


def fmt(v, digits: int = 3) -> str:
    """A number for a cell: ``–`` for None/NaN, else ``digits`` decimals."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, float) else esc(v)


def frame(title: str, body: str, *, nav: list[tuple[str, str]] = (), subtitle: str = "",
          links: list[tuple[str, str]] = ()) -> str:
    """A whole page: header (title, subtitle, links to the other pages), a left navigation of
    ``(anchor or href, label)`` entries when given, and ``body``."""
    top = "".join(f"<a href='{esc(h)}'>{esc(t)}</a>" for h, t in links)
    side = ""
    if nav:
        items = "".join(f"<li><a href='{esc(h)}'>{esc(t)}</a></li>" for h, t in nav)
        side = f"<nav aria-label='sections'><h2>On this page</h2><ul>{items}</ul></nav>"
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><meta name='viewport' "
            f"content='width=device-width,initial-scale=1'><title>{esc(title)}</title><style>{CSS}</style></head>"
            f"<body><header><h1>{esc(title)}</h1><p>{subtitle}</p><p>{top}</p></header>"
            f"<div class='wrap'>{side}<main>{body}</main></div><script>{SORT_JS}</script></body></html>")


def figure(src: str, alt: str, caption: str = "", *, open_line: str | None = None, pixelated: bool = False,
           lazy: bool = True) -> str:
    """``<figure>`` of one PNG with its alt text, caption and the line that opens its data."""
    cls = " class='px'" if pixelated else ""
    load = " loading='lazy'" if lazy else ""
    code = f"<code class='open'>{esc(open_line)}</code>" if open_line else ""
    cap = f"<figcaption>{caption}{code}</figcaption>" if caption or code else ""
    return f"<figure><img src='{esc(src)}' alt='{esc(alt)}'{cls}{load}>{cap}</figure>"


def pair(*figures: str) -> str:
    """Figures side by side (a value beside its control)."""
    return "<div class='pair'>" + "".join(figures) + "</div>"


def table(header: list[str], rows: list[list], *, sortable: bool = False, caption: str = "") -> str:
    """A table with ``<th scope=col>`` headers; a cell is a str (HTML, used as is), a number
    (formatted, and its value kept in ``data-v`` for sorting) or a ``(html, sort value)`` pair."""
    head = "".join(f"<th scope='col'>{esc(h)}</th>" for h in header)

    def cell(c):
        if isinstance(c, tuple):
            h, v = c
            return f"<td data-v='{esc(v)}'>{h}</td>"
        if isinstance(c, str):
            return f"<td>{c}</td>"
        return f"<td class='num' data-v='{esc(c)}'>{fmt(c)}</td>"

    body = "".join("<tr>" + "".join(cell(c) for c in r) + "</tr>" for r in rows)
    cap = f"<caption>{caption}</caption>" if caption else ""
    cls = " class='sortable'" if sortable else ""
    return f"<table{cls}>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def badge(text: str, kind: str = "") -> str:
    return f"<span class='badge {kind}'>{esc(text)}</span>"


def open_line(store_url: str, repo: str, group: str, snapshot: str | None) -> str:
    """The Python line that opens ``group`` of a repository at ``snapshot`` with xarray.
    ``repo``: a model key, or ``"zoo"`` for the zoo repository."""
    where = "zoo_repo()" if repo == "zoo" else f"model_repo({repo!r})"
    at = f", snapshot={snapshot!r}" if snapshot else ""
    return f"open_group(Store({store_url!r}).{where}, {group!r}{at})"


OPEN_IMPORT = "from zooaudit.store import Store, open_group"


def png_size(data: bytes) -> tuple[int, int]:
    """``(width, height)`` of PNG bytes (from the IHDR chunk)."""
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def with_image_sizes(page: str, files: dict[str, bytes]) -> str:
    """Give every ``<img src='NAME'`` of a page whose PNG is in ``files`` its width and height, so
    the layout does not move while (lazy) images load and page heights are known before they do."""
    def sized(m):
        data = files.get(html.unescape(m.group(1)))
        if data is None or data[:8] != b"\x89PNG\r\n\x1a\n":
            return m.group(0)
        w, h = png_size(data)
        return f"{m.group(0)} width='{w}' height='{h}'"

    return re.sub(r"<img src='([^']+)'", sized, page)


def slug(text: str) -> str:
    """An anchor id: letters, digits and '-' only."""
    return "".join(c if c.isalnum() else "-" for c in str(text)).strip("-").lower() or "x"
