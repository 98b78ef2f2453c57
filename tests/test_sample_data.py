"""Checks of the shipped probe corpus and the sample checkpoints, all offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
PROBE_DIR = REPO_ROOT / "nerve_cli" / "data" / "probe"
SAMPLES_DIR = REPO_ROOT / "sample_checkpoints"
RUNS = ("gpt2-gelu", "gpt2-relu")
ROUND_TRIP_TEXT = "Naïve café — “quotes”, 日本語 and 🙂.\n\n\tTabs and  double spaces."


def checkpoint_dirs(run: str) -> list[Path]:
    directories = (SAMPLES_DIR / run).glob("checkpoint-*")
    return sorted(directories, key=lambda path: int(path.name.split("-")[1]))


def test_probe_corpus_is_utf8_prose():
    text = (PROBE_DIR / "default.txt").read_bytes().decode("utf-8")
    paragraphs = text.split("\n\n")

    assert 200_000 <= len(text.encode("utf-8")) <= 1_000_000
    assert len(paragraphs) > 500
    assert "\n\n\n" not in text


def test_probe_metadata_files():
    metadata = json.loads((PROBE_DIR / "probe.json").read_text(encoding="utf-8"))

    assert set(metadata) == {"name", "source", "license"}
    assert (PROBE_DIR / "SOURCE.md").is_file()
    assert (PROBE_DIR / "LICENSE").is_file()


@pytest.mark.parametrize("run", RUNS)
def test_sample_run_checkpoint_steps(run):
    steps = [int(path.name.split("-")[1]) for path in checkpoint_dirs(run)]

    assert len(steps) >= 7
    assert steps[0] == 0


@pytest.mark.parametrize("run", RUNS)
def test_sample_tokenizer_round_trip(run):
    from transformers import AutoConfig, AutoTokenizer

    for directory in checkpoint_dirs(run):
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
        ids = tokenizer(ROUND_TRIP_TEXT)["input_ids"]

        assert config.vocab_size == len(tokenizer), directory
        assert max(ids) < config.vocab_size, directory
        assert tokenizer.decode(ids) == ROUND_TRIP_TEXT, directory


@pytest.mark.parametrize("run", RUNS)
def test_sample_trainer_state(run):
    for directory in checkpoint_dirs(run):
        step = int(directory.name.split("-")[1])
        state = json.loads((directory / "trainer_state.json").read_text(encoding="utf-8"))
        eval_steps = [entry["step"] for entry in state["log_history"] if "eval_loss" in entry]

        assert state["global_step"] == step
        assert eval_steps[-1] == step
        assert all(entry["step"] <= step for entry in state["log_history"])
        assert not (directory / "optimizer.pt").exists()


@pytest.mark.parametrize("run", RUNS)
def test_sample_model_learned(run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directories = checkpoint_dirs(run)
    tokenizer = AutoTokenizer.from_pretrained(directories[-1], local_files_only=True)
    text = (PROBE_DIR / "default.txt").read_text(encoding="utf-8")[:20_000]
    ids = torch.tensor(tokenizer(text)["input_ids"][: 16 * 128]).view(16, 128)

    losses = []
    for directory in (directories[0], directories[-1]):
        model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)
        model = model.float().eval()
        with torch.no_grad():
            losses.append(model(input_ids=ids, labels=ids).loss.item())

    assert losses[0] > 5.0
    assert losses[1] < losses[0] - 2.0
