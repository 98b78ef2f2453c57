"""Findings in words: each sentence names the right layers, runs and numbers."""

from __future__ import annotations

import numpy as np
import pandas as pd

from nerve_cli.report import findings


def make_metrics(
    se_pre, se_post, pr_pre, pr_post, eee_post_by_step, steps=(0, 100)
) -> pd.DataFrame:
    """Build a metrics table: the SE and PR lists apply to the last step, one value per layer."""
    rows = []
    n_layers = len(se_pre)
    for step_index, step in enumerate(steps):
        for layer in range(n_layers):
            rows.append(
                {
                    "run": "r",
                    "step": step,
                    "layer": layer,
                    "ffn_dim": 64,
                    "n_tokens": 1024,
                    "se_pre": se_pre[layer],
                    "se_post": se_post[layer],
                    "pr_pre": pr_pre[layer],
                    "pr_post": pr_post[layer],
                    "pr_gain": pr_post[layer] / pr_pre[layer],
                    "eee_post": eee_post_by_step[step_index][layer],
                    "rank_limited": False,
                }
            )
    return pd.DataFrame(rows)


def layer_means_of(metrics: pd.DataFrame) -> pd.DataFrame:
    return metrics.groupby("step")[["eee_post"]].mean().reset_index()


def test_reinjection_in_every_layer():
    metrics = make_metrics([1.0, 2.0], [1.5, 2.1], [2, 2], [3, 3], [[0.5, 0.5], [0.4, 0.4]])

    sentence = findings.describe_reinjection(metrics, 100)

    assert sentence.startswith("At step 100, SE post exceeds SE pre in 2 of 2 layers,")
    assert "from 0.1 to 0.5 nats" in sentence
    assert "reinjects variance in every layer" in sentence


def test_reinjection_names_layers_without_gain():
    metrics = make_metrics(
        [1.0, 2.0, 3.0], [1.5, 1.9, 3.0], [2, 2, 2], [3, 3, 3], [[0.5] * 3, [0.4] * 3]
    )

    sentence = findings.describe_reinjection(metrics, 100)

    assert "in 1 of 3 layers (0)" in sentence
    assert "It does not in layers 1 and 2." in sentence
    assert "from -0.1 to 0.5 nats" in sentence


def test_reinjection_in_no_layer():
    metrics = make_metrics([2.0, 2.0], [1.0, 1.5], [2, 2], [3, 3], [[0.5, 0.5], [0.4, 0.4]])

    sentence = findings.describe_reinjection(metrics, 100)

    assert "in 0 of 2 layers," in sentence
    assert "does not reinject variance in any layer" in sentence


def test_pr_gain_names_largest_layer():
    metrics = make_metrics(
        [1, 1, 1], [2, 2, 2], [10.0, 4.0, 8.0], [12.0, 10.0, 8.0], [[0.5] * 3, [0.4] * 3]
    )

    sentence = findings.describe_pr_gain(metrics, 100)

    assert "largest in layer 1: 2.5, from PR 4 pre to 10 post" in sentence
    assert f"mean PR gain over 3 layers is {np.mean([1.2, 2.5, 1.0]):.3g}" in sentence


def test_eee_trend_falls():
    metrics = make_metrics([1, 1], [2, 2], [1, 1], [2, 2], [[0.6, 0.4], [0.3, 0.5]])

    sentence = findings.describe_eee_trend(metrics, layer_means_of(metrics))

    assert "falls from 0.5 at step 0 to 0.4 at step 100 (-0.1)" in sentence
    assert "falls in 1 of 2 layers" in sentence


def test_eee_trend_rises():
    metrics = make_metrics([1, 1], [2, 2], [1, 1], [2, 2], [[0.2, 0.2], [0.3, 0.5]])

    sentence = findings.describe_eee_trend(metrics, layer_means_of(metrics))

    assert "rises from 0.2 at step 0 to 0.4 at step 100 (+0.2)" in sentence
    assert "falls in 0 of 2 layers" in sentence


def test_eee_trend_needs_two_checkpoints():
    metrics = make_metrics([1], [2], [1], [2], [[0.2]], steps=(0,))

    sentence = findings.describe_eee_trend(metrics, layer_means_of(metrics))

    assert "one checkpoint only" in sentence


