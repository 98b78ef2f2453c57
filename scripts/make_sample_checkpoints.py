#!/usr/bin/env python3
"""Train the two small sample GPT-2 runs (GELU and ReLU) and save their checkpoints.

Both runs share every setting (seed, initial weights, data order, hyperparameters)
except `activation_function` of the feed-forward layers. The training text is the
Jargon File 4.4.7 (public domain), shipped in scripts/data/. Everything runs offline
on CPU with a byte-level tokenizer built here, so nothing is downloaded.

    python scripts/make_sample_checkpoints.py --out sample_checkpoints

Each run writes `<out>/gpt2-<activation>/checkpoint-<step>/` directories with
config.json, model.safetensors (float16 weights), generation_config.json, the
tokenizer files and a trainer_state.json in the Hugging Face Trainer format.
Optimizer state is not saved.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, TrainerState

log = logging.getLogger("make_sample_checkpoints")

DEFAULT_TEXT = Path(__file__).resolve().parent / "data" / "jargon-4.4.7.txt"
EOS_TOKEN = "<|endoftext|>"
ACTIVATIONS = ("gelu", "relu")


@dataclass(frozen=True)
class TrainingSettings:
    """Hyperparameters shared by both runs."""

    seed: int = 1234
    torch_threads: int = 2
    n_layer: int = 4
    n_embd: int = 128
    n_inner: int = 512
    n_head: int = 4
    n_positions: int = 128
    batch_size: int = 16
    # Tokens per training sequence. It equals n_positions, so each sequence yields 127 predictions.
    sequence_length: int = 128
    max_steps: int = 2000
    peak_learning_rate: float = 2e-3
    min_learning_rate: float = 2e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    max_grad_norm: float = 1.0
    logging_steps: int = 10
    checkpoint_steps: tuple[int, ...] = (0, 10, 30, 100, 300, 1000, 2000)
    # Paragraphs are grouped into consecutive blocks of holdout_block_paragraphs, and every
    # holdout_every-th block goes to the held-out evaluation split (10% of the paragraphs).
    holdout_block_paragraphs: int = 50
    holdout_every: int = 10
    eval_batch_size: int = 64


# ---------------------------------------------------------------------------
# Tokenizer


def gpt2_bytes_to_unicode() -> dict[int, str]:
    """Return GPT-2's reversible map from byte values to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    byte_values = printable[:]
    code_points = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in byte_values:
            byte_values.append(byte)
            code_points.append(256 + extra)
            extra += 1
    return dict(zip(byte_values, map(chr, code_points), strict=True))


def build_byte_tokenizer(max_length: int) -> PreTrainedTokenizerFast:
    """Build a byte-level BPE tokenizer without merges: token id b is byte b, id 256 is EOS."""
    vocab = {char: byte for byte, char in gpt2_bytes_to_unicode().items()}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        model_max_length=max_length,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: Path) -> None:
    """Save the tokenizer so that transformers 4.x and 5.x can both load it."""
    tokenizer.save_pretrained(directory)
    # transformers 5 writes its own class name "TokenizersBackend", which 4.x does not know.
    # "PreTrainedTokenizerFast" is the 4.x class and an alias of TokenizersBackend in 5.x.
    config_path = directory / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text(encoding="utf-8"))
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------
# Data


def read_paragraphs(path: Path) -> list[str]:
    """Split the Jargon File text into paragraphs, each re-joined onto one line.

    The file is indented by three spaces and hard-wrapped. Blank lines separate
    paragraphs.
    """
    paragraphs: list[str] = []
    for block in path.read_text(encoding="utf-8").split("\n\n"):
        lines = [line.strip() for line in block.splitlines()]
        text = " ".join(line for line in lines if line)
        if text:
            paragraphs.append(text)
    return paragraphs


def split_holdout(paragraphs: list[str], settings: TrainingSettings) -> tuple[str, str]:
    """Return (train_text, eval_text). Eval is every holdout_every-th block of paragraphs."""
    train: list[str] = []
    held_out: list[str] = []
    for index, paragraph in enumerate(paragraphs):
        block = index // settings.holdout_block_paragraphs
        is_held_out = block % settings.holdout_every == settings.holdout_every - 1
        (held_out if is_held_out else train).append(paragraph)
    return "\n\n".join(train), "\n\n".join(held_out)


def encode(tokenizer: PreTrainedTokenizerFast, text: str) -> torch.Tensor:
    # The backend tokenizer skips the wrapper's warning about texts longer than model_max_length.
    ids = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids
    return torch.tensor(ids, dtype=torch.long)


