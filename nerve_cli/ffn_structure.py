"""Infer the FFN measurement modules of a family that is not in nerve's table.

The model's blocks are the ``nn.ModuleList`` with ``config.num_hidden_layers``
entries. Inside the first block, outside any attention submodule, the down
projection is the one linear layer that maps a width other than the hidden
size back to the hidden size. Its input width is the FFN width ``D``. The
projections into the FFN are the linear layers from the hidden size to ``D``
(one: a plain FFN; two, one named ``gate``: a gated FFN) or to ``2 D`` (a
fused gate-and-up projection named ``gate``, whose first half is taken as the
gate, as transformers' Phi-3 splits it). Anything else is ambiguous and
raises, asking for ``--ffn-up`` and ``--ffn-down``.

NOTE: the structure cannot show what happens between the two projections. An
FFN that normalises or rescales its hidden activations would be measured at the
wrong point; ``nerve inspect`` shows the inferred modules so a user can check.
"""

from __future__ import annotations

from torch import nn

from nerve_cli.architectures import (
    FFNFamily,
    UnsupportedModelError,
    input_width,
    is_linear_like,
    output_width,
)

ATTENTION_NAME_PARTS = ("attn", "attention")

REMEDY = "pass the module names with --ffn-up and --ffn-down"


def infer_ffn_family(model: nn.Module) -> FFNFamily:
    """Return FFN patterns inferred from the first block of ``model``.

    Raises UnsupportedModelError naming what was found when the block list,
    the down projection or the projections into the FFN are not unambiguous.
    """
    config = getattr(model, "config", None)
    blocks_name, first_block = find_block_list(model, getattr(config, "num_hidden_layers", None))
    hidden = getattr(config, "hidden_size", None)
    if not isinstance(hidden, int):
        raise UnsupportedModelError(f"the model config has no hidden_size; {REMEDY}")

    linears = [
        (name, module)
        for name, module in first_block.named_modules()
        if is_linear_like(module) and not _inside_attention(name)
    ]
    down_name, ffn_dim = _find_down_projection(linears, hidden, blocks_name)
    into_ffn = [
        (name, output_width(module))
        for name, module in linears
        if input_width(module) == hidden and output_width(module) in (ffn_dim, 2 * ffn_dim)
    ]

    prefix = f"{blocks_name}.{{layer}}."
    kind, pre, up = _classify_projections(into_ffn, ffn_dim, blocks_name)
    return FFNFamily(
        kind=kind,
        pre=prefix + pre,
        post=prefix + down_name,
        up=prefix + up if up else None,
        gate_half=0,
    )


def find_block_list(model: nn.Module, n_layers: int | None) -> tuple[str, nn.Module]:
    """Return the name of the model's list of blocks and its first block.

    With ``n_layers`` known, the list must have exactly that many entries;
    otherwise the longest ``nn.ModuleList`` is taken.
    """
    lists = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0
    ]
    if isinstance(n_layers, int):
        lists = [(name, module) for name, module in lists if len(module) == n_layers]
    elif lists:
        longest = max(len(module) for _, module in lists)
        lists = [(name, module) for name, module in lists if len(module) == longest]

    if len(lists) != 1:
        found = ", ".join(f"{name} ({len(module)})" for name, module in lists) or "none"
        raise UnsupportedModelError(
            f"cannot determine which module list contains the {n_layers or 'model'} blocks "
            f"(candidates: {found}); {REMEDY}"
        )
    name, blocks = lists[0]
    return name, blocks[0]


def _inside_attention(name: str) -> bool:
    return any(part in component for component in name.split(".") for part in ATTENTION_NAME_PARTS)


def _find_down_projection(linears, hidden: int, blocks_name: str) -> tuple[str, int]:
    """Return the down projection's name inside the block and its input width (the FFN width)."""
    downs = [
        (name, input_width(module))
        for name, module in linears
        if output_width(module) == hidden and input_width(module) != hidden
    ]
    if len(downs) != 1:
        names = ", ".join(name for name, _ in downs) or "none"
        raise UnsupportedModelError(
            f"{blocks_name}.0: expected one projection from the FFN width back to the hidden "
            f"size {hidden}, found {names}; {REMEDY}"
        )
    return downs[0]


def _classify_projections(into_ffn, ffn_dim: int, blocks_name: str) -> tuple[str, str, str | None]:
    """Return ``(kind, pre, up)`` from the projections into the FFN width."""
    plain = [name for name, width in into_ffn if width == ffn_dim]
    fused = [name for name, width in into_ffn if width == 2 * ffn_dim]
    gates = [name for name in plain if "gate" in name.rsplit(".", 1)[-1]]

    if len(plain) == 1 and not fused:
        return "plain", plain[0], None
    if len(plain) == 2 and len(gates) == 1:
        up = next(name for name in plain if name != gates[0])
        return "gated", gates[0], up
    if not plain and len(fused) == 1 and "gate" in fused[0].rsplit(".", 1)[-1]:
        return "fused_gated", fused[0], None

    names = ", ".join(name for name, _ in into_ffn) or "none"
    raise UnsupportedModelError(
        f"{blocks_name}.0: cannot determine the pre-activation projection among the projections "
        f"into the FFN width {ffn_dim} ({names}); {REMEDY}"
    )
