"""A run goes on past broken checkpoints and stops at once on input that breaks it all.

Covers half-written Trainer directories among complete ones, paths that do not
exist (never read as hub model ids, never a network call), bad probes, read-only
checkpoints, and result directories that cannot be written.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from nerve_cli import store
from nerve_cli.cli import main
from tests.checkpoint_builders import (
    REPO_ROOT,
    build_tiny_gpt2,
    checkpoint_entries,
    copy_tree,
    save_model,
    save_probe,
    temp_files,
)


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return save_model(build_tiny_gpt2(), tmp_path_factory.mktemp("template") / "checkpoint")


@pytest.fixture
def probe(tmp_path) -> Path:
    return save_probe(tmp_path / "probe.npy")


def run_analyze(run_dir, out_dir, probe, *extra):
    return CliRunner().invoke(
        main,
        ["-q", "analyze", str(run_dir), "--out", str(out_dir), "--probe", str(probe), *extra],
        catch_exceptions=False,
    )


def metric_steps(out_dir: Path) -> list[int]:
    return sorted(set(pd.read_parquet(out_dir / "metrics")["step"]))


# Case 4: half-written Trainer directories among complete ones.


def test_half_written_checkpoints_reported(template, tmp_path, probe, load_spy, caplog):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoint-0").mkdir(parents=True)  # killed before anything was written
    copy_tree(template, run_dir / "checkpoint-10")
    config_only = copy_tree(template, run_dir / "checkpoint-20")
    (config_only / "model.safetensors").unlink()
    zero_bytes = copy_tree(template, run_dir / "checkpoint-30")
    (zero_bytes / "model.safetensors").write_bytes(b"")
    copy_tree(template, run_dir / "checkpoint-40")
    out_dir = tmp_path / "out"

    with caplog.at_level(logging.ERROR):
        result = run_analyze(run_dir, out_dir, probe)

    assert result.exit_code == 1
    assert result.stderr.strip() == (
        "Error: 3 checkpoint(s) failed (steps 0, 20, 30); see the errors above"
    )
    assert metric_steps(out_dir) == [10, 40]
    assert load_spy.paths == [run_dir / "checkpoint-10", run_dir / "checkpoint-40"]

    entries = checkpoint_entries(out_dir)
    expected_errors = {
        0: f"{run_dir / 'checkpoint-0'}: empty directory",
        20: f"{config_only}: no weight file",
        30: f"{zero_bytes / 'model.safetensors'}: empty file (0 bytes)",
    }
    for step, start in expected_errors.items():
        assert entries[step]["status"] == "failed"
        assert entries[step]["error"].startswith(start)
        assert any(record.getMessage() == entries[step]["error"] for record in caplog.records)
    assert entries[10]["status"] == entries[40]["status"] == "done"


def test_all_failed_exit_1(template, tmp_path, probe):
    """A run whose every checkpoint fails still went through them all: exit 1, not 2."""
    run_dir = tmp_path / "run"
    for step in (10, 20):
        broken = copy_tree(template, run_dir / f"checkpoint-{step}")
        (broken / "model.safetensors").write_bytes(b"")

    result = run_analyze(run_dir, tmp_path / "out", probe)

    assert result.exit_code == 1
    assert result.stderr.strip() == (
        "Error: 2 checkpoint(s) failed (steps 10, 20); see the errors above"
    )
    assert "0 analyzed, 0 skipped, 2 failed" in result.stdout


# Case 5: no network, and a missing path is never a hub model id.


class SocketGuard:
    """Records and blocks every attempt to open a network connection or resolve a name."""

    def __init__(self, monkeypatch) -> None:
        self.attempts: list[str] = []
        for name in ("create_connection", "getaddrinfo"):
            monkeypatch.setattr(socket, name, self._blocker(name))
        monkeypatch.setattr(socket.socket, "connect", self._blocker("socket.connect"))

    def _blocker(self, name):
        def block(*args, **kwargs):
            self.attempts.append(f"{name}{args[-1:] if args else ''}")
            raise OSError(errno.ENETUNREACH, f"network blocked by the test ({name})")

        return block


def test_missing_path_not_hub_id(tmp_path, probe, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    guard = SocketGuard(monkeypatch)

    result = run_analyze("gpt2", tmp_path / "out", probe)

    assert result.exit_code == 2
    assert result.stderr.strip() == "Error: gpt2: path not found"
    assert guard.attempts == []


def test_analysis_opens_no_socket(template, tmp_path, probe, monkeypatch):
    run_dir = tmp_path / "run"
    copy_tree(template, run_dir / "checkpoint-10")
    guard = SocketGuard(monkeypatch)

    result = run_analyze(run_dir, tmp_path / "out", probe)

    assert result.exit_code == 0, result.stderr
    assert guard.attempts == []


GUARDED_CLI = """
import socket, sys
attempts = open(sys.argv.pop(1), "a")
def block(*args, **kwargs):
    attempts.write(repr(args[-1:]) + "\\n"); attempts.flush()
    raise OSError("network blocked by the test")
