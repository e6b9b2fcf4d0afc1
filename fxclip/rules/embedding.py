"""Embeddings and row gathers: a parameter indexed by integer tokens."""

from __future__ import annotations

import torch

from ..forms import Dense, LinearForm, OneHot
from ._util import positions
from .registry import OpCall, register_rule

aten = torch.ops.aten


def _row_gather_form(call: OpCall, index_name: str, weight_name: str, padding_idx: int = -1) -> LinearForm:
    """Rows of W gathered by index: G_i = Σ_t e_{x_it} g_itᵀ, LinearForm(L = one-hot(x), R = g).
    Ghost compares tokens ([x_it = x_is], T²) and costs T²·d for g; materialize scatters T·d
    into a [V, d] gradient per example. Positions holding `padding_idx` contribute nothing."""
    weight = call[weight_name]
    index = call.examples(index_name).flatten(1).unsqueeze(1)  # [B, 1, T]
    g = positions(call.grad_examples())
    keep = (index != padding_idx) if padding_idx >= 0 else torch.ones_like(index, dtype=torch.bool)
    return LinearForm(OneHot(index, weight.shape[0], keep.to(g.dtype)), Dense(g), weight.shape)


@register_rule(aten.embedding.default, params=("weight",))
def embedding(call: OpCall):
    """F.embedding(x, W, padding_idx): see `_row_gather_form`."""
    return {"weight": _row_gather_form(call, "indices", "weight", call["padding_idx"])}


@register_rule(aten.index_select.default, params=("self",), extra_check=lambda n: n.args[1] == 0)
def index_select(call: OpCall):
    """W.index_select(0, x): the embedding identity without padding."""
    return {"self": _row_gather_form(call, "index", "self")}


def _single_row_index(node) -> bool:
    indices = node.args[1]
    if len(indices) != 1 or indices[0] is None:
        return False
    integer = not indices[0].meta["val"].dtype.is_floating_point and indices[0].meta["val"].dtype != torch.bool
    return integer and node.args[0].meta["val"].dim() == 2


@register_rule(aten.index.Tensor, params=("self",), extra_check=_single_row_index)
def index_rows(call: OpCall):
    """W[x], W 2-D, with one integer index tensor: the embedding identity without padding."""
    return {"self": _row_gather_form(call, "indices.0", "self")}
