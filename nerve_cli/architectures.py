"""Where each model family's FFN blocks are measured.

For every FFN block nerve needs two modules:

* the ``pre`` module, whose forward output is the pre-activation: the up
  projection of a plain FFN, the gate projection of a gated FFN, or the fused
  gate-and-up projection, of which only the gate half is kept;
* the ``post`` module, the down projection, whose *input* (captured with a
  forward pre-hook) is the post-activation.

Families are registered by ``config.model_type`` with module-name patterns in
which ``{layer}`` stands for the block index. Patterns match the end of a
module's dotted name, so they work whether the model is wrapped by an LM head
(``transformer.h.0.mlp.c_fc``) or not (``h.0.mlp.c_fc``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

__all__ = [
    "FFNFamily",
    "FFNPoint",
    "UnsupportedModelError",
    "FAMILIES",
    "register_family",
    "resolve_ffn_points",
]


class UnsupportedModelError(ValueError):
    """Raised when no FFN measurement points can be found in a model."""


@dataclass(frozen=True)
class FFNFamily:
    """Module-name patterns of one model family's FFN blocks.

    ``kind`` is ``"plain"``, ``"gated"`` or ``"fused_gated"``. For fused
    families the pre module's output is ``[..., 2 * ffn_dim]`` and the gate is
    the half selected by ``gate_half`` (0 = first half).
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


FAMILIES: dict[str, FFNFamily] = {}


def register_family(model_types: str | tuple[str, ...], family: FFNFamily) -> None:
    """Register the FFN patterns of one or more ``config.model_type`` values."""
    names = (model_types,) if isinstance(model_types, str) else model_types
    for name in names:
        FAMILIES[name] = family


register_family(
    "gpt2", FFNFamily(kind="plain", pre="h.{layer}.mlp.c_fc", post="h.{layer}.mlp.c_proj")
)
register_family(
    ("llama", "mistral", "qwen2", "qwen3"),
    FFNFamily(
        kind="gated",
        pre="layers.{layer}.mlp.gate_proj",
        post="layers.{layer}.mlp.down_proj",
        up="layers.{layer}.mlp.up_proj",
    ),
)


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Compile a ``{layer}`` pattern into a regex matching the end of a module name."""
    escaped = re.escape(pattern).replace(re.escape("{layer}"), r"(?P<layer>\d+)")
    return re.compile(rf"(?:^|\.){escaped}$")


def _find_modules(model: nn.Module, pattern: str) -> dict[int, tuple[str, nn.Module]]:
    """Return ``{layer: (name, module)}`` for every module whose name matches ``pattern``."""
    regex = _pattern_regex(pattern)
    found: dict[int, tuple[str, nn.Module]] = {}
    for name, module in model.named_modules():
        match = regex.search(name)
        if match:
            found[int(match.group("layer"))] = (name, module)
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


def resolve_ffn_points(
    model: nn.Module, model_type: str, family: FFNFamily | None = None
) -> list[FFNPoint]:
    """Find the measurement modules of every FFN block, ordered by layer.

    ``family`` overrides the registry entry for ``model_type``. Raises
    UnsupportedModelError when the family is unknown, when no block matches,
    or when the pre and post widths disagree.
    """
    family = family or FAMILIES.get(model_type)
    if family is None:
        known = ", ".join(sorted(FAMILIES))
        raise UnsupportedModelError(f"model_type {model_type!r} is not supported (known: {known})")

    pre_modules = _find_modules(model, family.pre)
    post_modules = _find_modules(model, family.post)
    up_modules = _find_modules(model, family.up) if family.up else {}
    if not pre_modules or set(pre_modules) != set(post_modules):
        raise UnsupportedModelError(
            f"no FFN blocks found for model_type {model_type!r}: patterns {family.pre!r} "
            f"and {family.post!r} matched layers {sorted(pre_modules)} and {sorted(post_modules)}"
        )

    return [
        _build_point(layer, family, pre_modules[layer], post_modules[layer], up_modules.get(layer))
        for layer in sorted(pre_modules)
    ]


def _build_point(layer, family, pre, post, up) -> FFNPoint:
    """Check the widths of one block's modules and return its FFNPoint."""
    pre_name, pre_module = pre
    post_name, post_module = post
    ffn_dim = input_width(post_module)
    pre_width = output_width(pre_module)

    pre_columns = None
    if family.kind == "fused_gated":
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

    return FFNPoint(
        layer=layer,
        kind=family.kind,
        pre_module=pre_name,
        post_module=post_name,
        ffn_dim=ffn_dim,
        up_module=up[0] if up else None,
        pre_columns=pre_columns,
    )
