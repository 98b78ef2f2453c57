"""Degenerate numerics give a stated reason or a finite value, never NaN or a crash.

Covered: probes with fewer tokens than the FFN width, a single token, a layer
whose activations are all zero, and NaN and Inf weights. Also bf16 and fp16
checkpoints, an eigenvalue solve that fails on the device, and the edge cases
of the Jensen-Shannon divergence.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from nerve_cli import covariance, metrics
from nerve_cli.cli import main
from nerve_cli.covariance import StreamingCovariance, compute_eigenvalues
from nerve_cli.measure import spectrum_values
from tests.checkpoint_builders import (
    FFN_DIM,
    build_tiny_gpt2,
    checkpoint_entries,
    save_model,
    save_probe,
)


def run_analyze(run_dir: Path, out_dir: Path, probe: Path, *extra: str):
    return CliRunner().invoke(
        main,
        ["-q", "analyze", str(run_dir), "--out", str(out_dir), "--probe", str(probe), *extra],
        catch_exceptions=False,
    )


def read_metrics(out_dir: Path) -> pd.DataFrame:
    return (
        pd.read_parquet(out_dir / "metrics").sort_values(["step", "layer"]).reset_index(drop=True)
    )


# Case 9: fewer tokens than the FFN width, one token, a layer with no variance.


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_rank_limited_probe_analyzed(tmp_path, caplog):
    save_model(build_tiny_gpt2(), tmp_path / "run" / "checkpoint-10")
    probe = save_probe(tmp_path / "probe.npy", n_sequences=1, seq_len=16)  # 16 tokens < 64

    with caplog.at_level(logging.WARNING):
        result = run_analyze(tmp_path / "run", tmp_path / "out", probe)

    assert result.exit_code == 0, result.stderr
    frame = read_metrics(tmp_path / "out")
    assert frame["rank_limited"].all()
    assert frame["n_tokens"].eq(16).all()
    assert frame["null_reason"].isna().all()
    values = frame[list(metrics_columns())].to_numpy()
    assert np.isfinite(values).all()
    assert (frame["pr_pre"] <= 16).all()  # the rank caps PR at the token count
    assert any(
        f"16 probe tokens <= FFN width {FFN_DIM}" in record.getMessage()
        for record in caplog.records
    )


def metrics_columns() -> list[str]:
    from nerve_cli.store import METRIC_COLUMNS

    return METRIC_COLUMNS


def test_zero_and_negative_eigenvalues_finite():
    """A rank-limited spectrum has exact zeros and rounding noise below zero; no NaN follows."""
    spectrum = np.array([3.0, 1.0, 0.5, 0.0, 0.0, -1e-17, -3e-18, 0.0])

    with np.errstate(all="raise"):
        clipped, n_negative = metrics.clip_eigenvalues(spectrum)
        values = spectrum_values(clipped, clipped[::-1].copy())

    assert n_negative == 2
    assert (clipped >= 0).all()
    assert all(math.isfinite(value) for value in values.values())


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_single_token_null_reason(tmp_path):
    save_model(build_tiny_gpt2(), tmp_path / "run" / "checkpoint-10")
    probe = save_probe(tmp_path / "probe.npy", n_sequences=1, seq_len=1)

    result = run_analyze(tmp_path / "run", tmp_path / "out", probe)

    assert result.exit_code == 0, result.stderr
    frame = read_metrics(tmp_path / "out")
    assert frame[metrics_columns()].isna().all().all()
    assert (
        frame["null_reason"]
        .eq("only 1 token(s) entered the covariance; at least 2 are needed")
        .all()
    )
    assert frame["probe_loss"].isna().all()


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_zero_activation_layer_null(tmp_path, caplog):
    """Layer 1's up projection is all zeros, so both of its points have no variance."""
    model = build_tiny_gpt2()
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight.zero_()
        model.transformer.h[1].mlp.c_fc.bias.zero_()
    save_model(model, tmp_path / "run" / "checkpoint-10")
    probe = save_probe(tmp_path / "probe.npy")

    with caplog.at_level(logging.WARNING):
        result = run_analyze(tmp_path / "run", tmp_path / "out", probe)

    assert result.exit_code == 0, result.stderr
    frame = read_metrics(tmp_path / "out")
    layer0, layer1 = frame.iloc[0], frame.iloc[1]
    assert np.isfinite(layer0[metrics_columns()].astype(float)).all()
    assert pd.isna(layer0["null_reason"])
    assert layer1[metrics_columns()].isna().all()
    assert layer1["null_reason"] == (
        "layer 1: spectrum sums to zero: the activations have no variance"
    )
    assert any("metrics of 1 layer(s) are null" in record.getMessage() for record in caplog.records)


