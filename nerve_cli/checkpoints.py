"""Find the checkpoints of a training run, their steps and formats.

A run directory contains any mix of:

* checkpoint subdirectories named ``checkpoint-<step>`` (Hugging Face
  Trainer), ``step<step>``, ``step_<step>``, ``global_step<step>`` or
  ``iter_<step>``, each a Hugging Face checkpoint or a nanoGPT ``ckpt.pt``;
* bare weight files with the step in their name (``model_step_100.safetensors``,
  ``step_200.pt``) beside one ``config.json``; without a ``config.json``,
  step-named ``.pt`` files are read as nanoGPT checkpoints.

When none of these exist, the directory is itself one checkpoint: a Hugging
Face checkpoint (step from its ``trainer_state.json``, else 0) or a nanoGPT
``ckpt.pt``. The step of a nanoGPT checkpoint is always its ``iter_num``.
Directories that hold only a parameter-efficient adapter are skipped, each
with a logged reason. :mod:`nerve_cli.formats` describes the formats.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from nerve_cli import formats

logger = logging.getLogger(__name__)

CHECKPOINT_DIR_PATTERN = re.compile(r"^(?:checkpoint-|step_?|global_step|iter_)(\d+)$")


class CheckpointDiscoveryError(ValueError):
    """Raised when a run directory contains no checkpoint nerve can read."""


@dataclass(frozen=True)
class CheckpointRef:
    """One checkpoint of a run: its step, where its files are and their format.

    ``path`` is a directory for the Hugging Face formats and the weight file
    itself for ``weights-file`` and ``nanogpt``. ``relative`` is the path
    relative to the run directory, as written to the ``checkpoint`` column
    ("." when the run directory is the checkpoint). ``format`` is one of the
    names in :mod:`nerve_cli.formats`.
    """

    step: int
    path: Path
    relative: str
    format: str = formats.HF

    @property
    def directory(self) -> Path:
        """The directory that contains the checkpoint's config and tokenizer files."""
        return self.path if self.path.is_dir() else self.path.parent


@dataclass(frozen=True)
class SkippedCheckpoint:
    """A path that looks like a checkpoint but cannot be analyzed, and why."""

    relative: str
    reason: str


@dataclass
class RunScan:
    """The checkpoints of a run ordered by step, and the paths skipped."""

    checkpoints: list[CheckpointRef] = field(default_factory=list)
    skipped: list[SkippedCheckpoint] = field(default_factory=list)


def read_trainer_step(checkpoint_dir: Path) -> int | None:
    """Return ``global_step`` from a checkpoint's trainer_state.json, or None."""
    state = read_trainer_state(checkpoint_dir)
    step = state.get("global_step") if state else None
    return int(step) if isinstance(step, int) else None


def read_trainer_state(checkpoint_dir: Path) -> dict | None:
    """Read a checkpoint's trainer_state.json; return None when absent or unreadable."""
    path = checkpoint_dir / "trainer_state.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        logger.warning("%s: ignored, not readable JSON (%s)", path, error)
        return None


def discover_checkpoints(run_dir: str | Path) -> list[CheckpointRef]:
    """List the checkpoints of a run, ordered by step as an integer.

    Skipped paths are logged as warnings. Raises CheckpointDiscoveryError as
    :func:`scan_run` does.
    """
    scan = scan_run(run_dir)
    for skipped in scan.skipped:
        logger.warning("%s: skipped, %s", Path(run_dir) / skipped.relative, skipped.reason)
    return scan.checkpoints


def scan_run(run_dir: str | Path) -> RunScan:
    """Find the checkpoints of a run and the paths skipped, with their reasons.

    Raises CheckpointDiscoveryError when the path does not exist, when two
    checkpoints claim the same step, or when no checkpoint is found.
    """
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise CheckpointDiscoveryError(f"{run_dir}: path not found")
    if not run_dir.is_dir():
        raise CheckpointDiscoveryError(
            f"{run_dir}: not a directory; pass a run or checkpoint directory"
        )

    scan = RunScan()
    candidates = _scan_children(run_dir, scan)
    if not candidates and not scan.skipped:
        candidates = _scan_run_as_checkpoint(run_dir, scan)
    scan.checkpoints = _order_by_step(run_dir, candidates)

    if not scan.checkpoints:
        raise CheckpointDiscoveryError(_nothing_found_message(run_dir, scan.skipped))
    return scan


def _scan_children(run_dir: Path, scan: RunScan) -> list[CheckpointRef]:
    """Collect the checkpoint subdirectories and step-named weight files of a run."""
    has_config = (run_dir / formats.CONFIG_FILE).is_file()
    found = []
    for child in sorted(run_dir.iterdir()):
        if child.is_dir():
            match = CHECKPOINT_DIR_PATTERN.match(child.name)
            if match:
                found += _directory_checkpoint(child, int(match.group(1)), child.name, scan)
        elif child.is_file():
            found += _file_checkpoint(child, has_config, scan)
    return found


