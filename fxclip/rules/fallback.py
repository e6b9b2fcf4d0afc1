"""The fallback: any op, any parameter operand, by `torch.func` on that op alone.

Identity: G_i = vjp of the op for example i alone, with example i's operands and output gradient
(`vmap` over examples), a PerExampleGrad. Exact for every op that treats examples independently,
so any model works; fxclip lists the ops that use it so a user can add a cheaper rule.
"""

from __future__ import annotations

import torch

from ..batch import BatchAxis
from ..errors import FxclipError
from ..forms import PerExampleGrad
from .registry import OpCall, set_fallback


def _one_example_layout(x: torch.Tensor, axis: BatchAxis) -> torch.Tensor:
    """One example's row of `BatchAxis.split` -> its tensor in the op's own layout (batch of one)."""
    return x.flatten(axis.dim, axis.dim + 1)


@set_fallback
def per_example_vjp(call: OpCall) -> dict[str, PerExampleGrad]:
    """G_i = vjp_W(op)(example i's operands; example i's output gradient), vmapped over i.

    A custom op that torch.func cannot transform (a torch.library op whose autograd is registered
    with `register_autograd` fails under vmap/vjp: pytorch#168393) gets the same vjps from
    torch.autograd, one example at a time: exact, but B small calls instead of one batched one."""
    names = call.param_names
    batched = {n: ax for n, ax in call.axes.items() if ax is not None and n not in names}
    op = call.node.target

    def op_of_params(xs: dict, params):
        fixed = dict(call.arguments)
        fixed.update({n: _one_example_layout(x, batched[n]) for n, x in xs.items()})
        out = op(**{**fixed, **dict(zip(names, params))})
        return out[0] if isinstance(out, (tuple, list)) else out

    def one_example(xs: dict, g: torch.Tensor):
        _, vjp_fn = torch.func.vjp(lambda *params: op_of_params(xs, params), *(call[n] for n in names))
        return vjp_fn(_one_example_layout(g, call.output_axis))

    xs = {n: call.examples(n) for n in batched}
    try:
        grads = torch.func.vmap(one_example)(xs, call.grad_examples())
    except (RuntimeError, NotImplementedError):
        if op.namespace == "aten":
            raise
        grads = _example_by_example(call, op_of_params, xs)
    return {n: PerExampleGrad(gr) for n, gr in zip(names, grads)}


def _example_by_example(call: OpCall, op_of_params, xs: dict) -> list[torch.Tensor]:
    """The fallback's vjps by torch.autograd in a loop over examples; [B, *param shape] each."""
    params = [call[n].detach().requires_grad_() for n in call.param_names]
    grads_out = call.grad_examples()
    per_example = []
    try:
        with torch.enable_grad():
            for i in range(call.batch_size):
                out = op_of_params({n: x[i] for n, x in xs.items()}, params)
                g = _one_example_layout(grads_out[i], call.output_axis)
                per_example.append(torch.autograd.grad(out, params, g, allow_unused=True))
    except RuntimeError as e:
        from ..provenance import where

        raise FxclipError(
            f"{where(call.node)}: no fxclip rule covers the custom op {call.node.target}, and the "
            f"per-example fallback cannot differentiate it ({str(e).splitlines()[0]}). Register a rule "
            f"with fxclip.register_rule({call.node.target}, {call.param_names[0]}=...) (see "
            "docs/custom_rules.md), or give the op an autograd formula with torch.library.register_autograd."
        ) from e
    return [
        torch.stack([torch.zeros_like(p) if g[j] is None else g[j] for g in per_example])
        for j, p in enumerate(params)
    ]
