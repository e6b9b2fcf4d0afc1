"""The public entry point: `transform(model, loss_fn, max_grad_norm)` -> a private training step."""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

import torch
import torch.utils._pytree as pytree

from .batch import run_in_chunks
from .batch_checks import checked_batch, raise_if_an_empty_batch_fails, raise_if_not_finite

# TRACE_AFTER_STEPS, public: the steps a capture runs before compile=False traces its step graph
from .captures import TRACE_AFTER_STEPS as TRACE_AFTER_STEPS
from .captures import Capture, CaptureCache
from .clipping import AUTOMATIC_GAMMA, Clipping, sensitivity
from .errors import FxclipError
from .options import StepOptions
from .passes import StepProgram
from .passes.capture import reject_batch_statistics
from .passes.program import BoundStep
from .physical_batch import PhysicalBatchSizer
from .sharded import sharded_model
from .verify import verify_step


@dataclass
class StepResult:
    """What one private step computed (all detached, one entry per example)."""

    losses: torch.Tensor
    norms: torch.Tensor  # ‖∇θ L_i‖ over all trainable parameters, before clipping
    clip_factors: torch.Tensor  # min(1, C / (norm + clipping.EPS)); automatic: C / (norm + γ); per_layer: [B, G]
    group_norms: torch.Tensor | None = None  # per_layer: ‖∇ L_i‖ over each group's parameters [B, G]
    groups: tuple[tuple[str, ...], ...] | None = None  # per_layer: each group's parameter names

    @property
    def batch_size(self) -> int:
        return self.losses.shape[0]


def transform(
    model: torch.nn.Module,
    loss_fn: Callable,
    max_grad_norm: float,
    *,
    batch_dims: Sequence[int] | None = None,
    strategy: str = "auto",
    verify: bool = False,
    memory_budget: float | None = None,
    compile: bool | str = False,
    max_physical_batch_size: int | str | None = None,
    cuda_graphs: bool | None = None,
    clipping: str = "flat",
    automatic_gamma: float = AUTOMATIC_GAMMA,
    memory_limit: float | None = None,
) -> "PrivateStep":
    """Make `model` trainable with per-example clipping.

    loss_fn(output, targets) must return one loss per example ([B]). `batch_dims` gives, per model
    input, the dim that holds the batch (default 0 for each). `strategy` forces "ghost" or
    "materialize" for every linear-form parameter; "auto" picks per parameter from the cost
    formulas. `verify=True` checks the first step against the torch.func reference.
    `memory_budget` (elements per example) makes "auto" prefer strategies that fit.
    `compile=False` runs the first steps of each capture by fxclip's step program, then traces
    the step into one graph and runs it op by op (the same ops, less Python, each value freed
    after its last use; fxclip/passes/compile.py, backend "python").
    `compile=True` traces the whole step into one graph and compiles it with torch.compile
    (fxclip/passes/compile.py): same results to float32 tolerance, one compile for all batch sizes;
    compile="buckets" pads each batch to one of a few sizes compiled statically instead.
    `max_physical_batch_size` bounds memory: a larger batch is processed in chunks of at most
    that many examples, one program run each, whose clipped sums add up (exact: clipping is per
    example), so peak memory is that of the chunk, not of the batch (see docs/memory.md).
    `max_physical_batch_size="auto"` with `memory_limit=BYTES` picks the largest chunk whose step
    allocates at most BYTES above what the model and the batch hold, from steps measured on the
    first batch of each capture (fxclip/physical_batch.py). A keyword of its own, not
    `memory_budget`: that one counts elements per example for the strategy choice, known from the
    cost formulas before any step, while this one counts bytes the whole step allocates, known only
    by measuring it; one keyword in two units would make a number mean what another option says.
    A compiled step on CUDA is replayed from CUDA graphs, one per bucket of batch sizes (the
    batch is padded to it, as for compile="buckets"): one launch per step instead of one per
    kernel (on an H200, 2.1x-5.6x faster than without on the zoo, docs/benchmarks.md); `cuda_graphs=False`
    turns that off, `cuda_graphs=True` requires it (an error off CUDA).

    `clipping` is the style (fxclip/clipping.py): "flat" clips each example's whole gradient to
    `max_grad_norm` (min(1, C / (‖g_i‖ + 1e-6))); "automatic" scales it by C / (‖g_i‖ +
    `automatic_gamma`); "per_layer" takes `max_grad_norm` as a list with one bound per trainable
    parameter (model.parameters() order) or a dict {name: bound} whose names are parameters or
    modules (all their trainable parameters), or tuples of names for a group sharing one bound,
    and clips each group of each example to its bound. `t.sensitivity` is then sqrt(Σ_j C_j²),
    what one example can move the clipped sum by (C for the other styles): the noise's scale.

    A model wrapped in DistributedDataParallel is unwrapped (its `.module` is captured); the
    clipped sums are then all-reduced by `fxclip.distributed`, not by DDP. A model sharded by
    FSDP2's `fully_shard` steps on its gathered parameters and ends with sharded gradients, the sum
    over ranks (`fxclip.sharded`; see docs/distributed.md).
    Calling `step` inside `torch.autocast` runs the forward in reduced precision; norms, clip
    factors and clipped sums are accumulated in float32 (see docs/mixed_precision.md)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    options = StepOptions(
        max_grad_norm, batch_dims, strategy, verify, memory_budget, compile, max_physical_batch_size, cuda_graphs,
        clipping=clipping, automatic_gamma=automatic_gamma, memory_limit=memory_limit,
    )
    return PrivateStep(model, loss_fn, options)


def _differentiating(method):
    """`method` run with gradients enabled, also when called under torch.no_grad() or
    torch.inference_mode(): capturing and running the step differentiate. Tensors made in
    inference mode cannot be saved for backward, so those among the arguments are copied first."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with torch.inference_mode(False), torch.enable_grad():
            if any(isinstance(x, torch.Tensor) and x.is_inference() for x in pytree.tree_leaves((args, kwargs))):
                args, kwargs = pytree.tree_map(_normal_tensor, (args, kwargs))  # rebuilt only then: 28 us a step
            return method(self, *args, **kwargs)

    return run


