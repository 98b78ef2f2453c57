"""Build tiny real checkpoints, probes and broken copies of them for the failure tests.

Models are random GPT-2s built from a config (2 blocks, FFN width 64, vocabulary
of 100), so nothing is downloaded. Helpers that break a checkpoint do it the
way real failures do: a truncated copy, an empty file left by a killed save,
a Git LFS pointer in place of the weights.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
FFN_DIM = 64
N_LAYERS = 2
VOCAB_SIZE = 100

LFS_POINTER = (
    "version https://git-lfs.github.com/spec/v1\n"
    "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
    "size 92184\n"
)


def tiny_gpt2_config(**overrides):
    """Return the config of the tiny GPT-2 used by these tests."""
    from transformers import GPT2Config

    settings = dict(
        n_layer=N_LAYERS,
        n_embd=32,
        n_inner=FFN_DIM,
        n_head=2,
        n_positions=64,
        vocab_size=VOCAB_SIZE,
        bos_token_id=0,
        eos_token_id=0,
    )
    settings.update(overrides)
    return GPT2Config(**settings)


def build_tiny_gpt2(seed: int = 0, **config_overrides):
    """Return a seeded random tiny GPT-2 LM in eval mode."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(tiny_gpt2_config(**config_overrides)).eval()


def save_model(model, directory: Path, **save_options) -> Path:
    """Save a model with save_pretrained, without transformers' progress bars."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    model.save_pretrained(directory, **save_options)
    return directory


def save_tiny_run(run_dir: Path, steps=(10, 20), seed: int = 0, **config_overrides) -> Path:
    """Save one tiny GPT-2 per step as ``run_dir/checkpoint-<step>``."""
    for index, step in enumerate(steps):
        save_model(
            build_tiny_gpt2(seed + index, **config_overrides), run_dir / f"checkpoint-{step}"
        )
    return run_dir


def save_probe(
    path: Path, n_sequences: int = 4, seq_len: int = 32, seed: int = 0, vocab_size: int = VOCAB_SIZE
) -> Path:
    """Save a seeded ``.npy`` probe of token ids ``[n_sequences, seq_len]``."""
    token_ids = np.random.default_rng(seed).integers(0, vocab_size, size=(n_sequences, seq_len))
    np.save(path, token_ids)
    return path


def truncate_file(path: Path, size: int) -> None:
    """Cut a file to ``size`` bytes, as an interrupted copy leaves it."""
    with open(path, "r+b") as handle:
        handle.truncate(size)


def read_run_json(out_dir: Path) -> dict:
    """Return the parsed run.json of a result directory."""
    return json.loads((out_dir / "run.json").read_text(encoding="utf-8"))


def checkpoint_entries(out_dir: Path) -> dict[int, dict]:
    """Return run.json's checkpoint entries by step."""
    return {entry["step"]: entry for entry in read_run_json(out_dir)["checkpoints"]}


def temp_files(out_dir: Path) -> list[Path]:
    """Return every temporary file left anywhere under a result directory."""
    return sorted(path for path in out_dir.rglob(".tmp-*"))


def copy_tree(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def analyze_command(run_dir: Path, out_dir: Path, probe: Path, *extra: str) -> list[str]:
    """Return the argv that runs ``nerve analyze`` in a fresh interpreter."""
    return [
        sys.executable,
        "-m",
        "nerve_cli",
        "-q",
        "analyze",
        str(run_dir),
        "--out",
        str(out_dir),
        "--probe",
        str(probe),
        "--device",
        "cpu",
        *extra,
    ]


def start_analyze(run_dir: Path, out_dir: Path, probe: Path, *extra: str) -> subprocess.Popen:
    """Start ``nerve analyze`` as a child process with its output captured."""
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        analyze_command(run_dir, out_dir, probe, *extra),
        cwd=REPO_ROOT,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_file(
    pattern_dir: Path, pattern: str, process: subprocess.Popen, timeout: float
) -> bool:
    """Poll until a file matching ``pattern`` exists; return False when the process ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pattern_dir.is_dir() and any(pattern_dir.glob(pattern)):
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.02)
    raise TimeoutError(f"no {pattern} in {pattern_dir} after {timeout} s")


def kill_and_wait(
    process: subprocess.Popen, signal_number: int = signal.SIGKILL
) -> tuple[str, str]:
    """Send a signal to a child process and return its stdout and stderr once it ends."""
    process.send_signal(signal_number)
    stdout, stderr = process.communicate(timeout=120)
    return stdout, stderr
