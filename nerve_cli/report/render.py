"""Render one or more result directories into a single self-contained HTML report."""

from __future__ import annotations

import contextlib
import html
import logging
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

from nerve_cli import __version__
from nerve_cli.compare import compare_runs, compute_layer_means
from nerve_cli.report.frames import select_last_step, select_loss_column
from nerve_cli.report.html_page import FigureSet, render_document
from nerve_cli.report.sections import (
    RunView,
    render_comparison_section,
    render_findings_section,
    render_metadata_section,
    render_run_section,
)
from nerve_cli.store import METRIC_COLUMNS, RunResults

__all__ = ["ReportError", "render_report", "build_report_html"]

logger = logging.getLogger(__name__)


class ReportError(ValueError):
    """Raised when the report cannot be written to the requested path."""


INTRODUCTION = (
    "NerVE measures the covariance eigenspectrum of every FFN block's activations before (pre) "
    "and after (post) the nonlinearity over a fixed probe corpus: spectral entropy SE, "
    "participation ratio PR, eigenvalue early enrichment EEE, and the Jensen-Shannon divergence "
    "JS between the two spectra (Jha and Reagen, ICLR 2026, arXiv 2603.06922). Hover over any "
    "plot for run, step, layer and value."
)


def _build_run_view(index: int, label: str, results: RunResults, within_run) -> RunView:
    metrics = results.metrics
    return RunView(
        label=label,
        anchor=f"run-{index + 1}",
        info=results.info,
        metrics=metrics,
        spectra=results.load_spectra(),
        layer_means=compute_layer_means(metrics, METRIC_COLUMNS).reset_index(),
        correlations=within_run[within_run["run"] == label].reset_index(drop=True),
        loss_column=select_loss_column(metrics),
        last_step=select_last_step(metrics),
    )


def build_report_html(
    results_list: Sequence[RunResults], allow_probe_mismatch: bool = False
) -> str:
    """Build the report page for loaded result directories and return it as a string.

    Runs are compared with ``nerve_cli.compare.compare_runs`` over all metrics,
    which raises ComparisonError for runs without metrics rows, a directory
    given twice, or different probes unless ``allow_probe_mismatch``.
    """
    comparison = compare_runs(
        results_list, metrics=METRIC_COLUMNS, allow_probe_mismatch=allow_probe_mismatch
    )
    views = [
        _build_run_view(index, label, results, comparison.within_run)
        for index, (label, results) in enumerate(zip(comparison.runs, results_list, strict=True))
    ]

    figures = FigureSet()
    navigation = [("findings", "Findings"), ("runs", "Runs")]
    body = [
        f"<p>{html.escape(INTRODUCTION)}</p>",
        render_findings_section(views, comparison),
        render_metadata_section(views),
    ]
    if len(views) > 1:
        navigation.append(("comparison", "Comparison"))
        body.append(render_comparison_section(views, comparison, figures))
    for view in views:
        navigation.append((view.anchor, view.label))
        body.append(render_run_section(view, figures))

    title = f"nerve report: {', '.join(comparison.runs)}"
    body.append(f"<footer><p>Written by nerve {html.escape(__version__)}.</p></footer>")
    return render_document(title, navigation, "".join(body))


def _write_text_atomic(text: str, path: Path) -> None:
    # open(..., "x") applies the umask, unlike tempfile.mkstemp, which creates files with mode 0600.
    temp_path = path.parent / f".tmp-{uuid.uuid4().hex}-{path.name}"
    try:
        with open(temp_path, "x", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_path)
        raise


def render_report(
    results_list: Sequence[RunResults],
    html_path: str | os.PathLike[str],
    allow_probe_mismatch: bool = False,
) -> Path:
    """Write the HTML report of loaded result directories to ``html_path`` and return the path.

    The file is self-contained (plotly.js inlined once, no network or file
    references) and is written through a temporary file and a rename.
    Raises ReportError when the parent directory of ``html_path`` does not
    exist or ``html_path`` is a directory, and ComparisonError as
    :func:`build_report_html` does.
    """
    path = Path(html_path)
    if not path.parent.is_dir():
        raise ReportError(
            f"{path.parent}: directory not found; create it or choose another --html path"
        )
    if path.is_dir():
        raise ReportError(
            f"{path}: is a directory; pass a file name such as {path / 'report.html'}"
        )

    page = build_report_html(results_list, allow_probe_mismatch=allow_probe_mismatch)
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise ReportError(f"{path}: exists and is not a regular file; choose another --html path")
    try:
        _write_text_atomic(page, path)
    except OSError as error:
        raise ReportError(
            f"{path}: cannot write the report ({error.strerror}); choose another --html path"
        ) from None
    logger.info("wrote report of %d run(s) to %s", len(results_list), path)
    return path
