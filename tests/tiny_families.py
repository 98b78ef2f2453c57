"""Tiny random models of every supported family, and an independent FFN reference.

Each family gets a config with hidden size 32, FFN width 64 (Bloom fixes it at
4 x hidden = 128), 2 layers and a vocabulary of 128, so a model builds and runs
in well under a second. ``REFERENCE_FFN`` describes, for each family, where its
FFN input is and how the FFN computes pre and post from it, written from the
transformers 5.25 modeling code and independent of nerve's family table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

HIDDEN, FFN_DIM, N_LAYERS, VOCAB, POSITIONS = 32, 64, 2, 128, 64
ENCODERS = ("bert", "roberta", "distilbert")

_SPECIAL = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": None}
_DECODER = dict(
    hidden_size=HIDDEN,
    intermediate_size=FFN_DIM,
    num_hidden_layers=N_LAYERS,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=POSITIONS,
    vocab_size=VOCAB,
    **_SPECIAL,
)
_GPT2_STYLE = dict(
    n_embd=HIDDEN,
    n_inner=FFN_DIM,
    n_layer=N_LAYERS,
    n_head=2,
    n_positions=POSITIONS,
    vocab_size=VOCAB,
    **_SPECIAL,
)
_ENCODER = dict(
    hidden_size=HIDDEN,
    intermediate_size=FFN_DIM,
    num_hidden_layers=N_LAYERS,
    num_attention_heads=2,
    max_position_embeddings=POSITIONS,
    vocab_size=VOCAB,
)

FAMILY_CONFIGS: dict[str, dict] = {
    "gpt2": _GPT2_STYLE,
    "gpt_bigcode": _GPT2_STYLE,
    "gpt_neox": dict(_DECODER),
    "gptj": dict(_GPT2_STYLE, rotary_dim=8),
    "opt": dict(_DECODER, ffn_dim=FFN_DIM, word_embed_proj_dim=HIDDEN),
    "bloom": dict(hidden_size=HIDDEN, n_layer=N_LAYERS, n_head=2, vocab_size=VOCAB, **_SPECIAL),
    "falcon": dict(_DECODER, ffn_hidden_size=FFN_DIM),
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "qwen3": dict(_DECODER, head_dim=16),
    "gemma": dict(_DECODER, head_dim=16),
    "gemma2": dict(_DECODER, head_dim=16),
    "phi": _DECODER,
    "phi3": _DECODER,
    "olmo": _DECODER,
    "olmo2": _DECODER,
    "stablelm": _DECODER,
    "starcoder2": _DECODER,
    "granite": _DECODER,
    "cohere": _DECODER,
    "bert": _ENCODER,
    # RoBERTa numbers positions from pad_token_id + 1 = 2.
    "roberta": dict(_ENCODER, max_position_embeddings=POSITIONS + 2),
    "distilbert": dict(
        dim=HIDDEN,
        hidden_dim=FFN_DIM,
        n_layers=N_LAYERS,
        n_heads=2,
        max_position_embeddings=POSITIONS,
        vocab_size=VOCAB,
    ),
}


@dataclass(frozen=True)
class ReferenceFFN:
    """Where a family's FFN input is and which submodules compute its pre and post.

    Paths are attributes relative to one block. ``ffn_input`` is a module whose
    input (or output, with the ``:output`` suffix) is the FFN input. ``up`` is
    None for a plain FFN, the up projection of a gated one, or ``"fused"`` when
    ``pre`` is a fused gate-and-up projection split as gate, up = chunk(2).
    """

    blocks: str
    ffn_input: str
    pre: str
    act: str
    up: str | None = None


_GATED = ReferenceFFN("model.layers", "mlp", "mlp.gate_proj", "mlp.act_fn", up="mlp.up_proj")
REFERENCE_FFN: dict[str, ReferenceFFN] = {
    "gpt2": ReferenceFFN("transformer.h", "mlp", "mlp.c_fc", "mlp.act"),
    "gpt_bigcode": ReferenceFFN("transformer.h", "mlp", "mlp.c_fc", "mlp.act"),
    "starcoder2": ReferenceFFN("model.layers", "mlp", "mlp.c_fc", "mlp.act"),
    "gpt_neox": ReferenceFFN("gpt_neox.layers", "mlp", "mlp.dense_h_to_4h", "mlp.act"),
    "gptj": ReferenceFFN("transformer.h", "mlp", "mlp.fc_in", "mlp.act"),
    "opt": ReferenceFFN("model.decoder.layers", "final_layer_norm:output", "fc1", "activation_fn"),
    "bloom": ReferenceFFN("transformer.h", "mlp", "mlp.dense_h_to_4h", "mlp.gelu_impl"),
    "falcon": ReferenceFFN("transformer.h", "mlp", "mlp.dense_h_to_4h", "mlp.act"),
    "phi": ReferenceFFN("model.layers", "mlp", "mlp.fc1", "mlp.activation_fn"),
    "phi3": ReferenceFFN(
        "model.layers", "mlp", "mlp.gate_up_proj", "mlp.activation_fn", up="fused"
    ),
    "bert": ReferenceFFN(
        "encoder.layer", "intermediate", "intermediate.dense", "intermediate.intermediate_act_fn"
    ),
    "roberta": ReferenceFFN(
        "encoder.layer", "intermediate", "intermediate.dense", "intermediate.intermediate_act_fn"
    ),
    "distilbert": ReferenceFFN("transformer.layer", "ffn", "ffn.lin1", "ffn.activation"),
    **{
        family: _GATED
        for family in (
            "llama",
            "mistral",
            "qwen2",
            "qwen3",
            "gemma",
            "gemma2",
            "olmo",
            "olmo2",
            "stablelm",
            "granite",
            "cohere",
        )
    },
}


def build_tiny_model(model_type: str, seed: int = 0) -> nn.Module:
    """Build a random tiny model of ``model_type`` in eval mode (bare encoder for encoders).

    Weights are drawn with std 0.2 instead of the usual 0.02, so activations
    reach the nonlinear range of the activation functions.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, initializer_range=0.2, **FAMILY_CONFIGS[model_type])
    model_class = AutoModel if model_type in ENCODERS else AutoModelForCausalLM
    torch.manual_seed(seed)
    return model_class.from_config(config).eval()


