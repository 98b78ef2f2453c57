"""Read pickle-based weight files (``.pt``, ``.bin``, nanoGPT ``ckpt.pt``) without running code.

``torch.load`` is only ever called with ``weights_only=True``: its restricted
unpickler accepts tensors, containers and plain Python values and rejects any
other global. nerve adds the numpy scalar types that training scripts
commonly leave in checkpoints (e.g. ``iter_num`` or ``best_val_loss`` as numpy
values), with their dtypes. There is no fallback to unrestricted unpickling.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nerve_cli.errors import CheckpointError

# Plain numpy scalar types allowed inside pickled checkpoints. Arrays are not
# allowed: unpickling them needs numpy's _reconstruct, which torch does not allowlist.
NUMPY_SCALAR_TYPES = (
    np.float64,
    np.float32,
    np.float16,
    np.int64,
    np.int32,
    np.int16,
    np.int8,
    np.uint64,
    np.uint32,
    np.uint16,
    np.uint8,
    np.bool_,
)


class UnsafeCheckpointError(CheckpointError):
    """Raised when a pickle file needs a global that the safe unpickler does not allow."""


def _numpy_safe_globals() -> list[Any]:
    """Return the numpy types allowed inside pickled checkpoints: scalars and their dtypes."""
    allowed: list[Any] = [np.dtype, np.ndarray, *NUMPY_SCALAR_TYPES]
    # numpy >= 1.25 pickles a dtype through its class, e.g. numpy.dtypes.Float16DType.
    allowed += [type(np.dtype(scalar_type)) for scalar_type in NUMPY_SCALAR_TYPES]
    # numpy >= 1.25 pickles scalars through numpy.core.multiarray.scalar (numpy._core in 2.x).
    for module_name in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            module = __import__(module_name, fromlist=["scalar"])
        except ImportError:
            continue
        allowed.append(module.scalar)
    return allowed


def load_torch_file(path: str | Path, mmap: bool = False) -> Any:
    """Load a pickle-based torch file on the CPU with the restricted unpickler.

    ``mmap=True`` maps tensor data instead of reading it, so reading fields
    such as nanoGPT's ``iter_num``, or checking a file's safety, is cheap. It
    needs the zip format that ``torch.save`` writes by default since torch 1.6.

    Raises UnsafeCheckpointError naming the file and the rejected global when
    the file would need to import or call anything beyond tensors,
    containers, plain values and numpy scalars, and CheckpointError when
    torch cannot read the file at all.
    """
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        raise _unpickling_error(path, str(error)) from None
    except (RuntimeError, EOFError, ValueError) as error:
        raise CheckpointError(
            f"{path}: not a readable PyTorch weight file ({_first_sentence(str(error))}); "
            "copy or save it again"
        ) from None


def _unpickling_error(path: Path, message: str) -> CheckpointError:
    """Turn torch's weights-only unpickling error into a one-line CheckpointError."""
    rejected = _rejected_global(message)
    if rejected is None:
        return UnsafeCheckpointError(
            f"{path}: rejected by the weights-only unpickler ({_unpickler_detail(message)}); "
            "the file is corrupt or holds more than tensors and plain values, "
            "copy it again or re-save the weights as safetensors"
        )
    return UnsafeCheckpointError(
        f"{path}: rejected, the pickle needs global {rejected}, which could run code; "
        "nerve loads only tensors and plain values (re-save the weights as safetensors)"
    )


def _unpickler_detail(message: str) -> str:
    """Return the first line of the reason after torch's ``WeightsUnpickler error:`` label."""
    _, _, tail = message.partition("WeightsUnpickler error:")
    return _first_sentence(tail or message)


def _first_sentence(message: str) -> str:
    """Return the first sentence of a possibly multi-line library error, without its period."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if not lines:
        return "no reason given"
    return lines[0].split(". ")[0].rstrip(".")


def _rejected_global(message: str) -> str | None:
    """Extract the global that torch's weights-only unpickler rejected, if the error names one."""
    patterns = (
        r"unsupported GLOBAL ([\w.]+\.\w+)",  # torch 2.6 and later
        r"Unsupported global: GLOBAL ([\w.]+\.\w+)",  # torch 2.4 and 2.5
        r"Unsupported class ([\w.]+)",
        r"allowlisted via `add_safe_globals`, but got <class '([\w.]+)'>",  # a class called by REDUCE
    )
    for pattern in patterns:
        match = re.search(pattern, message, flags=re.IGNORECASE)
        if match:
            return match.group(1)
    return None
