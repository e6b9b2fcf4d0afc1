"""Peak memory of a training step, measured the same way for fxclip, the non-private step and peers.

`peak_memory(fn)` runs `fn()` and returns the largest number of bytes held by tensors that `fn`
allocated and had alive at once (memory held before the call, such as the model and the batch,
is not counted). On CUDA it is `torch.cuda.max_memory_allocated` minus what was allocated before
the call. On the CPU, where PyTorch keeps no allocator statistics, every tensor an op returns is
tracked by a `TorchDispatchMode` (by storage, so views count once) until it is freed; scratch
memory an op frees before returning is not seen, for either method compared.
"""

from __future__ import annotations

import gc
import weakref
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fxclip.errors import describe


class _LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of storages created inside the mode while they are alive, and their peak."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and not t.is_meta:
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key in self._seen or storage.nbytes() == 0:
                    continue
                self._seen.add(key)
                self.live += storage.nbytes()
                weakref.finalize(storage, self._release, key, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


def peak_memory(fn: Callable[[], object], device: str | torch.device = "cpu") -> int:
    """Peak bytes allocated by `fn()` above what was allocated before it (see the module doc)."""
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if device.type != "cpu":
        raise ValueError(f"peak_memory measures 'cpu' or 'cuda' devices, not {device.type!r}")
    tracker = _LiveTensorBytes()
    with tracker:
        fn()
    return tracker.peak


# ---- peak memory of one training step, per method, at a large batch ------------------------------

# label here -> the benchmark's method (fxclip.bench.methods), so both measure the same steps
METHODS = {"nonprivate": "floor", "fxclip": "fxclip", "opacus": "opacus_hooks"}


def step_memory(
    name: str, batch: int = 1024, device: str = "cpu", max_grad_norm: float = 1.0, physical_batch: int | None = None
) -> dict[str, int]:
    """Peak bytes of one gradient step of zoo model `name` at `batch`, per method in METHODS, each
    on its own copy of the model (Opacus only when installed and able to run it), plus
    "fxclip/<physical_batch>": fxclip with `max_physical_batch_size=physical_batch`, if given.
    Each method runs once untimed first (capture, lazy state)."""
    from .bench.methods import METHODS as BENCH_METHODS
    from .bench.methods import MethodUnavailable
    from fxclip.zoo import ZOO, PerExampleCrossEntropy

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
            method.step()
        except (MethodUnavailable, RuntimeError, AttributeError) as e:
            if label != "opacus":  # a peer that cannot run this model is reported, not fatal
                raise
            print(f"opacus skipped on {name} ({device}): {describe(e)}")
            continue
        result[label] = peak_memory(method.step, device)
    return result


def main(argv=None) -> None:
    """`python -m fxclip.memory [--batch 1024] [--device cpu] [--models mnist_cnn transformer]
    [--physical-batch N]`: a table of peak step memory (MiB) per method and its ratio to the
    non-private step (with --physical-batch, also fxclip with max_physical_batch_size=N)."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=["mnist_cnn", "transformer"])
    parser.add_argument("--physical-batch", type=int, help="also fxclip with max_physical_batch_size=N")
    parser.add_argument("--json", help="also write the numbers (bytes) to this file")
    args = parser.parse_args(argv)
    rows = {name: step_memory(name, args.batch, args.device, physical_batch=args.physical_batch) for name in args.models}
    print(f"peak step memory at B={args.batch} on {args.device} (MiB; ratio to non-private)")
    for name, mem in rows.items():
        floor = mem["nonprivate"]
        cells = "  ".join(f"{m} {b / 2**20:8.1f} ({b / floor:4.2f}x)" for m, b in mem.items())
        print(f"{name:12s} {cells}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"batch": args.batch, "device": args.device, "bytes": rows}, f, indent=1)


if __name__ == "__main__":
    main()
