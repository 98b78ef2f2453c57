"""Analyze a training run: every checkpoint, every FFN block, into a result directory.

:func:`analyze_run` is the Python entry point behind ``nerve analyze``. It
finds the checkpoints, prepares the probe once, and for each checkpoint loads
the model, measures it and writes that checkpoint's Parquet files before
moving on, so an interruption loses at most the checkpoint in progress. A
re-run skips checkpoints whose files exist; a checkpoint that fails is
recorded in run.json with its error and the run goes on. Each checkpoint's
files are checked (:mod:`nerve_cli.validation`) before its model is built.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import platform
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from nerve_cli import __version__, store
from nerve_cli.architectures import FFNFamily, resolve_ffn_points
from nerve_cli.checkpoints import (
    CheckpointRef,
    discover_checkpoints,
    read_trainer_state,
    select_steps,
)
from nerve_cli.errors import AnalysisInterrupted, CheckpointError, TerminationRequested
from nerve_cli.inspection import resolve_planned_layout
from nerve_cli.loading import (
    load_checkpoint,
    load_config,
    load_tokenizer,
    max_positions,
    resolve_device,
)
from nerve_cli.measure import LayerResult, compute_layer_results, measure_model
from nerve_cli.probe import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_SEQ_LEN,
    Probe,
    ProbeSource,
    build_probe,
    read_probe_source,
)
from nerve_cli.validation import CONFIG_FORMATS, check_checkpoint, check_config

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 8


@dataclass
class AnalyzeOptions:
    """Options of one analysis run; the defaults are those of ``nerve analyze``."""

    out_dir: Path | None = None
    probe_path: Path | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS
    seq_len: int = DEFAULT_SEQ_LEN
    batch_size: int = DEFAULT_BATCH_SIZE
    device: str = "auto"
    dtype: str = "auto"
    steps: Sequence[int] | None = None
    run_name: str | None = None
    force: bool = False
    show_progress: bool = True
    # FFN module patterns from --ffn-up/--ffn-down/--gated; None uses the family table.
    ffn_family: FFNFamily | None = None


@dataclass
class AnalysisSummary:
    """Outcome of one call of :func:`analyze_run`: steps analyzed, skipped and failed."""

    out_dir: Path
    run_name: str
    analyzed: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)


def analyze_run(
    run_dir: str | os.PathLike[str], options: AnalyzeOptions | None = None
) -> AnalysisSummary:
    """Analyze every selected checkpoint of ``run_dir`` and write the result directory.

    Raises ValueError subclasses (checkpoint discovery, probe, output
    directory, no checkpoint with a usable config.json) for input that stops
    the whole run before any model is loaded, and OutputDirectoryError when
    results cannot be written. Per-checkpoint failures are returned in
    ``summary.failed``. SIGINT, or SIGTERM turned into TerminationRequested,
    ends the run with AnalysisInterrupted; finished checkpoints stay written.
    """
    options = options or AnalyzeOptions()
    run_dir = Path(run_dir)
    checkpoints = select_steps(
        discover_checkpoints(run_dir), list(options.steps) if options.steps else None
    )
    run_name = options.run_name or run_dir.resolve().name
    if options.run_name is not None and (
        not run_name.strip() or "/" in run_name or run_name in {".", ".."}
    ):
        raise ValueError(
            f"--run-name {run_name!r}: invalid run name; use a name without '/', such as gpt2-gelu"
        )
    out_dir = Path(options.out_dir) if options.out_dir else Path("nerve-results") / run_name

    # Every check that can stop the run comes before the first write and the first model.
    device = resolve_device(options.device)
    probe_source = read_probe_source(options.probe_path)
    config_ref, config = select_config_checkpoint(checkpoints, run_dir)
    resolve_planned_layout(config_ref, config, options.ffn_family)
    probe = prepare_probe(probe_source, config_ref, config, options)
    check_output_writable(out_dir)
    check_probe_matches(out_dir, probe, checkpoints, options.force)
    store.remove_stale_temp_files(out_dir)
    record_run_metadata(out_dir, run_name, run_dir, probe, device)

    summary = AnalysisSummary(out_dir=out_dir, run_name=run_name)
    progress = tqdm(checkpoints, desc=run_name, unit="ckpt", disable=not options.show_progress)
    try:
        with logs_above_progress_bars():
            for ref in progress:
                progress.set_postfix(step=ref.step)
                analyze_one(ref, out_dir, run_name, probe, device, options, summary)
    except KeyboardInterrupt as interrupt:
        progress.close()
        terminated = isinstance(interrupt, TerminationRequested)
        signal_number = signal.SIGTERM if terminated else signal.SIGINT
        raise AnalysisInterrupted(out_dir, len(summary.analyzed), signal_number) from None
    return summary


def logs_above_progress_bars() -> contextlib.AbstractContextManager:
    """Route console log lines through ``tqdm.write`` so no error is glued to a progress bar.

    Only a console handler that the entry point configured is replaced.
    Without one, nothing changes, so callers that capture logs keep them.
    """
    console_streams = (sys.stdout, sys.stderr)
    has_console = any(
        isinstance(handler, logging.StreamHandler) and handler.stream in console_streams
        for handler in logging.getLogger().handlers
    )
    return logging_redirect_tqdm() if has_console else contextlib.nullcontext()


def check_output_writable(out_dir: Path) -> None:
    """Create ``out_dir`` and check that files can be written there, before any model loads.

    The test file is anonymous (``O_TMPFILE`` where the file system has it),
    so a kill at any moment leaves nothing behind.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputDirectoryError(
            f"{out_dir}: output path exists and is not a directory; choose another with --out"
        )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir) as handle:
            handle.write(b"nerve write test")
    except OSError as error:
        raise OutputDirectoryError(
            f"{out_dir}: output directory cannot be created or written ({error.strerror}); "
            "choose another with --out"
        ) from None


