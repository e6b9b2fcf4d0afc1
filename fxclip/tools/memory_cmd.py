"""Peak memory of one training step at a large batch, per method, and its ratio to the non-private step.

    fxclip memory [--batch 1024] [--device cpu] [--models mnist_cnn transformer] [--physical-batch N] [--json F]

(also `python -m fxclip.memory`) prints a table of peak step memory (MiB) per method: the
non-private step, fxclip and Opacus (when installed), each measured by `fxclip.peak.peak_memory`
around the benchmark's own step for that method (`bench.methods`); with --physical-batch, also
fxclip with max_physical_batch_size=N. docs/memory.md has the results.
"""

from __future__ import annotations

import argparse
import json

import torch

from fxclip.errors import describe
from fxclip.zoo import ZOO, PerExampleCrossEntropy

from ..peak import peak_memory
from .bench.methods import METHODS as BENCH_METHODS
from .bench.methods import WARMUP_STEPS, MethodUnavailable

# label here -> the benchmark's method (fxclip.tools.bench.methods), so both measure the same steps
METHODS = {"nonprivate": "floor", "fxclip": "fxclip", "opacus": "opacus_hooks"}


def step_memory(
    name: str, batch: int = 1024, device: str = "cpu", max_grad_norm: float = 1.0, physical_batch: int | None = None
) -> dict[str, int]:
    """Peak bytes of one gradient step of zoo model `name` at `batch`, per method in METHODS, each
    on its own copy of the model (Opacus only when installed and able to run it), plus
    "fxclip/<physical_batch>": fxclip with `max_physical_batch_size=physical_batch`, if given.
    Each method runs WARMUP_STEPS steps first, so that the measured step is a steady one."""
    entry = ZOO[name]
    inputs, targets = entry.make_batch(batch, torch.Generator().manual_seed(0))
    inputs, targets = tuple(x.to(device) for x in inputs), targets.to(device)
    runs = {label: (method_name, {}) for label, method_name in METHODS.items()}
    if physical_batch is not None:
        runs[f"fxclip/{physical_batch}"] = ("fxclip", {"max_physical_batch_size": physical_batch})
    result = {}
    for label, (method_name, options) in runs.items():
        torch.manual_seed(0)
        model = entry.factory().to(device)
        try:
            method = BENCH_METHODS[method_name](model, PerExampleCrossEntropy(), max_grad_norm, inputs, targets, **options)
            for _ in range(WARMUP_STEPS):
                method.step()
        except (MethodUnavailable, RuntimeError, AttributeError) as e:
            if label != "opacus":  # a peer that cannot run this model is reported, not fatal
                raise
            print(f"opacus skipped on {name} ({device}): {describe(e)}")
            continue
        result[label] = peak_memory(method.step, device)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The memory options (shared by `fxclip memory` and `python -m fxclip.memory`)."""
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=["mnist_cnn", "transformer"])
    parser.add_argument("--physical-batch", type=int, help="also fxclip with max_physical_batch_size=N")
    parser.add_argument("--json", help="also write the numbers (bytes) to this file")


def run(args: argparse.Namespace) -> int:
    """Measure every model of --models and print the table (and write --json)."""
    rows = {name: step_memory(name, args.batch, args.device, physical_batch=args.physical_batch) for name in args.models}
    print(f"peak step memory at B={args.batch} on {args.device} (MiB; ratio to non-private)")
    for name, mem in rows.items():
        floor = mem["nonprivate"]
        cells = "  ".join(f"{m} {b / 2**20:8.1f} ({b / floor:4.2f}x)" for m, b in mem.items())
        print(f"{name:12s} {cells}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"batch": args.batch, "device": args.device, "bytes": rows}, f, indent=1)
    return 0
