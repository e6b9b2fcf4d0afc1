"""compile (after the passes): the whole private step as one fx graph, compiled by inductor or run op by op.

`passes.program.run` is Python around a forward graph: one `torch.autograd.grad`, the
rules' forms, norms, clip factors and book-keeping contractions. `make_fx` traces all of it —
through autograd into explicit backward aten ops — into ONE fx graph, the *step graph*
(`CompiledStep.step_graph`, also what a user inspects), whose batch size is a symbol. Repeated
computations are merged (`fx_graph_cse`: uses whose op outputs are summed get one gradient, so
their factor concatenations and Gram products are the same ops). That graph goes to inductor
(`compile_fx`, torch.compile's backend, called directly: the graph is already aten ops, so Dynamo
would only add guard checks to every call), which fuses the forward, backward, norm terms and
contractions (C++ on a CPU, Triton on a GPU). With `backend="python"` (the non-compiled step,
`compile=False`, once a capture has run a few steps) the same graph runs as Python code, one
eager op per node (aten ops through their Python bindings, chains of views as one view, checked
on the first run: `_OpByOp`): none of the program's per-step Python (walking the plan, making
forms, choosing strategies), repeated products computed once, and each value freed after its
last use (the zoo's eager steps 1.1x-1.7x faster, and peak memory up to half lower, than the
program: docs/benchmarks.md). Each compiled graph is kept under its inputs' dtypes, devices,
ranks and memory formats; the generated code asserts their sizes and
strides, so a tensor in no dense format (a transposed or sliced view) is made contiguous first.

Not in `PASSES`: it needs real parameters and a batch, and runs on the first compiled step.

Batch sizes change every step under Poisson sampling. Two ways not to recompile for each:
  "dynamic"  the batch stays a symbol in the compiled code (one compile for every size >= 2;
             a batch of one is padded to two);
  "buckets"  the batch is padded up to a bucket size (8 buckets per power of two, so at most
             12.5% padding) and each bucket compiles once with static shapes.
If tracing fixes the batch size anyway (an op's fake kernel reads a concrete size: batched matmul
does on CUDA with torch 2.11; a vmap over examples that loops) or fails with it (lerp's fake
kernel cannot broadcast a symbolic size in torch 2.13), "dynamic" warns and falls back to
"buckets". If tracing or compiling fails otherwise, `CompileFailed` tells `PrivateStep` to warn
and run the step eagerly.
Padding rows copy the first example and get a per-example clipping bound of 0, hence a clip
factor of 0: they add nothing to the clipped sum, and their losses and norms are cut off before
the step returns. `python -m fxclip.bench --batch-modes` measures both (docs/benchmarks.md);
"dynamic" is the default: one compilation on the MLP against one per bucket, at a similar step
time. tests/test_compile.py counts one compilation per zoo model for two batch sizes.

On CUDA the compiled step is replayed from CUDA graphs (`_StepGraphs`; `cuda_graphs=None`, the
default, means "on CUDA"): one launch per step instead of one per kernel. A graph has fixed sizes,
so the batch is padded to its bucket as in "buckets" while the compilation stays the one
"dynamic" graph: a few recordings serve every batch size that Poisson sampling draws. On an H200
the zoo's compiled steps took 0.31x-1.00x the eager non-private step with graphs and 0.93x-4.75x
without (docs/gpu/benchmark.json).
"""

from __future__ import annotations

import copy
import math
import types
import warnings
from typing import Callable, Sequence

import sympy
import torch
import torch.utils._pytree as pytree
from torch._dispatch.python import enable_python_dispatcher
from torch._functorch.compile_utils import fx_graph_cse
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx import GraphModule
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

from ..capture_key import autocast_state
from ..clipping import FLAT, Clipping, StepOutput, bound_values
from ..errors import FxclipError, describe
from ..ops import gather_rows
from .program import BoundStep

BATCH_MODES = ("dynamic", "buckets")
BACKENDS = ("inductor", "python")

# Inductor settings for the step graph (a caller's `options` go on top): no layout optimization,
# since channels-last activations make the per-example conv kernel (examples as groups) copy and
# slow down; at most 8 buffers per fused kernel, so per-example reductions run in the backward as
# their operands are made instead of in one kernel at the end that keeps every activation alive;
# no reordering for locality, which moves ops away from the step graph's order and raised the peak.
# The measurements: docs/benchmarks.md, "Settings in the code".
INDUCTOR_OPTIONS = {"layout_optimization": False, "max_fusion_unique_io_buffers": 8, "reorder_for_locality": False}


