"""Killed, interrupted and concurrent runs lose nothing and analyze no checkpoint twice.

The end-to-end tests run ``python -m nerve_cli analyze`` as child processes
on a run of six checkpoints with a probe of 2048 tokens. Each checkpoint then
takes a noticeable fraction of a second, so a signal sent after the first
checkpoint is written lands while a later one is in progress.
Tests that need no such timing use a faster run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from nerve_cli import store
from nerve_cli.analyze import AnalyzeOptions, analyze_run
from nerve_cli.cli import main
from tests.checkpoint_builders import (
    N_LAYERS,
    REPO_ROOT,
    checkpoint_entries,
    kill_and_wait,
    read_run_json,
    save_probe,
    save_tiny_run,
    start_analyze,
    temp_files,
    wait_for_file,
)

STEPS = (10, 20, 30, 40, 50, 60)


@pytest.fixture(scope="module")
def slow_run(tmp_path_factory) -> tuple[Path, Path]:
    """Six checkpoints with FFN width 128 and a probe of 32 sequences of 64 tokens."""
    base = tmp_path_factory.mktemp("slow")
    run_dir = save_tiny_run(base / "run", steps=STEPS, n_inner=128)
    probe = save_probe(base / "probe.npy", n_sequences=32, seq_len=64)
    return run_dir, probe


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory) -> tuple[Path, Path]:
    """Six checkpoints with FFN width 64 and a probe of 4 sequences of 32 tokens."""
    base = tmp_path_factory.mktemp("fast")
    run_dir = save_tiny_run(base / "run", steps=STEPS)
    probe = save_probe(base / "probe.npy", n_sequences=4, seq_len=32)
    return run_dir, probe


def analyze_in_process(run_dir: Path, out_dir: Path, probe: Path):
    return CliRunner().invoke(
        main,
        ["-q", "analyze", str(run_dir), "--out", str(out_dir), "--probe", str(probe)],
        catch_exceptions=False,
    )


def assert_complete(out_dir: Path, steps=STEPS) -> None:
    """Check that every step is stored exactly once and nothing temporary is left."""
    metrics = pd.read_parquet(out_dir / "metrics")
    assert metrics.groupby("step").size().to_dict() == dict.fromkeys(steps, N_LAYERS)
    spectra = pd.read_parquet(out_dir / "spectra")
    assert spectra.groupby("step").size().to_dict() == dict.fromkeys(steps, 2 * N_LAYERS)
    recorded = [entry["step"] for entry in read_run_json(out_dir)["checkpoints"]]
    assert recorded == list(steps)
    assert {entry["status"] for entry in checkpoint_entries(out_dir).values()} == {"done"}
    assert temp_files(out_dir) == []


def stored_steps(out_dir: Path) -> set[int]:
    return store.finished_steps(out_dir)


# Case 14: SIGKILL in the middle of a checkpoint, then a re-run.


def test_sigkill_then_rerun_completes(slow_run, tmp_path, caplog):
    run_dir, probe = slow_run
    out_dir = tmp_path / "out"
    process = start_analyze(run_dir, out_dir, probe)

    assert wait_for_file(out_dir / "metrics", "step-*.parquet", process, timeout=300)
    kill_and_wait(process, signal.SIGKILL)

    written = stored_steps(out_dir)
    assert process.returncode == -signal.SIGKILL
    assert len(written) < len(STEPS), "the kill came after the last checkpoint; use a larger probe"
    first_files = {
        step: (out_dir / "metrics" / store.checkpoint_file_name(step)).read_bytes()
        for step in written
    }

    with caplog.at_level("WARNING"):
        result = analyze_in_process(run_dir, out_dir, probe)

    assert result.exit_code == 0, result.stderr
    assert f"{len(STEPS) - len(written)} analyzed, {len(written)} skipped" in result.stdout
    assert_complete(out_dir)
    for step, content in first_files.items():
        assert (out_dir / "metrics" / store.checkpoint_file_name(step)).read_bytes() == content
    takeovers = [
        record.getMessage() for record in caplog.records if "taking over" in record.getMessage()
    ]
    assert takeovers, (
        "the killed process held a checkpoint claim; the re-run must report taking it over"
    )
    assert f"pid {process.pid} on host" in takeovers[0]


def test_leftover_temp_files_removed(fast_run, tmp_path):
    """Files a killed writer left seconds ago are removed by the claim holder, whatever their age."""
    run_dir, probe = fast_run
    out_dir = tmp_path / "out"
    leftovers = [
        out_dir / "metrics" / ".tmp-step-000000000020-k1ll3d.parquet",
        out_dir / "spectra" / ".tmp-step-000000000020-k1ll3d.parquet",
        out_dir / ".tmp-run-k1ll3d.json",
    ]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"PAR1 half written")

    result = analyze_in_process(run_dir, out_dir, probe)

    assert result.exit_code == 0, result.stderr
    assert_complete(out_dir)


def test_missing_run_entry_recovered(fast_run, tmp_path):
    """A kill between the metrics file and run.json leaves a step without its entry; a re-run adds it."""
    run_dir, probe = fast_run
    out_dir = tmp_path / "out"
    assert analyze_in_process(run_dir, out_dir, probe).exit_code == 0
    info = read_run_json(out_dir)
    info["checkpoints"] = [entry for entry in info["checkpoints"] if entry["step"] != 30]
    (out_dir / "run.json").write_text(json.dumps(info))

    result = analyze_in_process(run_dir, out_dir, probe)

    assert result.exit_code == 0, result.stderr
    assert f"0 analyzed, {len(STEPS)} skipped" in result.stdout
    assert_complete(out_dir)
    assert checkpoint_entries(out_dir)[30]["seconds"] is None


@pytest.mark.parametrize(
    "signal_number, exit_code",
    [(signal.SIGTERM, 143), (signal.SIGINT, 130)],
    ids=["SIGTERM", "SIGINT"],
)
def test_signal_stops_cleanly(slow_run, tmp_path, caplog, signal_number, exit_code):
    """SIGTERM (sent by batch schedulers) and Ctrl-C end the run with one line and release every lock."""
    run_dir, probe = slow_run
    out_dir = tmp_path / "out"
    process = start_analyze(run_dir, out_dir, probe)

    assert wait_for_file(out_dir / "metrics", "step-*.parquet", process, timeout=300)
    _, stderr = kill_and_wait(process, signal_number)

    assert process.returncode == exit_code, stderr
    last_line = stderr.strip().splitlines()[-1]
    name = signal.Signals(signal_number).name
    assert re.fullmatch(
        rf"Error: interrupted by {name}; the \d+ checkpoint\(s\) finished by this run are kept "
        rf"in {re.escape(str(out_dir))}, run the same command again to analyze the rest",
        last_line,
    ), last_line
    assert "Traceback" not in stderr
    assert temp_files(out_dir) == []
    assert all(path.read_text() == "" for path in (out_dir / "locks").glob("*.lock"))
    if signal_number == signal.SIGINT:
        return  # the same cleanup path as SIGTERM; one re-run below covers both

    with caplog.at_level("WARNING"):
        result = analyze_in_process(run_dir, out_dir, probe)

    assert result.exit_code == 0, result.stderr
    assert_complete(out_dir)
    assert not any("taking over" in record.getMessage() for record in caplog.records)


# Case 15: two processes on one result directory.


def test_two_processes_share_output(slow_run, tmp_path):
    run_dir, probe = slow_run
    out_dir = tmp_path / "out"

    processes = [start_analyze(run_dir, out_dir, probe) for _ in range(2)]
    outputs = [process.communicate(timeout=600) for process in processes]

    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr
    assert_complete(out_dir)
    analyzed_counts = [
        int(re.search(r"(\d+) analyzed, (\d+) skipped", stdout).group(1)) for stdout, _ in outputs
    ]
    assert sum(analyzed_counts) == len(STEPS), analyzed_counts
    entries = checkpoint_entries(out_dir)
    by_pid = {process.pid: 0 for process in processes}
    for entry in entries.values():
        by_pid[entry["pid"]] += 1
    assert sorted(by_pid.values()) == sorted(analyzed_counts)


def test_claimed_step_skipped(fast_run, tmp_path):
    """A step claimed by another holder is skipped; the others are analyzed."""
    run_dir, probe = fast_run
    out_dir = tmp_path / "out"
    options = AnalyzeOptions(out_dir=out_dir, probe_path=probe, device="cpu", show_progress=False)

    with store.claim_checkpoint(out_dir, 30) as claimed:
        assert claimed
        summary = analyze_run(run_dir, options)

    assert summary.skipped == [30]
    assert summary.analyzed == [step for step in STEPS if step != 30]
    assert 30 not in stored_steps(out_dir)
    assert 30 not in checkpoint_entries(out_dir)


HOLD_CLAIM = """
import sys, time
from pathlib import Path
from nerve_cli import store
with store.claim_checkpoint(Path(sys.argv[1]), 20) as claimed:
    print("claimed" if claimed else "busy", flush=True)
    time.sleep(600)
