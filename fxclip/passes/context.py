"""What the passes share: the user's request, and what each pass learns about the graph."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch.fx import Node


@dataclass
class ParamUse:
    """One operand of one op that carries trainable parameters.

    `node` is the op (its output has a batch axis), `operand` the schema name of the operand
    (a "name.j" for element j of a list), `value` the graph node feeding it, which is computed from
    `params` (FQNs) by the parameter-only nodes `chain` (in graph order; empty when `value` is a
    parameter itself). `chain_kind` says how the value relates to its parameters:
      "identity"  the parameter itself (up to aliasing, contiguity or a dtype cast)
      "transpose" its 2-D transpose
      "gather"    a copy of some of its entries (views, slices, constant-index gathers)
      "general"   anything else (a product of parameters, a function of one)
    """

    node: Node
    operand: str
    value: Node
    params: tuple[str, ...]
    chain: list[Node]
    chain_kind: str
    rule: Any = None  # set by `match`


@dataclass
class Context:
    model: torch.nn.Module
    loss_fn: Callable
    example_inputs: tuple
    example_targets: Any
    batch_dims: tuple[int, ...]
    memory_budget: Optional[float] = None
    # capture
    exported: Optional[torch.export.ExportedProgram] = None
    placeholders: list = field(default_factory=list)  # (kind, key) for each graph input
    batch_limit: Optional[int] = None  # the largest batch the graph holds (a kernel's bound), if any
    # analyze
    trainable: dict[str, Node] = field(default_factory=dict)  # FQN -> placeholder
    uses: list[ParamUse] = field(default_factory=list)
    # match
    fallbacks: list[ParamUse] = field(default_factory=list)
    # emit
    plan: Any = None  # passes.emit.StepPlan
