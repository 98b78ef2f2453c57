"""The ``nerve`` command line: parses options and calls the library.

No numerics live here. Results go to stdout; progress and diagnostics go to
stderr through ``logging`` and progress bars.
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

import click

from nerve_cli import __version__
from nerve_cli.analyze import DEFAULT_BATCH_SIZE, AnalyzeOptions, analyze_run, summarize_last_step
from nerve_cli.architectures import FFNFamily, override_family
from nerve_cli.compare import DEFAULT_METRICS, ComparisonError, compare_runs, format_comparison
from nerve_cli.compare_format import FORMATS
from nerve_cli.errors import (
    AnalysisInterrupted,
    InterruptedRun,
    NerveError,
    PartialFailure,
    describe_os_error,
    sigterm_raises_interrupt,
)
from nerve_cli.probe import DEFAULT_MAX_TOKENS, DEFAULT_SEQ_LEN
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
    ctx.obj["quiet"] = quiet


def parse_steps(value: str | None) -> list[int] | None:
    """Parse ``--steps 0,100,200`` into integers."""
    if value is None:
        return None
    try:
        steps = [int(item) for item in value.split(",") if item.strip()]
    except ValueError:
        steps = []
    if not steps:
        raise click.BadParameter(f"{value!r}: expected comma-separated integers such as 0,100,1000")
    return steps


def ffn_override_options(command):
    """Add --ffn-up, --ffn-down and --gated, which override the FFN family table."""
    command = click.option(
        "--gated",
        is_flag=True,
        help="The FFN is gated: --ffn-up names the gate projection (or a fused "
        "gate-and-up projection, whose first half is the gate).",
    )(command)
    command = click.option(
        "--ffn-down",
        metavar="PATTERN",
        help="Module name of the down projection, whose input is the post-activation, "
        "e.g. 'transformer.h.{layer}.mlp.c_proj'.",
    )(command)
    return click.option(
        "--ffn-up",
        metavar="PATTERN",
        help="Module name, relative to the model, of the projection whose output is the "
        "pre-activation, with {layer} for the block index, e.g. 'transformer.h.{layer}.mlp.c_fc'.",
    )(command)


@main.command()
@click.argument("ckpt_dir", type=click.Path(path_type=Path))
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    help="Result directory [default: nerve-results/RUN_NAME].",
)
@click.option(
    "--probe",
    "probe_path",
    type=click.Path(path_type=Path),
    help="Probe corpus: .txt text or .npy token ids [n_sequences, seq_len].",
)
@click.option(
    "--max-tokens",
    type=click.IntRange(min=2),
    default=DEFAULT_MAX_TOKENS,
    show_default=True,
    help="Tokens of a text probe to use.",
)
@click.option(
    "--seq-len",
    type=click.IntRange(min=2),
    default=DEFAULT_SEQ_LEN,
    show_default=True,
    help="Tokens per sequence of a text probe (capped at the model's maximum positions).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=DEFAULT_BATCH_SIZE,
    show_default=True,
    help="Sequences per forward pass.",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="auto, cpu or cuda[:i]; auto picks CUDA when present.",
)
@click.option(
    "--dtype",
    type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
    default="auto",
    show_default=True,
    help="Compute dtype; auto keeps the checkpoint's dtype on GPU and uses float32 on CPU.",
)
@click.option("--steps", help="Comma-separated steps to analyze [default: all].")
@click.option("--run-name", help="Run name stored in the tables [default: name of CKPT_DIR].")
@click.option(
    "--force", is_flag=True, help="Recompute checkpoints that are already in the result directory."
)
@ffn_override_options
@click.pass_context
def analyze(
    ctx: click.Context,
    ckpt_dir: Path,
    steps: str | None,
    ffn_up: str | None,
    ffn_down: str | None,
    gated: bool,
    **kwargs,
) -> None:
    """Measure the FFN eigenspectra of every checkpoint in CKPT_DIR and write Parquet tables."""
    options = AnalyzeOptions(
        steps=parse_steps(steps),
        show_progress=not ctx.obj["quiet"],
        ffn_family=build_ffn_override(ffn_up, ffn_down, gated),
        **kwargs,
    )
    try:
        with sigterm_raises_interrupt():
            summary = analyze_run(ckpt_dir, options)
    except AnalysisInterrupted as interrupt:
        raise InterruptedRun(interrupt.describe(), interrupt.signal_number) from None
    except KeyboardInterrupt:
        raise InterruptedRun(
            "interrupted before any checkpoint was analyzed; run the same command again",
            signal.SIGINT,
        ) from None
    except (ValueError, OSError) as error:
        raise_as_usage_error(error, ctx)

    table = summarize_last_step(summary.out_dir)
    if not table.empty:
        click.echo(f"Per-layer metrics at step {int(table['step'].iloc[0])} ({summary.run_name}):")
        click.echo(
            table.drop(columns="step").to_string(index=False, float_format=lambda v: f"{v:.4g}")
        )
    click.echo(
        f"{len(summary.analyzed)} analyzed, {len(summary.skipped)} skipped, {len(summary.failed)} failed; "
        f"results in {summary.out_dir}"
    )
    if summary.failed:
        steps_failed = ", ".join(map(str, sorted(summary.failed)))
        raise PartialFailure(
            f"{len(summary.failed)} checkpoint(s) failed (steps {steps_failed}); see the errors above"
        )


def raise_as_usage_error(error: Exception, ctx: click.Context) -> None:
    """Turn a library input error into a one-line exit-2 error (a traceback with --debug)."""
    if ctx.obj.get("debug"):
        raise error
    message = describe_os_error(error) if isinstance(error, OSError) else str(error)
    raise NerveError(message) from error


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
        raise_as_usage_error(error, ctx)

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
        raise_as_usage_error(error, ctx)

    click.echo(f"{written} ({format_file_size(written.stat().st_size)})")


def build_ffn_override(ffn_up: str | None, ffn_down: str | None, gated: bool) -> FFNFamily | None:
    """Turn --ffn-up/--ffn-down/--gated into an FFN family, or None when they are not given."""
    if ffn_up is None and ffn_down is None:
        if gated:
            raise click.UsageError("--gated needs --ffn-up and --ffn-down")
        return None
    if ffn_up is None or ffn_down is None:
        raise click.UsageError("--ffn-up and --ffn-down must be given together")
    try:
        return override_family(ffn_up, ffn_down, gated)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


@main.command()
@click.argument("ckpt_dir", type=click.Path(path_type=Path))
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="Plain-text report or JSON.",
)
@ffn_override_options
@click.pass_context
def inspect(
    ctx: click.Context,
    ckpt_dir: Path,
    output_format: str,
    ffn_up: str | None,
    ffn_down: str | None,
    gated: bool,
) -> None:
    """List the checkpoints in CKPT_DIR and the FFN modules analyze would measure.

    Nothing is run through the model and no weights are read. Exits with
    status 2 when no FFN measurement points can be found.
    """
    from nerve_cli.inspection import inspect_run, inspection_to_json, render_inspection

    family = build_ffn_override(ffn_up, ffn_down, gated)
    try:
        inspection = inspect_run(ckpt_dir, family)
    except ValueError as error:
        raise_as_usage_error(error, ctx)

    if output_format == "json":
        click.echo(inspection_to_json(inspection))
    else:
        click.echo(render_inspection(inspection))
    if inspection.error:
        raise NerveError(inspection.error)
