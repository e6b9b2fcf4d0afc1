"""Components: uses whose squared norms are computed together, and how.

A parameter's squared norm needs all its uses at once. Uses connected through shared parameters
(found with networkx) form a component, whose kind says how its norm is taken:
  "separate"  one use, or uses that read disjoint entries (q/k/v thirds of a packed projection):
              the squared norms add
  "shared"    one parameter used whole several times (tied embeddings, a recurrent weight at
              every step): ‖Σ_u G_u‖²
  "general"   anything else (a product of parameters, a gather that repeats entries): per-example
              gradients mapped back through the chains
Which entries a use reads (its footprint) is found by running its chain on the parameter filled
with its own entry indices, and the example's values of what else the chain reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from itertools import combinations
from typing import Any, Callable, Mapping

import networkx as nx
import torch
from torch.fx import Node
from torch.fx.node import map_arg

from .analyze import CAST_OPS
from .context import ParamUse


@dataclass(frozen=True)
class Component:
    """Parameters whose squared norms must be computed together, the uses (indices into the
    plan's uses) that touch them, and its kind (see the module doc)."""

    params: tuple[str, ...]
    ids: tuple[int, ...]
    kind: str


def components(uses: tuple[ParamUse, ...], param_nodes: Mapping[str, Node], placeholders: dict[Node, Any]) -> tuple[Component, ...]:
    """The components of `uses`, each with its kind; `param_nodes` maps each trainable parameter
    to its placeholder, `placeholders` each placeholder to the example's value."""
    values = _RealValues(placeholders)
    graph = nx.Graph()
    for i, use in enumerate(uses):
        graph.add_node(("use", i))
        graph.add_edges_from((("use", i), ("param", p)) for p in use.params)
    footprint = cache(lambda i: _footprint(uses[i], param_nodes[uses[i].params[0]], values))
    comps = []
    for nodes in nx.connected_components(graph):
        ids = tuple(sorted(i for kind, i in nodes if kind == "use"))
        params = tuple(sorted(p for kind, p in nodes if kind == "param"))
        comps.append(Component(params, ids, _kind(ids, uses, footprint)))
    return tuple(sorted(comps, key=lambda c: c.params))


def _kind(ids: tuple[int, ...], uses: tuple[ParamUse, ...], footprint: Callable) -> str:
    # a gather that copies some entry twice (a relative-position table indexed by a [T, T] map)
    # is not norm-preserving: its norms must be taken back in parameter space
    if any(uses[i].chain_kind == "general" or (uses[i].chain_kind == "gather" and footprint(i) is None) for i in ids):
        return "general"
    if len(ids) == 1 or all(_disjoint(footprint(a), footprint(b)) for a, b in combinations(ids, 2)):
        return "separate"
    if all(uses[i].chain_kind in ("identity", "transpose") for i in ids):
        return "shared"
    return "general"


def _footprint(use: ParamUse, param: Node, values: _RealValues) -> torch.Tensor | None:
    """Entry indices of the parameter that `use.value` copies (its chain run on the parameter
    filled with its own entry indices); None if some entry repeats, or for a general chain."""
    if use.chain_kind == "general":
        return None
    val = param.meta["val"]
    ids = torch.arange(val.numel(), dtype=torch.float64, device=val.device).reshape(val.shape)
    flat = replay(use, values, {param: ids}, skip_casts=True).flatten()
    return flat if flat.unique().numel() == flat.numel() else None


def _disjoint(a, b) -> bool:
    if a is None or b is None:
        return False
    return not bool(torch.isin(a, b).any())


def replay(use: ParamUse, env: Mapping, start: dict, skip_casts: bool = False):
    """`use.value` computed by its chain from `start` (values of some nodes, such as its
    parameters) and `env` (the values of the other nodes the chain reads)."""
    local = dict(start)
    for n in use.chain:
        if skip_casts and n.target in CAST_OPS:
            local[n] = local[n.args[0]] if n.args[0] in local else env[n.args[0]]
            continue
        args = map_arg(n.args, lambda a: local[a] if a in local else env[a])
        kwargs = map_arg(n.kwargs, lambda a: local[a] if a in local else env[a])
        local[n] = n.target(*args, **kwargs)
    return local[use.value]


class _RealValues:
    """The example's values of batch-free nodes (placeholders and what is computed from them
    alone), computed on first read: a chain may read a constant index or a buffer."""

    def __init__(self, placeholders: dict[Node, Any]):
        self.values = dict(placeholders)

    def __getitem__(self, node: Node):
        if node not in self.values:
            args, kwargs = map_arg((node.args, node.kwargs), self.__getitem__)
            self.values[node] = node.target(*args, **kwargs)
        return self.values[node]
