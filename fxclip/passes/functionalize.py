"""functionalize: in-place ops become out-of-place, so every op's output stays the value
the rules need (a ReLU(inplace=True) after a conv would otherwise overwrite the conv's output),
and a write into a view of a tensor (`out[:, t] = h` into a buffer the forward allocated) becomes
a scatter into a new value of that tensor, which every later reader reads."""

from __future__ import annotations

import operator

import torch
from torch._guards import detect_fake_mode
from torch.fx import GraphModule, Node
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.node import map_arg

from ..errors import FxclipError, NotCovered, describe
from ..provenance import where
from ..schema import argument_nodes
from .context import Context
from .inline import SOURCE_META


def _functional_variant(target):
    """aten.relu_.default -> aten.relu.default, or None when there is none."""
    packet_name = target._schema.name.split("::")[-1]
    if not packet_name.endswith("_"):
        return None
    packet = getattr(torch.ops.aten, packet_name[:-1], None)
    overload = target._overloadname
    return getattr(packet, overload, None) if packet is not None else None


def _is_view(node: Node) -> bool:
    """An op whose output aliases its first operand (detach, view, slice, transpose ...), or one
    piece of an op that returns several views (split, chunk, unbind)."""
    if node.op == "call_function" and node.target is operator.getitem:
        return _is_view(node.args[0])
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return False
    returns = node.target._schema.returns
    alias = returns[0].alias_info if len(returns) == 1 else None
    if alias is None or alias.is_write or not node.args or not isinstance(node.args[0], Node):
        return False
    if node.target not in _MAYBE_VIEWS:
        return True
    if "fxclip_aliases" not in node.meta:  # asked once per in-place op: decide once
        node.meta["fxclip_aliases"] = _aliases(node)
    return node.meta["fxclip_aliases"]


# ops that return a view of their input when they can and a copy otherwise
_MAYBE_VIEWS = {
    torch.ops.aten.reshape.default, torch.ops.aten.reshape_as.default, torch.ops.aten.contiguous.default,
    torch.ops.aten.flatten.using_ints, torch.ops.aten.to.dtype, torch.ops.aten.to.dtype_layout,
    torch.ops.aten.to.device, torch.ops.aten.to.other,
}


def _aliases(node: Node) -> bool:
    """Whether this call of a `_MAYBE_VIEWS` op returned a view: the op run on meta tensors with
    the example batch's sizes and strides (a reshape of a transposed tensor copies)."""

    def concrete(v):
        if isinstance(v, torch.SymInt):
            return v.node.hint
        if isinstance(v, torch.Tensor):
            return torch.empty_strided(concrete(tuple(v.shape)), concrete(v.stride()), dtype=v.dtype, device="meta")
        if isinstance(v, (tuple, list)):
            return type(v)(concrete(e) for e in v)
        return v

    try:
        args, kwargs = map_arg((node.args, node.kwargs), lambda n: concrete(n.meta.get("val")))
        out = node.target(*args, **kwargs)
    except Exception:  # the schema says it may alias: assume it does
        return True
    return out is args[0] or out._is_view()


def _view_chain(node: Node) -> tuple[Node, list[Node]]:
    """(base, views): `node` is views[-1](...views[0](base)), base itself not a view."""
    views = []
    while _is_view(node):
        views.append(node)
        node = node.args[0]
    return node, views[::-1]


def _written_operand(node: Node) -> Node:
    """The operand an in-place or out= op writes (its schema marks it `(a!)`)."""
    written = [
        value for arg in node.target._schema.arguments if arg.alias_info is not None and arg.alias_info.is_write
        for value in [argument_nodes(node).get(arg.name)] if isinstance(value, Node)
    ]
    if len(written) != 1:
        raise NotCovered(f"{where(node)}: fxclip handles ops that write one tensor; this one writes {len(written)}")
    return written[0]


_BUFFER_HINT = (
    "a module that updates a buffer in its forward (spectral_norm's power iteration and running "
    "statistics do, in training mode) needs .eval() on that module; update the buffer outside "
    "the private step"
)

# what the ops that mutate a model's state in its forward come from, and what to do instead
_MUTATION_HINTS = {
    torch.ops.aten.embedding_renorm_.default: "nn.Embedding(max_norm=...) renormalizes rows of its "
    "weight in place during the forward; build the embedding without max_norm (and, if wanted, "
    "renormalize its weight after each optimizer step instead)",
}


