"""Probe reading, tokenization and packing."""

from __future__ import annotations

import hashlib
import json
from importlib import resources

import numpy as np
import pytest

from nerve_cli import probe as probe_module
from nerve_cli.probe import ProbeError, build_probe, pack_sequences, read_probe_source


def byte_tokenizer():
    """A byte-level tokenizer built locally: token id = byte value, 256 entries."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(byte) if 33 <= byte < 127 else f"<{byte}>": byte for byte in range(256)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<0>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def test_pack_sequences_drops_remainder():
    packed = pack_sequences(np.arange(10), seq_len=4)

    assert packed.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_pack_sequences_short_stream_is_one_row():
    assert pack_sequences(np.arange(3), seq_len=8).tolist() == [[0, 1, 2]]


def test_text_probe_is_packed_and_capped(tmp_path):
    text_file = tmp_path / "probe.txt"
    text_file.write_text("abcdefghij" * 20, encoding="utf-8")
    source = read_probe_source(text_file)

    probe = build_probe(
        source, byte_tokenizer(), seq_len=64, max_tokens=150, max_positions=32, vocab_size=256
    )

    # seq_len is capped at 32 positions; 150 tokens give 4 full rows.
    assert probe.token_ids.shape == (4, 32)
    assert probe.sha256 == hashlib.sha256(text_file.read_bytes()).hexdigest()
    assert probe.describe()["n_tokens"] == 128


def test_npy_probe_is_used_exactly(tmp_path):
    ids = np.random.default_rng(0).integers(0, 50, size=(3, 7)).astype(np.int32)
    np.save(tmp_path / "ids.npy", ids)
    source = read_probe_source(tmp_path / "ids.npy")

    probe = build_probe(source, None, seq_len=512, max_tokens=2, max_positions=64, vocab_size=50)

    assert probe.token_ids.tolist() == ids.tolist()
    assert probe.token_ids.dtype == np.int64


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((2, 3), dtype=np.float32), "must be integers"),
        (np.zeros(5, dtype=np.int64), "shape \\[n_sequences, seq_len\\]"),
        (np.zeros((1, 2, 3), dtype=np.int64), "3 dimensions"),
    ],
)
def test_npy_probe_bad_dtype_or_shape(tmp_path, array, message):
    np.save(tmp_path / "bad.npy", array)

    with pytest.raises(ProbeError, match=message):
        read_probe_source(tmp_path / "bad.npy")


def test_npy_probe_outside_vocabulary_is_rejected(tmp_path):
    np.save(tmp_path / "ids.npy", np.array([[1, 2, 300]]))
    source = read_probe_source(tmp_path / "ids.npy")

    with pytest.raises(ProbeError, match=r"span \[1, 300\].*100 entries"):
        build_probe(source, None, seq_len=8, max_tokens=8, max_positions=64, vocab_size=100)


def test_npy_probe_longer_than_positions_is_rejected(tmp_path):
    np.save(tmp_path / "ids.npy", np.zeros((1, 100), dtype=np.int64))
    source = read_probe_source(tmp_path / "ids.npy")

    with pytest.raises(ProbeError, match="exceed the model's maximum of 64 positions"):
        build_probe(source, None, seq_len=8, max_tokens=8, max_positions=64, vocab_size=10)


def test_missing_probe_file_names_path(tmp_path):
    with pytest.raises(ProbeError, match="probe file not found"):
        read_probe_source(tmp_path / "nope.txt")


def test_default_probe_is_real_text_with_provenance():
    folder = resources.files(probe_module.__package__) / "data" / "probe"
    info = json.loads((folder / "probe.json").read_text(encoding="utf-8"))
    source = read_probe_source(None)

    assert len(source.text.encode("utf-8")) >= 200_000
    assert info["license"]
    assert (folder / "SOURCE.md").is_file()
    assert source.name == info["name"]
    assert source.sha256 == hashlib.sha256((folder / "default.txt").read_bytes()).hexdigest()
    words = source.text.split()
    assert sum(word.lower() in {"the", "and", "of", "to"} for word in words) > len(words) / 50


def test_directory_as_probe_is_named(tmp_path):
    with pytest.raises(ProbeError, match="is a directory"):
        read_probe_source(tmp_path)
