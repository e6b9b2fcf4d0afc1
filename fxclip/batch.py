"""Where the batch lives in a tensor.

A tensor's batch axis is not always dim 0 and not always a whole dim: MultiheadAttention
reshapes (T, B, E) into (T*B, E), and heads are folded in as (B*H, T, d). `BatchAxis(dim, inner)`
says that `shape[dim] == outer * B * inner` in row-major order, which covers all of these.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.utils._pytree as pytree


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
