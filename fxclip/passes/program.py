"""The step program: a StepPlan run on one batch.

`run(plan, flat_args, C)` runs the forward, one backward to the outputs of the parameter-using
ops (never to the weights), each rule's forms (those of the plan's `in_backward` ops from a hook
inside that backward), the per-example norms, the clip factors, and each use's book-keeping
contraction into its parameters' clipped gradient sums. It reads parameters and writes nothing;
its only state is one call's `_StepState`. `StepProgram` is a capture's plan with what its last
call did per use (`plan`, which `explain` prints).
"""

from __future__ import annotations

import operator
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial, reduce
from typing import Any, NamedTuple

import torch
from torch.fx import Node
from torch.fx.experimental.proxy_tensor import get_proxy_mode

from ..clipping import FLAT, Clipping, StepOutput
from ..forms import (
    LinearForm,
    choose_strategy,
    concatenated,
    cost_values,
    linear_forms_norm_sq,
    materialized_norm_sq,
    reusing_products,
)
from ..rules.registry import fallback_rule
from .components import Component, replay
from .emit import StepPlan, phase, rule_forms
from .slots import OUTPUT_TAP


@dataclass
class PlanEntry:
    """What a step did for one use (for explain and tests)."""

    use: Any  # the ParamUse
    component: Component
    strategy: str  # "ghost", "materialize" or "fallback"
    costs: dict = field(default_factory=dict)  # forms.cost_values of a factor form
    in_backward: bool = False  # its forms were made by a hook inside the backward


@dataclass
class _StepState:
    """One call's state, shared with the hooks that run inside its backward."""

    strategy: str
    safe: bool = False  # norms in float64 from scaled values (forms.ghost_norm_sq)
    forms: dict[int, Any] = field(default_factory=dict)  # use index -> its form
    terms: dict[int, tuple] = field(default_factory=dict)  # use index -> (norm term, PlanEntry)
    env: dict = field(default_factory=dict)  # the forward's saved values, once it has run
    batch: int = 0
    hooks: list = field(default_factory=list)  # handles of the hooks on the forward's outputs
    made_in_backward: set[Node] = field(default_factory=set)  # ops whose hook made their forms
    entries: list[PlanEntry] = field(default_factory=list)


def run(
    plan: StepPlan, flat_args: list, max_grad_norm, strategy: str = "auto", safe: bool = False, clipping: Clipping = FLAT
) -> tuple[StepOutput, list[PlanEntry]]:
    """The step on one batch, and what it did per use. `max_grad_norm`: C, a number or one bound
    per example; for per_layer `clipping`, one bound per group ([G]) or per example and group
    ([B, G]), and then norms are summed per group and each parameter's clipped sum uses its
    group's factors. `safe`: every norm term in float64 from values scaled per example, for a batch
    whose norms came out NaN or infinite (a ghost norm's Gram products overflowed or cancelled
    below zero); the norms and clip factors are returned in the usual dtype."""
    state = _StepState(strategy, safe)
    try:
        losses, dz = _forward_backward(plan, flat_args, state)
    finally:
        # a hook holds the step's state, whose tensors hold the autograd graph the hook is on
        for handle in state.hooks:
            handle.remove()
    forms, batch = state.forms, state.batch
    # fxclip's own arithmetic runs outside any autocast region: norms, clip factors and
    # clipped sums accumulate in float32 (or float64) whatever dtype the forward ran in.
    eager = get_proxy_mode() is None
    with torch.no_grad(), torch.autocast(losses.device.type, enabled=False), reusing_products() if eager else nullcontext():
        for node in plan.use_nodes:
            if not all(i in forms for call in plan.rule_calls[node] for i in call.ids):
                forms.update(rule_forms(plan, node, state.env, dz[node], batch))
        merged = _merged_shared_forms(plan, forms)
        dtype = torch.float32 if losses.dtype != torch.float64 else torch.float64
        zero = partial(losses.new_zeros, batch, dtype=torch.float64 if safe else dtype)
        column = clipping.column_of() if clipping.per_group else None
        if column is None:
            terms = []
            for comp in plan.components:
                with phase("norms", comp.params):
                    terms.append(_norm_sq(plan, comp, state, merged.get(comp)))
            with phase("norms"):
                norm_sq = _total(terms) if terms else zero()
        else:
            norm_sq = _group_norm_sq(plan, state, merged, column, len(clipping.groups), zero())
        with phase("norms"):
            norms = norm_sq.sqrt()  # every term is >= 0, or NaN (ghost_norm_sq)
            group_norms = None
            if column is not None:  # [B, G] per group; the total norm for the result
                group_norms, norms = norms, norm_sq.sum(1).sqrt()
                if not isinstance(max_grad_norm, torch.Tensor):
                    max_grad_norm = norm_sq.new_tensor(max_grad_norm)
            clip = clipping.factors(norms if group_norms is None else group_norms, max_grad_norm)
            norms, clip = norms.to(dtype), clip.to(dtype)
            group_norms = None if group_norms is None else group_norms.to(dtype)
        clipped = _clipped_sums(plan, forms, state.env, clip, merged, column)
    return StepOutput(losses.detach(), norms, clip, clipped, group_norms), state.entries


