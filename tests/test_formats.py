"""Every checkpoint format gives the metrics of the same weights saved as a plain safetensors directory.

The weights are one tiny GPT-2 (exact-erf GELU, as nanoGPT uses). Each test
writes them in one format, runs ``nerve analyze`` with a ``.npy`` probe and
compares every metric and the probe loss with the baseline run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from nerve_cli import formats
from nerve_cli.checkpoints import scan_run
from nerve_cli.cli import main
from nerve_cli.loading import load_checkpoint

COMPARED = [
    "layer",
    "se_pre",
    "se_post",
    "pr_pre",
    "pr_post",
    "eee_pre",
    "eee_post",
    "js",
    "probe_loss",
]
N_LAYER, N_EMBD, BLOCK_SIZE, VOCAB = 2, 32, 64, 128
CONV1D_WEIGHTS = (
    ".attn.c_attn.weight",
    ".attn.c_proj.weight",
    ".mlp.c_fc.weight",
    ".mlp.c_proj.weight",
)


def tiny_gpt2(bias: bool = True):
    """Return a random tiny GPT-2 in the nanoGPT layout (exact GELU, FFN width 4 x 32)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=N_LAYER,
        n_head=2,
        n_embd=N_EMBD,
        n_positions=BLOCK_SIZE,
        vocab_size=VOCAB,
        activation_function="gelu",
        initializer_range=0.2,
        bos_token_id=None,
        eos_token_id=None,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    if not bias:
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name.endswith(".bias"):
                    parameter.zero_()
    return model


def run_metrics(runner, run_dir: Path, out_dir: Path, probe: Path, *extra) -> pd.DataFrame:
    """Analyze ``run_dir`` and return its metrics sorted by step and layer."""
    result = runner.invoke(
        main, ["-q", "analyze", str(run_dir), "--out", str(out_dir), "--probe", str(probe), *extra]
    )
    assert result.exit_code == 0, result.output
    return (
        pd.read_parquet(out_dir / "metrics").sort_values(["step", "layer"]).reset_index(drop=True)
    )


def assert_same_metrics(actual: pd.DataFrame, expected: pd.DataFrame) -> None:
    """Check that every step of ``actual`` has the metrics of the single baseline step."""
    for step, rows in actual.groupby("step"):
        pd.testing.assert_frame_equal(
            rows[COMPARED].reset_index(drop=True),
            expected[COMPARED].reset_index(drop=True),
            check_exact=False,
            rtol=1e-9,
            obj=f"step {step}",
        )


def checkpoint_error(out_dir: Path) -> str:
    """Return the error recorded in run.json for the only checkpoint of a run."""
    (entry,) = json.loads((out_dir / "run.json").read_text())["checkpoints"]
    return entry["error"]


def state_dict_without_duplicates(model) -> dict[str, torch.Tensor]:
    """Return the state dict with the tied lm_head.weight dropped, as safetensors requires."""
    return {
        key: value.clone() for key, value in model.state_dict().items() if key != "lm_head.weight"
    }


def nanogpt_checkpoint(model, iter_num: int, bias: bool = True, key_prefix: str = "") -> dict:
    """Return ``model`` as nanoGPT's train.py saves it: Linear weights [out, in], a causal-mask buffer."""
    state_dict = {}
    for key, value in model.state_dict().items():
        if not bias and key.endswith(".bias"):
            continue
        state_dict[key_prefix + key] = (
            value.t().contiguous() if key.endswith(CONV1D_WEIGHTS) else value.clone()
        )
    mask = torch.tril(torch.ones(BLOCK_SIZE, BLOCK_SIZE)).view(1, 1, BLOCK_SIZE, BLOCK_SIZE)
    for layer in range(N_LAYER):
        state_dict[f"{key_prefix}transformer.h.{layer}.attn.bias"] = mask
    model_args = {
        "n_layer": N_LAYER,
        "n_head": 2,
        "n_embd": N_EMBD,
        "block_size": BLOCK_SIZE,
        "bias": bias,
        "vocab_size": VOCAB,
        "dropout": 0.0,
    }
    return {
        "model": state_dict,
        "optimizer": {"state": {}, "param_groups": [{"lr": 6e-4}]},
        "model_args": model_args,
        "iter_num": iter_num,
        "best_val_loss": torch.tensor(3.5),
        "config": {
            "dataset": "shakespeare_char",
            "compile": bool(key_prefix),
            "learning_rate": 6e-4,
        },
    }


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """The tiny GPT-2 saved with save_pretrained (model.safetensors), its probe and its metrics."""
    from click.testing import CliRunner

    root = tmp_path_factory.mktemp("baseline")
    model = tiny_gpt2()
    model.save_pretrained(root / "run")
    probe = root / "probe.npy"
    np.save(probe, np.random.default_rng(0).integers(0, VOCAB, size=(12, 16)))
    return model, probe, run_metrics(CliRunner(), root / "run", root / "out", probe)