def functionalize(gm: GraphModule, ctx: Context) -> GraphModule:
    """Guarantees: no call_function node mutates a tensor; every reader that comes after an
    in-place or out= op, of the written tensor or of any view of the same base, reads the new
    value. A write through views becomes torch's functional form of it (slice_scatter,
    select_scatter ...). Writing a model input, parameter or buffer (or a view of one, such as
    its detach()) is refused, a buffer with the fix (.eval() on its module)."""
    graph = gm.graph
    fake_mode = detect_fake_mode([n.meta.get("val") for n in graph.nodes if n.op == "placeholder"])
    order = {n: float(i) for i, n in enumerate(graph.nodes)}
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for node in list(graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        if not node.target._schema.is_mutable:
            continue
        mutated = _written_operand(node)
        base, views = _view_chain(mutated)
        variant = _functional_variant(node.target) if mutated is node.args[0] else None
        if base.op == "placeholder":
            kind = ctx.placeholders[placeholders.index(base)][0]
            raise FxclipError(
                f"{where(node)}: the model mutates {'a buffer' if kind == 'buffer' else 'its input or a parameter'} "
                "in place; fxclip needs a functional forward: "
                + _MUTATION_HINTS.get(node.target, _BUFFER_HINT if kind == "buffer" else "use the out-of-place op")
            )
        with graph.inserting_before(node):
            if views or variant is None or variant in _NO_COPY:
                new_base = _write_through_views(gm, node, mutated, base, views, fake_mode)
            else:
                new_base = graph.call_function(variant, node.args, node.kwargs)
                new_base.meta = dict(node.meta)
            for n in graph.nodes:
                if n not in order:
                    order[n] = order[node] - 0.5
            _read_new_value(graph, node, mutated, base, new_base, order)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _copy(value: torch.Tensor, src: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
    """value.copy_(src)'s new value, written with ops autograd differentiates (aten.copy has no
    derivative)."""
    return src.to(dtype=value.dtype, device=value.device).expand(value.shape)


_NO_COPY = {torch.ops.aten.copy.default: _copy}


# a piece of a multi-output view as one view (functionalizing a write into an unbind's piece
# fixes the batch size in torch 2.13)
_PIECES = {
    torch.ops.aten.unbind.int: lambda x, i, dim=0: x.select(dim, i),
    torch.ops.aten.split.Tensor: lambda x, i, size, dim=0: x.narrow(dim, i * size, min(size, x.shape[dim] - i * size)),
    torch.ops.aten.split_with_sizes.default: lambda x, i, sizes, dim=0: x.narrow(dim, sum(sizes[:i]), sizes[i]),
}


def _piece(target, x: torch.Tensor, i: int, args, kwargs) -> torch.Tensor:
    """Piece i of the multi-output view target(x, *args, **kwargs)."""
    if target in _PIECES:
        return _PIECES[target](x, i, *args, **kwargs)
    return target(x, *args, **kwargs)[i]


def _write_through_views(gm: GraphModule, node: Node, mutated: Node, base: Node, views: list[Node], fake_mode) -> Node:
    """Insert torch.func.functionalize's trace of `node` writing `mutated` = views[-1](...(base)):
    the ops that compute the base's new value (the op's out-of-place form, then a scatter back
    through each view). Returns the node of that value."""
    operands: list[Node] = []
    add = lambda a: operands.append(a) if a not in operands and a is not mutated else None
    for n in views:
        map_arg((n.args[1:], n.kwargs), add)
    map_arg((node.args, node.kwargs), add)

    def write(value, *values):
        env = dict(zip(operands, values))
        view = value
        arguments = lambda n: (map_arg(n.args[1:], env.__getitem__), map_arg(n.kwargs, env.__getitem__))
        for k, n in enumerate(views):
            if n.target is operator.getitem:
                view = _piece(n.args[0].target, view, n.args[1], *arguments(n.args[0]))
            elif k + 1 < len(views) and views[k + 1].target is operator.getitem:
                continue  # a multi-output view: applied with its getitem, next
            else:
                view = n.target(view, *arguments(n)[0], **arguments(n)[1])
        env[mutated] = view
        node.target(*map_arg(node.args, env.__getitem__), **map_arg(node.kwargs, env.__getitem__))
        return value

    replacements = dict(fake_mode.shape_env.replacements)
    try:
        with fake_mode:
            sub = make_fx(torch.func.functionalize(write, remove="mutations"), decomposition_table=_NO_COPY)(
                base.meta["val"], *(n.meta["val"] for n in operands)
            )
    except Exception as e:
        raise NotCovered(f"{where(node)}: fxclip could not write this in-place op out of place: {describe(e)}") from e
    if fake_mode.shape_env.replacements != replacements:
        raise NotCovered(f"{where(node)}: writing this in-place op out of place fixed the batch size")
    # functionalize copies the new value back into the mutated input; the graph reads it instead
    for n in list(sub.graph.nodes):
        if n.target is torch.ops.aten.copy_.default and n.args[0].op == "placeholder":
            sub.graph.erase_node(n)
    sub.graph.eliminate_dead_code()
    env = dict(zip((n for n in sub.graph.nodes if n.op == "placeholder"), [base, *operands]))
    for n in sub.graph.nodes:
        if n.op == "output":
            return env[n.args[0]]
        if n.op != "placeholder":
            env[n] = gm.graph.node_copy(n, env.__getitem__)
            env[n].meta.update({k: node.meta[k] for k in SOURCE_META if k in node.meta})
    raise AssertionError("a traced graph ends in an output node")


def _read_new_value(graph, node: Node, mutated: Node, base: Node, new_base: Node, order: dict) -> None:
    """Every reader after `node` of `base`, of a view of it, or of `node`'s own result (the
    `mutated` view) reads the same view of `new_base` instead."""
    replayed = {base: new_base}

    def replay(alias: Node) -> Node:
        if alias not in replayed:
            parent = replay(alias.args[0])
            replayed[alias] = graph.call_function(alias.target, (parent, *alias.args[1:]), alias.kwargs)
            replayed[alias].meta = dict(alias.meta)
            order[replayed[alias]] = order[node] - 0.5
        return replayed[alias]

    # views made after `node` read `base` or one of these, so re-pointing those covers them
    aliases = [n for n in graph.nodes if order[n] < order[node] and (n is base or (_is_view(n) and _view_chain(n)[0] is base))]
    for alias in aliases:
        for user in list(alias.users):
            if user is not node and order[user] > order[node]:
                user.replace_input_with(alias, replay(alias))
    for user in list(node.users):
        user.replace_input_with(node, replay(mutated))
