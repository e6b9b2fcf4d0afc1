"""Embeddings and row gathers: a parameter indexed by integer tokens."""

from __future__ import annotations

import torch
from torch.fx import Node

from ..errors import NotCovered
from ..forms import Dense, OneHot
from ..provenance import where
from ..schema import argument_nodes
from .helpers import Rows, bilinear_rule
from .registry import OpCall

aten = torch.ops.aten


def _not_padding(index: torch.Tensor, padding_idx: int | None, dtype: torch.dtype) -> torch.Tensor:
    """1 where `index` is a token, 0 where it is `padding_idx` (none when None or negative)."""
    if padding_idx is None or padding_idx < 0:
        return torch.ones_like(index, dtype=dtype)
    return (index != padding_idx).to(dtype)


def _token_rows(index_name: str, padding: str | None = None, sparse: str | None = None):
    """`Rows` of rows of W [V, ...] gathered by tokens, z_t = e_{x_t}ᵀ W: x = one-hot(tokens)
    (0 at the token `padding` names, when one does), g = the output gradient, a row of W being
    W[0].numel() entries (1 for a vector W). `sparse` names the argument that asks for a sparse
    clipped sum (nn.Embedding(sparse=True))."""

    def rows(call: OpCall, weight: str) -> Rows:
        index = call.examples(index_name).flatten(1).unsqueeze(1)  # [B, 1, T]
        g = call.grad_examples().reshape(index.shape[0], 1, index.shape[-1], -1)  # [B, 1, T, d]
        padding_idx = call[padding] if padding else None
        one_hot = OneHot(index, call[weight].shape[0], _not_padding(index, padding_idx, g.dtype))
        return Rows(one_hot, Dense(g), sparse=bool(sparse and call[sparse]))

    return rows


def _dim0(node) -> bool:
    return node["dim"] == 0


def _single_row_index(node) -> bool:
    """W[x] with one integer index tensor, W of any rank >= 1."""
    indices = node["indices"]
    if len(indices) != 1 or indices[0] is None:
        return False
    integer = not indices[0].dtype.is_floating_point and indices[0].dtype != torch.bool
    return integer and node["self"].dim() >= 1


# F.embedding(x, W, padding_idx, sparse=...), W.index_select(0, x), and W[x] (a per-user bias
# b[user], a table of rows or of matrices): the rows of W that the tokens pick
embedding = bilinear_rule(aten.embedding.default, "embedding", _token_rows("indices", "padding_idx", "sparse"), right="weight")
index_select = bilinear_rule(aten.index_select.default, "index_select", _token_rows("index"), right="self", extra_check=_dim0)
index_rows = bilinear_rule(aten.index.Tensor, "index_rows", _token_rows("indices.0"), right="self", extra_check=_single_row_index)


def _consecutive_bags(node) -> bool:
    """embedding_bag: the bags are T consecutive indices (offsets = arange(0, numel, T), what
    F.embedding_bag makes of a 2-D input), so no bag crosses from one example into the next.
    Other layouts no per-op rule can take (the fallback's single example would read every bag's
    offsets): NotCovered, for the whole-model fallback."""
    offsets = node.arguments["offsets"]
    consecutive = (
        isinstance(offsets, Node)
        and offsets.target is aten.arange.start_step
        and offsets.args[0] == 0
        and isinstance(offsets.args[2], int)
    )
    if not consecutive or node["include_last_offset"]:
        raise NotCovered(
            f"{where(node.node)}: fxclip computes per-example gradients of embedding_bag on 2-D "
            "input (one row of tokens per bag, without offsets); this call has offsets other than "
            "arange(0, numel, T). Use a [batch, tokens] input, or register a rule for aten.embedding_bag."
        )
    return True


def _bag_length(call: OpCall) -> int:
    """T, the bags' length (`_consecutive_bags` checked they are arange(0, numel, T))."""
    return argument_nodes(call.node)["offsets"].args[2]


def _max_bag_rows(call: OpCall) -> Rows:
    """Mode max: output entry (bag b, column d) is W[m_bd, d], m_bd the row that attains the max
    (torch's max_indices output), and nothing for a bag of padding only (bag_size 0), so
    G_i = Σ_(bags b of i) Σ_d g_bd e_(m_bd) e_dᵀ: one position per (bag, column), with
    x = one-hot(m) scaled by g and "g" = one-hot(d)."""
    weight = call["weight"]
    _, _, bag_size, max_indices = call.output
    columns = max_indices.shape[-1]
    nonempty = call.output_axis.split((bag_size > 0).unsqueeze(-1).expand_as(max_indices), call.batch_size)
    # an empty bag's max index is no row (-1 on a GPU): row 0 with a gradient of 0 instead
    rows = call.output_axis.split(max_indices, call.batch_size).where(nonempty, 0).flatten(1).unsqueeze(1)  # [B, 1, bags·d]
    g = call.grad_examples() * nonempty
    column = torch.arange(rows.shape[-1], device=rows.device).remainder(columns).expand_as(rows)
    return Rows(
        OneHot(rows, weight.shape[0], g.flatten(1).unsqueeze(1)),
        OneHot(column, columns, torch.ones_like(g.flatten(1).unsqueeze(1))),
    )


def _bag_rows(call: OpCall, weight: str) -> Rows:
    """F.embedding_bag, bags of T consecutive tokens. Sum or mean: bag b's output is
    Σ_t a_bt W[x_bt], a = per_sample_weights (else 1), 0 at padding, divided in mean mode by the
    bag's count of other tokens, so G_i = Σ_(bags b of i) Σ_t a_bt e_(x_bt) g_bᵀ: x = one-hot(x)
    scaled by a, g = each bag's output gradient repeated over its T tokens. Max: `_max_bag_rows`."""
    if call["mode"] == 2:
        return _max_bag_rows(call)
    bag_length = _bag_length(call)
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
    one_hot = OneHot(index.unsqueeze(1), call[weight].shape[0], scale.unsqueeze(1))
    return Rows(one_hot, Dense(g), sparse=call["sparse"])


embedding_bag = bilinear_rule(
    [aten.embedding_bag.default, aten.embedding_bag.padding_idx], "embedding_bag", _bag_rows, right="weight",
    extra_check=_consecutive_bags,
)
