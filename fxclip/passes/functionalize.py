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


def functionalize(gm: GraphModule, ctx: Context) -> GraphModule:
    """Guarantees: no call_function node mutates its input; later readers of a mutated value read
    the new out-of-place result. Mutating a model input, parameter or buffer is refused."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        if not node.target._schema.is_mutable:
            continue
        mutated = node.args[0]
        variant = _functional_variant(node.target)
        if variant is None or mutated.op == "placeholder":
            raise FxclipError(
                f"the model mutates {'its input or state' if mutated.op == 'placeholder' else 'a tensor'} "
                f"in place with {node.target} ({node.meta.get('stack_trace', '').strip().splitlines()[-1:]}); "
                "fxclip needs a functional forward: use the out-of-place op"
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
