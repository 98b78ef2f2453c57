"""Comparison of two or more result directories written by ``nerve analyze``.

The tables follow the analyses of NerVE (Jha & Reagen, ICLR 2026, arXiv
2603.06922): which run keeps more effective dimensions, where across depth,
when in training, and whether the spectra track the loss. The first run is the
reference, so every ``diff_to_first`` is a run's value minus the first run's
value. Pure pandas and scipy, with no printing and no file access.

A layer mean is the mean over all layers of one checkpoint. It is NaN when any
layer of that checkpoint has a null metric (see the ``null_reason`` column),
because a mean over the remaining layers would not be comparable across steps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

from nerve_cli.alignment import COMMON_STEPS, Alignment, align_steps, format_steps
from nerve_cli.compare_format import format_comparison
from nerve_cli.store import METRIC_COLUMNS, RunResults

__all__ = [
    "DEFAULT_METRICS",
    "Comparison",
    "ComparisonError",
    "compare_runs",
    "compute_layer_means",
    "compute_loss_correlations",
    "format_comparison",
]

DEFAULT_METRICS = ("se_pre", "se_post", "pr_pre", "pr_post", "eee_post", "js", "pr_gain")
LOSS_COLUMNS = ("probe_loss", "eval_loss")

# Minimum number of points behind a within-run r (checkpoints) and an across-run r (runs).
MIN_CHECKPOINTS = 4
MIN_RUNS = 3

PER_LAYER_COLUMNS = ["metric", "layer", "run", "step", "value", "diff_to_first"]
LAYER_MEANS_COLUMNS = ["metric", "run", "step", "value", "diff_to_first"]
TRAJECTORY_COLUMNS = [
    "run",
    "metric",
    "first_step",
    "first_value",
    "last_step",
    "last_value",
    "change",
]
WITHIN_RUN_COLUMNS = ["run", "metric", "loss", "n_checkpoints", "pearson_r", "spearman_r"]
ACROSS_RUNS_COLUMNS = ["metric", "loss", "n_runs", "pearson_r", "spearman_r"]
R_DTYPES = {"pearson_r": "float64", "spearman_r": "float64"}


class ComparisonError(ValueError):
    """Raised when runs cannot be compared. The message is one line that names the remedy."""


@dataclass
class Comparison:
    """Tables of one comparison of runs, with column lists in the ``*_COLUMNS`` constants."""

    runs: list[str]
    aligned_by: str
    alignment: pd.DataFrame
    step: int
    per_layer: pd.DataFrame
    layer_means: pd.DataFrame
    trajectories: pd.DataFrame
    within_run: pd.DataFrame
    across_runs: pd.DataFrame
    notes: list[str] = field(default_factory=list)


def compare_runs(
    results: Sequence[RunResults],
    metrics: Sequence[str] = DEFAULT_METRICS,
    step: int | None = None,
    allow_probe_mismatch: bool = False,
) -> Comparison:
    """Compare runs per layer at one step, over training, and against their loss.

    ``step`` is a step of the first run, by default the last aligned step.
    The library accepts a single run, whose differences are all 0. Raises
    ComparisonError for an unknown metric or step, a run without metrics rows,
    the same directory given twice, or runs measured on different probes
    (unless ``allow_probe_mismatch``).
    """
    metrics = validate_metrics(metrics)
    check_runs_have_rows(results)
    labels, notes = label_runs(results)
    notes += check_probes(results, labels, allow_probe_mismatch)

    runs = dict(zip(labels, results, strict=True))
    means = {label: compute_layer_means(run.metrics, metrics) for label, run in runs.items()}
    notes += describe_missing_means(means, metrics)

    alignment = align_steps({label: run.metrics["step"].tolist() for label, run in runs.items()})
    notes += alignment.notes
    steps_at = alignment.steps_at(select_aligned_index(alignment, labels[0], step))

    per_layer, layer_note = build_per_layer(runs, steps_at, metrics)
    notes += layer_note
    within_run = [
        compute_loss_correlations(run, metrics).assign(run=label) for label, run in runs.items()
    ]
    final_steps = alignment.steps_at(alignment.n_aligned - 1)

    return Comparison(
        runs=labels,
        aligned_by=alignment.aligned_by,
        alignment=alignment.table,
        step=steps_at[labels[0]],
        per_layer=per_layer,
        layer_means=build_layer_means(means, steps_at, metrics),
        trajectories=build_trajectories(means, alignment, metrics),
        within_run=pd.concat(within_run, ignore_index=True),
        across_runs=compute_across_run_correlations(means, final_steps, metrics),
        notes=notes,
    )


def compute_loss_correlations(results: RunResults, metrics: Sequence[str]) -> pd.DataFrame:
    """Correlate each layer-mean metric with the loss over one run's checkpoints.

    Returns one row per (metric, loss) for ``probe_loss`` and ``eval_loss``,
    and no rows for a loss that is null at every checkpoint. ``n_checkpoints``
    counts the checkpoints where both values are present. Pearson and Spearman
    r are NaN when fewer than MIN_CHECKPOINTS checkpoints remain or either
    input is constant.
    """
    metrics = validate_metrics(metrics)
    means = compute_layer_means(results.metrics, metrics)
    losses = [loss for loss in LOSS_COLUMNS if means[loss].notna().any()]

    rows = []
    for metric in metrics:
        for loss in losses:
            n, pearson, spearman = correlate(means[metric], means[loss], MIN_CHECKPOINTS)
            rows.append((results.name, metric, loss, n, pearson, spearman))
    return _typed_frame(rows, WITHIN_RUN_COLUMNS, {"n_checkpoints": "int64", **R_DTYPES})


def compute_layer_means(frame: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """Return the mean over layers of each metric and loss, one row per step (the index).

    A metric's mean is NaN at a step where any layer is null for it. A loss
    is the same at every layer of a checkpoint, so its nulls are skipped.
    """
    columns = [*metrics, *LOSS_COLUMNS]
    means = frame.groupby("step")[columns].mean()

    incomplete = frame[list(metrics)].isna().groupby(frame["step"]).any()
    means[list(metrics)] = means[list(metrics)].mask(incomplete)
    return means


def correlate(x: Sequence[float], y: Sequence[float], min_points: int) -> tuple[int, float, float]:
    """Return (points used, Pearson r, Spearman r) over the pairs where both values are finite.

    Both r are NaN when fewer than ``min_points`` pairs remain or either input
    is constant, where r is undefined.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    finite = np.isfinite(x) & np.isfinite(y)
    x, y = x[finite], y[finite]

    n = len(x)
    if n < max(min_points, 2) or np.ptp(x) == 0 or np.ptp(y) == 0:
        return n, float("nan"), float("nan")
    return n, float(stats.pearsonr(x, y).statistic), float(stats.spearmanr(x, y).statistic)


