"""Plotly figures of the metrics over training steps: trajectories, heatmaps and run overlays.

Pure functions from DataFrames to ``plotly.graph_objects.Figure``. Hover text
names the run, the step, the layer (or the layer mean) and the value. The run
name travels in each trace's ``meta`` attribute, so it is never spliced into a
hover template.
"""

from __future__ import annotations

import pandas as pd
import plotly.colors
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from nerve_cli.report.formatting import format_value
from nerve_cli.report.frames import pivot_layer_by_step
from nerve_cli.report.labels import FAMILIES, LOSS_LABELS, metric_label

__all__ = [
    "build_trajectory_figure",
    "build_heatmap_figure",
    "build_heatmap_selector_figure",
    "build_overlay_figure",
    "HEATMAP_COLUMNS",
]

# Each of these gets its own heatmap. The other metrics share one heatmap with a selector.
HEATMAP_COLUMNS = ("js", "pr_gain", "eee_post")

POINT_DASH = {"pre": "dash", "post": "solid"}
LOSS_COLOR = "#7f7f7f"
PALETTE = plotly.colors.qualitative.Plotly


def _point_of(column: str) -> str:
    return "pre" if column.endswith("_pre") else "post"


def _correlation_text(correlations: pd.DataFrame, column: str, loss_column: str) -> str:
    rows = correlations[(correlations["metric"] == column) & (correlations["loss"] == loss_column)]
    if rows.empty:
        return f"r({metric_label(column)}) n/a"
    return f"r({metric_label(column)}) = {format_value(rows['pearson_r'].iloc[0], 3)}"


def build_trajectory_figure(
    layer_means: pd.DataFrame,
    family: str,
    run: str,
    loss_column: str | None,
    correlations: pd.DataFrame,
) -> go.Figure:
    """Plot layer-mean pre and post values of one metric family against step, loss on a second axis.

    ``layer_means`` has a ``step`` column and one column per metric and loss,
    as ``nerve_cli.compare.compute_layer_means`` returns after ``reset_index()``.
    ``correlations`` has
    the columns of ``compute_loss_correlations`` and supplies the Pearson r
    between each curve and the loss that the title shows.
    """
    columns = FAMILIES[family].columns
    title = FAMILIES[family].title
    figure = make_subplots(specs=[[{"secondary_y": True}]])

    for column in columns:
        figure.add_trace(
            go.Scatter(
                x=layer_means["step"],
                y=layer_means[column],
                name=metric_label(column),
                mode="lines+markers",
                line={"dash": POINT_DASH[_point_of(column)]},
                meta=[run],
                hovertemplate=(
                    "run %{meta[0]}<br>step %{x}<br>mean over layers<br>"
                    f"{metric_label(column)} %{{y:.4g}}<extra></extra>"
                ),
            ),
            secondary_y=False,
        )

    if loss_column is not None:
        loss_label = LOSS_LABELS.get(loss_column, loss_column)
        figure.add_trace(
            go.Scatter(
                x=layer_means["step"],
                y=layer_means[loss_column],
                name=loss_label,
                mode="lines+markers",
                line={"color": LOSS_COLOR, "dash": "dot"},
                meta=[run],
                hovertemplate=(
                    f"run %{{meta[0]}}<br>step %{{x}}<br>{loss_label} %{{y:.4g}}<extra></extra>"
                ),
            ),
            secondary_y=True,
        )
        correlation = ", ".join(
            _correlation_text(correlations, column, loss_column) for column in columns
        )
        title = f"{title}<br><sup>Pearson {correlation} with {loss_label}</sup>"
        figure.update_yaxes(title_text=loss_label, secondary_y=True, showgrid=False)

    figure.update_layout(
        title={"text": title}, height=360, margin={"t": 70, "b": 40}, hovermode="closest"
    )
    figure.update_xaxes(title_text="step")
    figure.update_yaxes(title_text=FAMILIES[family].short, secondary_y=False)
    return figure


def _heatmap_height(n_layers: int) -> int:
    # About 18 px per layer, bounded so that a 100-layer model still fits on a screen.
    return max(260, min(900, 120 + 18 * n_layers))


