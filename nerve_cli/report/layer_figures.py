"""Plotly figures of single checkpoints: per-layer pre and post values, and eigenvalue scree plots.

Pure functions from DataFrames to ``plotly.graph_objects.Figure``. As in
``training_figures``, the run name travels in each trace's ``meta`` attribute.
"""

from __future__ import annotations

import pandas as pd
import plotly.colors
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from nerve_cli.report.frames import compute_scree, select_representatives
from nerve_cli.report.labels import FAMILIES, metric_label

__all__ = ["build_last_step_figure", "build_scree_figure", "LAST_STEP_FAMILIES"]

LAST_STEP_FAMILIES = ("se", "pr", "eee")
POINT_COLOR = {"pre": "#1f77b4", "post": "#d62728"}
STEP_PALETTE = plotly.colors.qualitative.Dark2


def build_last_step_figure(metrics: pd.DataFrame, step: int, run: str) -> go.Figure:
    """Plot SE, PR and EEE per layer at one step, pre against post, one panel per metric."""
    rows = metrics[metrics["step"] == step].sort_values("layer")
    figure = make_subplots(
        rows=1,
        cols=len(LAST_STEP_FAMILIES),
        subplot_titles=[FAMILIES[f].title for f in LAST_STEP_FAMILIES],
    )

    for family_index, family in enumerate(LAST_STEP_FAMILIES):
        for column in FAMILIES[family].columns:
            point = "pre" if column.endswith("_pre") else "post"
            figure.add_trace(
                go.Scatter(
                    x=rows["layer"],
                    y=rows[column],
                    name=point,
                    legendgroup=point,
                    showlegend=family_index == 0,
                    mode="lines+markers",
                    line={"color": POINT_COLOR[point]},
                    meta=[run, step],
                    hovertemplate=(
                        f"run %{{meta[0]}}<br>step %{{meta[1]}}<br>layer %{{x}}<br>"
                        f"{metric_label(column)} %{{y:.4g}}<extra></extra>"
                    ),
                ),
                row=1,
                col=family_index + 1,
            )

    figure.update_layout(
        title={"text": f"Per layer at step {step}"}, height=360, margin={"t": 80, "b": 40}
    )
    figure.update_xaxes(title_text="layer")
    return figure


def _scree_trace(
    eigenvalues, run: str, step: int, layer: int, point: str, color: str, show: bool
) -> go.Scatter:
    ranks, normalized = compute_scree(eigenvalues)
    return go.Scatter(
        x=ranks,
        y=normalized,
        name=f"step {step} {point}",
        legendgroup=f"{step}-{point}",
        showlegend=show,
        mode="lines",
        line={"color": color, "dash": "dash" if point == "pre" else "solid"},
        meta=[run, step, layer, point],
        hovertemplate=(
            "run %{meta[0]}<br>step %{meta[1]}<br>layer %{meta[2]} %{meta[3]}<br>"
            "rank %{x}<br>eigenvalue / sum %{y:.3g}<extra></extra>"
        ),
    )


def build_scree_figure(spectra: pd.DataFrame, run: str) -> go.Figure:
    """Plot normalized eigenvalues against rank, log-log, from the stored spectra.

    One panel for each of the first, a middle and the last layer. Each shows the
    first, a middle and the last checkpoint, pre dashed and post solid.
    """
    layers = select_representatives(spectra["layer"])
    steps = select_representatives(spectra["step"])
    figure = make_subplots(
        rows=1, cols=max(len(layers), 1), subplot_titles=[f"layer {layer}" for layer in layers]
    )

    indexed = spectra.set_index(["layer", "step", "point"])["eigenvalues"]
    for layer_index, layer in enumerate(layers):
        for step_index, step in enumerate(steps):
            color = STEP_PALETTE[step_index % len(STEP_PALETTE)]
            for point in ("pre", "post"):
                if (layer, step, point) not in indexed.index:
                    continue
                trace = _scree_trace(
                    indexed.loc[(layer, step, point)],
                    run,
                    step,
                    layer,
                    point,
                    color,
                    layer_index == 0,
                )
                figure.add_trace(trace, row=1, col=layer_index + 1)

    figure.update_layout(
        title={"text": "Eigenvalue scree plots"}, height=380, margin={"t": 80, "b": 40}
    )
    figure.update_xaxes(type="log", title_text="rank")
    # Powers of ten read better here than plotly's default SI prefixes such as "100μ".
    figure.update_yaxes(type="log", exponentformat="power")
    figure.update_yaxes(title_text="eigenvalue / sum", row=1, col=1)
    return figure
