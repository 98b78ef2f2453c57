"""Load a checkpoint's model and tokenizer from local files only.

Nothing here reaches the network: the hub is switched to offline mode, every
``from_pretrained`` call gets ``local_files_only=True`` and a path that exists
(or a state dict nerve has read itself), and ``trust_remote_code`` is never
set. Safetensors weights are preferred when both they and a pickle file exist;
pickle files are read only by :mod:`nerve_cli.safe_load`. Every format
(see :mod:`nerve_cli.formats`) ends in transformers' ``from_pretrained``, which
matches tied embeddings stored under either name, and nerve then rejects
checkpoints whose weights leave parameters of the model unfilled.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from nerve_cli import formats, nanogpt
from nerve_cli.architectures import UnsupportedModelError, check_model_supported
from nerve_cli.checkpoints import CheckpointRef
from nerve_cli.errors import CheckpointError
from nerve_cli.probe import ProbeError
from nerve_cli.weights import check_loading_info, read_pickle_directory, read_weight_file

logger = logging.getLogger(__name__)

# Set when this module is imported, before nerve imports transformers (nerve
# imports it only inside functions), so the hub client starts offline whatever
# the environment contains. Every call also passes local_files_only=True, which
# covers programs that imported transformers first.
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
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise ValueError(f"--device {name!r}: invalid device; use auto, cpu, cuda or cuda:<index>")
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None and torch.cuda.is_available():
        if device.index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                "use an index below that"
            )
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


def as_checkpoint_ref(checkpoint: CheckpointRef | Path) -> CheckpointRef:
    """Return ``checkpoint`` as a CheckpointRef; a bare path gets its format detected (step 0)."""
    if isinstance(checkpoint, CheckpointRef):
        return checkpoint
    path = Path(checkpoint)
    if path.is_dir():
        return CheckpointRef(step=0, path=path, relative=".", format=formats.directory_format(path))
    has_config = (path.parent / formats.CONFIG_FILE).is_file()
    checkpoint_format = formats.WEIGHTS_FILE if has_config else formats.NANOGPT
    return CheckpointRef(step=0, path=path, relative=path.name, format=checkpoint_format)


def load_config(checkpoint: CheckpointRef | Path):
    """Read a checkpoint's config: its config.json, or a nanoGPT checkpoint's ``model_args``.

    The config is prepared for measurement (see :func:`prepare_config`).
    """
    from transformers import AutoConfig

    quiet_transformers()
    ref = as_checkpoint_ref(checkpoint)
    if ref.format == formats.NANOGPT:
        config = nanogpt.gpt2_config(nanogpt.read_checkpoint(ref.path, mmap=True)["model_args"])
    else:
        config = AutoConfig.from_pretrained(
            ref.directory, local_files_only=True, trust_remote_code=False
        )
    prepare_config(config)
    return config


def prepare_config(config) -> None:
    """Switch off execution options that would hide the FFN modules from the hooks.

    Neither changes the function the model computes: feed-forward chunking
    (BERT, RoBERTa, DistilBERT) would call the FFN once per chunk, and Bloom's
    ``slow_but_exact`` with ``pretraining_tp > 1`` computes the down projection
    in slices without calling ``dense_4h_to_h``. NOTE: with ``slow_but_exact``
    off, Bloom's down-projection output differs from the sliced sum by float
    rounding. The measured pre and post activations of that layer are unchanged.
    """
    if getattr(config, "chunk_size_feed_forward", 0):
        config.chunk_size_feed_forward = 0
    if getattr(config, "slow_but_exact", False) and getattr(config, "pretraining_tp", 1) > 1:
        logger.info("Bloom slow_but_exact switched off so dense_4h_to_h's input can be captured")
        config.slow_but_exact = False


def is_causal_lm(config) -> bool:
    """Return whether the model family predicts the next token (so probe loss is defined)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type in ENCODER_MODEL_TYPES or getattr(config, "is_encoder_decoder", False):
        return False
    return config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def model_class_for(config):
    """Return the transformers class nerve builds: the causal LM, or the bare encoder."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING

    mapping = MODEL_FOR_CAUSAL_LM_MAPPING if is_causal_lm(config) else MODEL_MAPPING
    try:
        return mapping[type(config)]
    except KeyError:
        raise UnsupportedModelError(
            f"model_type {config.model_type!r} has no causal-LM or base model class in "
            "transformers; nerve cannot build it"
        ) from None


def build_model_skeleton(config) -> nn.Module:
    """Build the model on the meta device: its module tree without memory or weights."""
    check_model_supported(config)
    with torch.device("meta"):
        return model_class_for(config)(config)


def load_tokenizer(checkpoint: CheckpointRef | Path):
    """Load the checkpoint's tokenizer, or return None when it has no tokenizer files.

    Raises ProbeError for a nanoGPT checkpoint without tokenizer files beside
    it, since text probes cannot be tokenized for it.
    """
    from transformers import AutoTokenizer

    ref = as_checkpoint_ref(checkpoint)
    directory = ref.directory
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    if not any((directory / name).is_file() for name in tokenizer_files):
        if ref.format == formats.NANOGPT:
            raise ProbeError(
                f"{ref.path}: nanoGPT checkpoints carry no tokenizer (nanoGPT uses GPT-2 BPE, "
                "which nerve cannot download); pass token ids as a .npy array "
                "[n_sequences, seq_len] with --probe"
            )
        return None
    return AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=False)


def load_checkpoint(
    checkpoint: CheckpointRef | Path, device: torch.device, dtype_name: str
) -> LoadedCheckpoint:
    """Load one checkpoint of any supported format in eval mode on ``device``.

    Raises UnsupportedModelError for mixture-of-experts and encoder-decoder
    families before any weights are read, and CheckpointError when the
    weights do not fill the model exactly (missing keys or wrong shapes).
    """
    ref = as_checkpoint_ref(checkpoint)
    config = load_config(ref)
    check_model_supported(config)
    causal = is_causal_lm(config)
    dtype = resolve_dtype(dtype_name, config, device)

    model = load_weights(ref, model_class_for(config), config, dtype)
    model.to(device)
    model.eval()
    return LoadedCheckpoint(
        model=model,
        tokenizer=load_tokenizer(ref) if ref.format != formats.NANOGPT else None,
        config=config,
        is_causal_lm=causal,
        device=device,
        dtype=dtype,
    )


def load_weights(ref: CheckpointRef, model_class, config, dtype: torch.dtype) -> nn.Module:
    """Build ``model_class`` from ``config`` and fill it with the checkpoint's weights."""
    common = {"config": config, "dtype": dtype, "output_loading_info": True}
    if ref.format in (formats.HF, formats.HF_SHARDED):
        _check_has_safetensors(ref)
        model, info = model_class.from_pretrained(
            ref.path,
            local_files_only=True,
            trust_remote_code=False,
            use_safetensors=True,
            **common,
        )
        check_loading_info(info, ref.path, model, strict_unexpected=False)
        return model

    if ref.format == formats.HF_BIN:
        state_dict = read_pickle_directory(ref.path)
    elif ref.format == formats.NANOGPT:
        state_dict = nanogpt.gpt2_state_dict(nanogpt.read_checkpoint(ref.path))
    else:
        state_dict = read_weight_file(ref.path)
    model, info = model_class.from_pretrained(None, state_dict=state_dict, **common)
    check_loading_info(info, ref.path, model, strict_unexpected=ref.format != formats.HF_BIN)
    return model


def _check_has_safetensors(ref: CheckpointRef) -> None:
    if ref.format == formats.HF and not (ref.path / formats.SAFETENSORS_FILE).is_file():
        raise CheckpointError(
            f"{ref.path}: no weight files found; expected {formats.SAFETENSORS_FILE}, "
            f"{formats.SAFETENSORS_INDEX} with its shards, or {formats.PICKLE_FILE}"
        )


def max_positions(config) -> int | None:
    """Return the longest sequence the model accepts, or None when unbounded."""
    for name in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value - _position_offset(config)
    return None


def _position_offset(config) -> int:
    """Return the position ids a family reserves below its first token.

    RoBERTa numbers positions from ``pad_token_id + 1``, so a model with 514
    position embeddings accepts 512 tokens.
    """
    if config.model_type == "roberta" and isinstance(config.pad_token_id, int):
        return config.pad_token_id + 1
    return 0