def test_sharded_safetensors_directory(baseline, runner, tmp_path):
    model, probe, expected = baseline
    model.save_pretrained(tmp_path / "run", max_shard_size="40KB")

    actual = run_metrics(runner, tmp_path / "run", tmp_path / "out", probe)

    assert (tmp_path / "run" / formats.SAFETENSORS_INDEX).is_file()
    assert len(list((tmp_path / "run").glob("model-*-of-*.safetensors"))) > 1
    assert [ref.format for ref in scan_run(tmp_path / "run").checkpoints] == ["hf-sharded"]
    assert_same_metrics(actual, expected)


def test_pytorch_model_bin_directory(baseline, runner, tmp_path):
    model, probe, expected = baseline
    model.config.save_pretrained(tmp_path / "run")
    torch.save(model.state_dict(), tmp_path / "run" / "pytorch_model.bin")

    actual = run_metrics(runner, tmp_path / "run", tmp_path / "out", probe)

    assert [ref.format for ref in scan_run(tmp_path / "run").checkpoints] == ["hf-bin"]
    assert_same_metrics(actual, expected)


def test_sharded_pytorch_model_bin_directory(baseline, runner, tmp_path):
    model, probe, expected = baseline
    checkpoint = tmp_path / "run"
    model.config.save_pretrained(checkpoint)
    state_dict = model.state_dict()
    keys = list(state_dict)
    shards = {
        "pytorch_model-00001-of-00002.bin": keys[:10],
        "pytorch_model-00002-of-00002.bin": keys[10:],
    }
    for name, shard_keys in shards.items():
        torch.save({key: state_dict[key] for key in shard_keys}, checkpoint / name)
    weight_map = {key: name for name, shard_keys in shards.items() for key in shard_keys}
    (checkpoint / formats.PICKLE_INDEX).write_text(json.dumps({"weight_map": weight_map}))

    actual = run_metrics(runner, checkpoint, tmp_path / "out", probe)

    assert_same_metrics(actual, expected)


def test_safetensors_preferred_over_bin(baseline, tmp_path):
    model, _, _ = baseline
    model.save_pretrained(tmp_path / "run")
    (tmp_path / "run" / "pytorch_model.bin").write_bytes(b"not a pickle")

    assert [ref.format for ref in scan_run(tmp_path / "run").checkpoints] == ["hf"]


@pytest.mark.parametrize("stored", ["transformer.wte.weight", "lm_head.weight"])
def test_tied_embeddings_under_either_name(stored, baseline, runner, tmp_path):
    model, probe, expected = baseline
    checkpoint = tmp_path / "run"
    model.config.save_pretrained(checkpoint)
    state_dict = {key: value.clone() for key, value in model.state_dict().items()}
    dropped = "lm_head.weight" if stored == "transformer.wte.weight" else "transformer.wte.weight"
    del state_dict[dropped]
    save_file(state_dict, checkpoint / "model.safetensors", metadata={"format": "pt"})

    actual = run_metrics(runner, checkpoint, tmp_path / "out", probe)

    assert_same_metrics(actual, expected)


def test_bare_weight_files_beside_config(baseline, runner, tmp_path):
    model, probe, expected = baseline
    run_dir = tmp_path / "run"
    model.config.save_pretrained(run_dir)
    save_file(state_dict_without_duplicates(model), run_dir / "model_step_100.safetensors")
    torch.save(model.state_dict(), run_dir / "step_200.pt")
    compiled = {f"_orig_mod.{key}": value for key, value in model.state_dict().items()}
    torch.save({"model": compiled, "step": 300}, run_dir / "ckpt_300.pt")

    actual = run_metrics(runner, run_dir, tmp_path / "out", probe)

    refs = scan_run(run_dir).checkpoints
    assert [(ref.step, ref.format, ref.relative) for ref in refs] == [
        (100, "weights-file", "model_step_100.safetensors"),
        (200, "weights-file", "step_200.pt"),
        (300, "weights-file", "ckpt_300.pt"),
    ]
    assert sorted(actual["step"].unique()) == [100, 200, 300]
    assert_same_metrics(actual, expected)