class BatchSpecializedError(FxclipError):
    """Tracing with a symbolic batch fixed it to the example's size; the step then compiles
    per bucket instead (inductor), or runs as the program (python)."""


class CompileFailed(FxclipError):
    """Tracing or compiling the step failed even with a static batch; `PrivateStep` then runs
    the same step eagerly."""


def bucket_size(batch: int) -> int:
    """The padded batch size in "buckets" mode: `batch` rounded up to a multiple of 1/8 of the
    power of two below it (so at most 12.5% padding, and 8 sizes per power of two)."""
    if batch < 8:
        return max(batch, 2)
    granule = 2 ** (int(math.log2(batch)) - 3)
    return -(-batch // granule) * granule


class CompiledStep:
    """The private step of a bound program (`passes.program.BoundStep`) as one compiled graph.

    `__call__(flat_args, max_grad_norm=None)` returns what `program(flat_args, max_grad_norm,
    strategy, clipping=clipping)` returns — a StepOutput — to float32 tolerance (C from the
    constructor unless given; one bound per group for per_layer `clipping`). The bounds are an
    input of the compiled graph, one row per example, so a new bound does not recompile. `flat_args` are laid out as `bound.flat_args`: the user's inputs and targets are
    batched (inputs along `bound.batch_dims`, targets along dim 0). `compiles` counts the graphs
    made (inductor compilations, or traces for `backend="python"`): one for "dynamic", one per
    bucket used for "buckets". `options` are inductor settings applied on top of INDUCTOR_OPTIONS.
    `backend="python"` runs the traced graph op by op instead of compiling it (no CUDA graphs, and
    a batch that tracing cannot keep symbolic raises CompileFailed: the program runs it then).
    Nothing runs until the first call."""

    def __init__(
        self,
        bound: BoundStep,
        max_grad_norm: float,
        strategy: str = "auto",
        batch_mode: str = "dynamic",
        options: dict | None = None,
        cuda_graphs: bool | None = None,
        clipping: Clipping = FLAT,
        backend: str = "inductor",
    ):
        if batch_mode not in BATCH_MODES:
            raise FxclipError(f"batch_mode must be one of {BATCH_MODES}, got {batch_mode!r}")
        if backend not in BACKENDS:
            raise FxclipError(f"backend must be one of {BACKENDS}, got {backend!r}")
        flat_args = bound.flat_args
        if cuda_graphs is None:
            cuda_graphs = backend == "inductor" and _device(flat_args).type == "cuda"
        if cuda_graphs and backend != "inductor":
            raise FxclipError("cuda_graphs=True replays the inductor-compiled step: pass backend='inductor'")
        if cuda_graphs and _device(flat_args).type != "cuda":
            raise FxclipError(
                f"cuda_graphs=True needs the model and the batch on a CUDA device; they are on {_device(flat_args)}"
            )
        user = [j for j, (kind, _) in enumerate(bound.placeholders) if kind == "input"]
        self._user_batch_dims = _user_dims(flat_args, user, bound.batch_dims)
        self.program = bound.program
        self.strategy = strategy
        self.clipping = clipping
        self.max_grad_norm = bound_values(max_grad_norm)
        self.batch_mode = batch_mode
        self.backend = backend
        self.options = {**INDUCTOR_OPTIONS, **(options or {})}
        self.compiles = 0
        self.graphs = _StepGraphs(self._user_batch_dims) if cuda_graphs else None
        self.param_keys = list(bound.program.step_plan.grad_keys)  # the order of the graph's gradient outputs
        self._graphs: dict[int | None, GraphModule] = {}
        self._compiled: dict[tuple, Callable] = {}  # by (bucket or None, input signature)
        self._bounds_made: dict[tuple, torch.Tensor] = {}  # by (that key, batch size), for C

    # ---- public -----------------------------------------------------------------------------

    @property
    def step_graph(self) -> GraphModule:
        """The traced step graph (batch symbolic) — forward, backward to the op outputs, norms,
        clip factors and clipped sums as aten ops; inputs (bounds, *flat_args)."""
        if None not in self._graphs:
            raise FxclipError("the step graph is traced on the first compiled step; run step() first")
        return self._graphs[None]

    def trace(self, flat_args: Sequence, device: torch.device | None = None) -> tuple[GraphModule, list]:
        """The step graph for these arguments traced with a symbolic batch, without compiling
        (what inductor would get): (graph with inputs (bounds, *flat_args), the fake inputs it was
        traced on). `device` picks the device-dependent graph passes (default: the arguments')."""
        args, _ = _dense(flat_args)
        return self._trace(None, self._bound_rows(self._batch_size(args), args), args, device)

    def __call__(self, flat_args: Sequence, max_grad_norm: float | None = None) -> StepOutput:
        batch = self._batch_size(flat_args)
        # a CUDA graph is recorded per batch size: padded to buckets, a few of them serve every size
        padded = bucket_size(batch) if self.batch_mode == "buckets" or self.graphs is not None else max(batch, 2)
        args, signature = _dense(self._padded(list(flat_args), batch, padded))
        # the graph holds the casts of the autocast state it was traced under
        key = (None if self.batch_mode == "dynamic" else padded, signature, autocast_state(args))
        if max_grad_norm is not None and bound_values(max_grad_norm) != self.max_grad_norm:
            self.max_grad_norm = bound_values(max_grad_norm)
            self._bounds_made.clear()
        bounds = self._bounds(key, batch, padded, args)
        fn = self._compiled.get(key)
        if fn is None:
            try:
                fn = self._compile(key, bounds, args)
            except FxclipError as e:
                # the Python graph stands in for the program, which runs the step instead (and
                # raises what is the user's to fix); a compile asked for surfaces it
                if self.backend == "python":
                    raise CompileFailed(str(e)) from e
                if not isinstance(e, BatchSpecializedError):
                    raise
                warnings.warn(f"{e}; compiling per bucket of batch sizes instead (batch_mode='buckets')")
                self.batch_mode = "buckets"
                return self(flat_args, max_grad_norm)
            except Exception as e:  # inductor and make_fx raise many types
                raise CompileFailed(f"compiling the step failed ({describe(e)})") from e
        with torch.no_grad():
            outs = fn(bounds, *args) if self.graphs is None else self.graphs(key, fn, bounds, args)
        n = 4 if self.clipping.per_group else 3  # per group also the groups' norms
        per_example = outs[:n] if padded == batch else [t[:batch] for t in outs[:n]]
        return StepOutput(*per_example[:3], dict(zip(self.param_keys, outs[n:])), *per_example[3:])

    def _bounds(self, key: tuple, batch: int, padded: int, args: list) -> torch.Tensor:
        """The per-example clipping bounds: C for the batch's rows, 0 for padding rows (clip
        factor 0, so they add nothing). Made once per compiled graph and batch size while C stays
        (the compiled code only reads it): a small step's time is mostly such per-call overhead."""
        bounds = self._bounds_made.get((key, batch))
        if bounds is None:
            bounds = self._bound_rows(padded, args)
            bounds[batch:] = 0.0
            self._bounds_made[(key, batch)] = bounds
        return bounds

    def _bound_rows(self, rows: int, args: list) -> torch.Tensor:
        """C in each of `rows` rows: [rows], or [rows, G] with one bound per group."""
        values = torch.tensor(self.max_grad_norm if self.clipping.per_group else self.max_grad_norm[0], dtype=_norm_dtype(args), device=_device(args))
        return values.expand(rows, *values.shape).clone()

    # ---- tracing and compiling ---------------------------------------------------------------

    def _traced(self, bounds: torch.Tensor, *flat_args):
        output = self.program(list(flat_args), bounds, self.strategy, clipping=self.clipping)
        per_group = () if output.group_norms is None else (output.group_norms,)
        return (*output[:3], *per_group, *(output.grads[k] for k in self.param_keys))

    def _trace(
        self, bucket: int | None, bounds: torch.Tensor, args: list, device: torch.device | None = None
    ) -> tuple[GraphModule, list]:
        """make_fx of the whole step on fake tensors whose batch dims are one symbol (or, for a
        bucket, the bucket size); returns the graph and the fake inputs it was traced on. The
        graph passes that depend on the device (row gathers unfused on a CPU) are those for
        `device`, by default the arguments' (tests/fake_cuda.py traces for CUDA on a CPU)."""
        shape_env = ShapeEnv(duck_shape=False)
        mode = FakeTensorMode(shape_env=shape_env)

        def fake(t: torch.Tensor, batch_dim: int | None):
            sizes = [DimDynamic.STATIC] * t.dim()
            if batch_dim is not None and bucket is None:
                sizes[batch_dim] = DimDynamic.DYNAMIC
            leaf = t.detach().requires_grad_(t.requires_grad)
            return mode.from_tensor(leaf, symbolic_context=StatelessSymbolicContext(dynamic_sizes=sizes))

        fakes = [fake(bounds, 0)] + [
            fake(a, self._user_batch_dims.get(j)) if isinstance(a, torch.Tensor) else a for j, a in enumerate(args)
        ]
        try:
            # Under the Python dispatcher fake kernels keep the batch symbolic, constant_pad_nd's
            # too: it stays one op that inductor reads through a mask in the kernel using it
            # (built from cat, small_cnn's padded activations were buffers: peak 3.0 -> 2.2 MB).
            with mode, enable_python_dispatcher():
                gm = make_fx(self._traced, tracing_mode="fake")(*fakes)
        except Exception as e:
            if bucket is not None or isinstance(e, FxclipError):
                raise
            # an op's fake kernel that cannot take a symbolic size
            raise BatchSpecializedError(
                f"tracing the step with a symbolic batch failed ({describe(e)})"
            ) from e
        if bucket is None:
            _check_batch_symbolic(shape_env, fakes[0].shape[0])
        # One computation of each repeated product: uses whose op outputs are summed get the same
        # gradient, so their factors, concatenations and Gram matrices are the same ops.
        gm.graph = fx_graph_cse(gm.graph)
        _concatenate_early(gm.graph)
        _gather_rows_unfused(gm.graph, device or _device(args))
        _reshape_through_common_shape(gm.graph)
        gm.recompile()
        return gm, fakes

    def _compile(self, key, bounds: torch.Tensor, args: list) -> Callable:
        """The traced step graph as Python code (backend "python"), or inductor on it directly (no Dynamo: the graph is already aten ops,
        and Dynamo's guards cost a few hundred microseconds per call). What Dynamo's guards would
        check is in `key` (dtypes, devices, ranks, requires_grad, memory formats); sizes and strides are asserted
        by the generated code itself."""
        gm, fakes = self._trace(key[0], bounds, args)
        self.compiles += 1
        if self.backend == "python":
            self._graphs.setdefault(None, gm)
            fn = self._compiled[key] = _OpByOp(gm, _device(args).type)
            return fn
        from torch._inductor.compile_fx import compile_fx  # imported when first needed: 1.5 s

        self._graphs.setdefault(None, copy.deepcopy(gm))  # compile_fx may rewrite its input
        with torch.no_grad():
            fn = compile_fx(gm, fakes, config_patches=self.options)
        self._compiled[key] = fn
        return fn

    # ---- batch handling ----------------------------------------------------------------------

    def _batch_size(self, flat_args) -> int:
        j, d = next(iter(self._user_batch_dims.items()))
        return flat_args[j].shape[d]

    def _padded(self, args: list, batch: int, padded: int) -> list:
        """User tensors with rows batch..padded-1 copied from example 0."""
        if padded == batch:
            return args
        out = list(args)
        for j, d in self._user_batch_dims.items():
            x = args[j]
            filler = x.narrow(d, 0, 1).expand(*x.shape[:d], padded - batch, *x.shape[d + 1 :])
            out[j] = torch.cat([x, filler], d)
        return out


class _StepGraphs:
    """The compiled step replayed from CUDA graphs, one per (compiled graph, padded batch size):
    one launch for the whole step instead of one per kernel (a small model's step is dozens of
    microsecond kernels, each launched from Python by inductor's wrapper).

    A graph reads and writes fixed addresses. The batch tensors are copied into buffers of the
    graph's own before each replay; parameters, buffers and constants are read where they are
    (an optimizer updates them in place), and a graph whose tensors moved is recorded again. Each
    replay overwrites the previous one's outputs, which escape (to StepResult and p.grad): they
    are copied out, by one multi-tensor kernel. All graphs of a step share one memory pool:
    they never run concurrently and nothing of theirs is read after another one ran."""

    def __init__(self, user_batch_dims: dict[int, int]):
        self.user = set(user_batch_dims)
        self.recorded: dict[tuple, tuple] = {}  # (key, padded size) -> (graph, inputs, bounds, outputs, addresses)
        self.records = 0
        self._pool = None

    def __call__(self, key: tuple, fn: Callable, bounds: torch.Tensor, args: list) -> list[torch.Tensor]:
        entry = self.recorded.get((key, len(bounds)))
        if entry is None or entry[4] != self._addresses(args):
            entry = self.recorded[(key, len(bounds))] = self._record(fn, bounds, args)
        graph, inputs, static_bounds, outputs, _ = entry
        for j in self.user:
            inputs[j].copy_(args[j])
        static_bounds.copy_(bounds)
        graph.replay()
        # x * 1 is x exactly, into new memory: one launch for all outputs instead of one clone each
        return torch._foreach_mul(list(outputs), 1.0)

    def _addresses(self, args: list) -> tuple:
        return tuple(a.data_ptr() for j, a in enumerate(args) if j not in self.user and isinstance(a, torch.Tensor))

    def _record(self, fn: Callable, bounds: torch.Tensor, args: list) -> tuple:
        inputs = [a.clone() if j in self.user else a for j, a in enumerate(args)]
        static_bounds = bounds.clone()
        # warm-up off the capture: lazy initialization, kernel autotuning, library workspaces
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn(static_bounds, *inputs)
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            outputs = fn(static_bounds, *inputs)
        self.records += 1
        return graph, inputs, static_bounds, tuple(outputs), self._addresses(args)


class _OpByOp:
    """The step graph run as Python code on real tensors, one eager op per node. The graph holds
    every cast the step made (under autocast, the forward's), so autocast is off for it: on, it
    would cast fxclip's float32 products down again.

    Its aten ops are called through their generated Python bindings where those were checked to
    give the same result (`aten.mul.Tensor` as `torch.mul`, `aten.view.default` as `Tensor.view`):
    the same kernel without `OpOverload.__call__`'s boxed call. That call costs about 3.5 us, a
    binding 1.4-1.7 us, and a small model's step graph is mostly such cheap ops (the zoo MLP's:
    168 ops, 0.3 ms of the 0.9 ms the graph took). A binding parses its arguments by the Python
    signature, which is not always the schema's (`torch.index_put` takes no None among its
    indices), so the first run is op by op in an interpreter that calls both and keeps the binding
    only where its result has the aten op's values, dtype, sizes, strides and aliasing; that run
    returns the aten ops' results, and later runs are the bound graph's code. The same check
    makes each chain of views that keeps the elements' order one view (a weight's factor was
    view, permute, view, unsqueeze of the activation), and detach goes: the MLP's graph runs 96
    ops instead of 148. `graph` (what `step_graph` shows) keeps its aten ops."""

    def __init__(self, graph: GraphModule, device_type: str):
        self.graph, self.device_type = graph, device_type
        self.bound: GraphModule | None = None

    def __call__(self, *args) -> list[torch.Tensor]:
        with torch.no_grad(), torch.autocast(self.device_type, enabled=False):
            if self.bound is None:
                checker = _CheapCallsChecker(self.graph)
                outs = checker.run(*args)
                self.bound = checker.bound_graph()
                return outs
            return self.bound(*args)


class _CheapCallsChecker(torch.fx.Interpreter):
    """Runs the graph's aten ops and, beside each, a cheaper call the first run checks gives the
    same result: the op's Python binding, or for the last of a chain of views that keep the
    elements' order (`_collapsible_views`), one view of the chain's first input. `bound_graph()` is
    a copy of the graph with the cheaper calls that agreed, without the views and sizes that
    nothing reads any more."""

    def __init__(self, graph: GraphModule):
        super().__init__(graph)
        self.agreed: dict[torch.fx.Node, Callable] = {}
        self.collapsible = _collapsible_views(graph.graph)
        self.collapsed: dict[torch.fx.Node, tuple[torch.fx.Node, list[int] | None]] = {}
        # a chain's first input is kept until its last view, which the check makes from it
        last_use = {n: user for user, ns in self.user_to_last_uses.items() for n in ns}
        for end, (root, _) in self.collapsible.items():
            if last_use[root] < end:
                self.user_to_last_uses[last_use[root]].remove(root)
                self.user_to_last_uses.setdefault(end, []).append(root)
                last_use[root] = end

    def call_function(self, target, args, kwargs):
        want = super().call_function(target, args, kwargs)
        binding = _python_binding(target) if isinstance(target, torch._ops.OpOverload) else None
        if binding is not None:
            try:
                got = binding(*args, **kwargs)
            except Exception:  # the binding parses these arguments otherwise: the aten op stays
                return want
            if _same_results(got, want, [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]):
                self.agreed[self.node] = binding
        return want

    def run_node(self, node):
        self.node = node
        want = super().run_node(node)
        if node in self.collapsible:
            root, sizes = self.collapsible[node]
            base = self.env[root]
            try:
                got = base if sizes is None else base.view(want.shape)
            except RuntimeError:
                return want
            if _same_results(got, want, [base]):
                self.collapsed[node] = (root, sizes)
        return want

    def bound_graph(self) -> GraphModule:
        graph, copies = torch.fx.Graph(), {}
        graph.output(graph.graph_copy(self.module.graph, copies))
        for node, binding in self.agreed.items():
            copies[node].target = binding
        for node, (root, sizes) in self.collapsed.items():
            if sizes is None:
                copies[node].replace_all_uses_with(copies[root])
            else:
                copies[node].target, copies[node].args, copies[node].kwargs = torch._C.TensorBase.view, (copies[root], sizes), {}
        for node in self.module.graph.nodes:
            if node.target is torch.ops.aten.detach.default:  # no autograd here: the value itself
                copies[node].replace_all_uses_with(copies[node].args[0])
        _one_node_per_size(graph)
        graph.eliminate_dead_code()
        return GraphModule(self.module, graph)


# views that keep the order of a tensor's elements (unless a permute moves a dim past another of
# size > 1), so that a chain of them is one view of its first input
_REORDERING_VIEWS = (torch.ops.aten.permute.default, torch.ops.aten.transpose.int, torch.ops.aten.t.default)
_ORDER_KEEPING_VIEWS = (
    torch.ops.aten.view.default,
    torch.ops.aten._unsafe_view.default,
    torch.ops.aten.unsqueeze.default,
    torch.ops.aten.squeeze.default,
    torch.ops.aten.squeeze.dim,
    torch.ops.aten.squeeze.dims,
)


def _keeps_order(node: torch.fx.Node) -> bool:
    if node.op != "call_function" or "val" not in node.meta:
        return False
    if node.target in _ORDER_KEEPING_VIEWS:
        return True
    if node.target not in _REORDERING_VIEWS:
        return False
    shape = node.args[0].meta["val"].shape
    if node.target is torch.ops.aten.permute.default:
        order = [d % len(shape) for d in node.args[1]]
    else:
        order = list(range(len(shape)))
        if len(shape) >= 2:
            a, b = (0, 1) if node.target is torch.ops.aten.t.default else (node.args[1] % len(shape), node.args[2] % len(shape))
            order[a], order[b] = order[b], order[a]
    moved = [d for d in order if not (isinstance(shape[d], int) and shape[d] == 1)]  # a symbolic size is never 1
    return moved == sorted(moved)


def _collapsible_views(graph: torch.fx.Graph) -> dict[torch.fx.Node, tuple[torch.fx.Node, list[int] | None]]:
    """{last view: (the chain's first input, the sizes to view it as)} for each chain of views
    that keep the elements' order: the chain's result then has the first input's elements in the
    same order, i.e. is that input viewed as the result's sizes (if those strides exist, which the
    first run checks). The sizes are ints with -1 for the one symbolic size; None where they are
    the input's own (the input itself). A single view is listed only then."""
    out = {}
    for node in graph.nodes:
        if not _keeps_order(node):
            continue
        root = node.args[0]
        while _keeps_order(root):
            root = root.args[0]
        shape = node.meta["val"].shape
        if _same_sizes(shape, root.meta["val"].shape):
            out[node] = (root, None)
            continue
        symbolic = [i for i, s in enumerate(shape) if not isinstance(s, int)]
        if root is node.args[0] or len(symbolic) > 1 or any(isinstance(s, int) and s == 0 for s in shape):
            continue  # one view already; -1 stands for one size only, and cannot be inferred beside a 0
        out[node] = (root, [-1 if i in symbolic else s for i, s in enumerate(shape)])
    return out


def _same_sizes(a: Sequence, b: Sequence) -> bool:
    """Equal sizes, a symbolic size equal to a symbolic one by its expression (no guard is made)."""
    def expr(s):
        return s.node.expr if isinstance(s, torch.SymInt) else s

    return len(a) == len(b) and all(expr(x) == expr(y) for x, y in zip(a, b))


def _one_node_per_size(graph: torch.fx.Graph) -> None:
    """Each `aten.sym_size` read of a size already read elsewhere (the batch, read from each view
    of it) uses the first read: the views read from can then go."""
    first: dict = {}
    for node in list(graph.nodes):
        if node.target in (torch.ops.aten.sym_size.int, torch._C.TensorBase.size) and isinstance(node.meta.get("val"), torch.SymInt):
            kept = first.setdefault(node.meta["val"].node.expr, node)
            if kept is not node:
                node.replace_all_uses_with(kept)


def _same_results(got, want, inputs: list[torch.Tensor]) -> bool:
    """Same structure; tensors with equal values (NaN included), dtype, sizes, strides, offset
    and the same inputs aliased; other values equal."""
    got_leaves, got_spec = pytree.tree_flatten(got)
    want_leaves, want_spec = pytree.tree_flatten(want)
    if got_spec != want_spec:
        return False

    def layout(t: torch.Tensor) -> tuple:
        aliased = tuple(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for x in inputs)
        return t.dtype, t.device, t.shape, t.stride(), t.storage_offset(), aliased

    for g, w in zip(got_leaves, want_leaves):
        if isinstance(w, torch.Tensor):
            if not (
                isinstance(g, torch.Tensor) and layout(g) == layout(w)
                and (torch.equal(g, w) or (w.is_floating_point() and torch.allclose(g, w, rtol=0, atol=0, equal_nan=True)))
            ):
                return False
        elif type(g) is not type(w) or g != w:
            return False
    return True


def _python_binding(op: torch._ops.OpOverload) -> Callable | None:
    """The generated binding of an aten op: `torch.<name>` or `torch._C._nn.<name>`, else the
    method `Tensor.<name>` for an op whose first argument is self; only where that name is the C
    binding itself, not a Python wrapper around it (`torch.split`, `Tensor.split`), which may
    take other arguments. None if there is none."""
    if op.namespace != "aten" or op._schema.is_mutable or torch.Tag.nondeterministic_seeded in op.tags:
        return None  # checking an in-place or random op's binding would run it twice
    if op is torch.ops.aten.sym_size.int:
        return torch._C.TensorBase.size
    name = op._opname
    function = getattr(torch._C._VariableFunctions, name, None)
    if function is not None and getattr(torch, name, None) is function:
        return function
    if hasattr(torch._C._nn, name):
        return getattr(torch._C._nn, name)
    arguments = op._schema.arguments
    if arguments and arguments[0].name == "self" and not arguments[0].kwarg_only:
        method = getattr(torch._C.TensorBase, name, None)  # a property (mT, real) is no method
        if isinstance(method, types.MethodDescriptorType) and getattr(torch.Tensor, name, None) is method:
            return method
    return None


def _concatenate_early(graph: torch.fx.Graph) -> None:
    """Moves each `fxclip::concat` of factors, and the views feeding it, to right after its last
    input. The forms code makes them after the whole backward; placed there, the pieces they copy
    live until then. Only moves a node earlier, after all its inputs and after every in-place op
    that came before it: the values are unchanged."""
    mutations = [n for n in graph.nodes if isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable]
    for node in [n for n in graph.nodes if n.target is torch.ops.fxclip.concat.default]:
        chain: list[torch.fx.Node] = []

        def views_above(n: torch.fx.Node) -> None:
            if isinstance(n.target, torch._ops.OpOverload) and n.target.is_view and n not in chain:
                for up in n.all_input_nodes:
                    views_above(up)
                chain.append(n)

        for piece in node.all_input_nodes:
            views_above(piece)
        for n in [*chain, node]:
            # fx nodes compare by their place in the graph
            anchor = max([*n.all_input_nodes, *(m for m in mutations if m < n)])
            if anchor.op != "placeholder":  # placeholders stay first
                anchor.append(n)


def _gather_rows_unfused(graph: torch.fx.Graph, device: torch.device | None = None) -> None:
    """On a CPU (`device`, or where `device` is None each table's own), makes each row gather
    (aten.embedding, aten.index_select along dim 0) an
    `fxclip::gather_rows`, which inductor runs unfused as aten.index_select: the values are the
    same. Fused into its consumer, inductor's C++ loads the rows one element at a time, much
    slower (docs/benchmarks.md, "Settings in the code"). On a GPU the gathers stay fused."""
    for node in graph.nodes:
        if node.target is torch.ops.aten.embedding.default:
            table, indices = node.args[:2]
        elif node.target is torch.ops.aten.index_select.default:
            table, dim, indices = node.args
            # a 0-d index keeps the selected dim (size 1), which gather_rows would drop
            if dim % max(table.meta["val"].dim(), 1) != 0 or indices.meta["val"].dim() != 1:
                continue
        else:
            continue
        if (device or table.meta["val"].device).type == "cpu":
            node.target, node.args, node.kwargs = gather_rows, (table, indices), {}


_RESHAPES = (torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default, torch.ops.aten.reshape.default)


def _reshape_through_common_shape(graph: torch.fx.Graph) -> None:
    """Splits a reshape that cuts a batch-sized dim at other places than its input did (MHA's
    [T, 4·B, 16] -> [T, B, 64]) into two: a split into the finest shape both are merges of
    ([T, B, 4, 16]), then a merge. The values are the same. Inductor indexes one such reshape of a
    symbolic size by `(i // 16) % (4·B)` and more, per element: the attention's qkv gradient in the
    transformer's step took 4.7 ms in one unvectorized kernel (B=128, 2 threads); split in steps, each index is
    affine or divides by a constant."""
    for node in list(graph.nodes):
        if node.target not in _RESHAPES:
            continue
        old, new = node.args[0].meta["val"].shape, node.meta["val"].shape
        exprs = [s.node.expr if isinstance(s, torch.SymInt) else sympy.Integer(s) for s in (*old, *new)]
        if all(e.is_number for e in exprs):
            continue  # static sizes: inductor simplifies any such index
        old_exprs, new_exprs = exprs[: len(old)], exprs[len(old):]
        common = _common_refinement(old_exprs, new_exprs)
        if common is None or common in (_without_ones(old_exprs), _without_ones(new_exprs)):
            continue  # a pure split or merge already, or no common shape
        if sum(not e.is_number for e in common) != 1:
            continue  # the sizes of the intermediate need one inferred dim (-1)
        sizes = [int(e) if e.is_number else -1 for e in common]
        with graph.inserting_before(node):
            split = graph.call_function(node.target, (node.args[0], sizes))
        split.meta = {**node.meta, "val": node.args[0].meta["val"].reshape(sizes)}
        node.args = (split, *node.args[1:])


def _without_ones(sizes: list) -> list:
    return [s for s in sizes if s != 1]


def _common_refinement(old: list, new: list) -> list | None:
    """The coarsest sizes (without 1s) that both `old` and `new` are merges of, or None where one
    cuts a dim at a place that the other does not (neither size of a pair divides the other)."""
    old, new, common = _without_ones(old), _without_ones(new), []
    while old and new:
        a, b = old[0], new[0]
        if a == b:
            common.append(a)
            old, new = old[1:], new[1:]
        elif sympy.fraction(sympy.cancel(a / b))[1] == 1:  # b divides a
            common.append(b)
            old, new = [sympy.cancel(a / b), *old[1:]], new[1:]
        elif sympy.fraction(sympy.cancel(b / a))[1] == 1:
            common.append(a)
            old, new = old[1:], [sympy.cancel(b / a), *new[1:]]
        else:
            return None
    return common if not old and not new else None


# the dense layouts a tensor may keep into a compiled step, by rank (the first that fits is its)
_FORMATS = {4: (torch.contiguous_format, torch.channels_last), 5: (torch.contiguous_format, torch.channels_last_3d)}


def _dense(args: Sequence) -> tuple[list, tuple]:
    """(the arguments in a dense layout, their signature). The generated code asserts the strides
    it was traced with, so a transposed, sliced or expanded tensor (same sizes, other strides) is
    copied into a contiguous one; a contiguous or channels-last tensor stays as it is. The
    signature is what a compiled step graph assumes of its inputs besides their sizes: dtype,
    device, rank, requires_grad and memory format (hence strides); a non-tensor's value. One pass
    over the arguments: it runs on every step."""
    dense, signature = [], []
    for a in args:
        if isinstance(a, torch.Tensor):
            layout = None
            for memory_format in _FORMATS.get(a.dim(), (torch.contiguous_format,)):
                if a.is_contiguous(memory_format=memory_format):
                    layout = memory_format
                    break
            if layout is None:
                a, layout = a.contiguous(), torch.contiguous_format
            signature.append((a.dtype, a.device, a.dim(), a.requires_grad, layout))
        else:
            signature.append(a)
        dense.append(a)
    return dense, tuple(signature)


def _user_dims(flat_args, user: list[int], batch_dims: Sequence[int]) -> dict[int, int]:
    """{graph input: batch dim} of each user tensor: inputs along `batch_dims`, then targets along
    dim 0. A leaf that is not a tensor (targets=None) is a constant of the traced graph."""
    dims = list(batch_dims) + [0] * (len(user) - len(batch_dims))
    return {j: d for j, d in zip(user, dims) if isinstance(flat_args[j], torch.Tensor)}


def _device(flat_args) -> torch.device:
    return next(a.device for a in pytree.tree_leaves(flat_args) if isinstance(a, torch.Tensor))


def _norm_dtype(flat_args) -> torch.dtype:
    """The dtype the program computes norms in: float64 for a float64 model, else float32."""
    floats = [a.dtype for a in flat_args if isinstance(a, torch.Tensor) and a.is_floating_point()]
    return torch.float64 if torch.float64 in floats else torch.float32


def _check_batch_symbolic(shape_env: ShapeEnv, batch) -> None:
    """Fail loudly if something in the step fixed the batch size while tracing (the graph would
    then be wrong for every other size)."""
    expr = shape_env.replace(batch.node.expr) if isinstance(batch, torch.SymInt) else batch
    bounds = shape_env.bound_sympy(expr) if not isinstance(expr, int) else None
    if bounds is None or bounds.lower == bounds.upper:
        raise BatchSpecializedError(
            "tracing the step fixed the batch size (an op's fake kernel read a concrete size, as "
            "batched matmul does on CUDA in torch 2.11)"
        )
