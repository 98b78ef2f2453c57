"""The result directory written by ``nerve analyze`` and read by compare and report.

Layout of a result directory ``OUT``::

    OUT/run.json      run metadata and one status entry per checkpoint
    OUT/metrics/      Parquet dataset, one file per checkpoint: step-<step>.parquet
    OUT/spectra/      Parquet dataset, one file per checkpoint: step-<step>.parquet

Every file is written under a temporary name in the same directory and renamed
into place, so readers never see a partial file and an interrupted run leaves
only temporary files. A temporary file is named after its target
(``.tmp-step-<step>-<random>.parquet``, ``.tmp-run-<random>.json``). The
process that has the target's lock removes the leftovers: the claim of a
checkpoint for its Parquet files, the lock of ``run.json`` for that file.
``run.json`` is updated under an exclusive lock and each checkpoint is claimed
by one process at a time, so several processes can share one result directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
METRICS_DIR = "metrics"
SPECTRA_DIR = "spectra"
TEMP_PREFIX = ".tmp-"

METRIC_COLUMNS = [
    "se_pre",
    "se_post",
    "pr_pre",
    "pr_post",
    "eee_pre",
    "eee_post",
    "js",
    "pr_gain",
    "eee_delta",
    "se_delta",
]

METRICS_SCHEMA = pa.schema(
    [
        pa.field("run", pa.string(), nullable=False),
        pa.field("step", pa.int64(), nullable=False),
        pa.field("checkpoint", pa.string(), nullable=False),
        pa.field("layer", pa.int32(), nullable=False),
        pa.field("ffn_dim", pa.int32(), nullable=False),
        pa.field("n_tokens", pa.int64(), nullable=False),
        *[pa.field(name, pa.float64()) for name in METRIC_COLUMNS],
        pa.field("probe_loss", pa.float64()),
        pa.field("eval_loss", pa.float64()),
        pa.field("rank_limited", pa.bool_(), nullable=False),
        # Why the metrics of this row are null, e.g. NaN activations; null when they are valid.
        pa.field("null_reason", pa.string()),
    ]
)

SPECTRA_SCHEMA = pa.schema(
    [
        pa.field("run", pa.string(), nullable=False),
        pa.field("step", pa.int64(), nullable=False),
        pa.field("layer", pa.int32(), nullable=False),
        pa.field("point", pa.string(), nullable=False),
        pa.field("eigenvalues", pa.list_(pa.float64()), nullable=False),
    ]
)


class ResultDirectoryError(ValueError):
    """Raised when a directory is not a readable nerve result directory."""


def checkpoint_file_name(step: int) -> str:
    """Return the Parquet file name that contains one checkpoint's rows."""
    return f"step-{step:012d}.parquet"


def temp_file_prefix(path: Path) -> str:
    """Return the name prefix of the temporary files written on the way to ``path``."""
    return f"{TEMP_PREFIX}{path.stem}-"


def write_table_atomic(table: pa.Table, path: Path) -> None:
    """Write a Parquet table to ``path`` through a temporary file and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(
        prefix=temp_file_prefix(path), suffix=path.suffix, dir=path.parent
    )
    os.close(fd)
    try:
        pq.write_table(table, temp_name)
        _apply_umask(temp_name)
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise


def _apply_umask(path: str) -> None:
    """Give a temporary file the mode a plain ``open`` would (mkstemp creates it 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_json_atomic(data: dict[str, Any], path: Path) -> None:
    """Write JSON to ``path`` through a temporary file and an atomic rename."""
    fd, temp_name = tempfile.mkstemp(
        prefix=temp_file_prefix(path), suffix=path.suffix, dir=path.parent
    )
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, sort_keys=False)
            handle.write("\n")
        _apply_umask(temp_name)
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise


