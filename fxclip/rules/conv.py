"""Convolutions, 1-D to 3-D, with stride, padding (ints or 'same'/'valid'), dilation and groups."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..forms import Dense, LinearForm
from ._util import bias_form
from .registry import OpCall, register_rule

aten = torch.ops.aten

CONV_OPS = [
    aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
    aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding,
]


def _per_dim(value, nd: int) -> list[int]:
    values = [value] if isinstance(value, int) else list(value)
    return values * nd if len(values) == 1 else values


def _pads(padding, kernel, dilation) -> list[tuple[int, int]]:
    """(before, after) per spatial dim; 'same' puts the odd element after, as PyTorch does."""
    if padding == "valid":
        return [(0, 0)] * len(kernel)
    if padding == "same":
        return [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for k, d in zip(kernel, dilation)]
    return [(p, p) for p in _per_dim(padding, len(kernel))]


def patches(x, kernel, stride, padding, dilation, groups: int) -> torch.Tensor:
    """im2col for any number of spatial dims: x [N, C, *S] -> [N, groups, L, (C/groups)·∏kernel],
    L the number of output positions, columns ordered like the weight's (C/groups, *kernel)."""
    nd = len(kernel)
    stride, dilation = _per_dim(stride, nd), _per_dim(dilation, nd)
    flat_pad = [p for before_after in reversed(_pads(padding, kernel, dilation)) for p in before_after]
    if any(flat_pad):
        x = F.pad(x, flat_pad)
    for i, (k, s, d) in enumerate(zip(kernel, stride, dilation)):
        x = x.unfold(2 + i, d * (k - 1) + 1, s)
        if d > 1:
            x = x[..., ::d]
    n, c = x.shape[:2]
    out = x.shape[2 : 2 + nd]
    x = x.unflatten(1, (groups, c // groups))  # [N, G, C/G, *out, *kernel]
    order = [0, 1, *range(3, 3 + nd), 2, *range(3 + nd, 3 + 2 * nd)]
    return x.permute(order).reshape(n, groups, math.prod(out), (c // groups) * math.prod(kernel))


def _example_positions(x: torch.Tensor, call: OpCall) -> torch.Tensor:
    """[N, G, L, k] with the batch in N (laid out as the conv's output) -> [B, G, T, k]."""
    xb = call.output_axis.split(x, call.batch_size)  # [B, outer, inner, G, L, k]
    return xb.permute(0, 3, 1, 2, 4, 5).flatten(2, 4)


def _batch_in_dim0(node) -> bool:
    return node.meta["fxclip_batch_axis"].dim == 0


@register_rule(CONV_OPS, params=("weight", "bias"), extra_check=_batch_in_dim0)
def conv(call: OpCall):
    """z = conv(x, W) + b. Unfolded into patches per group it is the linear case: T = output
    positions, d = (C_in/groups)·∏kernel, one [C_out/groups, d] block per group (the gradient is
    block-diagonal, so groups never share a Gram product).

    weight: LinearForm(L = g, R = patches); ghost G·T²(d+p), materialize G·T·d·p.
    bias:   Σ over positions of g."""
    weight = call["weight"]
    groups = call["groups"]
    g = call.grad  # [N, C_out, *out]
    g = g.reshape(g.shape[0], groups, g.shape[1] // groups, -1).transpose(-1, -2)
    g = _example_positions(g, call)
    forms = {}
    if "weight" in call.param_names:
        x = patches(call["input"], weight.shape[2:], call["stride"], call["padding"], call["dilation"], groups)
        forms["weight"] = LinearForm(Dense(g), Dense(_example_positions(x, call)), weight.shape)
    if "bias" in call.param_names:
        forms["bias"] = bias_form(g, call["bias"].shape)
    return forms