def select_config_checkpoint(
    checkpoints: Sequence[CheckpointRef], run_dir: Path
) -> tuple[CheckpointRef, object]:
    """Return the first checkpoint whose config loads, with that config.

    Its vocabulary checks the probe and its tokenizer tokenizes a text probe,
    so a broken first checkpoint does not stop the run. Raises
    CheckpointError when no checkpoint has a usable config, with the
    checkpoint's own message when the run has one checkpoint.
    """
    errors = []
    for ref in checkpoints:
        try:
            if ref.format in CONFIG_FORMATS:
                check_config(ref.directory)
            return ref, load_config(ref)
        except CheckpointError as error:
            errors.append(str(error))
        except (OSError, ValueError) as error:
            errors.append(f"{ref.path}: cannot read the model config ({error_summary(error)})")

    if len(errors) == 1:
        raise CheckpointError(errors[0])
    raise CheckpointError(
        f"{run_dir}: none of the {len(errors)} checkpoints has a usable config, "
        f"the first error: {errors[0]}"
    )


class OutputDirectoryError(ValueError):
    """Raised when the result directory cannot be created or written."""


def prepare_probe(
    source: ProbeSource, checkpoint: CheckpointRef, config, options: AnalyzeOptions
) -> Probe:
    """Tokenize the probe with the first checkpoint's tokenizer, or check a token array.

    The same token ids are used for every checkpoint of the run, so metrics
    of different steps are computed on identical inputs.
    """
    tokenizer = None if source.token_ids is not None else load_tokenizer(checkpoint)
    return build_probe(
        source,
        tokenizer,
        seq_len=options.seq_len,
        max_tokens=options.max_tokens,
        max_positions=max_positions(config),
        vocab_size=config.vocab_size,
    )


class ProbeMismatchError(ValueError):
    """Raised when a result directory contains checkpoints measured with another probe."""


def probe_identity(probe: dict) -> tuple:
    """Return the fields that make two probes the same: file sha256 and token layout."""
    return tuple(probe.get(key) for key in ("sha256", "n_sequences", "seq_len", "n_tokens"))


def check_probe_matches(
    out_dir: Path, probe: Probe, checkpoints: list[CheckpointRef], force: bool
) -> None:
    """Stop before any write when finished checkpoints in ``out_dir`` used another probe.

    Mixing probes in one result directory would make steps incomparable, since
    SE and PR are capped by the token count. ``--force`` is accepted only when
    it recomputes every finished checkpoint with the new probe.
    """
    if not (out_dir / store.RUN_FILE).exists():
        return
    previous = store.read_run_file(out_dir).get("probe") or {}
    finished = store.finished_steps(out_dir)
    if not finished or not previous or probe_identity(previous) == probe_identity(probe.describe()):
        return
    if force and finished <= {ref.step for ref in checkpoints}:
        return

    raise ProbeMismatchError(
        f"{out_dir}: contains {len(finished)} checkpoint(s) measured with probe "
        f"{previous.get('name')} (sha256 {str(previous.get('sha256'))[:12]}, "
        f"{previous.get('n_tokens')} tokens in rows of {previous.get('seq_len')}), but this run "
        f"uses {probe.name} (sha256 {probe.sha256[:12]}, {probe.n_tokens} tokens in rows of "
        f"{probe.seq_len}); choose another --out, or add --force to recompute every checkpoint"
    )


