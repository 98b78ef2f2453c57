"""The report's tables as DataFrames: run metadata and the per-layer summary of one step.

Pure functions. Values stay numbers here, and ``html_page.render_table`` formats
and escapes them.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from nerve_cli.report.labels import metric_label

__all__ = ["build_metadata_table", "build_layer_summary_table", "LAYER_SUMMARY_COLUMNS"]

LAYER_SUMMARY_COLUMNS = [
    "layer",
    "se_pre",
    "se_post",
    "se_delta",
    "pr_pre",
    "pr_post",
    "pr_gain",
    "eee_pre",
    "eee_post",
    "eee_delta",
    "js",
    "n_tokens",
    "rank_limited",
    "null_reason",
]


def _checkpoint_counts(info: dict[str, Any]) -> str:
    checkpoints = info.get("checkpoints") or []
    done = sum(1 for checkpoint in checkpoints if checkpoint.get("status") == "done")
    return f"{done} of {len(checkpoints)} analyzed"


def _metadata_column(info: dict[str, Any]) -> dict[str, Any]:
    probe = info.get("probe") or {}
    versions = info.get("versions") or {}
    return {
        "model type": info.get("model_type"),
        "FFN kind": info.get("ffn_kind"),
        "layers": info.get("n_layers"),
        "FFN width": info.get("ffn_dim"),
        "causal LM": info.get("is_causal_lm"),
        "probe name": probe.get("name"),
        "probe sha256": probe.get("sha256"),
        "probe tokens": probe.get("n_tokens"),
        "probe sequences x length": f"{probe.get('n_sequences')} x {probe.get('seq_len')}",
        "probe source": probe.get("source"),
        "device": info.get("device"),
        "dtype": info.get("dtype"),
        "checkpoints": _checkpoint_counts(info),
        "checkpoint directory": info.get("checkpoint_dir"),
        "python": versions.get("python"),
        "torch": versions.get("torch"),
        "transformers": versions.get("transformers"),
        "nerve": versions.get("nerve", info.get("nerve_version")),
    }


def build_metadata_table(infos: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """Tabulate run.json of each run: one row per field, one column per run (keyed by run name).

    Missing keys become None, so a result directory written by an older
    version still renders.
    """
    columns = {run: _metadata_column(info) for run, info in infos.items()}
    table = pd.DataFrame(columns)
    table.index.name = "field"
    return table.reset_index()


def build_layer_summary_table(metrics: pd.DataFrame, step: int) -> pd.DataFrame:
    """Select one step's rows, one per layer, with the metrics columns under their display names."""
    rows = metrics[metrics["step"] == step].sort_values("layer")
    columns = [column for column in LAYER_SUMMARY_COLUMNS if column in rows.columns]
    table = rows[columns].reset_index(drop=True)
    return table.rename(columns={column: metric_label(column) for column in columns})
