"""Where the batch lives in a tensor, and a batch in pieces.

A tensor's batch axis is not always dim 0 and not always a whole dim: MultiheadAttention
reshapes (T, B, E) into (T*B, E), and heads are folded in as (B*H, T, d). `BatchAxis(dim, inner)`
says that `shape[dim] == outer * B * inner` in row-major order, which covers all of these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.utils._pytree as pytree

from .clipping import StepOutput


@dataclass(frozen=True)
class BatchAxis:
    dim: int
    inner: int = 1

    def split(self, x: torch.Tensor, batch_size: int) -> torch.Tensor:
        """`x` as [B, *shape[:dim], outer, inner, *shape[dim+1:]]: example i's entries in row i,
        in their own order (flattening dims `dim` and `dim + 1` of a row gives the layout the same
        op would have for a batch of one)."""
        return x.unflatten(self.dim, (-1, batch_size, self.inner)).movedim(self.dim + 1, 0)

    def per_row(self, values: torch.Tensor, batch_size: int, size: int) -> torch.Tensor:
        """[B] per-example values -> [size], one per entry of dim `dim` (which holds the batch)."""
        outer = size // (batch_size * self.inner)
        return values.view(1, batch_size, 1).expand(outer, batch_size, self.inner).reshape(size)


def select_examples(inputs: tuple, targets, dims, start: int, n: int) -> tuple:
    """(inputs, targets) of examples start..start+n-1: each input narrowed along its batch dim,
    the targets along dim 0."""
    sub_targets = pytree.tree_map(lambda t: t.narrow(0, start, n) if isinstance(t, torch.Tensor) else t, targets)
    return tuple(x.narrow(d, start, n) for x, d in zip(inputs, dims)), sub_targets


def run_in_chunks(run: Callable[[tuple, object], StepOutput], inputs: tuple, targets, dims, batch: int, size: int) -> StepOutput:
    """`run(inputs, targets)` on physical batches of at most `size` examples (slices along each
    input's batch dim and the targets' dim 0), combined as one batch's result: per-example
    vectors (and per-group rows) concatenated, clipped sums added (exact: clipping is per example)."""
    if size >= batch:
        return run(inputs, targets)
    combined = CombinedOutput()
    for start in range(0, batch, size):
        combined.add(run(*select_examples(inputs, targets, dims, start, min(size, batch - start))))
    return combined.output()


class CombinedOutput:
    """The StepOutputs of consecutive physical batches as one: each added one's clipped sums go
    into running sums at once (in place: the running sums are copies, and only they carry over),
    so adding holds two sets of sums, not three."""

    def __init__(self):
        self._vectors: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._group_norms: list[torch.Tensor] = []  # per_layer's [B, G] rows
        self._grads: dict[str, torch.Tensor] = {}

    def add(self, out: StepOutput) -> None:
        self._vectors.append((out.losses, out.norms, out.clip_factors))
        if out.group_norms is not None:
            self._group_norms.append(out.group_norms)
        for key, g in out.grads.items():
            running = self._grads.get(key)
            if running is None:
                self._grads[key] = g.clone()  # not a step's own output, which may be a view
            elif running.layout == g.layout == torch.strided:
                running.add_(g)
            else:  # a sparse sum (nn.Embedding(sparse=True))
                self._grads[key] = running + g

    def output(self) -> StepOutput:
        losses, norms, clip = (torch.cat(parts) for parts in zip(*self._vectors))
        return StepOutput(losses, norms, clip, self._grads, torch.cat(self._group_norms) if self._group_norms else None)
