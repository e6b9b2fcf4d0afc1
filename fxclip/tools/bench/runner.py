"""Timing, checking and memory of every method on every zoo model, side by side.

For each (model, batch) every method gets its own copy of one model, is warmed up (the first
call, which includes any compilation, is timed separately), and its clipped gradient sum from
the warm-up is checked against the torch.func reference on the same batch, so a fast wrong
method cannot win. Then the timed steps run round-robin — one step of each method per round —
so that load from other processes falls on all methods alike, and each method's median is kept.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Callable, ContextManager, Optional, Sequence

import torch

from fxclip.zoo import ZOO, PerExampleCrossEntropy

from ...peak import peak_memory
from .methods import FLOOR, METHODS, NAIVE, MethodUnavailable, reference_clipped_sum
from .user_models import USER_MODELS

MODELS = {**ZOO, **USER_MODELS}  # what --models can name

CHECK_RTOL = 1e-3  # float32 clipped sums, relative to the largest entry of the reference


@dataclass
class Cell:
    """One method on one model at one batch size."""

    model: str
    batch: int
    method: str
    seconds: Optional[float] = None  # median step time
    first_call_seconds: Optional[float] = None  # includes compilation for compiled methods
    check: str = "n/a"  # "ok", "WRONG (max error ...)" or "n/a" (the floor does not clip)
    skipped: Optional[str] = None  # why the method could not run
    peak_bytes: Optional[int] = None  # peak memory of one step above what was held before it
    times: list = field(default_factory=list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def setup(model_name: str, batch: int, device: torch.device, seed: int = 0):
    """(model in training mode with dropout probabilities set to 0 — so that every method and
    the reference compute one function —, inputs, targets) for a zoo or user model (`MODELS`)."""
    entry = MODELS[model_name]
    torch.manual_seed(seed)
    model = entry.factory().to(device).train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        elif isinstance(module, (torch.nn.MultiheadAttention, torch.nn.RNNBase)):  # their dropout is a float attribute
            module.dropout = 0.0
    (inputs, targets) = entry.make_batch(batch, torch.Generator().manual_seed(seed))
    return model, tuple(x.to(device) for x in inputs), targets.to(device)


def check_grads(got: Optional[dict], expected: dict) -> str:
    """'ok' if every parameter's clipped sum matches the reference to CHECK_RTOL."""
    if got is None:
        return "WRONG (no gradients)"
    scale = max(float(e.abs().max()) for e in expected.values())
    errors = [float((got[k].reshape(e.shape).to(e.dtype) - e).abs().max()) if k in got else float("inf") for k, e in expected.items()]
    worst = max(errors)
    return "ok" if worst <= CHECK_RTOL * max(scale, 1e-12) else f"WRONG (max error {worst:.2e}, scale {scale:.2e})"


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"


def run_cells(
    model_name: str,
    batch: int,
    methods: Sequence[str],
    reps: int,
    warmup: int,
    device: torch.device,
    memory: bool,
    max_grad_norm: float = 1.0,
    naive_reps: int = 3,
    builders: dict[str, Callable] | None = None,
    exclusive: Callable[[], ContextManager] = nullcontext,
) -> list[Cell]:
    """Every method on one model and batch size (see the module doc). The timed steps run inside
    `exclusive()` (the GPU check's lock: other processes prepare their methods meanwhile)."""
    builders = builders or METHODS
    if device.type == "cuda":  # full float32 everywhere, as on the CPU: TF32 would fail the checks
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    loss_fn = PerExampleCrossEntropy()
    base, inputs, targets = setup(model_name, batch, device)
    expected = reference_clipped_sum(base, loss_fn, max_grad_norm, inputs, targets)
    cells, ready = {}, {}
    for name in methods:
        cell = cells[name] = Cell(model_name, batch, name)
        try:
            method = builders[name](copy.deepcopy(base), loss_fn, max_grad_norm, inputs, targets)
            start = time.perf_counter()
            method.step()
            _sync(device)
            cell.first_call_seconds = time.perf_counter() - start
            for _ in range(warmup - 1 if name != NAIVE else 0):
                method.step()
            got = method.grads()
            cell.check = "n/a" if got is None and name.startswith(FLOOR) else check_grads(got, expected)
            ready[name] = method
        except (MethodUnavailable, Exception) as e:  # a peer failing on a model is a result
            cell.skipped = str(e) if isinstance(e, MethodUnavailable) else _first_line(e)
    with exclusive():
        for rep in range(reps):
            for name, method in ready.items():
                if name == NAIVE and rep >= naive_reps:
                    continue
                _sync(device)
                start = time.perf_counter()
                method.step()
                _sync(device)
                cells[name].times.append(time.perf_counter() - start)
    for name in ready:
        cells[name].seconds = statistics.median(cells[name].times)
    if memory:
        for name, method in ready.items():
            cells[name].peak_bytes = _peak_bytes(model_name, batch, name, device, method)
    return [cells[n] for n in methods]