socket.create_connection = socket.getaddrinfo = socket.socket.connect = block
from nerve_cli.cli import main
main()
"""


def test_offline_despite_environment(template, tmp_path, probe):
    """A fresh interpreter whose environment enables the hub still opens no connection.

    The environment turns offline mode off and points the hub at a local port
    that would accept a connection, and the checkpoint has a tokenizer file.
    Every socket call is recorded in a file that must stay empty.
    """
    run_dir = tmp_path / "run"
    checkpoint = copy_tree(template, run_dir / "checkpoint-10")
    (checkpoint / "tokenizer_config.json").write_text('{"tokenizer_class": "GPT2Tokenizer"}')
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    attempts = tmp_path / "socket-attempts.txt"
    environment = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "HF_HUB_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
        "HF_ENDPOINT": f"http://127.0.0.1:{listener.getsockname()[1]}",
    }
    command = [sys.executable, "-c", GUARDED_CLI, str(attempts), "-q", "analyze", str(run_dir)]
    command += ["--out", str(tmp_path / "out"), "--probe", str(probe), "--device", "cpu"]

    try:
        completed = subprocess.run(
            command, env=environment, capture_output=True, text=True, timeout=300, cwd=tmp_path
        )
    finally:
        listener.close()

    assert completed.returncode == 0, completed.stderr
    assert not attempts.exists() or attempts.read_text() == ""


# Case 8: a bad probe is rejected before any checkpoint is loaded.


@pytest.mark.parametrize(
    "array, expected",
    [
        (
            np.full((2, 8), 100),
            "token ids span [100, 100] but the model's vocabulary has 100 entries",
        ),
        (np.array([[-1, 3]]), "token ids span [-1, 3] but the model's vocabulary has 100 entries"),
        (np.zeros((2, 8), dtype=np.float32), "token ids must be integers, got dtype float32"),
        (
            np.zeros(16, dtype=np.int64),
            "token array must have shape [n_sequences, seq_len], got 1 dimensions (16,)",
        ),
        (np.zeros((2, 2, 4), dtype=np.int64), "got 3 dimensions (2, 2, 4)"),
    ],
    ids=["id-equal-to-vocab", "negative-id", "float", "1-d", "3-d"],
)
def test_bad_probe_rejected_first(template, tmp_path, load_spy, array, expected):
    run_dir = tmp_path / "run"
    copy_tree(template, run_dir / "checkpoint-10")
    probe_path = tmp_path / "bad.npy"
    np.save(probe_path, array)

    result = run_analyze(run_dir, tmp_path / "out", probe_path)

    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"Error: {probe_path}: ")
    assert expected in lines[0]
    assert load_spy.paths == []
    assert not (tmp_path / "out").exists()


def test_pickled_probe_rejected(template, tmp_path, load_spy):
    run_dir = tmp_path / "run"
    copy_tree(template, run_dir / "checkpoint-10")
    probe_path = tmp_path / "objects.npy"
    np.save(probe_path, np.array([[1, None]], dtype=object), allow_pickle=True)

    result = run_analyze(run_dir, tmp_path / "out", probe_path)

    assert result.exit_code == 2
    assert result.stderr.startswith(f"Error: {probe_path}: not a plain .npy array")
    assert load_spy.paths == []


# Case 16: a read-only checkpoint directory works; an unwritable output fails at once.


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """Return every path under ``directory`` with its size and modification time."""
    return {
        str(path.relative_to(directory)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in sorted(directory.rglob("*"))
    }


def test_read_only_checkpoints(template, tmp_path, probe):
    """Checkpoints marked read-only are analyzed and left exactly as they were.

    ``chmod -R a-w`` states the intent, but root, which runs these tests in
    CI, ignores permission bits. What the test checks for every user is the
    snapshot: no file under the run directory is created, changed or removed.
    """
    run_dir = tmp_path / "run"
    copy_tree(template, run_dir / "checkpoint-10")
    copy_tree(template, run_dir / "checkpoint-20")
    before = snapshot(run_dir)
    for path in [run_dir, *run_dir.rglob("*")]:
        path.chmod(path.stat().st_mode & ~0o222)

    try:
        result = run_analyze(run_dir, tmp_path / "out", probe)
        after = snapshot(run_dir)
    finally:
        for path in [run_dir, *run_dir.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)

    assert result.exit_code == 0, result.stderr
    assert after == before
    assert metric_steps(tmp_path / "out") == [10, 20]


@pytest.mark.parametrize("layout", ["parent-is-file", "out-is-file"])
def test_unwritable_output_fails_first(template, tmp_path, probe, load_spy, layout):
    """The output cannot be created because a regular file is in the way.

    Root may write anywhere the permission bits forbid, so the test makes
    the path impossible for every user instead.
    """
    run_dir = tmp_path / "run"
    copy_tree(template, run_dir / "checkpoint-10")
    blocker = tmp_path / "results"
    blocker.write_text("a file, not a directory")
    out_dir = blocker / "out" if layout == "parent-is-file" else blocker

    result = run_analyze(run_dir, out_dir, probe)

    assert result.exit_code == 2
    expected = {
        "parent-is-file": f"Error: {out_dir}: output directory cannot be created or written "
        "(Not a directory); choose another with --out",
        "out-is-file": f"Error: {out_dir}: output path exists and is not a directory; "
        "choose another with --out",
    }[layout]
    assert result.stderr.strip() == expected
    assert load_spy.paths == []


def test_disk_full_keeps_finished(template, tmp_path, probe, monkeypatch):
    """A write that fails mid-run stops the run with one line and keeps earlier results intact."""
    run_dir = tmp_path / "run"
    for step in (10, 20, 30):
        copy_tree(template, run_dir / f"checkpoint-{step}")
    out_dir = tmp_path / "out"
    original_write = store.pq.write_table
    written = []

    def write_until_full(table, where, *args, **kwargs):
        if len(written) == 2:  # the metrics and spectra of step 10 fit, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", str(where))
        written.append(where)
        return original_write(table, where, *args, **kwargs)

    monkeypatch.setattr(store.pq, "write_table", write_until_full)
    result = run_analyze(run_dir, out_dir, probe)

    assert result.exit_code == 2
    line = result.stderr.strip()
    assert line.startswith(f"Error: {out_dir / 'spectra'}/.tmp-step-000000000020-")
    assert line.endswith(
        ": cannot write the results of step 20 (No space left on device); free space or "
        "choose another --out, then run again: finished checkpoints are kept"
    )
    assert metric_steps(out_dir) == [10]
    assert temp_files(out_dir) == []
    assert checkpoint_entries(out_dir)[10]["status"] == "done"
    assert 20 not in checkpoint_entries(out_dir)


def test_debug_shows_traceback(tmp_path, probe):
    """--debug shows the traceback of a whole-run error instead of one line."""
    result = CliRunner().invoke(
        main,
        ["--debug", "-q", "analyze", str(tmp_path / "missing"), "--probe", str(probe)],
    )

    assert result.exit_code != 0
    assert result.exception is not None
    assert "path not found" in str(result.exception)


def test_signal_handler_outside_main_thread(template, tmp_path, probe):
    """The SIGTERM handler is only installed from the main thread, so threads can run analyze."""
    run_dir = tmp_path / "run"
    copy_tree(template, run_dir / "checkpoint-10")
    results = []

    thread = threading.Thread(
        target=lambda: results.append(run_analyze(run_dir, tmp_path / "out", probe))
    )
    thread.start()
    thread.join(timeout=300)

    assert len(results) == 1
    assert results[0].exit_code == 0, results[0].stderr
