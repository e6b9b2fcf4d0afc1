"""Parameters that enter elementwise by broadcasting: a scale (LayerScale, a hand-written RMSNorm
weight), a raw bias, a positional table added to activations, a parameter expanded over the batch
(a class token, a learned initial state). Each op is a `broadcast_rule` with ∂z/∂V per operand."""

from __future__ import annotations

import torch

from .helpers import broadcast_rule, one

aten = torch.ops.aten

add = broadcast_rule(aten.add.Tensor, "add", self=one, other=lambda call: call["alpha"])  # z = x + α·y
sub = broadcast_rule(aten.sub.Tensor, "sub", self=one, other=lambda call: -call["alpha"])  # z = x - α·y
mul = broadcast_rule(aten.mul.Tensor, "mul", self=lambda call: call["other"], other=lambda call: call["self"])
div = broadcast_rule(  # z = x / y: ∂z/∂y = -z/y
    aten.div.Tensor, "div", self=lambda call: 1 / call["other"], other=lambda call: -call.output / call["other"]
)
expand = broadcast_rule(aten.expand.default, "expand", self=one)
