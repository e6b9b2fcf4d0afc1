"""Normalization layers' affine parameters: layer, group, instance, RMS and eval-mode batch norm.

All share one identity: z = x̂ ⊙ w + b with x̂ the normalized input, so per example
G_w = Σ_positions g ⊙ x̂ and G_b = Σ_positions g, materialized (|w| numbers per example).
Cost: T·|w| per example for each. x̂ is recomputed from the op's input (no extra memory kept).
Group norm takes the statistics from the native kernel called with the forward's own arguments:
in a compiled step that call is the forward's (merged by CSE), so x̂ costs one elementwise pass
fused into the sum, not a second normalization. Layer norm recomputes x̂: the same trick there
raised the compiled step's peak memory at no gain in time (docs/benchmarks.md, "Settings in the
code")."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch._prims_common import suggest_memory_format

from ..forms import PerExampleGrad, accumulation_dtype
from ._util import per_example_sum_to
from .registry import OpCall, register_rule

aten = torch.ops.aten


def _affine_forms(call: OpCall, normalized: torch.Tensor, aligned_shape, weight="weight", bias="bias"):
    """Per-example gradients of w and b, which broadcast as `aligned_shape` against the output."""
    forms = {}
    for name, h in ((weight, lambda: call.grad * normalized), (bias, lambda: call.grad)):
        if name in call.param_names:
            grads = per_example_sum_to(h(), call.output_axis, call.batch_size, aligned_shape)
            forms[name] = PerExampleGrad(grads.reshape(call.batch_size, *call[name].shape))
    return forms


def _channel_shape(call: OpCall) -> tuple:
    """(C, 1, ..., 1): a per-channel parameter broadcast against [N, C, *spatial]."""
    x = call["input"]
    return (x.shape[1],) + (1,) * (x.dim() - 2)


@register_rule(aten.layer_norm.default, params=("weight", "bias"))
def layer_norm(call: OpCall):
    """F.layer_norm: x̂ normalized over the trailing `normalized_shape` dims."""
    shape = call["normalized_shape"]
    xhat = F.layer_norm(call["input"], shape, eps=call["eps"])
    return _affine_forms(call, xhat, tuple(shape))


@register_rule(aten.rms_norm.default, params=("weight",))
def rms_norm(call: OpCall):
    """F.rms_norm: x̂ = x / rms(x) over the trailing `normalized_shape` dims."""
    shape = call["normalized_shape"]
    xhat = F.rms_norm(call["input"], shape, eps=call["eps"])
    return _affine_forms(call, xhat, tuple(shape))


@register_rule(aten.group_norm.default, params=("weight", "bias"))
def group_norm(call: OpCall):
    """F.group_norm: x̂ normalized per example over each group of channels; per-channel w, b."""
    x, groups = call["input"], call["num_groups"]
    n, c = x.shape[:2]
    # the kernel wants x dense in its suggested layout, which aten.group_norm makes it before the
    # call (a [B, L, C] input moved to [B, C, L] is neither): the same copy as the forward's
    dense = x.contiguous(memory_format=suggest_memory_format(x))
    _, mean, rstd = aten.native_group_norm(dense, call["weight"], call["bias"], n, c, math.prod(x.shape[2:]), groups, call["eps"])
    grouped = x.reshape(n, groups, -1).to(accumulation_dtype(x.dtype))
    xhat = ((grouped - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)).reshape(x.shape)
    return _affine_forms(call, xhat, _channel_shape(call))


def _running_stats_normalized(call: OpCall) -> torch.Tensor:
    x = call["input"]
    view = _channel_shape(call)
    mean, var = call["running_mean"].reshape(view), call["running_var"].reshape(view)
    return (x - mean) * torch.rsqrt(var + call["eps"])


@register_rule(aten.instance_norm.default, params=("weight", "bias"))
def instance_norm(call: OpCall):
    """F.instance_norm: x̂ per example and channel over the spatial dims (or running stats)."""
    if call["use_input_stats"]:
        xhat = F.instance_norm(call["input"], eps=call["eps"])
    else:
        xhat = _running_stats_normalized(call)
    return _affine_forms(call, xhat, _channel_shape(call))


@register_rule(aten.batch_norm.default, params=("weight", "bias"), extra_check=lambda n: not n.args[5])
def batch_norm_eval(call: OpCall):
    """BatchNorm in eval mode: x̂ from the running statistics, so examples stay independent.
    (In training mode batch statistics mix examples; fxclip refuses that before this point.)"""
    return _affine_forms(call, _running_stats_normalized(call), _channel_shape(call))
