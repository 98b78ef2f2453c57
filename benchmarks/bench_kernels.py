"""Time the kernels behind the engine's choices, for one batch of the benchmark model.

Prints the best of several repetitions of: the per-batch product ``X^T X``
(BLAS syrk against a full ``torch`` product, float32 against float64), the
centring of a batch, the float64 merge, a ``1536 x 1536`` float64 eigenvalue
solve with one and with the default number of threads, and the loading of a
checkpoint of the benchmark model. BENCHMARKS.md quotes the output.

Example::

    PYTHONPATH=$PWD python benchmarks/bench_kernels.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.linalg import blas

ROWS = 4096  # one batch: 8 sequences of 512 tokens
FFN_DIM = 1536
HIDDEN = 384


def best_time(function, repeats: int = 5) -> float:
    """Return the best wall time of ``repeats`` calls after one warm-up call."""
    function()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return best


def time_products() -> dict[str, float]:
    rows = torch.randn(ROWS, FFN_DIM) + 3  # [n, D]
    rows64 = rows.double()
    inputs = rows[:, :HIDDEN].contiguous()  # [n, d_in], the up projection's input
    accumulator = torch.zeros(FFN_DIM, FFN_DIM, dtype=torch.float64)
    product = torch.randn(FFN_DIM, FFN_DIM)
    correction = torch.randn(FFN_DIM, 2, dtype=torch.float64)

    def centre_float64():
        centred = rows.to(torch.float64)
        centred.sub_(centred.mean(dim=0))

    return {
        "ssyrk float32, one triangle": best_time(lambda: blas.ssyrk(1.0, rows.numpy().T, lower=1)),
        "dsyrk float64, one triangle": best_time(
            lambda: blas.dsyrk(1.0, rows64.numpy().T, lower=1)
        ),
        "torch X^T X float32, full": best_time(lambda: rows.T @ rows),
        "torch X^T X float64, full": best_time(lambda: rows64.T @ rows64),
        "centre in float32": best_time(lambda: rows - rows.mean(dim=0)),
        "centre in float64": best_time(centre_float64),
        "merge float32 product into float64": best_time(lambda: accumulator.add_(product)),
        "rank-2 update of the float64 moments": best_time(
            lambda: accumulator.addmm_(correction, correction.T)
        ),
        "pre input product (width 384), ssyrk": best_time(
            lambda: blas.ssyrk(1.0, inputs.numpy().T, lower=1)
        ),
    }


def time_eigenvalues() -> dict[str, float]:
    samples = torch.randn(3 * FFN_DIM, FFN_DIM, dtype=torch.float64)
    covariance = samples.T @ samples / samples.shape[0]  # [D, D]
    default_threads = torch.get_num_threads()
    timings = {
        f"eigvalsh float64 1536, {default_threads} threads": best_time(
            lambda: torch.linalg.eigvalsh(covariance), repeats=3
        )
    }
    torch.set_num_threads(1)
    try:
        timings["eigvalsh float64 1536, 1 thread"] = best_time(
            lambda: torch.linalg.eigvalsh(covariance), repeats=3
        )
    finally:
        torch.set_num_threads(default_threads)
    return timings


def time_checkpoint_load() -> dict[str, float]:
    from transformers import GPT2Config, GPT2LMHeadModel

    from nerve_cli.loading import load_checkpoint

    with tempfile.TemporaryDirectory() as work:
        checkpoint = Path(work) / "checkpoint-0"
        config = GPT2Config(
            n_layer=6,
            n_embd=HIDDEN,
            n_inner=FFN_DIM,
            n_head=6,
            n_positions=512,
            vocab_size=512,
            bos_token_id=0,
            eos_token_id=0,
        )
        GPT2LMHeadModel(config).save_pretrained(checkpoint)
        seconds = best_time(
            lambda: load_checkpoint(checkpoint, torch.device("cpu"), "auto"), repeats=3
        )
    return {"load_checkpoint (page cache warm)": seconds}


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, numpy {np.__version__}")
    for timings in (time_products(), time_eigenvalues(), time_checkpoint_load()):
        for name, seconds in timings.items():
            print(f"{name:45s} {seconds * 1000:9.1f} ms")


if __name__ == "__main__":
    main()
