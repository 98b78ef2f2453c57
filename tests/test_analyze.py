"""``nerve analyze`` end to end on tiny real checkpoints.

The metrics are checked against an independent computation: full activations
captured with plain hooks on the same token ids, ``numpy.cov`` in float64,
``numpy.linalg.eigvalsh`` and the formulas written out here. Tolerance 1e-4
relative, the contract for analyze; in practice the agreement is ~1e-10.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from nerve_cli import store
from nerve_cli.cli import main

from .conftest import save_tiny_gpt2_run

EXPECTED_METRICS_COLUMNS = {
    "run": "string",
    "step": "int64",
    "checkpoint": "string",
    "layer": "int32",
    "ffn_dim": "int32",
    "n_tokens": "int64",
    "se_pre": "double",
    "se_post": "double",
    "pr_pre": "double",
    "pr_post": "double",
    "eee_pre": "double",
    "eee_post": "double",
    "js": "double",
    "pr_gain": "double",
    "eee_delta": "double",
    "se_delta": "double",
    "probe_loss": "double",
    "eval_loss": "double",
    "rank_limited": "bool",
    "null_reason": "string",
}


def run_analyze(runner, run_dir, out_dir, probe, *extra):
    result = runner.invoke(
        main, ["-q", "analyze", str(run_dir), "--out", str(out_dir), "--probe", str(probe), *extra]
    )
    return result


def test_analyze_writes_tables_with_schema(runner, tiny_run, token_probe, tmp_path):
    out = tmp_path / "out"

    result = run_analyze(runner, tiny_run, out, token_probe)

    assert result.exit_code == 0, result.output
    schema = pq.read_schema(out / "metrics" / store.checkpoint_file_name(10))
    assert {field.name: str(field.type) for field in schema} == EXPECTED_METRICS_COLUMNS
    metrics = pd.read_parquet(out / "metrics")
    assert len(metrics) == 2 * 2
    assert sorted(metrics["step"].unique().tolist()) == [0, 10]
    assert metrics["n_tokens"].unique().tolist() == [12 * 32]
    assert not metrics["rank_limited"].any()
    spectra = pd.read_parquet(out / "spectra")
    assert len(spectra) == 2 * 2 * 2
    assert set(spectra["point"]) == {"pre", "post"}
    assert all(len(values) == 64 for values in spectra["eigenvalues"])


def test_analyze_run_json_records_probe_and_checkpoints(runner, tiny_run, token_probe, tmp_path):
    out = tmp_path / "out"

    run_analyze(runner, tiny_run, out, token_probe)

    info = json.loads((out / "run.json").read_text())
    assert info["model_type"] == "gpt2"
    assert info["ffn_dim"] == 64
    assert info["n_layers"] == 2
    assert info["probe"]["n_tokens"] == 12 * 32
    assert len(info["probe"]["sha256"]) == 64
    assert [entry["step"] for entry in info["checkpoints"]] == [0, 10]
    assert {entry["status"] for entry in info["checkpoints"]} == {"done"}


def test_rerun_skips_and_force_recomputes(runner, tiny_run, token_probe, tmp_path):
    out = tmp_path / "out"
    run_analyze(runner, tiny_run, out, token_probe)
    metrics_file = out / "metrics" / store.checkpoint_file_name(0)
    first_mtime = metrics_file.stat().st_mtime_ns

    again = run_analyze(runner, tiny_run, out, token_probe)
    assert again.exit_code == 0
    assert "0 analyzed, 2 skipped" in again.output
    assert metrics_file.stat().st_mtime_ns == first_mtime
    assert len(pd.read_parquet(out / "metrics")) == 4

    forced = run_analyze(runner, tiny_run, out, token_probe, "--force")
    assert "2 analyzed, 0 skipped" in forced.output
    assert metrics_file.stat().st_mtime_ns != first_mtime
    assert len(pd.read_parquet(out / "metrics")) == 4


def test_steps_option_selects_subset(runner, tiny_run, token_probe, tmp_path):
    out = tmp_path / "out"

    result = run_analyze(runner, tiny_run, out, token_probe, "--steps", "10")

    assert result.exit_code == 0
    assert pd.read_parquet(out / "metrics")["step"].unique().tolist() == [10]


def test_unknown_step_is_usage_error(runner, tiny_run, token_probe, tmp_path):
    result = run_analyze(runner, tiny_run, tmp_path / "out", token_probe, "--steps", "7")

    assert result.exit_code == 2
    assert "no checkpoint for step(s) 7" in result.output


def test_eval_loss_is_nearest_logged_value(runner, tmp_path, token_probe):
    run_dir = save_tiny_gpt2_run(tmp_path / "run", steps=(0, 12))
    out = tmp_path / "out"

    run_analyze(runner, run_dir, out, token_probe)

    metrics = pd.read_parquet(out / "metrics")
    by_step = metrics.groupby("step")["eval_loss"].first()
    # Logged every 5 steps: step 12 takes the entry of step 10.
    assert by_step[0] == pytest.approx(5.0)
    assert by_step[12] == pytest.approx(5.0 - 10 / 100)


def independent_reference(checkpoint_dir, token_ids):
    """Capture full activations with plain hooks and compute every metric in numpy."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=torch.float32).eval()
    captured = {}

    def keep(name):
        def hook(module, inputs, output=None):
            value = output if output is not None else inputs[0]
            captured.setdefault(name, []).append(
                value.detach().double().reshape(-1, value.shape[-1]).numpy()
            )

        return hook

    handles = []
    for layer, block in enumerate(model.transformer.h):
        handles.append(block.mlp.c_fc.register_forward_hook(keep(("pre", layer))))
        handles.append(block.mlp.c_proj.register_forward_pre_hook(keep(("post", layer))))
    with torch.no_grad():
        ids = torch.from_numpy(token_ids)
        loss = model(input_ids=ids, labels=ids).loss.item()
    for handle in handles:
        handle.remove()

    reference = {}
    for layer in range(len(model.transformer.h)):
        spectra = {}
        for point in ("pre", "post"):
            x = np.concatenate(captured[(point, layer)])
            eigenvalues = np.clip(np.linalg.eigvalsh(np.cov(x, rowvar=False)), 0, None)[::-1]
            spectra[point] = eigenvalues / eigenvalues.sum()
        reference[layer] = {
            **reference_metrics(spectra["pre"], "pre"),
            **reference_metrics(spectra["post"], "post"),
        }
        m = 0.5 * (spectra["pre"] + spectra["post"])
        reference[layer]["js"] = 0.5 * kl(spectra["pre"], m) + 0.5 * kl(spectra["post"], m)
    return reference, loss