def validate_metrics(metrics: Sequence[str]) -> list[str]:
    """Return the metric names without duplicates, or raise ComparisonError for an unknown one."""
    if isinstance(metrics, str):
        metrics = [metrics]
    known = ", ".join(METRIC_COLUMNS)
    if not metrics:
        raise ComparisonError(f"no metric selected; choose from: {known}")

    unknown = [name for name in metrics if name not in METRIC_COLUMNS]
    if unknown:
        raise ComparisonError(f"unknown metric '{unknown[0]}'; choose from: {known}")
    return list(dict.fromkeys(metrics))


def check_runs_have_rows(results: Sequence[RunResults]) -> None:
    """Raise ComparisonError when no run is given or a run has no metrics rows."""
    if not results:
        raise ComparisonError(
            "no result directory given; pass the --out directories of 'nerve analyze'"
        )
    for run in results:
        if run.metrics.empty:
            raise ComparisonError(
                f"{run.path}: no metrics rows; run 'nerve analyze' on its checkpoints first"
            )


def label_runs(results: Sequence[RunResults]) -> tuple[list[str], list[str]]:
    """Name each run in the tables by its run name, or by its directory where names repeat.

    Returns the labels and a note when directories were used. Raises
    ComparisonError when one directory is given twice.
    """
    seen: dict[object, RunResults] = {}
    for run in results:
        resolved = run.path.resolve()
        if resolved in seen:
            raise ComparisonError(f"{run.path}: result directory given twice; pass each run once")
        seen[resolved] = run

    names = [run.name for run in results]
    if len(set(names)) == len(names):
        return names, []

    labels = [str(run.path) if names.count(run.name) > 1 else run.name for run in results]
    note = "runs that share a run name are labelled by their directory"
    return labels, [note]