def _normal_tensor(x):
    """An inference-mode tensor as a normal one (a copy), anything else as it is."""
    return x.clone() if isinstance(x, torch.Tensor) and x.is_inference() else x


class PrivateStep:
    """`step(inputs, targets)` accumulates Σ_i clip_i ∇θ L_i into each trainable `p.grad` (as
    `loss.backward()` accumulates), and returns the per-example losses and norms. Made by
    `transform`, whose keywords are `options`; `max_grad_norm` and `strategy` may change between
    steps."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable, options: StepOptions):
        if not callable(loss_fn):
            raise FxclipError(f"loss_fn must be a function (output, targets) -> per-example losses [B], got a {type(loss_fn).__name__}")
        if not isinstance(model, torch.nn.Module):
            raise FxclipError(f"model must be a torch.nn.Module, got a {type(model).__name__}; wrap a function in an nn.Module")
        reject_batch_statistics(model)  # before any step (capture checks it again, for a model changed since)
        self.model, self.loss_fn, self.options = model, loss_fn, options
        self._clipping_for: tuple | None = None  # (options, trainable names) -> (Clipping, bounds), the last ones
        if options.clipping == "per_layer":
            options.clipping_for(model)  # the bounds checked against the model before any step
        self._hooks: dict[int, Callable] = {}
        self._captures = CaptureCache(model, loss_fn)
        self._last: Capture | None = None  # the capture the last step ran
        self._sizers: dict[tuple, PhysicalBatchSizer] = {}  # by capture key, for max_physical_batch_size="auto"
        self._verified = False

    @property
    def max_grad_norm(self) -> float:
        """The clipping bound C (per_layer: the tuple or dict of bounds per group); may be changed
        between steps (a schedule, adaptive clipping), also when compiled, without recompiling."""
        return self.options.max_grad_norm

    @max_grad_norm.setter
    def max_grad_norm(self, value) -> None:
        options = dataclasses.replace(self.options, max_grad_norm=value)
        options.clipping_for(self.model)  # a per_layer bound checked against the model before it is kept
        self.options = options

    @property
    def sensitivity(self) -> float:
        """How far one example can move the clipped sum (the L2 norm): C for flat and automatic
        clipping, sqrt(Σ_j C_j²) over the groups for per_layer. Noise is calibrated to it: pass it
        as `max_grad_norm` to `fxclip.optim.PrivateOptimizer`."""
        clipping, bounds = self._clipping(_trainable(dict(self.model.named_parameters())))
        return sensitivity(clipping.style, bounds)

    @property
    def clip_settings(self) -> tuple[Clipping, float | tuple[float, ...]]:
        """(the step's `clipping.Clipping`, the bound its program takes: C, or one per group), for
        the model as it is now: what `program(flat_args, bound, strategy, clipping=...)` needs."""
        clipping, bounds = self._clipping(_trainable(dict(self.model.named_parameters())))
        return clipping, _bound_arg(clipping, bounds)

    def register_step_hook(self, hook: Callable) -> StepHookHandle:
        """`hook(result: StepResult)` is called after every step with its result (adaptive
        clipping counts the examples a bound left unclipped this way); `handle.remove()` ends it."""
        if not callable(hook):
            raise FxclipError(f"a step hook must be a function of the StepResult, got a {type(hook).__name__}")
        handle = StepHookHandle(self._hooks)
        self._hooks[handle.id] = hook
        return handle

    @property
    def strategy(self) -> str:
        """"auto", "ghost" or "materialize"; may be changed between steps (a traced or compiled step is
        then traced and compiled again)."""
        return self.options.strategy

    @strategy.setter
    def strategy(self, value: str) -> None:
        self.options = dataclasses.replace(self.options, strategy=value)

    @property
    def verify(self) -> bool:
        """Whether the next step is checked against the reference (verify=True: the first graph step)."""
        return self.options.verify and not self._verified

    @_differentiating
    def step(self, inputs, targets) -> StepResult:
        inputs, batch, dims = checked_batch(inputs, targets, self.options.batch_dims)
        params = dict(self.model.named_parameters())
        trainable = _trainable(params)
        clipping, bounds = self._clipping(trainable)
        clipped = partial(self._clipped, targets=targets, batch=batch, dims=dims, clipping=clipping, bounds=bounds)
        sharded = sharded_model(self.model)
        if sharded is None:
            result, grads = clipped(inputs, params=params)
        else:  # FSDP2: on the gathered parameters, the sums reduce-scattered onto the shards (fxclip.sharded)
            result, grads = sharded.step(clipped, inputs)
            trainable = _trainable(dict(self.model.named_parameters()))  # the sharded ones, registered again
        _accumulate(trainable, grads)
        return self._result(result)

    def _clipped(
        self, inputs: tuple, targets, batch: int, dims: tuple, clipping: Clipping, bounds: tuple, params: dict | None = None
    ) -> tuple[StepResult, dict]:
        """The step's result and each trainable parameter's clipped sum (by name; none for an
        empty batch), written nowhere yet. `params`: the model's named parameters (read here when
        FSDP2 has just gathered them)."""
        params = dict(self.model.named_parameters()) if params is None else params
        groups = clipping.groups if clipping.per_group else None
        if batch == 0:
            if not self._captures.has(inputs, targets, dims):  # a capture has these shapes: they fit
                raise_if_an_empty_batch_fails(self.model, self.loss_fn, inputs, targets, dims)
            empty, per_group = torch.zeros(0), None if groups is None else torch.zeros(0, len(groups))
            return StepResult(empty, empty, empty if groups is None else per_group, per_group, groups), {}
        capture = self._captures.get(inputs, targets, dims, self.options)
        try:
            output = self._run(capture, inputs, targets, dims, batch, params, clipping, bounds)
        except BaseException:
            self._captures.discard_unless_completed(capture)
            raise
        capture.step_completed()
        self._last = capture
        if self.verify and capture.step.verifiable:
            verify_step(capture.step, inputs, targets, dims, _bound_arg(clipping, bounds), self.strategy, clipping=clipping)
            self._verified = True
        return StepResult(output.losses, output.norms, output.clip_factors, output.group_norms, groups), output.grads

    def _result(self, result: StepResult) -> StepResult:
        for hook in list(self._hooks.values()):
            hook(result)
        return result

    def _clipping(self, trainable: dict) -> tuple[Clipping, tuple[float, ...]]:
        """The step's Clipping and bounds (`StepOptions.clipping_for`), kept while the options and
        the trainable parameters stay."""
        key = (self.options, tuple(trainable))
        if self._clipping_for is None or self._clipping_for[0] != key:
            self._clipping_for = (key, self.options.clipping_for(self.model))
        return self._clipping_for[1]

    def _run(self, capture: Capture, inputs: tuple, targets, dims: tuple, batch: int, params: dict, clipping: Clipping, bounds: tuple):
        """The batch's StepOutput, in physical batches of at most max_physical_batch_size
        examples (and the capture's batch limit); again with float64 norms if one overflowed."""
        if self.options.max_physical_batch_size == "auto":
            sizer = self._sizers.setdefault(capture.key, PhysicalBatchSizer(self.options.memory_limit, capture.step.batch_limit))
            in_pieces = sizer.run
        else:
            size = min(self.options.max_physical_batch_size or batch, capture.step.batch_limit or batch)
            in_pieces = partial(run_in_chunks, size=size)
        step = partial(capture, max_grad_norm=_bound_arg(clipping, bounds), strategy=self.strategy, params=params, clipping=clipping)

        def run(safe: bool):
            return in_pieces(partial(step, safe=safe), inputs, targets, dims, batch)

        output = run(False)
        # a sum is finite iff its terms are (or it overflowed: the exact check sorts that out): two
        # reductions and one device sync instead of elementwise checks
        if not math.isfinite(float(output.losses.sum() + output.norms.sum())):
            raise_if_not_finite(inputs, output.losses)
            if not torch.isfinite(output.norms).all():
                # a ghost norm overflowed or cancelled below zero in the working precision
                # (forms.ghost_norm_sq): the step again, its norms in float64 of scaled values
                output = run(True)
                raise_if_not_finite(inputs, output.losses, output.norms)
        return output

    @_differentiating
    def bind(self, inputs, targets) -> BoundStep:
        """This batch bound to its capture's program (captured if new, checked as `step` checks
        it): `BoundStep(program, flat_args, placeholders, batch_dims)`, what explain and graph run
        or trace. Writes no gradient and leaves `program` as it was."""
        inputs, _, dims = checked_batch(inputs, targets, self.options.batch_dims)
        if sharded_model(self.model) is not None:
            raise FxclipError(
                "this model is sharded by FSDP2 (fully_shard), and a dry run (bind, explain or graph on a batch) "
                "would have to gather its parameters on every rank: run t.step(...) and then t.explain() "
                "without a batch, which shows the last step's plan"
            )
        return self._captures.get(inputs, targets, dims, self.options).step.bind(inputs, targets)

    @_differentiating
    def explain(self, inputs=None, targets=None):
        """What fxclip does for each trainable parameter, as a table (`print(t.explain())`): the
        ops that use it, the rule and its source, the strategy, the cost formulas and their values,
        the extra memory. From a dry run on (inputs, targets) if given (no gradients are written),
        else from the last step. See `fxclip.explain`."""
        from .tools.explain import explain

        return explain(self, inputs, targets)

    @_differentiating
    def graph(self, inputs, targets):
        """One step on this batch traced into a `fxclip.graph_view.StepGraph` (readable code with
        `.code()`, graphviz DOT with `.to_dot()`, a picture with `.render(path)`); pure."""
        from .tools.graph_view import step_graph

        return step_graph(self, inputs, targets)

    @property
    def captures(self) -> list[Capture]:
        """Every capture kept, oldest first: its `key` and the `step` that runs its batches (a
        `captures.GraphStep`, with `program` and `compiled`, or the `WholeModelStep`)."""
        return self._captures.captures()

    @property
    def physical_batch_size(self) -> int | None:
        """With max_physical_batch_size="auto": the physical batch size the last step's capture
        measured to fit memory_limit (None before that is known)."""
        sizer = self._sizers.get(self._last.key) if self._last is not None else None
        return sizer.size if sizer is not None else None

    @property
    def fallbacks(self) -> list[str]:
        """'<param> in <op> (<module>)' for each parameter use that no rule covers (fallback)."""
        return [f for capture in self.captures for f in capture.step.fallbacks]

    @property
    def program(self) -> StepProgram:
        """The step program of the last step's capture (its plan says what that step did)."""
        if self._last is None:
            raise FxclipError("no step has run yet: call step(inputs, targets) first")
        return self._last.step.program


class StepHookHandle:
    """What `PrivateStep.register_step_hook` returns: `remove()` unregisters the hook."""

    _next_id = 0

    def __init__(self, hooks: dict):
        self._hooks, self.id = hooks, StepHookHandle._next_id
        StepHookHandle._next_id += 1

    def remove(self) -> None:
        self._hooks.pop(self.id, None)


def _bound_arg(clipping: Clipping, bounds: tuple[float, ...]):
    """The bound a step takes: C (a float), or the tuple of per-group bounds."""
    return bounds if clipping.per_group else bounds[0]


def _trainable(params: dict) -> dict:
    trainable = {k: p for k, p in params.items() if p.requires_grad}
    if not trainable:
        raise FxclipError("the model has no trainable parameter (requires_grad=True): there is nothing to clip or train")
    made_in_inference = [k for k, p in trainable.items() if p.is_inference()]
    if made_in_inference:
        raise FxclipError(
            f"parameter {made_in_inference[0]!r} was made under torch.inference_mode(), so autograd cannot "
            "differentiate with respect to it; build or load the model outside inference mode"
        )
    return trainable


def _accumulate(trainable: dict, grads: dict) -> None:
    for key, p in trainable.items():
        g = grads.get(key)
        if g is None:
            g = torch.zeros_like(p)
        else:
            g = g if g.dtype == p.dtype else g.to(p.dtype)
            g = g if g.shape == p.shape else g.reshape(p.shape)  # a sparse g has p's shape
        # not a view: model.double() would convert a view's dtype but not its base's, which
        # export (the next capture) then refuses
        p.grad = g.detach() if p.grad is None else p.grad + g
