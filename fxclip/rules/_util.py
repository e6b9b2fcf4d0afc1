"""Small tensor helpers shared by the built-in rules."""

from __future__ import annotations

import torch

from ..batch import BatchAxis
from ..errors import FxclipError
from ..forms import Dense, LinearForm, accumulation_dtype


def positions(x: torch.Tensor) -> torch.Tensor:
    """[B, <entries>..., k] -> [B, 1, T, k]: every non-feature entry of an example is a position."""
    return x.flatten(1, -2).unsqueeze(1)


def bias_form(g: torch.Tensor, shape: torch.Size) -> LinearForm:
    """A bias added at every position: G_i = Σ_t g_it, i.e. L = g and R = a column of ones.
    Materialized as that sum over positions (not a product with the ones)."""
    return LinearForm(
        Dense(g),
        Dense(g.new_ones(*g.shape[:-1], 1)),
        shape,
        materializer=lambda: g.sum(2, dtype=accumulation_dtype(g.dtype)).unsqueeze(-1),
    )


def per_example_sum_to(h: torch.Tensor, axis: BatchAxis, batch_size: int, shape) -> torch.Tensor:
    """For each example, sum `h` (laid out like an op output) down to the broadcast operand
    `shape`, right-aligned as in broadcasting. Returns [B, *shape], summed in at least float32."""
    nd = h.dim()
    aligned = [1] * (nd - len(shape)) + list(shape)
    if aligned[axis.dim] != 1:
        raise FxclipError(
            f"a parameter of shape {tuple(shape)} varies along the batch axis (dim {axis.dim}) of "
            f"a {tuple(h.shape)} tensor; fxclip cannot tell examples apart there"
        )
    hb = axis.split(h, batch_size)  # [B, *before, outer, inner, *after]
    target = aligned[: axis.dim] + [1, 1] + aligned[axis.dim + 1 :]
    dims = [i + 1 for i, (t, s) in enumerate(zip(target, hb.shape[1:])) if t == 1 and s != 1]
    out = hb.sum(dims, keepdim=True, dtype=accumulation_dtype(hb.dtype)) if dims else hb
    return out.reshape(batch_size, *shape)


def moved_axis(axis: BatchAxis, ndim: int) -> BatchAxis:
    """The batch axis after swapping the last two dims of an `ndim`-dim tensor."""
    swap = {ndim - 1: ndim - 2, ndim - 2: ndim - 1}
    return BatchAxis(swap.get(axis.dim, axis.dim), axis.inner)


def swap_last(shape) -> torch.Size:
    """`shape` with its last two dims swapped (the shape of a matrix, or of each in a stack, transposed)."""
    return torch.Size([*shape[:-2], shape[-1], shape[-2]])
