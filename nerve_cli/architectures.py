"""Measurement points of each model family's FFN blocks.

For every FFN block nerve needs two modules:

* the ``pre`` module, whose forward output is the pre-activation: the up
  projection of a plain FFN, the gate projection of a gated FFN, or the fused
  gate-and-up projection, of which only the gate half is kept;
* the ``post`` module, the down projection, whose *input* (captured with a
  forward pre-hook) is the post-activation.

Families are registered by ``config.model_type`` with module-name patterns in
which ``{layer}`` stands for the block index. Patterns match the end of a
module's dotted name, so they work whether the model is wrapped by an LM head
(``transformer.h.0.mlp.c_fc``) or not (``h.0.mlp.c_fc``). A family that is not
registered falls back to :func:`nerve_cli.ffn_structure.infer_ffn_family`, and
a user can override both with patterns of their own.

Each registry entry was checked against the modeling code of transformers 5.25:
the pre module's output is exactly the activation function's input, and the
post module's input is exactly the activation's output (times the up
projection for gated FFNs). Where a dropout sits between the activation and
the down projection, it is the identity in eval mode, which is how nerve runs.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "FFNFamily",
    "FFNLayout",
    "FFNPoint",
    "UnsupportedModelError",
    "FAMILIES",
    "check_model_supported",
    "override_family",
    "register_family",
    "resolve_ffn_layout",
    "resolve_ffn_points",
]

FFN_KINDS = ("plain", "gated", "fused_gated")


class UnsupportedModelError(ValueError):
    """Raised when a model family is not supported or no FFN measurement points are found."""


@dataclass(frozen=True)
class FFNFamily:
    """Module-name patterns of one model family's FFN blocks.

    ``kind`` is ``"plain"``, ``"gated"`` or ``"fused_gated"``. For fused
    families the pre module's output is ``[..., 2 * ffn_dim]`` and the gate is
    the half selected by ``gate_half`` (0 = first half). ``up`` names the up
    projection of a gated FFN; it is shown by ``nerve inspect`` but not measured.
    """

    kind: str
    pre: str
    post: str
    up: str | None = None
    gate_half: int = 0


@dataclass(frozen=True)
class FFNPoint:
    """The resolved measurement modules of one FFN block."""

    layer: int
    kind: str
    pre_module: str
    post_module: str
    ffn_dim: int
    up_module: str | None = None
    # For fused projections: the [start, stop) columns of the pre output that form the gate.
    pre_columns: tuple[int, int] | None = None


@dataclass(frozen=True)
class FFNLayout:
    """The measurement points of a model and where their patterns came from.

    ``source`` is ``"registry"`` (the family table below), ``"structure"``
    (inferred from the module tree) or ``"override"`` (``--ffn-up``/``--ffn-down``).
    """

    model_type: str
    family: FFNFamily
    source: str
    points: list[FFNPoint]


FAMILIES: dict[str, FFNFamily] = {}
_WARNED_INFERRED: set[tuple[str, FFNFamily]] = set()


def register_family(model_types: str | tuple[str, ...], family: FFNFamily) -> None:
    """Register the FFN patterns of one or more ``config.model_type`` values."""
    if family.kind not in FFN_KINDS:
        raise ValueError(f"FFN kind must be one of {FFN_KINDS}, got {family.kind!r}")
    names = (model_types,) if isinstance(model_types, str) else model_types
    for name in names:
        FAMILIES[name] = family


def _plain(pre: str, post: str) -> FFNFamily:
    return FFNFamily(kind="plain", pre=pre, post=post)


# GPT-2 and GPT-BigCode: c_fc -> act -> c_proj (GPT-2 uses Conv1D, weight [in, out]).
register_family(("gpt2", "gpt_bigcode"), _plain("h.{layer}.mlp.c_fc", "h.{layer}.mlp.c_proj"))
register_family("starcoder2", _plain("layers.{layer}.mlp.c_fc", "layers.{layer}.mlp.c_proj"))
register_family(
    "gpt_neox", _plain("layers.{layer}.mlp.dense_h_to_4h", "layers.{layer}.mlp.dense_4h_to_h")
)
# Bloom applies its gelu in a BloomGelu module between the two projections. With
# pretraining_tp > 1 and slow_but_exact, Bloom bypasses dense_4h_to_h's forward;
# loading.prepare_config turns slow_but_exact off so the pre-hook receives the input.
register_family(
    ("bloom", "falcon"), _plain("h.{layer}.mlp.dense_h_to_4h", "h.{layer}.mlp.dense_4h_to_h")
)
register_family("gptj", _plain("h.{layer}.mlp.fc_in", "h.{layer}.mlp.fc_out"))
# OPT has no MLP module: fc1 and fc2 hang off the decoder layer, which flattens
# the hidden states to [B*T, D] before them.
register_family("opt", _plain("layers.{layer}.fc1", "layers.{layer}.fc2"))
register_family("phi", _plain("layers.{layer}.mlp.fc1", "layers.{layer}.mlp.fc2"))
# BERT and RoBERTa apply the activation inside BertIntermediate, after its dense;
# BertOutput.dense is the down projection (its dropout and LayerNorm come after it).
register_family(
    ("bert", "roberta"),
    _plain("layer.{layer}.intermediate.dense", "layer.{layer}.output.dense"),
)
register_family("distilbert", _plain("layer.{layer}.ffn.lin1", "layer.{layer}.ffn.lin2"))

# down_proj(act(gate_proj(x)) * up_proj(x)); Gemma's act is gelu-tanh, the rest SiLU by default.
register_family(
    (
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
    ),
    FFNFamily(
        kind="gated",
        pre="layers.{layer}.mlp.gate_proj",
        post="layers.{layer}.mlp.down_proj",
        up="layers.{layer}.mlp.up_proj",
    ),
)
# Phi-3: gate, up = gate_up_proj(x).chunk(2, dim=-1), so the gate is the first half.
register_family(
    "phi3",
    FFNFamily(
        kind="fused_gated",
        pre="layers.{layer}.mlp.gate_up_proj",
        post="layers.{layer}.mlp.down_proj",
        gate_half=0,
    ),
)

# Families whose FFN is a mixture of experts. Other MoE families are recognised
# by the expert-count fields of their config (see _expert_count).
MIXTURE_OF_EXPERTS_TYPES = frozenset(
    {
        "dbrx",
        "deepseek_v2",
        "deepseek_v3",
        "gpt_oss",
        "jamba",
        "jetmoe",
        "llama4",
        "minimax",
        "mixtral",
        "nllb_moe",
        "olmoe",
        "phimoe",
        "qwen2_moe",
        "qwen3_moe",
        "qwen3_next",
        "switch_transformers",
    }
)
EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def check_model_supported(config) -> None:
    """Reject mixture-of-experts and encoder-decoder families before any model is built.

    Raises UnsupportedModelError with one line that names the family.
    """
    model_type = config.model_type
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"model_type {model_type!r} is an encoder-decoder family, which nerve does not "
            "support yet; nerve measures decoder-only and encoder-only models"
        )
    if model_type in MIXTURE_OF_EXPERTS_TYPES or "moe" in model_type or _expert_count(config) > 1:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is a mixture-of-experts family, which nerve does not "
            "support yet; nerve measures dense FFN blocks only"
        )


def _expert_count(config) -> int:
    """Return the largest expert count in the config or its text sub-config (0 when none)."""
    configs = [config, getattr(config, "text_config", None)]
    counts = [
        getattr(sub_config, name, None)
        for sub_config in configs
        if sub_config is not None
        for name in EXPERT_COUNT_FIELDS
    ]
    return max((count for count in counts if isinstance(count, int)), default=0)


def override_family(up: str, down: str, gated: bool = False) -> FFNFamily:
    """Build the family given by ``--ffn-up PATTERN --ffn-down PATTERN [--gated]``.

    ``up`` names the module whose output is the pre-activation: the up
    projection of a plain FFN, or the gate projection of a gated one. With
    ``gated`` and a pre module twice as wide as the down projection's input,
    the module is a fused gate-and-up projection whose first half is the gate
    (the Phi-3 layout). Raises ValueError for a pattern without ``{layer}``.
    """
    for option, pattern in (("--ffn-up", up), ("--ffn-down", down)):
        if pattern.count("{layer}") != 1 or not re.fullmatch(r"[\w.{}]+", pattern):
            raise ValueError(
                f"{option} {pattern!r}: expected a dotted module name with one {{layer}} "
                "for the block index, e.g. 'model.layers.{layer}.mlp.up_proj'"
            )
    return FFNFamily(kind="gated" if gated else "plain", pre=up, post=down)


def resolve_ffn_points(
    model: nn.Module, model_type: str, family: FFNFamily | None = None
) -> list[FFNPoint]:
    """Find the measurement modules of every FFN block, ordered by layer.

    See :func:`resolve_ffn_layout`, which also returns where the patterns came from.
    """
    return resolve_ffn_layout(model, model_type, family).points


def resolve_ffn_layout(
    model: nn.Module, model_type: str, family: FFNFamily | None = None
) -> FFNLayout:
    """Find the measurement modules of every FFN block and where their patterns came from.

    ``family`` (a user override) takes precedence over the registry entry for
    ``model_type``; an unregistered family is inferred from the module tree.
    Raises UnsupportedModelError when no block matches, when some blocks of
    the model have no match, or when the pre and post widths disagree.
    """
    if family is not None:
        source = "override"
    elif model_type in FAMILIES:
        family, source = FAMILIES[model_type], "registry"
    else:
        from nerve_cli.ffn_structure import infer_ffn_family

        family, source = infer_ffn_family(model), "structure"
        _warn_inferred_once(model_type, family)

    pre_modules = _find_modules(model, family.pre)
    post_modules = _find_modules(model, family.post)
    up_modules = _find_modules(model, family.up) if family.up else {}
    _check_layers_match(model, model_type, family, pre_modules, post_modules)

    points = [
        _build_point(layer, family, pre_modules[layer], post_modules[layer], up_modules.get(layer))
        for layer in sorted(pre_modules)
    ]
    return FFNLayout(model_type=model_type, family=family, source=source, points=points)


def _warn_inferred_once(model_type: str, family: FFNFamily) -> None:
    """Warn about an inferred family once per process, not once per checkpoint."""
    key = (model_type, family)
    if key in _WARNED_INFERRED:
        return
    _WARNED_INFERRED.add(key)
    logger.warning(
        "model_type %r is not in nerve's family table; FFN modules inferred from the "
        "module tree (pre %s, post %s); check them with nerve inspect",
        model_type,
        family.pre,
        family.post,
    )


def _check_layers_match(model, model_type, family, pre_modules, post_modules) -> None:
    """Raise unless the pre and post patterns match the same layers, and every block."""
    if not pre_modules or set(pre_modules) != set(post_modules):
        raise UnsupportedModelError(
            f"no FFN blocks found for model_type {model_type!r}: patterns {family.pre!r} "
            f"and {family.post!r} matched layers {sorted(pre_modules)} and "
            f"{sorted(post_modules)}; pass the module names with --ffn-up and --ffn-down "
            "(see nerve inspect)"
        )

    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if isinstance(n_layers, int) and sorted(pre_modules) != list(range(n_layers)):
        missing = sorted(set(range(n_layers)) - set(pre_modules))
        raise UnsupportedModelError(
            f"model_type {model_type!r}: pattern {family.pre!r} matched layers "
            f"{sorted(pre_modules)} but the model has {n_layers} blocks (no match for "
            f"{missing}); pass patterns that match every block with --ffn-up and --ffn-down"
        )


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Compile a ``{layer}`` pattern into a regex matching the end of a module name."""
    escaped = re.escape(pattern).replace(re.escape("{layer}"), r"(?P<layer>\d+)")
    return re.compile(rf"(?:^|\.){escaped}$")


