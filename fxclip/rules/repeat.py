"""A parameter tiled with `repeat`: MultiheadAttention's add_bias_kv repeats bias_k and bias_v
over the batch, a learned initial state or class token may be tiled the same way.

Identity: z = repeat(V, r) lays copies of V side by side, so per example
G_V = Σ over the copies of V that example i owns of g restricted to that copy (PerExampleGrad)."""

from __future__ import annotations

import torch

from ..batch import BatchAxis
from ..errors import FxclipError
from ..forms import PerExampleGrad
from .helpers import per_example_sum_to
from .registry import OpCall, register_rule

aten = torch.ops.aten


def repeat(call: OpCall) -> PerExampleGrad:
    """Write each output dim as (copies, V's size) and sum the copies per example (see above)."""
    reps = list(call["repeats"])
    shape = [1] * (len(reps) - call["self"].dim()) + list(call["self"].shape)
    interleaved = [s for pair in zip(reps, shape) for s in pair]  # [r0, v0, r1, v1, ...]
    axis = call.output_axis
    if axis.inner % shape[axis.dim]:
        raise FxclipError(
            f"repeat of a parameter of shape {tuple(call['self'].shape)} by {reps}: the batch does not "
            "fall on whole copies of the parameter, so examples share entries"
        )
    tiled_axis = BatchAxis(2 * axis.dim, axis.inner // shape[axis.dim])
    aligned = [s for v in shape for s in (1, v)]
    grads = per_example_sum_to(call.grad.reshape(interleaved), tiled_axis, call.batch_size, aligned)
    return PerExampleGrad(grads.reshape(call.batch_size, *call["self"].shape))


register_rule(aten.repeat.default, self=repeat)
