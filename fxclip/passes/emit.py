"""emit: the private step program.

One forward (the captured graph, also returning what the rules read), one backward to the
outputs of the parameter-using ops (never to the weights), each rule's forms, the per-example
norms, the clip factors, and each rule's book-keeping contraction into the parameters' gradients.
Ops with small per-example gradients (norm layers' affine parameters) get their forms and norm
terms from hooks inside that backward, from the second call on (`_choose_in_backward`).
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import partial
from itertools import combinations
from typing import Any, NamedTuple

import networkx as nx
import torch
import torch.fx.traceback as fx_traceback
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from ..batch import BatchAxis
from ..clipping import clip_factors
from ..forms import LinearForm, PerExampleGrad, choose_strategy, concatenated, cost_values, linear_forms_norm_sq, materialized_norm_sq
from ..rules.registry import OpCall, fallback_rule
from ..schema import argument_nodes, bind_arguments
from .analyze import CAST_OPS
from .context import Context, ParamUse

PHASES = ("forward", "backward", "norms", "book-keeping")


def phase(name: str, params=()):
    """Tags what a tracer (make_fx, torch.export) records inside with node.meta["custom"] =
    {"fxclip_phase": one of PHASES, "fxclip_params": the parameters it serves, comma-separated};
    `fxclip.graph_view` colours and labels the step graph by these. No effect on the values."""
    return fx_traceback.annotate({"fxclip_phase": name, "fxclip_params": ",".join(params)})


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


@dataclass
class Component:
    """Parameters whose squared norms must be computed together, and the uses that touch them.

    kind: "separate"  each use's norm adds (one use, or uses reading disjoint entries)
          "shared"    one parameter used several times whole (tied, recurrent): ‖Σ_u G_u‖²
          "general"   anything else: per-example gradients mapped back through the chains"""

    params: tuple[str, ...]
    uses: list[ParamUse]
    ids: list[int]  # the uses' indices in StepProgram.uses
    kind: str = ""


@dataclass
class PlanEntry:
    """What the last step did for one use (for explain and tests)."""

    use: ParamUse
    component: Component
    strategy: str
    costs: dict = field(default_factory=dict)


def _flat_nodes(args) -> list[Node]:
    out = []
    map_arg(args, out.append)
    return out


def _components(uses: list[ParamUse]) -> list[Component]:
    graph = nx.Graph()
    for i, use in enumerate(uses):
        graph.add_node(("use", i))
        graph.add_edges_from((("use", i), ("param", p)) for p in use.params)
    comps = []
    for nodes in nx.connected_components(graph):
        idx = sorted(i for kind, i in nodes if kind == "use")
        params = tuple(sorted(p for kind, p in nodes if kind == "param"))
        comps.append(Component(params, [uses[i] for i in idx], idx))
    return sorted(comps, key=lambda c: c.params)


class StepProgram:
    """Computes (losses, norms, clip factors, clipped gradient sums) for a batch; pure: it reads
    parameters and writes nothing."""

    def __init__(self, gm: GraphModule, ctx: Context):
        self.ctx = ctx
        self.uses = ctx.uses
        self.components = _components(ctx.uses)
        self.use_nodes = list(dict.fromkeys(u.node for u in ctx.uses))
        self._rule_calls: dict[Node, list[tuple[Any, list[int]]]] = {}  # node -> [(rule, its uses)]
        for i, use in enumerate(self.uses):
            calls = self._rule_calls.setdefault(use.node, [])
            same_rule = next((ids for rule, ids in calls if rule is use.rule), None)
            if same_rule is None:
                calls.append((use.rule, [i]))
            else:
                same_rule.append(i)
        self._in_backward: set[Node] | None = None  # set by _choose_in_backward on the first call
        self._component_of = {i: comp for comp in self.components for i in comp.ids}
        self._operand_axes = {node: _operand_axes(node) for node in self.use_nodes}
        needed: list[Node] = []
        for node in self.use_nodes:
            needed += _flat_nodes((node.args, node.kwargs))
        for use in ctx.uses:
            needed += [n for c in use.chain for n in c.all_input_nodes if n not in use.chain]
        self.saved = list(dict.fromkeys(needed))
        self.forward = _with_extra_outputs(gm, self.saved, self.use_nodes)
        self.plan: list[PlanEntry] = []
        self._footprints: dict[int, torch.Tensor] | None = None  # set by _classify on the first call

    # ---- running the step -------------------------------------------------------------------

    def __call__(self, flat_args: list, max_grad_norm: float, strategy: str = "auto", safe: bool = False):
        """`safe`: every norm term in float64 from values scaled per example, for a batch whose
        norms came out NaN or infinite (a ghost norm's Gram products overflowed or cancelled below
        zero); the norms and clip factors are returned in the usual dtype."""
        step = _StepState(strategy, safe)
        forms = step.forms
        try:
            losses, env, slots, dz = self._forward_backward(flat_args, step)
        finally:
            # a hook holds the step's state, whose tensors hold the autograd graph the hook is on
            for handle in step.hooks:
                handle.remove()
        batch = step.batch
        grads_by_node, i = {}, 0
        for node, node_slots in zip(self.use_nodes, slots):
            grads_by_node[node] = dz[i : i + len(node_slots)]
            i += len(node_slots)
        # fxclip's own arithmetic runs outside any autocast region: norms, clip factors and
        # clipped sums accumulate in float32 (or float64) whatever dtype the forward ran in.
        with torch.no_grad(), torch.autocast(losses.device.type, enabled=False):
            for node in self.use_nodes:
                if not all(i in forms for _, ids in self._rule_calls[node] for i in ids):
                    forms.update(self._node_forms(node, env, grads_by_node[node], batch))
            if self._in_backward is None:
                self._choose_in_backward(forms, grads_by_node)
            merged = self._merged_shared_forms(forms)
            dtype = torch.float32 if losses.dtype != torch.float64 else torch.float64
            norm_sq = losses.new_zeros(batch, dtype=torch.float64 if safe else dtype)
            plan = []
            for comp in self.components:
                with phase("norms", comp.params):
                    norm_sq = norm_sq + self._norm_sq(comp, step, plan, merged.get(id(comp)))
            with phase("norms"):
                norms = norm_sq.sqrt()  # every term is >= 0, or NaN (ghost_norm_sq)
                clip = clip_factors(norms, max_grad_norm)
                norms, clip = norms.to(dtype), clip.to(dtype)
            clipped = self._clipped_sums(forms, env, clip, merged)
        self.plan = plan
        return losses.detach(), norms, clip, clipped

    def _forward_backward(self, flat_args: list, step: _StepState):
        """The forward, then one backward to the outputs of the parameter-using ops, whose hooks
        make the forms _choose_in_backward picked: (losses, saved values, output slots, ∂L/∂z)."""
        token = _OUTPUT_TAP.set(partial(self._tap, step))
        try:
            with phase("forward"):
                outs = self.forward(*flat_args)
        finally:
            _OUTPUT_TAP.reset(token)
        n_saved = len(self.saved)
        losses, env, slots = outs[0], dict(zip(self.saved, outs[1 : 1 + n_saved])), outs[1 + n_saved :]
        del outs
        step.env, step.batch = env, losses.shape[0]
        if self._footprints is None:
            self._classify(env)
        flat_slots = [s for node_slots in slots for s in node_slots]
        with phase("backward"):
            dz = torch.autograd.grad(losses.sum(), [s.edge for s in flat_slots], allow_unused=True) if flat_slots else []
        return losses, env, slots, [s.zeros() if g is None else g for s, g in zip(flat_slots, dz)]

    def _choose_in_backward(self, forms: dict, grads_by_node: dict) -> None:
        """The ops whose forms and norm terms later calls make inside the backward: one output,
        a rule other than the fallback, and per-example gradients (no factor forms) with no more
        entries than the output gradient they are made from (norm layers' affine parameters,
        scales, broadcast biases). Made there, they read their operands and output gradient for
        the last time there, which the compiled step then frees, instead of holding them through
        the rest of the backward. Factor forms hold theirs for the clipped sum anyway, and larger
        per-example gradients (a convolution's), built early, would be held through the rest of
        the backward instead (the eager paper CNN's peak at B=256 rose from under 1.35x to 1.68x
        the non-private step's when its convolutions' were)."""
        self._in_backward = set()
        for node, calls in self._rule_calls.items():
            grads = grads_by_node[node]
            ids = [i for _, idx in calls for i in idx]
            if len(grads) != 1 or any(rule is fallback_rule() for rule, _ in calls):
                continue
            if all(isinstance(forms[i], PerExampleGrad) for i in ids):
                if sum(forms[i].grads.numel() for i in ids) <= grads[0].numel():
                    self._in_backward.add(node)

    def _tap(self, step: _StepState, k: int, outputs: list[torch.Tensor]) -> None:
        """Called by the forward with use node k's outputs: an op chosen by _choose_in_backward
        gets its forms made by a hook, as soon as the backward has its output gradient."""
        node = self.use_nodes[k]
        if node in (self._in_backward or ()):  # chosen only with one output
            step.hooks.append(outputs[0].register_hook(partial(self._forms_in_backward, node, step)))

    def _forms_in_backward(self, node: Node, step: _StepState, grad: torch.Tensor) -> None:
        """The op's forms and, for uses in "separate" components, their norm terms, made inside
        the backward (a tensor hook: it reads the gradient and changes nothing). What a norm term
        reads is then read for the last time here, not after the whole backward: a layer norm's
        input and output gradient (the compiled step frees them here)."""
        with torch.no_grad(), torch.autocast(grad.device.type, enabled=False):
            made = self._node_forms(node, step.env, [grad], step.batch)
            step.forms.update(made)
            for i, form in made.items():
                if self._component_of[i].kind == "separate":
                    with phase("norms", self.uses[i].params):
                        step.terms[i] = self._separate_norm_sq(i, form, step.strategy, step.safe)

    def _node_forms(self, node: Node, env: dict, grads: list, batch: int) -> dict[int, Any]:
        """The forms of the uses at `node`, calling each rule once with all the operands it handles."""
        forms: dict[int, Any] = {}
        for rule, idx in self._rule_calls[node]:
            args = map_arg(node.args, lambda n: env[n])
            kwargs = map_arg(node.kwargs, lambda n: env[n])
            arguments = bind_arguments(node, args, kwargs)
            call = OpCall(
                node=node,
                arguments=arguments,
                grad=grads[0] if len(grads) == 1 else tuple(grads),
                batch_size=batch,
                axes=self._operand_axes[node],
                output_axis=_first_axis(node.meta["fxclip_batch_axis"]),
                param_names=tuple(self.uses[i].operand for i in idx),
            )
            with phase("norms", [p for i in idx for p in self.uses[i].params]):
                result = rule(call)
            for i in idx:
                forms[i] = result[self.uses[i].operand]
        return forms

    # ---- norms ------------------------------------------------------------------------------

    def _classify(self, env: dict) -> None:
        """Decide each component's kind; footprints (which parameter entries a use reads) are
        found by running gather chains on parameters filled with their own entry indices."""
        self._footprints = {}
        for i, use in enumerate(self.uses):
            if use.chain_kind in ("identity", "transpose", "gather"):
                self._footprints[i] = self._footprint(use, env)
        for comp in self.components:
            ids = comp.ids
            # a gather that copies some entry twice (a relative-position table indexed by a
            # [T, T] map) is not norm-preserving: its norms must be taken back in parameter space
            if any(self.uses[i].chain_kind == "general" or self._repeats_entries(i) for i in ids):
                comp.kind = "general"
            elif len(ids) == 1 or all(_disjoint(self._footprints[a], self._footprints[b]) for a, b in combinations(ids, 2)):
                comp.kind = "separate"
            elif all(self.uses[i].chain_kind in ("identity", "transpose") for i in ids):
                comp.kind = "shared"
            else:
                comp.kind = "general"

    def _repeats_entries(self, i: int) -> bool:
        return self.uses[i].chain_kind == "gather" and self._footprints[i] is None

    def _footprint(self, use: ParamUse, env: dict) -> torch.Tensor | None:
        """Entry indices of the parameter that `use.value` copies; None if some entry repeats
        (then the chain is not a norm-preserving gather)."""
        param = self.ctx.trainable[use.params[0]]
        shape = param.meta["val"].shape
        # on the device of the values the chain reads (an index on a GPU)
        device = next((v.device for v in env.values() if isinstance(v, torch.Tensor)), None)
        ids = torch.arange(int(torch.Size(shape).numel()), dtype=torch.float64, device=device).reshape(shape)
        values = self._replay(use, env, {param: ids}, skip_casts=True)
        flat = values.flatten()
        return flat if flat.unique().numel() == flat.numel() else None

    def _replay(self, use: ParamUse, env: dict, start: dict, skip_casts: bool = False):
        local = dict(start)
        for n in use.chain:
            if skip_casts and n.target in CAST_OPS:
                local[n] = local[n.args[0]] if n.args[0] in local else env[n.args[0]]
                continue
            args = map_arg(n.args, lambda a: local[a] if a in local else env[a])
            kwargs = map_arg(n.kwargs, lambda a: local[a] if a in local else env[a])
            local[n] = n.target(*args, **kwargs)
        return local[use.value]

    def _oriented(self, comp: Component, forms: dict) -> list:
        """The forms of the component's uses, each seen in its parameter's orientation."""
        return [forms[i].transposed() if self.uses[i].chain_kind == "transpose" else forms[i] for i in comp.ids]

    def _merged_shared_forms(self, forms: dict) -> dict[int, list[LinearForm]]:
        """For each shared component whose uses are all linear forms of one shape: the uses
        `concatenated` along T (a recurrent weight's T steps become one form), computed once and
        read by both the norm and the clipped sum. Keyed by id(component)."""
        merged = {}
        for comp in self.components:
            if comp.kind == "shared" and _concatenable(oriented := self._oriented(comp, forms)):
                merged[id(comp)] = concatenated(oriented)
        return merged

    def _separate_norm_sq(self, i: int, form, strategy: str, safe: bool) -> tuple[torch.Tensor, PlanEntry]:
        """Use i's squared norm term (its component is "separate": the terms add), and the entry
        for the plan."""
        costs = form.costs()
        chosen = choose_strategy([form], strategy, self.ctx.memory_budget) if costs else self._materialized_label(i)
        return form.norm_sq(chosen, safe), PlanEntry(self.uses[i], self._component_of[i], chosen, costs or {})

    def _norm_sq(self, comp: Component, step: _StepState, plan: list, merged=None) -> torch.Tensor:
        ids, forms, strategy, safe = comp.ids, step.forms, step.strategy, step.safe
        budget = self.ctx.memory_budget
        if comp.kind == "separate":
            total = 0
            for i in ids:
                term, entry = step.terms.pop(i) if i in step.terms else self._separate_norm_sq(i, forms[i], strategy, safe)
                total = total + term
                plan.append(entry)
            return total
        if merged is not None:
            chosen = choose_strategy(merged, strategy, budget)
            costs = cost_values(merged)
            plan.extend(PlanEntry(self.uses[i], comp, chosen, costs) for i in ids)
            return linear_forms_norm_sq(merged, chosen, safe)
        oriented = self._oriented(comp, forms)
        if comp.kind == "shared":
            total = sum(f.materialize() for f in oriented)
            plan.extend(PlanEntry(self.uses[i], comp, self._materialized_label(i)) for i in ids)
            return materialized_norm_sq(total, safe)
        per_param = self._per_example_param_grads(comp, ids, forms, step.env)
        plan.extend(PlanEntry(self.uses[i], comp, self._materialized_label(i)) for i in ids)
        return sum(materialized_norm_sq(g, safe) for g in per_param.values())

    def _materialized_label(self, i: int) -> str:
        return "fallback" if self.uses[i].rule is fallback_rule() else "materialize"

    def _per_example_param_grads(self, comp, ids, forms, env) -> dict[str, torch.Tensor]:
        """Per-example gradients of each parameter, through any chain: vmap of the chain's vjp."""
        total: dict[str, torch.Tensor] = {}
        for i in ids:
            use = self.uses[i]
            grads_v = forms[i].materialize()
            params = [self.ctx.trainable[p] for p in use.params]
            vjp = self._chain_vjp(use, env, params)
            for key, g in zip(use.params, torch.func.vmap(vjp)(grads_v)):
                total[key] = total[key] + g if key in total else g
        return total

    def _chain_vjp(self, use: ParamUse, env: dict, params: list[Node]):
        def chain(*values):
            return self._replay(use, env, dict(zip(params, values)))

        _, vjp = torch.func.vjp(chain, *(env_param(env, p) for p in params))
        return vjp

    # ---- book-keeping -----------------------------------------------------------------------

    def _clipped_sums(self, forms: dict, env: dict, clip: torch.Tensor, merged: dict) -> dict[str, torch.Tensor]:
        """Σ_i c_i ∇_W L_i for every trainable parameter, one contraction per use (per merged
        block for a shared parameter's concatenated uses)."""
        grads: dict[str, torch.Tensor] = {}
        done: set[int] = set()
        for comp in self.components:
            if id(comp) in merged:
                (key,) = comp.params
                with phase("book-keeping", comp.params):
                    shape = self.ctx.trainable[key].meta["val"].shape
                    grads[key] = sum(f.clipped_sum(clip).reshape(shape) for f in merged[id(comp)])
                done.update(comp.ids)
        for i, use in enumerate(self.uses):
            if i in done:
                continue
            with phase("book-keeping", use.params):
                in_value_space = forms[i].clipped_sum(clip)
                if use.chain_kind == "identity":
                    shape = self.ctx.trainable[use.params[0]].meta["val"].shape
                    # a sparse sum (nn.Embedding(sparse=True)) has the shape and cannot reshape
                    param_grads = [in_value_space if in_value_space.shape == shape else in_value_space.reshape(shape)]
                elif use.chain_kind == "transpose":
                    param_grads = [in_value_space.t()]
                else:
                    params = [self.ctx.trainable[p] for p in use.params]
                    param_grads = self._chain_vjp(use, env, params)(_dense(in_value_space))
                for key, g in zip(use.params, param_grads):
                    grads[key] = grads[key] + g if key in grads else g
        return grads


def _operand_axes(node: Node) -> dict[str, BatchAxis]:
    """Batch axis of each batched operand of `node` by schema name ("name.j" inside a list)."""
    axes = {}
    for name, value in argument_nodes(node).items():
        items = value if isinstance(value, (list, tuple)) else [value]
        for j, v in enumerate(items):
            if isinstance(v, Node) and isinstance(v.meta.get("fxclip_batch_axis"), BatchAxis):
                axes[name if v is value else f"{name}.{j}"] = v.meta["fxclip_batch_axis"]
    return axes


def _dense(x: torch.Tensor) -> torch.Tensor:
    return x.to_dense() if x.is_sparse else x


def env_param(env: dict, node: Node) -> torch.Tensor:
    return env[node].detach()


def _first_axis(axis):
    return axis[0] if isinstance(axis, tuple) else axis


def _disjoint(a, b) -> bool:
    if a is None or b is None:
        return False
    return not bool(torch.isin(a, b).any())


def _concatenable(forms) -> bool:
    if not all(isinstance(f, LinearForm) for f in forms):
        return False
    first = forms[0]
    return all(f.shape == first.shape and f.left.k == first.left.k and f.right.k == first.right.k for f in forms)


class OutputSlot(NamedTuple):
    """Where the backward delivers ∂L/∂z for one op output z, without keeping z alive (a graph
    edge, not the tensor: z's memory is freed as soon as the forward is done with it)."""

    edge: GradientEdge
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device

    def zeros(self) -> torch.Tensor:
        """∂L/∂z for an output the loss does not depend on."""
        return torch.zeros(self.shape, dtype=self.dtype, device=self.device)


# The step being run: called with (use node index, the op's outputs that require grad) by the
# forward, the only time those tensors exist (a hook on one is how the step acts in the backward).
_OUTPUT_TAP: ContextVar = ContextVar("fxclip_output_tap", default=None)


def output_slots(value, k: int) -> list[OutputSlot]:
    """An OutputSlot for each tensor of use node k's output that requires grad."""
    items = value if isinstance(value, (tuple, list)) else [value]
    outputs = [z for z in items if isinstance(z, torch.Tensor) and z.requires_grad]
    tap = _OUTPUT_TAP.get()
    if tap is not None:
        tap(k, outputs)
    return [OutputSlot(get_gradient_edge(z), z.shape, z.dtype, z.device) for z in outputs]


def _with_extra_outputs(gm: GraphModule, saved: list[Node], tapped: list[Node]) -> GraphModule:
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


def emit(gm: GraphModule, ctx: Context) -> GraphModule:
    """Guarantees: `ctx.program` is a StepProgram over `gm`, whose forward now also returns every
    value a rule or a parameter chain reads."""
    ctx.program = StepProgram(gm, ctx)
    return ctx.program.forward
