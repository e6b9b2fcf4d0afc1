"""Parameters that enter elementwise by broadcasting: a scale (LayerScale, a hand-written RMSNorm
weight), a raw bias, a positional table added to activations, a parameter expanded over the batch.

Identity: z = x ∘ V with V broadcast over positions, so per example
G_V = Σ over the positions V was broadcast across of g ⊙ ∂z/∂V, materialized ([B, *V.shape]).
Cost: one elementwise product and a reduction, T·|V| per example."""

from __future__ import annotations

import torch

from ..forms import PerExampleGrad
from ._util import per_example_sum_to
from .registry import OpCall, register_rule

aten = torch.ops.aten


def _reduce(call: OpCall, name: str, h: torch.Tensor) -> PerExampleGrad:
    # a real parameter that meets a complex operand gets the real part (autograd's convention)
    h = h.real if h.is_complex() and not call[name].is_complex() else h
    return PerExampleGrad(per_example_sum_to(h, call.output_axis, call.batch_size, call[name].shape))


def _other(name: str) -> str:
    return "other" if name == "self" else "self"


@register_rule(aten.add.Tensor, params=("self", "other"))
def add(call: OpCall):
    """z = x + α·y: ∂z/∂x = 1, ∂z/∂y = α."""
    scale = {"self": 1, "other": call["alpha"]}
    return {n: _reduce(call, n, call.grad * scale[n]) for n in call.param_names}


@register_rule(aten.sub.Tensor, params=("self", "other"))
def sub(call: OpCall):
    """z = x - α·y: ∂z/∂x = 1, ∂z/∂y = -α."""
    scale = {"self": 1, "other": -call["alpha"]}
    return {n: _reduce(call, n, call.grad * scale[n]) for n in call.param_names}


@register_rule(aten.mul.Tensor, params=("self", "other"))
def mul(call: OpCall):
    """z = x ⊙ y: ∂z/∂x = y (the gradient is g ⊙ conj(y), which is g ⊙ y for real y)."""
    return {n: _reduce(call, n, call.grad * call[_other(n)].conj()) for n in call.param_names}


@register_rule(aten.div.Tensor, params=("self", "other"))
def div(call: OpCall):
    """z = x / y: ∂z/∂x = 1/y, ∂z/∂y = -z/y (the gradient is g ⊙ conj(∂z/∂·))."""
    deriv = {"self": lambda: 1 / call["other"], "other": lambda: -call.output / call["other"]}
    return {n: _reduce(call, n, call.grad * deriv[n]().conj()) for n in call.param_names}


@register_rule(aten.expand.default, params=("self",))
def expand(call: OpCall):
    """z = V expanded over the batch (a class token, a learned initial state): ∂z/∂V = 1."""
    return {"self": _reduce(call, "self", call.grad)}