def record_run_metadata(
    out_dir: Path, run_name: str, run_dir: Path, probe: Probe, device: torch.device
) -> None:
    """Write the run-level fields of run.json, keeping any checkpoint entries already there."""
    import transformers

    with store.locked_run_file(out_dir) as info:
        info.update(
            {
                "run": run_name,
                "nerve_version": __version__,
                "checkpoint_dir": str(run_dir.resolve()),
                "probe": probe.describe(),
                "device": str(device),
                "versions": {
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "nerve": __version__,
                },
            }
        )
        info.setdefault("checkpoints", [])


def analyze_one(
    ref: CheckpointRef,
    out_dir: Path,
    run_name: str,
    probe: Probe,
    device: torch.device,
    options: AnalyzeOptions,
    summary: AnalysisSummary,
) -> None:
    """Analyze one checkpoint unless it is finished or claimed by another process.

    A failure of the checkpoint itself is recorded and the run goes on. A
    failure to write the result directory raises OutputDirectoryError, since
    every later checkpoint would fail the same way.
    """
    with store.claim_checkpoint(out_dir, ref.step) as claimed:
        if not claimed:
            holder = store.read_claim_holder(out_dir, ref.step) or "another process"
            logger.info("step %d: being analyzed by %s, skipped", ref.step, holder)
            summary.skipped.append(ref.step)
            return
        store.remove_checkpoint_temp_files(out_dir, ref.step)
        if ref.step in store.finished_steps(out_dir) and not options.force:
            logger.info(
                "step %d: already in %s, skipped (use --force to recompute)", ref.step, out_dir
            )
            record_finished_if_missing(out_dir, ref)
            summary.skipped.append(ref.step)
            return

        started = time.perf_counter()
        try:
            metric_rows, spectra_rows, meta = measure_checkpoint(
                ref, run_name, probe, device, options
            )
        except Exception as error:  # noqa: BLE001 - one bad checkpoint must not stop the run
            message = checkpoint_error_message(ref, error)
            logger.error("%s", message)
            logger.debug("traceback of the failure above", exc_info=True)
            summary.failed[ref.step] = message
            record_checkpoint(out_dir, ref, time.perf_counter() - started, "failed", message, {})
            return

        write_results(out_dir, ref.step, metric_rows, spectra_rows)
        record_checkpoint(out_dir, ref, time.perf_counter() - started, "done", None, meta)
        summary.analyzed.append(ref.step)


def write_results(
    out_dir: Path, step: int, metric_rows: list[dict], spectra_rows: list[dict]
) -> None:
    """Write one checkpoint's tables; raise OutputDirectoryError when they cannot be written."""
    try:
        store.write_checkpoint_tables(out_dir, step, metric_rows, spectra_rows)
    except OSError as error:
        raise OutputDirectoryError(
            f"{error.filename or out_dir}: cannot write the results of step {step} "
            f"({error.strerror or error_summary(error)}); free space or choose another --out, "
            "then run again: finished checkpoints are kept"
        ) from None


def checkpoint_error_message(ref: CheckpointRef, error: Exception) -> str:
    """Format a checkpoint failure as one line naming the checkpoint."""
    if isinstance(error, CheckpointError):
        return str(error)
    message = f"{ref.path}: {type(error).__name__}: {error_summary(error)}"
    if isinstance(error, MemoryError | torch.cuda.OutOfMemoryError):
        message += "; use a smaller --batch-size or fewer --max-tokens"
    return message