# Case 10: NaN or Inf in the weights.


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_weights_null(tmp_path, bad_value, caplog):
    """Step 20 has one non-finite weight in layer 1; steps 10 and 30 are analyzed normally."""
    run_dir = tmp_path / "run"
    for step in (10, 20, 30):
        model = build_tiny_gpt2(seed=step)
        if step == 20:
            with torch.no_grad():
                model.transformer.h[1].mlp.c_fc.weight[0, 0] = bad_value
        save_model(model, run_dir / f"checkpoint-{step}")
    probe = save_probe(tmp_path / "probe.npy")

    with caplog.at_level(logging.WARNING):
        result = run_analyze(run_dir, tmp_path / "out", probe)

    assert result.exit_code == 0, result.stderr
    frame = read_metrics(tmp_path / "out")
    broken = frame[frame["step"] == 20]
    assert broken[metrics_columns()].isna().all().all()
    assert (
        broken["null_reason"].eq("NaN or Inf activations, first in the pre point of layer 1").all()
    )
    healthy = frame[frame["step"] != 20]
    assert np.isfinite(healthy[metrics_columns()].to_numpy()).all()
    assert healthy["null_reason"].isna().all()
    assert {entry["status"] for entry in checkpoint_entries(tmp_path / "out").values()} == {"done"}
    assert any(
        record.getMessage().startswith("step 20: metrics of 2 layer(s) are null: NaN or Inf")
        for record in caplog.records
    )


