"""Where a graph node came from (the user's module and source line), for error messages and the
tools: every pass, rule and tool names nodes the same way."""

from __future__ import annotations

from torch.fx import Node


def module_of(node: Node) -> tuple[str, str]:
    """(path, class name) of the innermost user module a node came from ("<root>" for the model
    itself), or ("", "") when the node has no module stack."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, cls = list(stack.values())[-1]
    path = path.removeprefix("L['self'].").removeprefix("model.").removeprefix("model")
    cls = getattr(cls, "__name__", str(cls).split(".")[-1].rstrip("'>"))
    return path or "<root>", cls


def where(node: Node) -> str:
    """The module path and source line a node came from, for error messages."""
    path, cls = module_of(node)
    path = f"module '{path}' ({cls})" if path else ""
    lines = (node.meta.get("stack_trace") or "").strip().splitlines()
    code = lines[-1].strip() if lines else ""
    return ", ".join(p for p in (path, f"op {node.target}", code and f"code: {code}") if p)
