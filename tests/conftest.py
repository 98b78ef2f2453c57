"""Shared fixtures: a click runner and tiny real checkpoints built from configs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from nerve_cli import analyze

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_RUNS = REPO_ROOT / "sample_checkpoints"


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


class LoadSpy:
    """Records the checkpoints that analyze passed to load_checkpoint."""

    def __init__(self) -> None:
        self.paths: list[Path] = []
        self.original = analyze.load_checkpoint

    def __call__(self, checkpoint, *args, **kwargs):
        self.paths.append(Path(getattr(checkpoint, "path", checkpoint)))
        return self.original(checkpoint, *args, **kwargs)


@pytest.fixture
def load_spy(monkeypatch) -> LoadSpy:
    spy = LoadSpy()
    monkeypatch.setattr(analyze, "load_checkpoint", spy)
    return spy


def save_tiny_gpt2_run(
    run_dir: Path, steps=(0, 10), seed: int = 0, activation: str = "gelu"
) -> Path:
    """Save random tiny GPT-2 checkpoints as ``checkpoint-<step>`` with a trainer_state.json."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_inner=64,
        n_head=2,
        n_positions=64,
        vocab_size=100,
        bos_token_id=0,
        eos_token_id=0,
        activation_function=activation,
    )
    for index, step in enumerate(steps):
        torch.manual_seed(seed + index)
        model = GPT2LMHeadModel(config)
        checkpoint = run_dir / f"checkpoint-{step}"
        model.save_pretrained(checkpoint)
        history = [{"step": s, "eval_loss": 5.0 - s / 100} for s in range(0, step + 1, 5)]
        state = {"global_step": step, "log_history": history}
        (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    return run_dir


def save_token_probe(
    path: Path, n_sequences: int = 12, seq_len: int = 32, vocab_size: int = 100
) -> Path:
    """Save a seeded ``.npy`` probe of token ids ``[n_sequences, seq_len]``."""
    token_ids = np.random.default_rng(0).integers(0, vocab_size, size=(n_sequences, seq_len))
    np.save(path, token_ids)
    return path


@pytest.fixture
def tiny_run(tmp_path: Path) -> Path:
    return save_tiny_gpt2_run(tmp_path / "tiny-run")


@pytest.fixture
def token_probe(tmp_path: Path) -> Path:
    return save_token_probe(tmp_path / "probe.npy")
