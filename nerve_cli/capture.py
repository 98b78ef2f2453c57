"""Forward hooks that feed FFN activations into streaming covariances.

Hooks are global state on the model, so they live only inside
:func:`capture_ffn_activations`, which removes every handle on exit, also when
the forward pass raises. Each hook reduces its activation into the
accumulator at once, so in-place operations later in the block cannot change
what was measured, and no activation outlives the hook call.

The pre point is fed either the pre module's output or, when its accumulator
is a :class:`~nerve_cli.covariance.LinearMapCovariance`, the module's input,
from which the covariance of the output follows exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from nerve_cli.architectures import FFNPoint
from nerve_cli.covariance import CovarianceAccumulator, LinearMapCovariance


@dataclass
class TokenMask:
    """The token positions of the current batch that enter the covariance.

    ``mask`` is a bool tensor ``[B, T]`` or None when every position counts.
    The measurement loop sets it before each forward pass.
    """

    mask: torch.Tensor | None = None

    def select(self, activations: torch.Tensor) -> torch.Tensor:
        """Flatten ``[B, T, D]`` activations to ``[N, D]`` rows of the counted positions."""
        if self.mask is None:
            return activations.reshape(-1, activations.shape[-1])
        return activations[self.mask]  # [N, D]


@dataclass
class LayerAccumulators:
    """The pre and post covariance accumulators of one FFN block.

    A :class:`LinearMapCovariance` as ``pre`` is fed the input of the pre
    module, any other accumulator its output.
    """

    point: FFNPoint
    pre: CovarianceAccumulator
    post: CovarianceAccumulator
    calls: dict[str, int] = field(default_factory=lambda: {"pre": 0, "post": 0})


def _pre_input_hook_fn(accumulators: LayerAccumulators, tokens: TokenMask):
    def hook(module: nn.Module, inputs) -> None:
        activations = inputs[0]  # [B, T, d_in], what the pre module receives
        accumulators.pre.update(tokens.select(activations.detach()))
        accumulators.calls["pre"] += 1

    return hook


def _pre_hook_fn(accumulators: LayerAccumulators, tokens: TokenMask):
    columns = accumulators.point.pre_columns

    def hook(module: nn.Module, inputs, output) -> None:
        activations = output[0] if isinstance(output, tuple) else output  # [B, T, D or 2D]
        if columns is not None:
            activations = activations[..., columns[0] : columns[1]]  # [B, T, D]
        accumulators.pre.update(tokens.select(activations.detach()))
        accumulators.calls["pre"] += 1

    return hook


def _post_hook_fn(accumulators: LayerAccumulators, tokens: TokenMask):
    def hook(module: nn.Module, inputs) -> None:
        activations = inputs[0]  # [B, T, D], what the down projection receives
        accumulators.post.update(tokens.select(activations.detach()))
        accumulators.calls["post"] += 1

    return hook


@contextlib.contextmanager
def capture_ffn_activations(
    model: nn.Module, accumulators: list[LayerAccumulators], tokens: TokenMask
) -> Iterator[None]:
    """Register pre and post hooks for every FFN block; remove them all on exit."""
    modules = dict(model.named_modules())
    handles = []
    try:
        for layer in accumulators:
            pre_module = modules[layer.point.pre_module]
            post_module = modules[layer.point.post_module]
            if isinstance(layer.pre, LinearMapCovariance):
                hook = pre_module.register_forward_pre_hook(_pre_input_hook_fn(layer, tokens))
            else:
                hook = pre_module.register_forward_hook(_pre_hook_fn(layer, tokens))
            handles.append(hook)
            handles.append(post_module.register_forward_pre_hook(_post_hook_fn(layer, tokens)))
        yield
    finally:
        for handle in handles:
            handle.remove()
