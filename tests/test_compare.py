"""Tests of compare_runs and compute_loss_correlations on hand-made and synthetic runs."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from nerve_cli.compare import (
    ACROSS_RUNS_COLUMNS,
    DEFAULT_METRICS,
    LAYER_MEANS_COLUMNS,
    PER_LAYER_COLUMNS,
    TRAJECTORY_COLUMNS,
    WITHIN_RUN_COLUMNS,
    ComparisonError,
    compare_runs,
    compute_loss_correlations,
)
from nerve_cli.store import METRIC_COLUMNS, RunResults, load_results
from tests.synthetic_results import write_synthetic_run


def make_results(run, rows, probe_sha256="0" * 64, path=None):
    """Build RunResults from rows with step, layer and any metric or loss columns.

    Metrics not given are 1.0 and losses not given are null.
    """
    frame = pd.DataFrame(rows)
    for column in METRIC_COLUMNS:
        if column not in frame:
            frame[column] = 1.0
    for column in ("probe_loss", "eval_loss"):
        if column not in frame:
            frame[column] = np.nan
    frame.insert(0, "run", run)
    info = {"run": run, "probe": {"sha256": probe_sha256}}
    return RunResults(path=Path(path or f"/results/{run}"), info=info, metrics=frame)


def grid(steps, n_layers, **columns):
    """Return one row per (step, layer); each keyword maps a column to f(step, layer)."""
    return [
        {"step": step, "layer": layer, **{name: f(step, layer) for name, f in columns.items()}}
        for step in steps
        for layer in range(n_layers)
    ]


@pytest.fixture
def pair():
    """Two runs whose se_pre differs by 0.5 * layer + 0.25 at every step."""
    steps = (0, 500, 1000)
    run_a = make_results("a", grid(steps, 3, se_pre=lambda s, layer: s / 1000 + layer))
    run_b = make_results("b", grid(steps, 3, se_pre=lambda s, layer: s / 1000 + 1.5 * layer + 0.25))
    return run_a, run_b


def value_of(table, **keys):
    """Return the ``value`` of the one row of ``table`` that matches ``keys``."""
    mask = np.logical_and.reduce([table[name] == key for name, key in keys.items()])
    rows = table[mask]
    assert len(rows) == 1, f"expected one row for {keys}, found {len(rows)}"
    return rows.iloc[0]


def test_compare_columns_follow_contract(pair):
    comparison = compare_runs(pair, ["se_pre"])

    assert comparison.runs == ["a", "b"]
    assert list(comparison.alignment.columns) == ["aligned_index", "run", "step", "fraction"]
    assert list(comparison.per_layer.columns) == PER_LAYER_COLUMNS
    assert list(comparison.layer_means.columns) == LAYER_MEANS_COLUMNS
    assert list(comparison.trajectories.columns) == TRAJECTORY_COLUMNS
    assert list(comparison.within_run.columns) == WITHIN_RUN_COLUMNS
    assert list(comparison.across_runs.columns) == ACROSS_RUNS_COLUMNS


def test_per_layer_values_and_differences(pair):
    comparison = compare_runs(pair, ["se_pre"])
    table = comparison.per_layer

    assert comparison.step == 1000
    assert len(table) == 6
    assert set(table["step"]) == {1000}
    for layer in range(3):
        row_a = value_of(table, run="a", layer=layer)
        row_b = value_of(table, run="b", layer=layer)
        assert row_a["value"] == pytest.approx(1 + layer)
        assert row_b["value"] == pytest.approx(1 + 1.5 * layer + 0.25)
        assert row_a["diff_to_first"] == 0
        assert row_b["diff_to_first"] == pytest.approx(0.5 * layer + 0.25)


def test_per_layer_row_order(pair):
    comparison = compare_runs(pair, ["se_pre", "js"])
    table = comparison.per_layer

    assert table["metric"].tolist() == ["se_pre"] * 6 + ["js"] * 6
    assert table["layer"].tolist()[:6] == [0, 0, 1, 1, 2, 2]
    assert table["run"].tolist()[:6] == ["a", "b"] * 3


def test_layer_means_values_and_differences(pair):
    table = compare_runs(pair, ["se_pre"]).layer_means

    mean_a = value_of(table, run="a", metric="se_pre")
    mean_b = value_of(table, run="b", metric="se_pre")
    assert mean_a["value"] == pytest.approx(2.0)
    assert mean_b["value"] == pytest.approx(2.75)
    assert mean_b["diff_to_first"] == pytest.approx(0.75)
    assert mean_a["step"] == 1000


def test_step_option_selects_compared_step(pair):
    comparison = compare_runs(pair, ["se_pre"], step=500)

    assert comparison.step == 500
    assert set(comparison.per_layer["step"]) == {500}
    assert value_of(comparison.layer_means, run="a", metric="se_pre")["value"] == pytest.approx(1.5)


def test_step_not_common_rejected(pair):
    with pytest.raises(
        ComparisonError, match="step 7 is not common to all runs; choose a step from: 0, 500, 1000"
    ):
        compare_runs(pair, ["se_pre"], step=7)


def test_trajectories_first_last_and_change(pair):
    table = compare_runs(pair, ["se_pre"]).trajectories

    row = table[table["run"] == "a"].iloc[0]
    assert (row["first_step"], row["last_step"]) == (0, 1000)
    assert row["first_value"] == pytest.approx(1.0)
    assert row["last_value"] == pytest.approx(2.0)
    assert row["change"] == pytest.approx(1.0)
    assert table["run"].tolist() == ["a", "b"]


def test_default_metrics_used(pair):
    comparison = compare_runs(pair)

    assert comparison.layer_means["metric"].drop_duplicates().tolist() == list(DEFAULT_METRICS)


def test_synthetic_runs_match_stored_rows(tmp_path):
    run_a = load_results(write_synthetic_run(tmp_path / "a", run="run-a", seed=1))
    run_b = load_results(write_synthetic_run(tmp_path / "b", run="run-b", seed=2))

    comparison = compare_runs([run_a, run_b], ["pr_post", "js"])

    assert comparison.aligned_by == "common_steps"
    assert comparison.step == 1000
    stored_b = run_b.metrics.set_index(["step", "layer"])
    stored_a = run_a.metrics.set_index(["step", "layer"])
    for layer in range(3):
        row = value_of(comparison.per_layer, run="run-b", metric="js", layer=layer)
        assert row["value"] == stored_b.at[(1000, layer), "js"]
        expected_diff = stored_b.at[(1000, layer), "js"] - stored_a.at[(1000, layer), "js"]
        assert row["diff_to_first"] == pytest.approx(expected_diff)

    expected_mean = run_b.metrics.loc[run_b.metrics["step"] == 1000, "pr_post"].mean()
    assert value_of(comparison.layer_means, run="run-b", metric="pr_post")[
        "value"
    ] == pytest.approx(expected_mean)


def test_synthetic_runs_align_by_fraction(tmp_path):
    run_a = load_results(write_synthetic_run(tmp_path / "a", run="run-a", steps=(0, 10, 100, 1000)))
    run_b = load_results(
        write_synthetic_run(tmp_path / "b", run="run-b", steps=(5, 50, 500, 2000), seed=1)
    )

    comparison = compare_runs([run_a, run_b], ["se_post"])

    assert comparison.aligned_by == "fraction"
    assert comparison.step == 1000
    assert value_of(comparison.layer_means, run="run-b", metric="se_post")["step"] == 2000
    assert set(comparison.per_layer.loc[comparison.per_layer["run"] == "run-b", "step"]) == {2000}
    assert any("fraction of each run's last step" in note for note in comparison.notes)
    trajectory = comparison.trajectories.set_index("run")
    assert trajectory.at["run-b", "first_step"] == 5
    assert trajectory.at["run-b", "last_step"] == 2000


def test_fraction_step_must_be_step_of_first_run():
    run_a = make_results("a", grid((0, 100, 200), 2))
    run_b = make_results("b", grid((1, 1000, 2000), 2))

    assert compare_runs([run_a, run_b], ["se_pre"], step=100).step == 100
    with pytest.raises(ComparisonError, match="step 1000 is not a step of a, the first run"):
        compare_runs([run_a, run_b], ["se_pre"], step=1000)


def hand_made_run(seed=0, n_steps=6, n_layers=3):
    """A run with seeded random se_pre per layer and random probe and eval losses per step."""
    rng = np.random.default_rng(seed)
    steps = np.arange(n_steps) * 100
    se_pre = rng.normal(size=(n_steps, n_layers))
    probe_loss = rng.normal(size=n_steps)
    eval_loss = rng.normal(size=n_steps)
    eval_loss[2] = np.nan
    rows = grid(
        steps,
        n_layers,
        se_pre=lambda s, layer: se_pre[s // 100, layer],
        probe_loss=lambda s, layer: probe_loss[s // 100],
        eval_loss=lambda s, layer: eval_loss[s // 100],
    )
    return make_results("hand", rows), se_pre.mean(axis=1), probe_loss, eval_loss


def test_within_run_matches_scipy():
    results, layer_mean, probe_loss, eval_loss = hand_made_run()

    table = compute_loss_correlations(results, ["se_pre"]).set_index("loss")

    assert table.at["probe_loss", "n_checkpoints"] == 6
    assert table.at["probe_loss", "pearson_r"] == pytest.approx(
        stats.pearsonr(layer_mean, probe_loss)[0]
    )
    assert table.at["probe_loss", "spearman_r"] == pytest.approx(
        stats.spearmanr(layer_mean, probe_loss)[0]
    )
    kept = ~np.isnan(eval_loss)
    assert table.at["eval_loss", "n_checkpoints"] == 5
    assert table.at["eval_loss", "pearson_r"] == pytest.approx(
        stats.pearsonr(layer_mean[kept], eval_loss[kept])[0]
    )
    assert table.at["eval_loss", "spearman_r"] == pytest.approx(
        stats.spearmanr(layer_mean[kept], eval_loss[kept])[0]
    )
    assert table["run"].tolist() == ["hand", "hand"]


@pytest.mark.parametrize(("n_steps", "has_r"), [(3, False), (4, True)])
def test_within_run_needs_four_checkpoints(n_steps, has_r):
    results, *_ = hand_made_run(n_steps=n_steps)

    row = compute_loss_correlations(results, ["se_pre"]).set_index("loss").loc["probe_loss"]

    assert row["n_checkpoints"] == n_steps
    assert np.isfinite(row["pearson_r"]) == has_r
    assert np.isfinite(row["spearman_r"]) == has_r


def test_within_run_constant_metric_nan():
    rows = grid(range(5), 2, se_pre=lambda s, layer: 3.0, probe_loss=lambda s, layer: float(s))
    results = make_results("flat", rows)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        row = compute_loss_correlations(results, ["se_pre"]).iloc[0]

    assert row["n_checkpoints"] == 5
    assert np.isnan(row["pearson_r"])
    assert np.isnan(row["spearman_r"])


def test_within_run_leaves_out_absent_eval_loss():
    rows = grid(
        range(5), 2, se_pre=lambda s, layer: s * layer, probe_loss=lambda s, layer: -float(s)
    )
    table = compute_loss_correlations(make_results("no-eval", rows), ["se_pre", "js"])

    assert table["loss"].tolist() == ["probe_loss", "probe_loss"]
    assert table["metric"].tolist() == ["se_pre", "js"]


def test_within_run_null_layer_drops_checkpoint():
    results, layer_mean, probe_loss, _ = hand_made_run()
    null_row = (results.metrics["step"] == 200) & (results.metrics["layer"] == 1)
    results.metrics.loc[null_row, "se_pre"] = np.nan

    row = compute_loss_correlations(results, ["se_pre"]).set_index("loss").loc["probe_loss"]

    kept = np.arange(6) != 2
    assert row["n_checkpoints"] == 5
    assert row["pearson_r"] == pytest.approx(stats.pearsonr(layer_mean[kept], probe_loss[kept])[0])


def test_null_layer_gives_note_and_missing_mean():
    results, *_ = hand_made_run()
    results.metrics.loc[
        (results.metrics["step"] == 200) & (results.metrics["layer"] == 1), "se_pre"
    ] = np.nan
    other = make_results("other", grid(np.arange(6) * 100, 3))

    comparison = compare_runs([results, other], ["se_pre"], step=200)

    assert np.isnan(value_of(comparison.layer_means, run="hand", metric="se_pre")["value"])
    assert any("hand: layer means are missing at step(s) 200" in note for note in comparison.notes)


def test_within_run_uses_all_checkpoints():
    results, layer_mean, probe_loss, _ = hand_made_run()
    other = make_results("other", grid([0, 500], 3))

    comparison = compare_runs([results, other], ["se_pre"])

    row = comparison.within_run.set_index(["run", "loss"]).loc[("hand", "probe_loss")]
    assert row["n_checkpoints"] == 6
    assert row["pearson_r"] == pytest.approx(stats.pearsonr(layer_mean, probe_loss)[0])


def three_runs():
    """Three runs with known final se_pre and losses, where run c has one step the others lack."""
    finals = {"a": (1.0, 3.0, 3.2), "b": (2.0, 2.5, 2.9), "c": (4.0, 2.6, 2.0)}
    runs = []
    for name, (se_pre, probe_loss, eval_loss) in finals.items():
        rows = grid(
            (0, 1000),
            2,
            se_pre=lambda s, layer, v=se_pre: v + (layer - 0.5) if s else 0.0,
            probe_loss=lambda s, layer, v=probe_loss: v if s else 9.0,
            eval_loss=lambda s, layer, v=eval_loss: v if s else 9.0,
        )
        if name == "c":
            rows += grid((2000,), 2, se_pre=lambda s, layer: 99.0, probe_loss=lambda s, layer: 0.0)
        runs.append(make_results(name, rows))
    return runs, finals


def test_across_runs_matches_scipy():
    runs, finals = three_runs()

    table = compare_runs(runs, ["se_pre"]).across_runs.set_index("loss")

    se_pre, probe_loss, eval_loss = (
        np.array(values) for values in zip(*finals.values(), strict=True)
    )
    assert table.at["probe_loss", "n_runs"] == 3
    assert table.at["probe_loss", "pearson_r"] == pytest.approx(
        stats.pearsonr(se_pre, probe_loss)[0]
    )
    assert table.at["probe_loss", "spearman_r"] == pytest.approx(
        stats.spearmanr(se_pre, probe_loss)[0]
    )
    assert table.at["eval_loss", "pearson_r"] == pytest.approx(stats.pearsonr(se_pre, eval_loss)[0])
    assert table["metric"].tolist() == ["se_pre", "se_pre"]


def test_across_runs_empty_with_two_runs(pair):
    comparison = compare_runs(pair, ["se_pre"])

    assert comparison.across_runs.empty
    assert list(comparison.across_runs.columns) == ACROSS_RUNS_COLUMNS


def test_probe_mismatch_rejected():
    run_a = make_results("a", grid((0, 1), 2), probe_sha256="0" * 64)
    run_b = make_results("b", grid((0, 1), 2), probe_sha256="1" * 64)

    with pytest.raises(
        ComparisonError, match="different probes .*--allow-probe-mismatch"
    ) as raised:
        compare_runs([run_a, run_b], ["se_pre"])
    assert "\n" not in str(raised.value)


def test_probe_mismatch_allowed_with_note():
    run_a = make_results("a", grid((0, 1), 2), probe_sha256="0" * 64)
    run_b = make_results("b", grid((0, 1), 2), probe_sha256="1" * 64)

    comparison = compare_runs([run_a, run_b], ["se_pre"], allow_probe_mismatch=True)

    assert any("different probes" in note for note in comparison.notes)
    assert len(comparison.layer_means) == 2


def test_probe_token_count_mismatch_rejected():
    run_a = make_results("a", grid((0, 1), 2))
    run_b = make_results("b", grid((0, 1), 2))
    run_a.info["probe"].update({"n_tokens": 65536, "seq_len": 512})
    run_b.info["probe"].update({"n_tokens": 1024, "seq_len": 512})

    with pytest.raises(ComparisonError, match="65536 tokens .* 1024 tokens"):
        compare_runs([run_a, run_b], ["se_pre"])


def test_layer_count_mismatch_compares_means_only():
    run_a = make_results("a", grid((0, 1), 3, se_pre=lambda s, layer: float(layer)))
    run_b = make_results("b", grid((0, 1), 4, se_pre=lambda s, layer: float(layer)))

    comparison = compare_runs([run_a, run_b], ["se_pre"])

    assert comparison.per_layer.empty
    assert list(comparison.per_layer.columns) == PER_LAYER_COLUMNS
    assert (
        "per-layer rows left out: layer counts differ (a: 3, b: 4); layer means are compared"
        in comparison.notes
    )
    assert value_of(comparison.layer_means, run="b", metric="se_pre")["value"] == pytest.approx(1.5)
    assert value_of(comparison.layer_means, run="b", metric="se_pre")[
        "diff_to_first"
    ] == pytest.approx(0.5)


def test_same_directory_twice_rejected(pair):
    with pytest.raises(ComparisonError, match="result directory given twice"):
        compare_runs([pair[0], pair[0]], ["se_pre"])


def test_shared_run_name_labelled_by_directory():
    run_a = make_results("same", grid((0, 1), 2), path="/results/first")
    run_b = make_results("same", grid((0, 1), 2), path="/results/second")

    comparison = compare_runs([run_a, run_b], ["se_pre"])

    assert comparison.runs == ["/results/first", "/results/second"]
    assert set(comparison.within_run["run"]) <= set(comparison.runs)


@pytest.mark.parametrize(
    ("metrics", "message"),
    [
        (["se_pre", "loss"], "unknown metric 'loss'; choose from: se_pre"),
        ([], "no metric selected"),
    ],
)
def test_invalid_metrics_rejected(pair, metrics, message):
    with pytest.raises(ComparisonError, match=message):
        compare_runs(pair, metrics)


def test_single_metric_string_accepted(pair):
    comparison = compare_runs(pair, "pr_gain")

    assert set(comparison.layer_means["metric"]) == {"pr_gain"}


def test_run_without_rows_rejected(pair):
    empty = make_results("empty", grid((), 2))

    with pytest.raises(ComparisonError, match="empty: no metrics rows"):
        compare_runs([pair[0], empty], ["se_pre"])


def test_single_run_has_zero_differences(pair):
    comparison = compare_runs(pair[:1], ["se_pre"])

    assert comparison.runs == ["a"]
    assert (comparison.layer_means["diff_to_first"] == 0).all()
