"""Benchmark every per-example clipping method against the non-private step on the zoo.

Times, side by side with warm-up and medians, on each zoo model and batch size: the non-private
step eager and compiled (the floor), fxclip eager and compiled, the naive per-example loop,
torch.func vmap(grad) eager and compiled, and Opacus with hooks and with ghost clipping (when
installed). Each method's clipped gradient sum is checked against torch.func on the same batch.
Writes benchmark.md (ratios to the floor, speed-up over naive, peak memory), benchmark.json and
benchmark.png into --out.

    python -m fxclip.bench                        # the whole zoo at batch 128 and 512
    python -m fxclip.bench --models mnist_cnn --batches 128 --memory
    python -m fxclip.bench --models user --batches 128   # models written the way users write them
    python -m fxclip.bench --quick                # seconds: two small models, no compilation
    python -m fxclip.bench --batch-modes mnist_cnn  # compiled fxclip: dynamic batch vs buckets
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch

from fxclip.errors import FxclipError
from fxclip.zoo import ZOO

from .methods import COMPILED, DEFAULT_METHODS, METHODS, WARMUP_STEPS
from .report import write_outputs
from .runner import MODELS, compare_batch_modes, run_benchmark
from .user_models import USER_MODELS

QUICK = {"models": ["mlp", "tied"], "batches": [8, 16], "reps": 3, "warmup": WARMUP_STEPS}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The bench options (shared by `python -m fxclip.bench` and `fxclip bench`)."""
    parser.add_argument("--models", nargs="+", metavar="NAME",
                        help=f"zoo models (default all: {', '.join(ZOO)}) or models written the way users write them "
                             f"({', '.join(USER_MODELS)}; `user` for all of them)")
    parser.add_argument("--batches", nargs="+", type=int, default=[128, 512], metavar="B", help="batch sizes (default 128 512)")
    parser.add_argument("--methods", nargs="+", metavar="NAME", help=f"methods (default: {', '.join(DEFAULT_METHODS)}; also {', '.join(set(METHODS) - set(DEFAULT_METHODS))})")
    parser.add_argument("--reps", type=int, default=10, help="timed steps per method (median kept; default 10)")
    parser.add_argument("--warmup", type=int, default=WARMUP_STEPS,
                        help=f"untimed steps per method first (default {WARMUP_STEPS}: a non-compiled fxclip step traces its graph on the last)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default torch's; 1 is steadier on a shared machine)")
    parser.add_argument("--memory", action="store_true", help="also measure peak memory per method")
    parser.add_argument("--quick", action="store_true", help="tiny run for tests: mlp and tied, batches 8 and 16, eager methods")
    parser.add_argument("--batch-modes", nargs="+", metavar="NAME",
                        help="instead: compare compiled fxclip's dynamic batch with padded buckets on these models")
    parser.add_argument("--out", default="build/bench", metavar="DIR", help="output directory (default build/bench)")


def _model_names(names: list[str]) -> list[str]:
    """The names with `user` standing for every user-written model."""
    return [n for name in names for n in (USER_MODELS if name == "user" else [name])]


def _validate(args) -> None:
    for name in _model_names(args.models or []) + (args.batch_modes or []):
        if name not in MODELS:
            raise FxclipError(f"unknown model {name!r}; the zoo has {', '.join(ZOO)}; the user-written models are "
                              f"{', '.join(USER_MODELS)} (`user` for all)")
    for name in args.methods or []:
        if name not in METHODS:
            raise FxclipError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    if any(b < 2 for b in args.batches) or args.reps < 1 or args.warmup < 1 or (args.threads or 1) < 1:
        raise FxclipError("batch sizes must be >= 2, --reps, --warmup and --threads >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise FxclipError("--device cuda, but torch sees no CUDA device; use --device cpu")


def machine(device: str) -> str:
    """The machine in words: CPU (cores) or the GPU's name, and the torch version."""
    if device.startswith("cuda"):
        what = torch.cuda.get_device_name(torch.device(device))
    else:
        what = f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    return f"{what}; torch {torch.__version__}; {platform.system()}"


def run(args: argparse.Namespace) -> int:
    """Run the benchmark the options describe and write its outputs."""
    _validate(args)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path("build/inductor-cache").resolve()))
    out = Path(args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the memory subprocesses
    if args.batch_modes:
        results = [r for name in args.batch_modes for r in compare_batch_modes(name, args.batches[0], steps=20)]
        out.mkdir(parents=True, exist_ok=True)
        (out / "batch_modes.json").write_text(json.dumps(results, indent=1))
        for r in results:
            step = f"{r['median_step_seconds'] * 1e3:.1f} ms" if r["median_step_seconds"] else "-"
            print(f"{r['model']}: {r['batch_mode']}: {r['compiles']} compiles, {r['total_seconds']:.1f} s for "
                  f"{len(r['sizes'])} steps, median step {step}")
        return 0
    models = _model_names(args.models) if args.models else (QUICK["models"] if args.quick else list(ZOO))
    methods = args.methods or [m for m in DEFAULT_METHODS if not (args.quick and m in COMPILED)]
    batches, reps, warmup = (QUICK["batches"], QUICK["reps"], QUICK["warmup"]) if args.quick else (args.batches, args.reps, args.warmup)
    command = "python -m fxclip.bench " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("__main__.py") else "fxclip " + " ".join(sys.argv[1:])
    cells = run_benchmark(models, batches, methods, reps, warmup, args.device, args.memory,
                          progress=lambda s: print(s, file=sys.stderr, flush=True))
    meta = {"machine": machine(args.device), "command": command, "reps": reps, "warmup": warmup,
            "header": f"Machine: {machine(args.device)}\nCommand: `{command}`"}
    paths = write_outputs(cells, methods, out, meta)
    print(paths["markdown"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def main(argv=None) -> int:
    """`python -m fxclip.bench`: bad options exit with status 2 and a message."""
    parser = argparse.ArgumentParser(prog="python -m fxclip.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except FxclipError as err:
        print(f"fxclip bench: error: {err}", file=sys.stderr)
        return 2