"""


def hold_claim_in_child(out_dir: Path) -> subprocess.Popen:
    """Start a child process that claims step 20 of ``out_dir`` and sleeps holding it."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD_CLAIM, str(out_dir)],
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline().strip() == "claimed"
    return process


def test_live_claim_respected(tmp_path):
    out_dir = tmp_path / "out"
    holder = hold_claim_in_child(out_dir)

    try:
        with store.claim_checkpoint(out_dir, 20) as claimed:
            assert not claimed
        holder_text = store.read_claim_holder(out_dir, 20)
    finally:
        holder.kill()
        holder.wait()

    assert holder_text == f"pid {holder.pid} on host {socket.gethostname()}"


def test_stale_claim_taken_over(tmp_path, caplog):
    """A claim whose holder was killed is free at once, and the takeover names the dead holder."""
    out_dir = tmp_path / "out"
    holder = hold_claim_in_child(out_dir)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    time.sleep(0.05)

    with caplog.at_level("WARNING"), store.claim_checkpoint(out_dir, 20) as claimed:
        assert claimed
        recorded = store.read_claim_holder(out_dir, 20)

    assert recorded == f"pid {os.getpid()} on host {socket.gethostname()}"
    assert f"taking over the claim left by pid {holder.pid} on host" in caplog.text
    assert store.read_claim_holder(out_dir, 20) is None