def _peak_bytes(model_name: str, batch: int, method: str, device: torch.device, ready) -> Optional[int]:
    """On a GPU, torch.cuda.max_memory_allocated around one step; on the CPU, the peak resident
    set of one step in a fresh process (fxclip.tools.bench.peak), above what it held before the step."""
    if device.type == "cuda":
        return peak_memory(ready.step, device)
    cmd = [sys.executable, "-m", "fxclip.tools.bench.peak", model_name, str(batch), method]
    # glibc maps every block of a page or more on its own and hands it back to the OS when freed,
    # so the measured step cannot silently reuse heap that the warm-up step left resident
    # (docs/benchmarks.md, "Settings in the code")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "4096", "MALLOC_TRIM_THRESHOLD_": "0"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"]


def run_benchmark(
    models: Sequence[str],
    batches: Sequence[int],
    methods: Sequence[str],
    reps: int = 10,
    warmup: int = 2,
    device: str = "cpu",
    memory: bool = False,
    progress: Callable[[str], None] = lambda s: None,
) -> list[Cell]:
    """Cells for every model × batch × method."""
    dev = torch.device(device)
    cells = []
    for model_name in models:
        for batch in batches:
            progress(f"{model_name} at batch {batch}")
            cells += run_cells(model_name, batch, methods, reps, warmup, dev, memory)
    return cells


def compare_batch_modes(model_name: str, batch: int, steps: int, seed: int = 0) -> list[dict]:
    """fxclip compiled with a dynamic batch vs padded buckets, on `steps` Poisson-sampled batch
    sizes around `batch` (the same sizes for both): compilations, total time (compilation
    included) and the median step time."""
    from fxclip.api import transform
    from fxclip.passes.compile import BATCH_MODES

    gen = torch.Generator().manual_seed(seed)
    sizes = torch.poisson(torch.full((steps,), float(batch)), generator=gen).long().clamp(min=2).tolist()
    loss_fn = PerExampleCrossEntropy()
    results = []
    for mode in BATCH_MODES:
        model, inputs, targets = setup(model_name, max(sizes), torch.device("cpu"))
        private = transform(model, loss_fn, 1.0, compile=mode)
        private.bind(inputs, targets)  # captures the program
        (capture,) = private.captures
        compiles = lambda: 0 if capture.step.compiled is None else capture.step.compiled.compiles  # noqa: E731
        times = []
        total = time.perf_counter()
        for size in sizes:
            before = compiles()
            start = time.perf_counter()
            private.step(tuple(x[:size] for x in inputs), targets[:size])
            if compiles() == before:  # step time without compilation
                times.append(time.perf_counter() - start)
        results.append({
            "model": model_name, "batch_mode": mode, "sizes": sizes, "compiles": compiles(),
            "total_seconds": time.perf_counter() - total,
            "median_step_seconds": statistics.median(times) if times else None,
        })
    return results


def cells_as_dicts(cells: Sequence[Cell]) -> list[dict]:
    return [asdict(c) for c in cells]
