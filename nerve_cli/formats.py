"""Checkpoint formats: how the weights of one checkpoint are stored on disk.

=============  ==============================================================
format         files
=============  ==============================================================
``hf``         a directory with ``config.json`` and ``model.safetensors``
``hf-sharded`` a directory with ``config.json``, ``model.safetensors.index.json``
               and ``model-0000k-of-0000n.safetensors`` shards
``hf-bin``     a directory with ``config.json`` and ``pytorch_model.bin`` (or its
               sharded form with ``pytorch_model.bin.index.json``)
``weights-file`` one file with the step in its name (``model_step_100.safetensors``,
               ``step_200.pt``) beside one ``config.json`` shared by the run
``nanogpt``    a nanoGPT ``ckpt.pt``: a pickle with ``model``, ``model_args``,
               ``iter_num`` and ``config``, and no ``config.json``
=============  ==============================================================

Safetensors is preferred when a directory holds both kinds of weight files.
A directory that holds only a parameter-efficient adapter (PEFT
``adapter_config.json`` / ``adapter_model.*``) and no full weights is skipped.
"""

from __future__ import annotations

import re
from pathlib import Path

HF = "hf"
HF_SHARDED = "hf-sharded"
HF_BIN = "hf-bin"
WEIGHTS_FILE = "weights-file"
NANOGPT = "nanogpt"

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_FILE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
NANOGPT_FILE = "ckpt.pt"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")

# A bare weight file with the step in its name: model_step_100.safetensors, step_200.pt,
# iter_300.pth, ckpt_400.pt, checkpoint-500.bin.
WEIGHT_FILE_PATTERN = re.compile(
    r"^(?:.*?[_.-])?(?:step|iter|global_step|checkpoint|ckpt)[_-]?(\d+)\.(safetensors|pt|pth|bin)$"
)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin")


def directory_format(directory: Path) -> str:
    """Return the format of a checkpoint directory that is not adapter-only.

    A directory without recognised weight files is reported as ``hf``, so that
    loading it fails with a message naming the files it lacks.
    """
    if (directory / SAFETENSORS_INDEX).is_file() or any(directory.glob("model-*-of-*.safetensors")):
        return HF_SHARDED
    if (directory / SAFETENSORS_FILE).is_file():
        return HF
    if (directory / PICKLE_FILE).is_file() or (directory / PICKLE_INDEX).is_file():
        return HF_BIN
    if not (directory / CONFIG_FILE).is_file() and (directory / NANOGPT_FILE).is_file():
        return NANOGPT
    return HF


def adapter_only_reason(directory: Path) -> str | None:
    """Return why a directory is skipped when it contains an adapter but no full weights, else None."""
    adapter = next((name for name in ADAPTER_FILES if (directory / name).is_file()), None)
    if adapter is None or has_model_weights(directory):
        return None
    return (
        f"holds only a parameter-efficient adapter ({adapter}) and no full model weights; "
        "merge it into its base model (peft merge_and_unload, then save_pretrained) to analyze it"
    )


def has_model_weights(directory: Path) -> bool:
    """Return whether a directory contains full-model weights in any supported format."""
    return directory_format(directory) != HF or (directory / SAFETENSORS_FILE).is_file()


def weight_file_step(path: Path) -> int | None:
    """Return the step in a bare weight file's name, or None when the name has none."""
    match = WEIGHT_FILE_PATTERN.match(path.name)
    return int(match.group(1)) if match else None


def is_pickle_file(path: Path) -> bool:
    """Return whether a weight file is pickle-based (read only with weights_only=True)."""
    return path.suffix in PICKLE_SUFFIXES