def test_weight_file_missing_key_named(baseline, runner, tmp_path):
    model, probe, _ = baseline
    run_dir = tmp_path / "run"
    model.config.save_pretrained(run_dir)
    state_dict = state_dict_without_duplicates(model)
    del state_dict["transformer.h.1.mlp.c_fc.weight"]
    save_file(state_dict, run_dir / "step_100.safetensors")

    result = runner.invoke(
        main, ["-q", "analyze", str(run_dir), "--out", str(tmp_path / "out"), "--probe", str(probe)]
    )

    assert result.exit_code == 1
    error = checkpoint_error(tmp_path / "out")
    assert "step_100.safetensors: the weights do not fit the model" in error
    assert "missing transformer.h.1.mlp.c_fc.weight" in error


def test_weight_file_unexpected_key_named(baseline, runner, tmp_path):
    model, probe, _ = baseline
    run_dir = tmp_path / "run"
    model.config.save_pretrained(run_dir)
    state_dict = state_dict_without_duplicates(model)
    state_dict["transformer.h.0.mlp.gate.weight"] = torch.zeros(4, 4)
    save_file(state_dict, run_dir / "step_100.safetensors")

    result = runner.invoke(
        main, ["-q", "analyze", str(run_dir), "--out", str(tmp_path / "out"), "--probe", str(probe)]
    )

    assert result.exit_code == 1
    error = checkpoint_error(tmp_path / "out")
    assert "hold keys the model built from its config does not have" in error
    assert "transformer.h.0.mlp.gate.weight" in error


def test_nanogpt_checkpoint(baseline, runner, tmp_path):
    model, probe, expected = baseline
    run_dir = tmp_path / "out-shakespeare"
    run_dir.mkdir()
    torch.save(nanogpt_checkpoint(model, iter_num=500), run_dir / "ckpt.pt")

    actual = run_metrics(runner, run_dir, tmp_path / "out", probe)

    assert [(ref.step, ref.format) for ref in scan_run(run_dir).checkpoints] == [(500, "nanogpt")]
    assert actual["step"].unique().tolist() == [500]
    assert_same_metrics(actual, expected)


def test_nanogpt_compiled_in_step_directories(baseline, runner, tmp_path):
    model, probe, expected = baseline
    for step in (100, 200):
        (tmp_path / "run" / f"iter_{step}").mkdir(parents=True)
        checkpoint = nanogpt_checkpoint(model, iter_num=step, key_prefix="_orig_mod.")
        torch.save(checkpoint, tmp_path / "run" / f"iter_{step}" / "ckpt.pt")

    actual = run_metrics(runner, tmp_path / "run", tmp_path / "out", probe)

    assert sorted(actual["step"].unique()) == [100, 200]
    assert actual["checkpoint"].unique().tolist() == ["iter_100/ckpt.pt", "iter_200/ckpt.pt"]
    assert_same_metrics(actual, expected)


def test_nanogpt_without_bias(runner, tmp_path, baseline):
    _, probe, _ = baseline
    model = tiny_gpt2(bias=False)
    model.save_pretrained(tmp_path / "hf")
    expected = run_metrics(runner, tmp_path / "hf", tmp_path / "out-hf", probe)
    (tmp_path / "nano").mkdir()
    torch.save(nanogpt_checkpoint(model, iter_num=7, bias=False), tmp_path / "nano" / "ckpt.pt")

    actual = run_metrics(runner, tmp_path / "nano", tmp_path / "out-nano", probe)

    assert_same_metrics(actual, expected)


def nanogpt_reference_logits(checkpoint: dict, token_ids: torch.Tensor) -> torch.Tensor:
    """nanoGPT's forward pass (model.py, GPT.forward in eval) written out on its own state dict."""
    import torch.nn.functional as F

    weights, args = checkpoint["model"], checkpoint["model_args"]
    n_embd, n_head = args["n_embd"], args["n_head"]
    batch, length = token_ids.shape

    def bias(name):
        return weights.get(name)

    def layer_norm(x, prefix):
        return F.layer_norm(x, (n_embd,), weights[f"{prefix}.weight"], bias(f"{prefix}.bias"), 1e-5)

    x = weights["transformer.wte.weight"][token_ids] + weights["transformer.wpe.weight"][:length]
    for layer in range(args["n_layer"]):
        prefix = f"transformer.h.{layer}"
        h = layer_norm(x, f"{prefix}.ln_1")
        qkv = F.linear(
            h, weights[f"{prefix}.attn.c_attn.weight"], bias(f"{prefix}.attn.c_attn.bias")
        )
        q, k, v = (
            t.view(batch, length, n_head, -1).transpose(1, 2) for t in qkv.split(n_embd, dim=2)
        )
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        attended = attended.transpose(1, 2).reshape(batch, length, n_embd)
        x = x + F.linear(
            attended, weights[f"{prefix}.attn.c_proj.weight"], bias(f"{prefix}.attn.c_proj.bias")
        )
        h = layer_norm(x, f"{prefix}.ln_2")
        h = F.gelu(
            F.linear(h, weights[f"{prefix}.mlp.c_fc.weight"], bias(f"{prefix}.mlp.c_fc.bias"))
        )
        x = x + F.linear(
            h, weights[f"{prefix}.mlp.c_proj.weight"], bias(f"{prefix}.mlp.c_proj.bias")
        )
    x = layer_norm(x, "transformer.ln_f")
    return F.linear(x, weights["lm_head.weight"])


