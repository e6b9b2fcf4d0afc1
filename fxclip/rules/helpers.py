"""What rules are made of, built-in and user rules alike: two rule families, each registered in one
line per op (`bilinear_rule`, as JAX's `defbilinear`, and `broadcast_rule`), and the tensor helpers
their forms need (`positions`, `bias_form`, `per_example_sum_to`)."""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import torch

from ..batch import BatchAxis
from ..errors import FxclipError
from ..forms import Factor, LinearForm, PerExampleGrad, accumulation_dtype
from .registry import ExtraCheck, OpCall, OpNode, OperandRule, Rule, add_rule, call_site


def positions(x: torch.Tensor) -> torch.Tensor:
    """[B, <entries>..., k] -> [B, 1, T, k]: every non-feature entry of an example is a position."""
    return x.flatten(1, -2).unsqueeze(1)


def bias_form(g: torch.Tensor, shape: torch.Size) -> PerExampleGrad:
    """A bias added at every position, g the output gradient as [B, G, T, p]: G_i = Σ_t g_it (a
    sum over several positions in at least float32; one position is g itself), built. It is as
    small as g at one position, and the linear form it also is (L = g, R = a column of ones)
    costs more either way: T² per example in Gram products, and ops for the ones that a sum does
    not need (a third of an MLP's norm and clipped-sum ops went to its biases' ones)."""
    summed = g.sum(2, dtype=accumulation_dtype(g.dtype)) if g.shape[2] != 1 else g
    return PerExampleGrad(summed.reshape(g.shape[0], *shape))


def per_example_sum_to(h: torch.Tensor, axis: BatchAxis, batch_size: int, shape) -> torch.Tensor:
    """For each example, sum `h` (laid out like an op output, batch axis `axis`) down to the
    broadcast operand `shape`, right-aligned as in broadcasting. Returns [B, *shape], summed in at
    least float32."""
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


def one(call: OpCall) -> int:
    """∂z/∂V = 1, for `broadcast_rule`: V is added, its gradient is g itself."""
    return 1


class Rows(NamedTuple):
    """A bilinear op's parameter V, seen per example, group and position t: the vector x_t that V
    multiplies and the output gradient g_t there, each a factor [B, G, T, ·] (one block of V per
    group), with the op's faster kernels for the same per-example gradients or clipped sum, if
    any (`LinearForm.materializer`, `.contraction`), and whether that sum is sparse."""

    x: Factor
    g: Factor
    materializer: Optional[Callable[[], torch.Tensor]] = None
    contraction: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    sparse: bool = False


def _names(names: str | Sequence[str]) -> tuple[str, ...]:
    return (names,) if isinstance(names, str) else tuple(names)


def _real_values(node: OpNode) -> bool:
    return not node.has_complex_values()


def _real_values_and(extra_check: Optional[ExtraCheck]) -> ExtraCheck:
    """`extra_check` (first: it may refuse the call outright, see `find_rule`), then real values."""
    if extra_check is None:
        return _real_values
    return lambda node: extra_check(node) and _real_values(node)


def bilinear_rule(
    ops, name: str, rows: Callable[[OpCall, str], Rows], *, left: str | Sequence[str] = (),
    right: str | Sequence[str] = (), extra_check: Optional[ExtraCheck] = None, **operands: OperandRule,
) -> Rule:
    """Register the rule of ops bilinear in an activation and a parameter V (linear layers, matrix
    products, convolutions, embeddings), given `rows(call, operand) -> Rows` for V = that operand:

    - V in `right` multiplies from the right, z_t = x_tᵀ V: G_V = Σ_t x_t g_tᵀ, LinearForm(L = x, R = g);
    - V in `left` multiplies from the left, z_t = V x_t: G_V = Σ_t g_t x_tᵀ, LinearForm(L = g, R = x).

    `operands`: rules for the op's other operands (a bias). The factors' identities are written for
    real values, so calls with complex ones are left to the op's next rule (the fallback)."""

    def form(operand: str, side: str) -> OperandRule:
        def operand_form(call: OpCall) -> LinearForm:
            r = rows(call, operand)
            factors = (r.x, r.g) if side == "right" else (r.g, r.x)
            return LinearForm(*factors, call[operand].shape, r.materializer, r.contraction, sparse=r.sparse)

        return operand_form

    forms = {**{v: form(v, "left") for v in _names(left)}, **{v: form(v, "right") for v in _names(right)}}
    return add_rule(ops, Rule({**forms, **operands}, _real_values_and(extra_check), name, call_site()))


def broadcast_rule(
    ops, name: str, *, aligned: Optional[Callable[[OpCall], tuple]] = None,
    extra_check: Optional[ExtraCheck] = None, **derivatives: Callable[[OpCall], torch.Tensor | float],
) -> Rule:
    """Register the rule of ops a parameter V enters elementwise, broadcast over positions (a scale,
    a bias, a positional table, a normalization's affine parameters): example i's gradient is
    G_V = Σ over the positions V was broadcast across within example i of g ⊙ conj(∂z/∂V), a
    PerExampleGrad (its real part for a real V, autograd's convention).

    `derivatives`: operand -> fn(call) -> ∂z/∂V (a tensor, or a number; `one` reads g itself).
    `aligned(call)`: the shape V broadcasts as against z, when not V's own (a per-channel weight
    of a [N, C, *spatial] output is (C, 1, ..., 1))."""

    def gradient(operand: str, derivative) -> OperandRule:
        def per_example(call: OpCall) -> PerExampleGrad:
            d = derivative(call)
            if isinstance(d, torch.Tensor):
                h = call.grad * d.conj()
            else:
                h = call.grad if d == 1 else call.grad * d.conjugate()
            if h.is_complex() and not call[operand].is_complex():
                h = h.real
            shape = call[operand].shape if aligned is None else aligned(call)
            grads = per_example_sum_to(h, call.output_axis, call.batch_size, shape)
            return PerExampleGrad(grads.reshape(call.batch_size, *call[operand].shape))

        return per_example

    rule = Rule({v: gradient(v, d) for v, d in derivatives.items()}, extra_check, name, call_site())
    return add_rule(ops, rule)