def check_probes(
    results: Sequence[RunResults], labels: Sequence[str], allow_mismatch: bool
) -> list[str]:
    """Raise ComparisonError when runs used different probes, unless ``allow_mismatch``.

    Runs are compared by the probe entry of run.json: the sha256 of the probe
    file, the number of tokens and the sequence length, since SE and PR are
    capped by the token count. Returns a note when the mismatch is allowed.
    """
    signatures = [describe_probe(run.info.get("probe") or {}) for run in results]
    if len(set(signatures)) <= 1:
        return []

    described = "; ".join(
        f"{label}: {signature}" for label, signature in zip(labels, signatures, strict=True)
    )
    if not allow_mismatch:
        raise ComparisonError(
            f"runs were analyzed with different probes ({described}); re-run 'nerve "
            "analyze' with the same --probe and --max-tokens, or pass --allow-probe-mismatch "
            "to compare anyway"
        )
    return [f"runs were analyzed with different probes ({described}); compared anyway"]


def describe_probe(probe: Mapping) -> str:
    """Return the probe identity of a run: sha256 prefix, token count and sequence length."""
    checksum = probe.get("sha256")
    prefix = checksum[:12] if checksum else "unknown"
    return f"sha256 {prefix}, {probe.get('n_tokens')} tokens in rows of {probe.get('seq_len')}"


def describe_missing_means(means: Mapping[str, pd.DataFrame], metrics: Sequence[str]) -> list[str]:
    """Return one note per run whose layer means are NaN at some steps."""
    notes = []
    for label, frame in means.items():
        missing = frame.index[frame[list(metrics)].isna().any(axis=1)].tolist()
        if missing:
            notes.append(
                f"{label}: layer means are missing at step(s) {format_steps(missing)} because "
                "some layers have null metrics (see the null_reason column)"
            )
    return notes


def select_aligned_index(alignment: Alignment, reference_run: str, step: int | None) -> int:
    """Return the aligned index of ``step`` of the reference run (default: the last one)."""
    if step is None:
        return alignment.n_aligned - 1

    table = alignment.table
    reference = table[table["run"] == reference_run]
    matches = reference[reference["step"] == step]
    if matches.empty:
        where = "common to all runs"
        if alignment.aligned_by != COMMON_STEPS:
            where = f"a step of {reference_run}, the first run"
        choices = format_steps(reference["step"].tolist())
        raise ComparisonError(f"step {step} is not {where}; choose a step from: {choices}")
    return int(matches["aligned_index"].iloc[0])


def build_per_layer(
    runs: Mapping[str, RunResults], steps_at: Mapping[str, int], metrics: Sequence[str]
) -> tuple[pd.DataFrame, list[str]]:
    """Return one row per (metric, layer, run) at the compared step, and a note when left out.

    The table is empty when the runs have different sets of layers, because
    layer ``i`` of one run has no counterpart in the other.
    """
    layer_sets = {label: set(run.metrics["layer"].tolist()) for label, run in runs.items()}
    if len({frozenset(layers) for layers in layer_sets.values()}) > 1:
        counts = ", ".join(f"{label}: {len(layers)}" for label, layers in layer_sets.items())
        note = f"per-layer rows left out: layer counts differ ({counts}); layer means are compared"
        return pd.DataFrame(columns=PER_LAYER_COLUMNS), [note]

    frames = []
    for label, run in runs.items():
        rows = run.metrics.loc[run.metrics["step"] == steps_at[label], ["layer", *metrics]]
        long = rows.melt(id_vars="layer", var_name="metric", value_name="value")
        frames.append(long.assign(run=label, step=steps_at[label]))

    table = add_diff_to_first(
        pd.concat(frames, ignore_index=True), ["metric", "layer"], next(iter(runs))
    )
    table = sort_rows(table, ["metric", "layer", "run"], metrics, list(runs))
    return table[PER_LAYER_COLUMNS], []


