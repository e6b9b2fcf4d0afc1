"""Peak memory of a training step, measured the same way for fxclip, the non-private step and peers.

`peak_memory(fn)` runs `fn()` and returns the largest number of bytes held by tensors that `fn`
allocated and had alive at once (memory held before the call, such as the model and the batch,
is not counted). On CUDA it is `torch.cuda.max_memory_allocated` minus what was allocated before
the call. On the CPU, where PyTorch keeps no allocator statistics, every tensor an op returns is
tracked by a `TorchDispatchMode` (by storage, so views count once) until it is freed; scratch
memory an op frees before returning is not seen, for either method compared.

The `fxclip memory` command (`tools/memory_cmd.py`) measures one step per method with it, and
`max_physical_batch_size="auto"` (`physical_batch.py`) sizes the physical batch from `measured`.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


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
        # a view of an operand (of memory held before `fn`, such as a slice of the batch) is no allocation
        operands = {a.untyped_storage().data_ptr() for a in tree_leaves((args, kwargs)) if _holds_cpu_memory(a)}
        for t in tree_leaves(out):
            if _holds_cpu_memory(t):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key in self._seen or key in operands or storage.nbytes() == 0:
                    continue
                self._seen.add(key)
                self.live += storage.nbytes()
                weakref.finalize(storage, self._release, key, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


def _holds_cpu_memory(t) -> bool:
    """A CPU tensor with real storage: not the fake or meta tensors of a capture or compilation
    that runs inside `fn` (they hold no memory, and asking for their storage's address raises)."""
    return isinstance(t, torch.Tensor) and t.device.type == "cpu" and not t.is_meta and not isinstance(t, FakeTensor)


def peak_memory(fn: Callable[[], object], device: str | torch.device = "cpu") -> int:
    """Peak bytes allocated by `fn()` above what was allocated before it (see the module doc)."""
    return measured(fn, device)[1]


def measured(fn: Callable[[], object], device: str | torch.device = "cpu") -> tuple[object, int]:
    """`fn()`'s result and its peak bytes, as `peak_memory` counts them."""
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - before
    if device.type != "cpu":
        raise ValueError(f"peak_memory measures 'cpu' or 'cuda' devices, not {device.type!r}")
    tracker = _LiveTensorBytes()
    with tracker:
        result = fn()
    return result, tracker.peak
