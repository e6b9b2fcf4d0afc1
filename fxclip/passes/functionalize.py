"""Pass 2, functionalize: in-place ops become out-of-place, so every op's output stays the value
the rules need (a ReLU(inplace=True) after a conv would otherwise overwrite the conv's output)."""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from ..errors import FxclipError
from .context import Context


def _functional_variant(target):
    """aten.relu_.default -> aten.relu.default, or None when there is none."""
    packet_name = target._schema.name.split("::")[-1]
    if not packet_name.endswith("_"):
        return None
    packet = getattr(torch.ops.aten, packet_name[:-1], None)
    overload = target._overloadname
    return getattr(packet, overload, None) if packet is not None else None


def _base(node):
    """The tensor `node` is a view of (through detach, view, slice, transpose ...), else itself."""
    while node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
        returns = node.target._schema.returns
        alias = returns[0].alias_info if len(returns) == 1 else None
        if alias is None or alias.is_write or not node.args or not isinstance(node.args[0], torch.fx.Node):
            break
        node = node.args[0]
    return node


# what the ops that mutate a model's state in its forward come from, and what to do instead
_MUTATION_HINTS = {
    torch.ops.aten.embedding_renorm_.default: "nn.Embedding(max_norm=...) renormalizes rows of its "
    "weight in place during the forward; build the embedding without max_norm (and, if wanted, "
    "renormalize its weight after each optimizer step instead)",
}


def functionalize(gm: GraphModule, ctx: Context) -> GraphModule:
    """Guarantees: no call_function node mutates its input; later readers of a mutated value read
    the new out-of-place result. Mutating a model input, parameter or buffer (or a view of one,
    such as its detach()) is refused."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        if not node.target._schema.is_mutable:
            continue
        mutated = node.args[0]
        variant = _functional_variant(node.target)
        state = _base(mutated).op == "placeholder"
        if variant is None or state:
            raise FxclipError(
                f"the model mutates {'its input or state' if state else 'a tensor'} "
                f"in place with {node.target} ({node.meta.get('stack_trace', '').strip().splitlines()[-1:]}); "
                "fxclip needs a functional forward: "
                + _MUTATION_HINTS.get(node.target, "use the out-of-place op")
            )
        with graph.inserting_after(node):
            new = graph.call_function(variant, node.args, node.kwargs)
            new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        # readers of the mutated tensor that come after the in-place op see the new value
        for user in list(mutated.users):
            if user is not node and user is not new and _comes_after(user, node):
                user.replace_input_with(mutated, new)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _comes_after(a, b) -> bool:
    node = b.next
    while node.op != "root":
        if node is a:
            return True
        node = node.next
    return False
