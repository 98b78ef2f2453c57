"""FFN measurement points of every supported family, checked against an independent computation.

For each family a tiny random model is saved as a checkpoint and analyzed
through the command line with a ``.npy`` probe. Its metrics are compared with
metrics of pre and post activations computed in float64 from each FFN's input
and weights (see ``tiny_families.REFERENCE_FFN``), with ``numpy.cov``,
``numpy.linalg.eigvalsh`` and :mod:`nerve_cli.metrics`. Tolerance: 1e-4
relative.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from nerve_cli import architectures, metrics, store
from nerve_cli.architectures import (
    FAMILIES,
    UnsupportedModelError,
    override_family,
    resolve_ffn_layout,
    resolve_ffn_points,
)
from nerve_cli.cli import main

from .tiny_families import (
    ENCODERS,
    FAMILY_CONFIGS,
    REFERENCE_FFN,
    build_tiny_model,
    reference_activations,
    save_token_ids,
)

METRIC_NAMES = store.METRIC_COLUMNS


def analyze(runner, run_dir, out_dir, probe, *extra):
    return runner.invoke(
        main, ["-q", "analyze", str(run_dir), "--out", str(out_dir), "--probe", str(probe), *extra]
    )


def expected_metrics(pre: np.ndarray, post: np.ndarray) -> dict[str, float]:
    """Metrics of one layer from full activations, written independently of nerve's pipeline."""
    spectra = {}
    for name, x in (("pre", pre), ("post", post)):
        eigenvalues, _ = metrics.clip_eigenvalues(np.linalg.eigvalsh(np.cov(x, rowvar=False)))
        spectra[name] = eigenvalues
    values = {}
    for name, eigenvalues in spectra.items():
        values[f"se_{name}"] = metrics.spectral_entropy(eigenvalues)
        values[f"pr_{name}"] = metrics.participation_ratio(eigenvalues)
        values[f"eee_{name}"] = metrics.early_enrichment(eigenvalues)
    values["js"] = metrics.js_divergence(spectra["pre"], spectra["post"])
    values["pr_gain"] = values["pr_post"] / values["pr_pre"]
    values["eee_delta"] = values["eee_post"] - values["eee_pre"]
    values["se_delta"] = values["se_post"] - values["se_pre"]
    return values


def captured_at_points(model: nn.Module, points, token_ids: np.ndarray) -> dict:
    """Capture, with plain hooks, the outputs of the pre and up modules and the input of post."""
    modules = dict(model.named_modules())
    captured: dict[tuple[str, int], torch.Tensor] = {}

    def keep(key, from_input):
        def hook(_module, args, output=None):
            value = args[0] if from_input else output
            captured[key] = value.detach().double().reshape(-1, value.shape[-1])

        return hook

    handles = []
    for point in points:
        handles.append(
            modules[point.pre_module].register_forward_hook(keep(("pre", point.layer), False))
        )
        handles.append(
            modules[point.post_module].register_forward_pre_hook(keep(("post", point.layer), True))
        )
        if point.up_module:
            handles.append(
                modules[point.up_module].register_forward_hook(keep(("up", point.layer), False))
            )
    try:
        with torch.no_grad():
            model(input_ids=torch.from_numpy(token_ids))
    finally:
        for handle in handles:
            handle.remove()
    return captured


def activation_of(model: nn.Module, model_type: str, layer: int):
    spec = REFERENCE_FFN[model_type]
    value = model.get_submodule(spec.blocks)[layer]
    for name in spec.act.split("."):
        value = getattr(value, name)
    return value


@pytest.mark.parametrize("model_type", sorted(FAMILY_CONFIGS))
def test_family_metrics_match_reference(model_type, runner, tmp_path):
    model = build_tiny_model(model_type)
    run_dir = tmp_path / "run"
    model.save_pretrained(run_dir / "checkpoint-10")
    token_ids = save_token_ids(tmp_path / "probe.npy")

    result = analyze(runner, run_dir, tmp_path / "out", tmp_path / "probe.npy")

    assert result.exit_code == 0, result.output
    table = pd.read_parquet(tmp_path / "out" / "metrics").set_index("layer")
    reference = reference_activations(model, model_type, token_ids)
    assert sorted(table.index) == sorted(reference)
    for layer, (pre, post) in reference.items():
        assert table.loc[layer, "ffn_dim"] == pre.shape[1]
        assert table.loc[layer, "n_tokens"] == token_ids.size
        for name, value in expected_metrics(pre, post).items():
            assert table.loc[layer, name] == pytest.approx(value, rel=1e-4, abs=1e-9), (layer, name)
    if model_type in ENCODERS:
        assert table["probe_loss"].isna().all()
    else:
        ids = torch.from_numpy(token_ids)
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss.item()
        assert table["probe_loss"].iloc[0] == pytest.approx(loss, rel=1e-4)


