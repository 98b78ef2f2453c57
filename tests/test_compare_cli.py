"""Tests of the ``nerve compare`` command through click's CliRunner."""

from __future__ import annotations

import io
import json

import pandas as pd
import pytest
from click.testing import CliRunner

from nerve_cli.cli import main
from tests.synthetic_results import write_synthetic_run


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory):
    """Result directories: a and b match, c used another probe and d has 4 layers."""
    root = tmp_path_factory.mktemp("results")
    return {
        "a": str(write_synthetic_run(root / "a", run="run-a", seed=1)),
        "b": str(write_synthetic_run(root / "b", run="run-b", seed=2)),
        "c": str(write_synthetic_run(root / "c", run="run-c", seed=3, probe_sha256="f" * 64)),
        "d": str(write_synthetic_run(root / "d", run="run-d", seed=4, n_layers=4)),
    }


def test_compare_prints_table(runner, run_dirs):
    result = runner.invoke(main, ["compare", run_dirs["a"], run_dirs["b"]])

    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("runs: run-a, run-b (differences are to run-a)\n")
    assert "Layer means at step 1000" in result.stdout
    assert "Per layer at step 1000" in result.stdout


def test_compare_json_to_stdout(runner, run_dirs):
    result = runner.invoke(main, ["compare", run_dirs["a"], run_dirs["b"], "--format", "json"])

    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["runs"] == ["run-a", "run-b"]
    assert payload["step"] == 1000


def test_compare_csv_to_out_file(runner, run_dirs, tmp_path):
    out = tmp_path / "compare.csv"

    result = runner.invoke(
        main, ["compare", run_dirs["a"], run_dirs["b"], "--format", "csv", "--out", str(out)]
    )

    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    parsed = pd.read_csv(out)
    assert set(parsed["table"]) >= {
        "summary",
        "layer_means",
        "per_layer",
        "trajectories",
        "within_run",
    }


def test_compare_markdown_format(runner, run_dirs):
    result = runner.invoke(main, ["compare", run_dirs["a"], run_dirs["b"], "--format", "markdown"])

    assert result.exit_code == 0, result.output
    assert "| metric | run-a | run-b | run-b - run-a |" in result.stdout


@pytest.mark.parametrize(
    "options",
    [
        ["--metric", "js", "--metric", "pr_gain"],
        ["--metric", "js,pr_gain"],
        ["--metric", " js, ,pr_gain "],
    ],
)
def test_metric_option_repeat_or_commas(runner, run_dirs, options):
    args = ["compare", run_dirs["a"], run_dirs["b"], "--format", "json", *options]

    result = runner.invoke(main, args)

    assert result.exit_code == 0, result.output
    metrics = [row["metric"] for row in json.loads(result.stdout)["layer_means"]]
    assert list(dict.fromkeys(metrics)) == ["js", "pr_gain"]


def test_step_option(runner, run_dirs):
    result = runner.invoke(
        main, ["compare", run_dirs["a"], run_dirs["b"], "--step", "100", "--format", "json"]
    )

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["step"] == 100


def assert_one_line_error(result, *fragments):
    """Check exit status 2 and a single stderr line that contains every fragment."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_unknown_step_exits_2(runner, run_dirs):
    result = runner.invoke(main, ["compare", run_dirs["a"], run_dirs["b"], "--step", "7"])

    assert_one_line_error(result, "step 7 is not common to all runs")


def test_unknown_metric_exits_2(runner, run_dirs):
    result = runner.invoke(main, ["compare", run_dirs["a"], run_dirs["b"], "--metric", "loss"])

    assert_one_line_error(result, "unknown metric 'loss'")


def test_probe_mismatch_exits_2(runner, run_dirs):
    result = runner.invoke(main, ["compare", run_dirs["a"], run_dirs["c"]])

    assert_one_line_error(result, "different probes", "--allow-probe-mismatch")
    assert result.stdout == ""


def test_probe_mismatch_allowed_with_flag(runner, run_dirs):
    result = runner.invoke(
        main, ["compare", run_dirs["a"], run_dirs["c"], "--allow-probe-mismatch"]
    )

    assert result.exit_code == 0, result.output
    assert "note: runs were analyzed with different probes" in result.stdout


def test_layer_count_mismatch_reports_means_only(runner, run_dirs):
    result = runner.invoke(main, ["compare", run_dirs["a"], run_dirs["d"]])

    assert result.exit_code == 0, result.output
    assert "per-layer rows left out: layer counts differ (run-a: 3, run-d: 4)" in result.stdout
    assert "Layer means at step 1000" in result.stdout
    assert "Per layer" not in result.stdout


def test_not_a_result_directory_exits_2(runner, run_dirs, tmp_path):
    result = runner.invoke(main, ["compare", run_dirs["a"], str(tmp_path)])

    assert_one_line_error(result, str(tmp_path), "not a nerve result directory")


def test_missing_directory_exits_2(runner, run_dirs, tmp_path):
    missing = tmp_path / "missing"

    result = runner.invoke(main, ["compare", run_dirs["a"], str(missing)])

    assert_one_line_error(result, str(missing), "not found")


def test_one_directory_exits_2(runner, run_dirs):
    result = runner.invoke(main, ["compare", run_dirs["a"]])

    assert_one_line_error(result, "two or more result directories, got 1")


def test_unwritable_out_exits_2(runner, run_dirs, tmp_path):
    out = tmp_path / "no-such-dir" / "out.json"

    result = runner.invoke(main, ["compare", run_dirs["a"], run_dirs["b"], "--out", str(out)])

    assert_one_line_error(result, str(out), "cannot write")


def test_debug_shows_original_error(runner, run_dirs, tmp_path):
    result = runner.invoke(main, ["--debug", "compare", run_dirs["a"], str(tmp_path)])

    assert result.exit_code != 0
    assert type(result.exception).__name__ == "ResultDirectoryError"


def test_csv_output_parses_with_pandas(runner, run_dirs):
    result = runner.invoke(
        main, ["compare", run_dirs["a"], run_dirs["b"], "--format", "csv", "--metric", "js"]
    )

    parsed = pd.read_csv(io.StringIO(result.stdout))
    means = parsed[parsed["table"] == "layer_means"]
    assert means["run"].tolist() == ["run-a", "run-b"]
    assert means["step"].tolist() == [1000, 1000]