def save_token_ids(
    path: Path, n_sequences: int = 12, seq_len: int = 16, seed: int = 0
) -> np.ndarray:
    """Save a seeded ``.npy`` probe of shape ``[n_sequences, seq_len]`` and return it."""
    token_ids = np.random.default_rng(seed).integers(0, VOCAB, size=(n_sequences, seq_len))
    np.save(path, token_ids)
    return token_ids


def reference_activations(
    model: nn.Module, model_type: str, token_ids: np.ndarray
) -> dict[int, tuple]:
    """Return ``{layer: (pre, post)}`` float64 arrays ``[N, D]`` computed from each FFN's input.

    The FFN input is captured with a plain hook on the module that feeds the
    FFN; pre and post are then computed from the weights in float64.
    """
    spec = REFERENCE_FFN[model_type]
    blocks = model.get_submodule(spec.blocks)
    inputs: dict[int, list[torch.Tensor]] = {layer: [] for layer in range(len(blocks))}
    handles = [
        _capture_ffn_input(block, spec.ffn_input, inputs[layer])
        for layer, block in enumerate(blocks)
    ]
    try:
        with torch.no_grad():
            model(input_ids=torch.from_numpy(token_ids))
    finally:
        for handle in handles:
            handle.remove()

    result = {}
    with torch.no_grad():
        for layer, block in enumerate(blocks):
            x = torch.cat([value.reshape(-1, value.shape[-1]) for value in inputs[layer]]).double()
            result[layer] = _pre_and_post(block, spec, x)
    return result


def _capture_ffn_input(block: nn.Module, path: str, store: list):
    name, _, side = path.partition(":")
    module = block.get_submodule(name)
    if side == "output":
        return module.register_forward_hook(
            lambda _module, _args, output: store.append(output.detach())
        )

    def keep_input(_module, args, kwargs):
        store.append((args[0] if args else next(iter(kwargs.values()))).detach())

    return module.register_forward_pre_hook(keep_input, with_kwargs=True)


def _pre_and_post(
    block: nn.Module, spec: ReferenceFFN, x: torch.Tensor
) -> tuple[np.ndarray, np.ndarray]:
    act = _get_attribute(block, spec.act)
    projected = linear64(block.get_submodule(spec.pre), x)
    if spec.up is None:
        pre, post = projected, act(projected)
    elif spec.up == "fused":
        gate, up = projected.chunk(2, dim=-1)
        pre, post = gate, act(gate) * up
    else:
        pre, post = projected, act(projected) * linear64(block.get_submodule(spec.up), x)
    return pre.numpy(), post.numpy()


def _get_attribute(block: nn.Module, path: str):
    value = block
    for name in path.split("."):
        value = getattr(value, name)
    return value


def linear64(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply an nn.Linear or GPT-2 Conv1D in float64."""
    weight = module.weight.double()
    weight = weight if hasattr(module, "nf") else weight.T  # Conv1D stores [in, out]
    out = x @ weight
    return out + module.bias.double() if module.bias is not None else out