class StepProgram:
    """A capture's step: `program(flat_args, C, strategy="auto", safe=False, clipping=FLAT) ->
    StepOutput` runs `step_plan` (see `run`); `plan` lists a PlanEntry per use of its last call."""

    def __init__(self, step_plan: StepPlan):
        self.step_plan = step_plan
        self.plan: list[PlanEntry] = []

    @property
    def forward(self):
        return self.step_plan.forward

    def __call__(self, flat_args: list, max_grad_norm, strategy: str = "auto", safe: bool = False, clipping: Clipping = FLAT) -> StepOutput:
        output, self.plan = run(self.step_plan, flat_args, max_grad_norm, strategy, safe, clipping)
        return output


class BoundStep(NamedTuple):
    """A capture's program and its graph inputs for one batch (`PrivateStep.bind`): `flat_args`
    in the order of `placeholders`, whose (kind, key) is ("param" | "buffer" | "constant", name)
    for the model's state and ("input", None) for each leaf of the inputs, then of the targets;
    `batch_dims` gives each input's batch dim (the targets' is 0)."""

    program: StepProgram
    flat_args: list
    placeholders: list
    batch_dims: tuple[int, ...]


# ---- forward and backward ---------------------------------------------------------------------


def _forward_backward(plan: StepPlan, flat_args: list, state: _StepState):
    """The forward, then one backward to the outputs of the parameter-using ops, with the hooks
    of the plan's in_backward ops: (losses, {use node: ∂L/∂ each of its outputs})."""
    token = OUTPUT_TAP.set(partial(_tap, plan, state))
    try:
        with phase("forward"):
            outs = plan.forward(*flat_args)
    finally:
        OUTPUT_TAP.reset(token)
    n_saved = len(plan.saved)
    losses, slots = outs[0], outs[1 + n_saved :]
    state.env, state.batch = dict(zip(plan.saved, outs[1 : 1 + n_saved])), losses.shape[0]
    del outs
    flat_slots = [s for node_slots in slots for s in node_slots]
    with phase("backward"):
        dz = torch.autograd.grad(losses.sum(), [s.edge for s in flat_slots], allow_unused=True) if flat_slots else []
    dz = iter([s.zeros() if g is None else g for s, g in zip(flat_slots, dz)])
    return losses, {node: [next(dz) for _ in node_slots] for node, node_slots in zip(plan.use_nodes, slots)}


def _tap(plan: StepPlan, state: _StepState, k: int, outputs: list[torch.Tensor]) -> None:
    """Called by the forward with use node k's outputs: an in_backward op gets its forms made by
    a hook, as soon as the backward has its output gradient."""
    node = plan.use_nodes[k]
    if node in plan.in_backward:  # chosen only with one output
        state.hooks.append(outputs[0].register_hook(partial(_forms_in_backward, plan, node, state)))