def build_layer_means(
    means: Mapping[str, pd.DataFrame], steps_at: Mapping[str, int], metrics: Sequence[str]
) -> pd.DataFrame:
    """Return one row per (metric, run): the layer mean at the compared step."""
    rows = []
    for label, frame in means.items():
        for metric in metrics:
            rows.append((metric, label, steps_at[label], frame.at[steps_at[label], metric]))
    table = _typed_frame(rows, LAYER_MEANS_COLUMNS[:-1], {"step": "int64", "value": "float64"})

    table = add_diff_to_first(table, ["metric"], next(iter(means)))
    return sort_rows(table, ["metric", "run"], metrics, list(means))[LAYER_MEANS_COLUMNS]


def build_trajectories(
    means: Mapping[str, pd.DataFrame], alignment: Alignment, metrics: Sequence[str]
) -> pd.DataFrame:
    """Return one row per (run, metric): the layer mean at the first and last aligned steps."""
    first_steps = alignment.steps_at(0)
    last_steps = alignment.steps_at(alignment.n_aligned - 1)

    rows = []
    for label, frame in means.items():
        first, last = first_steps[label], last_steps[label]
        for metric in metrics:
            first_value, last_value = frame.at[first, metric], frame.at[last, metric]
            rows.append(
                (label, metric, first, first_value, last, last_value, last_value - first_value)
            )
    dtypes = {"first_step": "int64", "last_step": "int64", "first_value": "float64"}
    return _typed_frame(
        rows, TRAJECTORY_COLUMNS, {**dtypes, "last_value": "float64", "change": "float64"}
    )


def compute_across_run_correlations(
    means: Mapping[str, pd.DataFrame], final_steps: Mapping[str, int], metrics: Sequence[str]
) -> pd.DataFrame:
    """Correlate each run's final layer-mean metric with its final loss, across runs.

    The final step of a run is its last aligned step. The table is empty with
    fewer than MIN_RUNS runs. An r is NaN when fewer than MIN_RUNS runs have
    both values or either input is constant.
    """
    if len(means) < MIN_RUNS:
        return pd.DataFrame(columns=ACROSS_RUNS_COLUMNS)

    finals = pd.DataFrame([frame.loc[final_steps[label]] for label, frame in means.items()])
    losses = [loss for loss in LOSS_COLUMNS if finals[loss].notna().any()]

    rows = []
    for metric in metrics:
        for loss in losses:
            n, pearson, spearman = correlate(finals[metric], finals[loss], MIN_RUNS)
            rows.append((metric, loss, n, pearson, spearman))
    return _typed_frame(rows, ACROSS_RUNS_COLUMNS, {"n_runs": "int64", **R_DTYPES})


def add_diff_to_first(table: pd.DataFrame, keys: list[str], first_run: str) -> pd.DataFrame:
    """Add ``diff_to_first``: each row's value minus the first run's value with the same keys."""
    first = table.loc[table["run"] == first_run, [*keys, "value"]]
    merged = table.merge(first.rename(columns={"value": "first_value"}), on=keys, how="left")
    merged["diff_to_first"] = merged["value"] - merged["first_value"]
    return merged.drop(columns="first_value")


def sort_rows(
    table: pd.DataFrame, by: list[str], metrics: Sequence[str], runs: Sequence[str]
) -> pd.DataFrame:
    """Sort rows by ``by``, with metrics and runs in the order they were requested."""
    ranks = {
        "metric": {name: rank for rank, name in enumerate(metrics)},
        "run": {name: rank for rank, name in enumerate(runs)},
    }

    def rank_of(column: pd.Series) -> pd.Series:
        return column.map(ranks[column.name]) if column.name in ranks else column

    return table.sort_values(by, key=rank_of, kind="stable").reset_index(drop=True)


def _typed_frame(rows: list[tuple], columns: list[str], dtypes: Mapping[str, str]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=columns).astype(dict(dtypes))