def _directory_checkpoint(
    directory: Path, step: int, relative: str, scan: RunScan
) -> list[CheckpointRef]:
    """Return the checkpoint in a directory (none when it is skipped)."""
    reason = formats.adapter_only_reason(directory)
    if reason:
        scan.skipped.append(SkippedCheckpoint(relative, reason))
        return []

    checkpoint_format = formats.directory_format(directory)
    if checkpoint_format == formats.NANOGPT:
        weight_file = directory / formats.NANOGPT_FILE
        relative = weight_file.name if relative == "." else f"{relative}/{weight_file.name}"
        return [_nanogpt_checkpoint(weight_file, step, relative)]
    return [CheckpointRef(step=step, path=directory, relative=relative, format=checkpoint_format)]


def _file_checkpoint(path: Path, has_config: bool, scan: RunScan) -> list[CheckpointRef]:
    """Return the checkpoint a step-named weight file is (none for other files)."""
    step = formats.weight_file_step(path)
    if step is None:
        return []
    if has_config:
        return [
            CheckpointRef(step=step, path=path, relative=path.name, format=formats.WEIGHTS_FILE)
        ]
    if formats.is_pickle_file(path):
        return [_nanogpt_checkpoint(path, step, path.name)]
    scan.skipped.append(
        SkippedCheckpoint(
            path.name,
            f"no {formats.CONFIG_FILE} beside it; put the model's config.json in the run directory",
        )
    )
    return []


def _nanogpt_checkpoint(path: Path, fallback_step: int, relative: str) -> CheckpointRef:
    """Return a nanoGPT checkpoint whose step is its ``iter_num`` (``fallback_step`` if unreadable)."""
    from nerve_cli.nanogpt import read_iter_num

    step = read_iter_num(path)
    if step is None:
        step = fallback_step
    elif step != fallback_step and fallback_step != 0:
        logger.warning(
            "%s: iter_num %d differs from the step %d in its name; using iter_num",
            path,
            step,
            fallback_step,
        )
    return CheckpointRef(step=step, path=path, relative=relative, format=formats.NANOGPT)


def _scan_run_as_checkpoint(run_dir: Path, scan: RunScan) -> list[CheckpointRef]:
    """Treat the run directory as one checkpoint when it contains a config.json or a ckpt.pt."""
    is_hf = (run_dir / formats.CONFIG_FILE).is_file()
    is_nanogpt = (run_dir / formats.NANOGPT_FILE).is_file()
    is_adapter = any((run_dir / name).is_file() for name in formats.ADAPTER_FILES)
    if not (is_hf or is_nanogpt or is_adapter):
        return []
    step = read_trainer_step(run_dir) or 0
    return _directory_checkpoint(run_dir, step, ".", scan)


def _order_by_step(run_dir: Path, candidates: list[CheckpointRef]) -> list[CheckpointRef]:
    """Sort checkpoints by step; raise when two claim the same step."""
    found: dict[int, CheckpointRef] = {}
    for ref in candidates:
        if ref.step in found:
            raise CheckpointDiscoveryError(
                f"{run_dir}: step {ref.step} appears twice ({found[ref.step].relative} and "
                f"{ref.relative}); keep one of them or select steps with --steps"
            )
        found[ref.step] = ref
    return [found[step] for step in sorted(found)]


def _nothing_found_message(run_dir: Path, skipped: list[SkippedCheckpoint]) -> str:
    if skipped:
        reasons = "; ".join(f"{item.relative} {item.reason}" for item in skipped)
        return f"{run_dir}: no checkpoint can be analyzed: {reasons}"
    return (
        f"{run_dir}: no checkpoints found; expected subdirectories named checkpoint-<step>, "
        "step<step>, step_<step>, global_step<step> or iter_<step>, weight files with the "
        "step in their name beside a config.json, a config.json or a nanoGPT ckpt.pt"
    )


def select_steps(checkpoints: list[CheckpointRef], steps: list[int] | None) -> list[CheckpointRef]:
    """Keep the checkpoints whose step is in ``steps`` (all when None).

    Raises CheckpointDiscoveryError naming any requested step that does not exist.
    """
    if steps is None:
        return checkpoints
    available = {ref.step for ref in checkpoints}
    missing = sorted(set(steps) - available)
    if missing:
        raise CheckpointDiscoveryError(
            f"--steps: no checkpoint for step(s) {', '.join(map(str, missing))}; "
            f"available steps: {', '.join(map(str, sorted(available)))}"
        )
    wanted = set(steps)
    return [ref for ref in checkpoints if ref.step in wanted]
