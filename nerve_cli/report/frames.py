"""DataFrame steps shared by the report's figures, tables and findings.

Pure functions: each takes the metrics or spectra table of one run (the
columns of ``nerve_cli.store.METRICS_SCHEMA`` and ``SPECTRA_SCHEMA``) and
returns a new DataFrame, array or value. None of them reads files or draws.
Layer means come from ``nerve_cli.compare.compute_layer_means``, so that the
report plots the same means that its correlations are computed from.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = [
    "LOSS_COLUMNS",
    "select_loss_column",
    "select_last_step",
    "pivot_layer_by_step",
    "select_representatives",
    "compute_scree",
]

# Preferred first: a loss logged by the trainer on held-out data beats the probe loss.
LOSS_COLUMNS = ("eval_loss", "probe_loss")


def select_loss_column(metrics: pd.DataFrame) -> str | None:
    """Return the first of ``LOSS_COLUMNS`` with any non-null value, or None."""
    for column in LOSS_COLUMNS:
        if column in metrics.columns and metrics[column].notna().any():
            return column
    return None


def select_last_step(metrics: pd.DataFrame) -> int | None:
    """Return the largest step that has at least one non-null metric row, or None."""
    valid = metrics.dropna(subset=["se_post"])
    if valid.empty:
        return None
    return int(valid["step"].max())


def pivot_layer_by_step(metrics: pd.DataFrame, column: str) -> pd.DataFrame:
    """Pivot one metric into a layer x step table (index layer, columns step, both sorted)."""
    table = metrics.pivot_table(
        index="layer", columns="step", values=column, aggfunc="first", dropna=False
    )
    return table.sort_index(axis=0).sort_index(axis=1)


def select_representatives(values: list[int] | np.ndarray) -> list[int]:
    """Return the first, the middle and the last of the sorted unique values (or fewer)."""
    unique = sorted({int(value) for value in values})
    if not unique:
        return []

    picks = [unique[0], unique[(len(unique) - 1) // 2], unique[-1]]
    return sorted(set(picks))


def compute_scree(eigenvalues: np.ndarray, max_points: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Return ranks (from 1) and normalized eigenvalues ``lambda / sum`` for a log-log scree plot.

    Zero eigenvalues are dropped because a log axis cannot show them. When more
    than ``max_points`` remain, ranks are subsampled at log-spaced positions
    (always keeping the first and the last), which keeps the shape of a log-log
    curve while bounding the size of the report.
    """
    values = np.sort(np.asarray(eigenvalues, dtype=np.float64))[::-1]
    total = values.sum()
    if values.size == 0 or not np.isfinite(total) or total <= 0:
        return np.empty(0, dtype=np.int64), np.empty(0)

    normalized = values / total
    ranks = np.arange(1, values.size + 1)
    positive = normalized > 0
    ranks, normalized = ranks[positive], normalized[positive]

    if ranks.size > max_points:
        positions = np.unique(
            np.geomspace(1, ranks.size, num=max_points).round().astype(np.int64) - 1
        )
        ranks, normalized = ranks[positions], normalized[positions]
    return ranks, normalized
