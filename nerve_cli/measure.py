"""Measure one loaded model: stream the probe, then turn covariances into metrics.

:func:`measure_model` runs the forward passes with hooks attached and
returns covariance accumulators and the probe loss. :func:`compute_layer_results`
takes eigenvalues and computes the per-layer metrics of the ``metrics`` table
and the rows of the ``spectra`` table. Neither does any file I/O.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from nerve_cli import metrics
from nerve_cli.architectures import FFNPoint
from nerve_cli.capture import LayerAccumulators, TokenMask, capture_ffn_activations
from nerve_cli.covariance import (
    CovarianceAccumulator,
    LinearMapCovariance,
    StreamingCovariance,
    compute_covariance_eigenvalues,
    default_product_dtype,
)
from nerve_cli.probe import Probe

logger = logging.getLogger(__name__)


@dataclass
class Measurement:
    """Covariance accumulators of every FFN block after one pass over the probe."""

    layers: list[LayerAccumulators]
    n_tokens: int
    probe_loss: float | None


@dataclass
class LayerResult:
    """Metrics and spectra of one FFN block; metrics are None when ``null_reason`` is set."""

    layer: int
    ffn_dim: int
    values: dict[str, float] | None
    eigenvalues_pre: np.ndarray | None
    eigenvalues_post: np.ndarray | None
    null_reason: str | None = None


def measure_model(
    model: nn.Module,
    points: list[FFNPoint],
    probe: Probe,
    batch_size: int,
    causal_lm: bool,
    product_dtype: torch.dtype | None = None,
    show_progress: bool = True,
) -> Measurement:
    """Stream the probe through ``model`` in batches and accumulate FFN covariances.

    The accumulators live on the model's device. ``product_dtype`` None takes
    :func:`~nerve_cli.covariance.default_product_dtype` for that device. The
    probe loss is the mean next-token cross-entropy (nats) over every
    predicted position of every sequence, from the same forward passes. It is
    None for models that are not causal LMs.
    """
    device = next(model.parameters()).device
    layers = build_layer_accumulators(model, points, device, product_dtype)
    tokens = TokenMask()
    # The loss sum stays on the device, so no batch waits for the previous one.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    loss_count = 0

    token_ids = torch.from_numpy(probe.token_ids)  # [S, T]
    batches = torch.split(token_ids, batch_size)
    progress = tqdm(
        batches,
        desc="probe batches",
        unit="batch",
        leave=False,
        # None hides the per-batch bar when stderr is not a terminal, e.g. in a batch job's log.
        disable=None if show_progress else True,
    )
    with torch.inference_mode(), capture_ffn_activations(model, layers, tokens):
        for batch in progress:
            batch = batch.to(device)  # [B, T]
            output = model(input_ids=batch)
            if causal_lm:
                loss_sum += summed_next_token_loss(output.logits, batch)
                loss_count += batch[:, 1:].numel()

    _check_hooks_fired(layers, len(batches))
    probe_loss = float(loss_sum) / loss_count if causal_lm and loss_count else None
    return Measurement(layers=layers, n_tokens=layers[0].pre.count, probe_loss=probe_loss)


def build_layer_accumulators(
    model: nn.Module,
    points: list[FFNPoint],
    device: torch.device,
    product_dtype: torch.dtype | None,
) -> list[LayerAccumulators]:
    """Create the pre and post accumulators of every FFN block on ``device``."""
    product_dtype = product_dtype or default_product_dtype(device)
    modules = dict(model.named_modules())
    return [
        LayerAccumulators(
            point=point,
            pre=build_pre_accumulator(modules[point.pre_module], point, device, product_dtype),
            post=StreamingCovariance(point.ffn_dim, device, product_dtype),
        )
        for point in points
    ]


def build_pre_accumulator(
    module: nn.Module, point: FFNPoint, device: torch.device, product_dtype: torch.dtype
) -> CovarianceAccumulator:
    """Return the accumulator of a block's pre point.

    When the pre module is exactly ``nn.Linear`` or transformers' ``Conv1D``
    (not a subclass, which may quantize or add adapters) and its input is
    narrower than the FFN, the covariance is accumulated from the input and
    mapped through the weight (see :class:`LinearMapCovariance`). Otherwise
    the module's output is accumulated directly.
    """
    weight_and_bias = linear_map_of(module, point.pre_columns)
    if weight_and_bias is not None:
        weight, bias = weight_and_bias  # weight: [D, d_in]
        if weight.shape == (point.ffn_dim, weight.shape[1]) and weight.shape[1] < point.ffn_dim:
            return LinearMapCovariance(weight, bias, device, product_dtype)
    return StreamingCovariance(point.ffn_dim, device, product_dtype)


def linear_map_of(
    module: nn.Module, columns: tuple[int, int] | None
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Return ``(W [out, in], b)`` with ``output = input W^T + b``, or None for other modules.

    ``columns`` keeps the ``[start, stop)`` outputs of a fused projection.
    """
    from transformers.pytorch_utils import Conv1D

    if type(module) is nn.Linear:
        weight, bias = module.weight, module.bias  # weight: [out, in]
    elif type(module) is Conv1D:
        weight, bias = module.weight.T, module.bias  # Conv1D stores [in, out]
    else:
        return None
    if weight.device.type == "meta" or not weight.is_floating_point():
        return None
    if columns is not None:
        weight = weight[columns[0] : columns[1]]
        bias = None if bias is None else bias[columns[0] : columns[1]]
    return weight, bias


