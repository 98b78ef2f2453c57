"""The probe corpus: the fixed token sequences streamed through every checkpoint.

A probe is an integer array ``[n_sequences, seq_len]`` of token ids. It comes
from one of three sources:

* the default corpus shipped in ``nerve_cli/data/probe/`` (real English prose,
  source and licence in ``SOURCE.md`` beside it);
* a ``.txt`` file, treated like the default corpus;
* a ``.npy`` integer array, used exactly as given: one row is one sequence,
  nothing is added, packed or truncated.

Text is tokenized with the checkpoint's tokenizer without special tokens, the
first ``max_tokens`` ids are kept, and they are packed into full sequences of
``seq_len`` tokens. A remainder shorter than ``seq_len`` is dropped, so every
sequence has the same length and no padding is ever needed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_SEQ_LEN = 512
DEFAULT_MAX_TOKENS = 65_536


class ProbeError(ValueError):
    """Raised when a probe file is missing, malformed or does not fit the model."""


@dataclass(frozen=True)
class ProbeSource:
    """Probe input before tokenization: text or ready token ids, with provenance."""

    name: str
    sha256: str
    source: str
    text: str | None = None
    token_ids: np.ndarray | None = None


@dataclass(frozen=True)
class Probe:
    """Token ids ready for the model, shape ``[n_sequences, seq_len]``, int64."""

    name: str
    sha256: str
    source: str
    token_ids: np.ndarray

    @property
    def n_sequences(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.token_ids.shape[1])

    @property
    def n_tokens(self) -> int:
        return int(self.token_ids.size)

    def describe(self) -> dict[str, object]:
        """Return the probe entry of run.json."""
        return {
            "name": self.name,
            "sha256": self.sha256,
            "source": self.source,
            "n_sequences": self.n_sequences,
            "seq_len": self.seq_len,
            "n_tokens": self.n_tokens,
        }


def read_probe_source(path: str | Path | None) -> ProbeSource:
    """Read the default probe (``path`` None), a ``.txt`` file or a ``.npy`` token array.

    The sha256 is that of the file's bytes, so two runs share a probe exactly
    when they read the same file. Raises ProbeError naming the file.
    """
    if path is None:
        return _read_default_probe()

    path = Path(path)
    if path.is_dir():
        raise ProbeError(f"{path}: is a directory; pass a .txt or .npy probe file")
    if not path.is_file():
        raise ProbeError(f"{path}: probe file not found")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()

    if path.suffix == ".npy":
        token_ids = _read_token_array(path)
        return ProbeSource(name=path.stem, sha256=digest, source=str(path), token_ids=token_ids)
    if path.suffix == ".txt":
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ProbeError(
                f"{path}: not UTF-8 text ({error}); convert the file to UTF-8"
            ) from None
        if not text.strip():
            raise ProbeError(f"{path}: probe text is empty")
        return ProbeSource(name=path.stem, sha256=digest, source=str(path), text=text)
    raise ProbeError(f"{path}: unsupported probe format {path.suffix!r}; use .txt or .npy")


def _read_default_probe() -> ProbeSource:
    """Read the probe corpus shipped inside the package."""
    folder = resources.files("nerve_cli") / "data" / "probe"
    data = (folder / "default.txt").read_bytes()
    info = json.loads((folder / "probe.json").read_text(encoding="utf-8"))
    return ProbeSource(
        name=info["name"],
        sha256=hashlib.sha256(data).hexdigest(),
        source=info["source"],
        text=data.decode("utf-8"),
    )


def _read_token_array(path: Path) -> np.ndarray:
    """Load and check a ``.npy`` token array without unpickling.

    Raises ProbeError naming the file unless the array is a non-empty 2-D
    integer array ``[n_sequences, seq_len]``.
    """
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise ProbeError(
            f"{path}: not a plain .npy array ({error}); save the token ids with numpy.save"
        ) from None
    if array.ndim != 2:
        raise ProbeError(
            f"{path}: token array must have shape [n_sequences, seq_len], got {array.ndim} "
            f"dimensions {tuple(array.shape)}; reshape it to one row per sequence"
        )
    if not np.issubdtype(array.dtype, np.integer):
        raise ProbeError(
            f"{path}: token ids must be integers, got dtype {array.dtype}; "
            "save them with an integer dtype such as int64"
        )
    if array.size == 0:
        raise ProbeError(f"{path}: token array is empty; it needs at least one sequence")
    if array.dtype == np.uint64 and int(array.max()) > np.iinfo(np.int64).max:
        raise ProbeError(
            f"{path}: token id {int(array.max())} does not fit in int64; "
            "tokenize the probe with this model's tokenizer"
        )
    return array.astype(np.int64)


def build_probe(
    source: ProbeSource,
    tokenizer,
    seq_len: int,
    max_tokens: int,
    max_positions: int | None,
    vocab_size: int,
) -> Probe:
    """Tokenize and pack a probe source for one model, or check a ready token array.

    ``seq_len`` is capped at ``max_positions``. Raises ProbeError when token
    ids fall outside ``[0, vocab_size)`` or a ``.npy`` sequence is longer than
    the model accepts.
    """
    if source.token_ids is not None:
        token_ids = source.token_ids
        check_token_ids(token_ids, vocab_size, max_positions, source.source)
        return Probe(source.name, source.sha256, source.source, token_ids)

    if tokenizer is None:
        raise ProbeError("the checkpoint has no tokenizer files; pass a .npy probe with --probe")
    if max_positions is not None and seq_len > max_positions:
        logger.info("seq_len %d capped at the model's maximum positions %d", seq_len, max_positions)
        seq_len = max_positions

    ids = tokenizer(source.text, add_special_tokens=False, verbose=False)["input_ids"]
    ids = np.asarray(ids[:max_tokens], dtype=np.int64)
    token_ids = pack_sequences(ids, seq_len)
    check_token_ids(token_ids, vocab_size, max_positions, source.source)
    return Probe(source.name, source.sha256, source.source, token_ids)


def pack_sequences(ids: np.ndarray, seq_len: int) -> np.ndarray:
    """Pack a 1-D id stream into ``[n, seq_len]`` rows, dropping the short remainder.

    A stream shorter than one sequence becomes a single shorter row.
    """
    if seq_len < 2:
        raise ProbeError(f"seq_len must be at least 2, got {seq_len}")
    if ids.size < 2:
        raise ProbeError(f"probe has {ids.size} token(s); at least 2 are needed")
    if ids.size < seq_len:
        return ids.reshape(1, -1)
    n_sequences = ids.size // seq_len
    return ids[: n_sequences * seq_len].reshape(n_sequences, seq_len)


def check_token_ids(
    token_ids: np.ndarray, vocab_size: int, max_positions: int | None, origin: str
) -> None:
    """Raise ProbeError if ids leave the vocabulary or rows exceed the model's positions."""
    low, high = int(token_ids.min()), int(token_ids.max())
    if low < 0 or high >= vocab_size:
        raise ProbeError(
            f"{origin}: token ids span [{low}, {high}] but the model's vocabulary has "
            f"{vocab_size} entries; tokenize the probe with this model's tokenizer"
        )
    if max_positions is not None and token_ids.shape[1] > max_positions:
        raise ProbeError(
            f"{origin}: sequences of {token_ids.shape[1]} tokens exceed the model's "
            f"maximum of {max_positions} positions; use shorter rows"
        )
