"""Normalization layers' affine parameters: layer, group, instance, RMS and eval-mode batch norm.

All are `broadcast_rule`s: z = x̂ ⊙ w + b with x̂ the normalized input, so ∂z/∂w = x̂ and
∂z/∂b = 1. x̂ is recomputed from the op's input (no extra memory kept). Group norm takes the
statistics from the native kernel called with the forward's own arguments: in a compiled step that
call is the forward's (merged by CSE), so x̂ costs one elementwise pass fused into the sum, not a
second normalization; layer norm recomputes x̂, as the same trick raised the compiled transformer
step's peak memory at no gain in time (docs/benchmarks.md, "Settings in the code")."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch._prims_common import suggest_memory_format

from ..forms import accumulation_dtype
from .helpers import broadcast_rule, one
from .registry import OpCall

aten = torch.ops.aten


def _normalized_shape(call: OpCall) -> tuple:
    return tuple(call["normalized_shape"])


def _channel_shape(call: OpCall) -> tuple:
    """(C, 1, ..., 1): a per-channel parameter broadcast against [N, C, *spatial]."""
    x = call["input"]
    return (x.shape[1],) + (1,) * (x.dim() - 2)


def _layer_normalized(call: OpCall) -> torch.Tensor:
    return F.layer_norm(call["input"], call["normalized_shape"], eps=call["eps"])


def _rms_normalized(call: OpCall) -> torch.Tensor:
    return F.rms_norm(call["input"], call["normalized_shape"], eps=call["eps"])


def _group_normalized(call: OpCall) -> torch.Tensor:
    """x̂ per example over each group of channels, from the native kernel's statistics."""
    x, groups = call["input"], call["num_groups"]
    n, c = x.shape[:2]
    # the kernel wants x dense in its suggested layout, which aten.group_norm makes it before the
    # call (a [B, L, C] input moved to [B, C, L] is neither): the same copy as the forward's
    dense = x.contiguous(memory_format=suggest_memory_format(x))
    _, mean, rstd = aten.native_group_norm(dense, call["weight"], call["bias"], n, c, math.prod(x.shape[2:]), groups, call["eps"])
    grouped = x.reshape(n, groups, -1).to(accumulation_dtype(x.dtype))
    return ((grouped - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)).reshape(x.shape)


def _running_stats_normalized(call: OpCall) -> torch.Tensor:
    x = call["input"]
    view = _channel_shape(call)
    mean, var = call["running_mean"].reshape(view), call["running_var"].reshape(view)
    return (x - mean) * torch.rsqrt(var + call["eps"])


def _instance_normalized(call: OpCall) -> torch.Tensor:
    """x̂ per example and channel over the spatial dims (or from the running statistics)."""
    if call["use_input_stats"]:
        return F.instance_norm(call["input"], eps=call["eps"])
    return _running_stats_normalized(call)


def _eval_mode(node) -> bool:
    """In training mode batch statistics mix examples; fxclip refuses that before this point."""
    return not node["training"]


layer_norm = broadcast_rule(aten.layer_norm.default, "layer_norm", weight=_layer_normalized, bias=one, aligned=_normalized_shape)
rms_norm = broadcast_rule(aten.rms_norm.default, "rms_norm", weight=_rms_normalized, aligned=_normalized_shape)
group_norm = broadcast_rule(aten.group_norm.default, "group_norm", weight=_group_normalized, bias=one, aligned=_channel_shape)
instance_norm = broadcast_rule(
    aten.instance_norm.default, "instance_norm", weight=_instance_normalized, bias=one, aligned=_channel_shape
)
batch_norm_eval = broadcast_rule(
    aten.batch_norm.default, "batch_norm_eval", weight=_running_stats_normalized, bias=one, aligned=_channel_shape,
    extra_check=_eval_mode,
)