def correlations_table(rows) -> pd.DataFrame:
    columns = ["run", "metric", "loss", "n_checkpoints", "pearson_r", "spearman_r"]
    return pd.DataFrame(rows, columns=columns)


def test_loss_tracking_picks_largest_abs_r():
    table = correlations_table(
        [
            ("r", "se_post", "eval_loss", 6, -0.95, -0.9),
            ("r", "pr_post", "eval_loss", 6, -0.97, -1.0),
            ("r", "js", "eval_loss", 6, 0.5, 0.4),
            ("r", "js", "probe_loss", 6, 0.99, 1.0),
        ]
    )

    sentence = findings.describe_loss_tracking(table, "eval_loss")

    assert sentence.startswith(
        "PR post tracks the eval loss most closely: Pearson r = -0.97 (Spearman -1)"
    )
    assert "over 6 checkpoints" in sentence
    assert "2 of 3 metrics reach |r| >= 0.9" in sentence


def test_loss_tracking_with_too_few_checkpoints():
    table = correlations_table([("r", "se_post", "eval_loss", 3, np.nan, np.nan)])

    sentence = findings.describe_loss_tracking(table, "eval_loss")

    assert sentence == "No Pearson r with the eval loss is defined with 3 checkpoints."


def test_loss_tracking_without_loss():
    sentence = findings.describe_loss_tracking(correlations_table([]), None)

    assert "No loss is stored" in sentence


def test_rank_limits_warn_with_counts():
    metrics = make_metrics([1, 1], [2, 2], [1, 1], [2, 2], [[0.5, 0.5], [0.4, 0.4]])
    metrics.loc[metrics["step"] == 0, ["rank_limited", "n_tokens"]] = [True, 32]

    sentence = findings.describe_rank_limits(metrics)

    assert sentence.startswith(
        "2 of 4 layer rows had no more probe tokens than the FFN width (32 tokens, width 64)"
    )
    assert "--max-tokens" in sentence
    assert findings.describe_rank_limits(metrics[~metrics["rank_limited"]]) is None


def test_failed_checkpoints_listed():
    info = {
        "checkpoints": [
            {"step": 0, "status": "done", "error": None},
            {"step": 10, "status": "failed", "error": "weights not found"},
        ]
    }

    sentence = findings.describe_failed_checkpoints(info)

    assert (
        sentence
        == "1 checkpoint failed and is missing from the report (step 10: weights not found)."
    )
    assert findings.describe_failed_checkpoints({"checkpoints": info["checkpoints"][:1]}) is None


def test_compared_step_names_healthiest_run():
    layer_means = pd.DataFrame(
        [
            ("pr_post", "a", 100, 10.0, 0.0),
            ("pr_post", "b", 100, 12.5, 2.5),
            ("eee_post", "a", 100, 0.3, 0.0),
            ("eee_post", "b", 100, 0.4, 0.1),
        ],
        columns=["metric", "run", "step", "value", "diff_to_first"],
    )

    pr = findings.describe_compared_step(layer_means, "pr_post", higher_is_healthier=True)
    eee = findings.describe_compared_step(layer_means, "eee_post", higher_is_healthier=False)

    assert (
        pr == "At the compared step, layer-mean PR post is highest in b "
        "(a 10 at step 100, b 12.5 at step 100)."
    )
    assert eee.startswith("At the compared step, layer-mean EEE post is lowest in a")


def test_compared_trends_count_falling_runs():
    trajectories = pd.DataFrame(
        [("a", "eee_post", 0, 0.5, 100, 0.3, -0.2), ("b", "eee_post", 0, 0.5, 100, 0.6, 0.1)],
        columns=["run", "metric", "first_step", "first_value", "last_step", "last_value", "change"],
    )

    sentence = findings.describe_compared_trends(trajectories, "eee_post")

    assert sentence == (
        "Layer-mean EEE post falls over training in 1 of 2 runs "
        "(a -0.2 from step 0 to 100, b +0.1 from step 0 to 100)."
    )