def make_eval_windows(eval_ids: torch.Tensor, sequence_length: int) -> torch.Tensor:
    """Cut the eval tokens into non-overlapping windows, dropping the incomplete last one."""
    count = eval_ids.numel() // sequence_length
    return eval_ids[: count * sequence_length].view(count, sequence_length)


def make_batch_offsets(num_tokens: int, settings: TrainingSettings) -> torch.Tensor:
    """Draw the start offset of every training sequence, seeded, so both runs see the same data."""
    generator = torch.Generator().manual_seed(settings.seed)
    high = num_tokens - settings.sequence_length
    return torch.randint(0, high, (settings.max_steps, settings.batch_size), generator=generator)


# ---------------------------------------------------------------------------
# Training


def learning_rate_at(step: int, settings: TrainingSettings) -> float:
    """Return the learning rate of update `step`, counted from 0.

    It rises linearly to the peak over warmup_steps (update 0 uses peak / warmup_steps),
    then decays along a cosine to min_learning_rate at max_steps.
    """
    if step < settings.warmup_steps:
        return settings.peak_learning_rate * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.max_steps - settings.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    span = settings.peak_learning_rate - settings.min_learning_rate
    return settings.min_learning_rate + span * cosine


@torch.no_grad()
def evaluate(model: GPT2LMHeadModel, windows: torch.Tensor, batch_size: int) -> float:
    """Return the mean next-token cross-entropy (nats per token) over all eval windows."""
    model.eval()
    total_loss = 0.0
    total_predictions = 0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size]
        loss = model(input_ids=batch, labels=batch).loss
        predictions = batch.shape[0] * (batch.shape[1] - 1)
        total_loss += loss.item() * predictions
        total_predictions += predictions
    model.train()
    return total_loss / total_predictions


def save_checkpoint(
    model: GPT2LMHeadModel,
    tokenizer: PreTrainedTokenizerFast,
    state: TrainerState,
    directory: Path,
) -> None:
    """Write model (float16 copy), tokenizer and trainer_state.json to `directory`."""
    directory.mkdir(parents=True, exist_ok=False)
    # Training stays in float32. The saved copy is float16 to keep the sample folder small.
    copy.deepcopy(model).to(torch.float16).save_pretrained(directory)
    save_tokenizer(tokenizer, directory)
    state.save_to_json(str(directory / "trainer_state.json"))


