"""Text output of a comparison: terminal table, CSV, JSON and Markdown.

The terminal table and Markdown show one value column per run plus one
difference column per later run. CSV and JSON keep the long tables of
:class:`nerve_cli.compare.Comparison` unchanged, so scripts read the same
columns as the Python API. Markdown is written here rather than with
``DataFrame.to_markdown``, which needs the optional ``tabulate`` package.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from pandas.api.types import is_integer_dtype, is_numeric_dtype

from nerve_cli.alignment import COMMON_STEPS, format_steps

if TYPE_CHECKING:
    from nerve_cli.compare import Comparison

FORMATS = ("table", "csv", "json", "markdown")
TABLE_NAMES = ("alignment", "per_layer", "layer_means", "trajectories", "within_run", "across_runs")


@dataclass
class Section:
    """One titled table of the terminal and Markdown output, shown with its index."""

    title: str
    frame: pd.DataFrame


def format_comparison(comparison: Comparison, fmt: str) -> str:
    """Render a comparison as ``table``, ``csv``, ``json`` or ``markdown`` text."""
    writers = {
        "table": format_table,
        "csv": format_csv,
        "json": format_json,
        "markdown": format_markdown,
    }
    if fmt not in writers:
        raise ValueError(f"unknown format '{fmt}'; choose from: {', '.join(FORMATS)}")
    return writers[fmt](comparison)


def format_table(comparison: Comparison) -> str:
    """Render the header, the notes and every non-empty section as aligned plain text."""
    parts = ["\n".join(build_header(comparison))]
    for section in build_sections(comparison):
        body = section.frame.to_string(float_format=format_float, na_rep="-")
        parts.append(f"{section.title}\n{body}")
    return "\n\n".join(parts) + "\n"


def format_markdown(comparison: Comparison) -> str:
    """Render the header and notes as a list and every non-empty section as a pipe table."""
    parts = ["## nerve compare", "\n".join(f"- {line}" for line in build_header(comparison))]
    for section in build_sections(comparison):
        parts.append(f"### {section.title}\n\n{render_markdown_table(section.frame.reset_index())}")
    return "\n\n".join(parts) + "\n"


def format_json(comparison: Comparison) -> str:
    """Render one JSON object: runs, aligned_by, step, notes and each table as a list of records."""
    payload = {
        "runs": comparison.runs,
        "aligned_by": comparison.aligned_by,
        "step": comparison.step,
        "notes": comparison.notes,
    }
    for name in TABLE_NAMES:
        payload[name] = to_json_records(getattr(comparison, name))
    return json.dumps(payload, indent=2, allow_nan=False) + "\n"


def to_json_records(table: pd.DataFrame) -> list[dict[str, object]]:
    """Return the rows of ``table`` as dictionaries of plain Python values, NaN as None.

    ``DataFrame.to_json`` is not used because its ``double_precision`` counts
    decimal places, which drops significant digits of small values.
    """
    records = table.to_dict(orient="records")
    return [{key: to_json_value(value) for key, value in record.items()} for record in records]


def to_json_value(value: object) -> object:
    """Return a JSON-ready scalar: numpy scalars as Python scalars, missing values as None."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or value is pd.NA:
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def format_csv(comparison: Comparison) -> str:
    """Render every table as one long CSV table whose ``table`` column names the section.

    A ``summary`` row contains ``aligned_by`` and the compared ``step``, and each
    note is a ``notes`` row with a ``note`` column.
    """
    summary = pd.DataFrame({"aligned_by": [comparison.aligned_by], "step": [comparison.step]})
    frames = [summary.assign(table="summary")]
    for name in TABLE_NAMES:
        table = getattr(comparison, name)
        if not table.empty:
            frames.append(with_nullable_integers(table).assign(table=name))
    if comparison.notes:
        frames.append(pd.DataFrame({"note": comparison.notes}).assign(table="notes"))

    long = pd.concat([with_nullable_integers(frame) for frame in frames], ignore_index=True)
    columns = ["table", *[column for column in long.columns if column != "table"]]
    return long[columns].to_csv(index=False)


def build_header(comparison: Comparison) -> list[str]:
    """Return the header lines: the runs, their alignment, the compared step and the notes."""
    runs = comparison.runs
    reference = comparison.alignment[comparison.alignment["run"] == runs[0]]
    steps = format_steps(reference["step"].tolist())

    lines = [f"runs: {', '.join(runs)} (differences are to {runs[0]})"]
    if comparison.aligned_by == COMMON_STEPS:
        lines.append(f"aligned by: common steps ({len(reference)}: {steps})")
    else:
        lines.append(f"aligned by: fraction of each run's last step (steps of {runs[0]}: {steps})")
    lines.append(f"compared step: {comparison.step}")

    lines += [f"note: {note}" for note in comparison.notes]
    if comparison.within_run.empty:
        lines.append("note: no run has probe_loss or eval_loss values, so no loss correlations")
    if comparison.across_runs.empty:
        lines.append(f"note: correlations across runs need 3 or more runs (got {len(runs)})")
    return lines


