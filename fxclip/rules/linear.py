"""Dense layers: linear, and matrix products with a parameter operand."""

from __future__ import annotations

import torch

from ..batch import BatchAxis
from ..forms import Dense, PerExampleGrad
from .helpers import Rows, bias_form, bilinear_rule, per_example_sum_to, positions
from .registry import OpCall

aten = torch.ops.aten


def _moved_axis(axis: BatchAxis, ndim: int) -> BatchAxis:
    """The batch axis after swapping the last two dims of an `ndim`-dim tensor."""
    swap = {ndim - 1: ndim - 2, ndim - 2: ndim - 1}
    return BatchAxis(swap.get(axis.dim, axis.dim), axis.inner)


def _columns(x: torch.Tensor, axis: BatchAxis, batch_size: int) -> torch.Tensor:
    """The columns of `x` (a matrix or a stack of them) as rows, example-major."""
    return _moved_axis(axis, x.dim()).split(x.transpose(-1, -2), batch_size)


def _product(lhs: str, rhs: str, grouped: bool = False, scale: str | None = None):
    """`Rows` of a matrix product z = lhs @ rhs (scaled by the argument `scale`) for a parameter in
    either operand: for rhs, the rows of lhs and of g (z's rows are lhs's rows times rhs); for lhs,
    the columns of rhs and of g (z's columns are lhs times rhs's columns). A vector parameter is a
    matrix of one column (rhs) or one row (lhs), g a matrix of one column. With `grouped`, the
    matrix-batch dim of a bmm (first in each example's rows, as the batch lies in a later dim) is
    the group dim: each matrix is a block of its own."""

    def per_group(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2, -2) if grouped else positions(x)

    def rows(call: OpCall, param: str) -> Rows:
        if param == rhs:
            x = call.examples(lhs)
        else:
            x = _columns(call[rhs], call.axes[rhs], call.batch_size)
        if call[param].dim() == 1:
            g = call.grad_examples().unsqueeze(-1)
        elif param == rhs:
            g = call.grad_examples()
        else:
            g = _columns(call.grad, call.output_axis, call.batch_size)
        if scale is not None:
            x = x * call[scale]
        return Rows(Dense(per_group(x)), Dense(per_group(g)))

    return rows


def _linear_bias(call: OpCall):
    return bias_form(positions(call.grad_examples()), call["bias"].shape)


def _addmm_bias(call: OpCall) -> PerExampleGrad:
    """z = β·bias + α·(x @ V): example i's bias gradient is β·Σ_t g_t."""
    h = call.grad * call["beta"]
    return PerExampleGrad(per_example_sum_to(h, call.output_axis, call.batch_size, call["self"].shape))


def _matrix_or_vector_param(node) -> bool:
    """matmul: the rule covers a 1-D or 2-D parameter operand (the one without a batch axis) times
    an activation of at least 2 dims; a stack of matrices (3-D or more) broadcast against the
    activation is left to the fallback."""
    for param, x in (("self", "other"), ("other", "self")):
        if node.batch_axis(param) is None and node.batch_axis(x) is not None:
            return node[param].dim() <= 2 and node[x].dim() >= 2
    return False


def _batch_outside_matrix_batch(node) -> bool:
    """bmm: the activation's batch lies in its rows or columns, not in the matrix-batch dim (the
    parameter's leading dim), so each of the parameter's matrices is a block of its own."""
    return all(node.batch_axis(name) is None or node.batch_axis(name).dim != 0 for name in ("self", "mat2"))


# y = x Wᵀ + b over any leading dims: W multiplies each position's x from the left; b is a bias.
linear = bilinear_rule(aten.linear.default, "linear", _product("input", "weight"), left="weight", bias=_linear_bias)
# z = x @ V or V @ x, V a matrix or a vector (attention pooling's scores x @ v)
mm = bilinear_rule(aten.mm.default, "matmul", _product("self", "mat2"), left="self", right="mat2")
matmul = bilinear_rule(
    aten.matmul.default, "matmul", _product("self", "other"), left="self", right="other", extra_check=_matrix_or_vector_param
)
# z[j] = x[j] @ V[j] (or V[j] @ x[j]), V [b, ·, ·]: each of V's b matrices is a group
bmm = bilinear_rule(
    aten.bmm.default, "bmm", _product("self", "mat2", grouped=True), left="self", right="mat2",
    extra_check=_batch_outside_matrix_batch,
)
# z = β·bias + α·(x @ V)
addmm = bilinear_rule(aten.addmm.default, "addmm", _product("mat1", "mat2", scale="alpha"), right="mat2", self=_addmm_bias)
