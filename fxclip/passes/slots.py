"""Output slots: where the backward delivers ∂L/∂z for each output z of a parameter-using op.

The emitted forward returns a slot (a graph edge, not the tensor) per such output, so z's memory
is freed as soon as the forward is done with it; a step that wants to act inside the backward
(a hook on z) is told of each z while the forward makes it (`OUTPUT_TAP`).
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import NamedTuple

import torch
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.fx import GraphModule, Node


class OutputSlot(NamedTuple):
    """Where the backward delivers ∂L/∂z for one op output z, without keeping z alive."""

    edge: GradientEdge
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device

    def zeros(self) -> torch.Tensor:
        """∂L/∂z for an output the loss does not depend on."""
        return torch.zeros(self.shape, dtype=self.dtype, device=self.device)


# The step being run: called with (use node index, the op's outputs that require grad) by the
# forward, the only time those tensors exist (a hook on one is how the step acts in the backward).
OUTPUT_TAP: ContextVar = ContextVar("fxclip_output_tap", default=None)


def output_slots(value, k: int) -> list[OutputSlot]:
    """An OutputSlot for each tensor of use node k's output that requires grad."""
    items = value if isinstance(value, (tuple, list)) else [value]
    outputs = [z for z in items if isinstance(z, torch.Tensor) and z.requires_grad]
    tap = OUTPUT_TAP.get()
    if tap is not None:
        tap(k, outputs)
    return [OutputSlot(get_gradient_edge(z), z.shape, z.dtype, z.device) for z in outputs]


def with_output_slots(gm: GraphModule, saved: tuple[Node, ...], tapped: tuple[Node, ...]) -> GraphModule:
    """`gm` rewritten to return (loss, *saved values, *the output slots of each tapped node)."""
    graph = gm.graph
    slots = []
    for k, node in enumerate(tapped):
        with graph.inserting_after(node):
            slots.append(graph.call_function(output_slots, (node, k)))
    output = next(n for n in graph.nodes if n.op == "output")
    loss = output.args[0][0]
    output.args = ((loss, *saved, *slots),)
    gm.recompile()
    return gm