@pytest.mark.parametrize("model_type", sorted(FAMILY_CONFIGS))
def test_family_post_rebuilt_from_captured_pre(model_type, tmp_path):
    """act(pre) for plain FFNs, act(gate) * up for gated ones, equals what the down projection receives."""
    model = build_tiny_model(model_type)
    points = resolve_ffn_points(model, model.config.model_type)
    token_ids = save_token_ids(tmp_path / "probe.npy", n_sequences=2)

    captured = captured_at_points(model, points, token_ids)

    assert [point.layer for point in points] == list(range(model.config.num_hidden_layers))
    for point in points:
        act = activation_of(model, model_type, point.layer)
        pre = captured[("pre", point.layer)]
        if point.pre_columns is not None:
            start, stop = point.pre_columns
            up = torch.cat([pre[:, :start], pre[:, stop:]], dim=1)  # the other half
            gate = pre[:, start:stop]
            rebuilt = act(gate) * up
        elif point.kind == "gated":
            rebuilt = act(pre) * captured[("up", point.layer)]
        else:
            rebuilt = act(pre)
        post = captured[("post", point.layer)]
        assert post.shape[1] == point.ffn_dim
        torch.testing.assert_close(rebuilt, post, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("model_type", "options"),
    [
        ("bloom", {"pretraining_tp": 2, "slow_but_exact": True}),
        ("bert", {"chunk_size_feed_forward": 4}),
    ],
)
def test_hook_bypassing_options_switched_off(model_type, options, runner, tmp_path):
    """Bloom's sliced down projection and BERT's FFN chunking are switched off for measurement."""
    model = build_tiny_model(model_type)
    for name, value in options.items():
        setattr(model.config, name, value)
    model.save_pretrained(tmp_path / "run")
    token_ids = save_token_ids(tmp_path / "probe.npy")

    result = analyze(runner, tmp_path / "run", tmp_path / "out", tmp_path / "probe.npy")

    assert result.exit_code == 0, result.output
    table = pd.read_parquet(tmp_path / "out" / "metrics").set_index("layer")
    reference = reference_activations(build_tiny_model(model_type), model_type, token_ids)
    for layer, (pre, post) in reference.items():
        for name, value in expected_metrics(pre, post).items():
            assert table.loc[layer, name] == pytest.approx(value, rel=1e-4, abs=1e-9), (layer, name)


def test_phi3_gate_is_first_half():
    model = build_tiny_model("phi3")

    points = resolve_ffn_points(model, "phi3")

    assert points[0].kind == "fused_gated"
    assert points[0].pre_columns == (0, 64)
    assert points[0].ffn_dim == 64


@pytest.mark.parametrize("model_type", sorted(FAMILY_CONFIGS))
def test_structural_fallback_matches_registry(model_type, monkeypatch):
    model = build_tiny_model(model_type)
    registered = resolve_ffn_layout(model, model_type)
    monkeypatch.delitem(FAMILIES, model_type)

    inferred = resolve_ffn_layout(model, model_type)

    assert inferred.source == "structure"
    assert inferred.points == registered.points


def test_override_equals_registry_in_metrics(runner, tmp_path):
    build_tiny_model("gpt2").save_pretrained(tmp_path / "run")
    save_token_ids(tmp_path / "probe.npy")
    patterns = [
        "--ffn-up",
        "transformer.h.{layer}.mlp.c_fc",
        "--ffn-down",
        "transformer.h.{layer}.mlp.c_proj",
    ]

    default = analyze(runner, tmp_path / "run", tmp_path / "default", tmp_path / "probe.npy")
    override = analyze(
        runner, tmp_path / "run", tmp_path / "override", tmp_path / "probe.npy", *patterns
    )

    assert default.exit_code == 0, default.output
    assert override.exit_code == 0, override.output
    expected = pd.read_parquet(tmp_path / "default" / "metrics")[METRIC_NAMES]
    actual = pd.read_parquet(tmp_path / "override" / "metrics")[METRIC_NAMES]
    pd.testing.assert_frame_equal(actual, expected)