@pytest.mark.parametrize("bias", [True, False])
def test_nanogpt_mapping_matches_reference_forward(bias, tmp_path):
    """The GPT-2 model nerve builds from a ckpt.pt computes nanoGPT's logits."""
    torch.manual_seed(1)
    nano_weights = {}
    for key, value in tiny_gpt2(bias=bias).state_dict().items():
        nano_weights[key] = value.t().contiguous() if key.endswith(CONV1D_WEIGHTS) else value
    nano_weights = {key: torch.randn_like(value) * 0.3 for key, value in nano_weights.items()}
    nano_weights["lm_head.weight"] = nano_weights["transformer.wte.weight"]
    if not bias:
        nano_weights = {
            key: value for key, value in nano_weights.items() if not key.endswith(".bias")
        }
    checkpoint = {
        **nanogpt_checkpoint(tiny_gpt2(bias=bias), iter_num=1, bias=bias),
        "model": nano_weights,
    }
    torch.save(checkpoint, tmp_path / "ckpt.pt")
    token_ids = torch.randint(0, VOCAB, (2, 16))

    loaded = load_checkpoint(tmp_path / "ckpt.pt", torch.device("cpu"), "float32")

    with torch.no_grad():
        logits = loaded.model(input_ids=token_ids).logits
        expected = nanogpt_reference_logits(checkpoint, token_ids)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_nanogpt_needs_token_probe(baseline, runner, tmp_path):
    model, _, _ = baseline
    torch.save(nanogpt_checkpoint(model, iter_num=5), tmp_path / "ckpt.pt")

    result = runner.invoke(main, ["-q", "analyze", str(tmp_path), "--out", str(tmp_path / "out")])

    assert result.exit_code == 2
    assert "nanoGPT checkpoints carry no tokenizer" in result.stderr
    assert ".npy" in result.stderr


def test_adapter_only_checkpoint_is_skipped(baseline, runner, tmp_path, caplog):
    model, probe, expected = baseline
    model.save_pretrained(tmp_path / "run" / "checkpoint-10")
    adapter = tmp_path / "run" / "checkpoint-20"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    save_file(
        {"base_model.model.lm_head.lora_A.weight": torch.zeros(4, N_EMBD)},
        adapter / "adapter_model.safetensors",
    )
    (adapter / "trainer_state.json").write_text(json.dumps({"global_step": 20}))

    with caplog.at_level(logging.WARNING):
        actual = run_metrics(runner, tmp_path / "run", tmp_path / "out", probe)

    assert actual["step"].unique().tolist() == [10]
    skipped = [
        record.getMessage() for record in caplog.records if "checkpoint-20" in record.getMessage()
    ]
    assert len(skipped) == 1
    assert "skipped, holds only a parameter-efficient adapter (adapter_config.json)" in skipped[0]
    assert_same_metrics(actual, expected)


def test_adapter_only_run_is_usage_error(runner, tmp_path):
    adapter = tmp_path / "run" / "checkpoint-20"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")

    result = runner.invoke(
        main, ["-q", "analyze", str(tmp_path / "run"), "--out", str(tmp_path / "out")]
    )

    assert result.exit_code == 2
    assert (
        "no checkpoint can be analyzed: checkpoint-20 holds only a parameter-efficient adapter"
        in result.stderr
    )


def test_weight_file_without_config_is_skipped(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_file({"weight": torch.zeros(2)}, run_dir / "model_step_5.safetensors")
    save_file({"weight": torch.zeros(2)}, run_dir / "model_step_6.safetensors")
    (run_dir / "checkpoint-1").mkdir()
    (run_dir / "checkpoint-1" / "config.json").write_text("{}")
    (run_dir / "checkpoint-1" / "model.safetensors").write_bytes(b"")

    scan = scan_run(run_dir)

    assert [ref.relative for ref in scan.checkpoints] == ["checkpoint-1"]
    assert [item.relative for item in scan.skipped] == [
        "model_step_5.safetensors",
        "model_step_6.safetensors",
    ]
    assert "no config.json beside it" in scan.skipped[0].reason