# Case 11: bf16 and fp16 checkpoints.


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_half_precision_matches_float32(tmp_path, dtype_name):
    """A half-precision checkpoint run in that dtype matches the float32 copy of its weights.

    The reference is the same rounded weights stored in float32, so the
    difference comes only from computing in half precision. Activations are
    upcast to float64 before they enter the covariance.
    """
    dtype = getattr(torch, dtype_name)
    model = build_tiny_gpt2(seed=3).to(dtype)
    save_model(model, tmp_path / "half" / "checkpoint-10")
    save_model(model.to(torch.float32), tmp_path / "full" / "checkpoint-10")
    probe = save_probe(tmp_path / "probe.npy", n_sequences=8, seq_len=64)

    half = run_analyze(tmp_path / "half", tmp_path / "out-half", probe, "--dtype", dtype_name)
    full = run_analyze(tmp_path / "full", tmp_path / "out-full", probe, "--dtype", "float32")

    assert half.exit_code == 0, half.stderr
    assert full.exit_code == 0, full.stderr
    half_metrics = read_metrics(tmp_path / "out-half")
    full_metrics = read_metrics(tmp_path / "out-full")
    for column in metrics_columns():
        np.testing.assert_allclose(
            half_metrics[column], full_metrics[column], rtol=1e-2, err_msg=column
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_rows_upcast_before_accumulation(dtype):
    """The accumulator gives bit-identical moments for half rows and their float64 copy."""
    rows = torch.randn(50, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    half = StreamingCovariance(8)
    exact = StreamingCovariance(8)

    half.update(rows)
    exact.update(rows.to(torch.float64))

    assert torch.equal(half.covariance(), exact.covariance())


# Case 12: an eigenvalue solve that fails on the device is retried on the CPU.


class ReportsCudaTensor(torch.Tensor):
    """A CPU tensor that reports a CUDA device until it is moved to the CPU.

    This CPU-only test machine has no accelerator, and a ``meta`` tensor
    cannot stand in because it contains no values to copy to the CPU. This
    subclass lets the real fallback code run end to end.
    """

    @property
    def device(self) -> torch.device:
        return torch.device("cuda")

    def to(self, *args, **kwargs):
        moved = self.as_subclass(torch.Tensor).to(*args, **kwargs)
        targets = [*args, kwargs.get("device")]
        to_cpu = any(
            isinstance(target, str | torch.device) and torch.device(target).type == "cpu"
            for target in targets
        )
        return moved if to_cpu else moved.as_subclass(ReportsCudaTensor)


def test_device_solve_retried_on_cpu(monkeypatch, caplog):
    """torch.linalg.eigvalsh raises for the "CUDA" input, as a device solver can fail to converge.

    The retry must run on a plain CPU tensor in float64 and return the same
    eigenvalues as a direct CPU solve. A real CUDA run is checked elsewhere.
    """
    generator = torch.Generator().manual_seed(0)
    factor = torch.randn(6, 6, dtype=torch.float64, generator=generator)
    matrix = factor @ factor.T  # [6, 6], symmetric positive semi-definite
    expected = np.sort(np.linalg.eigvalsh(matrix.numpy()))[::-1]
    real_eigvalsh = torch.linalg.eigvalsh
    solves = []

    def failing_on_device(input, *args, **kwargs):
        solves.append((type(input).__name__, input.dtype))
        if isinstance(input, ReportsCudaTensor):
            raise torch.linalg.LinAlgError("the algorithm failed to converge")
        return real_eigvalsh(input, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigvalsh", failing_on_device)
    with caplog.at_level(logging.WARNING, logger=covariance.__name__):
        (values,) = compute_eigenvalues([matrix.float().as_subclass(ReportsCudaTensor)])

    assert solves == [("ReportsCudaTensor", torch.float64), ("Tensor", torch.float64)]
    np.testing.assert_allclose(values, expected, rtol=1e-5)
    assert "retrying on the CPU in float64" in caplog.text


def test_cpu_solve_failure_raised(monkeypatch):
    """A failure already on the CPU is not retried in a loop; it propagates."""

    def always_failing(input, *args, **kwargs):
        raise torch.linalg.LinAlgError("the algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "eigvalsh", always_failing)
    with pytest.raises(torch.linalg.LinAlgError):
        compute_eigenvalues([torch.eye(3, dtype=torch.float64)])


# Case 13: the Jensen-Shannon divergence.


def test_js_self_exactly_zero():
    spectrum = np.array([5.0, 2.0, 1.0, 0.25, 0.0, 1e-300])

    assert metrics.js_divergence(spectrum, spectrum) == 0.0
    assert metrics.js_divergence(spectrum, 7.5 * spectrum) == 0.0


def test_js_subnormal_finite():
    tiny = np.nextafter(0.0, 1.0)  # the smallest subnormal double, 5e-324
    pre = np.array([1.0, tiny, 1e-310, 0.0])
    post = np.array([0.25, 0.25, 0.25, 0.25])

    with np.errstate(all="raise"):
        value = metrics.js_divergence(pre, post)
        reverse = metrics.js_divergence(post, pre)

    assert math.isfinite(value)
    assert 0.0 < value <= math.log(2.0)
    assert value == pytest.approx(reverse, rel=1e-12)


def test_js_lengths_differ_error():
    with pytest.raises(
        ValueError, match=r"JS needs spectra of equal length, got 3 \(pre\) and 4 \(post\)"
    ):
        metrics.js_divergence(np.ones(3), np.ones(4))