def test_gated_override_on_fused_projection():
    model = build_tiny_model("phi3")
    family = override_family(
        "layers.{layer}.mlp.gate_up_proj", "layers.{layer}.mlp.down_proj", gated=True
    )

    layout = resolve_ffn_layout(model, "phi3", family)

    assert layout.source == "override"
    assert layout.points == resolve_ffn_points(model, "phi3")


def test_override_matching_nothing_fails_loudly(runner, tmp_path):
    build_tiny_model("gpt2").save_pretrained(tmp_path / "run")
    save_token_ids(tmp_path / "probe.npy")
    patterns = ["--ffn-up", "h.{layer}.mlp.up", "--ffn-down", "h.{layer}.mlp.down"]

    result = analyze(runner, tmp_path / "run", tmp_path / "out", tmp_path / "probe.npy", *patterns)

    assert result.exit_code == 2
    assert "no FFN blocks found" in result.output
    assert not (tmp_path / "out" / "metrics").exists()


def test_override_with_wrong_widths_fails(runner, tmp_path):
    build_tiny_model("gpt2").save_pretrained(tmp_path / "run")
    save_token_ids(tmp_path / "probe.npy")
    patterns = ["--ffn-up", "h.{layer}.attn.c_attn", "--ffn-down", "h.{layer}.mlp.c_proj"]

    result = analyze(runner, tmp_path / "run", tmp_path / "out", tmp_path / "probe.npy", *patterns)

    assert result.exit_code == 2
    assert "output width 96 differs from the input width 64" in result.output


@pytest.mark.parametrize(
    "options",
    [
        ["--ffn-up", "h.0.mlp.c_fc", "--ffn-down", "h.{layer}.mlp.c_proj"],
        ["--ffn-up", "h.{layer}.mlp.c_fc"],
        ["--gated"],
    ],
)
def test_incomplete_override_is_usage_error(options, runner, tmp_path):
    build_tiny_model("gpt2").save_pretrained(tmp_path / "run")
    save_token_ids(tmp_path / "probe.npy")

    result = analyze(runner, tmp_path / "run", tmp_path / "out", tmp_path / "probe.npy", *options)

    assert result.exit_code == 2
    assert "--ffn-up" in result.output or "--gated" in result.output


def test_block_without_match_rejected():
    model = build_tiny_model("gpt2")
    model.transformer.h[1].mlp = nn.Identity()

    with pytest.raises(UnsupportedModelError, match=r"no FFN blocks found|no match for \[1\]"):
        resolve_ffn_points(model, "gpt2")


def test_two_matches_per_layer_rejected():
    model = build_tiny_model("gpt2")
    model.extra = nn.ModuleDict({"h": nn.ModuleList([copy.deepcopy(model.transformer.h[0])])})

    with pytest.raises(UnsupportedModelError, match="matches both"):
        resolve_ffn_points(model, "gpt2")


@pytest.mark.parametrize(
    ("model_type", "config", "kind"),
    [
        ("mixtral", {"num_local_experts": 4}, "a mixture-of-experts"),
        ("qwen2_moe", {"num_experts": 4}, "a mixture-of-experts"),
        ("t5", {}, "an encoder-decoder"),
        ("bart", {}, "an encoder-decoder"),
    ],
)
def test_unsupported_family_rejected_before_loading(model_type, config, kind, runner, tmp_path):
    from transformers import AutoConfig

    checkpoint = tmp_path / "run"
    AutoConfig.for_model(model_type, **config).save_pretrained(checkpoint)  # no weights are needed
    save_token_ids(tmp_path / "probe.npy")

    result = analyze(runner, checkpoint, tmp_path / "out", tmp_path / "probe.npy")

    assert result.exit_code == 2
    assert f"model_type '{model_type}' is {kind} family" in result.stderr
    assert "not support yet" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_unknown_family_uses_structure(runner, tmp_path, monkeypatch, caplog):
    """A family missing from the table is measured through the inferred modules, with one warning."""
    build_tiny_model("llama").save_pretrained(tmp_path / "run")
    save_token_ids(tmp_path / "probe.npy")
    monkeypatch.delitem(FAMILIES, "llama")
    monkeypatch.setattr(architectures, "_WARNED_INFERRED", set())

    result = analyze(runner, tmp_path / "run", tmp_path / "out", tmp_path / "probe.npy")

    assert result.exit_code == 0, result.output
    warnings = [
        record for record in caplog.records if "inferred from the module tree" in record.message
    ]
    assert len(warnings) == 1
    info = json.loads((tmp_path / "out" / "run.json").read_text())
    assert info["ffn_kind"] == "gated"
