"""The measurement engine: linear-map covariances, hooks and precision modes.

Tolerances:

* pre metrics from the up projection's input against those from its output,
  both with float64 products: 1e-7 relative. The model rounds each output
  value to float32 (about 6e-8 relative), which moves the output covariance
  by about ``6e-8 / sqrt(N)``; measured: at most 4e-9 here;
* float32 against float64 products on the metrics: 1e-5 relative. Measured:
  about 4e-6 on ``js`` of the tiny model below, whose value is only 2e-3,
  and under 1e-7 on the other metrics.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from torch import nn

from nerve_cli import measure
from nerve_cli.architectures import resolve_ffn_points
from nerve_cli.covariance import LinearMapCovariance, StreamingCovariance
from nerve_cli.loading import load_checkpoint
from nerve_cli.measure import build_pre_accumulator, compute_layer_results, measure_model
from nerve_cli.probe import Probe

from .conftest import REPO_ROOT, save_tiny_gpt2_run

METRICS = ["se_pre", "se_post", "pr_pre", "pr_post", "eee_pre", "eee_post", "js"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    run_dir = save_tiny_gpt2_run(tmp_path_factory.mktemp("engine") / "run", steps=(0,))
    loaded = load_checkpoint(run_dir / "checkpoint-0", torch.device("cpu"), "auto")
    return loaded.model


@pytest.fixture(scope="module")
def probe():
    token_ids = np.random.default_rng(1).integers(0, 100, size=(12, 32))
    return Probe("test", "", "test", token_ids)


def measure_metrics(model, probe, product_dtype=None) -> list[dict]:
    points = resolve_ffn_points(model, "gpt2")
    measurement = measure_model(model, points, probe, 4, True, product_dtype, show_progress=False)
    return [result.values for result in compute_layer_results(measurement)]


def assert_metrics_close(actual: list[dict], expected: list[dict], rtol: float) -> None:
    for layer, (row, reference) in enumerate(zip(actual, expected, strict=True)):
        for column in METRICS:
            assert row[column] == pytest.approx(reference[column], rel=rtol), (layer, column)


def test_linear_map_covariance_matches_outputs():
    rng = np.random.default_rng(0)
    weight = torch.from_numpy(rng.standard_normal((40, 12)))  # [D, d_in]
    bias = torch.from_numpy(rng.standard_normal(40))
    inputs = torch.from_numpy(3 + rng.standard_normal((500, 12)))
    outputs = inputs @ weight.T + bias  # [n, D]

    mapped = LinearMapCovariance(weight, bias, "cpu", torch.float64)
    direct = StreamingCovariance(40, "cpu", torch.float64)
    for batch_in, batch_out in zip(
        torch.split(inputs, 170), torch.split(outputs, 170), strict=True
    ):
        mapped.update(batch_in)
        direct.update(batch_out)

    expected = direct.covariance()
    assert mapped.count == 500
    assert mapped.finite is True
    assert torch.allclose(
        mapped.covariance(), expected, rtol=0, atol=1e-10 * float(expected.abs().max())
    )
    assert torch.allclose(mapped.mean, direct.mean, rtol=1e-12)


def test_linear_map_eigenvalues_pad_exact_zeros():
    rng = np.random.default_rng(1)
    weight = torch.from_numpy(rng.standard_normal((30, 8)))
    mapped = LinearMapCovariance(weight, None, "cpu", torch.float64)
    mapped.update(torch.from_numpy(rng.standard_normal((200, 8))))

    values = mapped.eigenvalues()
    expected = torch.linalg.eigvalsh(mapped.covariance())

    assert values.shape == (30,)
    assert torch.all(values[:22] == 0)
    assert torch.allclose(values[22:], expected[22:], rtol=1e-10)


def test_linear_map_eigenvalues_with_wide_input():
    rng = np.random.default_rng(4)
    weight = torch.from_numpy(rng.standard_normal((5, 9)))  # d_in 9 > D 5
    mapped = LinearMapCovariance(weight, None, "cpu", torch.float64)
    mapped.update(torch.from_numpy(rng.standard_normal((50, 9))))

    values = mapped.eigenvalues()

    assert torch.allclose(values, torch.linalg.eigvalsh(mapped.covariance()), rtol=1e-10)


def test_pre_accumulator_uses_input_of_linear():
    module = nn.Linear(16, 64)
    point = _point(ffn_dim=64)

    accumulator = build_pre_accumulator(module, point, torch.device("cpu"), torch.float32)

    assert isinstance(accumulator, LinearMapCovariance)
    assert accumulator.dim == 64
    assert accumulator.inputs.dim == 16


def test_pre_accumulator_takes_fused_gate_half():
    module = nn.Linear(16, 128)  # gate and up projections fused, gate second
    point = _point(ffn_dim=64, pre_columns=(64, 128))

    accumulator = build_pre_accumulator(module, point, torch.device("cpu"), torch.float64)

    assert torch.equal(accumulator.weight, module.weight[64:].double())
    assert torch.equal(accumulator.bias, module.bias[64:].double())


class QuantizedLinear(nn.Linear):
    """Stands in for a subclass that changes what forward computes (quantization, adapters)."""


@pytest.mark.parametrize(
    ("module", "ffn_dim"),
    [
        (QuantizedLinear(16, 64), 64),
        (nn.Linear(128, 64), 64),
        (nn.Sequential(nn.Linear(16, 64)), 64),
    ],
    ids=["linear-subclass", "input-wider-than-output", "other-module"],
)
def test_pre_accumulator_falls_back_to_output(module, ffn_dim):
    accumulator = build_pre_accumulator(module, _point(ffn_dim), torch.device("cpu"), torch.float32)

    assert isinstance(accumulator, StreamingCovariance)
    assert accumulator.dim == ffn_dim


def _point(ffn_dim: int, pre_columns=None):
    from nerve_cli.architectures import FFNPoint

    return FFNPoint(0, "plain", "pre", "post", ffn_dim, pre_columns=pre_columns)


def test_pre_from_input_matches_pre_from_output(tiny_model, probe, monkeypatch):
    from_input = measure_metrics(tiny_model, probe, torch.float64)
    monkeypatch.setattr(measure, "linear_map_of", lambda module, columns: None)

    from_output = measure_metrics(tiny_model, probe, torch.float64)

    assert_metrics_close(from_input, from_output, rtol=1e-7)


def test_float32_products_close_to_float64(tiny_model, probe):
    exact = measure_metrics(tiny_model, probe, torch.float64)

    fast = measure_metrics(tiny_model, probe, torch.float32)

    assert_metrics_close(fast, exact, rtol=1e-5)


def test_measure_removes_hooks_and_counts_tokens(tiny_model, probe):
    points = resolve_ffn_points(tiny_model, "gpt2")

    measurement = measure_model(tiny_model, points, probe, 5, True, show_progress=False)

    assert measurement.n_tokens == 12 * 32
    for layer in measurement.layers:
        assert layer.pre.count == layer.post.count == 12 * 32
        assert layer.calls == {"pre": 3, "post": 3}  # batches of 5, 5 and 2 sequences
    for module in tiny_model.modules():
        assert not module._forward_hooks
        assert not module._forward_pre_hooks


def test_benchmark_baseline_agrees_with_engine(tiny_model, probe):
    # Guards the store-all baseline of benchmarks/bench_engine.py against
    # wiring mistakes (wrong module, layer or point), which would change the
    # metrics far beyond the float32 rounding of the baseline (about 1e-4 here).
    spec = importlib.util.spec_from_file_location(
        "bench_engine", REPO_ROOT / "benchmarks" / "bench_engine.py"
    )
    bench_engine = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_engine)

    baseline = bench_engine.run_store_all(
        tiny_model, torch.from_numpy(probe.token_ids), torch.device("cpu")
    )

    assert_metrics_close(
        baseline["metrics"], measure_metrics(tiny_model, probe, torch.float64), rtol=1e-3
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_accumulator_matches_cpu():
    rows = torch.from_numpy(5 + np.random.default_rng(2).standard_normal((2000, 64)))
    on_cpu = StreamingCovariance(64, "cpu", torch.float32)
    on_cuda = StreamingCovariance(64, "cuda", torch.float32)
    for batch in torch.split(rows, 300):
        on_cpu.update(batch.float())
        on_cuda.update(batch.float().cuda().bfloat16().float())

    assert on_cuda.finite is True
    expected = on_cpu.covariance()
    assert torch.allclose(
        on_cuda.covariance().cpu(), expected, rtol=0, atol=1e-2 * float(expected.abs().max())
    )
