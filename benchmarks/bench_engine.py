"""Benchmark nerve's streaming engine against storing every activation.

On one random GPT-2-shaped checkpoint and the same token ids, this script
runs, each in its own process, and records wall time and peak resident memory
(``ru_maxrss`` of that child, from ``os.wait4``):

* ``nerve``: ``python -m nerve_cli analyze`` on the checkpoint;
* ``store-all``: the usual way, written here: hooks keep every pre and post
  activation in float32, which are concatenated per point at the end, centred,
  multiplied into a float32 covariance and solved with
  ``torch.linalg.eigvalsh`` in float64, followed by the same metrics;
* ``forward``: the bare forward passes with no hooks, the floor.

With ``--engine`` it also runs nerve's library in process with float32 and
with float64 products and reports the time of each phase and how far the
float32 metrics are from the float64 ones. Results are appended to a JSON
lines file, so sizes can be run in separate invocations and printed together
with ``--table-only``. See BENCHMARKS.md for the figures and the machine.

Example::

    PYTHONPATH=$PWD python benchmarks/bench_engine.py --tokens 8192,32768 --engine
    PYTHONPATH=$PWD python benchmarks/bench_engine.py --tokens 131072
    PYTHONPATH=$PWD python benchmarks/bench_engine.py --table-only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = REPO_ROOT / "benchmarks" / "results" / "bench_engine.jsonl"

# The shape of a small real model: 6 layers, width 384, FFN 1536, 6 heads.
MODEL_SHAPE = {"n_layer": 6, "n_embd": 384, "n_inner": 1536, "n_head": 6, "n_positions": 512}
SEQ_LEN = 512
BATCH_SIZE = 8
METRIC_COLUMNS = ["se_pre", "se_post", "pr_pre", "pr_post", "eee_pre", "eee_post", "js"]


def main() -> None:
    args = parse_args()
    if args.child:
        run_child(args)
        return
    if not args.table_only:
        run_benchmark(args)
    print_table(read_results(args.results))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tokens",
        default="8192,32768,131072",
        help="Comma-separated probe sizes in tokens (multiples of 512) [default: %(default)s].",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i] [default: %(default)s].")
    parser.add_argument(
        "--checkpoint-dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="Dtype the checkpoint is saved in; nerve computes in it on CUDA [default: %(default)s].",
    )
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=512,
        help="Vocabulary size; small, so the LM head stays a few percent of the forward pass "
        "[default: %(default)s].",
    )
    parser.add_argument(
        "--engine",
        action="store_true",
        help="Also time nerve's library in process with float32 and float64 products.",
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=DEFAULT_RESULTS,
        help="JSON lines file the results are appended to [default: %(default)s].",
    )
    parser.add_argument(
        "--table-only", action="store_true", help="Print the table of --results and exit."
    )
    parser.add_argument(
        "--work-dir", type=Path, help="Where the checkpoint and probes go [default: a temp dir]."
    )
    parser.add_argument(
        "--child", choices=["store-all", "forward", "engine"], help=argparse.SUPPRESS
    )
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--probe", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--product-dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


# --- parent: prepare inputs, run children, collect results -----------------------------


def run_benchmark(args: argparse.Namespace) -> None:
    sizes = [int(value) for value in args.tokens.split(",")]
    for n_tokens in sizes:
        if n_tokens % SEQ_LEN:
            raise SystemExit(
                f"--tokens {n_tokens}: not a multiple of the sequence length {SEQ_LEN}"
            )
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
        work_dir = Path(work)
        checkpoint = save_checkpoint(work_dir / "run" / "checkpoint-0", args)
        for n_tokens in sizes:
            probe = save_probe(work_dir / f"probe-{n_tokens}.npy", n_tokens, args.vocab_size)
            record = measure_size(args, checkpoint, probe, n_tokens, work_dir)
            append_result(args.results, record)
            summary = {
                name: (run["wall_s"], run["peak_rss_mb"]) for name, run in record["runs"].items()
            }
            print(f"{n_tokens} tokens: (wall s, peak MB) {summary}", file=sys.stderr)


def save_checkpoint(path: Path, args: argparse.Namespace) -> Path:
    """Save a randomly initialised GPT-2-shaped model as safetensors."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(**MODEL_SHAPE, vocab_size=args.vocab_size, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).to(getattr(torch, args.checkpoint_dtype))
    model.save_pretrained(path, safe_serialization=True)
    return path