def build_sections(comparison: Comparison) -> list[Section]:
    """Return the titled tables of the terminal and Markdown output, leaving out empty ones."""
    runs = comparison.runs
    at_steps = describe_compared_steps(comparison.layer_means)
    sections = []
    if comparison.aligned_by != COMMON_STEPS:
        sections.append(
            Section(
                "Alignment: step (fraction of the run's last step)", pivot_alignment(comparison)
            )
        )
    sections.append(
        Section(f"Layer means {at_steps}", widen_by_run(comparison.layer_means, ["metric"], runs))
    )
    if not comparison.per_layer.empty:
        per_layer = widen_by_run(comparison.per_layer, ["metric", "layer"], runs)
        sections.append(Section(f"Per layer {at_steps}", per_layer))

    trajectories = comparison.trajectories.set_index(["run", "metric"])
    sections.append(
        Section("Trajectories: layer mean at the first and last aligned steps", trajectories)
    )
    if not comparison.within_run.empty:
        within = widen_by_loss(comparison.within_run, ["run", "metric"])
        sections.append(
            Section("Metric against loss within each run (r needs 4 or more checkpoints)", within)
        )
    if not comparison.across_runs.empty:
        across = widen_by_loss(comparison.across_runs, ["metric"])
        sections.append(
            Section("Metric against loss across runs (final value of each run)", across)
        )
    return sections


def describe_compared_steps(layer_means: pd.DataFrame) -> str:
    """Return "at step S", or the step of each run when the aligned steps differ."""
    steps = layer_means.drop_duplicates("run")[["run", "step"]]
    if steps["step"].nunique() == 1:
        return f"at step {steps['step'].iloc[0]}"
    return "at steps " + ", ".join(f"{run} {step}" for run, step in steps.itertuples(index=False))


def widen_by_run(table: pd.DataFrame, keys: list[str], runs: list[str]) -> pd.DataFrame:
    """Pivot a long table to one value column per run and a ``RUN - FIRST`` column per later run."""
    indexed = table.set_index([*keys, "run"])
    values = indexed["value"].unstack("run")[runs]
    differences = indexed["diff_to_first"].unstack("run")[runs[1:]]
    differences.columns = [f"{run} - {runs[0]}" for run in runs[1:]]

    wide = pd.concat([values, differences], axis=1)
    wide.columns.name = None
    # unstack sorts the index, so restore the requested metric order.
    order = table.drop_duplicates(keys).set_index(keys).index
    return wide.reindex(order)


def widen_by_loss(table: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Pivot a correlation table to one column group per loss, in the order of ``table``.

    A run without values of a loss has no row for it, so its count becomes 0.
    """
    indexed = table.set_index([*keys, "loss"])
    wide = indexed.unstack("loss").swaplevel(axis=1)
    counts = [column for column in wide.columns if column[1].startswith("n_")]
    wide[counts] = wide[counts].fillna(0).astype("int64")
    losses = table["loss"].drop_duplicates().tolist()
    wide = wide[[(loss, column) for loss in losses for column in indexed.columns]]

    wide.columns.names = [None, None]
    order = table.drop_duplicates(keys).set_index(keys).index
    return wide.reindex(order)


def pivot_alignment(comparison: Comparison) -> pd.DataFrame:
    """Return one row per aligned index and one "step (fraction)" column per run."""
    alignment = comparison.alignment
    cells = [
        f"{step} ({fraction:.2f})"
        for step, fraction in zip(alignment["step"], alignment["fraction"], strict=True)
    ]
    wide = alignment.assign(cell=cells).pivot(index="aligned_index", columns="run", values="cell")
    wide = wide[comparison.runs]
    wide.columns.name = None
    return wide


def render_markdown_table(frame: pd.DataFrame) -> str:
    """Return a GitHub-flavoured Markdown pipe table with numeric columns right-aligned."""
    header = [escape_markdown(format_column_name(column)) for column in frame.columns]
    alignment = ["---:" if is_numeric_dtype(frame[column]) else "---" for column in frame.columns]
    lines = [_markdown_row(header), _markdown_row(alignment)]
    for row in frame.itertuples(index=False):
        lines.append(_markdown_row([format_cell(value) for value in row]))
    return "\n".join(lines)


def format_column_name(column: object) -> str:
    """Return a column name, joining the levels of a MultiIndex column with spaces."""
    if isinstance(column, tuple):
        return " ".join(str(level) for level in column if str(level))
    return str(column)


def format_cell(value: object) -> str:
    """Return a Markdown cell: empty for a missing value, 4 decimals for a float."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return ""
    if isinstance(value, float):
        return format_float(value)
    return escape_markdown(str(value))


def format_float(value: float) -> str:
    """Return a float with 4 decimals, the precision of every table in the text output."""
    return f"{value:.4f}"


def escape_markdown(text: str) -> str:
    """Escape the pipe, which would end a Markdown table cell."""
    return text.replace("|", "\\|")


def with_nullable_integers(frame: pd.DataFrame) -> pd.DataFrame:
    """Return ``frame`` with integer columns as nullable Int64, so concat keeps them integral."""
    columns = [column for column in frame.columns if is_integer_dtype(frame[column])]
    return frame.astype({column: "Int64" for column in columns})


def _markdown_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"
