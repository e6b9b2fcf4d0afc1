"""analyze: where each tensor's batch axis is, which ops would mix examples, and which
operands carry trainable parameters (followed through views, slices, casts and any other
parameter-only computation)."""

from __future__ import annotations

import math
import operator

import networkx as nx
import torch
from torch.fx import GraphModule, Node

from ..batch import BatchAxis
from ..errors import ExampleMixingError, FxclipError, NotCovered
from ..provenance import where
from ..schema import argument_nodes
from .context import Context, ParamUse

aten = torch.ops.aten

# Ops that only reinterpret the row-major order of their input: the batch keeps its flat position.
RESHAPES = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
    aten.unflatten.int, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
    aten.unsqueeze.default, aten.contiguous.default, aten.clone.default, aten.alias.default,
}
# Ops that only reorder dims.
PERMUTES = {aten.permute.default, aten.transpose.int, aten.t.default, aten.movedim.int, aten.swapaxes.default}

# Parameter chains: ops that return the parameter unchanged (up to aliasing or dtype) ...
IDENTITY_OPS = {
    aten.alias.default, aten.clone.default, aten.contiguous.default,
    aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.lift_fresh_copy.default,
    aten.type_as.default,
}
CAST_OPS = {aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.type_as.default}
# ... and ops that copy a subset of its entries (the norm of a gradient is then unchanged, unless
# an index repeats an entry: emit checks each gather chain's footprint for that).
GATHER_OPS = IDENTITY_OPS | RESHAPES | PERMUTES | {
    aten.select.int, aten.slice.Tensor, aten.narrow.default, aten.split.Tensor, aten.chunk.default,
    aten.split_with_sizes.default, aten.unbind.int, aten.index_select.default, aten.embedding.default,
    aten.index.Tensor, aten.diagonal.default, operator.getitem,
}

# Ops that work along one dim: along the batch axis they mix examples.
ALONG_DIM = {
    aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default,
    aten.cumsum.default, aten.cumprod.default, aten.logcumsumexp.default, aten.sort.default,
    aten.argsort.default, aten.cummax.default, aten.cummin.default,
}

# Ops that address a tensor's entries through the whole tensor (flattened positions, rows of an
# embedding table, a mask whose order fills the output): a batched operand mixes unless its index is
# each example's own position.
ADDRESS_WHOLE_TENSOR = {
    aten.take.default, aten.put.default, aten.masked_scatter.default, aten.embedding.default,
    aten.embedding_bag.default, aten.embedding_bag.padding_idx, aten._embedding_bag.default,
}
ARANGES = {aten.arange.default, aten.arange.start, aten.arange.start_step}
# Ops that keep every entry's value and the batch dim's order: a view of torch.arange over the batch
# still holds each example's own position.
POSITION_PRESERVING = RESHAPES | IDENTITY_OPS | {aten.expand.default, aten.slice.Tensor}


