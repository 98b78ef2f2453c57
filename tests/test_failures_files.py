"""Broken checkpoint files are named, with what they are, before any model is built.

Each test builds the broken input the way real failures leave it. Examples
are a Git LFS pointer in place of weights, a file cut short by an interrupted
copy, a sharded checkpoint with a shard missing, a pickle that would run code,
and a config.json that is missing or wrong.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from nerve_cli.cli import main
from nerve_cli.errors import CheckpointError
from nerve_cli.safe_load import UnsafeCheckpointError, load_torch_file
from nerve_cli.validation import check_checkpoint
from tests.checkpoint_builders import (
    LFS_POINTER,
    build_tiny_gpt2,
    checkpoint_entries,
    copy_tree,
    save_model,
    save_probe,
    truncate_file,
)


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A complete single-file checkpoint, copied by each test that breaks it."""
    return save_model(build_tiny_gpt2(), tmp_path_factory.mktemp("template") / "checkpoint")


@pytest.fixture(scope="module")
def sharded_template(tmp_path_factory) -> Path:
    """A complete checkpoint saved as three safetensors shards with an index."""
    directory = tmp_path_factory.mktemp("sharded") / "checkpoint"
    return save_model(build_tiny_gpt2(), directory, max_shard_size="40KB")


@pytest.fixture
def checkpoint(template, tmp_path) -> Path:
    return copy_tree(template, tmp_path / "run" / "checkpoint-10")


@pytest.fixture
def bin_checkpoint(template, tmp_path) -> Path:
    """A checkpoint whose weights are a zip-format pytorch_model.bin."""
    directory = copy_tree(template, tmp_path / "bin-run" / "checkpoint-10")
    (directory / "model.safetensors").unlink()
    torch.save(build_tiny_gpt2().state_dict(), directory / "pytorch_model.bin")
    return directory


def validation_message(path: Path, format: str = "hf") -> str:
    """Return the one-line CheckpointError that validation raises for ``path``."""
    with pytest.raises(CheckpointError) as caught:
        check_checkpoint(path, format)
    message = str(caught.value)
    assert "\n" not in message
    return message


def run_analyze(run_dir: Path, out_dir: Path, probe: Path):
    return CliRunner().invoke(
        main,
        ["-q", "analyze", str(run_dir), "--out", str(out_dir), "--probe", str(probe)],
        catch_exceptions=False,
    )


# Case 1: a weight file that is a Git LFS pointer, empty, or random bytes.


@pytest.mark.parametrize(
    "fixture_name, weight_name",
    [
        ("checkpoint", "model.safetensors"),
        ("bin_checkpoint", "pytorch_model.bin"),
    ],
)
def test_lfs_pointer_named(request, fixture_name, weight_name):
    directory = request.getfixturevalue(fixture_name)
    weights = directory / weight_name
    weights.write_text(LFS_POINTER)

    message = validation_message(directory)

    assert message.startswith(f"{weights}: Git LFS pointer, not weights")
    assert "git lfs pull" in message


@pytest.mark.parametrize(
    "fixture_name, weight_name",
    [
        ("checkpoint", "model.safetensors"),
        ("bin_checkpoint", "pytorch_model.bin"),
    ],
)
def test_empty_weight_file_named(request, fixture_name, weight_name):
    directory = request.getfixturevalue(fixture_name)
    weights = directory / weight_name
    weights.write_bytes(b"")

    message = validation_message(directory)

    assert message.startswith(f"{weights}: empty file (0 bytes)")


def test_random_bytes_not_safetensors(checkpoint):
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(np.random.default_rng(1).bytes(8))

    message = validation_message(checkpoint)

    assert message.startswith(f"{weights}: not a safetensors file")


def test_random_bytes_not_pytorch_file(bin_checkpoint):
    weights = bin_checkpoint / "pytorch_model.bin"
    weights.write_bytes(np.random.default_rng(1).bytes(8))

    message = validation_message(bin_checkpoint)

    assert message.startswith(
        f"{weights}: not a PyTorch weight file (neither a zip archive nor a pickle)"
    )


def test_zero_filled_file_named(checkpoint):
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(bytes(weights.stat().st_size))

    message = validation_message(checkpoint)

    assert "bytes are all zero" in message


def test_complete_checkpoints_pass(checkpoint, bin_checkpoint, sharded_template):
    check_checkpoint(checkpoint)
    check_checkpoint(bin_checkpoint)
    check_checkpoint(sharded_template)


# Case 2: a safetensors file cut to half its size, or with bytes appended.