def write_checkpoint_tables(
    out_dir: Path, step: int, metric_rows: list[dict[str, Any]], spectra_rows: list[dict[str, Any]]
) -> None:
    """Write one checkpoint's metrics and spectra files.

    Spectra are written first: a checkpoint counts as finished when its metrics
    file exists (see :func:`finished_steps`), so a crash between the two writes
    makes the next run redo the checkpoint instead of leaving it half-stored.
    """
    name = checkpoint_file_name(step)
    spectra = pa.Table.from_pylist(spectra_rows, schema=SPECTRA_SCHEMA)
    metrics = pa.Table.from_pylist(metric_rows, schema=METRICS_SCHEMA)
    write_table_atomic(spectra, out_dir / SPECTRA_DIR / name)
    write_table_atomic(metrics, out_dir / METRICS_DIR / name)


def finished_steps(out_dir: Path) -> set[int]:
    """Return the steps whose metrics file exists and has a readable Parquet footer.

    A file that is not readable Parquet (e.g. overwritten or cut by a disk
    problem) is reported and left out, so the next run recomputes that step.
    """
    steps = set()
    for path in (out_dir / METRICS_DIR).glob("step-*.parquet"):
        try:
            step = int(path.stem.removeprefix("step-"))
        except ValueError:
            continue
        try:
            pq.read_metadata(path)
        except (OSError, pa.ArrowException) as error:
            logger.warning(
                "%s: unreadable Parquet file (%s); step %d will be recomputed", path, error, step
            )
            continue
        steps.add(step)
    return steps


def remove_checkpoint_temp_files(out_dir: Path, step: int) -> int:
    """Delete the temporary files of one checkpoint's tables; return how many were removed.

    Call this only while holding the checkpoint's claim: no other process can
    be writing these files then, so whatever exists was left by a process
    that was killed.
    """
    target = Path(checkpoint_file_name(step))
    removed = 0
    for directory in (out_dir / METRICS_DIR, out_dir / SPECTRA_DIR):
        removed += _remove_files(directory.glob(f"{temp_file_prefix(target)}*"))
    return removed


def remove_stale_temp_files(out_dir: Path) -> int:
    """Delete temporary files that no lock protects and that are over a minute old.

    Files named after a checkpoint or run.json are removed under their lock
    (see :func:`remove_checkpoint_temp_files`); this catches any other
    leftover. The age limit keeps a concurrent writer's file in place.
    """
    cutoff = time.time() - 60
    stale = [
        path
        for directory in (out_dir, out_dir / METRICS_DIR, out_dir / SPECTRA_DIR)
        for path in directory.glob(f"{TEMP_PREFIX}*")
        if _modified_before(path, cutoff)
    ]
    return _remove_files(stale)


def _modified_before(path: Path, cutoff: float) -> bool:
    try:
        return path.stat().st_mtime < cutoff
    except FileNotFoundError:
        return False


def _remove_files(paths) -> int:
    """Delete files that may vanish concurrently; return how many this call removed."""
    removed = 0
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed += 1
            logger.info("%s: removed a temporary file left by an interrupted run", path)
    return removed


