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
from nerve_cli.compare import DEFAULT_METRICS, ComparisonError, compare_runs, format_comparison
from nerve_cli.compare_format import FORMATS
from nerve_cli.errors import NerveError
from nerve_cli.store import METRIC_COLUMNS, ResultDirectoryError, load_results

logger = logging.getLogger(__name__)


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


def split_metric_options(values: tuple[str, ...]) -> list[str]:
    """Flatten repeated and comma-separated --metric values, dropping blanks."""
    names = [name.strip() for value in values for name in value.split(",")]
    return [name for name in names if name]


@main.command()
@click.argument("results", nargs=-1, metavar="RESULTS_A RESULTS_B [RESULTS ...]")
@click.option(
    "--metric",
    "metric_options",
    multiple=True,
    help=f"Metric to compare ({', '.join(METRIC_COLUMNS)}); repeat or separate with commas. "
    f"Default: {', '.join(DEFAULT_METRICS)}.",
)
@click.option(
    "--step",
    type=int,
    help="Training step of the first run to compare per layer. Default: the last aligned step.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default="table",
    show_default=True,
    help="Output format.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the output to FILE instead of stdout.",
)
@click.option(
    "--allow-probe-mismatch",
    is_flag=True,
    help="Compare runs that were analyzed with different probes.",
)
@click.pass_context
def compare(
    ctx: click.Context,
    results: tuple[str, ...],
    metric_options: tuple[str, ...],
    step: int | None,
    fmt: str,
    out: Path | None,
    allow_probe_mismatch: bool,
) -> None:
    """Compare two or more result directories written by 'nerve analyze'."""
    if len(results) < 2:
        raise NerveError(
            f"compare needs two or more result directories, got {len(results)}; "
            "pass the --out directories of 'nerve analyze'"
        )
    metrics = split_metric_options(metric_options) or list(DEFAULT_METRICS)

    try:
        loaded = [load_results(path) for path in results]
        comparison = compare_runs(
            loaded, metrics, step=step, allow_probe_mismatch=allow_probe_mismatch
        )
    except (ResultDirectoryError, ComparisonError) as error:
        if ctx.obj.get("debug"):
            raise
        raise_as_usage_error(error)

    if fmt != "table":
        for note in comparison.notes:
            logger.warning(note)
    write_output(format_comparison(comparison, fmt), out)


def write_output(text: str, out: Path | None) -> None:
    """Write command output to stdout, or to ``out`` when given."""
    if out is None:
        click.echo(text, nl=False)
        return
    try:
        out.write_text(text, encoding="utf-8")
    except OSError as error:
        raise NerveError(
            f"{out}: cannot write the output ({error.strerror}); choose another --out"
        ) from error
    logger.info("wrote %s", out)


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
@click.pass_context
def report(
    ctx: click.Context, results: tuple[Path, ...], html_path: Path, allow_probe_mismatch: bool
) -> None:
    """Write one self-contained HTML report of one or more result directories."""
    # Imported here so that other commands do not pay for importing plotly.
    from nerve_cli.report import ReportError, render_report

    try:
        runs = [load_results(path) for path in results]
        written = render_report(runs, html_path, allow_probe_mismatch=allow_probe_mismatch)
    except (ResultDirectoryError, ComparisonError, ReportError) as error:
        if ctx.obj.get("debug"):
            raise
        raise_as_usage_error(error)

    click.echo(f"{written} ({format_file_size(written.stat().st_size)})")