def _heatmap_trace(
    metrics: pd.DataFrame, column: str, run: str, visible: bool = True
) -> go.Heatmap:
    table = pivot_layer_by_step(metrics, column)
    label = metric_label(column)
    return go.Heatmap(
        # Steps are categories so that log-spaced checkpoints get equal width.
        x=[str(step) for step in table.columns],
        y=list(table.index),
        z=table.to_numpy(),
        name=label,
        visible=visible,
        colorscale="Viridis",
        colorbar={"title": {"text": label}},
        meta=[run],
        hovertemplate=(
            f"run %{{meta[0]}}<br>step %{{x}}<br>layer %{{y}}<br>{label} %{{z:.4g}}<extra></extra>"
        ),
    )


def _layout_heatmap(figure: go.Figure, title: str, n_layers: int) -> go.Figure:
    figure.update_layout(
        title={"text": title}, height=_heatmap_height(n_layers), margin={"t": 60, "b": 40}
    )
    figure.update_xaxes(title_text="step", type="category")
    figure.update_yaxes(title_text="layer", dtick=1 if n_layers <= 24 else None)
    return figure


def build_heatmap_figure(metrics: pd.DataFrame, column: str, run: str) -> go.Figure:
    """Plot one metric as a layer x step heatmap whose z values are ``pivot_layer_by_step``."""
    figure = go.Figure(_heatmap_trace(metrics, column, run))
    n_layers = metrics["layer"].nunique()
    return _layout_heatmap(figure, f"{metric_label(column)} by layer and step", n_layers)


def build_heatmap_selector_figure(metrics: pd.DataFrame, columns: list[str], run: str) -> go.Figure:
    """Plot several metrics as layer x step heatmaps, one at a time, chosen in a dropdown."""
    figure = go.Figure(
        [
            _heatmap_trace(metrics, column, run, visible=index == 0)
            for index, column in enumerate(columns)
        ]
    )

    buttons = []
    for index, column in enumerate(columns):
        visible = [position == index for position in range(len(columns))]
        title = f"{metric_label(column)} by layer and step"
        buttons.append(
            {
                "label": metric_label(column),
                "method": "update",
                "args": [{"visible": visible}, {"title.text": title}],
            }
        )

    figure.update_layout(
        updatemenus=[
            {
                "buttons": buttons,
                "direction": "down",
                "x": 1.0,
                "xanchor": "right",
                "y": 1.15,
                "yanchor": "top",
            }
        ]
    )
    n_layers = metrics["layer"].nunique()
    return _layout_heatmap(figure, f"{metric_label(columns[0])} by layer and step", n_layers)


def build_overlay_figure(layer_means_by_run: dict[str, pd.DataFrame]) -> go.Figure:
    """Overlay the layer-mean trajectories of several runs, one panel per metric family.

    Each run has one colour. Pre curves are dashed and post curves solid.
    """
    families = list(FAMILIES)
    figure = make_subplots(
        rows=2, cols=2, subplot_titles=[FAMILIES[family].title for family in families]
    )

    for run_index, (run, layer_means) in enumerate(layer_means_by_run.items()):
        color = PALETTE[run_index % len(PALETTE)]
        for family_index, family in enumerate(families):
            for column in FAMILIES[family].columns:
                figure.add_trace(
                    go.Scatter(
                        x=layer_means["step"],
                        y=layer_means[column],
                        name=f"{run} {metric_label(column)}",
                        legendgroup=run,
                        mode="lines+markers",
                        line={"color": color, "dash": POINT_DASH[_point_of(column)]},
                        meta=[run],
                        hovertemplate=(
                            "run %{meta[0]}<br>step %{x}<br>mean over layers<br>"
                            f"{metric_label(column)} %{{y:.4g}}<extra></extra>"
                        ),
                    ),
                    row=family_index // 2 + 1,
                    col=family_index % 2 + 1,
                )

    figure.update_layout(height=640, margin={"t": 60, "b": 40}, hovermode="closest")
    figure.update_xaxes(title_text="step")
    return figure
