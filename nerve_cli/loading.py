"""Load a checkpoint's model and tokenizer from local files only.

Nothing here reaches the network: the hub is switched to offline mode, every
``from_pretrained`` call gets ``local_files_only=True`` and a path that exists,
and ``trust_remote_code`` is never set. Safetensors weights are preferred
when both they and a pickle file exist.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Checked before transformers is imported anywhere in nerve, so the hub client
# starts offline whatever the user's environment says.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

ENCODER_MODEL_TYPES = frozenset({"bert", "roberta", "distilbert"})

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedCheckpoint:
    """A model ready for measurement, with its tokenizer (None when absent)."""

    model: nn.Module
    tokenizer: object | None
    config: object
    is_causal_lm: bool
    device: torch.device
    dtype: torch.dtype


def resolve_device(name: str) -> torch.device:
    """Turn ``auto``, ``cpu`` or ``cuda[:i]`` into a device; ``auto`` prefers CUDA."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"--device {name}: CUDA is not available on this machine; use --device cpu"
        )
    return device


def resolve_dtype(name: str, config, device: torch.device) -> torch.dtype:
    """Pick the compute dtype: ``auto`` keeps the checkpoint's dtype on GPU, float32 on CPU."""
    if name != "auto":
        return DTYPES[name]
    if device.type == "cpu":
        return torch.float32
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = DTYPES.get(stored)
    return stored if isinstance(stored, torch.dtype) else torch.float32


def quiet_transformers() -> None:
    """Silence transformers' own progress bars and advice, which would interleave with nerve's."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def load_config(checkpoint_dir: Path):
    """Read a checkpoint's config.json with transformers' AutoConfig."""
    from transformers import AutoConfig

    quiet_transformers()
    return AutoConfig.from_pretrained(
        checkpoint_dir, local_files_only=True, trust_remote_code=False
    )


def is_causal_lm(config) -> bool:
    """Return whether the model family predicts the next token (so probe loss is defined)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type in ENCODER_MODEL_TYPES or getattr(config, "is_encoder_decoder", False):
        return False
    return config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def load_tokenizer(checkpoint_dir: Path):
    """Load the checkpoint's tokenizer, or return None when it has no tokenizer files."""
    from transformers import AutoTokenizer

    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    if not any((checkpoint_dir / name).is_file() for name in tokenizer_files):
        return None
    return AutoTokenizer.from_pretrained(
        checkpoint_dir, local_files_only=True, trust_remote_code=False
    )


def load_checkpoint(
    checkpoint_dir: Path, device: torch.device, dtype_name: str
) -> LoadedCheckpoint:
    """Load a Hugging Face checkpoint directory in eval mode on ``device``."""
    from transformers import AutoModel, AutoModelForCausalLM

    config = load_config(checkpoint_dir)
    causal = is_causal_lm(config)
    dtype = resolve_dtype(dtype_name, config, device)
    has_safetensors = any(checkpoint_dir.glob("*.safetensors"))

    model_class = AutoModelForCausalLM if causal else AutoModel
    model = model_class.from_pretrained(
        checkpoint_dir,
        config=config,
        dtype=dtype,
        local_files_only=True,
        trust_remote_code=False,
        use_safetensors=has_safetensors,
    )
    model.to(device)
    model.eval()
    return LoadedCheckpoint(
        model=model,
        tokenizer=load_tokenizer(checkpoint_dir),
        config=config,
        is_causal_lm=causal,
        device=device,
        dtype=dtype,
    )


def max_positions(config) -> int | None:
    """Return the longest sequence the model accepts, or None when unbounded."""
    for name in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
