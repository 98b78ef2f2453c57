"""Check a checkpoint's files before any model is built.

Training jobs die mid-save and copies stop half-way, so a checkpoint directory
may hold an empty weight file, a Git LFS pointer, a truncated safetensors file
or a shard index that names a missing shard. The libraries that load weights
report these late and in their own terms. The checks here read only file
sizes, headers, the shard index and the pickle structure, and raise
:class:`~nerve_cli.errors.CheckpointError` with one line that names the file,
what it is and what to do.

Only the files that loading reads are checked: the safetensors set when it
exists, else the ``pytorch_model.bin`` set. Trainer state files such as
``optimizer.pt`` or ``training_args.bin`` are never opened.
"""

from __future__ import annotations

import json
import logging
import struct
import zipfile
from pathlib import Path
from typing import Any

from nerve_cli.errors import CheckpointError
from nerve_cli.safe_load import load_torch_file

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
SAFETENSORS_WEIGHTS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_WEIGHTS = "pytorch_model.bin"
PYTORCH_INDEX = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Checkpoint formats named by discovery: Hugging Face directories (single file,
# sharded, pytorch_model.bin), and bare weight files that share the run's config.json.
HF_DIRECTORY_FORMATS = ("hf", "hf-sharded", "hf-bin")
CONFIG_FORMATS = (*HF_DIRECTORY_FORMATS, "weights-file")
# Files written by the Trainer beside the weights; they are not model weights.
TRAINER_STATE_FILES = ("optimizer.pt", "scheduler.pt", "training_args.bin", "scaler.pt")

LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/"
# The safetensors format caps its JSON header at 100 MB.
SAFETENSORS_MAX_HEADER = 100_000_000
SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
}


def check_checkpoint(path: Path, format: str = "hf") -> None:
    """Raise CheckpointError unless ``path`` looks loadable, without building a model.

    ``format`` is the checkpoint format from discovery. A Hugging Face
    directory needs a valid config.json and a complete set of weight files.
    A bare weight file needs a valid config.json beside it, except a nanoGPT
    ``ckpt.pt``, which carries its own configuration. A directory of another
    format has each of its weight files checked.
    """
    if not path.exists():
        raise CheckpointError(f"{path}: path not found")
    if path.is_file():
        if format in CONFIG_FORMATS:
            check_config(path.parent)
        check_weight_file(path)
        return
    if not any(path.iterdir()):
        raise CheckpointError(
            f"{path}: empty directory; the save was probably interrupted, "
            "delete it or save the checkpoint again"
        )
    if format in HF_DIRECTORY_FORMATS:
        check_config(path)
        for weight_file in find_hf_weight_files(path):
            check_weight_file(weight_file)
        return
    for weight_file in sorted(path.iterdir()):
        if _is_weight_file(weight_file):
            check_weight_file(weight_file)


def _is_weight_file(path: Path) -> bool:
    """Return whether a file in a non-Hugging-Face checkpoint directory contains weights."""
    if not path.is_file() or path.name in TRAINER_STATE_FILES:
        return False
    if path.name.startswith("rng_state"):
        return False
    return path.suffix == ".safetensors" or path.suffix in PICKLE_SUFFIXES


def check_config(checkpoint_dir: Path) -> dict[str, Any]:
    """Return the parsed config.json of a checkpoint directory, or raise CheckpointError.

    The file must exist, be a JSON object, and name in ``model_type`` a model
    family that the installed transformers has registered.
    """
    path = checkpoint_dir / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{path}: not found; a Hugging Face checkpoint needs its config.json, "
            "copy it from the training run"
        )
    config = read_json_object(path)

    model_type = config.get("model_type")
    if model_type is None:
        raise CheckpointError(
            f'{path}: field "model_type" is missing; add the model family, e.g. "gpt2" or "llama"'
        )
    if not _is_known_model_type(model_type):
        import transformers

        raise CheckpointError(
            f'{path}: field "model_type" is {model_type!r}, which transformers '
            f"{transformers.__version__} does not know; fix the name or upgrade transformers"
        )
    return config


def _is_known_model_type(model_type: object) -> bool:
    """Return whether transformers has a config class registered for ``model_type``."""
    from transformers import CONFIG_MAPPING

    return isinstance(model_type, str) and model_type in CONFIG_MAPPING


