"""HTML building blocks of the report: escaped tables, embedded figures and the page itself.

The page is self-contained: plotly.js is inlined once in one ``<script>``, each
figure is a JSON document in a ``<script type="application/json">`` block that
one loader script hands to ``Plotly.newPlot``, and the plotly layout template
shared by all figures is stored once. No resource is loaded from a URL or a
file path, so the page renders without a network.
"""

from __future__ import annotations

import html
import json
import numbers
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
import plotly.offline
from plotly.utils import PlotlyJSONEncoder

from nerve_cli.report.formatting import format_value

__all__ = ["FigureSet", "render_table", "render_paragraphs", "render_document", "escape"]

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto;
       max-width: 1400px; padding: 0 1.5rem 3rem; color: #1b1b1b; line-height: 1.45; }
h1 { margin-top: 1.5rem; }
h2 { border-bottom: 2px solid #ddd; padding-bottom: .2rem; margin-top: 2.5rem; }
nav { position: sticky; top: 0; background: #fff; padding: .5rem 0; border-bottom: 1px solid #eee;
      z-index: 10; }
nav a { margin-right: 1rem; }
table { border-collapse: collapse; margin: .5rem 0 1rem; font-size: .9rem; }
th, td { border: 1px solid #ddd; padding: .25rem .5rem; text-align: right; vertical-align: top; }
th { background: #f5f5f5; } td.text, th.text { text-align: left; }
td.hash { font-family: ui-monospace, monospace; font-size: .8rem; word-break: break-all;
          max-width: 32rem; }
.table-scroll { overflow-x: auto; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(560px, 1fr)); gap: 1rem; }
figure { margin: 0 0 1rem; } figcaption { color: #444; font-size: .9rem; max-width: 60rem; }
.plot { width: 100%; min-height: 260px; }
.note { background: #fff8e1; border-left: 4px solid #f0c000; padding: .4rem .8rem; }
"""

# Render every figure block. A failure in one figure goes to the console as an error and does not
# stop the others.
LOADER_JS = """
(function () {
  var template = JSON.parse(document.getElementById("nerve-plotly-template").textContent);
  var config = {responsive: true, displaylogo: false};
  document.querySelectorAll("script.nerve-figure").forEach(function (block) {
    var target = block.dataset.target;
    var report = function (error) {
      console.error("nerve: figure " + target + " failed: " + error);
    };
    try {
      var figure = JSON.parse(block.textContent);
      figure.layout.template = template;
      Plotly.newPlot(target, figure.data, figure.layout, config).catch(report);
    } catch (error) {
      report(error);
    }
  });
})();
"""


def escape(value: object) -> str:
    """Format a value as text and escape it for HTML. None, NaN and pandas.NA become "n/a"."""
    if value is None or (
        pd.api.types.is_scalar(value) and not isinstance(value, str) and pd.isna(value)
    ):
        return "n/a"
    if isinstance(value, numbers.Number) and not isinstance(value, bool | np.bool_):
        return html.escape(format_value(value))
    return html.escape(str(value))


def _json_for_script(data: object) -> str:
    # "<", ">" and "&" as \\u escapes keep "</script>" in run names from closing the block.
    text = json.dumps(data, cls=PlotlyJSONEncoder, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


@dataclass
class FigureSet:
    """Figures of one page, each placed in its own container with a caption."""

    figures: list[dict] = field(default_factory=list)

    def add(self, figure: go.Figure, caption: str) -> str:
        """Register a figure and return the HTML block that shows it with its caption."""
        target = f"plot-{len(self.figures) + 1}"
        data = json.loads(pio.to_json(figure, validate=False))
        data["layout"].pop("template", None)
        self.figures.append(data)
        return (
            f'<figure><div id="{target}" class="plot"></div>'
            f"<figcaption>{html.escape(caption)}</figcaption>"
            f'<script type="application/json" class="nerve-figure" data-target="{target}">'
            f"{_json_for_script(data)}</script></figure>"
        )


def render_table(
    frame: pd.DataFrame, text_columns: tuple[str, ...] = (), hash_rows: tuple[str, ...] = ()
) -> str:
    """Render a DataFrame as an escaped HTML table, with numbers to 4 significant digits.

    ``text_columns`` are left-aligned. Cells in a row whose first cell is one of
    ``hash_rows`` use a monospace font and wrap, for long hashes.
    """
    header = "".join(
        f'<th class="{"text" if column in text_columns else ""}">{escape(column)}</th>'
        for column in frame.columns
    )
    body = []
    for row in frame.itertuples(index=False):
        first = str(row[0])
        cells = []
        for column, value in zip(frame.columns, row, strict=True):
            css = ""
            if first in hash_rows and column != frame.columns[0]:
                css = "hash"
            elif column in text_columns:
                css = "text"
            cells.append(f'<td class="{css}">{escape(value)}</td>')
        body.append(f"<tr>{''.join(cells)}</tr>")
    table = f"<table><thead><tr>{header}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    return f'<div class="table-scroll">{table}</div>'


def render_paragraphs(sentences: list[str], css_class: str = "") -> str:
    """Render sentences as an escaped bullet list."""
    items = "".join(f"<li>{html.escape(sentence)}</li>" for sentence in sentences)
    return f'<ul class="{css_class}">{items}</ul>'


def render_document(title: str, navigation: list[tuple[str, str]], body: str) -> str:
    """Assemble the page: inline CSS, plotly.js once, the body, the shared template and the loader.

    ``navigation`` is a list of (anchor id, link text) pairs.
    """
    links = "".join(
        f'<a href="#{html.escape(anchor)}">{html.escape(text)}</a>' for anchor, text in navigation
    )
    template = pio.templates[pio.templates.default].to_plotly_json()
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style>'
        f'<script type="text/javascript">{plotly.offline.get_plotlyjs()}</script></head>'
        f"<body><h1>{html.escape(title)}</h1><nav>{links}</nav>{body}"
        '<script type="application/json" id="nerve-plotly-template">'
        f"{_json_for_script(template)}</script>"
        f"<script>{LOADER_JS}</script></body></html>\n"
    )
