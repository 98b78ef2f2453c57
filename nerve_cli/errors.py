"""Exceptions that carry the exit codes of the command line, and the interrupt signals.

Exit status 0 means every checkpoint was analyzed, 1 that some checkpoints
failed while the others were written, and 2 that invalid usage or input
stopped the whole run. An interrupted run exits with 128 plus the signal
number, as shells do: 130 for Ctrl-C (SIGINT), 143 for SIGTERM. Each message
is one line that names the file or value and the next step to take.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import click


class NerveError(click.ClickException):
    """Input or usage that stops the whole command (exit status 2)."""

    exit_code = 2

    def format_message(self) -> str:
        return self.message


class PartialFailure(click.ClickException):
    """Some checkpoints failed while the others were written (exit status 1)."""

    exit_code = 1

    def format_message(self) -> str:
        return self.message


class InterruptedRun(click.ClickException):
    """The run was stopped by a signal; exit status 128 + the signal number."""

    def __init__(self, message: str, signal_number: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signal_number

    def format_message(self) -> str:
        return self.message


def describe_os_error(error: OSError) -> str:
    """Return an OSError as one line that starts with the file it concerns."""
    reason = error.strerror or str(error)
    if error.filename is None:
        return f"{reason}; check the file system and run again"
    return f"{error.filename}: {reason}; check the path and its file system, then run again"


class CheckpointError(ValueError):
    """One checkpoint cannot be analyzed; the run records it and goes on.

    The message is a single line naming the file and the remedy. When the
    checkpoint is the only one the run could use, the command stops with
    exit status 2 and this message.
    """


class AnalysisInterrupted(KeyboardInterrupt):
    """A run stopped by SIGINT or SIGTERM; finished checkpoints stay in ``out_dir``.

    It is a KeyboardInterrupt, so notebooks and scripts that catch Ctrl-C
    still do. ``finished`` counts the checkpoints written by this call.
    """

    def __init__(self, out_dir: Path, finished: int, signal_number: int) -> None:
        super().__init__(out_dir, finished, signal_number)
        self.out_dir = out_dir
        self.finished = finished
        self.signal_number = signal_number

    def describe(self) -> str:
        """Return the one-line message printed when the command stops."""
        name = signal.Signals(self.signal_number).name
        return (
            f"interrupted by {name}; the {self.finished} checkpoint(s) finished by this run "
            f"are kept in {self.out_dir}, run the same command again to analyze the rest"
        )


class TerminationRequested(KeyboardInterrupt):
    """Raised in the main thread when the process receives SIGTERM."""


@contextlib.contextmanager
def sigterm_raises_interrupt() -> Iterator[None]:
    """Turn SIGTERM into a TerminationRequested exception while the block runs.

    Batch schedulers send SIGTERM before SIGKILL. Without a handler Python
    exits at once, skipping ``finally`` blocks, so temporary files and the
    checkpoint in progress would be left for the next run to clean up.
    """

    def handle(signal_number: int, frame) -> None:
        raise TerminationRequested(signal_number)

    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return
    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