def _find_modules(model: nn.Module, pattern: str) -> dict[int, tuple[str, nn.Module]]:
    """Return ``{layer: (name, module)}`` for every module whose name matches ``pattern``.

    Raises UnsupportedModelError when two modules match for the same layer
    (e.g. a vision tower and a text model), since either could be meant.
    """
    regex = _pattern_regex(pattern)
    found: dict[int, tuple[str, nn.Module]] = {}
    for name, module in model.named_modules():
        match = regex.search(name)
        if not match:
            continue
        layer = int(match.group("layer"))
        if layer in found:
            raise UnsupportedModelError(
                f"pattern {pattern!r} matches both {found[layer][0]} and {name}; "
                "pass a longer pattern with --ffn-up and --ffn-down"
            )
        found[layer] = (name, module)
    return found


def output_width(module: nn.Module) -> int:
    """Return the output width of a linear-like module (nn.Linear or GPT-2's Conv1D)."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if hasattr(module, "nf"):  # transformers' Conv1D stores weight as [in, out]
        return int(module.nf)
    raise UnsupportedModelError(f"cannot read the output width of {type(module).__name__}")


def input_width(module: nn.Module) -> int:
    """Return the input width of a linear-like module (nn.Linear or GPT-2's Conv1D)."""
    if isinstance(module, nn.Linear):
        return module.in_features
    if hasattr(module, "nf"):
        return int(module.weight.shape[0])
    raise UnsupportedModelError(f"cannot read the input width of {type(module).__name__}")


def is_linear_like(module: nn.Module) -> bool:
    """Return whether a module is an nn.Linear or transformers' Conv1D."""
    return isinstance(module, nn.Linear) or (hasattr(module, "nf") and hasattr(module, "weight"))


def _build_point(layer, family, pre, post, up) -> FFNPoint:
    """Check the widths of one block's modules and return its FFNPoint."""
    pre_name, pre_module = pre
    post_name, post_module = post
    ffn_dim = input_width(post_module)
    pre_width = output_width(pre_module)

    kind = family.kind
    if kind == "gated" and up is None and pre_width == 2 * ffn_dim:
        kind = "fused_gated"  # an override with --gated on a fused gate-and-up projection

    pre_columns = None
    if kind == "fused_gated":
        if pre_width != 2 * ffn_dim:
            raise UnsupportedModelError(
                f"{pre_name}: fused projection width {pre_width} is not twice the FFN width {ffn_dim}"
            )
        start = family.gate_half * ffn_dim
        pre_columns = (start, start + ffn_dim)
    elif pre_width != ffn_dim:
        raise UnsupportedModelError(
            f"{pre_name}: output width {pre_width} differs from the input width {ffn_dim} of {post_name}"
        )
    if up is not None and output_width(up[1]) != ffn_dim:
        raise UnsupportedModelError(
            f"{up[0]}: output width {output_width(up[1])} differs from the FFN width {ffn_dim}"
        )

    return FFNPoint(
        layer=layer,
        kind=kind,
        pre_module=pre_name,
        post_module=post_name,
        ffn_dim=ffn_dim,
        up_module=up[0] if up else None,
        pre_columns=pre_columns,
    )