def save_probe(path: Path, n_tokens: int, vocab_size: int):
    import numpy as np

    token_ids = np.random.default_rng(0).integers(
        0, vocab_size, size=(n_tokens // SEQ_LEN, SEQ_LEN)
    )
    np.save(path, token_ids)
    return path


def measure_size(args, checkpoint: Path, probe: Path, n_tokens: int, work_dir: Path) -> dict:
    """Run every variant on one probe size and return the record of the results file."""
    record = {
        "n_tokens": n_tokens,
        "device": args.device,
        "checkpoint_dtype": args.checkpoint_dtype,
        "machine": describe_machine(),
        "runs": {},
    }
    child_args = ["--checkpoint", str(checkpoint), "--probe", str(probe), "--device", args.device]
    variants = [
        ("forward", child_command("forward", child_args)),
        ("store-all", child_command("store-all", child_args)),
        ("nerve", nerve_command(checkpoint, probe, n_tokens, args.device, work_dir / "out")),
    ]
    if args.engine:
        for product_dtype in ("float32", "float64"):
            command = child_command("engine", [*child_args, "--product-dtype", product_dtype])
            variants.append((f"engine-{product_dtype}", command))

    for name, command in variants:
        child_out = work_dir / f"{name}-{n_tokens}.json"
        if name != "nerve":
            command = [*command, "--child-out", str(child_out)]
        run = run_child_process(command)
        if name == "nerve":
            run["metrics"] = read_nerve_metrics(work_dir / "out")
        else:
            run.update(json.loads(child_out.read_text()))
        record["runs"][name] = run
    return record


def child_command(role: str, child_args: list[str]) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child", role, *child_args]


def nerve_command(
    checkpoint: Path, probe: Path, n_tokens: int, device: str, out: Path
) -> list[str]:
    return [
        *(sys.executable, "-m", "nerve_cli", "-q", "analyze", str(checkpoint.parent)),
        *("--out", str(out), "--probe", str(probe), "--max-tokens", str(n_tokens)),
        *("--seq-len", str(SEQ_LEN), "--batch-size", str(BATCH_SIZE), "--device", device),
        "--force",
    ]


def run_child_process(command: list[str]) -> dict:
    """Run one child process; return its wall time, peak RSS and the load average around it."""
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    process = subprocess.Popen(command, env=environment)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"benchmark child failed with status {status}: {' '.join(command)}")
    return {
        "wall_s": round(wall, 2),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # ru_maxrss is in KiB on Linux
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
    }


def read_nerve_metrics(out_dir: Path) -> list[dict]:
    import pandas as pd

    metrics = pd.read_parquet(out_dir / "metrics").sort_values("layer")
    return metrics[["layer", *METRIC_COLUMNS]].to_dict("records")