def reference_metrics(p, point):
    d = p.size
    positive = p[p > 0]
    eee = np.sum(np.cumsum(p) - np.arange(1, d + 1) / d) / (d / 2)
    return {
        f"se_{point}": float(-(positive * np.log(positive)).sum()),
        f"pr_{point}": float(1.0 / (p**2).sum()),
        f"eee_{point}": float(min(max(eee, 0.0), 1.0)),
    }


def kl(p, q):
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def test_metrics_match_independent_computation(runner, tiny_run, token_probe, tmp_path):
    out = tmp_path / "out"
    run_analyze(runner, tiny_run, out, token_probe)
    metrics = pd.read_parquet(out / "metrics")
    token_ids = np.load(token_probe)

    for step in (0, 10):
        reference, loss = independent_reference(tiny_run / f"checkpoint-{step}", token_ids)
        rows = metrics[metrics["step"] == step].set_index("layer")
        for layer, expected in reference.items():
            for column, value in expected.items():
                assert rows.loc[layer, column] == pytest.approx(value, rel=1e-4, abs=1e-12), (
                    step,
                    layer,
                    column,
                )
        assert rows["probe_loss"].iloc[0] == pytest.approx(loss, rel=1e-5)


def test_derived_columns_follow_definitions(runner, tiny_run, token_probe, tmp_path):
    out = tmp_path / "out"
    run_analyze(runner, tiny_run, out, token_probe)
    metrics = pd.read_parquet(out / "metrics")

    assert np.allclose(metrics["pr_gain"], metrics["pr_post"] / metrics["pr_pre"], rtol=1e-12)
    assert np.allclose(metrics["eee_delta"], metrics["eee_post"] - metrics["eee_pre"], rtol=1e-12)
    assert np.allclose(metrics["se_delta"], metrics["se_post"] - metrics["se_pre"], rtol=1e-12)
    assert (metrics["js"] >= 0).all()
    assert (metrics["js"] <= math.log(2)).all()
    assert (metrics["se_pre"] <= math.log(64) + 1e-12).all()


def test_rank_limited_when_tokens_below_width(runner, tiny_run, tmp_path):
    probe = tmp_path / "short.npy"
    np.save(probe, np.random.default_rng(3).integers(0, 100, size=(2, 16)))  # 32 tokens < width 64
    out = tmp_path / "out"

    result = run_analyze(runner, tiny_run, out, probe)

    assert result.exit_code == 0
    metrics = pd.read_parquet(out / "metrics")
    assert metrics["rank_limited"].all()
    assert metrics["se_pre"].notna().all()
    assert (metrics["pr_pre"] <= 32).all()


