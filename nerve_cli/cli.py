"""The ``nerve`` command line: parses options and calls the library.

No numerics live here. Results go to stdout; progress and diagnostics go to
stderr through ``logging`` and progress bars.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from nerve_cli import __version__
from nerve_cli.errors import NerveError
from nerve_cli.store import ResultDirectoryError, load_results


def configure_logging(verbosity: int) -> None:
    """Send library logs to stderr at a level set by -v/-q."""
    level = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s", stream=sys.stderr)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="nerve")
@click.option("-v", "--verbose", count=True, help="More log output (repeat for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors on stderr.")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def main(ctx: click.Context, verbose: int, quiet: bool, debug: bool) -> None:
    """nerve: eigenspectrum diagnostics of FFN layers across training checkpoints (NerVE)."""
    configure_logging(-1 if quiet else verbose)
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def raise_as_usage_error(error: Exception) -> None:
    """Turn a library input error into a one-line exit-2 error."""
    raise NerveError(str(error)) from error


__all__ = ["main", "ResultDirectoryError", "raise_as_usage_error"]


def format_file_size(n_bytes: int) -> str:
    """Format a byte count with a binary unit, e.g. "4.7 MiB"."""
    if n_bytes < 1024:
        return f"{n_bytes} bytes"
    if n_bytes < 1024**2:
        return f"{n_bytes / 1024:.1f} KiB"
    return f"{n_bytes / 1024**2:.1f} MiB"


@main.command()
@click.argument("results", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--html",
    "html_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="HTML file to write. It opens from disk and needs no network.",
)
@click.option(
    "--allow-probe-mismatch",
    is_flag=True,
    help="Report runs that were analyzed with different probes side by side.",
)
def report(results: tuple[Path, ...], html_path: Path, allow_probe_mismatch: bool) -> None:
    """Write one self-contained HTML report of one or more result directories."""
    from nerve_cli.compare import ComparisonError
    from nerve_cli.report import ReportError, render_report

    try:
        runs = [load_results(path) for path in results]
        written = render_report(runs, html_path, allow_probe_mismatch=allow_probe_mismatch)
    except (ResultDirectoryError, ComparisonError, ReportError) as error:
        raise_as_usage_error(error)

    click.echo(f"{written} ({format_file_size(written.stat().st_size)})")
