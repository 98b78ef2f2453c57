"""Tests of step alignment across runs."""

from __future__ import annotations

import numpy as np
import pytest

from nerve_cli.alignment import COMMON_STEPS, FRACTION, align_steps, compute_fractions, format_steps


def test_common_steps_keeps_shared_steps_only():
    alignment = align_steps({"a": [0, 10, 100, 1000], "b": [1000, 0, 100, 2000, 100]})

    assert alignment.aligned_by == COMMON_STEPS
    assert alignment.n_aligned == 3
    for index, step in enumerate([0, 100, 1000]):
        assert alignment.steps_at(index) == {"a": step, "b": step}


def test_common_steps_fraction_of_own_run():
    alignment = align_steps({"a": [0, 500, 1000], "b": [0, 500, 1000, 2000]})
    table = alignment.table

    fractions = dict(
        zip(zip(table["run"], table["step"], strict=True), table["fraction"], strict=True)
    )
    assert fractions[("a", 500)] == 0.5
    assert fractions[("b", 500)] == 0.25
    assert fractions[("b", 1000)] == 0.5


def test_common_steps_notes_left_out_steps():
    alignment = align_steps({"a": [0, 10, 100], "b": [0, 100, 200, 300]})

    assert alignment.notes == [
        "a: 1 of 3 steps are not shared by all runs and are left out of the alignment",
        "b: 2 of 4 steps are not shared by all runs and are left out of the alignment",
    ]


def test_common_steps_no_note_when_identical():
    alignment = align_steps({"a": [0, 10], "b": [0, 10]})

    assert alignment.notes == []


def test_fraction_matches_nearest_checkpoint():
    alignment = align_steps({"a": [0, 100, 200], "b": [1, 1000, 2000, 4000]})

    assert alignment.aligned_by == FRACTION
    assert alignment.n_aligned == 3
    assert alignment.steps_at(0) == {"a": 0, "b": 1}
    assert alignment.steps_at(1) == {"a": 100, "b": 2000}
    assert alignment.steps_at(2) == {"a": 200, "b": 4000}


def test_fraction_tie_goes_to_earlier_checkpoint():
    # Fractions of a: 0.1, 0.25, 0.75, 1; of b: 0, 0.5, 1. Both 0.25 and 0.75 are ties.
    alignment = align_steps({"a": [40, 100, 300, 400], "b": [0, 500, 1000]})

    assert alignment.aligned_by == FRACTION

    assert alignment.steps_at(1)["b"] == 0
    assert alignment.steps_at(2)["b"] == 500


def test_fraction_reference_is_first_run():
    alignment = align_steps({"b": [0, 1000, 2000, 4000], "a": [1, 100, 200]})

    assert alignment.n_aligned == 4
    assert [alignment.steps_at(index)["b"] for index in range(4)] == [0, 1000, 2000, 4000]
    assert [alignment.steps_at(index)["a"] for index in range(4)] == [1, 1, 100, 200]


def test_fraction_note_reports_largest_gap():
    alignment = align_steps({"a": [0, 100, 1000], "b": [5, 50, 2000]})

    assert len(alignment.notes) == 1
    assert "fraction of each run's last step" in alignment.notes[0]
    # a's 0.1 is matched to b's 50 / 2000 = 0.025.
    assert "largest fraction gap 0.075" in alignment.notes[0]


def test_alignment_table_columns_and_types():
    table = align_steps({"a": [0, 100], "b": [5, 200]}).table

    assert list(table.columns) == ["aligned_index", "run", "step", "fraction"]
    assert table["step"].dtype == np.int64
    assert table["aligned_index"].dtype == np.int64
    assert table["fraction"].dtype == np.float64


def test_align_steps_rejects_run_without_steps():
    with pytest.raises(ValueError, match="run b has no steps"):
        align_steps({"a": [0], "b": []})


def test_compute_fractions_of_step_zero_only():
    assert compute_fractions(np.array([0])).tolist() == [0.0]


def test_format_steps_elides_long_lists():
    assert format_steps([0, 10, 20]) == "0, 10, 20"
    assert format_steps(list(range(10))) == "0, 1, 2, ..., 7, 8, 9 (10 steps)"
