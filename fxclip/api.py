"""The public entry point: `transform(model, loss_fn, max_grad_norm)` -> a private training step."""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.utils._pytree as pytree

from .batch import select_examples
from .capture_key import capture_key, key_change
from .checks import check_bool, check_integer, check_number
from .errors import ExampleMixingError, FxclipError, NotCovered, VerificationError, describe
from .passes import Context, StepProgram, run_passes
from .passes.capture import ExportFailed, reject_batch_statistics
from .passes.compile import BATCH_MODES, CompiledStep, CompileFailed
from .reference import mixing_found, rng_forked
from .whole_model import FallbackWarning, WholeModelStep

STRATEGIES = ("auto", "ghost", "materialize")


@dataclass
class StepResult:
    """What one private step computed (all detached, one entry per example)."""

    losses: torch.Tensor
    norms: torch.Tensor  # ‖∇θ L_i‖ over all trainable parameters, before clipping
    clip_factors: torch.Tensor  # min(1, C / (norm + clipping.EPS))

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
    max_physical_batch_size: int | None = None,
    cuda_graphs: bool | None = None,
) -> "PrivateStep":
    """Make `model` trainable with per-example clipping.

    loss_fn(output, targets) must return one loss per example ([B]). `batch_dims` gives, per model
    input, the dim that holds the batch (default 0 for each). `strategy` forces "ghost" or
    "materialize" for every linear-form parameter; "auto" picks per parameter from the cost
    formulas. `verify=True` checks the first step against the torch.func reference.
    `memory_budget` (elements per example) makes "auto" prefer strategies that fit.
    `compile=True` traces the whole step into one graph and compiles it with torch.compile
    (fxclip/passes/compile.py): same results to float32 tolerance, one compile for all batch sizes;
    compile="buckets" pads each batch to one of a few sizes compiled statically instead.
    `max_physical_batch_size` bounds memory: a larger batch is processed in chunks of at most
    that many examples, one program run each, whose clipped sums add up (exact: clipping is per
    example), so peak memory is that of the chunk, not of the batch (see docs/memory.md).
    A compiled step on CUDA is replayed from CUDA graphs, one per bucket of batch sizes (the
    batch is padded to it, as for compile="buckets"): one launch per step instead of one per
    kernel (on an H200, 2.1x-5.6x faster than without on the zoo, docs/benchmarks.md); `cuda_graphs=False`
    turns that off, `cuda_graphs=True` requires it (an error off CUDA).

    A model wrapped in DistributedDataParallel is unwrapped (its `.module` is captured); the
    clipped sums are then all-reduced by `fxclip.distributed`, not by DDP (see docs/distributed.md).
    Calling `step` inside `torch.autocast` runs the forward in reduced precision; norms, clip
    factors and clipped sums are accumulated in float32 (see docs/mixed_precision.md)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return PrivateStep(
        model, loss_fn, max_grad_norm, batch_dims, strategy, verify, memory_budget, compile, max_physical_batch_size,
        cuda_graphs,
    )


def _differentiating(method):
    """`method` run with gradients enabled, also when called under torch.no_grad() or
    torch.inference_mode(): capturing and running the step differentiate. Tensors made in
    inference mode cannot be saved for backward, so those among the arguments are copied first."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with torch.inference_mode(False), torch.enable_grad():
            args, kwargs = pytree.tree_map(_normal_tensor, (args, kwargs))
            return method(self, *args, **kwargs)

    return run


def _normal_tensor(x):
    """An inference-mode tensor as a normal one (a copy), anything else as it is."""
    return x.clone() if isinstance(x, torch.Tensor) and x.is_inference() else x


# captures of one model after which each new one warns (a model whose Python state changes every step)
RECAPTURE_WARNING = 8