def train_run(
    activation: str,
    settings: TrainingSettings,
    tokenizer: PreTrainedTokenizerFast,
    train_ids: torch.Tensor,
    eval_windows: torch.Tensor,
    run_dir: Path,
) -> dict[str, float]:
    """Train one run and save its checkpoints. Returns first/last train and eval losses."""
    torch.manual_seed(settings.seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=settings.n_positions,
        n_embd=settings.n_embd,
        n_layer=settings.n_layer,
        n_head=settings.n_head,
        n_inner=settings.n_inner,
        activation_function=activation,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = GPT2LMHeadModel(config)
    model.train()
    log.info(
        "run gpt2-%s: %d parameters, %d train tokens, %d eval windows",
        activation,
        sum(parameter.numel() for parameter in model.parameters()),
        train_ids.numel(),
        eval_windows.shape[0],
    )

    # Biases and LayerNorm weights get no weight decay, as in the usual GPT-2 recipes.
    decay = [parameter for parameter in model.parameters() if parameter.dim() >= 2]
    no_decay = [parameter for parameter in model.parameters() if parameter.dim() < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": settings.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=settings.peak_learning_rate,
        betas=(settings.adam_beta1, settings.adam_beta2),
    )

    offsets = make_batch_offsets(train_ids.numel(), settings)
    positions = torch.arange(settings.sequence_length)
    tokens_per_step = settings.batch_size * settings.sequence_length
    state = TrainerState(
        max_steps=settings.max_steps,
        logging_steps=settings.logging_steps,
        # Checkpoints are saved and evaluated at checkpoint_steps, not at a fixed interval.
        eval_steps=0,
        save_steps=0,
        train_batch_size=settings.batch_size,
        num_train_epochs=math.ceil(settings.max_steps * tokens_per_step / train_ids.numel()),
        log_history=[],
    )

    def epoch_at(step: int) -> float:
        # Passes over the training split, counted in sampled tokens (windows may overlap).
        return round(step * tokens_per_step / train_ids.numel(), 4)

    def checkpoint(step: int) -> float:
        started = time.perf_counter()
        eval_loss = evaluate(model, eval_windows, settings.eval_batch_size)
        state.global_step = step
        state.epoch = epoch_at(step)
        state.num_input_tokens_seen = step * tokens_per_step
        state.log_history.append(
            {
                "epoch": state.epoch,
                "eval_loss": round(eval_loss, 6),
                "eval_runtime": round(time.perf_counter() - started, 4),
                "step": step,
            }
        )
        save_checkpoint(model, tokenizer, state, run_dir / f"checkpoint-{step}")
        log.info("gpt2-%s step %d: eval_loss %.4f, saved checkpoint", activation, step, eval_loss)
        return eval_loss

    losses = {"eval_loss_first": checkpoint(0)}
    window_losses: list[float] = []
    started = time.perf_counter()
    for step in range(settings.max_steps):
        learning_rate = learning_rate_at(step, settings)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate

        batch = train_ids[offsets[step].unsqueeze(1) + positions]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        completed = step + 1
        window_losses.append(loss.item())
        if completed == 1:
            # The loss of update 1 is computed on the initial weights.
            losses["train_loss_first"] = loss.item()
        # As with Trainer's logging_first_step, step 1 is logged on its own. The last step is
        # always logged, so the last logged loss covers the end of training.
        is_last = completed == settings.max_steps
        if completed == 1 or completed % settings.logging_steps == 0 or is_last:
            mean_loss = sum(window_losses) / len(window_losses)
            state.log_history.append(
                {
                    "epoch": epoch_at(completed),
                    "grad_norm": round(grad_norm.item(), 6),
                    "learning_rate": learning_rate,
                    "loss": round(mean_loss, 6),
                    "step": completed,
                }
            )
            window_losses = []
            losses["train_loss_last"] = mean_loss
            if completed == 1 or completed % 100 == 0 or is_last:
                elapsed = time.perf_counter() - started
                log.info(
                    "gpt2-%s step %d/%d: loss %.4f, lr %.2e, %.1f s",
                    activation,
                    completed,
                    settings.max_steps,
                    mean_loss,
                    learning_rate,
                    elapsed,
                )
        if completed in settings.checkpoint_steps:
            losses["eval_loss_last"] = checkpoint(completed)

    return losses


# ---------------------------------------------------------------------------
# Command line


def write_summary(out: Path, settings: TrainingSettings, results: dict[str, dict]) -> None:
    """Write the losses and settings of both runs to <out>/runs.json."""
    summary = {
        "settings": {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in vars(settings).items()
        },
        "runs": {f"gpt2-{activation}": losses for activation, losses in results.items()},
    }
    (out / "runs.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, required=True, help="output folder, e.g. sample_checkpoints"
    )
    parser.add_argument(
        "--text",
        type=Path,
        default=DEFAULT_TEXT,
        help=f"training text, UTF-8 with blank-line separated paragraphs (default: {DEFAULT_TEXT})",
    )
    parser.add_argument(
        "--max-steps",
        type=int,
        default=TrainingSettings.max_steps,
        help="optimizer updates per run; checkpoint steps beyond it are dropped "
        "and the last step is always saved (default: %(default)s)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="delete existing gpt2-gelu/ and gpt2-relu/ folders under --out first",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    transformers.utils.logging.disable_progress_bar()

    checkpoint_steps = tuple(
        sorted(
            {step for step in TrainingSettings.checkpoint_steps if step < args.max_steps}
            | {args.max_steps}
        )
    )
    settings = TrainingSettings(max_steps=args.max_steps, checkpoint_steps=checkpoint_steps)
    torch.set_num_threads(settings.torch_threads)
    torch.use_deterministic_algorithms(True)

    run_dirs = {activation: args.out / f"gpt2-{activation}" for activation in ACTIVATIONS}
    for run_dir in run_dirs.values():
        if run_dir.exists():
            if not args.overwrite:
                log.error(
                    "output folder already exists: %s. Pass --overwrite to replace it.", run_dir
                )
                return 1
            shutil.rmtree(run_dir)

    if not args.text.is_file():
        log.error("training text not found: %s. Pass --text with a UTF-8 text file.", args.text)
        return 1
    tokenizer = build_byte_tokenizer(settings.n_positions)
    train_text, eval_text = split_holdout(read_paragraphs(args.text), settings)
    train_ids = encode(tokenizer, train_text)
    eval_windows = make_eval_windows(encode(tokenizer, eval_text), settings.sequence_length)
    log.info(
        "training text %s: %d train bytes, %d held-out bytes",
        args.text,
        len(train_text.encode("utf-8")),
        len(eval_text.encode("utf-8")),
    )

    results: dict[str, dict] = {}
    for activation in ACTIVATIONS:
        started = time.perf_counter()
        results[activation] = train_run(
            activation, settings, tokenizer, train_ids, eval_windows, run_dirs[activation]
        )
        results[activation]["wall_seconds"] = round(time.perf_counter() - started, 1)
        log.info("gpt2-%s done: %s", activation, results[activation])

    write_summary(args.out, settings, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