def _forms_in_backward(plan: StepPlan, node: Node, state: _StepState, grad: torch.Tensor) -> None:
    """The op's forms and, for uses in "separate" components, their norm terms, made inside the
    backward (a tensor hook: it reads the gradient and changes nothing). What a norm term reads
    is then read for the last time here, not after the whole backward: a layer norm's input and
    output gradient (the compiled step frees them here)."""
    state.made_in_backward.add(node)
    with torch.no_grad(), torch.autocast(grad.device.type, enabled=False):
        made = rule_forms(plan, node, state.env, [grad], state.batch)
        state.forms.update(made)
        for i, form in made.items():
            if plan.component_of[i].kind == "separate":
                with phase("norms", plan.uses[i].params):
                    state.terms[i] = _separate_norm_sq(plan, i, form, state)


# ---- norms ------------------------------------------------------------------------------------


def _entry(plan: StepPlan, state: _StepState, i: int, strategy: str, costs: dict | None = None) -> PlanEntry:
    use = plan.uses[i]
    return PlanEntry(use, plan.component_of[i], strategy, costs or {}, use.node in state.made_in_backward)


def _materialized(plan: StepPlan, i: int) -> str:
    return "fallback" if plan.uses[i].rule is fallback_rule() else "materialize"


def _oriented(plan: StepPlan, comp: Component, forms: dict) -> list:
    """The forms of the component's uses, each seen in its parameter's orientation."""
    return [forms[i].transposed() if plan.uses[i].chain_kind == "transpose" else forms[i] for i in comp.ids]


def _merged_shared_forms(plan: StepPlan, forms: dict) -> dict[Component, list[LinearForm]]:
    """For each shared component whose uses are all linear forms of one shape: the uses
    `concatenated` along T (a recurrent weight's T steps become one form), computed once and
    read by both the norm and the clipped sum."""
    merged = {}
    for comp in plan.components:
        if comp.kind == "shared" and _concatenable(oriented := _oriented(plan, comp, forms)):
            merged[comp] = concatenated(oriented)
    return merged


def _separate_norm_sq(plan: StepPlan, i: int, form, state: _StepState) -> tuple[torch.Tensor, PlanEntry]:
    """Use i's squared norm term (its component is "separate": the terms add), and its entry."""
    costs = form.costs()
    chosen = choose_strategy([form], state.strategy, plan.memory_budget, costs) if costs else _materialized(plan, i)
    return form.norm_sq(chosen, state.safe), _entry(plan, state, i, chosen, costs)


def _norm_sq(plan: StepPlan, comp: Component, state: _StepState, merged=None) -> torch.Tensor:
    ids, forms, safe, entries = comp.ids, state.forms, state.safe, state.entries
    if comp.kind == "separate":
        terms = []
        for i in ids:
            term, entry = state.terms.pop(i) if i in state.terms else _separate_norm_sq(plan, i, forms[i], state)
            terms.append(term)
            entries.append(entry)
        return _total(terms)
    if merged is not None:
        costs = cost_values(merged)
        chosen = choose_strategy(merged, state.strategy, plan.memory_budget, costs)
        entries.extend(_entry(plan, state, i, chosen, costs) for i in ids)
        return linear_forms_norm_sq(merged, chosen, safe)
    entries.extend(_entry(plan, state, i, _materialized(plan, i)) for i in ids)
    if comp.kind == "shared":
        return materialized_norm_sq(_total(f.materialize() for f in _oriented(plan, comp, forms)), safe)
    return _total(_param_norm_sq(plan, comp, state).values())


def _total(tensors) -> torch.Tensor:
    """The sum of one or more tensors, without the extra op of Python's sum (0 + the first)."""
    return reduce(operator.add, tensors)


def _param_norm_sq(plan: StepPlan, comp: Component, state: _StepState) -> dict[str, torch.Tensor]:
    """Each parameter's squared norm [B] in a "general" component."""
    per_param = _per_example_param_grads(plan, comp, state.forms, state.env)
    return {key: materialized_norm_sq(g, state.safe) for key, g in per_param.items()}


def _group_norm_sq(plan: StepPlan, state: _StepState, merged: dict, column: dict[str, int], groups: int, zero: torch.Tensor) -> torch.Tensor:
    """Squared norms per example and group [B, G] (per_layer clipping): each component's term
    goes to its parameters' group; a general component whose parameters are in several groups
    gives each parameter's own term."""
    columns = [zero] * groups
    for comp in plan.components:
        with phase("norms", comp.params):
            if len({column[p] for p in comp.params}) == 1:
                terms = {comp.params[0]: _norm_sq(plan, comp, state, merged.get(comp))}
            else:
                state.entries.extend(_entry(plan, state, i, _materialized(plan, i)) for i in comp.ids)
                terms = _param_norm_sq(plan, comp, state)
            for key, term in terms.items():
                columns[column[key]] = columns[column[key]] + term
    return torch.stack(columns, dim=1)


