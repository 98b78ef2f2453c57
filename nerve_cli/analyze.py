"""Analyze a training run: every checkpoint, every FFN block, into a result directory.

:func:`analyze_run` is the Python entry point behind ``nerve analyze``. It
finds the checkpoints, prepares the probe once, and for each checkpoint loads
the model, measures it and writes that checkpoint's Parquet files before
moving on, so an interruption loses at most the checkpoint in progress. A
re-run skips checkpoints whose files exist; a checkpoint that fails is
recorded in run.json with its error and the run goes on.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from nerve_cli import __version__, store
from nerve_cli.architectures import resolve_ffn_points
from nerve_cli.checkpoints import (
    CheckpointRef,
    discover_checkpoints,
    read_trainer_state,
    select_steps,
)
from nerve_cli.errors import CheckpointError
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


@dataclass
class AnalysisSummary:
    """What one call of :func:`analyze_run` did."""

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
    directory) for input that stops the whole run before any model is
    loaded. Per-checkpoint failures are returned in ``summary.failed``.
    """
    options = options or AnalyzeOptions()
    run_dir = Path(run_dir)
    checkpoints = select_steps(
        discover_checkpoints(run_dir), list(options.steps) if options.steps else None
    )
    run_name = options.run_name or run_dir.resolve().name
    out_dir = Path(options.out_dir) if options.out_dir else Path("nerve-results") / run_name
    check_output_writable(out_dir)

    device = resolve_device(options.device)
    probe_source = read_probe_source(options.probe_path)
    first_config = load_config(checkpoints[0].path)
    probe = prepare_probe(probe_source, checkpoints[0].path, first_config, options)
    store.remove_stale_temp_files(out_dir)
    record_run_metadata(out_dir, run_name, run_dir, probe, device)

    summary = AnalysisSummary(out_dir=out_dir, run_name=run_name)
    progress = tqdm(checkpoints, desc=run_name, unit="ckpt", disable=not options.show_progress)
    for ref in progress:
        progress.set_postfix(step=ref.step)
        analyze_one(ref, out_dir, run_name, probe, device, options, summary)
    return summary


def check_output_writable(out_dir: Path) -> None:
    """Create ``out_dir`` and check that files can be written there, before any model loads."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe_file = out_dir / f".write-test-{os.getpid()}"
        probe_file.write_bytes(b"")
        probe_file.unlink()
    except OSError as error:
        raise OutputDirectoryError(
            f"{out_dir}: output directory is not writable ({error.strerror}); choose another with --out"
        ) from None


class OutputDirectoryError(ValueError):
    """Raised when the result directory cannot be created or written."""


def prepare_probe(
    source: ProbeSource, checkpoint_dir: Path, config, options: AnalyzeOptions
) -> Probe:
    """Tokenize the probe with the first checkpoint's tokenizer, or check a token array.

    The same token ids are used for every checkpoint of the run, so metrics
    of different steps are computed on identical inputs.
    """
    tokenizer = None if source.token_ids is not None else load_tokenizer(checkpoint_dir)
    return build_probe(
        source,
        tokenizer,
        seq_len=options.seq_len,
        max_tokens=options.max_tokens,
        max_positions=max_positions(config),
        vocab_size=config.vocab_size,
    )


def record_run_metadata(
    out_dir: Path, run_name: str, run_dir: Path, probe: Probe, device: torch.device
) -> None:
    """Write the run-level fields of run.json, keeping any checkpoint entries already there."""
    import transformers

    with store.locked_run_file(out_dir) as info:
        previous_sha = info.get("probe", {}).get("sha256")
        if previous_sha and previous_sha != probe.sha256:
            logger.warning(
                "%s was analyzed with another probe (sha256 %s); use a new --out or --force",
                out_dir,
                previous_sha[:12],
            )
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
    """Analyze one checkpoint unless it is finished or claimed by another process."""
    with store.claim_checkpoint(out_dir, ref.step) as claimed:
        if not claimed:
            logger.info("step %d: being analyzed by another process, skipped", ref.step)
            summary.skipped.append(ref.step)
            return
        if ref.step in store.finished_steps(out_dir) and not options.force:
            logger.info(
                "step %d: already in %s, skipped (use --force to recompute)", ref.step, out_dir
            )
            summary.skipped.append(ref.step)
            return

        started = time.perf_counter()
        try:
            metric_rows, spectra_rows, meta = measure_checkpoint(
                ref, run_name, probe, device, options
            )
            store.write_checkpoint_tables(out_dir, ref.step, metric_rows, spectra_rows)
        except Exception as error:  # noqa: BLE001 - one bad checkpoint must not stop the run
            message = checkpoint_error_message(ref, error)
            logger.error("%s", message)
            logger.debug("traceback of the failure above", exc_info=True)
            summary.failed[ref.step] = message
            record_checkpoint(out_dir, ref, time.perf_counter() - started, "failed", message, {})
            return

        record_checkpoint(out_dir, ref, time.perf_counter() - started, "done", None, meta)
        summary.analyzed.append(ref.step)


def checkpoint_error_message(ref: CheckpointRef, error: Exception) -> str:
    """Format a checkpoint failure as one line naming the checkpoint."""
    if isinstance(error, CheckpointError):
        return str(error)
    text = " ".join(str(error).split()) or type(error).__name__
    return f"{ref.path}: {type(error).__name__}: {text}"


def measure_checkpoint(
    ref: CheckpointRef, run_name: str, probe: Probe, device: torch.device, options: AnalyzeOptions
) -> tuple[list[dict], list[dict], dict]:
    """Load one checkpoint, measure it and return its metrics rows, spectra rows and metadata."""
    loaded = load_checkpoint(ref.path, device, options.dtype)
    points = resolve_ffn_points(loaded.model, loaded.config.model_type)
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


def record_checkpoint(
    out_dir: Path, ref: CheckpointRef, seconds: float, status: str, error: str | None, meta: dict
) -> None:
    """Replace this checkpoint's status entry in run.json and store the model metadata."""
    with store.locked_run_file(out_dir) as info:
        entries = [entry for entry in info.get("checkpoints", []) if entry.get("step") != ref.step]
        entries.append(
            {
                "step": ref.step,
                "path": ref.relative,
                "seconds": round(seconds, 3),
                "status": status,
                "error": error,
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
            columns = [
                "step",
                "layer",
                "se_pre",
                "se_post",
                "pr_pre",
                "pr_post",
                "eee_pre",
                "eee_post",
                "js",
                "pr_gain",
            ]
            return last[columns].reset_index(drop=True)
    return pd.DataFrame()
