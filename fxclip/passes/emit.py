"""emit: the private step's plan, decided once per capture.

A `StepPlan` holds the forward (the captured graph, also returning every value a rule or a
parameter chain reads and a slot for each output of a parameter-using op), the rule calls at each
such op, the components (uses whose norms are computed together) with their kinds, and the ops
whose forms are made inside the backward. Everything in it is settled here, from the parameters,
buffers and constants the capture fixed, the example batch's shapes and fake tensors;
`passes/program.py` runs a plan and changes nothing in it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Mapping

import torch
import torch.fx.traceback as fx_traceback
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx import GraphModule, Node
from torch.fx.experimental.proxy_tensor import get_proxy_mode
from torch.fx.node import map_arg

from ..batch import BatchAxis
from ..forms import PerExampleGrad
from ..rules.registry import OpCall, Rule, fallback_rule
from ..schema import argument_nodes, bind_arguments
from .capture import graph_inputs
from .components import Component, components
from .context import Context, ParamUse
from .slots import with_output_slots

PHASES = ("forward", "backward", "norms", "book-keeping")


def phase(name: str, params=()):
    """Tags what make_fx records inside with node.meta["custom"] = {"fxclip_phase": one of PHASES,
    "fxclip_params": the parameters it serves, comma-separated}; `fxclip.graph_view` colours and
    labels the step graph by these. No effect on the values; outside a make_fx trace (the eager
    step) it does nothing, since the tags are only read from traced graphs."""
    if get_proxy_mode() is None:
        return contextlib.nullcontext()
    return fx_traceback.annotate({"fxclip_phase": name, "fxclip_params": ",".join(params)})


@dataclass(frozen=True)
class RuleCall:
    """One call of `rule` at an op, for the uses (indices in StepPlan.uses) of the operands it handles."""

    rule: Rule
    ids: tuple[int, ...]


@dataclass(frozen=True)
class StepPlan:
    """What a capture's step does, fixed at emit; `passes.program.run` runs it on a batch."""

    forward: Callable  # flat args -> (loss, *saved values, *output slots of each use node)
    uses: tuple[ParamUse, ...]
    components: tuple[Component, ...]
    use_nodes: tuple[Node, ...]  # the parameter-using ops, each once
    rule_calls: Mapping[Node, tuple[RuleCall, ...]]
    operand_axes: Mapping[Node, dict[str, BatchAxis]]  # batch axis of each batched operand, by schema name
    saved: tuple[Node, ...]  # the values the forward also returns
    in_backward: frozenset[Node]  # ops whose forms (and separate norm terms) a hook makes in the backward
    param_nodes: Mapping[str, Node]  # trainable parameter -> its placeholder
    grad_keys: tuple[str, ...]  # the parameters that get a clipped sum, in the order the step returns them
    memory_budget: float | None

    @cached_property
    def component_of(self) -> dict[int, Component]:
        """The component of each use (by index)."""
        return {i: c for c in self.components for i in c.ids}

    def param_shape(self, key: str) -> torch.Size:
        return self.param_nodes[key].meta["val"].shape


def emit(gm: GraphModule, ctx: Context) -> GraphModule:
    """Guarantees: `ctx.plan` is the StepPlan over `gm`, whose forward now also returns every value
    a rule or a parameter chain reads and a slot for each output of a parameter-using op; every
    choice the step makes once per capture (component kinds, which ops make their forms inside the
    backward) is in the plan."""
    uses = tuple(ctx.uses)
    use_nodes = tuple(dict.fromkeys(u.node for u in uses))
    needed: list[Node] = []
    for node in use_nodes:
        map_arg((node.args, node.kwargs), needed.append)
    for use in uses:
        needed += [n for c in use.chain for n in c.all_input_nodes if n not in use.chain]
    saved = tuple(dict.fromkeys(needed))
    examples = dict(zip(
        [n for n in gm.graph.nodes if n.op == "placeholder"],
        graph_inputs(ctx.placeholders, ctx.model, ctx.exported.constants, ctx.example_inputs, ctx.example_targets),
    ))
    plan = StepPlan(
        forward=with_output_slots(gm, saved, use_nodes),
        uses=uses,
        components=components(uses, ctx.trainable, examples),
        use_nodes=use_nodes,
        rule_calls=_rule_calls(uses),
        operand_axes={node: _operand_axes(node) for node in use_nodes},
        saved=saved,
        in_backward=frozenset(),
        param_nodes=dict(ctx.trainable),
        grad_keys=tuple(dict.fromkeys(p for u in uses for p in u.params)),
        memory_budget=ctx.memory_budget,
    )
    ctx.plan = dataclasses.replace(plan, in_backward=_in_backward(plan, list(examples.values())))
    return gm