def read_json_object(path: Path) -> dict[str, Any]:
    """Read a JSON file that must contain an object; raise CheckpointError naming the file."""
    check_not_placeholder(path, "JSON")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError(
            f"{path}: not a text file, expected JSON; copy the file again"
        ) from None
    except json.JSONDecodeError as error:
        raise CheckpointError(
            f"{path}: invalid JSON at line {error.lineno} column {error.colno} ({error.msg}); "
            "fix the file or copy it again"
        ) from None
    if not isinstance(data, dict):
        raise CheckpointError(
            f"{path}: expected a JSON object, found {type(data).__name__}; copy the file again"
        )
    return data


def find_hf_weight_files(checkpoint_dir: Path) -> list[Path]:
    """Return the weight files transformers would read, after checking any shard index.

    Safetensors are preferred over ``pytorch_model.bin``, as in transformers.
    Raises CheckpointError when there is no weight file or the index is broken.
    """
    for index_name, single_name in (
        (SAFETENSORS_INDEX, SAFETENSORS_WEIGHTS),
        (PYTORCH_INDEX, PYTORCH_WEIGHTS),
    ):
        if (checkpoint_dir / single_name).exists():
            return [checkpoint_dir / single_name]
        if (checkpoint_dir / index_name).exists():
            return check_shard_index(checkpoint_dir / index_name)
    raise CheckpointError(
        f"{checkpoint_dir}: no weight file ({SAFETENSORS_WEIGHTS}, {PYTORCH_WEIGHTS} or a "
        "sharded index); the save was probably interrupted, delete the directory or save it again"
    )


