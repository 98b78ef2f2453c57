"""Figure data of the report, checked against the tables it is drawn from, without a browser."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from nerve_cli.compare import compute_layer_means, compute_loss_correlations
from nerve_cli.report.frames import (
    compute_scree,
    pivot_layer_by_step,
    select_last_step,
    select_loss_column,
    select_representatives,
)
from nerve_cli.report.labels import metric_label
from nerve_cli.report.layer_figures import build_last_step_figure, build_scree_figure
from nerve_cli.report.training_figures import (
    HEATMAP_COLUMNS,
    build_heatmap_figure,
    build_heatmap_selector_figure,
    build_overlay_figure,
    build_trajectory_figure,
)
from nerve_cli.store import METRIC_COLUMNS, load_results
from tests.synthetic_results import write_synthetic_run

STEPS = (0, 10, 100, 1000, 5000)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run-a"
    return load_results(write_synthetic_run(out, run="run-a", steps=STEPS, n_layers=4, ffn_dim=32))


@pytest.mark.parametrize("column", HEATMAP_COLUMNS)
def test_heatmap_values_equal_metrics(run, column):
    trace = build_heatmap_figure(run.metrics, column, "run-a").data[0]

    for layer_index, layer in enumerate(trace.y):
        for step_index, step in enumerate(trace.x):
            row = run.metrics[(run.metrics["layer"] == layer) & (run.metrics["step"] == int(step))]
            expected = row[column].item()
            assert trace.z[layer_index][step_index] == pytest.approx(expected)
    assert list(trace.x) == [str(step) for step in STEPS]
    assert list(trace.y) == [0, 1, 2, 3]


def test_heatmap_hover_names_run_step_layer(run):
    figure = build_heatmap_figure(run.metrics, "js", "run-a")
    trace = figure.data[0]

    assert trace.meta == ("run-a",)
    for field in ("%{meta[0]}", "step %{x}", "layer %{y}", "%{z"):
        assert field in trace.hovertemplate
    assert figure.layout.xaxis.type == "category"


def test_heatmap_keeps_missing_cells_empty(run):
    metrics = run.metrics.copy()
    metrics.loc[(metrics["step"] == 10) & (metrics["layer"] == 2), "js"] = np.nan

    z = build_heatmap_figure(metrics, "js", "run-a").data[0].z

    assert math.isnan(z[2][1])
    assert not math.isnan(z[2][0])


def test_heatmap_selector_shows_one_metric(run):
    others = [column for column in METRIC_COLUMNS if column not in HEATMAP_COLUMNS]
    figure = build_heatmap_selector_figure(run.metrics, others, "run-a")

    assert [trace.name for trace in figure.data] == [metric_label(column) for column in others]
    assert [trace.visible for trace in figure.data] == [True] + [False] * (len(others) - 1)
    buttons = figure.layout.updatemenus[0].buttons
    assert len(buttons) == len(others)
    assert buttons[2].args[0]["visible"] == [index == 2 for index in range(len(others))]
    expected = pivot_layer_by_step(run.metrics, others[2]).to_numpy()
    np.testing.assert_allclose(np.asarray(figure.data[2].z, dtype=float), expected)


def test_heatmap_height_bounded_for_deep_models(tmp_path):
    deep = load_results(
        write_synthetic_run(tmp_path / "deep", n_layers=96, steps=tuple(range(0, 600, 10)))
    )

    figure = build_heatmap_figure(deep.metrics, "js", "deep")

    assert figure.layout.height == 900
    assert np.asarray(figure.data[0].z).shape == (96, 60)


def test_trajectory_plots_compare_layer_means(run):
    means = compute_layer_means(run.metrics, METRIC_COLUMNS).reset_index()
    correlations = compute_loss_correlations(run, METRIC_COLUMNS)

    figure = build_trajectory_figure(means, "se", "run-a", "eval_loss", correlations)

    pre, post, loss = figure.data
    np.testing.assert_allclose(pre.y, means["se_pre"])
    np.testing.assert_allclose(post.y, means["se_post"])
    np.testing.assert_allclose(loss.y, means["eval_loss"])
    assert list(pre.x) == list(STEPS)
    assert loss.yaxis == "y2"


def test_trajectory_title_shows_pearson_r(run):
    means = compute_layer_means(run.metrics, METRIC_COLUMNS).reset_index()
    correlations = compute_loss_correlations(run, METRIC_COLUMNS)
    expected = correlations.query("metric == 'pr_post' and loss == 'eval_loss'")["pearson_r"].item()

    title = build_trajectory_figure(
        means, "pr", "run-a", "eval_loss", correlations
    ).layout.title.text

    assert f"r(PR post) = {expected:.3g}" in title
    assert "eval loss" in title


def test_trajectory_without_loss_has_no_second_axis(run):
    means = compute_layer_means(run.metrics, METRIC_COLUMNS).reset_index()

    figure = build_trajectory_figure(
        means, "js", "run-a", None, pd.DataFrame(columns=["metric", "loss"])
    )

    assert len(figure.data) == 1
    assert "Pearson" not in figure.layout.title.text


def test_overlay_has_every_run_and_metric(run):
    means = compute_layer_means(run.metrics, METRIC_COLUMNS).reset_index()
    shifted = means.assign(se_post=means["se_post"] + 1.0)

    figure = build_overlay_figure({"run-a": means, "run-b": shifted})

    names = [trace.name for trace in figure.data]
    assert len(names) == 2 * 7
    run_b_se_post = next(trace for trace in figure.data if trace.name == "run-b SE post")
    np.testing.assert_allclose(run_b_se_post.y, means["se_post"] + 1.0)
    assert run_b_se_post.meta == ("run-b",)


def test_last_step_figure_equals_metrics(run):
    step = select_last_step(run.metrics)
    rows = run.metrics[run.metrics["step"] == step].sort_values("layer")

    figure = build_last_step_figure(run.metrics, step, "run-a")

    columns = ["se_pre", "se_post", "pr_pre", "pr_post", "eee_pre", "eee_post"]
    for trace, column in zip(figure.data, columns, strict=True):
        np.testing.assert_allclose(trace.y, rows[column], err_msg=column)
        assert list(trace.x) == list(rows["layer"])
    assert step == 5000
    assert figure.data[0].meta == ("run-a", 5000)


def test_scree_uses_first_middle_last(run):
    spectra = run.load_spectra()

    figure = build_scree_figure(spectra, "run-a")

    layers = sorted({trace.meta[2] for trace in figure.data})
    steps = sorted({trace.meta[1] for trace in figure.data})
    assert layers == [0, 1, 3]
    assert steps == [0, 100, 5000]
    assert len(figure.data) == 3 * 3 * 2
    assert figure.layout.xaxis.type == "log"
    assert figure.layout.yaxis.type == "log"


def test_scree_values_are_normalized_spectra(run):
    spectra = run.load_spectra()
    stored = spectra.query("layer == 3 and step == 100 and point == 'post'")["eigenvalues"].item()

    trace = next(
        t
        for t in build_scree_figure(spectra, "run-a").data
        if tuple(t.meta) == ("run-a", 100, 3, "post")
    )

    expected = np.sort(np.asarray(stored))[::-1] / np.sum(stored)
    np.testing.assert_allclose(trace.y, expected)
    assert list(trace.x) == list(range(1, len(stored) + 1))


def test_compute_scree_drops_zeros():
    ranks, values = compute_scree(np.array([4.0, 0.0, 1.0, 0.0]))

    assert list(ranks) == [1, 2]
    np.testing.assert_allclose(values, [0.8, 0.2])


def test_compute_scree_subsamples_log_spaced():
    eigenvalues = 1.0 / np.arange(1, 10_001)

    ranks, values = compute_scree(eigenvalues, max_points=200)

    assert len(ranks) <= 200
    assert ranks[0] == 1
    assert ranks[-1] == 10_000
    assert np.all(np.diff(ranks) > 0)
    np.testing.assert_allclose(values, eigenvalues[ranks - 1] / eigenvalues.sum())


def test_compute_scree_of_zero_spectrum_is_empty():
    ranks, values = compute_scree(np.zeros(8))

    assert ranks.size == 0
    assert values.size == 0


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([], []),
        ([5], [5]),
        ([3, 1], [1, 3]),
        ([0, 1, 2, 3, 4], [0, 2, 4]),
        ([0, 10, 100, 1000], [0, 10, 1000]),
    ],
)
def test_select_representatives(values, expected):
    assert select_representatives(values) == expected


def test_select_loss_column_prefers_eval_loss(tmp_path):
    with_eval = load_results(write_synthetic_run(tmp_path / "a"))
    without_eval = load_results(write_synthetic_run(tmp_path / "b", with_eval_loss=False))

    assert select_loss_column(with_eval.metrics) == "eval_loss"
    assert select_loss_column(without_eval.metrics) == "probe_loss"
    assert select_loss_column(without_eval.metrics.assign(probe_loss=np.nan)) is None


def test_select_last_step_skips_null_checkpoint(run):
    metrics = run.metrics.copy()
    metrics.loc[metrics["step"] == 5000, "se_post"] = np.nan

    assert select_last_step(metrics) == 1000
    assert select_last_step(metrics.iloc[0:0]) is None
