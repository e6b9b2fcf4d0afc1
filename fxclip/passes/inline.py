"""Writing one node out as the ops it runs (shared by capture and decompose): trace what the node
computes with make_fx on its operands' fake values (the symbolic batch included), copy the traced
ops into the graph in its place."""

from __future__ import annotations

import contextlib
import operator
from typing import Callable

import torch
from torch._dispatch.python import enable_python_dispatcher
from torch.fx import Graph, GraphModule, Node
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.node import map_arg

from ..errors import FxclipError
from ..provenance import where

# metadata a new node inherits from the node it replaces (error messages name the module)
SOURCE_META = ("nn_module_stack", "stack_trace", "source_fn_stack", "from_node")


def replace_node(graph: Graph, node: Node, outputs: list, multi_output: bool) -> None:
    """Point `node`'s users at `outputs` (its getitem users at outputs[i]) and erase it."""
    if not multi_output:
        node.replace_all_uses_with(outputs[0])
    else:
        for user in list(node.users):
            if user.target is not operator.getitem:
                raise FxclipError(f"{where(node)}: unexpected use of the op's outputs by {user.target}")
            user.replace_all_uses_with(outputs[user.args[1]])
            graph.erase_node(user)
    graph.erase_node(node)


def inline_trace(
    gm: GraphModule, node: Node, fn: Callable, operands: list[Node], fake_mode, context=contextlib.nullcontext
) -> bool:
    """Replace `node` by the ops of fn(*operands), traced under `context()` (make_fx records what
    runs below autocast and autograd: autocast's casts become ops). False, graph untouched, when an
    operand is not a tensor or the trace needs constants of its own."""
    if not all(isinstance(n.meta.get("val"), torch.Tensor) for n in operands):
        return False
    # opt_einsum picks a contraction order from sizes, which would fix the batch size. Under the
    # Python dispatcher fake kernels take the symbolic batch: some C++ meta kernels cannot
    # (aten._trilinear, which nn.Bilinear runs, fails an internal assert on a symbolic size).
    with fake_mode, enable_python_dispatcher(), context(), torch.backends.opt_einsum.flags(enabled=False):
        sub = make_fx(fn)(*(n.meta["val"] for n in operands))
    if any(n.op == "get_attr" for n in sub.graph.nodes):
        return False
    graph, env, inputs = gm.graph, {}, iter(operands)
    with graph.inserting_before(node):
        for n in sub.graph.nodes:
            if n.op == "placeholder":
                env[n] = next(inputs)
            elif n.op == "output":
                result = map_arg(n.args[0], env.__getitem__)
            else:
                env[n] = graph.node_copy(n, env.__getitem__)
                env[n].meta.update({k: node.meta[k] for k in SOURCE_META if k in node.meta})
    multi_output = isinstance(node.meta.get("val"), (tuple, list))
    replace_node(graph, node, list(result) if multi_output else [result], multi_output)
    return True
