"""A PrivateStep's captures: one per capture key, each with the step that runs a batch for it.

`CaptureCache.get` returns the `Capture` of a batch's key (`fxclip.capture_key`), capturing the
model when the key is new. What runs a batch is a `GraphStep` (the passes' StepProgram, or its
CompiledStep) or, where the graph path does not cover the model, a `WholeModelStep`; both are
called the same way and return a StepOutput. Which one a capture gets is decided here, at capture
(torch.export fails, a pass raises NotCovered) and while running (a rule raises NotCovered).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Protocol

import torch

from .batch_checks import raise_if_the_batch_fails
from .capture_key import capture_key, key_change
from .clipping import FLAT, Clipping, StepOutput
from .errors import ExampleMixingError, FxclipError, NotCovered
from .options import StepOptions
from .passes import Context, StepProgram, run_passes
from .passes.capture import ExportFailed, graph_inputs
from .passes.compile import CompiledStep, CompileFailed
from .passes.program import BoundStep
from .provenance import where
from .reference import mixing_found
from .whole_model import FallbackWarning, WholeModelStep

# captures of one model after which each new one warns (a model whose Python state changes every step)
RECAPTURE_WARNING = 8


class Step(Protocol):
    """What runs one physical batch of a capture: a GraphStep or a WholeModelStep. `params`: the
    model's named parameters, when the caller has them (one walk of the module tree per step);
    `clipping`: the style (and per_layer groups) that `max_grad_norm` bounds."""

    batch_limit: int | None  # the largest batch it holds at once, if bounded
    verifiable: bool  # whether verify=True compares it with the torch.func reference
    fallbacks: list[str]  # the parameter uses it covers by a fallback, in words
    compiled: CompiledStep | None  # the compiled step, once a compiled step ran
    steps_completed: int  # steps that completed on it (a GraphStep traces its graph after a few)
    program: StepProgram  # the graph's program (the WholeModelStep raises: it has none)

    def __call__(
        self, inputs: tuple, targets, max_grad_norm, strategy: str, safe: bool = False, params: dict | None = None, clipping: Clipping = FLAT
    ) -> StepOutput: ...

    def bind(self, inputs: tuple, targets, params: dict | None = None) -> BoundStep: ...


# Completed steps of a capture after which its non-compiled step is traced into the step graph
# and run as Python code (CompiledStep, backend "python"): a trace costs tens to hundreds of steps
# (0.4 s for the zoo MLP, 13 s for the GRU's unrolled recurrence, on this project's 2-core CPU),
# which a run of a few steps (a dry run, a test) would not win back. Counted in whole steps, so
# that the physical batches of one step (max_physical_batch_size="auto" measures them) all run
# the same way.
TRACE_AFTER_STEPS = 2


class GraphStep:
    """The captured graph's step: the model's state and the batch bound to the graph's inputs,
    run by the StepProgram or by a CompiledStep of it (`compiled`): inductor's from the first
    step when compiling, else the step graph run as Python code once TRACE_AFTER_STEPS steps
    completed on it. If compiling or tracing fails, `compile_failed` is set and the
    program runs this capture (with a warning when compiling was asked for)."""

    verifiable = True

    def __init__(self, model: torch.nn.Module, loss_fn, ctx: Context, program: StepProgram, options: StepOptions):
        self.model, self.loss_fn, self.program = model, loss_fn, program
        self.exported = ctx.exported  # the captured graph, as torch.export made it
        self.placeholders, self.batch_dims, self.batch_limit = ctx.placeholders, ctx.batch_dims, ctx.batch_limit
        self.fallback_uses = list(ctx.fallbacks)  # the ParamUses the per-op fallback covers
        self.compile, self.batch_mode, self.cuda_graphs = options.compile, options.batch_mode, options.cuda_graphs
        self.compiled: CompiledStep | None = None
        self.compile_failed = False
        self.steps_completed = 0

    @property
    def fallbacks(self) -> list[str]:
        return [f"{u.params} at {where(u.node)}" for u in self.fallback_uses]

    def bind(self, inputs: tuple, targets, params: dict | None = None) -> BoundStep:
        flat_args = graph_inputs(self.placeholders, self.model, self.exported.constants, inputs, targets, params)
        return BoundStep(self.program, flat_args, self.placeholders, self.batch_dims)

    def __call__(
        self, inputs: tuple, targets, max_grad_norm, strategy: str, safe: bool = False, params: dict | None = None, clipping: Clipping = FLAT
    ) -> StepOutput:
        """The step on one physical batch, by the program when `safe` (its float64 norms)."""
        bound = self.bind(inputs, targets, params)
        try:
            if not safe and (graph := self._graph_step(bound, max_grad_norm, strategy, clipping)) is not None:
                try:
                    return graph(bound.flat_args, max_grad_norm)
                except CompileFailed as e:  # the same step by the program: slower, same results
                    if self.compile:
                        warnings.warn(f"{e}; the step runs eagerly instead (compile=False)", stacklevel=5)
                    self.compiled, self.compile_failed = None, True
            return self.program(bound.flat_args, max_grad_norm, strategy, safe, clipping)
        except FxclipError:
            raise
        except Exception:  # torch's error from inside the step: the batch's fault, or fxclip's
            raise_if_the_batch_fails(self.model, self.loss_fn, inputs, targets)
            raise

    def _graph_step(self, bound: BoundStep, max_grad_norm, strategy: str, clipping: Clipping) -> CompiledStep | None:
        """The CompiledStep that runs this batch, made for the strategy and clipping asked for
        (per_layer groups are traced in); None: the program runs it."""
        if self.compile_failed or not (self.compile or self.steps_completed >= TRACE_AFTER_STEPS):
            return None
        made = self.compiled
        if made is None or made.clipping != clipping or made.strategy != strategy:
            backend = "inductor" if self.compile else "python"
            self.compiled = CompiledStep(
                bound, max_grad_norm, strategy, self.batch_mode, cuda_graphs=self.cuda_graphs, clipping=clipping, backend=backend
            )
        return self.compiled


@dataclass
class Capture:
    """One capture of the model: its key and the step that runs its batches; called like that
    step. A rule that finds its op not covered when it runs hands the capture to the whole model."""

    key: tuple
    step: Step
    completed: bool = False  # a step on it completed (one whose first step fails is not kept)

    def step_completed(self) -> None:
        """A step on this capture completed: the capture is kept, and its step counts the step."""
        self.completed = True
        self.step.steps_completed += 1

    def __call__(
        self, inputs: tuple, targets, max_grad_norm, strategy: str, safe: bool = False, params: dict | None = None, clipping: Clipping = FLAT
    ) -> StepOutput:
        try:
            return self.step(inputs, targets, max_grad_norm, strategy, safe, params, clipping)
        except NotCovered as e:  # a rule found, when it ran, an op it does not cover
            self.step = _whole_model(e, self.step.model, self.step.loss_fn, self.step.batch_dims)
            return self.step(inputs, targets, max_grad_norm, strategy, clipping=clipping)


class CaptureCache:
    """The captures of one model and loss, by capture key."""

    def __init__(self, model: torch.nn.Module, loss_fn):
        self.model, self.loss_fn = model, loss_fn
        self._by_key: dict[tuple, Capture] = {}
        self._last_key: tuple | None = None  # the key of the last batch asked for (for the warning)

    def captures(self) -> list[Capture]:
        return list(self._by_key.values())

    def has(self, inputs: tuple, targets, dims: tuple[int, ...]) -> bool:
        return capture_key(self.model, self.loss_fn, inputs, targets, dims) in self._by_key

    def get(self, inputs: tuple, targets, dims: tuple[int, ...], options: StepOptions) -> Capture:
        """The capture for this batch, made (and kept) if its key is new."""
        key = capture_key(self.model, self.loss_fn, inputs, targets, dims)
        last, self._last_key = self._last_key, key
        if key not in self._by_key:
            if len(self._by_key) >= RECAPTURE_WARNING:
                warnings.warn(
                    f"fxclip captured this model {len(self._by_key)} times: {key_change(last, key)}. "
                    "Each change of what a capture fixes (sizes other than the batch, module attributes, "
                    "trainable parameters: fxclip.capture_key) captures again, which takes seconds; keep "
                    "them fixed between steps (pad sequences to a few lengths).",
                    stacklevel=4,
                )
            self._by_key[key] = Capture(key, _build(self.model, self.loss_fn, inputs, targets, dims, options))
        return self._by_key[key]

    def discard_unless_completed(self, capture: Capture) -> None:
        """A capture whose first step failed is not kept (the batch may be what was wrong)."""
        if not capture.completed:
            self._by_key.pop(capture.key, None)


def _build(model, loss_fn, inputs: tuple, targets, dims: tuple[int, ...], options: StepOptions) -> Step:
    """The passes on this batch, giving a GraphStep; or the whole-model step where torch.export
    cannot capture the model (unless the batch itself fails) or a pass finds a part it does not
    cover (NotCovered). The graph is checked to hold no op that mixes examples unnoticed."""
    ctx = Context(model=model, loss_fn=loss_fn, example_inputs=inputs, example_targets=targets, batch_dims=dims, memory_budget=options.memory_budget)
    try:
        program = run_passes(ctx)
    except NotCovered as e:
        if isinstance(e, ExportFailed):
            raise_if_the_batch_fails(model, loss_fn, inputs, targets)
        return _whole_model(e, model, loss_fn, dims)
    try:
        found = mixing_found(model, loss_fn, inputs, targets, dims)
    except ExampleMixingError:  # undecided: if the batch itself is at fault, say that instead
        raise_if_the_batch_fails(model, loss_fn, inputs, targets)
        raise
    if found:  # the graph holds no op known to mix examples, yet the losses say they mix
        raise ExampleMixingError(
            f"{found}, though no op in the graph is known to mix examples: some op works "
            "across the batch dim (torch.renorm over a feature dim caps each feature's norm "
            "over the batch). Keep every op within an example; check batch_dims."
        )
    return GraphStep(model, loss_fn, ctx, program, options)


def _whole_model(reason: NotCovered, model, loss_fn, dims: tuple[int, ...]) -> WholeModelStep:
    """The whole-model step, with a warning that says why."""
    warnings.warn(
        f"{reason}\nfxclip takes the whole-model fallback: per-example gradients of the whole model "
        "by torch.func (or one backward per example), exact but slower, and without "
        "explain(), graph() or compilation (fxclip.whole_model).",
        FallbackWarning,
        stacklevel=5,
    )
    return WholeModelStep(model, loss_fn, dims, str(reason))
