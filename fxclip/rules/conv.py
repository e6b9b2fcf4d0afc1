"""Convolutions, 1-D to 3-D, with stride, padding (ints or 'same'/'valid'), dilation and groups."""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from ..forms import Dense, LinearForm, accumulation_dtype, outer_sum
from ..ops import define
from .helpers import Rows, bias_form, bilinear_rule
from .registry import OpCall

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


def _windows(x, kernel, stride, padding, dilation) -> torch.Tensor:
    """x [N, C, *S] padded and unfolded, a view: [N, C, *out, *kernel], entry (..., *o, *κ) the
    input that kernel offset κ meets at output position o."""
    nd = len(kernel)
    stride, dilation = _per_dim(stride, nd), _per_dim(dilation, nd)
    flat_pad = [p for before_after in reversed(_pads(padding, kernel, dilation)) for p in before_after]
    if any(flat_pad):
        x = F.pad(x, flat_pad)
    for i, (k, s, d) in enumerate(zip(kernel, stride, dilation)):
        x = x.unfold(2 + i, d * (k - 1) + 1, s)
        if d > 1:
            x = x[..., ::d]
    return x


def patches(x, kernel, stride, padding, dilation, groups: int) -> torch.Tensor:
    """im2col for any number of spatial dims: x [N, C, *S] -> [N, groups, L, (C/groups)·∏kernel],
    L the number of output positions, columns ordered like the weight's (C/groups, *kernel)."""
    nd = len(kernel)
    x = _windows(x, kernel, stride, padding, dilation)
    n, c = x.shape[:2]
    out = x.shape[2 : 2 + nd]
    x = x.unflatten(1, (groups, c // groups))  # [N, G, C/G, *out, *kernel]
    order = [0, 1, *range(3, 3 + nd), 2, *range(3 + nd, 3 + 2 * nd)]
    return x.permute(order).reshape(n, groups, math.prod(out), (c // groups) * math.prod(kernel))


# Per-example weight gradients come from the patches (one batched product of each example's
# [C_out, T] output gradient with its [T, d] patches) when an example's patches have at most this
# many entries, else from the conv kernel with examples as groups (no im2col copy). Small convs
# are faster by patches (side by side on a CPU at B=128, patches:kernel 0.05:0.28 ms for 1->16 3x3
# on 8x8, 576 entries) and large ones by the kernel (168:11 ms for 16->16 3x3 on 32x32, 147k
# entries). The patches are also memory while they live: at a bound of 16k, the MNIST CNN's first
# conv (10.8k entries) raised its step's peak from 1.05x to 1.42x the non-private step's.
PATCHES_MAX_ENTRIES = 8192

# On a CPU the weight-gradient kernel runs on chunks of groups whose operands and result have at
# most this many elements: oneDNN copies (reorders) its operands, and with every example's channels as groups
# those copies were the whole batch's. Chunks of 2^20 (4 MiB of float32) took the compiled ResNet's
# step from 191 to 160 MB peak RSS at B=128 on a CPU, at the same speed side by side (1.29x vs
# 1.26x the eager non-private step); chunks of 2^18 saved little more (156 MB) and were slower.
WEIGHT_GRAD_CHUNK_ELEMENTS = 1 << 20


# Per-example weight gradients of a conv with at most this many input channels per group (an RGB
# or grayscale stem) and at most this many kernel offsets come from one batched product per offset
# (the output gradient with the input window that offset meets): oneDNN's grouped kernel is slow
# on groups of so few channels (cuDNN's is not measured yet; batched products suit a GPU, and a
# per-device choice would trace differently on a CPU). Side by side on a CPU at B=128 (2 threads;
# kernel : per offset):
# 3->16 3x3 on 32x32 9.4 : 3.4 ms, 1->32 3x3 on 28x28 5.5 : 1.9 ms, 1->16 5x5 4.2 : 3.2 ms; but
# 8->16 3x3 2.5 : 7.1 ms, and a 7x7 stem (49 offsets), 3->64 on 64x64 stride 2, 51 : 82 ms.
OFFSETS_MAX_IN_CHANNELS = 4
OFFSETS_MAX_KERNEL = 25


def _example_positions(x: torch.Tensor, call: OpCall) -> torch.Tensor:
    """[N, G, L, k] with the batch in N (laid out as the conv's output) -> [B, G, T, k]."""
    xb = call.output_axis.split(x, call.batch_size)  # [B, outer, inner, G, L, k]
    return xb.permute(0, 3, 1, 2, 4, 5).flatten(2, 4)


def _explicit_padding(x, padding, kernel, dilation) -> tuple[torch.Tensor, list[int]]:
    """The input and a symmetric padding list for aten.convolution_backward ('same' with an even
    kernel pads one more after: that part is applied to the input)."""
    pads = _pads(padding, kernel, dilation)
    if all(before == after for before, after in pads):
        return x, [before for before, _ in pads]
    extra = [p for before, after in reversed(pads) for p in (0, after - before)]
    return F.pad(x, extra), [before for before, _ in pads]


def _groups_of_examples(x: torch.Tensor, call: OpCall) -> torch.Tensor:
    """[N, C, *S] with the batch in N -> [N/B, B·C, *S]: each example's channels a group of its own."""
    xb = call.output_axis.split(x, call.batch_size)  # [B, outer, inner, C, *S]
    return xb.permute(1, 2, 0, *range(3, xb.dim())).flatten(0, 1).flatten(1, 2)


def _conv_weight_grad(
    grad: torch.Tensor, x: torch.Tensor, in_per_group: int, kernel: list[int], stride: list[int],
    padding: list[int], dilation: list[int],
) -> torch.Tensor:
    """The weight gradient of aten.convolution_backward, [grad.shape[1], in_per_group, *kernel],
    with groups = x.shape[1] // in_per_group read from the shapes when it runs. With every
    example's channels as groups of their own this gives per-example gradients; as an opaque op
    it also does so in a step traced with a symbolic batch (compile=True), where `groups` (an int
    argument of the aten op) could not be B·G."""
    groups = x.shape[1] // in_per_group
    out_per_group = grad.shape[1] // groups
    # groups are independent, so chunks of them give the same result with smaller kernel copies
    per_group = x.shape[0] * (in_per_group * math.prod(x.shape[2:]) + out_per_group * math.prod(grad.shape[2:]))
    per_group += out_per_group * in_per_group * math.prod(kernel)
    chunk = max(1, WEIGHT_GRAD_CHUNK_ELEMENTS // per_group)
    if chunk >= groups or x.device.type != "cpu":  # measured on CPU only; GPU kernels copy no operands
        return _grouped_weight_grad(grad, x, in_per_group, kernel, stride, padding, dilation)
    out = grad.new_empty(grad.shape[1], in_per_group, *kernel)
    for start in range(0, groups, chunk):
        n = min(chunk, groups - start)
        out[start * out_per_group : (start + n) * out_per_group] = _grouped_weight_grad(
            grad.narrow(1, start * out_per_group, n * out_per_group), x.narrow(1, start * in_per_group, n * in_per_group),
            in_per_group, kernel, stride, padding, dilation,
        )
    return out


def _grouped_weight_grad(grad, x, in_per_group, kernel, stride, padding, dilation) -> torch.Tensor:
    weight = x.new_zeros(()).expand(grad.shape[1], in_per_group, *kernel)  # only its shape is read
    return aten.convolution_backward(
        grad, x, weight, None, stride, padding, dilation, False, [0] * len(kernel), x.shape[1] // in_per_group,
        [False, True, False],
    )[1]


def _conv_weight_grad_shape(grad, x, in_per_group, kernel, stride, padding, dilation):
    return grad.new_empty(grad.shape[1], in_per_group, *kernel)


conv_weight_grad = define(
    "conv_weight_grad(Tensor grad, Tensor x, SymInt in_per_group, SymInt[] kernel, SymInt[] stride, "
    "SymInt[] padding, SymInt[] dilation) -> Tensor",
    _conv_weight_grad, _conv_weight_grad_shape,
)


def _weight_grad_kernel(grad: torch.Tensor, x: torch.Tensor, weight_shape, stride, padding, dilation):
    """The convolution weight-gradient kernel (what an ordinary backward runs) on (grad, x), in
    the accumulation dtype (float32 for bf16/fp16 values); the groups follow from x's channels."""
    dtype = accumulation_dtype(torch.promote_types(grad.dtype, x.dtype))
    grad, x = grad.to(dtype), x.to(dtype)
    nd = len(weight_shape) - 2
    dilation = _per_dim(dilation, nd)
    x, padding = _explicit_padding(x, padding, weight_shape[2:], dilation)
    return conv_weight_grad(grad, x, weight_shape[1], list(weight_shape[2:]), _per_dim(stride, nd), padding, dilation)


def _conv_rows(call: OpCall, out_rows, in_rows, weight_shape, groups: int, padding=None) -> Rows:
    """`Rows` of a convolution's weight W [C_out, C_in/groups, *kernel], which maps `in_rows`
    [N, C_in, *S] to outputs whose gradient is `out_rows` [N, C_out, *out] (stride, dilation and,
    unless given, padding read from the call): unfolded into patches per group it is the linear
    case, x = the patches of in_rows (d = (C_in/groups)·∏kernel per position), g = out_rows per
    output position, one block of W per group (the gradient is block-diagonal, so groups never
    share a Gram product).

    The patches are built for ghost norms and for the per-example gradients of small convs (at most
    PATCHES_MAX_ENTRIES per example); larger convs get per-example gradients from the
    weight-gradient kernel with every example's channels as groups of their own (convs with few
    input channels per group from one batched product per kernel offset), and, when no
    patches were built, the clipped sum from the same kernel on (c ⊙ g), with no im2col copy."""
    batch = call.batch_size
    stride, dilation = call["stride"], call["dilation"]
    padding = call["padding"] if padding is None else padding
    g = out_rows.reshape(out_rows.shape[0], groups, out_rows.shape[1] // groups, -1).transpose(-1, -2)
    g = _example_positions(g, call)  # [B, G, T, C_out/G]
    kernel = weight_shape[2:]
    columns = weight_shape[1] * math.prod(kernel)

    def patch_factor():
        return _example_positions(patches(in_rows, kernel, stride, padding, dilation, groups), call)

    def per_example_grads_by_offset():
        windows = _windows(in_rows, kernel, stride, padding, dilation)  # [N, C_in, *out, *kernel]
        per_offset = []
        for offset in itertools.product(*(range(k) for k in kernel)):
            x = windows[(..., *offset)].reshape(windows.shape[0], groups, weight_shape[1], -1).transpose(-1, -2)
            per_offset.append(outer_sum(Dense(g), Dense(_example_positions(x, call))))  # [B, G, C_out/G, C_in/G]
        return torch.stack(per_offset, -1).reshape(batch, *weight_shape)

    def per_example_grads():
        grads = _weight_grad_kernel(
            _groups_of_examples(out_rows, call), _groups_of_examples(in_rows, call), weight_shape, stride, padding, dilation
        )
        return grads.reshape(batch, *weight_shape)

    def clipped_sum(c):
        dtype = accumulation_dtype(out_rows.dtype)
        scale = call.output_axis.per_row(c.to(dtype), batch, out_rows.shape[0])
        scaled = out_rows.to(dtype) * scale.view(-1, *[1] * (out_rows.dim() - 1))
        return _weight_grad_kernel(scaled, in_rows, weight_shape, stride, padding, dilation)

    by_patches = groups * g.shape[2] * columns <= PATCHES_MAX_ENTRIES  # an example's patches
    by_offset = weight_shape[1] <= OFFSETS_MAX_IN_CHANNELS and math.prod(kernel) <= OFFSETS_MAX_KERNEL
    return Rows(
        Dense.deferred((batch, groups, g.shape[2], columns), patch_factor),
        Dense(g),
        materializer=None if by_patches else per_example_grads_by_offset if by_offset else per_example_grads,
        contraction=clipped_sum,
    )


def _conv_bias(call: OpCall) -> LinearForm:
    """A convolution's bias: Σ over output positions of the output gradient."""
    g_rows = call.grad
    g = _example_positions(g_rows.reshape(g_rows.shape[0], 1, g_rows.shape[1], -1).transpose(-1, -2), call)
    return bias_form(g, call["bias"].shape)


def _conv_weight_rows(call: OpCall, weight: str) -> Rows:
    return _conv_rows(call, call.grad, call["input"], call[weight].shape, call["groups"])


CONV_TRANSPOSE_OPS = [aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input]


def _adjoint_input(call: OpCall) -> tuple[torch.Tensor, list[int]]:
    """(g, padding) for the convolution whose weight gradient is the transposed conv's. That
    convolution reads g at i·s - p + κ·d for x's positions i. output_padding makes g longer at
    the end; while it is below the stride the convolution's output size drops the extra, but
    output_padding may reach the dilation, and then the convolution would have positions past x's
    end: g is then padded by p and cut to what x's positions read (padding 0)."""
    x, g = call["input"], call.grad
    nd = x.dim() - 2
    stride, padding, dilation = (_per_dim(call[name], nd) for name in ("stride", "padding", "dilation"))
    if all(op < s for op, s in zip(_per_dim(call["output_padding"], nd), stride)):
        return g, padding
    g = F.pad(g, [p for before_after in reversed(padding) for p in (before_after, before_after)])
    for i, k in enumerate(call["weight"].shape[2:]):
        g = g.narrow(2 + i, 0, (x.shape[2 + i] - 1) * stride[i] + dilation[i] * (k - 1) + 1)
    return g, [0] * nd


def _conv_transpose_weight_rows(call: OpCall, weight: str) -> Rows:
    """z = conv_transpose(x, W), W [C_in, C_out/groups, *kernel], is the adjoint of the
    convolution u ↦ conv(u, W) from C_out to C_in channels with the same stride, padding, dilation
    and groups, so ⟨z, g⟩ = ⟨x, conv(g, W)⟩ and the weight gradient is that convolution's with g
    as its input and x as its output gradient (see `_adjoint_input` for output_padding)."""
    g, padding = _adjoint_input(call)
    return _conv_rows(call, call["input"], g, call[weight].shape, call["groups"], padding)


def _batch_in_dim0(node) -> bool:
    return node.output_axis.dim == 0


# z = conv(x, W) + b, and its adjoint conv_transpose: W multiplies each position's patch from the left
conv = bilinear_rule(CONV_OPS, "conv", _conv_weight_rows, left="weight", bias=_conv_bias, extra_check=_batch_in_dim0)
conv_transpose = bilinear_rule(
    CONV_TRANSPOSE_OPS, "conv_transpose", _conv_transpose_weight_rows, left="weight", bias=_conv_bias,
    extra_check=_batch_in_dim0,
)
