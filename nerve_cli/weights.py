"""Read state dicts from weight files and check that they fill a model exactly.

Safetensors files are read with ``safetensors.torch.load_file``; pickle-based
files (``.bin``, ``.pt``, ``.pth``) only through
:func:`nerve_cli.safe_load.load_torch_file`, which unpickles with
``weights_only=True``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from nerve_cli import formats
from nerve_cli.errors import CheckpointError
from nerve_cli.safe_load import load_torch_file

logger = logging.getLogger(__name__)

# torch.compile wraps the model as _orig_mod, DistributedDataParallel as module.
WRAPPER_PREFIXES = ("_orig_mod.", "module.")
# Keys under which training scripts commonly nest the model's state dict in a .pt file.
NESTED_STATE_DICT_KEYS = ("model", "state_dict", "model_state_dict")
MAX_KEYS_LISTED = 5


def read_pickle_directory(directory: Path) -> dict[str, torch.Tensor]:
    """Read ``pytorch_model.bin``, or every shard listed in ``pytorch_model.bin.index.json``."""
    index_path = directory / formats.PICKLE_INDEX
    if not index_path.is_file():
        return load_torch_file(directory / formats.PICKLE_FILE)

    weight_map = json.loads(index_path.read_text(encoding="utf-8")).get("weight_map", {})
    state_dict: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        state_dict.update(load_torch_file(directory / shard))
    return state_dict


def read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a bare weight file into a state dict with wrapper prefixes removed.

    A ``.pt`` file may hold the state dict itself or nest it under ``model``,
    ``state_dict`` or ``model_state_dict``. Raises CheckpointError when no
    state dict of tensors is found.
    """
    if formats.is_pickle_file(path):
        content = load_torch_file(path)
    else:
        from safetensors.torch import load_file

        content = load_file(path)

    state_dict = _unwrap_state_dict(content)
    if state_dict is None:
        found = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise CheckpointError(
            f"{path}: no state dict of tensors found (top-level keys: {found}); save "
            "model.state_dict() itself or under 'model' or 'state_dict'"
        )
    return {strip_wrapper_prefixes(key): tensor for key, tensor in state_dict.items()}


def strip_wrapper_prefixes(key: str) -> str:
    """Remove the ``_orig_mod.`` (torch.compile) and ``module.`` (DDP) prefixes of a key."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                stripped = True
    return key


def _unwrap_state_dict(content) -> dict[str, torch.Tensor] | None:
    if _is_state_dict(content):
        return content
    if isinstance(content, dict):
        for key in NESTED_STATE_DICT_KEYS:
            if _is_state_dict(content.get(key)):
                return content[key]
    return None


def _is_state_dict(value) -> bool:
    return (
        isinstance(value, dict)
        and len(value) > 0
        and all(isinstance(tensor, torch.Tensor) for tensor in value.values())
    )


def check_loading_info(info: dict, source: Path, model, strict_unexpected: bool) -> None:
    """Raise CheckpointError when weights were missing or had the wrong shape.

    ``info`` is what ``from_pretrained(..., output_loading_info=True)`` returns;
    transformers has already matched tied embeddings (either name may be
    stored) and base-model prefixes. Keys outside the base model, such as the
    heads of a task model when nerve loads the bare encoder, are ignored.
    Other unexpected keys raise when ``strict_unexpected`` and are logged
    otherwise.
    """
    missing = sorted(info.get("missing_keys") or ())
    mismatched = sorted(str(item) for item in info.get("mismatched_keys") or ())
    if missing or mismatched:
        problems = []
        if missing:
            problems.append(f"missing {_list_keys(missing)}")
        if mismatched:
            problems.append(f"wrong shape {_list_keys(mismatched)}")
        raise CheckpointError(
            f"{source}: the weights do not fit the model built from its config: "
            f"{'; '.join(problems)}; check that the config belongs to these weights"
        )

    unexpected = _unexpected_in_model(sorted(info.get("unexpected_keys") or ()), model)
    if unexpected and strict_unexpected:
        raise CheckpointError(
            f"{source}: the weights hold keys the model built from its config does not have: "
            f"{_list_keys(unexpected)}; check that the config belongs to these weights"
        )
    if unexpected:
        logger.warning(
            "%s: ignored weights the model does not use: %s", source, _list_keys(unexpected)
        )


def _unexpected_in_model(unexpected: list[str], model) -> list[str]:
    """Drop keys of heads that a bare base model does not build (e.g. BERT's ``cls.*``)."""
    prefix = getattr(model, "base_model_prefix", "")
    if not prefix or hasattr(model, prefix):
        return unexpected  # the model has a head, so every unexpected key counts
    own_roots = {name for name, _ in model.named_children()} | {prefix}
    return [key for key in unexpected if key.split(".", 1)[0] in own_roots]


def _list_keys(keys: list[str]) -> str:
    listed = ", ".join(keys[:MAX_KEYS_LISTED])
    more = len(keys) - MAX_KEYS_LISTED
    return f"{listed} and {more} more" if more > 0 else listed
