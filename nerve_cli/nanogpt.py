"""Map nanoGPT checkpoints onto transformers' GPT-2 model.

nanoGPT (github.com/karpathy/nanoGPT, ``model.py`` and ``train.py``) saves
``ckpt.pt``, a pickle of ``{"model": state_dict, "model_args": {...},
"iter_num": int, "config": {...}, ...}``. Its model is GPT-2 with three
differences that the mapping accounts for:

* its Linear weights are ``[out, in]`` where GPT-2's Conv1D stores ``[in, out]``,
  so the four Conv1D weights of each block are transposed;
* its MLP uses ``nn.GELU()``, the exact erf form, so the config sets
  ``activation_function="gelu"`` (GPT-2's default ``gelu_new`` is the tanh form);
* with ``bias=False`` its Linear and LayerNorm layers have no bias, which is
  the same function as GPT-2 with zero biases, so zero biases are filled in.

``torch.compile`` prefixes every key with ``_orig_mod.``, which is stripped. The
causal-mask buffer ``attn.bias`` that nanoGPT registers without flash attention
is dropped. nanoGPT tokenizes with GPT-2 BPE, which nerve cannot download, so
these checkpoints need a ``.npy`` probe unless tokenizer files sit beside them.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import torch

from nerve_cli.safe_load import load_torch_file
from nerve_cli.weights import strip_wrapper_prefixes

logger = logging.getLogger(__name__)

REQUIRED_MODEL_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")
TRANSPOSED_SUFFIXES = (
    ".attn.c_attn.weight",
    ".attn.c_proj.weight",
    ".mlp.c_fc.weight",
    ".mlp.c_proj.weight",
)
CAUSAL_MASK_SUFFIX = ".attn.bias"
GPT2_EOS_TOKEN_ID = 50256


class NanoGPTFormatError(ValueError):
    """Raised when a file is not a nanoGPT checkpoint nerve can map onto GPT-2."""


def read_checkpoint(path: Path, mmap: bool = False) -> dict:
    """Load a nanoGPT ``ckpt.pt`` with the restricted unpickler and check its fields."""
    checkpoint = load_torch_file(path, mmap=mmap)
    if (
        not isinstance(checkpoint, dict)
        or "model" not in checkpoint
        or "model_args" not in checkpoint
    ):
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise NanoGPTFormatError(
            f"{path}: not a nanoGPT checkpoint, expected a dict with 'model' and 'model_args' "
            f"(found {found}); for a plain state dict, put the model's config.json beside it"
        )
    missing = [name for name in REQUIRED_MODEL_ARGS if name not in checkpoint["model_args"]]
    if missing:
        raise NanoGPTFormatError(f"{path}: model_args lacks {', '.join(missing)}")
    return checkpoint


def read_iter_num(path: Path) -> int | None:
    """Return a nanoGPT checkpoint's ``iter_num``, or None when it cannot be read.

    Tensors are memory-mapped, not read. Failures are logged, not raised: the
    checkpoint then fails with its full error when it is loaded.
    """
    try:
        checkpoint = read_checkpoint(path, mmap=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as error:
        logger.warning("%s: cannot read iter_num (%s)", path, " ".join(str(error).split()))
        return None
    iter_num = checkpoint.get("iter_num")
    return int(iter_num) if iter_num is not None else None


def gpt2_config(model_args: dict):
    """Return the transformers GPT2Config equivalent to nanoGPT's ``model_args``."""
    from transformers import GPT2Config

    vocab_size = int(model_args["vocab_size"])
    eos_token_id = GPT2_EOS_TOKEN_ID if vocab_size > GPT2_EOS_TOKEN_ID else None
    return GPT2Config(
        n_layer=int(model_args["n_layer"]),
        n_head=int(model_args["n_head"]),
        n_embd=int(model_args["n_embd"]),
        n_positions=int(model_args["block_size"]),
        vocab_size=vocab_size,
        n_inner=4 * int(model_args["n_embd"]),
        activation_function="gelu",
        layer_norm_epsilon=1e-5,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
    )


def gpt2_state_dict(checkpoint: dict) -> dict[str, torch.Tensor]:
    """Convert nanoGPT's state dict to GPT2LMHeadModel keys and layouts."""
    model_args = checkpoint["model_args"]
    state_dict = {}
    for key, tensor in checkpoint["model"].items():
        key = strip_wrapper_prefixes(key)
        if key.endswith(CAUSAL_MASK_SUFFIX):
            continue
        if key.endswith(TRANSPOSED_SUFFIXES):
            tensor = tensor.t()  # nanoGPT Linear [out, in] -> GPT-2 Conv1D [in, out]
        state_dict[key] = tensor.contiguous()

    if not model_args.get("bias", True):
        _add_zero_biases(state_dict, int(model_args["n_layer"]), int(model_args["n_embd"]))
    return state_dict


def _add_zero_biases(state_dict: dict[str, torch.Tensor], n_layer: int, n_embd: int) -> None:
    """Add the zero biases of a ``bias=False`` model, where nanoGPT has none."""
    dtype = state_dict["transformer.wte.weight"].dtype
    widths = {
        "ln_1.bias": n_embd,
        "attn.c_attn.bias": 3 * n_embd,
        "attn.c_proj.bias": n_embd,
        "ln_2.bias": n_embd,
        "mlp.c_fc.bias": 4 * n_embd,
        "mlp.c_proj.bias": n_embd,
    }
    for layer in range(n_layer):
        for name, width in widths.items():
            state_dict.setdefault(f"transformer.h.{layer}.{name}", torch.zeros(width, dtype=dtype))
    state_dict.setdefault("transformer.ln_f.bias", torch.zeros(n_embd, dtype=dtype))
