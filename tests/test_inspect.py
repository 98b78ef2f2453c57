"""``nerve inspect``: checkpoints, formats, skipped paths and the FFN modules, without the probe."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from nerve_cli.cli import main

from .tiny_families import build_tiny_model


def inspect(runner, run_dir, *extra):
    return runner.invoke(main, ["inspect", str(run_dir), *extra])


def test_inspect_gpt2_lists_checkpoints_and_modules(runner, tmp_path):
    model = build_tiny_model("gpt2")
    model.save_pretrained(tmp_path / "run" / "checkpoint-100")
    model.save_pretrained(tmp_path / "run" / "checkpoint-20", max_shard_size="40KB")
    adapter = tmp_path / "run" / "checkpoint-300"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")

    result = inspect(runner, tmp_path / "run")

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"Run: {tmp_path / 'run'} (2 checkpoints, 1 skipped)"
    assert lines[1].split() == ["step", "format", "checkpoint"]
    assert lines[2].split() == ["20", "hf-sharded", "checkpoint-20"]
    assert lines[3].split() == ["100", "hf", "checkpoint-100"]
    assert lines[5].startswith("  checkpoint-300: holds only a parameter-efficient adapter")
    assert "Model of checkpoint-20: gpt2 (GPT2LMHeadModel, causal LM, probe loss measured)" in lines
    assert "FFN: plain, 2 blocks, width 64; modules from nerve's family table" in lines
    assert lines[-1].split() == [
        "1",
        "transformer.h.1.mlp.c_fc",
        "(64)",
        "transformer.h.1.mlp.c_proj",
        "(64)",
    ]


def test_inspect_phi3_fused_gate_half(runner, tmp_path):
    build_tiny_model("phi3").save_pretrained(tmp_path / "run")

    result = inspect(runner, tmp_path / "run")

    assert result.exit_code == 0, result.output
    assert "FFN: fused_gated, 2 blocks, width 64" in result.stdout
    assert "model.layers.0.mlp.gate_up_proj[..., 0:64] (gate half of 128)" in result.stdout
    assert "model.layers.0.mlp.down_proj (64)" in result.stdout


def test_inspect_gated_shows_up_projection(runner, tmp_path):
    build_tiny_model("llama").save_pretrained(tmp_path / "run")

    result = inspect(runner, tmp_path / "run")

    assert result.exit_code == 0, result.output
    assert "up (not measured)" in result.stdout
    assert result.stdout.splitlines()[-1].split()[-1] == "model.layers.1.mlp.up_proj"


def test_inspect_encoder_has_no_probe_loss(runner, tmp_path):
    build_tiny_model("bert").save_pretrained(tmp_path / "run")

    result = inspect(runner, tmp_path / "run")

    assert "bert (BertModel, encoder, no probe loss)" in result.stdout
    assert "encoder.layer.0.intermediate.dense (64)" in result.stdout
    assert "encoder.layer.0.output.dense (64)" in result.stdout


def test_inspect_reads_no_weights(runner, tmp_path):
    build_tiny_model("gpt2").save_pretrained(tmp_path / "run")
    (tmp_path / "run" / "model.safetensors").write_bytes(b"truncated")

    result = inspect(runner, tmp_path / "run")

    assert result.exit_code == 0, result.output


def test_inspect_json(runner, tmp_path):
    build_tiny_model("phi3").save_pretrained(tmp_path / "run" / "step_5")

    result = inspect(runner, tmp_path / "run", "--format", "json")

    data = json.loads(result.stdout)
    assert data["checkpoints"] == [{"step": 5, "format": "hf", "checkpoint": "step_5"}]
    assert data["model_type"] == "phi3"
    assert data["source"] == "registry"
    assert data["layers"][1]["pre_columns"] == [0, 64]
    assert data["layers"][1]["pre_width"] == 128


def test_inspect_override(runner, tmp_path):
    build_tiny_model("gpt2").save_pretrained(tmp_path / "run")
    patterns = ["--ffn-up", "h.{layer}.mlp.c_fc", "--ffn-down", "h.{layer}.mlp.c_proj"]

    result = inspect(runner, tmp_path / "run", *patterns)

    assert result.exit_code == 0, result.output
    assert "modules from --ffn-up/--ffn-down" in result.stdout


def test_inspect_unsupported_family_fails(runner, tmp_path):
    from transformers import AutoConfig

    AutoConfig.for_model("mixtral").save_pretrained(tmp_path / "run")

    result = inspect(runner, tmp_path / "run")

    assert result.exit_code == 2
    assert "  0     hf      ." in result.stdout
    assert "not measurable" in result.stdout
    assert result.stderr.startswith("Error: ")
    assert "model_type 'mixtral' is a mixture-of-experts family" in result.stderr


def test_inspect_nanogpt(runner, tmp_path):
    model_args = {
        "n_layer": 2,
        "n_head": 2,
        "n_embd": 32,
        "block_size": 64,
        "bias": False,
        "vocab_size": 128,
    }
    weights = {"transformer.wte.weight": torch.zeros(128, 32)}
    torch.save(
        {"model": weights, "model_args": model_args, "iter_num": 250, "config": {}},
        tmp_path / "ckpt.pt",
    )

    result = inspect(runner, tmp_path)

    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[2].split() == ["250", "nanogpt", "ckpt.pt"]
    assert "Model of ckpt.pt: gpt2 (GPT2LMHeadModel" in result.stdout
    assert "FFN: plain, 2 blocks, width 128" in result.stdout


def test_inspect_bare_weight_files(runner, tmp_path):
    model = build_tiny_model("gpt2")
    model.config.save_pretrained(tmp_path)
    weights = {key: value for key, value in model.state_dict().items() if key != "lm_head.weight"}
    save_file(weights, tmp_path / "model_step_100.safetensors")
    torch.save(model.state_dict(), tmp_path / "step_200.pt")

    result = inspect(runner, tmp_path)

    rows = [line.split() for line in result.stdout.splitlines()[2:4]]
    assert rows == [
        ["100", "weights-file", "model_step_100.safetensors"],
        ["200", "weights-file", "step_200.pt"],
    ]
