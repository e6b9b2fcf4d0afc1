"""Where the batch lives in a tensor.

A tensor's batch axis is not always dim 0 and not always a whole dim: MultiheadAttention
reshapes (T, B, E) into (T*B, E), and heads are folded in as (B*H, T, d). `BatchAxis(dim, inner)`
says that `shape[dim] == outer * B * inner` in row-major order, which covers all of these.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BatchAxis:
    dim: int
    inner: int = 1

    def split(self, x: torch.Tensor, batch_size: int) -> torch.Tensor:
        """`x` as [B, outer, inner, <other dims in order>]: every example's entries in one row."""
        y = x.unflatten(self.dim, (-1, batch_size, self.inner))
        return y.movedim(self.dim + 1, 0)

    def merge(self, y: torch.Tensor, like_shape) -> torch.Tensor:
        """Inverse of `split`: a [B, outer, inner, ...] tensor back to the layout `like_shape`."""
        return y.movedim(0, self.dim + 1).flatten(self.dim, self.dim + 2).reshape(like_shape)

    def per_example_shape(self, shape, batch_size: int) -> tuple:
        """The shape the same tensor has for a batch of one example."""
        shape = list(shape)
        shape[self.dim] //= batch_size
        return tuple(shape)
