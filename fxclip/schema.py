"""An aten call's arguments by schema name (defaults filled in): how passes and rules read an op's
operands, whatever mix of positional and keyword arguments the graph recorded."""

from __future__ import annotations

from typing import Any

from torch.fx import Node


def bind_arguments(node: Node, args, kwargs) -> dict[str, Any]:
    """Runtime args/kwargs of an aten call as {schema name: value}, defaults filled in."""
    schema = node.target._schema
    bound, positional = {}, list(args)
    for i, a in enumerate(schema.arguments):
        if i < len(positional) and not a.kwarg_only:
            bound[a.name] = positional[i]
        elif a.name in kwargs:
            bound[a.name] = kwargs[a.name]
        elif a.has_default_value():
            bound[a.name] = a.default_value
        else:
            bound[a.name] = None
    return bound


def argument_nodes(node: Node) -> dict[str, Any]:
    """The node's own args (fx Nodes and constants) by schema name."""
    return bind_arguments(node, node.args, node.kwargs)
