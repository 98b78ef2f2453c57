"""Findings in words, computed from one run's tables.

Pure functions from DataFrames to sentences. Every sentence states the numbers
it rests on, so a reader can check it against the tables of the report.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from nerve_cli.report.formatting import format_change, format_integer_list, format_value
from nerve_cli.report.frames import select_last_step
from nerve_cli.report.labels import LOSS_LABELS, metric_label

__all__ = [
    "describe_reinjection",
    "describe_pr_gain",
    "describe_eee_trend",
    "describe_loss_tracking",
    "describe_rank_limits",
    "describe_failed_checkpoints",
    "describe_compared_step",
    "describe_compared_trends",
    "summarize_run",
]

# Jha & Reagen (NerVE, ICLR 2026, arXiv 2603.06922) report |Pearson r| >= 0.9 between
# these metrics and the validation loss in most of their settings.
STRONG_CORRELATION = 0.9


def _valid_rows_at(metrics: pd.DataFrame, step: int) -> pd.DataFrame:
    rows = metrics[metrics["step"] == step].dropna(subset=["se_pre", "se_post"])
    return rows.sort_values("layer")


def _layers(layers: list[int]) -> str:
    noun = "layer" if len(layers) == 1 else "layers"
    return f"{noun} {format_integer_list(layers)}"


def describe_reinjection(metrics: pd.DataFrame, step: int) -> str:
    """Say in which layers SE post exceeds SE pre at ``step``, and the range of SE post - SE pre."""
    rows = _valid_rows_at(metrics, step)
    delta = rows["se_post"] - rows["se_pre"]
    gaining = rows.loc[delta > 0, "layer"].tolist()
    losing = rows.loc[delta <= 0, "layer"].tolist()

    which = f" ({format_integer_list(gaining)})" if gaining and losing else ""
    low, high = format_value(delta.min(), 3), format_value(delta.max(), 3)
    sentence = (
        f"At step {step}, SE post exceeds SE pre in {len(gaining)} of {len(rows)} layers{which}, "
        f"with SE post - SE pre from {low} to {high} nats."
    )

    if not gaining:
        return f"{sentence} The nonlinearity does not reinject variance in any layer at this step."
    if losing:
        return f"{sentence} It does not in {_layers(losing)}."
    return f"{sentence} The nonlinearity reinjects variance in every layer."


def describe_pr_gain(metrics: pd.DataFrame, step: int) -> str:
    """Say in which layer PR gain (PR post / PR pre) is largest at ``step``, and its layer mean."""
    rows = metrics[metrics["step"] == step].dropna(subset=["pr_gain"])
    best = rows.loc[rows["pr_gain"].idxmax()]
    gain, pre, post = (format_value(best[column], 3) for column in ("pr_gain", "pr_pre", "pr_post"))

    return (
        f"At step {step}, PR gain (PR post / PR pre) is largest in layer {int(best['layer'])}: "
        f"{gain}, from PR {pre} pre to {post} post. "
        f"The mean PR gain over {len(rows)} layers is {format_value(rows['pr_gain'].mean(), 3)}."
    )


def _describe_eee_direction(change: float) -> tuple[str, str]:
    if change < 0:
        return "falls", "so the spectrum after the nonlinearity gets flatter over training"
    if change > 0:
        return "rises", "so the spectrum after the nonlinearity concentrates in fewer directions"
    return "stays the same", "so the flatness of the spectrum after the nonlinearity is unchanged"


def describe_eee_trend(metrics: pd.DataFrame, layer_means: pd.DataFrame) -> str:
    """Say whether layer-mean EEE post falls over training, and in how many layers."""
    valid = layer_means.dropna(subset=["eee_post"])
    if len(valid) < 2:
        return "EEE post has one checkpoint only, so its trend over training is unknown."

    first, last = valid.iloc[0], valid.iloc[-1]
    first_step, last_step = int(first["step"]), int(last["step"])
    change = last["eee_post"] - first["eee_post"]

    by_layer = metrics.pivot_table(
        index="layer", columns="step", values="eee_post", aggfunc="first"
    )
    layer_change = by_layer[last_step] - by_layer[first_step]
    n_falling = int((layer_change < 0).sum())
    n_layers = int(layer_change.notna().sum())

    direction, meaning = _describe_eee_direction(change)
    return (
        f"Layer-mean EEE post {direction} from {format_value(first['eee_post'], 3)} at step "
        f"{first_step} to {format_value(last['eee_post'], 3)} at step {last_step} "
        f"({format_change(change)}), {meaning}. It falls in {n_falling} of {n_layers} layers."
    )


def describe_loss_tracking(correlations: pd.DataFrame, loss_column: str | None) -> str:
    """Say which metric's layer mean tracks the loss best by |Pearson r|, and how many reach 0.9.

    ``correlations`` has the columns of ``compute_loss_correlations``.
    """
    if loss_column is None:
        return "No loss is stored for this run, so no metric-loss correlation is reported."

    loss_label = LOSS_LABELS.get(loss_column, loss_column)
    rows = correlations[correlations["loss"] == loss_column].dropna(subset=["pearson_r"])
    if rows.empty:
        n_checkpoints = correlations["n_checkpoints"].max() if not correlations.empty else 0
        return (
            f"No Pearson r with the {loss_label} is defined with "
            f"{format_value(n_checkpoints)} checkpoints."
        )

    best = rows.loc[rows["pearson_r"].abs().idxmax()]
    n_strong = int((rows["pearson_r"].abs() >= STRONG_CORRELATION).sum())
    pearson, spearman = format_value(best["pearson_r"], 3), format_value(best["spearman_r"], 3)
    return (
        f"{metric_label(best['metric'])} tracks the {loss_label} most closely: "
        f"Pearson r = {pearson} (Spearman {spearman}) over {int(best['n_checkpoints'])} "
        f"checkpoints. {n_strong} of {len(rows)} metrics reach |r| >= {STRONG_CORRELATION}."
    )


def describe_rank_limits(metrics: pd.DataFrame) -> str | None:
    """Warn when some rows had no more probe tokens than the FFN width, which caps SE and PR."""
    limited = metrics[metrics["rank_limited"]]
    if limited.empty:
        return None

    n_tokens, width = int(limited["n_tokens"].min()), int(limited["ffn_dim"].max())
    return (
        f"{len(limited)} of {len(metrics)} layer rows had no more probe tokens than the FFN "
        f"width ({n_tokens} tokens, width {width}), so SE and PR there are capped by the "
        "token count. Re-run 'nerve analyze' with a larger --max-tokens."
    )


def describe_failed_checkpoints(info: dict[str, Any]) -> str | None:
    """List the checkpoints that run.json marks as not done, with their errors."""
    checkpoints = info.get("checkpoints") or []
    failed = [entry for entry in checkpoints if entry.get("status") != "done"]
    if not failed:
        return None

    details = "; ".join(
        f"step {entry.get('step')}: {entry.get('error') or entry.get('status')}" for entry in failed
    )
    if len(failed) == 1:
        return f"1 checkpoint failed and is missing from the report ({details})."
    return f"{len(failed)} checkpoints failed and are missing from the report ({details})."


def describe_compared_step(
    layer_means: pd.DataFrame, metric: str, higher_is_healthier: bool
) -> str | None:
    """Name the run whose layer mean of ``metric`` is healthiest at the compared step.

    Every run's value is listed. ``layer_means`` has the columns of
    ``Comparison.layer_means`` (metric, run, step, value, diff_to_first).
    """
    rows = layer_means[layer_means["metric"] == metric].dropna(subset=["value"])
    if len(rows) < 2:
        return None

    best = rows.loc[rows["value"].idxmax() if higher_is_healthier else rows["value"].idxmin()]
    extreme = "highest" if higher_is_healthier else "lowest"
    values = ", ".join(
        f"{row.run} {format_value(row.value)} at step {int(row.step)}"
        for row in rows.itertuples(index=False)
    )
    return (
        f"At the compared step, layer-mean {metric_label(metric)} is {extreme} in "
        f"{best['run']} ({values})."
    )


def describe_compared_trends(trajectories: pd.DataFrame, metric: str) -> str | None:
    """Say in how many runs the layer mean of ``metric`` falls from first to last aligned step.

    ``trajectories`` has the columns of ``Comparison.trajectories``.
    """
    rows = trajectories[trajectories["metric"] == metric].dropna(subset=["change"])
    if rows.empty:
        return None

    n_falling = int((rows["change"] < 0).sum())
    changes = ", ".join(
        f"{row.run} {format_change(row.change)} from step {int(row.first_step)} "
        f"to {int(row.last_step)}"
        for row in rows.itertuples(index=False)
    )
    return (
        f"Layer-mean {metric_label(metric)} falls over training in {n_falling} of {len(rows)} "
        f"runs ({changes})."
    )


def summarize_run(
    metrics: pd.DataFrame,
    info: dict[str, Any],
    layer_means: pd.DataFrame,
    correlations: pd.DataFrame,
    loss_column: str | None,
) -> list[str]:
    """Collect the findings of one run, in reading order."""
    step = select_last_step(metrics)
    if step is None:
        return ["No checkpoint has valid metrics, so there is nothing to report."]

    sentences = [
        describe_reinjection(metrics, step),
        describe_pr_gain(metrics, step),
        describe_eee_trend(metrics, layer_means),
        describe_loss_tracking(correlations, loss_column),
        describe_rank_limits(metrics),
        describe_failed_checkpoints(info),
    ]
    return [sentence for sentence in sentences if sentence is not None]
