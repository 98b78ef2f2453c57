"""Exceptions that carry the exit codes of the command line.

Exit status 0 means every checkpoint was analyzed, 1 that some checkpoints
failed while the others were written, and 2 that invalid usage or input
stopped the whole run. Each message is one line that names the file or value
and says what to do next.
"""

from __future__ import annotations

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


class CheckpointError(Exception):
    """One checkpoint cannot be analyzed; the run records it and goes on.

    The message is a single line naming the file and the remedy.
    """
