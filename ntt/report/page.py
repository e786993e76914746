"""One self-contained HTML page: inline CSS, a few lines of inline JS (sortable tables), no network.

The page is built from sections (:class:`Page`); every table is a :func:`table` whose numeric cells carry the
exact number they show in ``data-value`` (a metric of metrics.json: the fraction as written there, shown in
percent with two decimals), so a reader can sort them and a test can check them against the json.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

__all__ = ["Cell", "Page", "esc", "metric_cell", "number_cell", "table"]

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto;
       max-width: 1200px; padding: 0 16px 48px; color: #1d1d1f; background: #fff; }
h1 { font-size: 24px; margin: 24px 0 4px; }
h2 { font-size: 19px; margin: 28px 0 8px; border-bottom: 1px solid #ddd; }
h3 { font-size: 15px; margin: 18px 0 6px; }
.note { color: #555; } .warn { background: #fff4e5; border-left: 4px solid #f0a030; padding: 6px 10px; }
table { border-collapse: collapse; margin: 6px 0 12px; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
td.num { text-align: right; } th { background: #f4f4f6; cursor: pointer; user-select: none; }
th.sorted-asc::after { content: " \\25B2"; } th.sorted-desc::after { content: " \\25BC"; }
nav a { margin-right: 12px; } pre { background: #f6f8fa; padding: 8px; overflow-x: auto; font-size: 12px; }
figure { margin: 10px 0 22px; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 13px; color: #333; } code { background: #f2f2f2; padding: 0 3px; }
details summary { cursor: pointer; }
"""

# Click a header to sort its table by that column (numbers by data-value, else by text); no library.
JS = """
document.querySelectorAll("table.sortable th").forEach(function (th) {
  th.addEventListener("click", function () {
    var table = th.closest("table"), body = table.tBodies[0], col = th.cellIndex;
    var asc = !th.classList.contains("sorted-asc");
    table.querySelectorAll("th").forEach(function (h) { h.classList.remove("sorted-asc", "sorted-desc"); });
    th.classList.add(asc ? "sorted-asc" : "sorted-desc");
    function key(row) {
      var cell = row.cells[col], v = cell ? cell.getAttribute("data-value") : null;
      if (v !== null && v !== "" && !isNaN(parseFloat(v))) { return parseFloat(v); }
      return cell ? cell.textContent : "";
    }
    Array.from(body.rows).sort(function (a, b) {
      var x = key(a), y = key(b);
      var c = (typeof x === "number" && typeof y === "number") ? x - y : String(x).localeCompare(String(y));
      return asc ? c : -c;
    }).forEach(function (row) { body.appendChild(row); });
  });
});
"""


def esc(value: Any) -> str:
    """HTML-escaped text of ``value``."""
    return html.escape(str(value), quote=True)


class Cell:
    """A table cell: its shown text, and for numbers the exact value and a key naming it.

    Args:
        text: what the cell shows.
        value: the exact number (``data-value``; sorting and tests read it).
        key: what the number is (``data-key``, e.g. ``bbox.AP`` or ``per_class.3.segm_AP50``).
        html_text: ``text`` is HTML already (a link, an image).
    """

    def __init__(
        self, text: Any, value: float | None = None, key: str | None = None, html_text: bool = False
    ):
        self.text, self.value, self.key, self.html_text = text, value, key, html_text

    def render(self) -> str:
        attrs = ""
        if self.value is not None:
            attrs += f' class="num" data-value="{esc(repr(float(self.value)))}"'
        if self.key is not None:
            attrs += f' data-key="{esc(self.key)}"'
        return f"<td{attrs}>{self.text if self.html_text else esc(self.text)}</td>"


def metric_cell(value: Any, key: str) -> Cell:
    """A COCO metric (fraction in [0, 1]; -1 or None: no ground truth) shown in percent, two decimals."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or float(value) < 0:
        return Cell("n/a", None, key)
    return Cell(f"{100.0 * float(value):.2f}", float(value), key)


def number_cell(value: Any, key: str | None = None, digits: int | None = None) -> Cell:
    """A plain number (a count, or a percent already: ``digits`` decimals); None or NaN: ``-``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return Cell("-", None, key)
    text = str(int(value)) if digits is None else f"{float(value):.{digits}f}"
    return Cell(text, float(value), key)


def table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], *, cls: str = "sortable", id: str = ""
) -> str:
    """An HTML table; a row item is a :class:`Cell` or plain text."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = "".join(c.render() if isinstance(c, Cell) else Cell(c).render() for c in row)
        body.append(f"<tr>{cells}</tr>")
    ident = f' id="{esc(id)}"' if id else ""
    return f'<table class="{cls}"{ident}><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


class Page:
    """An HTML page assembled from titled sections.

    Args:
        title: the page's title (``<title>`` and the heading).
        subtitle: a line under the heading.
    """

    def __init__(self, title: str, subtitle: str = "") -> None:
        self.title, self.subtitle = title, subtitle
        self.sections: list[tuple[str, str, str]] = []

    def add(self, anchor: str, heading: str, body: str) -> None:
        """A section with an ``<h2>`` and its HTML body."""
        self.sections.append((anchor, heading, body))

    def render(self) -> str:
        nav = " ".join(f'<a href="#{esc(a)}">{esc(h)}</a>' for a, h, _ in self.sections)
        parts = [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            # no request may leave the page: images are data URIs, nothing else is loaded
            '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; '
            "style-src 'unsafe-inline'; script-src 'unsafe-inline'\">",
            f"<title>{esc(self.title)}</title><style>{CSS}</style></head><body>",
            f"<h1>{esc(self.title)}</h1>",
            f'<p class="note">{esc(self.subtitle)}</p>' if self.subtitle else "",
            f"<nav>{nav}</nav>",
        ]
        for anchor, heading, body in self.sections:
            parts.append(f'<section id="{esc(anchor)}"><h2>{esc(heading)}</h2>{body}</section>')
        parts.append(f"<script>{JS}</script></body></html>")
        return "\n".join(p for p in parts if p) + "\n"
