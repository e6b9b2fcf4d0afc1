"""Embeddings and row gathers: a parameter indexed by integer tokens."""

from __future__ import annotations

import torch
from torch.fx import Node

from ..errors import NotCovered
from ..forms import Dense, LinearForm, OneHot
from ..provenance import where
from ..schema import argument_nodes
from .registry import OpCall, register_rule

aten = torch.ops.aten


def _not_padding(index: torch.Tensor, padding_idx: int | None, dtype: torch.dtype) -> torch.Tensor:
    """1 where `index` is a token, 0 where it is `padding_idx` (none when None or negative)."""
    if padding_idx is None or padding_idx < 0:
        return torch.ones_like(index, dtype=dtype)
    return (index != padding_idx).to(dtype)


def _row_gather_form(call: OpCall, index_name: str, weight_name: str, padding_idx: int = -1, sparse: bool = False) -> LinearForm:
    """Rows of W [V, ...] gathered by index: G_i = Σ_t e_{x_it} g_itᵀ, LinearForm(L = one-hot(x),
    R = g), a row being d = W[0].numel() entries (1 for a vector W). Ghost compares tokens
    ([x_it = x_is], T²) and costs T²·d for g; materialize scatters T·d into a [V, d] gradient
    per example. Positions holding `padding_idx` contribute nothing. `sparse`: the clipped sum
    is a sparse COO tensor of the gathered rows."""
    weight = call[weight_name]
    index = call.examples(index_name).flatten(1).unsqueeze(1)  # [B, 1, T]
    g = call.grad_examples().reshape(index.shape[0], 1, index.shape[-1], -1)  # [B, 1, T, d]
    one_hot = OneHot(index, weight.shape[0], _not_padding(index, padding_idx, g.dtype))
    return LinearForm(one_hot, Dense(g), weight.shape, sparse=sparse)


@register_rule(aten.embedding.default, params=("weight",))
def embedding(call: OpCall):
    """F.embedding(x, W, padding_idx, sparse=...): see `_row_gather_form`."""
    return {"weight": _row_gather_form(call, "indices", "weight", call["padding_idx"], call["sparse"])}


@register_rule(aten.index_select.default, params=("self",), extra_check=lambda n: n.args[1] == 0)
def index_select(call: OpCall):
    """W.index_select(0, x): the embedding identity without padding."""
    return {"self": _row_gather_form(call, "index", "self")}


def _single_row_index(node) -> bool:
    indices = node.args[1]
    if len(indices) != 1 or indices[0] is None:
        return False
    integer = not indices[0].meta["val"].dtype.is_floating_point and indices[0].meta["val"].dtype != torch.bool
    return integer and node.args[0].meta["val"].dim() >= 1


@register_rule(aten.index.Tensor, params=("self",), extra_check=_single_row_index)
def index_rows(call: OpCall):
    """W[x] with one integer index tensor (a per-user bias b[user], a table of rows or of
    matrices): the embedding identity without padding."""
    return {"self": _row_gather_form(call, "indices.0", "self")}


def _bag_length(call: OpCall) -> int:
    """T when the bags are T consecutive indices (offsets = arange(0, numel, T), what
    F.embedding_bag makes of a 2-D input), so no bag crosses from one example into the next."""
    offsets = argument_nodes(call.node)["offsets"]
    consecutive = (
        isinstance(offsets, Node)
        and offsets.target is aten.arange.start_step
        and offsets.args[0] == 0
        and isinstance(offsets.args[2], int)
    )
    if not consecutive or call["include_last_offset"]:
        raise NotCovered(
            f"{where(call.node)}: fxclip computes per-example gradients of embedding_bag on 2-D "
            "input (one row of tokens per bag, without offsets); this call has offsets other than "
            "arange(0, numel, T). Use a [batch, tokens] input, or register a rule for aten.embedding_bag."
        )
    return offsets.args[2]


def _max_bag_form(call: OpCall) -> LinearForm:
    """Mode max: output entry (bag b, column d) is W[m_bd, d], m_bd the row that attains the max
    (torch's max_indices output), and nothing for a bag of padding only (bag_size 0), so
    G_i = Σ_(bags b of i) Σ_d g_bd e_(m_bd) e_dᵀ: one position per (bag, column),
    LinearForm(L = one-hot(m) scaled by g, R = one-hot(d)). Ghost compares T = bags·d positions
    (T² per example); materialize scatters them into a [V, d] gradient."""
    weight = call["weight"]
    _, _, bag_size, max_indices = call.output
    columns = max_indices.shape[-1]
    nonempty = call.output_axis.split((bag_size > 0).unsqueeze(-1).expand_as(max_indices), call.batch_size)
    # an empty bag's max index is no row (-1 on a GPU): row 0 with a gradient of 0 instead
    rows = call.output_axis.split(max_indices, call.batch_size).where(nonempty, 0).flatten(1).unsqueeze(1)  # [B, 1, bags·d]
    g = call.grad_examples() * nonempty
    column = torch.arange(rows.shape[-1], device=rows.device).remainder(columns).expand_as(rows)
    return LinearForm(
        OneHot(rows, weight.shape[0], g.flatten(1).unsqueeze(1)),
        OneHot(column, columns, torch.ones_like(g.flatten(1).unsqueeze(1))),
        weight.shape,
    )


@register_rule([aten.embedding_bag.default, aten.embedding_bag.padding_idx], params=("weight",))
def embedding_bag(call: OpCall):
    """F.embedding_bag, sum or mean, bags of T consecutive tokens: bag b's output is
    Σ_t a_bt W[x_bt], a = per_sample_weights (else 1), 0 at padding, divided in mean mode by the
    bag's count of other tokens. G_i = Σ_(bags b of i) Σ_t a_bt e_(x_bt) g_bᵀ: `_row_gather_form`'s
    identity with weights a and each bag's output gradient repeated over its T tokens (cost as
    for an embedding of T tokens per bag). Mode max: see `_max_bag_form`. Other layouts are
    NotCovered (the whole-model fallback takes them)."""
    weight = call["weight"]
    bag_length = _bag_length(call)
    if call["mode"] == 2:
        return {"weight": _max_bag_form(call)}
    index = call.examples("indices").flatten(1)  # [B, bags·T]
    g = call.grad_examples().flatten(1, -2)  # [B, bags, d]
    bags = g.shape[1]
    scale = _not_padding(index, call.arguments.get("padding_idx"), g.dtype)
    if call["per_sample_weights"] is not None:
        scale = scale * call.examples("per_sample_weights").flatten(1).to(g.dtype)
    if call["mode"] == 1:
        per_bag = scale.view(-1, bags, bag_length)
        scale = (per_bag / per_bag.sum(-1, keepdim=True).clamp_min(1)).flatten(1)
    g = g.unsqueeze(2).expand(-1, -1, bag_length, -1).reshape(g.shape[0], 1, bags * bag_length, g.shape[-1])
    one_hot = OneHot(index.unsqueeze(1), weight.shape[0], scale.unsqueeze(1))
    return {"weight": LinearForm(one_hot, Dense(g), weight.shape, sparse=call["sparse"])}