def check_shard_index(index_path: Path) -> list[Path]:
    """Check a sharded checkpoint's index against its shards; return the shard paths.

    Every shard named in ``weight_map`` must exist and pass
    :func:`check_weight_file`. For safetensors shards, every tensor must be
    in the shard the index names, which is read from the shard's header.
    """
    weight_map = read_json_object(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(
            f'{index_path}: field "weight_map" is missing or empty; save the checkpoint again'
        )

    tensors_by_shard: dict[str, list[str]] = {}
    for tensor_name, shard_name in weight_map.items():
        tensors_by_shard.setdefault(str(shard_name), []).append(tensor_name)

    shard_paths = []
    for shard_name, tensor_names in sorted(tensors_by_shard.items()):
        shard_path = index_path.parent / shard_name
        if not shard_path.is_file():
            raise CheckpointError(
                f"{index_path}: shard {shard_name} not found (the index maps "
                f"{len(tensor_names)} tensors to it); copy the shard into {index_path.parent}"
            )
        held = check_weight_file(shard_path)
        if held is not None:
            _check_shard_holds(index_path, shard_name, tensor_names, held)
        shard_paths.append(shard_path)
    return shard_paths


def _check_shard_holds(
    index_path: Path, shard_name: str, tensor_names: list[str], held: set[str]
) -> None:
    """Raise CheckpointError naming the first tensor that the index maps to a shard without it."""
    missing = sorted(set(tensor_names) - held)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(
            f"{index_path}: tensor {missing[0]!r}{more} is mapped to {shard_name}, which does "
            "not contain it; the index does not match the shards, save the checkpoint again"
        )


def check_weight_file(path: Path) -> set[str] | None:
    """Check one weight file; return its tensor names when the format stores them in a header.

    Raises CheckpointError for an empty file, a Git LFS pointer, an HTML
    page, or a file whose start was never written. It also raises for a
    safetensors file whose size disagrees with its header, and for a pickle
    file that is incomplete or needs globals beyond tensors and plain values.
    """
    check_not_placeholder(path)
    if path.suffix == ".safetensors":
        return check_safetensors_file(path)
    if path.suffix in PICKLE_SUFFIXES:
        check_torch_file(path)
        return None
    raise CheckpointError(
        f"{path}: unknown weight file type {path.suffix!r}; expected .safetensors, "
        f"{', '.join(PICKLE_SUFFIXES)}"
    )


def check_not_placeholder(path: Path, content: str = "weights") -> None:
    """Raise CheckpointError when a file is empty, a Git LFS pointer, HTML, or all zero bytes.

    ``content`` names what the file should contain, for the message.
    """
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(
            f"{path}: empty file (0 bytes); the save or copy was interrupted, copy or save it again"
        )
    with open(path, "rb") as handle:
        start = handle.read(4096)

    if start.startswith(LFS_POINTER_PREFIX):
        raise CheckpointError(
            f"{path}: Git LFS pointer, not {content} ({size} bytes of text); "
            "run 'git lfs pull' in the repository it came from"
        )
    if start.lstrip()[:15].lower().startswith((b"<!doctype html", b"<html")):
        raise CheckpointError(
            f"{path}: HTML page, not {content}; the download failed, download the file again"
        )
    if start.count(0) == len(start):
        raise CheckpointError(
            f"{path}: the first {len(start)} bytes are all zero, so the data was never written "
            "(an interrupted save or copy); copy or save it again"
        )


def check_safetensors_file(path: Path) -> set[str]:
    """Check a safetensors file's header and size; return the names of its tensors.

    The format is an 8-byte little-endian header length ``n``, ``n`` bytes of
    JSON that give each tensor's dtype, shape and ``data_offsets`` into the
    data buffer, then the buffer. The file size must be exactly ``8 + n``
    plus the largest end offset, so truncation and appended bytes are caught
    without reading the tensors.
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise _not_safetensors(path, f"{size} bytes, shorter than the 8-byte header length")
        (header_size,) = struct.unpack("<Q", prefix)
        header_bytes = handle.read(min(header_size, SAFETENSORS_MAX_HEADER, size - 8))

    # A real header is JSON, so it starts with "{"; anything else is not safetensors at all.
    if header_size > SAFETENSORS_MAX_HEADER or not header_bytes.startswith(b"{"):
        raise _not_safetensors(
            path, f"its header length field reads {header_size} bytes, and no JSON header follows"
        )
    if 8 + header_size > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file, expected at least {8 + header_size} bytes "
            f"for its header, found {size}; copy or save it again"
        )

    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _not_safetensors(path, "its header is not JSON") from None
    if not isinstance(header, dict):
        raise _not_safetensors(path, "its header is not a JSON object")

    data_size = _safetensors_data_size(path, header)
    expected = 8 + header_size + data_size
    if size < expected:
        raise CheckpointError(
            f"{path}: truncated safetensors file, expected {expected} bytes from its header, "
            f"found {size}; copy or save it again"
        )
    if size > expected:
        raise CheckpointError(
            f"{path}: safetensors file has {size - expected} bytes after its data, expected "
            f"{expected} bytes from its header, found {size}; the file is corrupt, copy or save it again"
        )
    return {name for name in header if name != "__metadata__"}


def _safetensors_data_size(path: Path, header: dict[str, Any]) -> int:
    """Return the data buffer size a safetensors header describes, checking each entry."""
    end_max = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = (int(offset) for offset in entry["data_offsets"])
            shape = [int(dim) for dim in entry["shape"]]
            dtype = str(entry["dtype"])
        except (KeyError, TypeError, ValueError):
            raise _not_safetensors(
                path, f"header entry {name!r} lacks dtype, shape or data_offsets"
            ) from None
        if not 0 <= start <= end:
            raise _not_safetensors(path, f"tensor {name!r} has data_offsets [{start}, {end}]")

        item_bytes = SAFETENSORS_DTYPE_BYTES.get(dtype)
        n_elements = 1
        for dim in shape:
            n_elements *= dim
        if item_bytes is not None and end - start != n_elements * item_bytes:
            raise CheckpointError(
                f"{path}: tensor {name!r} of dtype {dtype} and shape {shape} needs "
                f"{n_elements * item_bytes} bytes but its data_offsets span {end - start}; "
                "the file is corrupt, copy or save it again"
            )
        end_max = max(end_max, end)
    return end_max


def _not_safetensors(path: Path, reason: str) -> CheckpointError:
    return CheckpointError(f"{path}: not a safetensors file ({reason}); copy or save it again")


def check_torch_file(path: Path) -> None:
    """Check that a pickle-based weight file is complete and loads with ``weights_only=True``.

    The zip format (torch >= 1.6) is opened with ``mmap=True``, which
    unpickles the structure with the restricted unpickler but does not read
    tensor data. The legacy format cannot be mapped, so it is loaded in full
    and released.
    """
    with open(path, "rb") as handle:
        magic = handle.read(4)

    if magic == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path):
                pass
        except zipfile.BadZipFile as error:
            raise CheckpointError(
                f"{path}: truncated or corrupt zip archive ({error}); copy or save it again"
            ) from None
        load_torch_file(path, mmap=True)
        return
    if magic[:1] == b"\x80":  # the PROTO opcode that starts a binary pickle
        # NOTE: a legacy-format file is read in full here, and again when the model loads.
        load_torch_file(path)
        return
    raise CheckpointError(
        f"{path}: not a PyTorch weight file (neither a zip archive nor a pickle); "
        "copy or save it again"
    )
