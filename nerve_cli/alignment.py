"""Alignment of training steps across runs, for ``nerve compare``.

Runs are aligned on the steps that all of them contain. When they share no
step, each checkpoint of the first run is matched to the checkpoint of every
other run whose fraction of that run's last step is nearest. Runs of different
lengths are then compared at the same relative point of training.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

COMMON_STEPS = "common_steps"
FRACTION = "fraction"
ALIGNMENT_COLUMNS = ["aligned_index", "run", "step", "fraction"]


@dataclass
class Alignment:
    """Steps matched across runs: one row per (aligned index, run)."""

    aligned_by: str
    table: pd.DataFrame
    notes: list[str] = field(default_factory=list)

    @property
    def n_aligned(self) -> int:
        """The number of aligned indices."""
        return int(self.table["aligned_index"].nunique())

    def steps_at(self, aligned_index: int) -> dict[str, int]:
        """Return the step of each run at one aligned index, keyed by run."""
        rows = self.table[self.table["aligned_index"] == aligned_index]
        return {str(run): int(step) for run, step in zip(rows["run"], rows["step"], strict=True)}


def compute_fractions(steps: np.ndarray) -> np.ndarray:
    """Return each step divided by the largest step (all zeros when the largest step is 0)."""
    last = steps.max()
    if last <= 0:
        return np.zeros(len(steps))
    return steps / last


def format_steps(steps: Sequence[int]) -> str:
    """Return steps as a comma-separated list, eliding the middle of a long one."""
    steps = [int(step) for step in steps]
    if len(steps) <= 8:
        return ", ".join(map(str, steps))
    head, tail = ", ".join(map(str, steps[:3])), ", ".join(map(str, steps[-3:]))
    return f"{head}, ..., {tail} ({len(steps)} steps)"


def align_steps(steps_by_run: Mapping[str, Sequence[int]]) -> Alignment:
    """Align the steps of several runs, keyed by run name in comparison order.

    Uses the steps common to all runs when there are any, otherwise the
    nearest fraction of each run's last step, with the first run's steps as
    the reference. Raises ValueError when a run has no step.
    """
    steps = {
        run: np.array(sorted(set(values)), dtype=np.int64) for run, values in steps_by_run.items()
    }
    empty = [run for run, values in steps.items() if len(values) == 0]
    if empty:
        raise ValueError(f"run {empty[0]} has no steps to align")

    common = set.intersection(*(set(values.tolist()) for values in steps.values()))
    if common:
        return _align_on_common_steps(steps, sorted(common))
    return _align_by_fraction(steps)


def _align_on_common_steps(steps: dict[str, np.ndarray], common: list[int]) -> Alignment:
    rows = []
    for run, values in steps.items():
        fractions = dict(zip(values.tolist(), compute_fractions(values).tolist(), strict=True))
        for index, step in enumerate(common):
            rows.append((index, run, step, fractions[step]))

    notes = []
    for run, values in steps.items():
        left_out = len(values) - len(common)
        if left_out:
            notes.append(
                f"{run}: {left_out} of {len(values)} steps are not shared by all runs "
                "and are left out of the alignment"
            )
    return Alignment(COMMON_STEPS, _alignment_frame(rows), notes)


def _align_by_fraction(steps: dict[str, np.ndarray]) -> Alignment:
    reference_run = next(iter(steps))
    reference = compute_fractions(steps[reference_run])

    rows = []
    largest_gap = 0.0
    for run, values in steps.items():
        fractions = compute_fractions(values)
        # np.argmin returns the first minimum, so a tie goes to the earlier checkpoint.
        nearest = np.abs(fractions[None, :] - reference[:, None]).argmin(axis=1)
        largest_gap = max(largest_gap, float(np.abs(fractions[nearest] - reference).max()))
        for index, position in enumerate(nearest):
            rows.append((index, run, int(values[position]), float(fractions[position])))

    note = (
        "runs share no steps, so they are aligned by the fraction of each run's last step "
        f"(nearest checkpoint to each checkpoint of {reference_run}; "
        f"largest fraction gap {largest_gap:.3f})"
    )
    return Alignment(FRACTION, _alignment_frame(rows), [note])


def _alignment_frame(rows: list[tuple[int, str, int, float]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=ALIGNMENT_COLUMNS)
    frame = frame.astype({"aligned_index": "int64", "step": "int64", "fraction": "float64"})
    return frame.sort_values("aligned_index", kind="stable").reset_index(drop=True)
