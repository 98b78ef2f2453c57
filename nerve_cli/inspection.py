"""Inspection of a run: the checkpoints and FFN modules ``nerve analyze`` would measure.

:func:`inspect_run` lists a run's checkpoints with their steps and formats,
the paths skipped and why, the model family, and per FFN block the modules
used as ``pre`` and ``post`` with their widths. The model is built from the
first checkpoint's config on the meta device, so no weights are read and no
memory is allocated for them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from nerve_cli.architectures import FFNFamily, FFNLayout, output_width, resolve_ffn_layout
from nerve_cli.checkpoints import CheckpointRef, SkippedCheckpoint, scan_run
from nerve_cli.loading import build_model_skeleton, is_causal_lm, load_config

SOURCE_DESCRIPTIONS = {
    "registry": "nerve's family table",
    "structure": "the module tree (family not in nerve's table; check them)",
    "override": "--ffn-up/--ffn-down",
}


@dataclass(frozen=True)
class LayerMapping:
    """The modules measured in one FFN block, with the widths ``nerve inspect`` shows."""

    layer: int
    kind: str
    pre_module: str
    pre_width: int
    pre_columns: tuple[int, int] | None
    post_module: str
    ffn_dim: int
    up_module: str | None


@dataclass
class RunInspection:
    """A run's checkpoints and FFN mapping, or in ``error`` the reason there is no mapping."""

    run_dir: Path
    checkpoints: list[CheckpointRef]
    skipped: list[SkippedCheckpoint]
    model_type: str | None = None
    model_class: str | None = None
    is_causal_lm: bool | None = None
    source: str | None = None
    layers: list[LayerMapping] = field(default_factory=list)
    error: str | None = None


def resolve_planned_layout(
    checkpoint: CheckpointRef, config, family: FFNFamily | None = None
) -> FFNLayout:
    """Resolve the FFN layout of a checkpoint's model from its config, without its weights.

    Raises UnsupportedModelError for unsupported families and when no FFN is
    found, so a run stops before any checkpoint is loaded.
    """
    model = build_model_skeleton(config)
    return resolve_ffn_layout(model, config.model_type, family)


def inspect_run(run_dir: str | Path, family: FFNFamily | None = None) -> RunInspection:
    """Describe what ``nerve analyze`` would measure in ``run_dir``.

    Raises CheckpointDiscoveryError as :func:`nerve_cli.checkpoints.scan_run`
    does. A model that cannot be mapped is reported in ``error``, not raised.
    """
    scan = scan_run(run_dir)
    inspection = RunInspection(Path(run_dir), scan.checkpoints, scan.skipped)
    first = scan.checkpoints[0]
    try:
        config = load_config(first)
        inspection.model_type = config.model_type
        inspection.is_causal_lm = is_causal_lm(config)
        model = build_model_skeleton(config)
        inspection.model_class = type(model).__name__
        layout = resolve_ffn_layout(model, config.model_type, family)
    except (ValueError, OSError) as error:
        inspection.error = f"{first.path}: {' '.join(str(error).split())}"
        return inspection

    modules = dict(model.named_modules())
    inspection.source = layout.source
    inspection.layers = [
        LayerMapping(
            layer=point.layer,
            kind=point.kind,
            pre_module=point.pre_module,
            pre_width=output_width(modules[point.pre_module]),
            pre_columns=point.pre_columns,
            post_module=point.post_module,
            ffn_dim=point.ffn_dim,
            up_module=point.up_module,
        )
        for point in layout.points
    ]
    return inspection


def render_inspection(inspection: RunInspection) -> str:
    """Format an inspection as the plain-text report of ``nerve inspect``."""
    n_checkpoints = len(inspection.checkpoints)
    lines = [
        f"Run: {inspection.run_dir} ({n_checkpoints} checkpoint{'s' if n_checkpoints != 1 else ''}, "
        f"{len(inspection.skipped)} skipped)"
    ]
    rows = [(str(ref.step), ref.format, ref.relative) for ref in inspection.checkpoints]
    lines += _table(("step", "format", "checkpoint"), rows)
    if inspection.skipped:
        lines.append("Skipped:")
        lines += [f"  {item.relative}: {item.reason}" for item in inspection.skipped]

    first = inspection.checkpoints[0].relative
    if inspection.error:
        lines.append(f"Model of {first}: not measurable: {inspection.error}")
        return "\n".join(lines)

    role = "causal LM, probe loss measured" if inspection.is_causal_lm else "encoder, no probe loss"
    lines.append(f"Model of {first}: {inspection.model_type} ({inspection.model_class}, {role})")
    layers = inspection.layers
    lines.append(
        f"FFN: {layers[0].kind}, {len(layers)} blocks, width {layers[0].ffn_dim}; "
        f"modules from {SOURCE_DESCRIPTIONS[inspection.source]}"
    )
    header = ("layer", "pre (output width)", "post (input width)")
    has_up = any(layer.up_module for layer in layers)
    header += ("up (not measured)",) if has_up else ()
    lines += _table(header, [_layer_row(layer, has_up) for layer in layers])
    return "\n".join(lines)


def _layer_row(layer: LayerMapping, has_up: bool) -> tuple[str, ...]:
    pre = f"{layer.pre_module} ({layer.pre_width})"
    if layer.pre_columns is not None:
        start, stop = layer.pre_columns
        pre = f"{layer.pre_module}[..., {start}:{stop}] (gate half of {layer.pre_width})"
    row = (str(layer.layer), pre, f"{layer.post_module} ({layer.ffn_dim})")
    return row + ((layer.up_module or "",) if has_up else ())


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """Return left-aligned table lines, indented by two spaces."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    return [
        "  "
        + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in (header, *rows)
    ]


def inspection_to_json(inspection: RunInspection) -> str:
    """Format an inspection as JSON, for scripts."""
    data = {
        "run_dir": str(inspection.run_dir),
        "checkpoints": [
            {"step": ref.step, "format": ref.format, "checkpoint": ref.relative}
            for ref in inspection.checkpoints
        ],
        "skipped": [
            {"checkpoint": item.relative, "reason": item.reason} for item in inspection.skipped
        ],
        "model_type": inspection.model_type,
        "model_class": inspection.model_class,
        "is_causal_lm": inspection.is_causal_lm,
        "source": inspection.source,
        "layers": [layer.__dict__ for layer in inspection.layers],
        "error": inspection.error,
    }
    return json.dumps(data, indent=2)