def _per_example_param_grads(plan: StepPlan, comp: Component, forms: dict, env: dict) -> dict[str, torch.Tensor]:
    """Per-example gradients of each parameter, through any chain: vmap of the chain's vjp."""
    total: dict[str, torch.Tensor] = {}
    for i in comp.ids:
        use = plan.uses[i]
        for key, g in zip(use.params, torch.func.vmap(_chain_vjp(plan, use, env))(forms[i].materialize())):
            total[key] = total[key] + g if key in total else g
    return total


def _chain_vjp(plan: StepPlan, use, env: dict):
    params = [plan.param_nodes[p] for p in use.params]
    _, vjp = torch.func.vjp(lambda *values: replay(use, env, dict(zip(params, values))), *(env[p].detach() for p in params))
    return vjp


# ---- book-keeping -----------------------------------------------------------------------------


def _clipped_sums(plan: StepPlan, forms: dict, env: dict, clip: torch.Tensor, merged: dict, column: dict | None = None) -> dict[str, torch.Tensor]:
    """Σ_i c_i ∇_W L_i for every parameter in plan.grad_keys, one contraction per use (per merged
    block for a shared parameter's concatenated uses). Per group (`column`: each parameter's
    column of `clip` [B, G]), each parameter's own group's factors: one contraction per group
    for a use whose parameters are in several (linear in c, so the chain's vjp of each gives its
    parameters' sums)."""
    grads: dict[str, torch.Tensor] = {}
    done: set[int] = set()
    for comp, blocks in merged.items():
        (key,) = comp.params
        c = clip if column is None else clip[:, column[key]]
        with phase("book-keeping", comp.params):
            grads[key] = _total(f.clipped_sum(c).reshape(plan.param_shape(key)) for f in blocks)
        done.update(comp.ids)
    for i, use in enumerate(plan.uses):
        if i in done:
            continue
        if column is not None and len({column[k] for k in use.params}) > 1:
            _add_clipped_sums_by_group(plan, use, forms[i], env, clip, column, grads)
            continue
        c = clip if column is None else clip[:, column[use.params[0]]]
        with phase("book-keeping", use.params):
            in_value_space = forms[i].clipped_sum(c)
            if use.chain_kind == "identity":
                shape = plan.param_shape(use.params[0])
                # a sparse sum (nn.Embedding(sparse=True)) has the shape and cannot reshape
                param_grads = [in_value_space if in_value_space.shape == shape else in_value_space.reshape(shape)]
            elif use.chain_kind == "transpose":
                param_grads = [in_value_space.t()]
            else:
                param_grads = _chain_vjp(plan, use, env)(_dense(in_value_space))
            for key, g in zip(use.params, param_grads):
                grads[key] = grads[key] + g if key in grads else g
    return {key: grads[key] for key in plan.grad_keys}


def _add_clipped_sums_by_group(plan: StepPlan, use, form, env: dict, clip: torch.Tensor, column: dict, grads: dict) -> None:
    """A use whose parameters (through a general chain: a product of parameters) are in several
    groups: one contraction per group with that group's factors, mapped back by the chain's vjp
    (linear in c), of which each parameter of the group takes its own."""
    for j in dict.fromkeys(column[k] for k in use.params):
        with phase("book-keeping", use.params):
            param_grads = _chain_vjp(plan, use, env)(_dense(form.clipped_sum(clip[:, j])))
            for key, g in zip(use.params, param_grads):
                if column[key] == j:
                    grads[key] = grads[key] + g if key in grads else g


def _dense(x: torch.Tensor) -> torch.Tensor:
    return x.to_dense() if x.is_sparse else x


def _concatenable(forms) -> bool:
    if not all(isinstance(f, LinearForm) for f in forms):
        return False
    first = forms[0]
    return all(f.shape == first.shape and f.left.k == first.left.k and f.right.k == first.right.k for f in forms)