def error_summary(error: BaseException) -> str:
    """Return a library error's message on one line, at most 300 characters."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def measure_checkpoint(
    ref: CheckpointRef, run_name: str, probe: Probe, device: torch.device, options: AnalyzeOptions
) -> tuple[list[dict], list[dict], dict]:
    """Load one checkpoint, measure it and return its metrics rows, spectra rows and metadata."""
    check_checkpoint(ref.path, ref.format)
    loaded = load_checkpoint(ref, device, options.dtype)
    points = resolve_ffn_points(loaded.model, loaded.config.model_type, options.ffn_family)
    measurement = measure_model(
        loaded.model,
        points,
        probe,
        options.batch_size,
        loaded.is_causal_lm,
        product_dtype=None,
        show_progress=options.show_progress,
    )
    layers = compute_layer_results(measurement)
    del loaded.model
    log_null_reasons(ref.step, layers)
    ffn_dim = points[0].ffn_dim
    if measurement.n_tokens <= ffn_dim:
        logger.warning(
            "step %d: %d probe tokens <= FFN width %d, so the covariance rank is limited; "
            "SE and PR are capped by the token count (use more probe tokens)",
            ref.step,
            measurement.n_tokens,
            ffn_dim,
        )

    probe_loss = measurement.probe_loss
    if probe_loss is not None and not math.isfinite(probe_loss):
        logger.warning("step %d: probe loss is %s; stored as null", ref.step, probe_loss)
        probe_loss = None
    context = {
        "run": run_name,
        "step": ref.step,
        "checkpoint": ref.relative,
        "n_tokens": measurement.n_tokens,
        "probe_loss": probe_loss,
        "eval_loss": nearest_eval_loss(ref),
    }
    meta = {
        "model_type": loaded.config.model_type,
        "ffn_kind": points[0].kind,
        "ffn_dim": ffn_dim,
        "n_layers": len(points),
        "is_causal_lm": loaded.is_causal_lm,
        "dtype": str(loaded.dtype).removeprefix("torch."),
    }
    return build_metric_rows(layers, context), build_spectra_rows(layers, run_name, ref.step), meta


def log_null_reasons(step: int, layers: list[LayerResult]) -> None:
    """Warn once per distinct reason why layers of this checkpoint have null metrics."""
    reasons: dict[str, int] = {}
    for result in layers:
        if result.null_reason is not None:
            reasons[result.null_reason] = reasons.get(result.null_reason, 0) + 1
    for reason, count in reasons.items():
        logger.warning("step %d: metrics of %d layer(s) are null: %s", step, count, reason)


def build_metric_rows(layers: list[LayerResult], context: dict) -> list[dict]:
    """Return one ``metrics`` row per layer; null metrics carry their reason."""
    rows = []
    for result in layers:
        values = result.values or dict.fromkeys(store.METRIC_COLUMNS)
        rows.append(
            {
                **context,
                "layer": result.layer,
                "ffn_dim": result.ffn_dim,
                **values,
                "rank_limited": context["n_tokens"] <= result.ffn_dim,
                "null_reason": result.null_reason,
            }
        )
    return rows


def build_spectra_rows(layers: list[LayerResult], run_name: str, step: int) -> list[dict]:
    """Return the ``spectra`` rows (pre and post per layer) of the layers that have spectra."""
    rows = []
    for result in layers:
        for point, values in (("pre", result.eigenvalues_pre), ("post", result.eigenvalues_post)):
            if values is not None:
                rows.append(
                    {
                        "run": run_name,
                        "step": step,
                        "layer": result.layer,
                        "point": point,
                        "eigenvalues": values.tolist(),
                    }
                )
    return rows


def nearest_eval_loss(ref: CheckpointRef) -> float | None:
    """Return the ``eval_loss`` logged in trainer_state.json at the step nearest to the checkpoint."""
    state = read_trainer_state(ref.path)
    if not state:
        return None
    entries = [
        entry
        for entry in state.get("log_history", [])
        if isinstance(entry, dict)
        and isinstance(entry.get("eval_loss"), int | float)
        and "step" in entry
    ]
    if not entries:
        return None
    nearest = min(entries, key=lambda entry: abs(int(entry["step"]) - ref.step))
    return float(nearest["eval_loss"])


def record_finished_if_missing(out_dir: Path, ref: CheckpointRef) -> None:
    """Mark a checkpoint done in run.json when its tables exist but its entry does not say so.

    A process killed after writing the metrics file and before updating
    run.json leaves this state. The entry's ``seconds`` is then unknown (null).
    """
    entries = store.read_run_file(out_dir).get("checkpoints", [])
    if not any(
        entry.get("step") == ref.step and entry.get("status") == "done" for entry in entries
    ):
        logger.info("step %d: tables found without a run.json entry, entry added", ref.step)
        record_checkpoint(out_dir, ref, None, "done", None, {})


def record_checkpoint(
    out_dir: Path,
    ref: CheckpointRef,
    seconds: float | None,
    status: str,
    error: str | None,
    meta: dict,
) -> None:
    """Replace this checkpoint's status entry in run.json and store the model metadata.

    ``host`` and ``pid`` name the process that wrote the entry, so a run
    split across jobs shows which job analyzed each checkpoint.
    """
    with store.locked_run_file(out_dir) as info:
        entries = [entry for entry in info.get("checkpoints", []) if entry.get("step") != ref.step]
        entries.append(
            {
                "step": ref.step,
                "path": ref.relative,
                "seconds": None if seconds is None else round(seconds, 3),
                "status": status,
                "error": error,
                "host": socket.gethostname(),
                "pid": os.getpid(),
            }
        )
        info["checkpoints"] = sorted(entries, key=lambda entry: entry["step"])
        info.update(meta)


def summarize_last_step(out_dir: Path) -> pd.DataFrame:
    """Return the per-layer metrics of the last analyzed step, for the end-of-run table."""
    with contextlib.suppress(store.ResultDirectoryError):
        metrics = store.load_results(out_dir).metrics
        if not metrics.empty:
            last = metrics[metrics["step"] == metrics["step"].max()]
            # The measured metrics and pr_gain; eee_delta and se_delta follow from them.
            columns = ["step", "layer", *store.METRIC_COLUMNS[:8]]
            return last[columns].reset_index(drop=True)
    return pd.DataFrame()