def test_truncated_safetensors_sizes(checkpoint):
    weights = checkpoint / "model.safetensors"
    full_size = weights.stat().st_size
    truncate_file(weights, full_size // 2)

    message = validation_message(checkpoint)

    assert message == (
        f"{weights}: truncated safetensors file, expected {full_size} bytes from its header, "
        f"found {full_size // 2}; copy or save it again"
    )


def test_truncated_inside_header(checkpoint):
    weights = checkpoint / "model.safetensors"
    truncate_file(weights, 100)

    message = validation_message(checkpoint)

    assert message.startswith(f"{weights}: truncated safetensors file, expected at least")
    assert message.endswith("found 100; copy or save it again")


def test_appended_bytes_sizes(checkpoint):
    weights = checkpoint / "model.safetensors"
    full_size = weights.stat().st_size
    with open(weights, "ab") as handle:
        handle.write(b"\0" * 16)

    message = validation_message(checkpoint)

    assert message.startswith(f"{weights}: safetensors file has 16 bytes after its data")
    assert f"expected {full_size} bytes from its header, found {full_size + 16}" in message


def test_truncated_file_never_loaded(checkpoint, tmp_path, load_spy):
    """The check runs before transformers opens the file, so its own message never appears."""
    weights = checkpoint / "model.safetensors"
    truncate_file(weights, weights.stat().st_size // 2)

    result = run_analyze(checkpoint.parent, tmp_path / "out", save_probe(tmp_path / "probe.npy"))

    assert result.exit_code == 1
    assert load_spy.paths == []
    error = checkpoint_entries(tmp_path / "out")[10]["error"]
    assert error.startswith(f"{weights}: truncated safetensors file")


# Case 3: a sharded checkpoint with a missing shard or an index that does not match.


@pytest.fixture
def sharded(sharded_template, tmp_path) -> Path:
    return copy_tree(sharded_template, tmp_path / "run" / "checkpoint-20")


def test_missing_shard_named(sharded):
    index = sharded / "model.safetensors.index.json"
    (sharded / "model-00002-of-00003.safetensors").unlink()

    message = validation_message(sharded)

    assert message.startswith(f"{index}: shard model-00002-of-00003.safetensors not found")


def test_misplaced_tensor_named(sharded):
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    moved = next(
        name
        for name, shard in index["weight_map"].items()
        if shard == "model-00001-of-00003.safetensors"
    )
    index["weight_map"][moved] = "model-00002-of-00003.safetensors"
    index_path.write_text(json.dumps(index))

    message = validation_message(sharded)

    assert message.startswith(
        f"{index_path}: tensor {moved!r} is mapped to model-00002-of-00003.safetensors, "
        "which does not contain it"
    )


def test_truncated_shard_named(sharded):
    shard = sharded / "model-00003-of-00003.safetensors"
    truncate_file(shard, shard.stat().st_size - 1)

    message = validation_message(sharded)

    assert message.startswith(f"{shard}: truncated safetensors file")


def test_broken_shards_fail_before_build(sharded_template, tmp_path, load_spy):
    run_dir = tmp_path / "run"
    copy_tree(sharded_template, run_dir / "checkpoint-10")
    missing = copy_tree(sharded_template, run_dir / "checkpoint-20")
    (missing / "model-00003-of-00003.safetensors").unlink()

    result = run_analyze(run_dir, tmp_path / "out", save_probe(tmp_path / "probe.npy"))

    assert result.exit_code == 1
    assert load_spy.paths == [run_dir / "checkpoint-10"]
    entries = checkpoint_entries(tmp_path / "out")
    assert entries[10]["status"] == "done"
    assert entries[20]["status"] == "failed"
    assert "shard model-00003-of-00003.safetensors not found" in entries[20]["error"]


# Case 6: pickles are read only with weights_only=True.


class RunsShellCommand:
    """A pickle payload that runs a shell command when unpickled without restriction."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class CustomObject:
    """A class from outside torch's allowlist, as an arbitrary training script might pickle."""


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_code_running_pickle_rejected(bin_checkpoint, tmp_path, zip_format):
    weights = bin_checkpoint / "pytorch_model.bin"
    marker = tmp_path / "code-ran"
    payload = {"transformer.wte.weight": torch.zeros(2), "hook": RunsShellCommand(marker)}
    torch.save(payload, weights, _use_new_zipfile_serialization=zip_format)

    message = validation_message(bin_checkpoint)

    rejected = f"{os.system.__module__}.system"
    assert message.startswith(f"{weights}: rejected, the pickle needs global {rejected}")
    assert not marker.exists()


def test_custom_class_rejected(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {}, "extra": CustomObject()}, path)

    with pytest.raises(UnsafeCheckpointError) as caught:
        load_torch_file(path)

    rejected = f"{CustomObject.__module__}.{CustomObject.__qualname__}"
    assert str(caught.value).startswith(f"{path}: rejected, the pickle needs global {rejected}")


def test_torch_load_always_restricted(bin_checkpoint, tmp_path, monkeypatch):
    """Every torch.load call, also after a rejection, passes weights_only=True."""
    weights = bin_checkpoint / "pytorch_model.bin"
    torch.save({"hook": RunsShellCommand(tmp_path / "code-ran")}, weights)
    calls = []
    original_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return original_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    with pytest.raises(UnsafeCheckpointError):
        check_checkpoint(bin_checkpoint)

    assert calls
    assert all(value is True for value in calls)


def test_numpy_scalars_allowed(tmp_path):
    """nanoGPT saves iter_num and best_val_loss as numpy scalars; they load unchanged."""
    path = tmp_path / "ckpt.pt"
    scalars = {
        "iter_num": np.int64(5000),
        "best_val_loss": np.float64(2.75),
        "lr": np.float32(6e-4),
        "loss_scale": np.float16(1024),
        "epoch": np.int32(3),
        "flags": np.uint8(1),
        "decayed": np.bool_(True),
    }
    torch.save({"model": build_tiny_gpt2().state_dict(), **scalars}, path)

    loaded = load_torch_file(path)
    check_checkpoint(path, "nanogpt")

    for name, value in scalars.items():
        assert type(loaded[name]) is type(value), name
        assert loaded[name] == value, name


def test_numpy_array_rejected(tmp_path):
    """Arrays need numpy's _reconstruct, which is not on the allowlist: only scalars pass."""
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {}, "history": np.arange(3.0)}, path)

    with pytest.raises(UnsafeCheckpointError, match="rejected, the pickle needs global numpy"):
        load_torch_file(path)


