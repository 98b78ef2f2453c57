"""Build synthetic nerve result directories for tests of compare and report.

The tables follow the real schema and are written with the real store
functions, so only the numbers are made up: each metric follows a smooth,
seeded trajectory over steps so that correlations with the loss are defined.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nerve_cli import store


def write_synthetic_run(
    out_dir: Path,
    run: str = "run-a",
    steps: tuple[int, ...] = (0, 10, 100, 1000),
    n_layers: int = 3,
    ffn_dim: int = 16,
    probe_sha256: str = "0" * 64,
    seed: int = 0,
    with_eval_loss: bool = True,
) -> Path:
    """Write a complete result directory with metrics and spectra for every step."""
    rng = np.random.default_rng(seed)
    final_step = max(steps) or 1
    checkpoints = []
    for step in steps:
        progress = step / final_step
        loss = 5.5 - 3.0 * progress + 0.05 * rng.standard_normal()
        metric_rows, spectra_rows = [], []
        for layer in range(n_layers):
            pre = np.sort(rng.gamma(1.0 + progress + 0.1 * layer, size=ffn_dim))[::-1]
            post = np.sort(pre + rng.gamma(0.5 + progress, size=ffn_dim))[::-1]
            metric_rows.append(
                _metric_row(run, step, layer, ffn_dim, pre, post, loss, with_eval_loss)
            )
            for point, values in (("pre", pre), ("post", post)):
                spectra_rows.append(
                    {
                        "run": run,
                        "step": step,
                        "layer": layer,
                        "point": point,
                        "eigenvalues": values.tolist(),
                    }
                )
        store.write_checkpoint_tables(out_dir, step, metric_rows, spectra_rows)
        checkpoints.append(
            {
                "step": step,
                "path": f"checkpoint-{step}",
                "seconds": 0.1,
                "status": "done",
                "error": None,
            }
        )

    with store.locked_run_file(out_dir) as info:
        info.update(
            {
                "run": run,
                "nerve_version": "test",
                "checkpoint_dir": str(out_dir),
                "model_type": "gpt2",
                "ffn_kind": "plain",
                "ffn_dim": ffn_dim,
                "n_layers": n_layers,
                "is_causal_lm": True,
                "probe": {
                    "name": "synthetic",
                    "sha256": probe_sha256,
                    "n_sequences": 4,
                    "seq_len": 32,
                    "n_tokens": 128,
                    "source": "synthetic",
                },
                "device": "cpu",
                "dtype": "float32",
                "versions": {"python": "3", "torch": "x", "transformers": "x", "nerve": "test"},
                "checkpoints": checkpoints,
            }
        )
    return out_dir


def _metric_row(run, step, layer, ffn_dim, pre, post, loss, with_eval_loss):
    from nerve_cli.measure import spectrum_values

    return {
        "run": run,
        "step": step,
        "checkpoint": f"checkpoint-{step}",
        "layer": layer,
        "ffn_dim": ffn_dim,
        "n_tokens": 128,
        **spectrum_values(pre, post),
        "probe_loss": loss,
        "eval_loss": loss + 0.1 if with_eval_loss else None,
        "rank_limited": False,
        "null_reason": None,
    }