def describe_machine() -> dict:
    import platform

    import torch

    cpu = "unknown"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def append_result(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as results:
        results.write(json.dumps(record) + "\n")


def read_results(path: Path) -> list[dict]:
    """Return the latest record per (device, probe size) of the results file."""
    if not path.exists():
        raise SystemExit(f"{path}: no results yet; run without --table-only first")
    latest: dict[tuple[str, int], dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            latest[(record["device"], record["n_tokens"])] = record
    return [latest[key] for key in sorted(latest)]


# --- table ------------------------------------------------------------------------------


def print_table(records: list[dict]) -> None:
    header = (
        "| device | tokens | nerve s | store-all s | forward s | a/b time | a/c time "
        "| nerve MB | store-all MB | forward MB | a/b memory | a/b memory above c "
        "| max rel. diff a vs b | load |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for record in records:
        runs = record["runs"]
        a, b, c = runs["nerve"], runs["store-all"], runs["forward"]
        loads = [run[key] for run in (a, b, c) for key in ("load_before", "load_after")]
        print(
            f"| {record['device']} | {record['n_tokens']} | {a['wall_s']:.1f} | {b['wall_s']:.1f} "
            f"| {c['wall_s']:.1f} | {a['wall_s'] / b['wall_s']:.2f} | {a['wall_s'] / c['wall_s']:.2f} "
            f"| {a['peak_rss_mb']:.0f} | {b['peak_rss_mb']:.0f} | {c['peak_rss_mb']:.0f} "
            f"| {a['peak_rss_mb'] / b['peak_rss_mb']:.2f} "
            f"| {(a['peak_rss_mb'] - c['peak_rss_mb']) / (b['peak_rss_mb'] - c['peak_rss_mb']):.2f} "
            f"| {max_relative_difference(a['metrics'], b['metrics']):.1e} "
            f"| {min(loads):.1f}-{max(loads):.1f} |"
        )
    print_engine_table(records)


def print_engine_table(records: list[dict]) -> None:
    rows = [record for record in records if "engine-float32" in record["runs"]]
    if not rows:
        return
    print()
    print(
        "| device | tokens | run | forward+accumulate s | eigenvalues s | max rel. diff vs float64 engine |"
    )
    print("|---|---|---|---|---|---|")
    for record in rows:
        runs = record["runs"]
        reference = runs["engine-float64"]["metrics"]
        for name in ("engine-float32", "engine-float64", "nerve", "store-all"):
            run = runs[name]
            accumulate = f"{run['accumulate_s']:.1f}" if "accumulate_s" in run else "-"
            eigenvalues = f"{run['eigenvalues_s']:.1f}" if "eigenvalues_s" in run else "-"
            difference = max_relative_difference(run["metrics"], reference)
            print(
                f"| {record['device']} | {record['n_tokens']} | {name} "
                f"| {accumulate} | {eigenvalues} | {difference:.1e} |"
            )


def max_relative_difference(rows: list[dict], reference: list[dict]) -> float:
    worst = 0.0
    for row, expected in zip(rows, reference, strict=True):
        for column in METRIC_COLUMNS:
            worst = max(worst, abs(row[column] - expected[column]) / abs(expected[column]))
    return worst


# --- children -----------------------------------------------------------------------------


def run_child(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    token_ids = torch.from_numpy(np.load(args.probe))  # [S, T]
    device = torch.device(args.device)
    if args.child == "engine":
        result = run_engine(args.checkpoint, token_ids, device, getattr(torch, args.product_dtype))
    else:
        model = load_model(args.checkpoint, device)
        if args.child == "forward":
            result = {"forward_s": run_forward(model, token_ids, device)}
        else:
            result = run_store_all(model, token_ids, device)
    args.child_out.write_text(json.dumps(result))


def load_model(checkpoint: Path, device):
    """Load the checkpoint as nerve does: causal LM, checkpoint dtype on CUDA, float32 on CPU."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = "auto" if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype, local_files_only=True)
    return model.to(device).eval()


def run_forward(model, token_ids, device) -> float:
    import torch

    started = time.perf_counter()
    with torch.inference_mode():
        for batch in torch.split(token_ids, BATCH_SIZE):
            model(input_ids=batch.to(device))
    synchronize(device)
    return round(time.perf_counter() - started, 2)


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_store_all(model, token_ids, device) -> dict:
    """The usual way: keep every activation, then covariance and eigenvalues per point."""
    import torch

    blocks = model.transformer.h
    captured = {(point, layer): [] for layer in range(len(blocks)) for point in ("pre", "post")}
    handles = []
    for layer, block in enumerate(blocks):
        handles.append(block.mlp.c_fc.register_forward_hook(keep_output(captured[("pre", layer)])))
        handles.append(
            block.mlp.c_proj.register_forward_pre_hook(keep_input(captured[("post", layer)]))
        )
    forward_s = run_forward(model, token_ids, device)
    for handle in handles:
        handle.remove()

    started = time.perf_counter()
    spectra = {}
    for key in list(captured):
        activations = torch.cat(captured.pop(key))  # [N, D] float32
        centred = activations - activations.mean(dim=0)  # [N, D]
        del activations
        covariance = centred.T @ centred / (centred.shape[0] - 1)  # [D, D] float32
        del centred
        spectra[key] = torch.linalg.eigvalsh(covariance.double()).flip(0).numpy()
    covariance_s = time.perf_counter() - started
    return {
        "forward_s": forward_s,
        "covariance_s": round(covariance_s, 2),
        "metrics": spectrum_metrics(spectra, len(blocks)),
    }


def keep_output(store: list):
    def hook(module, inputs, output):
        store.append(output.detach().float().cpu().reshape(-1, output.shape[-1]))

    return hook


def keep_input(store: list):
    def hook(module, inputs):
        store.append(inputs[0].detach().float().cpu().reshape(-1, inputs[0].shape[-1]))

    return hook


def spectrum_metrics(spectra: dict, n_layers: int) -> list[dict]:
    from nerve_cli import metrics
    from nerve_cli.measure import spectrum_values

    rows = []
    for layer in range(n_layers):
        pre, _ = metrics.clip_eigenvalues(spectra[("pre", layer)])
        post, _ = metrics.clip_eigenvalues(spectra[("post", layer)])
        rows.append({"layer": layer, **spectrum_values(pre, post)})
    return rows


def run_engine(checkpoint: Path, token_ids, device, product_dtype) -> dict:
    """Time nerve's own measurement phases in process, with the given product dtype."""
    from nerve_cli.architectures import resolve_ffn_points
    from nerve_cli.loading import load_checkpoint
    from nerve_cli.measure import compute_layer_results, measure_model
    from nerve_cli.probe import Probe

    loaded = load_checkpoint(checkpoint, device, "auto")
    points = resolve_ffn_points(loaded.model, loaded.config.model_type)
    probe = Probe("benchmark", "", "benchmark", token_ids.numpy())
    started = time.perf_counter()
    measurement = measure_model(
        loaded.model, points, probe, BATCH_SIZE, loaded.is_causal_lm, product_dtype, False
    )
    synchronize(device)
    accumulated = time.perf_counter()
    layers = compute_layer_results(measurement)
    finished = time.perf_counter()
    return {
        "accumulate_s": round(accumulated - started, 2),
        "eigenvalues_s": round(finished - accumulated, 2),
        "metrics": [{"layer": result.layer, **result.values} for result in layers],
    }


if __name__ == "__main__":
    main()
