"""HTML report of one or more nerve result directories (``nerve report``).

Modules, one concept each: ``frames`` (DataFrame steps), ``labels`` (metric
names and legends), ``formatting`` (numbers), ``training_figures`` and
``layer_figures`` (plotly figures), ``tables``, ``findings`` (sentences),
``html_page`` (HTML building blocks), ``sections`` (page sections) and
``render`` (the entry point).
"""

from nerve_cli.report.render import ReportError, build_report_html, render_report

__all__ = ["ReportError", "build_report_html", "render_report"]