def test_truncated_zip_named(bin_checkpoint):
    weights = bin_checkpoint / "pytorch_model.bin"
    truncate_file(weights, weights.stat().st_size // 2)

    message = validation_message(bin_checkpoint)

    assert message.startswith(f"{weights}: truncated or corrupt zip archive")


def test_trainer_state_files_ignored(checkpoint, tmp_path):
    """training_args.bin pickles a TrainingArguments object; it is not weights and never opened."""
    torch.save({"args": CustomObject()}, checkpoint / "training_args.bin")
    (checkpoint / "optimizer.pt").write_bytes(b"")

    check_checkpoint(checkpoint)


# Case 7: config.json missing, not JSON, or naming an unknown model_type.


def test_lfs_pointer_config_named(checkpoint):
    (checkpoint / "config.json").write_text(LFS_POINTER)

    message = validation_message(checkpoint)

    assert message.startswith(f"{checkpoint / 'config.json'}: Git LFS pointer, not JSON")


def test_missing_config_named(checkpoint):
    (checkpoint / "config.json").unlink()

    message = validation_message(checkpoint)

    assert message.startswith(f"{checkpoint / 'config.json'}: not found")


def test_config_not_json_named(checkpoint):
    (checkpoint / "config.json").write_text('{"model_type": "gpt2",\n  n_layer: 2}')

    message = validation_message(checkpoint)

    assert message.startswith(f"{checkpoint / 'config.json'}: invalid JSON at line 2 column 3")


def test_unknown_model_type_named(checkpoint):
    config_path = checkpoint / "config.json"
    config = json.loads(config_path.read_text())
    config["model_type"] = "gpt9"
    config_path.write_text(json.dumps(config))

    message = validation_message(checkpoint)

    assert message.startswith(
        f"""{config_path}: field "model_type" is 'gpt9', which transformers"""
    )


def test_missing_model_type_named(checkpoint):
    config_path = checkpoint / "config.json"
    config = json.loads(config_path.read_text())
    del config["model_type"]
    config_path.write_text(json.dumps(config))

    message = validation_message(checkpoint)

    assert message.startswith(f'{config_path}: field "model_type" is missing')


@pytest.mark.parametrize(
    "config_text, expected",
    [
        (None, "config.json: not found"),
        ("not json", "config.json: invalid JSON at line 1 column 1"),
        ('{"model_type": "gpt9"}', """config.json: field "model_type" is 'gpt9'"""),
    ],
    ids=["missing", "not-json", "unknown-model-type"],
)
def test_config_error_one_line(checkpoint, tmp_path, load_spy, config_text, expected):
    """A run whose only checkpoint has a broken config stops with exit 2 and one line."""
    config_path = checkpoint / "config.json"
    if config_text is None:
        config_path.unlink()
    else:
        config_path.write_text(config_text)

    result = run_analyze(checkpoint.parent, tmp_path / "out", save_probe(tmp_path / "probe.npy"))

    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"Error: {checkpoint / expected}")
    assert load_spy.paths == []
    assert not (tmp_path / "out").exists()


def test_broken_first_config_skipped(template, tmp_path, load_spy):
    """The probe is checked against the first checkpoint whose config loads."""
    run_dir = tmp_path / "run"
    broken = copy_tree(template, run_dir / "checkpoint-10")
    (broken / "config.json").write_text("{")
    copy_tree(template, run_dir / "checkpoint-20")

    result = run_analyze(run_dir, tmp_path / "out", save_probe(tmp_path / "probe.npy"))

    assert result.exit_code == 1
    entries = checkpoint_entries(tmp_path / "out")
    assert entries[10]["error"].startswith(f"{broken / 'config.json'}: invalid JSON")
    assert entries[20]["status"] == "done"
    assert load_spy.paths == [run_dir / "checkpoint-20"]
    shutil.rmtree(run_dir)