class PrivateStep:
    """`step(inputs, targets)` accumulates Σ_i clip_i ∇θ L_i into each trainable `p.grad` (as
    `loss.backward()` accumulates), and returns the per-example losses and norms."""

    def __init__(
        self, model, loss_fn, max_grad_norm, batch_dims, strategy, verify, memory_budget, compile=False,
        max_physical_batch_size=None, cuda_graphs=None,
    ):
        self.max_grad_norm = max_grad_norm
        if not callable(loss_fn):
            raise FxclipError(f"loss_fn must be a function (output, targets) -> per-example losses [B], got a {type(loss_fn).__name__}")
        if strategy not in STRATEGIES:
            raise FxclipError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if not isinstance(compile, bool) and compile not in BATCH_MODES:
            raise FxclipError(f"compile must be True, False or a batch mode {BATCH_MODES}, got {compile!r}")
        if cuda_graphs is not None and not isinstance(cuda_graphs, bool):
            raise FxclipError(f"cuda_graphs must be None (on CUDA when compiled), True or False, got {cuda_graphs!r}")
        if cuda_graphs and not compile:
            raise FxclipError("cuda_graphs=True replays the compiled step: pass compile=True (or a batch mode) too")
        if max_physical_batch_size is not None:
            max_physical_batch_size = check_integer(
                "max_physical_batch_size", max_physical_batch_size, at_least=1,
                hint="Or None: each batch in one piece.", error=FxclipError,
            )
        if not isinstance(model, torch.nn.Module):
            raise FxclipError(f"model must be a torch.nn.Module, got a {type(model).__name__}; wrap a function in an nn.Module")
        if batch_dims is not None and (
            not isinstance(batch_dims, Sequence) or isinstance(batch_dims, str)
            or not all(isinstance(d, int) and not isinstance(d, bool) for d in batch_dims)
        ):
            raise FxclipError(f"batch_dims must be a sequence of ints, one per model input (e.g. (1,)), got {batch_dims!r}")
        if memory_budget is not None:
            memory_budget = check_number(
                "memory_budget", memory_budget, above=0, hint="It counts elements per example.", error=FxclipError
            )
        check_bool("verify", verify, error=FxclipError)
        reject_batch_statistics(model)
        self.model = model
        self.loss_fn = loss_fn
        self.batch_dims = None if batch_dims is None else tuple(batch_dims)
        self.strategy = strategy
        self.verify = verify
        self.memory_budget = memory_budget
        self.compile = compile
        self.max_physical_batch_size = max_physical_batch_size
        self.cuda_graphs = cuda_graphs
        self._compiled: dict[tuple, CompiledStep] = {}  # by the same key as _programs
        # by capture_key (what a capture fixes: sizes but the batch, module state, autocast ...);
        # a model export cannot capture gets (None, WholeModelStep)
        self._programs: dict[tuple, tuple[Context | None, StepProgram | WholeModelStep]] = {}
        self._last_key: tuple | None = None
        self._stepped: set[tuple] = set()  # keys whose program completed a step

    # ---- public -----------------------------------------------------------------------------

    @property
    def max_grad_norm(self) -> float:
        """The clipping bound C; may be changed between steps (a schedule), also when compiled."""
        return self._max_grad_norm

    @max_grad_norm.setter
    def max_grad_norm(self, value) -> None:
        self._max_grad_norm = check_number("max_grad_norm", value, above=0, hint="It is the clip bound C.", error=FxclipError)

    @_differentiating
    def step(self, inputs, targets) -> StepResult:
        inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
        batch = self._check_inputs(inputs, targets)
        params = dict(self.model.named_parameters())
        trainable = {k: p for k, p in params.items() if p.requires_grad}
        if not trainable:
            raise FxclipError("the model has no trainable parameter (requires_grad=True): there is nothing to clip or train")
        made_in_inference = [k for k, p in trainable.items() if p.is_inference()]
        if made_in_inference:
            raise FxclipError(
                f"parameter {made_in_inference[0]!r} was made under torch.inference_mode(), so autograd cannot "
                "differentiate with respect to it; build or load the model outside inference mode"
            )
        if batch == 0:
            self._check_empty_batch(inputs, targets)
            empty = torch.zeros(0)
            self._accumulate(trainable, {})
            return StepResult(empty, empty, empty)
        self._program(inputs, targets)
        try:
            losses, norms, clip, grads = self._run_batch(inputs, targets, batch, params)
            # A sum is finite iff its terms are (or it overflowed: the exact check sorts that out);
            # two reductions and one device sync (a GPU step runs ahead of Python until here)
            # instead of elementwise checks, which cost more than a small step's math.
            if not math.isfinite(float(losses.sum() + norms.sum())):
                _raise_if_not_finite(inputs, losses)
                if not torch.isfinite(norms).all():
                    # a ghost norm overflowed or cancelled below zero in the working precision
                    # (forms.ghost_norm_sq): the step again, its norms in float64 of scaled values
                    losses, norms, clip, grads = self._run_batch(inputs, targets, batch, params, safe=True)
                    _raise_if_not_finite(inputs, losses, norms)
        except BaseException:
            if self._last_key not in self._stepped:  # a capture that never completed a step is not kept
                self._programs.pop(self._last_key, None)
                self._compiled.pop(self._last_key, None)
            raise
        self._stepped.add(self._last_key)
        ctx, program = self._programs[self._last_key]
        if self.verify and ctx is not None:  # the whole-model fallback is the reference's own method
            self._verify(ctx, program, inputs, targets)
            self.verify = False
        self._accumulate(trainable, grads)
        return StepResult(losses, norms, clip)

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
    def fallbacks(self) -> list[str]:
        """'<param> in <op> (<module>)' for each parameter use that no rule covers (fallback)."""
        from .provenance import where

        found = []
        for ctx, program in self._programs.values():
            if ctx is None:
                found.append(f"the whole model ({program.reason.splitlines()[0]})")
            else:
                found += [f"{u.params} at {where(u.node)}" for u in ctx.fallbacks]
        return found

    @property
    def program(self) -> StepProgram:
        """The step program of the most recent capture (its plan says what the last step did)."""
        if self._last_key not in self._programs:
            raise FxclipError("no step has run yet: call step(inputs, targets) first")
        ctx, program = self._programs[self._last_key]
        if ctx is None:
            raise program.no_graph_error()
        return program

    # ---- internals --------------------------------------------------------------------------

    def _batch_dims(self, inputs) -> tuple[int, ...]:
        """batch_dims for these inputs, negative dims counted from the end of each input."""
        dims = (0,) * len(inputs) if self.batch_dims is None else self.batch_dims
        if len(dims) != len(inputs):
            raise FxclipError(f"batch_dims has {len(dims)} entries but the model gets {len(inputs)} inputs")
        return tuple(d + x.dim() if d < 0 and isinstance(x, torch.Tensor) else d for x, d in zip(inputs, dims))

    def _check_inputs(self, inputs, targets) -> int:
        dims = self._batch_dims(inputs)
        sizes = []
        for i, (x, d) in enumerate(zip(inputs, dims)):
            if not isinstance(x, torch.Tensor):
                raise FxclipError(f"input {i} is a {type(x).__name__}; step() takes tensors")
            if x.is_meta:
                raise FxclipError(f"input {i} is on the meta device, which holds shapes but no values; move the batch to a real device (x.to('cpu'))")
            if not 0 <= d < x.dim():
                given = (self.batch_dims or dims)[i]
                raise FxclipError(f"input {i} has shape {tuple(x.shape)}, which has no dim {given} for the batch")
            sizes.append(x.shape[d])
        for t in pytree.tree_leaves(targets):
            if isinstance(t, torch.Tensor):
                if t.is_meta:
                    raise FxclipError("the targets are on the meta device, which holds shapes but no values; move them to a real device")
                sizes.append(t.shape[0] if t.dim() else -1)
        if len(set(sizes)) != 1:
            raise FxclipError(
                f"inputs and targets disagree on the batch size: {sizes} (inputs along batch_dims={dims}, "
                "targets along dim 0)"
            )
        return sizes[0]

    def _check_empty_batch(self, inputs: tuple, targets) -> None:
        """An empty batch adds nothing, but its shapes must fit the model: they do if a capture
        has their key; else the model runs as plain PyTorch on one example of zeros shaped like
        them (an empty batch itself is no test: x.view(len(x), -1) fails on it)."""
        dims = self._batch_dims(inputs)
        if capture_key(self.model, self.loss_fn, inputs, targets, dims) in self._programs:
            return
        one = tuple(x.new_zeros((*x.shape[:d], 1, *x.shape[d + 1 :])) for x, d in zip(inputs, dims))
        ones = pytree.tree_map(lambda t: t.new_zeros((1, *t.shape[1:])) if isinstance(t, torch.Tensor) else t, targets)
        _raise_if_the_batch_fails(self.model, self.loss_fn, one, ones, "one example of zeros shaped like this empty batch")

    def _program(self, inputs, targets):
        dims = self._batch_dims(inputs)
        key = capture_key(self.model, self.loss_fn, inputs, targets, dims)
        if key not in self._programs and len(self._programs) >= RECAPTURE_WARNING:
            warnings.warn(
                f"fxclip captured this model {len(self._programs)} times: {key_change(self._last_key, key)}. "
                "Each change of what a capture fixes (sizes other than the batch, module attributes, "
                "trainable parameters: fxclip.capture_key) captures again, which takes seconds; keep "
                "them fixed between steps (pad sequences to a few lengths).",
                stacklevel=3,
            )
        self._last_key = key
        if key not in self._programs:
            ctx = Context(
                model=self.model,
                loss_fn=self.loss_fn,
                example_inputs=inputs,
                example_targets=targets,
                batch_dims=dims,
                memory_budget=self.memory_budget,
            )
            try:
                program = run_passes(ctx)
            except NotCovered as e:
                if isinstance(e, ExportFailed):
                    _raise_if_the_batch_fails(self.model, self.loss_fn, inputs, targets)
                self._fall_back(e, ctx.batch_dims)
                return self._programs[key]
            try:
                found = mixing_found(self.model, self.loss_fn, inputs, targets, ctx.batch_dims)
            except ExampleMixingError:  # undecided: if the batch itself is at fault, say that instead
                _raise_if_the_batch_fails(self.model, self.loss_fn, inputs, targets)
                raise
            if found:  # the graph holds no op known to mix examples, yet the losses say they mix
                raise ExampleMixingError(
                    f"{found}, though no op in the graph is known to mix examples: some op works "
                    "across the batch dim (torch.renorm over a feature dim caps each feature's norm "
                    "over the batch). Keep every op within an example; check batch_dims."
                )
            self._programs[key] = (ctx, program)
        return self._programs[key]

    def _fall_back(self, reason: NotCovered, batch_dims) -> None:
        """Give the current key the whole-model step, with a warning that says why."""
        warnings.warn(
            f"{reason}\nfxclip takes the whole-model fallback: per-example gradients of the whole model "
            "by torch.func (or one backward per example), exact but slower, and without "
            "explain(), graph() or compilation (fxclip.whole_model).",
            FallbackWarning,
            stacklevel=4,
        )
        self._programs[self._last_key] = (None, WholeModelStep(self.model, self.loss_fn, batch_dims, str(reason)))

    def _compiled_step(self, ctx: Context, program: StepProgram, flat_args: list) -> CompiledStep:
        if self._last_key not in self._compiled:
            kinds = [kind for kind, _ in ctx.placeholders]
            mode = self.compile if isinstance(self.compile, str) else "dynamic"
            self._compiled[self._last_key] = CompiledStep(
                program, flat_args, kinds, ctx.batch_dims, self.max_grad_norm, self.strategy, batch_mode=mode,
                cuda_graphs=self.cuda_graphs,
            )
        return self._compiled[self._last_key]

    def _run_batch(self, inputs, targets, batch: int, params: dict, safe: bool = False):
        """(losses, norms, clip factors, clipped sums) of the batch, one `_run` per physical batch."""
        runs = [self._run(chunk, params, safe) for chunk in self._chunks(inputs, targets, batch)]
        return runs[0] if len(runs) == 1 else _combine(runs)

    def _run(self, chunk: tuple, params: dict, safe: bool = False):
        """(losses, norms, clip factors, clipped sums) of one physical batch (inputs, targets), by
        the current key's program (eagerly when `safe`: StepProgram's float64 norms); a rule that
        finds its op not covered (NotCovered) hands this key to the whole-model fallback."""
        ctx, program = self._programs[self._last_key]
        if ctx is None:  # the whole-model fallback
            return program(*chunk, self.max_grad_norm)
        flat_args = self._flat_args(ctx, *chunk, params=params)
        try:
            if self.compile and not safe:
                try:
                    return self._compiled_step(ctx, program, flat_args)(flat_args, self.max_grad_norm)
                except CompileFailed as e:  # the same step, eagerly: slower, same results
                    warnings.warn(f"{e}; the step runs eagerly instead (compile=False)", stacklevel=3)
                    self.compile = False
            return program(flat_args, self.max_grad_norm, self.strategy, safe)
        except NotCovered as e:
            self._fall_back(e, ctx.batch_dims)
            return self._run(chunk, params)
        except Exception as e:
            if not isinstance(e, FxclipError):  # torch's error from inside the step
                _raise_if_the_batch_fails(self.model, self.loss_fn, *chunk)
            raise  # the model runs as plain PyTorch: fxclip's own failure

    def _chunks(self, inputs, targets, batch: int):
        """(inputs, targets) of each physical batch: slices of at most max_physical_batch_size
        examples (and at most the capture's batch limit) along each input's batch dim and the
        targets' dim 0."""
        ctx, _ = self._programs[self._last_key]
        limit = ctx.batch_limit if ctx is not None and ctx.batch_limit else batch
        size = min(self.max_physical_batch_size or batch, limit)
        if size >= batch:
            yield inputs, targets
            return
        dims = self._batch_dims(inputs)
        for start in range(0, batch, size):
            yield select_examples(inputs, targets, dims, start, min(size, batch - start))

    def _flat_args(self, ctx: Context, inputs, targets, params: dict | None = None) -> list:
        params = dict(self.model.named_parameters()) if params is None else params
        buffers = dict(self.model.named_buffers()) if any(kind == "buffer" for kind, _ in ctx.placeholders) else {}
        user = iter(pytree.tree_leaves((inputs, targets)))
        constants = ctx.exported.constants
        args = []
        for kind, key in ctx.placeholders:
            if kind == "param":
                args.append(params[key])
            elif kind == "buffer":
                args.append(buffers[key])
            elif kind == "constant":
                args.append(constants[key])
            else:
                args.append(next(user))
        return args

    def _accumulate(self, trainable: dict, grads: dict) -> None:
        for key, p in trainable.items():
            g = grads.get(key)
            if g is None:
                g = torch.zeros_like(p)
            else:
                g = g.to(p.dtype)  # no copy when it is p's
                g = g if g.shape == p.shape else g.reshape(p.shape)  # a sparse g has p's shape
            # not a view: model.double() would convert a view's dtype but not its base's, which
            # export (the next capture) then refuses
            p.grad = g.detach() if p.grad is None else p.grad + g

    def _verify(self, ctx: Context, program: StepProgram, inputs, targets, examples: int = 8) -> None:
        """Compare the first few examples' norms and clipped sum with the torch.func reference
        (or, for ops torch.func cannot run, a loop of one backward per example)."""
        from .reference import any_per_example_grads, clipped_sum

        random_ops = [n.target for n in ctx.exported.graph_module.graph.nodes if _draws_random_numbers(n)]
        if random_ops:
            raise VerificationError(
                f"verify=True needs a deterministic model, and this one draws random numbers ({random_ops[0]}): "
                "a reference cannot reproduce the batch's masks. Verify in eval() mode, or pass verify=False."
            )
        dims = self._batch_dims(inputs)
        k = min(examples, pytree.tree_leaves(targets)[0].shape[0])
        sub_inputs, sub_targets = select_examples(inputs, targets, dims, 0, k)
        _, norms, _, grads = program(self._flat_args(ctx, sub_inputs, sub_targets), self.max_grad_norm, self.strategy)
        ref, _ = any_per_example_grads(self.model, self.loss_fn, sub_inputs, sub_targets, dims)
        ref_norms, ref_clipped = clipped_sum(ref, self.max_grad_norm)
        tol = 1e-6 if norms.dtype == torch.float64 else 1e-3
        scale = ref_norms.abs().max().clamp(min=1e-12)
        if ((norms - ref_norms).abs() > tol * scale).any():
            raise VerificationError(f"per-example norms differ from the reference: fxclip {norms.tolist()} vs {ref_norms.tolist()}")
        bad = []
        for key, expected in ref_clipped.items():
            got = grads.get(key, torch.zeros_like(expected)).to_dense()  # sparse for nn.Embedding(sparse=True)
            if (got - expected).abs().max() > tol * max(float(expected.abs().max()), self.max_grad_norm):
                bad.append(key)
        if bad:
            raise VerificationError(f"clipped gradients differ from the reference for parameters {bad}")


