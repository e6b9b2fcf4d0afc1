"""match: each parameter operand finds its rule; the rest go to the fallback."""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from ..errors import NotCovered
from ..provenance import where
from ..rules.registry import fallback_rule, find_rule
from ..schema import argument_nodes
from .context import Context


def _batched(node: Node) -> bool:
    return node.meta.get("fxclip_batch_axis") is not None


def _check_fallback_possible(node: Node) -> None:
    """The fallback re-runs the op on one example, so batched operands must be top-level tensors
    and no argument may be a size computed from the batch."""
    for name, value in argument_nodes(node).items():
        items = value if isinstance(value, (list, tuple)) else [value]
        for v in items:
            if not isinstance(v, Node):
                continue
            is_size = isinstance(v.meta.get("val"), torch.SymInt)
            if is_size or (v is not value and _batched(v)):
                raise NotCovered(
                    f"{where(node)}: no rule covers this op, and the per-example fallback cannot run it "
                    f"(operand '{name}' is {'a size computed from the batch' if is_size else 'a batched tensor inside a list'}). "
                    "Register a rule for it with fxclip.register_rule."
                )


def match(gm: GraphModule, ctx: Context) -> GraphModule:
    """Guarantees: every use has `use.rule`; `ctx.fallbacks` lists the uses that got the
    fallback, each checked to be runnable one example at a time."""
    fallback = fallback_rule()
    ctx.fallbacks = []
    for use in ctx.uses:
        use.rule = find_rule(use.node, use.operand)
        if use.rule is fallback:
            if "." in use.operand:
                raise NotCovered(
                    f"{where(use.node)}: a parameter inside the list operand '{use.operand}' and no rule "
                    "for this op. Register one with fxclip.register_rule."
                )
            _check_fallback_possible(use.node)
            ctx.fallbacks.append(use)
    return gm
