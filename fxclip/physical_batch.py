"""`max_physical_batch_size="auto"`: the largest physical batch whose step fits `memory_limit`
bytes, sized from measured steps.

A step's memory grows with the examples it holds at once (activations, the op-output gradients
the rules read, ghost Gram matrices, materialized per-example gradients), while the clipped sums
do not. So the first step of each capture measures the peak bytes its program allocates
(`fxclip.peak.measured`: the CUDA allocator's peak, or on the CPU the tensors alive at once) on
physical batches of 2 and 4 examples (after a first one of 2, not measured: it may compile), fits peak(b) = fixed + per_example · b, and tries the
largest b with peak(b) + S ≤ 0.98 · memory_limit, S the bytes of the clipped sums (a later physical
batch runs beside the running sums, `batch.CombinedOutput`), but at most GROWTH times the largest batch measured to fit. Each tried
batch is measured and the line fitted again through the last two measurements, until the size the
line gives is at most a measured batch that fit (memory grows with the examples, so that size
fits). A tried batch that exceeded the limit (memory growing faster than the line) makes the next
one smaller. The measured batches are part of the step (their clipped sums count), so nothing is
computed twice; the size is kept for the capture's later steps, which are not measured.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from .batch import CombinedOutput, run_in_chunks, select_examples
from .clipping import StepOutput
from .errors import FxclipError
from .peak import measured

WARM_UP = 2  # the first physical batch, not measured (it may compile the step)
MEASURED_SIZES = (2, 4)  # the physical batches of the first step whose peaks give the line
SAFETY = 0.98  # the share of memory_limit sized for: the rest for what a measurement misses (allocator order)
GROWTH = 4  # the largest factor by which a size to try exceeds the largest measured one that fit


class PhysicalBatchSizer:
    """Sizes and runs the physical batches of one capture's steps under `memory_limit` bytes (at
    most `batch_limit` examples, the capture's own bound, if any). `size` is None until a measured
    physical batch showed it fits; `measurements` holds (examples, peak bytes) of each measured one."""

    def __init__(self, memory_limit: float, batch_limit: int | None):
        self.memory_limit, self.batch_limit = memory_limit, batch_limit
        self.size: int | None = None
        self.measurements: list[tuple[int, int]] = []
        self._fitted: int | None = None  # the size the line gives, not yet measured

    def run(self, run: Callable[[tuple, object], StepOutput], inputs: tuple, targets, dims, batch: int) -> StepOutput:
        """The batch's StepOutput from `run` on physical batches (module doc)."""
        device = next(x.device for x in inputs)
        if self.size is None and device.type not in ("cpu", "cuda"):
            raise FxclipError(f'max_physical_batch_size="auto" measures memory on cpu or cuda, not {device.type}; pass a number instead')
        combined, start = CombinedOutput(), 0
        if self.size is None and not self.measurements:  # the first physical batch compiles, initializes: not measured
            start = min(WARM_UP, batch)
            combined.add(run(*select_examples(inputs, targets, dims, 0, start)))
        while start < batch and self.size is None:
            wanted = MEASURED_SIZES[len(self.measurements)] if len(self.measurements) < len(MEASURED_SIZES) else self._fitted
            n = min(wanted, batch - start)
            out, peak = measured(partial(run, *select_examples(inputs, targets, dims, start, n)), device)
            combined.add(out)
            start += n
            self._learn(n, peak, sum(g.numel() * g.element_size() for g in out.grads.values()))
        if start < batch:
            combined.add(run_in_chunks(run, *select_examples(inputs, targets, dims, start, batch - start), dims, batch - start, self.size))
        return combined.output()

    def _learn(self, n: int, peak: int, sums: int) -> None:
        """A physical batch of `n` examples peaked at `peak` bytes, and its clipped sums take `sums`:
        the line through it and the previous measurement gives the next size to try, or `size` once
        one is known to fit (memory grows with the examples, so any size up to a measured one that
        fit fits)."""
        self.measurements.append((n, peak))
        budget = SAFETY * self.memory_limit - sums  # a later physical batch runs beside the running sums
        if len(self.measurements) < len(MEASURED_SIZES):
            return
        (a, peak_a), (b, peak_b) = sorted(self.measurements[-2:])
        per_example = (peak_b - peak_a) / (b - a) if b != a else 0.0
        fixed = peak_a - per_example * a
        if fixed + per_example > budget:
            raise FxclipError(
                f"memory_limit={self.memory_limit:.0f} bytes does not hold a step on one example: measured, a "
                f"step on b examples allocates about {fixed:.0f} + {per_example:.0f}·b bytes beside the running "
                f"clipped sums ({sums} bytes). Raise memory_limit (or pass max_physical_batch_size=1)."
            )
        if per_example <= 0:  # nothing grows with the examples: any size fits
            self.size = self.batch_limit or 2**62
            return
        largest = int((budget - fixed) // per_example)
        if peak > budget:  # this size did not fit: smaller, whatever the line says
            largest = min(largest, n - 1)
        # a line through small batches extrapolates badly (measured: the slope between 1 and 2
        # examples was 14% below the transformer's near 100), so grow at most GROWTH-fold per measurement
        largest = min(largest, GROWTH * max((m for m, p in self.measurements if p <= budget), default=1))
        largest = max(1, largest if self.batch_limit is None else min(largest, self.batch_limit))
        if any(m >= largest and p <= budget for m, p in self.measurements):
            self.size = largest
        else:
            self._fitted = largest
