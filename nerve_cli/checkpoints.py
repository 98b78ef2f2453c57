"""Find the checkpoints of a training run and their steps.

A run directory holds checkpoint subdirectories named ``checkpoint-<step>``
(Hugging Face Trainer), ``step<step>``, ``step_<step>``, ``global_step<step>``
or ``iter_<step>``. A directory that is itself a checkpoint (it holds a
``config.json``) is a run of one checkpoint, whose step comes from its
``trainer_state.json`` or is 0.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

CHECKPOINT_DIR_PATTERN = re.compile(r"^(?:checkpoint-|step_?|global_step|iter_)(\d+)$")


class CheckpointDiscoveryError(ValueError):
    """Raised when a run directory holds no checkpoint nerve can read."""


@dataclass(frozen=True)
class CheckpointRef:
    """One checkpoint of a run: its step and where its files are.

    ``relative`` is the path relative to the run directory, as written to the
    ``checkpoint`` column ("." when the run directory is the checkpoint).
    """

    step: int
    path: Path
    relative: str
    format: str = "hf"


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

    Raises CheckpointDiscoveryError when the path does not exist, when two
    checkpoints claim the same step, or when nothing that looks like a
    checkpoint is found.
    """
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise CheckpointDiscoveryError(f"{run_dir}: path not found")
    if not run_dir.is_dir():
        raise CheckpointDiscoveryError(
            f"{run_dir}: not a directory; pass a run or checkpoint directory"
        )

    found: dict[int, CheckpointRef] = {}
    for child in sorted(run_dir.iterdir()):
        match = CHECKPOINT_DIR_PATTERN.match(child.name)
        if not (match and child.is_dir()):
            continue
        step = int(match.group(1))
        if step in found:
            raise CheckpointDiscoveryError(
                f"{run_dir}: step {step} appears twice ({found[step].relative} and {child.name}); "
                "keep one of them or select steps with --steps"
            )
        found[step] = CheckpointRef(step=step, path=child, relative=child.name)

    if not found and (run_dir / "config.json").is_file():
        step = read_trainer_step(run_dir) or 0
        found[step] = CheckpointRef(step=step, path=run_dir, relative=".")

    if not found:
        raise CheckpointDiscoveryError(
            f"{run_dir}: no checkpoints found; expected subdirectories named checkpoint-<step>, "
            "step<step>, step_<step>, global_step<step> or iter_<step>, or a config.json"
        )
    return [found[step] for step in sorted(found)]


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
