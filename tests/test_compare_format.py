"""Tests that each output format of a comparison parses back to the comparison's tables."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest

from nerve_cli.compare import compare_runs
from nerve_cli.compare_format import TABLE_NAMES, format_comparison
from nerve_cli.store import load_results
from tests.synthetic_results import write_synthetic_run

METRICS = ["se_pre", "pr_post", "js"]


@pytest.fixture(scope="module")
def three_run_comparison(tmp_path_factory):
    """A comparison of three synthetic runs; run-c has no eval_loss and one more layer."""
    root = tmp_path_factory.mktemp("runs")
    runs = [
        load_results(write_synthetic_run(root / "a", run="run-a", seed=1)),
        load_results(write_synthetic_run(root / "b", run="run-b", seed=2)),
        load_results(
            write_synthetic_run(root / "c", run="run-c", n_layers=4, seed=3, with_eval_loss=False)
        ),
    ]
    return compare_runs(runs, METRICS)


@pytest.fixture(scope="module")
def pair_comparison(tmp_path_factory):
    """A comparison of two synthetic runs that share every step and layer."""
    root = tmp_path_factory.mktemp("pair")
    runs = [
        load_results(write_synthetic_run(root / "a", run="run-a", seed=1)),
        load_results(write_synthetic_run(root / "b", run="run-b", seed=2)),
    ]
    return compare_runs(runs, METRICS)


def assert_same_table(parsed: pd.DataFrame, expected: pd.DataFrame) -> None:
    """Compare a parsed table with the original, ignoring dtypes that text cannot keep."""
    parsed = parsed[list(expected.columns)].reset_index(drop=True)
    expected = expected.reset_index(drop=True)
    for column in expected.columns:
        if pd.api.types.is_numeric_dtype(expected[column]):
            np.testing.assert_allclose(
                parsed[column].astype(float),
                expected[column].astype(float),
                rtol=1e-12,
                err_msg=column,
            )
        else:
            assert parsed[column].astype(str).tolist() == expected[column].astype(str).tolist(), (
                column
            )


def test_csv_parses_back_to_every_table(three_run_comparison):
    text = format_comparison(three_run_comparison, "csv")

    parsed = pd.read_csv(io.StringIO(text))

    assert parsed.columns[0] == "table"
    for name in TABLE_NAMES:
        expected = getattr(three_run_comparison, name)
        section = parsed[parsed["table"] == name]
        assert len(section) == len(expected), name
        if not expected.empty:
            assert_same_table(section, expected)


def test_csv_summary_and_notes_rows(three_run_comparison):
    parsed = pd.read_csv(io.StringIO(format_comparison(three_run_comparison, "csv")))

    summary = parsed[parsed["table"] == "summary"].iloc[0]
    assert summary["aligned_by"] == "common_steps"
    assert summary["step"] == 1000
    assert three_run_comparison.notes == [
        "per-layer rows left out: layer counts differ (run-a: 3, run-b: 3, run-c: 4); "
        "layer means are compared"
    ]
    assert parsed.loc[parsed["table"] == "notes", "note"].tolist() == three_run_comparison.notes


def test_csv_keeps_steps_integral(pair_comparison):
    text = format_comparison(pair_comparison, "csv")

    assert ",1000.0," not in text
    assert pd.read_csv(io.StringIO(text))["step"].dropna().eq(1000).any()


def test_json_parses_back_to_every_table(three_run_comparison):
    payload = json.loads(format_comparison(three_run_comparison, "json"))

    assert payload["runs"] == ["run-a", "run-b", "run-c"]
    assert payload["aligned_by"] == "common_steps"
    assert payload["step"] == 1000
    assert payload["notes"] == three_run_comparison.notes
    for name in TABLE_NAMES:
        expected = getattr(three_run_comparison, name)
        records = pd.DataFrame.from_records(payload[name], columns=list(expected.columns))
        assert len(records) == len(expected), name
        assert_same_table(records, expected)


def test_json_writes_nan_as_null(three_run_comparison):
    text = format_comparison(three_run_comparison, "json")
    payload = json.loads(text)

    assert "NaN" not in text
    eval_rows = [row for row in payload["across_runs"] if row["loss"] == "eval_loss"]
    assert eval_rows and all(row["pearson_r"] is None for row in eval_rows)


def markdown_tables(text: str) -> dict[str, list[list[str]]]:
    """Return the rows of each pipe table, keyed by the heading above it."""
    tables, heading = {}, None
    for line in text.splitlines():
        if line.startswith("### "):
            heading = line.removeprefix("### ")
            tables[heading] = []
        elif line.startswith("| ") and heading is not None:
            tables[heading].append([cell.strip() for cell in line.strip("|").split(" | ")])
    return tables


def test_markdown_rows_match_layer_means(pair_comparison):
    tables = markdown_tables(format_comparison(pair_comparison, "markdown"))

    rows = tables["Layer means at step 1000"]
    assert rows[0] == ["metric", "run-a", "run-b", "run-b - run-a"]
    assert rows[1] == ["---", "---:", "---:", "---:"]
    means = pair_comparison.layer_means.set_index(["metric", "run"])
    for metric, value_a, value_b, difference in rows[2:]:
        assert float(value_a) == pytest.approx(means.at[(metric, "run-a"), "value"], abs=5e-5)
        assert float(value_b) == pytest.approx(means.at[(metric, "run-b"), "value"], abs=5e-5)
        assert float(difference) == pytest.approx(
            means.at[(metric, "run-b"), "diff_to_first"], abs=5e-5
        )
    assert [row[0] for row in rows[2:]] == METRICS


def test_markdown_has_every_section(pair_comparison):
    tables = markdown_tables(format_comparison(pair_comparison, "markdown"))

    assert list(tables) == [
        "Layer means at step 1000",
        "Per layer at step 1000",
        "Trajectories: layer mean at the first and last aligned steps",
        "Metric against loss within each run (r needs 4 or more checkpoints)",
    ]
    assert len(tables["Per layer at step 1000"]) == 2 + 3 * len(METRICS)


def test_markdown_missing_r_is_empty_cell(three_run_comparison):
    tables = markdown_tables(format_comparison(three_run_comparison, "markdown"))

    rows = tables["Metric against loss across runs (final value of each run)"]
    header = rows[0]
    assert header[:2] == ["metric", "probe_loss n_runs"]
    eval_r = header.index("eval_loss pearson_r")
    assert all(row[eval_r] == "" for row in rows[2:])


def test_table_names_runs_and_sections(three_run_comparison):
    text = format_comparison(three_run_comparison, "table")

    assert text.startswith("runs: run-a, run-b, run-c (differences are to run-a)\n")
    for run in ("run-a", "run-b", "run-c"):
        assert run in text
    for title in ("Layer means at step 1000", "Trajectories", "within each run", "across runs"):
        assert title in text
    assert "note: per-layer rows left out: layer counts differ" in text
    assert "Per layer" not in text


def test_table_shows_fraction_alignment(tmp_path):
    run_a = load_results(write_synthetic_run(tmp_path / "a", run="run-a", steps=(0, 10, 100, 1000)))
    run_b = load_results(write_synthetic_run(tmp_path / "b", run="run-b", steps=(5, 50, 500, 2000)))
    text = format_comparison(compare_runs([run_a, run_b], ["js"]), "table")

    assert "aligned by: fraction of each run's last step" in text
    assert "Alignment: step (fraction of the run's last step)" in text
    assert "2000 (1.00)" in text
    assert "Layer means at steps run-a 1000, run-b 2000" in text


def test_unknown_format_rejected(pair_comparison):
    with pytest.raises(
        ValueError, match="unknown format 'xml'; choose from: table, csv, json, markdown"
    ):
        format_comparison(pair_comparison, "xml")
