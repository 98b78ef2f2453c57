"""The sections of the report page, each rendered from precomputed tables into HTML.

Every function takes a :class:`RunView` (one run's tables) or the
:class:`~nerve_cli.compare.Comparison` of all runs, adds its figures to a
shared :class:`FigureSet` and returns escaped HTML. Nothing here reads files
or computes correlations, which come from ``nerve_cli.compare``.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

import pandas as pd

from nerve_cli.compare import Comparison
from nerve_cli.report import findings, labels
from nerve_cli.report.html_page import FigureSet, render_paragraphs, render_table
from nerve_cli.report.layer_figures import build_last_step_figure, build_scree_figure
from nerve_cli.report.tables import build_layer_summary_table, build_metadata_table
from nerve_cli.report.training_figures import (
    HEATMAP_COLUMNS,
    build_heatmap_figure,
    build_heatmap_selector_figure,
    build_overlay_figure,
    build_trajectory_figure,
)
from nerve_cli.store import METRIC_COLUMNS

__all__ = [
    "RunView",
    "render_findings_section",
    "render_metadata_section",
    "render_comparison_section",
    "render_run_section",
]


@dataclass
class RunView:
    """The tables of one run that the report draws from.

    ``label`` is the run's name in the comparison (its directory where run
    names repeat), ``anchor`` the HTML id of its section, ``layer_means`` one
    row per step with a ``step`` column, and ``correlations`` this run's rows
    of ``Comparison.within_run``.
    """

    label: str
    anchor: str
    info: dict[str, Any]
    metrics: pd.DataFrame
    spectra: pd.DataFrame
    layer_means: pd.DataFrame
    correlations: pd.DataFrame
    loss_column: str | None
    last_step: int | None


def render_findings_section(views: list[RunView], comparison: Comparison) -> str:
    """Render the findings in words: one list per run, then one across runs if there are several."""
    parts = ['<section id="findings"><h2>Findings</h2>']
    for view in views:
        sentences = findings.summarize_run(
            view.metrics, view.info, view.layer_means, view.correlations, view.loss_column
        )
        parts.append(f"<h3>{html.escape(view.label)}</h3>{render_paragraphs(sentences)}")

    if len(views) > 1:
        sentences = [
            findings.describe_compared_step(
                comparison.layer_means, "se_post", higher_is_healthier=True
            ),
            findings.describe_compared_step(
                comparison.layer_means, "pr_post", higher_is_healthier=True
            ),
            findings.describe_compared_step(
                comparison.layer_means, "eee_post", higher_is_healthier=False
            ),
            findings.describe_compared_trends(comparison.trajectories, "eee_post"),
        ]
        parts.append(f"<h3>Across runs</h3>{render_paragraphs([s for s in sentences if s])}")

    parts.append("</section>")
    return "".join(parts)


def render_metadata_section(views: list[RunView]) -> str:
    """Render the run metadata table: model, layers, FFN width, probe, device, dtype, versions."""
    table = build_metadata_table({view.label: view.info for view in views})
    return (
        '<section id="runs"><h2>Runs</h2>'
        f"{render_table(table, text_columns=tuple(table.columns), hash_rows=('probe sha256',))}"
        "</section>"
    )


def _render_correlation_table(correlations: pd.DataFrame) -> str:
    if correlations.empty:
        return "<p>No loss is stored for this run, so there are no correlations.</p>"

    table = pd.DataFrame(
        {
            "metric": correlations["metric"].map(labels.metric_label),
            "loss": correlations["loss"].map(lambda loss: labels.LOSS_LABELS.get(loss, loss)),
            "checkpoints": correlations["n_checkpoints"],
            "Pearson r": correlations["pearson_r"],
            "Spearman r": correlations["spearman_r"],
        }
    )
    return render_table(table, text_columns=("metric", "loss"))


def _render_trajectories(view: RunView, figures: FigureSet) -> str:
    blocks = []
    for family, info in labels.FAMILIES.items():
        figure = build_trajectory_figure(
            view.layer_means, family, view.label, view.loss_column, view.correlations
        )
        blocks.append(figures.add(figure, f"{info.legend} {labels.TRAJECTORY_CAPTION}"))
    return f'<h3>Metrics over training</h3><div class="grid">{"".join(blocks)}</div>'


def _render_heatmaps(view: RunView, figures: FigureSet) -> str:
    blocks = [
        figures.add(
            build_heatmap_figure(view.metrics, column, view.label), labels.HEATMAP_CAPTIONS[column]
        )
        for column in HEATMAP_COLUMNS
    ]
    others = [column for column in METRIC_COLUMNS if column not in HEATMAP_COLUMNS]
    blocks.append(
        figures.add(
            build_heatmap_selector_figure(view.metrics, others, view.label), labels.SELECTOR_CAPTION
        )
    )
    return f"<h3>By layer and step</h3>{''.join(blocks)}"


def _render_last_step(view: RunView, figures: FigureSet) -> str:
    if view.last_step is None:
        return "<p>No checkpoint has valid metrics.</p>"

    figure = figures.add(
        build_last_step_figure(view.metrics, view.last_step, view.label), labels.LAST_STEP_CAPTION
    )
    table = render_table(
        build_layer_summary_table(view.metrics, view.last_step), text_columns=("null_reason",)
    )
    return f"<h3>Per layer at step {view.last_step}</h3>{figure}{table}"


def _render_scree(view: RunView, figures: FigureSet) -> str:
    if view.spectra.empty:
        return "<h3>Eigenvalue spectra</h3><p>No spectra are stored in this result directory.</p>"
    figure = figures.add(build_scree_figure(view.spectra, view.label), labels.SCREE_CAPTION)
    return f"<h3>Eigenvalue spectra</h3>{figure}"


def render_run_section(view: RunView, figures: FigureSet) -> str:
    """Render one run: trajectories, correlations, heatmaps, last step per layer, scree plots."""
    return (
        f'<section id="{view.anchor}"><h2>Run {html.escape(view.label)}</h2>'
        f"{_render_trajectories(view, figures)}"
        f"<h3>Correlation with the loss</h3>{_render_correlation_table(view.correlations)}"
        f"{_render_heatmaps(view, figures)}"
        f"{_render_last_step(view, figures)}"
        f"{_render_scree(view, figures)}</section>"
    )


def _with_metric_labels(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.assign(metric=frame["metric"].map(labels.metric_label))


def _render_comparison_tables(comparison: Comparison) -> str:
    layer_means = _with_metric_labels(comparison.layer_means)
    trajectories = _with_metric_labels(comparison.trajectories)
    parts = [
        "<h3>Layer means at the compared step "
        f"(aligned by {html.escape(comparison.aligned_by)})</h3>",
        render_table(layer_means, text_columns=("metric", "run")),
        "<h3>Change over training (first to last aligned step)</h3>",
        render_table(trajectories, text_columns=("run", "metric")),
    ]
    if not comparison.across_runs.empty:
        across = _with_metric_labels(comparison.across_runs)
        parts += [
            "<h3>Final metric against final loss, across runs</h3>",
            render_table(across, text_columns=("metric", "loss")),
        ]
    if not comparison.per_layer.empty:
        per_layer = _with_metric_labels(comparison.per_layer)
        parts.append(
            "<details><summary>Per layer at the compared step</summary>"
            f"{render_table(per_layer, text_columns=('metric', 'run'))}</details>"
        )
    return "".join(parts)


def render_comparison_section(
    views: list[RunView], comparison: Comparison, figures: FigureSet
) -> str:
    """Render the overlaid trajectories of all runs and the tables of ``nerve compare``."""
    overlay = build_overlay_figure({view.label: view.layer_means for view in views})
    notes = render_paragraphs(comparison.notes, css_class="note") if comparison.notes else ""
    return (
        '<section id="comparison"><h2>Comparison</h2>'
        f"{figures.add(overlay, labels.OVERLAY_CAPTION)}{notes}"
        f"{_render_comparison_tables(comparison)}</section>"
    )