class _BatchLocator:
    """Finds `BatchAxis` of every node from the symbolic batch size in torch.export's shapes."""

    def __init__(self, symbol):
        self.symbol = symbol

    def has_batch(self, size) -> bool:
        return isinstance(size, torch.SymInt) and self.symbol in size.node.expr.free_symbols

    def is_batch(self, size) -> bool:
        return isinstance(size, torch.SymInt) and size.node.expr == self.symbol

    def locate(self, node: Node, val, in_axes: list[tuple[torch.Tensor, BatchAxis]]):
        if isinstance(val, (tuple, list)):
            # an output nothing reads may lack the batch (nll_loss_forward's total weight)
            used = {u.args[1] for u in node.users if u.target is operator.getitem and u.users}
            return tuple(self.locate(node, v, in_axes) if i in used else None for i, v in enumerate(val))
        if not isinstance(val, torch.Tensor):
            return None
        dims = [d for d, s in enumerate(val.shape) if self.has_batch(s)]
        if not dims:
            if in_axes:
                raise ExampleMixingError(
                    f"{where(node)} drops the batch axis (its output has none: a reduction, slice or "
                    "index along the batch), so examples mix. Keep each op within an example; loss_fn "
                    "must return one loss per example."
                )
            return None
        if len(dims) > 1:
            raise ExampleMixingError(
                f"{where(node)} produces a tensor with the batch in several dims {tuple(val.shape)}: "
                "examples interact (e.g. a product of the batch with itself)."
            )
        d = dims[0]
        if self.is_batch(val.shape[d]):
            return BatchAxis(d, 1)
        if not in_axes:
            # made from sizes alone (zeros, ones, full): every example's entries are the same
            # whatever the layout, so take the batch as outermost (B·inner, as B·heads is laid out)
            inner = val.shape[d].node.expr / self.symbol
            if inner.is_Integer:
                return BatchAxis(d, int(inner))
        if in_axes and node.target in RESHAPES:
            x, ax = in_axes[0]
            flat_inner = ax.inner * math.prod(int(s) for s in x.shape[ax.dim + 1 :])
            trailing = math.prod(int(s) for s in val.shape[d + 1 :])
            if flat_inner % trailing == 0:
                return BatchAxis(d, flat_inner // trailing)
        if in_axes and node.target in PERMUTES:
            return BatchAxis(d, in_axes[0][1].inner)
        for x, ax in in_axes:
            if x.shape[ax.dim] == val.shape[d]:
                return BatchAxis(d, ax.inner)
        raise NotCovered(
            f"cannot tell where the batch is in the output {tuple(val.shape)} of {where(node)} (the "
            "batch concatenated with itself?); keep the batch a separate dim to stay on the graph path"
        )


def _tensor_inputs(node: Node) -> list[Node]:
    return [n for n in node.all_input_nodes if isinstance(n.meta.get("val"), torch.Tensor)]


def _check_mixing(node: Node, in_axis, own_positions: set[Node]) -> None:
    """Ops whose output keeps its batch axis but still mixes examples."""
    target = node.target
    args = argument_nodes(node) if isinstance(target, torch._ops.OpOverload) else {}
    if target is aten.batch_norm.default and args.get("training"):
        raise ExampleMixingError(
            f"{where(node)}: batch normalization with batch statistics mixes examples. Replace it "
            "with nn.GroupNorm or nn.LayerNorm, or put the module in eval() mode."
        )
    if target in (aten.embedding.default, aten.embedding_bag.default, aten.embedding_bag.padding_idx) and args.get("scale_grad_by_freq"):
        raise ExampleMixingError(
            f"{where(node)}: scale_grad_by_freq=True scales gradients by token counts over the whole "
            "batch, which couples examples. Create the embedding with scale_grad_by_freq=False."
        )
    _check_indexing(node, args, own_positions)
    if in_axis is None:
        return
    ndim = node.args[0].meta["val"].dim()
    reduced: list[int] = []
    if target in ALONG_DIM:
        reduced = [args["dim"] % ndim]
    elif target in (aten.layer_norm.default, aten.rms_norm.default):
        reduced = list(range(ndim - len(args["normalized_shape"]), ndim))
    elif target in (aten.group_norm.default, aten.instance_norm.default):
        reduced = list(range(1, ndim))
    elif target in (aten.flip.default, aten.roll.default):
        # entries move along these dims (a roll without dims moves them through the flattened tensor)
        reduced = [d % ndim for d in args["dims"]] or list(range(ndim))
    if in_axis.dim in reduced:
        raise ExampleMixingError(
            f"{where(node)} works along dim {in_axis.dim}, which holds the batch (it normalizes, "
            "accumulates or moves entries along it): examples mix. Check batch_dims, or apply the op "
            "along another dim."
        )


def _check_indexing(node: Node, args: dict, own_positions: set[Node]) -> None:
    """An op that reads or writes a batched tensor at positions an index tensor gives (gather,
    index_select, x[idx], index_put, scatter, index_add, take, an embedding of batched rows) mixes
    examples unless the positions along the batch dim are each example's own: `own_positions`
    (torch.arange over that dim, and views of it). Any other index, one from the inputs or targets
    (h[partner]) or computed, can point at another example, and what it holds is only known at run
    time; so it is refused, not trusted (a check on one example alone cannot even run: the index
    is out of range there)."""
    source = args.get("self", args.get("weight"))
    axis = source.meta.get("fxclip_batch_axis") if isinstance(source, Node) else None
    if not isinstance(axis, BatchAxis):
        return
    if isinstance(args.get("indices"), (list, tuple)):  # one index per dim: x[i, j], index_put
        indices = args["indices"]
        index = indices[axis.dim] if axis.dim < len(indices) else None
    elif isinstance(args.get("index"), Node) and "dim" in args:  # along one dim: gather, scatter
        index = args["index"] if args["dim"] % source.meta["val"].dim() == axis.dim else None
    elif node.target in ADDRESS_WHOLE_TENSOR:  # positions in the flattened tensor, or rows of it
        index = args.get("index", args.get("indices", args.get("mask")))
    else:
        return
    if not isinstance(index, Node) or _is_own_position(index, source.meta["val"].shape[axis.dim], own_positions):
        return
    if index.op == "placeholder":
        given = f"the step's input '{index.name}'"
    else:
        roots = sorted(p.name for p in _placeholders_above(index) if p is not source)
        given = f"'{index.name}'" + (f", computed from the step's inputs {', '.join(roots)}" if roots else "")
    raise ExampleMixingError(
        f"{where(node)} reads or writes along dim {axis.dim}, which holds the batch, at positions "
        f"given by {given}: such an index can point at another example (h[partner], "
        "o - o[partner] in a loss), and what it holds is only known at run time, so examples may "
        "mix and the clipping bound would not hold. Index the batch dim only with "
        "torch.arange(batch_size) (x[torch.arange(B), y] picks within each example), or compute "
        "pairwise terms outside the private step."
    )


def _is_own_position(index: Node, size, own_positions: set[Node]) -> bool:
    """`index` holds each example's own position along a batch dim of `size` entries."""
    val = index.meta.get("val")
    axis = index.meta.get("fxclip_batch_axis")
    if index not in own_positions or not isinstance(axis, BatchAxis):
        return False
    length = val.shape[axis.dim]
    return isinstance(length, torch.SymInt) and isinstance(size, torch.SymInt) and length.node.expr == size.node.expr


def _is_arange_of_positions(node: Node, own_positions: set[Node]) -> bool:
    """torch.arange(0, n, 1) over a batch-sized n, or a view, expand or cast of such a tensor."""
    if node.target in ARANGES or node.target is aten.slice.Tensor:
        args = argument_nodes(node)
        if args.get("start") not in (None, 0) or args.get("step", 1) != 1:
            return False
        if node.target in ARANGES:
            return True
    return node.target in POSITION_PRESERVING and bool(node.args) and node.args[0] in own_positions


def _placeholders_above(node: Node) -> set[Node]:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return {n for n in seen if n.op == "placeholder"}


def _chain_kind(chain: list[Node], params: tuple) -> str:
    if len(params) != 1:
        return "general"
    targets = [n.target for n in chain]
    if all(t in IDENTITY_OPS for t in targets):
        return "identity"
    transposes = [n for n in chain if n.target not in IDENTITY_OPS]
    if len(transposes) == 1 and transposes[0].target in PERMUTES and transposes[0].meta["val"].dim() == 2:
        return "transpose"
    if all(t in GATHER_OPS for t in targets):
        return "gather"
    return "general"


def analyze(gm: GraphModule, ctx: Context) -> GraphModule:
    """Guarantees: every node has meta["fxclip_batch_axis"] (a BatchAxis, None for batch-free
    values, a tuple for multi-output ops); no op mixes examples (else ExampleMixingError naming the
    module); `ctx.uses` lists every (op, operand) where trainable parameters meet the batch, and
    every trainable parameter that reaches the loss (through ops gradients flow through: not a
    detach, so not a torch.no_grad region either) appears in some use; no use's output is cut off
    from the loss."""
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    params = dict(ctx.model.named_parameters())
    inputs = [n for n, (kind, _) in zip(placeholders, ctx.placeholders) if kind == "input"]
    input_vals = [n.meta["val"] for n in inputs]
    locator = _BatchLocator(input_vals[0].shape[ctx.batch_dims[0]].node.expr)  # the first model input's batch
    trainable: dict[str, Node] = {}
    for node, (kind, key) in zip(placeholders, ctx.placeholders):
        if kind == "param" and params[key].requires_grad:
            trainable[key] = node
    ctx.trainable = trainable

    derived: set[Node] = set(trainable.values())  # values computed from parameters only
    own_positions: set[Node] = set()  # torch.arange over a batch dim: each example's own index
    for node in graph.nodes:
        if node.op == "placeholder":
            node.meta["fxclip_batch_axis"] = locator.locate(node, node.meta.get("val"), []) if node in inputs else None
            continue
        if node.op != "call_function":
            continue
        tensor_inputs = _tensor_inputs(node)
        if node.target is operator.getitem:
            parent_axes = node.args[0].meta.get("fxclip_batch_axis")
            axis = parent_axes[node.args[1]] if isinstance(parent_axes, tuple) else parent_axes
        else:
            in_axes = [
                (n.meta["val"], n.meta["fxclip_batch_axis"])
                for n in tensor_inputs
                if isinstance(n.meta.get("fxclip_batch_axis"), BatchAxis)
            ]
            axis = locator.locate(node, node.meta.get("val"), in_axes)
            if isinstance(axis, tuple) and all(a is None for a in axis):
                axis = None  # a multi-output op on batch-free values (a split of a parameter)
            first = node.args[0] if node.args and isinstance(node.args[0], Node) else None
            first_axis = first.meta.get("fxclip_batch_axis") if first is not None else None
            _check_mixing(node, first_axis if isinstance(first_axis, BatchAxis) else None, own_positions)
        node.meta["fxclip_batch_axis"] = axis
        if isinstance(axis, BatchAxis) and _is_arange_of_positions(node, own_positions):
            own_positions.add(node)
        if axis is None and node.target is not aten.detach.default and any(n in derived for n in node.all_input_nodes):
            derived.add(node)

    # gradients flow along these edges: none into a detach (a detached parameter is a constant)
    dependency = nx.DiGraph()
    dependency.add_edges_from((i, n) for n in graph.nodes for i in n.all_input_nodes if n.target is not aten.detach.default)
    output = next(n for n in graph.nodes if n.op == "output")
    reaches_loss = nx.ancestors(dependency, output) if output in dependency else set()
    ctx.uses = []
    for node in graph.nodes:
        if node.op != "call_function" or node in derived or node.meta.get("fxclip_batch_axis") is None:
            continue
        if node not in reaches_loss:  # its output gets no gradient (detached, or unused)
            continue
        if node.target is operator.getitem:  # picks one output of a batched op: not a use
            continue
        for name, value in _operands(node):
            if value not in derived:
                continue
            ancestors = nx.ancestors(dependency, value) if value in dependency else set()
            chain = [n for n in graph.nodes if (n in ancestors or n is value) and n in derived and n.op != "placeholder"]
            used = tuple(k for k, p in trainable.items() if p in ancestors or p is value)
            ctx.uses.append(ParamUse(node, name, value, used, chain, _chain_kind(chain, used)))
    _check_every_parameter_used(ctx, reaches_loss)
    return gm


def _operands(node: Node):
    """(schema name, node) for each node operand; "name.j" for element j of a list operand."""
    if not isinstance(node.target, torch._ops.OpOverload):
        raise NotCovered(f"{where(node)}: fxclip handles aten ops; got {node.target}")
    for name, value in argument_nodes(node).items():
        if isinstance(value, Node):
            yield name, value
        elif isinstance(value, (list, tuple)):
            for j, v in enumerate(value):
                if isinstance(v, Node):
                    yield f"{name}.{j}", v


def _check_every_parameter_used(ctx: Context, reaches_loss: set[Node]) -> None:
    """Every trainable parameter the loss depends on must have a norm term (the paper's ResNet
    code silently left the downsample convs out; the privacy bound then fails), and the loss must
    depend on some trainable parameter."""
    if ctx.trainable and not any(node in reaches_loss for node in ctx.trainable.values()):
        # what loss.backward() refuses eagerly ("does not require grad"); not a step of zeros
        raise FxclipError(
            "the loss does not depend on any trainable parameter: everything between them is "
            "detached or computed under torch.no_grad(), so there is nothing to train. Check "
            "detach()/no_grad in the model; torch.utils.checkpoint needs use_reentrant=False."
        )
    covered = {k for use in ctx.uses for k in use.params}
    for key, node in ctx.trainable.items():
        if node in reaches_loss and key not in covered:
            raise FxclipError(f"internal error: parameter {key} reaches the loss but no use was found")