def _draws_random_numbers(node: torch.fx.Node) -> bool:
    """Whether the op samples: a random op, but not a dropout that is the identity (p = 0 or eval
    mode, as Hugging Face models record theirs in eval mode) nor attention without dropout."""
    if not (isinstance(node.target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in node.target.tags):
        return False
    names = [a.name for a in node.target._schema.arguments]
    args = {**dict(zip(names, node.args)), **node.kwargs}
    if node.target in (torch.ops.aten.dropout.default, torch.ops.aten.native_dropout.default):
        return bool(args["train"]) and args["p"] != 0
    if node.target is torch.ops.aten.scaled_dot_product_attention.default:
        return args.get("dropout_p", 0.0) != 0
    return True


def _raise_if_the_batch_fails(model, loss_fn, inputs: tuple, targets, what: str = "this batch") -> None:
    """An error inside the step, or an export failure, may be the batch's fault (a wrong feature
    size or dtype, a label out of range): the model run as plain PyTorch on it fails too, and that
    error is the one to report, with its likely cause, not a fallback or fxclip's traceback."""
    with torch.no_grad(), rng_forked(inputs):
        try:
            out = model(*inputs)
        except Exception as e:
            cause = _dtype_cause(model, inputs, e) or _index_cause(inputs, e)
            failure, error = f"the model raises {describe(e).rstrip('.')}{cause}", e
        else:
            try:
                loss_fn(out, targets)
                return
            except Exception as e:
                failure, error = f"loss_fn raises {describe(e).rstrip('.')}{_index_cause(targets, e, out)}", e
    raise FxclipError(
        f"the model and loss_fn fail on {what} run as plain PyTorch: {failure}. Check the inputs, "
        "targets and batch_dims."
    ) from error


def _dtype_cause(model, inputs: tuple, error: Exception) -> str:
    """For an error about types: an input whose dtype is not the parameters' (one float dtype)."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if "type" not in str(error).lower() or len(dtypes) != 1:
        return ""
    (dtype,) = dtypes
    floats = [(i, x) for i, x in enumerate(inputs) if x.is_floating_point() and x.dtype != dtype]
    if floats:
        i, x = floats[0]
        return (
            f". Likely cause: input {i} is {x.dtype} but the model's parameters are {dtype}; convert one "
            f"to the other (x.to({dtype}) or model.to({x.dtype}))"
        )
    ints = [i for i, x in enumerate(inputs) if not (x.is_floating_point() or x.is_complex())]
    if ints:
        return (
            f". Likely cause: input {ints[0]} is {inputs[ints[0]].dtype} but the model computes in {dtype}; "
            f"pass {dtype} features (x.to({dtype})), or feed integer ids to an nn.Embedding first"
        )
    return ""


def _index_cause(values, error: Exception, output=None) -> str:
    """For an index error: the range of the integer tensors among `values` (the targets' class
    labels, given the model's output; else the inputs' ids)."""
    if not isinstance(error, IndexError) and "out of range" not in str(error) and "out of bounds" not in str(error):
        return ""
    ints = [
        t for t in pytree.tree_leaves(values)
        if isinstance(t, torch.Tensor) and t.numel() and not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)
    ]
    if not ints:
        return ""
    low, high = min(int(t.min()) for t in ints), max(int(t.max()) for t in ints)
    if output is None:
        return f". Likely cause: an index out of range, such as a token id beyond an embedding's rows: the integer inputs hold {low}..{high}"
    shape = f" and the model's output has shape {tuple(output.shape)}" if isinstance(output, torch.Tensor) else ""
    return f". Likely cause: a class label outside the output's classes: the targets hold {low}..{high}{shape}; labels must be 0..C-1"


def _raise_if_not_finite(inputs: tuple, losses: torch.Tensor, norms: torch.Tensor | None = None) -> None:
    """The error for a step whose losses or norms (if given) are not all finite, naming the
    cause: a NaN or infinity in an input (checked only here, so a step with finite results pays
    nothing for it), else the examples whose loss or norm is not finite."""
    for i, x in enumerate(inputs):
        if x.is_floating_point() and not torch.isfinite(x).all():
            raise FxclipError(f"input {i} contains NaN or infinite values; clean the data before the step")
    for name, values in (("loss", losses), ("gradient norm", norms)):
        if values is None:
            continue
        bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
        if bad:
            raise FxclipError(f"{name} is NaN or infinite for examples {bad[:10]}; no gradients were written")


def _combine(runs: list) -> tuple:
    """The physical batches' results as one batch's: per-example vectors concatenated, clipped
    sums added."""
    losses, norms, clip = (torch.cat([run[j] for run in runs]) for j in range(3))
    grads = dict(runs[0][3])
    for run in runs[1:]:
        for key, g in run[3].items():
            grads[key] = grads[key] + g if key in grads else g
    return losses, norms, clip, grads
