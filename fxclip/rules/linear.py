"""Dense layers: linear, and matrix products with a parameter operand."""

from __future__ import annotations

import torch

from ..forms import Dense, LinearForm, PerExampleGrad
from ._util import bias_form, moved_axis, per_example_sum_to, positions, swap_last
from .registry import OpCall, register_rule

aten = torch.ops.aten


@register_rule(aten.linear.default, params=("weight", "bias"))
def linear(call: OpCall):
    """y = x Wᵀ + b over any leading dims (T = their product per example).

    weight: G_i = g_iᵀ x_i, LinearForm(L = g, R = x); ghost T²(d+p), materialize T·d·p.
    bias:   G_i = Σ_t g_it, LinearForm(L = g, R = 1); materialize T·p."""
    g = positions(call.grad_examples())
    forms = {}
    if "weight" in call.param_names:
        forms["weight"] = LinearForm(Dense(g), Dense(positions(call.examples("input"))), call["weight"].shape)
    if "bias" in call.param_names:
        forms["bias"] = bias_form(g, call["bias"].shape)
    return forms


def _positions_per_group(x: torch.Tensor, grouped: bool) -> torch.Tensor:
    """Example-major rows -> [B, G, T, k]; with `grouped`, the matrix-batch dim b of a bmm (first
    in each row, as the batch lies in a later dim) is the group dim G: each matrix is its own block."""
    return x.flatten(2, -2) if grouped else positions(x)


def _product_form(call: OpCall, x_name: str, param_name: str, param_on_right: bool, grouped: bool = False) -> LinearForm:
    """z = x V (V on the right): G_V = xᵀ g, LinearForm(L = x, R = g).
    z = V x (V on the left):      G_V = g xᵀ = (xᵀ gᵀ)ᵀ, the transposed form of the right case."""
    shape = call[param_name].shape
    if param_on_right:
        x, g = call.examples(x_name), call.grad_examples()
        return LinearForm(Dense(_positions_per_group(x, grouped)), Dense(_positions_per_group(g, grouped)), shape)
    x, g = call[x_name], call.grad
    xt = moved_axis(call.axes[x_name], x.dim()).split(x.transpose(-1, -2), call.batch_size)
    gt = moved_axis(call.output_axis, g.dim()).split(g.transpose(-1, -2), call.batch_size)
    form = LinearForm(Dense(_positions_per_group(xt, grouped)), Dense(_positions_per_group(gt, grouped)), swap_last(shape))
    return form.transposed()


def _vector_form(call: OpCall, x_name: str, param_name: str, param_on_right: bool) -> LinearForm:
    """z = x @ v with a vector v [D] (z_t = x_t · v; v @ x likewise with x's last two dims
    swapped): G_v = Σ_t g_t x_t, the linear identity for v as a one-row matrix, LinearForm(L = g
    as a column, R = x)."""
    x = call[x_name]
    if param_on_right:
        rows = call.examples(x_name)
    else:
        rows = moved_axis(call.axes[x_name], x.dim()).split(x.transpose(-1, -2), call.batch_size)
    g = call.grad_examples().unsqueeze(-1)
    return LinearForm(Dense(positions(g)), Dense(positions(rows)), call[param_name].shape)


def _matrix_or_vector_param(node) -> bool:
    """matmul: the rule covers a 1-D or 2-D parameter operand (the one without a batch axis) times
    an activation of at least 2 dims; a stack of matrices (3-D or more) broadcast against the
    activation is left to the fallback."""
    a, b = node.args[:2]
    for param, x in ((a, b), (b, a)):
        if param.meta["fxclip_batch_axis"] is None and x.meta["fxclip_batch_axis"] is not None:
            return param.meta["val"].dim() <= 2 and x.meta["val"].dim() >= 2
    return False


@register_rule(aten.mm.default, params=("self", "mat2"))
@register_rule(aten.matmul.default, params=("self", "other"), extra_check=_matrix_or_vector_param)
def matmul(call: OpCall):
    """z = x @ V or V @ x with a 2-D parameter V: the linear identity (see `linear`); a 1-D V
    (x @ v: attention pooling's scores) as in `_vector_form`."""
    first = "self"
    second = "mat2" if "mat2" in call.arguments else "other"
    forms = {}
    for name, x_name, on_right in ((second, first, True), (first, second, False)):
        if name in call.param_names:
            product = _vector_form if call[name].dim() == 1 else _product_form
            forms[name] = product(call, x_name, name, param_on_right=on_right)
    return forms


def _batch_outside_matrix_batch(node) -> bool:
    """bmm: the activation's batch lies in its rows or columns, not in the matrix-batch dim (the
    parameter's leading dim), so each of the parameter's matrices is a block of its own."""
    return all(a.meta["fxclip_batch_axis"] is None or a.meta["fxclip_batch_axis"].dim != 0 for a in node.args[:2])


@register_rule(aten.bmm.default, params=("self", "mat2"), extra_check=_batch_outside_matrix_batch)
def bmm(call: OpCall):
    """z[j] = x[j] @ V[j] (or V[j] @ x[j]) with a [b, ·, ·] parameter: the linear identity per
    matrix j, which is the group dim of the form (G = b). Cost as `linear`, times b."""
    forms = {}
    if "mat2" in call.param_names:
        forms["mat2"] = _product_form(call, "self", "mat2", param_on_right=True, grouped=True)
    if "self" in call.param_names:
        forms["self"] = _product_form(call, "mat2", "self", param_on_right=False, grouped=True)
    return forms


@register_rule(aten.addmm.default, params=("self", "mat2"))
def addmm(call: OpCall):
    """z = β·bias + α·(x @ V): V as in `matmul` scaled by α; the bias per example is β·Σ_t g_t."""
    forms = {}
    if "mat2" in call.param_names:
        form = _product_form(call, "mat1", "mat2", param_on_right=True)
        forms["mat2"] = LinearForm(Dense(form.left.values * call["alpha"]), form.right, form.shape)
    if "self" in call.param_names:
        h = call.grad * call["beta"]
        forms["self"] = PerExampleGrad(per_example_sum_to(h, call.output_axis, call.batch_size, call["self"].shape))
    return forms
