"""Read pickle-based weight files (``.pt``, ``.bin``, nanoGPT ``ckpt.pt``) without running code.

``torch.load`` is only ever called with ``weights_only=True``: its restricted
unpickler accepts tensors, containers and plain Python values and rejects any
other global. nerve adds a few numpy scalar types that training scripts
commonly leave in checkpoints (e.g. ``iter_num`` or ``best_val_loss`` as numpy
values). There is no fallback to unrestricted unpickling.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch


class UnsafeCheckpointError(ValueError):
    """Raised when a pickle file needs a global that the safe unpickler does not allow."""


def _numpy_safe_globals() -> list[Any]:
    """Return the numpy types allowed inside pickled checkpoints: scalars and dtypes only."""
    allowed: list[Any] = [np.dtype, np.ndarray]
    allowed += [np.float64, np.float32, np.float16, np.int64, np.int32, np.int16, np.int8, np.bool_]
    allowed += [type(np.dtype(name)) for name in ("float64", "float32", "int64", "int32", "bool")]
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

    ``mmap=True`` maps tensor storages from the file instead of reading them,
    so fields such as nanoGPT's ``iter_num`` can be read cheaply. It needs the
    zip format that ``torch.save`` writes by default since torch 1.6.

    Raises UnsafeCheckpointError naming the file and the rejected global when
    the file would need to import or call anything beyond tensors, containers,
    plain values and numpy scalars.
    """
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (
        pickle.UnpicklingError,
        RuntimeError,
    ) as error:  # which one depends on the torch version
        rejected = _rejected_global(str(error))
        if rejected is None:
            raise
        raise UnsafeCheckpointError(
            f"{path}: rejected, the pickle needs global {rejected}, which could run code; "
            "nerve loads only tensors and plain values (re-save the weights as safetensors)"
        ) from None


def _rejected_global(message: str) -> str | None:
    """Extract the global that torch's weights-only unpickler rejected, if the error names one."""
    patterns = (
        r"unsupported GLOBAL ([\w.]+)",  # torch 2.6 and later
        r"Unsupported global: GLOBAL ([\w.]+)",  # torch 2.4 and 2.5
        r"Unsupported class ([\w.]+)",
    )
    for pattern in patterns:
        match = re.search(pattern, message, flags=re.IGNORECASE)
        if match:
            return match.group(1)
    return None