@pytest.mark.slow
def test_sample_run_end_to_end(runner, tmp_path):
    """The README's main job on a shipped, really trained run, with a shorter probe."""
    from .conftest import SAMPLE_RUNS

    run_dir = SAMPLE_RUNS / "gpt2-gelu"
    steps = sorted(int(path.name.split("-")[1]) for path in run_dir.glob("checkpoint-*"))
    out = tmp_path / "gelu"
    selected = f"{steps[0]},{steps[-1]}"

    result = runner.invoke(
        main,
        [
            "-q",
            "analyze",
            str(run_dir),
            "--out",
            str(out),
            "--max-tokens",
            "8192",
            "--steps",
            selected,
        ],
    )

    assert result.exit_code == 0, result.output
    assert f"Per-layer metrics at step {steps[-1]}" in result.output
    metrics = pd.read_parquet(out / "metrics")
    info = json.loads((out / "run.json").read_text())
    assert len(metrics) == 2 * info["n_layers"]
    assert metrics["probe_loss"].notna().all()
    assert metrics["eval_loss"].notna().all()
    by_step = metrics.groupby("step")["probe_loss"].first()
    assert by_step[steps[-1]] < by_step[steps[0]] - 1.0
    assert info["probe"]["n_tokens"] == 8192


def test_rerun_with_other_probe_is_rejected(runner, tiny_run, token_probe, tmp_path):
    out = tmp_path / "out"
    run_analyze(runner, tiny_run, out, token_probe)
    before = (out / "run.json").read_text()
    other = tmp_path / "other.npy"
    np.save(other, np.random.default_rng(9).integers(0, 100, size=(4, 32)))

    result = run_analyze(runner, tiny_run, out, other)

    assert result.exit_code == 2
    assert "measured with probe probe" in result.output
    assert "contains 2 checkpoint(s)" in result.output
    assert "choose another --out, or add --force" in result.output
    assert (out / "run.json").read_text() == before


def test_force_recomputes_with_other_probe(runner, tiny_run, token_probe, tmp_path):
    out = tmp_path / "out"
    run_analyze(runner, tiny_run, out, token_probe)
    other = tmp_path / "other.npy"
    np.save(other, np.random.default_rng(9).integers(0, 100, size=(4, 32)))

    result = run_analyze(runner, tiny_run, out, other, "--force")

    assert result.exit_code == 0, result.output
    assert pd.read_parquet(out / "metrics")["n_tokens"].unique().tolist() == [4 * 32]
    assert json.loads((out / "run.json").read_text())["probe"]["n_tokens"] == 4 * 32


def test_partial_force_with_other_probe_rejected(runner, tiny_run, token_probe, tmp_path):
    out = tmp_path / "out"
    run_analyze(runner, tiny_run, out, token_probe)
    other = tmp_path / "other.npy"
    np.save(other, np.random.default_rng(9).integers(0, 100, size=(4, 32)))

    result = run_analyze(runner, tiny_run, out, other, "--force", "--steps", "10")

    assert result.exit_code == 2


@pytest.mark.parametrize("device", ["tpu", "cuda:abc", "mps", "meta"])
def test_invalid_device_is_usage_error(runner, tiny_run, token_probe, tmp_path, device):
    result = run_analyze(runner, tiny_run, tmp_path / "out", token_probe, "--device", device)

    assert result.exit_code == 2
    assert "invalid device" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("steps", [",", "", "abc"])
def test_empty_or_invalid_steps_are_usage_errors(runner, tiny_run, token_probe, tmp_path, steps):
    result = run_analyze(runner, tiny_run, tmp_path / "out", token_probe, "--steps", steps)

    assert result.exit_code == 2
    assert "comma-separated integers" in result.output


def test_run_name_with_slash_is_rejected(runner, tiny_run, token_probe, tmp_path):
    result = runner.invoke(
        main,
        ["-q", "analyze", str(tiny_run), "--probe", str(token_probe), "--run-name", "../escape"],
    )

    assert result.exit_code == 2
    assert "invalid run name" in result.output


def test_corrupt_metrics_file_is_recomputed(runner, tiny_run, token_probe, tmp_path):
    out = tmp_path / "out"
    run_analyze(runner, tiny_run, out, token_probe)
    broken = out / "metrics" / store.checkpoint_file_name(10)
    broken.write_bytes(b"\x00" * 64)

    with pytest.raises(store.ResultDirectoryError, match="unreadable Parquet file"):
        store.load_results(out)
    result = run_analyze(runner, tiny_run, out, token_probe)

    assert result.exit_code == 0, result.output
    assert "1 analyzed, 1 skipped" in result.output
    assert len(store.load_results(out).metrics) == 4