def next_token_loss(logits: torch.Tensor, token_ids: torch.Tensor) -> tuple[float, int]:
    """Return the summed next-token cross-entropy (nats) of a batch and the count of targets."""
    return float(summed_next_token_loss(logits, token_ids)), int(token_ids[:, 1:].numel())


def summed_next_token_loss(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Return the summed next-token cross-entropy (nats) of a batch as a float64 scalar tensor."""
    predictions = logits[:, :-1, :].float()  # [B, T-1, V]
    targets = token_ids[:, 1:]  # [B, T-1]
    total = F.cross_entropy(
        predictions.reshape(-1, predictions.shape[-1]), targets.reshape(-1), reduction="sum"
    )
    return total.double()


def _check_hooks_fired(layers: list[LayerAccumulators], n_batches: int) -> None:
    """Raise when a hook did not run once per batch: the modules were not on the forward path."""
    for layer in layers:
        for point_name, calls in layer.calls.items():
            if calls != n_batches:
                module = layer.point.pre_module if point_name == "pre" else layer.point.post_module
                raise RuntimeError(
                    f"{module}: hook ran {calls} times for {n_batches} batches; "
                    "this module is not called once per forward pass"
                )


def compute_layer_results(measurement: Measurement) -> list[LayerResult]:
    """Solve every layer's eigenvalue problems and compute its metrics.

    When any activation was NaN or Inf, or fewer than two tokens were seen,
    every layer gets null metrics and one reason, which names the first layer
    where the values broke: later layers consumed that broken output. A layer
    whose activations have no variance gets null metrics of its own.
    """
    reason = _checkpoint_null_reason(measurement)
    if reason is not None:
        return [
            LayerResult(layer.point.layer, layer.point.ffn_dim, None, None, None, reason)
            for layer in measurement.layers
        ]

    accumulators = [acc for layer in measurement.layers for acc in (layer.pre, layer.post)]
    spectra = compute_covariance_eigenvalues(accumulators)
    return [
        _layer_result(layer.point.layer, layer.point.ffn_dim, spectra[2 * i], spectra[2 * i + 1])
        for i, layer in enumerate(measurement.layers)
    ]


def _checkpoint_null_reason(measurement: Measurement) -> str | None:
    """Return why no layer of this checkpoint has metrics, or None when they all can."""
    if measurement.n_tokens < 2:
        return f"only {measurement.n_tokens} token(s) entered the covariance; at least 2 are needed"
    for layer in measurement.layers:
        for point_name, accumulator in (("pre", layer.pre), ("post", layer.post)):
            if not accumulator.finite:
                return f"NaN or Inf activations, first in the {point_name} point of layer {layer.point.layer}"
    return None


def _layer_result(
    layer: int, ffn_dim: int, eigenvalues_pre: np.ndarray, eigenvalues_post: np.ndarray
) -> LayerResult:
    """Compute SE, PR, EEE of both points, their JS and the derived columns."""
    pre, n_negative_pre = metrics.clip_eigenvalues(eigenvalues_pre)
    post, n_negative_post = metrics.clip_eigenvalues(eigenvalues_post)
    if n_negative_pre or n_negative_post:
        logger.debug(
            "layer %d: clipped %d pre and %d post negative eigenvalues (rounding noise) to 0",
            layer,
            n_negative_pre,
            n_negative_post,
        )
    try:
        values = spectrum_values(pre, post)
    except metrics.DegenerateSpectrumError as error:
        return LayerResult(layer, ffn_dim, None, pre, post, f"layer {layer}: {error}")
    return LayerResult(layer, ffn_dim, values, pre, post)


def spectrum_values(pre: np.ndarray, post: np.ndarray) -> dict[str, float]:
    """Return the metric columns of one layer from its clipped pre and post spectra."""
    m_pre = metrics.compute_spectrum_metrics(pre)
    m_post = metrics.compute_spectrum_metrics(post)
    return {
        "se_pre": m_pre.se,
        "se_post": m_post.se,
        "pr_pre": m_pre.pr,
        "pr_post": m_post.pr,
        "eee_pre": m_pre.eee,
        "eee_post": m_post.eee,
        "js": metrics.js_divergence(pre, post),
        "pr_gain": m_post.pr / m_pre.pr,
        "eee_delta": m_post.eee - m_pre.eee,
        "se_delta": m_post.se - m_pre.se,
    }