@contextlib.contextmanager
def locked_run_file(out_dir: Path) -> Iterator[dict[str, Any]]:
    """Hold an exclusive lock on ``run.json`` and yield its contents for update.

    The dictionary yielded is written back atomically when the block exits
    without an exception. Callers in other processes wait for the lock.
    Temporary files of run.json left by a killed writer are removed first.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".run.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            _remove_files(out_dir.glob(f"{temp_file_prefix(Path(RUN_FILE))}*"))
            data = read_run_file(out_dir) if (out_dir / RUN_FILE).exists() else {}
            yield data
            write_json_atomic(data, out_dir / RUN_FILE)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_run_file(out_dir: Path) -> dict[str, Any]:
    """Read ``run.json``; raise ResultDirectoryError naming the file when it is unreadable."""
    path = out_dir / RUN_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ResultDirectoryError(
            f"{out_dir}: not a nerve result directory ({RUN_FILE} not found); "
            "pass the --out directory of 'nerve analyze'"
        ) from None
    except json.JSONDecodeError as error:
        raise ResultDirectoryError(
            f"{path}: invalid JSON ({error}); restore the file from a backup, or delete it and "
            "re-run 'nerve analyze' with the same --out (finished checkpoints are kept)"
        ) from None


@dataclass
class RunResults:
    """One result directory loaded into memory."""

    path: Path
    info: dict[str, Any]
    metrics: pd.DataFrame

    @property
    def name(self) -> str:
        """The run name stored in run.json."""
        return str(self.info.get("run", self.path.name))

    def load_spectra(self) -> pd.DataFrame:
        """Read the spectra dataset: one row per (step, layer, point)."""
        return read_dataset(self.path / SPECTRA_DIR, SPECTRA_SCHEMA)


def read_dataset(directory: Path, schema: pa.Schema) -> pd.DataFrame:
    """Read every finished Parquet file of a dataset directory, sorted by step and layer."""
    files = sorted(directory.glob("step-*.parquet"))
    if not files:
        return schema.empty_table().to_pandas()
    tables = []
    for path in files:
        try:
            tables.append(pq.read_table(path, schema=schema))
        except (OSError, pa.ArrowException) as error:
            raise ResultDirectoryError(
                f"{path}: unreadable Parquet file ({error}); run 'nerve analyze' on the same "
                "run and --out again to recompute that step"
            ) from None
    frame = pa.concat_tables(tables).to_pandas()
    order = [column for column in ("step", "layer", "point") if column in frame.columns]
    return frame.sort_values(order, kind="stable").reset_index(drop=True)


def load_results(out_dir: str | os.PathLike[str]) -> RunResults:
    """Load a result directory written by ``nerve analyze``.

    Returns run.json as a dictionary and the metrics table as a DataFrame with
    one row per (step, layer). Raises ResultDirectoryError when ``out_dir`` is
    not a result directory.
    """
    path = Path(out_dir)
    if not path.is_dir():
        raise ResultDirectoryError(f"{path}: result directory not found")
    info = read_run_file(path)
    if not (path / METRICS_DIR).is_dir():
        raise ResultDirectoryError(
            f"{path}: no {METRICS_DIR}/ directory; run 'nerve analyze' to completion first"
        )
    metrics = read_dataset(path / METRICS_DIR, METRICS_SCHEMA)
    return RunResults(path=path, info=info, metrics=metrics)


@contextlib.contextmanager
def claim_checkpoint(out_dir: Path, step: int) -> Iterator[bool]:
    """Try to claim one checkpoint for this process; yield whether the claim succeeded.

    The claim is an exclusive ``flock`` on ``OUT/locks/step-<step>.lock``. The
    kernel releases it when the holding process exits, also when it is
    killed, so a lock file left behind by a dead process is taken over at
    once. The holder writes its host and pid into the file and empties it on
    release, so a non-empty file found on taking the lock is logged as left
    by a process that did not finish.
    """
    lock_dir = out_dir / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"step-{step}.lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            _take_over_lock(lock, step)
            yield True
        finally:
            lock.truncate(0)
            fcntl.flock(lock, fcntl.LOCK_UN)


def _take_over_lock(lock, step: int) -> None:
    """Log a previous holder that never released the lock, then record this process."""
    lock.seek(0)
    previous = lock.read().strip()
    if previous:
        logger.warning(
            "step %d: taking over the claim left by %s, which ended without finishing "
            "this checkpoint",
            step,
            previous,
        )
    lock.truncate(0)
    lock.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
    lock.flush()


def read_claim_holder(out_dir: Path, step: int) -> str | None:
    """Return "pid N on host H" of the process that has a checkpoint's claim, if recorded."""
    with contextlib.suppress(OSError):
        text = (out_dir / "locks" / f"step-{step}.lock").read_text(encoding="utf-8").strip()
        return text or None
    return None
