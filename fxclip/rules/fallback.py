"""The fallback: any op, any parameter operand, by `torch.func` on that op alone.

Identity: G_i = vjp of the op for example i alone, with example i's operands and output gradient
(`vmap` over examples). Cost: one batched vjp of the op; memory B·|W| for the per-example
gradients. Exact for every op that treats examples independently, so any model works; fxclip
lists the ops that use it so a user can add a cheaper rule.
"""

from __future__ import annotations

import torch

from ..batch import BatchAxis
from ..errors import FxclipError
from ..forms import PerExampleGrad
from .registry import OpCall, set_fallback


def _one_example_layout(x: torch.Tensor, axis: BatchAxis) -> torch.Tensor:
    """[outer, inner, *others] of one example -> that example's tensor in the op's own layout."""
    return x.movedim((0, 1), (axis.dim, axis.dim + 1)).flatten(axis.dim, axis.dim + 1)


@set_fallback
def per_example_vjp(call: OpCall) -> dict[str, PerExampleGrad]:
    """G_i = vjp_W(op)(example i's operands; example i's output gradient), vmapped over i."""
    names = call.param_names
    batched = {n: ax for n, ax in call.axes.items() if ax is not None and n not in names}
    op = call.node.target

    def one_example(xs: dict, g: torch.Tensor):
        fixed = dict(call.arguments)
        fixed.update({n: _one_example_layout(x, batched[n]) for n, x in xs.items()})

        def op_of_params(*params):
            out = op(**{**fixed, **dict(zip(names, params))})
            return out[0] if isinstance(out, (tuple, list)) else out

        _, vjp_fn = torch.func.vjp(op_of_params, *(call[n] for n in names))
        return vjp_fn(_one_example_layout(g, call.output_axis))

    xs = {n: call.examples(n) for n in batched}
    try:
        grads = torch.func.vmap(one_example)(xs, call.grad_examples())
    except (RuntimeError, NotImplementedError) as e:
        if op.namespace == "aten":
            raise
        from ..passes.analyze import where

        raise FxclipError(
            f"{where(call.node)}: no fxclip rule covers the custom op {op}, and the per-example "
            f"fallback cannot run it under torch.func.vmap ({str(e).splitlines()[0]}). Register a rule "
            f"with @fxclip.register_rule({op}, params={names!r}) (see docs/custom_rules.md), or give "
            "the op a batching rule with torch.library.register_vmap."
        ) from e
    return {n: PerExampleGrad(gr) for n, gr in zip(names, grads)}