# ---- the rules at one op ----------------------------------------------------------------------


def rule_forms(plan: StepPlan, node: Node, env: Mapping, grads: list, batch: int) -> dict[int, Any]:
    """The forms of the uses at `node`, calling each rule once with all the operands it handles;
    `env` holds the forward's values of the op's arguments, `grads` the gradients at its outputs."""
    forms: dict[int, Any] = {}
    for call in plan.rule_calls[node]:
        args = map_arg(node.args, lambda n: env[n])
        kwargs = map_arg(node.kwargs, lambda n: env[n])
        op_call = OpCall(
            node=node,
            arguments=bind_arguments(node, args, kwargs),
            grad=grads[0] if len(grads) == 1 else tuple(grads),
            batch_size=batch,
            axes=plan.operand_axes[node],
            output_axis=_first_axis(node.meta["fxclip_batch_axis"]),
            param_names=tuple(plan.uses[i].operand for i in call.ids),
        )
        with phase("norms", [p for i in call.ids for p in plan.uses[i].params]):
            result = call.rule(op_call)
        for i in call.ids:
            forms[i] = result[plan.uses[i].operand]
    return forms


def _rule_calls(uses: tuple[ParamUse, ...]) -> dict[Node, tuple[RuleCall, ...]]:
    calls: dict[Node, list[tuple[Rule, list[int]]]] = {}
    for i, use in enumerate(uses):
        at_node = calls.setdefault(use.node, [])
        same_rule = next((ids for rule, ids in at_node if rule is use.rule), None)
        if same_rule is None:
            at_node.append((use.rule, [i]))
        else:
            same_rule.append(i)
    return {node: tuple(RuleCall(rule, tuple(ids)) for rule, ids in at_node) for node, at_node in calls.items()}


# ---- ops whose forms are made inside the backward ---------------------------------------------


def _in_backward(plan: StepPlan, example_args: list) -> frozenset[Node]:
    """The ops whose forms and norm terms a hook makes inside the backward: one output, a rule
    other than the fallback, and per-example gradients (no factor forms) with no more entries
    than the output gradient they are made from (norm layers' affine parameters, scales, broadcast
    biases). Made there, they read their operands and output gradient for the last time there,
    which the compiled step then frees, instead of holding them through the rest of the backward.
    Factor forms hold theirs for the clipped sum anyway, and larger per-example gradients (a
    convolution's), built early, would be held through the rest of the backward instead.

    Decided on fake tensors shaped like the example batch: the forward, then the rules on zero
    output gradients. A rule that cannot run on fake tensors (it reads values) makes its forms
    after the backward, as every factor form does."""
    candidates = [
        node for node, calls in plan.rule_calls.items() if all(c.rule is not fallback_rule() for c in calls)
    ]
    if not candidates:
        return frozenset()
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakes = [
        mode.from_tensor(a.detach().requires_grad_(a.requires_grad)) if isinstance(a, torch.Tensor) else a
        for a in example_args
    ]
    chosen = set()
    with mode, torch.enable_grad():
        outs = plan.forward(*fakes)
        n_saved = len(plan.saved)
        env = dict(zip(plan.saved, outs[1 : 1 + n_saved]))
        slots = dict(zip(plan.use_nodes, outs[1 + n_saved :]))
        for node in candidates:
            if len(slots[node]) != 1:
                continue
            grad = slots[node][0].zeros()
            with torch.no_grad(), torch.autocast(grad.device.type, enabled=False):
                try:
                    forms = rule_forms(plan, node, env, [grad], outs[0].shape[0])
                except Exception:  # the rule reads values (or refuses this call: it will when it runs)
                    continue
            if all(isinstance(f, PerExampleGrad) for f in forms.values()):
                if sum(f.grads.numel() for f in forms.values()) <= grad.numel():
                    chosen.add(node)
    return frozenset(chosen)


# ---- small helpers ----------------------------------------------------------------------------


def _operand_axes(node: Node) -> dict[str, BatchAxis]:
    """Batch axis of each batched operand of `node` by schema name ("name.j" inside a list)."""
    axes = {}
    for name, value in argument_nodes(node).items():
        items = value if isinstance(value, (list, tuple)) else [value]
        for j, v in enumerate(items):
            if isinstance(v, Node) and isinstance(v.meta.get("fxclip_batch_axis"), BatchAxis):
                axes[name if v is value else f"{name}.{j}"] = v.meta["fxclip_batch_axis"]
    return axes


def _first_axis(axis):
    return axis[0] if isinstance(axis, tuple) else axis
