"""transform(..., compile=True): the whole step as one compiled graph, equal to the eager step,
compiled once for every batch size."""

import pytest
import sympy
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import fxclip
from fxclip.ops import concat
from fxclip.zoo import PerExampleCrossEntropy
from fxclip.passes.compile import CompiledStep, _common_refinement, _concatenate_early, _gather_rows_unfused, bucket_size
from fxclip.zoo import ZOO

LOSS = PerExampleCrossEntropy()


def _pair(name: str):
    torch.manual_seed(0)
    eager_model = ZOO[name].factory()
    compiled_model = ZOO[name].factory()
    compiled_model.load_state_dict(eager_model.state_dict())
    return (
        eager_model, fxclip.transform(eager_model, LOSS, 1.0),
        compiled_model, fxclip.transform(compiled_model, LOSS, 1.0, compile=True),
    )


def _compiled(t: fxclip.PrivateStep):
    """The CompiledStep of `t`'s one capture."""
    (capture,) = t.captures
    return capture.step.compiled


def _assert_steps_agree(name: str, sizes) -> fxclip.PrivateStep:
    eager_model, eager, compiled_model, compiled = _pair(name)
    gen = torch.Generator().manual_seed(1)
    for size in sizes:
        inputs, targets = ZOO[name].make_batch(size, gen)
        for m in (eager_model, compiled_model):
            m.zero_grad(set_to_none=True)
        want, got = eager.step(inputs, targets), compiled.step(inputs, targets)
        assert got.losses.shape == (size,)
        torch.testing.assert_close(got.losses, want.losses, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.norms, want.norms, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got.clip_factors, want.clip_factors, rtol=1e-4, atol=1e-5)
        for (key, p), q in zip(eager_model.named_parameters(), compiled_model.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=f"{name}: {key} at batch {size}")
    return compiled


@pytest.mark.compile
def test_compiled_step_matches_eager_and_compiles_once_for_all_batch_sizes():
    # Poisson sampling gives a new batch size every step; 1 is padded to 2 (padding rows get clip 0)
    compiled = _assert_steps_agree("mlp", [16, 23, 1, 40])
    assert _compiled(compiled).compiles == 1
    graph = _compiled(compiled).step_graph
    ops = {n.target for n in graph.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.tanh_backward.default in ops  # the backward is in the one step graph


@pytest.mark.compile
def test_a_batch_in_another_layout_is_made_dense_not_refused():
    # the compiled code asserts the strides it was traced with; same sizes, other strides
    eager_model, eager, compiled_model, compiled = _pair("mlp")
    gen = torch.Generator().manual_seed(1)
    layouts = [lambda x: x, lambda x: x.transpose(0, -1).contiguous().transpose(0, -1), lambda x: torch.stack([x, x], -1)[..., 0]]
    for layout in layouts:
        inputs, targets = ZOO["mlp"].make_batch(9, gen)
        want, got = eager.step(inputs, targets), compiled.step([layout(x) for x in inputs], targets)
        torch.testing.assert_close(got.norms, want.norms, rtol=1e-4, atol=1e-5)
    for p, q in zip(eager_model.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5)
    assert _compiled(compiled).compiles == 1


@pytest.mark.compile
@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in ZOO if n != "mlp"])
def test_compiled_step_matches_eager_on_zoo(name):
    compiled = _assert_steps_agree(name, [12, 7])
    assert _compiled(compiled).compiles == 1


@pytest.mark.compile
@pytest.mark.slow
def test_buckets_pad_with_rows_that_change_nothing():
    torch.manual_seed(0)
    model = ZOO["mlp"].factory()
    private = fxclip.transform(model, LOSS, 1.0)
    inputs, targets = ZOO["mlp"].make_batch(17, torch.Generator().manual_seed(2))
    private.step(inputs, targets)
    bound = private.bind(inputs, targets)
    args = bound.flat_args
    want = private.program(args, 1.0)
    step = CompiledStep(bound, 1.0, batch_mode="buckets")
    got = step(args)  # 17 examples run as a bucket of 18
    assert got[0].shape == (17,)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-5)
    for key in want[3]:
        torch.testing.assert_close(got[3][key], want[3][key], rtol=1e-4, atol=1e-5)
    step(private.bind(inputs, targets).flat_args)  # the same bucket again: no new compile
    assert step.compiles == 1


def _nodes_after(graph_pass, fn, *args) -> list[torch.fx.Node]:
    """The nodes of make_fx(fn)'s graph after `graph_pass`, which must leave a valid graph that
    computes what `fn` does."""
    gm = make_fx(fn)(*args)
    graph_pass(gm.graph)
    gm.graph.lint()
    gm.recompile()
    torch.testing.assert_close(gm(*args), fn(*args))
    return list(gm.graph.nodes)


def test_factor_concatenations_move_right_after_their_pieces():
    """The forms code concatenates a recurrent weight's per-step factors after the whole backward;
    the compiled step moves each concatenation (and the views feeding it) to right after its last
    piece, so the pieces can be freed there. The values are unchanged."""

    def step(x):
        pieces = [torch.sin(x[i]) for i in range(4)]
        later = (x @ x.T).exp()  # work the concatenation does not need
        return concat([p.unsqueeze(0) for p in pieces], 0).sum(0) + later.sum(0)

    nodes = _nodes_after(_concatenate_early, step, torch.randn(4, 4))
    joined = next(n for n in nodes if n.target is torch.ops.fxclip.concat.default)
    matmul = next(n for n in nodes if n.target is torch.ops.aten.mm.default)
    last_sin = [n for n in nodes if n.target is torch.ops.aten.sin.default][-1]
    assert nodes.index(last_sin) < nodes.index(joined) < nodes.index(matmul)
    assert all(p.target is torch.ops.aten.unsqueeze.default and nodes.index(p) < nodes.index(matmul) for p in joined.all_input_nodes)


def test_a_factor_concatenation_is_not_moved_before_an_in_place_op():
    """Pieces that are views of a tensor changed in place after they are made must be copied after
    the change (the graph records no data dependence of the views on the in-place op)."""

    def step(x):
        rows = torch.sin(x)
        pieces = [rows[i] for i in range(4)]
        later = (x @ x.T).exp()
        rows.mul_(later)
        return concat(pieces, 0) + later.sum()

    nodes = _nodes_after(_concatenate_early, step, torch.randn(4, 4))
    joined = next(n for n in nodes if n.target is torch.ops.fxclip.concat.default)
    in_place = next(n for n in nodes if n.target is torch.ops.aten.mul_.Tensor)
    assert nodes.index(in_place) < nodes.index(joined)


def test_row_gathers_on_a_cpu_run_unfused_with_the_same_values():
    """Embeddings and dim-0 index_selects become fxclip::gather_rows (aten.index_select, unfused);
    a selection along another dim or by a 0-d index stays."""

    def step(table, cube, tokens):
        bag = torch.nn.functional.embedding(tokens, table).sum(1)
        rows = torch.index_select(cube, -3, tokens[:, 0])
        cols = torch.index_select(table, 1, tokens[0, :2])
        one = torch.index_select(table, 0, tokens[0, 0])  # a 0-d index keeps dim 0
        return bag, rows, cols, one

    args = torch.randn(10, 4), torch.randn(10, 3, 2), torch.randint(0, 4, (5, 7))
    targets = [n.target for n in _nodes_after(_gather_rows_unfused, step, *args)]
    assert targets.count(torch.ops.fxclip.gather_rows.default) == 2
    assert torch.ops.aten.embedding.default not in targets
    assert targets.count(torch.ops.aten.index_select.default) == 2


def test_a_padded_conv_traces_its_padding_as_one_op_with_the_batch_symbolic():
    """The conv rule's padding stays aten.constant_pad_nd, which inductor reads through a mask in
    the kernel that consumes it; built from cat, each padded tensor was a buffer of its own."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 4, 2, padding="same"),  # an even kernel: pads 0 before, 1 after
        torch.nn.Flatten(), torch.nn.Linear(4 * 36, 3),
    )
    private = fxclip.transform(model, LOSS, 1.0)
    inputs, targets = torch.randn(6, 2, 6, 6), torch.randint(0, 3, (6,))
    private.step(inputs, targets)
    bound = private.bind(inputs, targets)
    graph, _ = CompiledStep(bound, 1.0).trace(bound.flat_args)  # raises if the batch got fixed
    targets = [n.target for n in graph.graph.nodes]
    assert torch.ops.aten.constant_pad_nd.default in targets
    assert torch.ops.aten.cat.default not in targets


B = sympy.Symbol("B", positive=True, integer=True)


@pytest.mark.parametrize("old, new, common", [
    ([32, 4 * B, 16], [32, B, 64], [32, B, 4, 16]),  # MHA's heads back into the width
    ([B, 64], [B, 4, 16], [B, 4, 16]),  # a pure split is its own refinement
    ([B, 1, 6], [B, 6, 1], [B, 6]),  # 1s are dropped
    ([2 * B, 6], [B, 12], [B, 2, 6]),
    ([B, 6], [B, 4, 3, 2], None),  # 6 and 4 cut the elements at different places
    ([4 * B, 3], [B, 12], [B, 4, 3]),
    ([6 * B], [4, 6 * B], None),  # 4 does not divide 6·B
])
def test_common_refinement_of_two_shapes(old, new, common):
    to_exprs = lambda sizes: [sympy.sympify(s) for s in sizes]  # noqa: E731
    assert _common_refinement(to_exprs(old), to_exprs(new)) == (None if common is None else to_exprs(common))


def test_a_reshape_that_recuts_a_batch_sized_dim_is_split_in_two_with_the_same_values():
    """MHA views its attention gradient [T, 4·B, 16] as [T, B, 64]; inductor indexes that (a
    symbolic modulus per element) slowly, so the step graph splits it at [T, B, 4, 16] first."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True), torch.nn.Flatten(), torch.nn.Linear(5 * 16, 3)
    )
    private = fxclip.transform(model, LOSS, 1.0)
    inputs, targets = torch.randn(6, 5, 16), torch.randint(0, 3, (6,))
    bound = private.bind(inputs, targets)
    graph, _ = CompiledStep(bound, 1.0).trace(bound.flat_args)
    reshapes = [n for n in graph.graph.nodes if n.target in (torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default)]
    splits = [n for n in reshapes if [str(s) for s in n.meta["val"].shape][2:] == ["4", "4"] and n.args[0].meta["val"].dim() == 3]
    assert splits, "no split of [T, 4·B, 4] at [T, B, 4, 4]"
    losses, norms, *_ = graph(torch.ones(6), *bound.flat_args)  # the graph run as Python: the same values
    torch.testing.assert_close(norms, private.step(inputs, targets).norms)


def test_bucket_sizes_pad_at_most_an_eighth_and_are_few():
    sizes = [bucket_size(b) for b in range(2, 1025)]
    assert all(s >= b and s <= b * 1.125 for b, s in zip(range(2, 1025), sizes))
    assert len({bucket_size(b) for b in range(100, 160)}) <= 6


@pytest.mark.compile
@pytest.mark.slow
def test_a_trace_that_fixes_the_batch_falls_back_to_buckets(monkeypatch):
    import fxclip.passes.compile as compile_pass

    def specialized(shape_env, batch):
        raise compile_pass.BatchSpecializedError("tracing the step fixed the batch size")

    monkeypatch.setattr(compile_pass, "_check_batch_symbolic", specialized)
    with pytest.warns(UserWarning, match="buckets"):
        compiled = _assert_steps_agree("mlp", [17])
    assert _compiled(compiled).batch_mode == "buckets"


class Lerp(torch.nn.Module):
    """torch.lerp with a learned weight."""

    def __init__(self):
        super().__init__()
        self.lin, self.mix = torch.nn.Linear(4, 4), torch.nn.Parameter(torch.rand(4))

    def forward(self, x):
        return torch.lerp(x, self.lin(x), self.mix)


def _lerp_steps(**options):
    return _steps(Lerp, LOSS, lambda size: ((torch.randn(size, 4),), torch.randint(0, 4, (size,))), **options)


def _steps(make_model, loss_fn, make_batch, max_grad_norm=1.0, **options):
    """(the transform, [(step result, gradients)] for batch sizes 6 and 9), seeded."""
    torch.manual_seed(0)
    model = make_model()
    t = fxclip.transform(model, loss_fn, max_grad_norm, **options)
    results = []
    for size in (6, 9):
        model.zero_grad(set_to_none=True)
        results.append((t.step(*make_batch(size)), [p.grad.clone() for p in model.parameters()]))
    return t, results


def _assert_same_steps(got, want):
    for (r, grads), (r0, grads0) in zip(got, want):
        torch.testing.assert_close(r.norms, r0.norms, rtol=1e-4, atol=1e-6)
        for g, g0 in zip(grads, grads0):
            torch.testing.assert_close(g, g0, rtol=1e-4, atol=1e-6)


@pytest.mark.compile
def test_a_trace_that_fails_with_a_symbolic_batch_falls_back_to_buckets(monkeypatch):
    import fxclip.passes.compile as compile_pass

    def make_fx(fn, **options):
        """make_fx whose trace fails on a symbolic size, as an op's fake kernel may (torch 2.13's
        lerp did without the Python dispatcher)."""
        def trace(*args):
            if any(isinstance(s, torch.SymInt) for a in args if isinstance(a, torch.Tensor) for s in a.shape):
                raise RuntimeError("cannot broadcast a symbolic size")
            return real(fn, **options)(*args)
        return trace

    real = compile_pass.make_fx
    monkeypatch.setattr(compile_pass, "make_fx", make_fx)
    _, want = _lerp_steps()
    with pytest.warns(UserWarning, match="symbolic batch failed.*buckets"):
        t, got = _lerp_steps(compile=True)
    _assert_same_steps(got, want)
    assert _compiled(t).batch_mode == "buckets"


@pytest.mark.compile
def test_a_new_clip_bound_applies_to_the_next_compiled_step():
    """A schedule of C: the compiled step's per-example bounds follow t.max_grad_norm."""
    _, want = _steps(Lerp, LOSS, lambda size: ((torch.randn(size, 4),), torch.randint(0, 4, (size,))), max_grad_norm=0.05)
    torch.manual_seed(0)
    model = Lerp()
    t = fxclip.transform(model, LOSS, 1.0, compile=True)
    got = []
    for size in (6, 9):
        batch = (torch.randn(size, 4),), torch.randint(0, 4, (size,))
        t.step(*batch)  # compiles at C = 1 (the first time)
        t.max_grad_norm = 0.05
        model.zero_grad(set_to_none=True)
        got.append((t.step(*batch), [p.grad.clone() for p in model.parameters()]))
    _assert_same_steps(got, want)
    assert all(r.clip_factors.max() < 1 for r, _ in got)


class Triplet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encode = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))

    def forward(self, anchor, positive, negative):
        return self.encode(anchor), self.encode(positive), self.encode(negative)


@pytest.mark.compile
def test_a_step_without_targets_compiles_once():
    """targets=None (a triplet loss) is a constant of the traced step, not a batched input."""
    loss_fn = lambda out, _: torch.nn.functional.triplet_margin_loss(*out, margin=2.0, reduction="none")
    batch = lambda size: (tuple(torch.randn(size, 4) for _ in range(3)), None)
    _, want = _steps(Triplet, loss_fn, batch)
    t, got = _steps(Triplet, loss_fn, batch, compile=True)
    _assert_same_steps(got, want)
    assert _compiled(t).compiles == 1


def test_a_step_that_cannot_be_compiled_runs_eagerly(monkeypatch):
    def broken(self, key, bounds, args):
        raise RuntimeError("C++ compile error")

    monkeypatch.setattr(CompiledStep, "_compile", broken)
    _, want = _lerp_steps()
    with pytest.warns(UserWarning, match="C\\+\\+ compile error.*runs eagerly"):
        t, got = _lerp_steps(compile=True)
    _assert_same_steps(got, want)
    (capture,) = t.captures
    assert capture.step.compile_failed and capture.step.compiled is None


def _traced_step(model, inputs, targets, **options):
    """(eager program, CompiledStep, the traced step graph with a symbolic batch): no compilation."""
    private = fxclip.transform(model, LOSS, 1.0, **options)
    private.step(inputs, targets)
    bound = private.bind(inputs, targets)
    step = CompiledStep(bound, 1.0, strategy=private.strategy)
    graph, _ = step.trace(bound.flat_args)  # raises if the batch got fixed
    return private, step, graph


def _assert_graph_computes_step(private, step, graph, inputs, targets):
    args = private.bind(inputs, targets).flat_args
    want = private.program(args, 1.0, private.strategy)
    got = graph(torch.full((targets.shape[0],), 1.0), *args)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-6)
    for key, g in zip(step.param_keys, got[3:]):
        torch.testing.assert_close(g, want[3][key], rtol=1e-4, atol=1e-6)


def _calls(graph, op) -> list:
    return [n for n in graph.graph.nodes if n.target is op]


def test_conv_step_traces_with_a_symbolic_batch_through_the_weight_grad_op():
    """The traced conv step (no compilation) keeps the batch a symbol and computes the eager
    step for another batch size. Per-example gradients of the small conv come from its patches
    (unfold), those of the large one from fxclip::conv_weight_grad (examples as groups, read at
    run time) — the only call of that op: both clipped sums reuse the per-example gradients."""
    from fxclip.rules.conv import PATCHES_MAX_ENTRIES

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1),
        torch.nn.Flatten(), torch.nn.Linear(8 * 16 * 16, 2),
    )
    assert 16 * 16 * 3 * 9 <= PATCHES_MAX_ENTRIES < 16 * 16 * 8 * 9  # one conv on each side
    gen = torch.Generator().manual_seed(3)
    batch = lambda b: ((torch.randn(b, 3, 16, 16, generator=gen),), torch.randint(0, 2, (b,), generator=gen))
    private, step, graph = _traced_step(model, *batch(6), strategy="materialize")
    assert len(_calls(graph, torch.ops.fxclip.conv_weight_grad.default)) == 1
    assert _calls(graph, torch.ops.aten.unfold.default)
    _assert_graph_computes_step(private, step, graph, *batch(9))


def test_weight_normed_step_traces_with_a_symbolic_batch():
    """The per-example vjp through weight norm (a vmap) keeps the batch a symbol: the fused
    kernel's backward has no batching rule, so vmap looped over the examples and fixed the batch
    (the step compiled once per bucket); decompose writes it out unfused."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(4, 6)), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    gen = torch.Generator().manual_seed(3)
    batch = lambda b: ((torch.randn(b, 4, generator=gen),), torch.randint(0, 2, (b,), generator=gen))
    private, step, graph = _traced_step(model, *batch(6))
    _assert_graph_computes_step(private, step, graph, *batch(9))


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_upsampling_step_traces_with_a_symbolic_batch(mode):
    """aten.upsample_*.vec's C++ composite kernel reads concrete sizes, which fixed the batch in
    the trace (one compile per bucket); the trace runs under the Python dispatcher, whose
    decompositions of these ops keep sizes symbolic."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.Upsample(scale_factor=2, mode=mode),
        torch.nn.Conv2d(3, 2, 3), torch.nn.Flatten(), torch.nn.Linear(2 * 10 * 10, 2),
    )
    gen = torch.Generator().manual_seed(3)
    batch = lambda b: ((torch.randn(b, 2, 6, 6, generator=gen),), torch.randint(0, 2, (b,), generator=gen))
    private, step, graph = _traced_step(model, *batch(6))
    _assert_graph_computes_step(private, step, graph, *batch(9))


class _LSTMNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm, self.head = torch.nn.LSTM(3, 4), torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.lstm(x)[0][-1])


def test_traced_lstm_step_computes_each_gram_product_once():
    """W_ih and W_hh of an LSTM are projected per step, so both linear ops of a step get the
    gradient at their sum; after CSE the traced step forms the gate-gradient Gram matrix once
    (not once per weight) and still equals the eager step at another batch size."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(4)
    batch = lambda b: ((torch.randn(5, b, 3, generator=gen),), torch.randint(0, 2, (b,), generator=gen))
    private, step, graph = _traced_step(_LSTMNet(), *batch(6), batch_dims=(1,), strategy="ghost")
    grams = [
        n for n in _calls(graph, torch.ops.aten.bmm.default)
        if tuple(n.meta["val"].shape[1:]) == (5, 5) and n.args[0].meta["val"].shape[-1] == 16  # the 4 gates, [B, T, 4·H]
    ]
    assert len(grams) == 1
    _assert_graph_computes_step(private, step, graph, *batch(9))


def test_traced_group_norm_rule_reuses_the_forward_normalization():
    """The group-norm rule reads x̂'s statistics from the native kernel called with the forward's
    own arguments, so after CSE the traced step normalizes once per layer, not twice."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.GroupNorm(2, 4), torch.nn.Flatten(), torch.nn.Linear(16, 3))
    batch = lambda b: ((torch.randn(b, 2, 4, 4, generator=gen),), torch.randint(0, 3, (b,), generator=gen))
    private, step, graph = _traced_step(model, *batch(6))
    assert len(_calls(graph, torch.ops.aten.native_group_norm.default)) == 1
    _assert_graph_computes_step(private, step, graph, *batch(9))


class _StandInGraph:
    """CUDA graph semantics on a CPU: recording remembers the call, replay runs it again on the
    recorded tensors and writes the results into the recorded outputs (the same memory)."""

    recording = None

    def __init__(self):
        self.call, self.outputs = None, None

    def replay(self):
        fn, args = self.call
        for out, new in zip(self.outputs, fn(*args)):
            out.copy_(new)


def _stand_in_cuda(monkeypatch):
    from contextlib import contextmanager

    @contextmanager
    def graph(g, pool=None):
        _StandInGraph.recording = g
        yield
        _StandInGraph.recording = None

    @contextmanager
    def stream(s):
        yield

    class Stream:
        def wait_stream(self, other):
            pass

    for name, value in {"CUDAGraph": _StandInGraph, "graph": graph, "stream": stream, "Stream": Stream,
                        "current_stream": lambda: Stream(), "graph_pool_handle": lambda: object()}.items():
        monkeypatch.setattr(torch.cuda, name, value)


def test_cuda_graph_replays_copy_the_batch_in_and_the_results_out(monkeypatch):
    """The replay logic of cuda_graphs=True, with a stand-in for CUDA graphs: a batch is copied
    into the graph's buffers, results come out as new tensors (the next replay overwrites the
    graph's own), a size gets one recording, and moved parameters are recorded again."""
    from fxclip.passes.compile import _StepGraphs

    _stand_in_cuda(monkeypatch)

    def step(bounds, x, w):
        outs = (bounds * 2, x @ w)
        if _StandInGraph.recording is not None:
            _StandInGraph.recording.call, _StandInGraph.recording.outputs = (step, (bounds, x, w)), outs
        return outs

    graphs = _StepGraphs({0: 0})  # input 0 is the batch, input 1 a parameter
    w = torch.randn(3, 2)
    x1, x2 = torch.randn(4, 3), torch.randn(4, 3)
    bounds = torch.full((4,), 0.5)
    first = graphs(("k",), step, bounds, [x1, w])
    kept = [t.clone() for t in first]
    second = graphs(("k",), step, bounds, [x2, w])
    torch.testing.assert_close(second[1], x2 @ w)
    for t, k in zip(first, kept):  # the first results were copied out, not overwritten
        torch.testing.assert_close(t, k)
    torch.testing.assert_close(kept[1], x1 @ w)
    assert graphs.records == 1
    w.data = torch.randn(3, 2)  # a parameter that moved (load_state_dict with assign=True)
    torch.testing.assert_close(graphs(("k",), step, bounds, [x1, w])[1], x1 @ w)
    assert graphs.records == 2
    graphs(("k",), step, torch.ones(8), [torch.randn(8, 3), w])  # another padded size
    assert graphs.records == 3


def test_cuda_graphs_need_compile_and_cuda():
    model = torch.nn.Linear(4, 3)
    with pytest.raises(fxclip.FxclipError, match="compile=True"):
        fxclip.transform(model, LOSS, 1.0, cuda_graphs=True)
    with pytest.raises(fxclip.FxclipError, match="True or False"):
        fxclip.transform(model, LOSS, 1.0, compile=True, cuda_graphs="yes")
    t = fxclip.transform(model, LOSS, 1.0, compile=True, cuda_graphs=True)
    with pytest.raises(fxclip.FxclipError, match="CUDA device; they are on cpu"):
        t.step(torch.randn(5, 4), torch.randint(0, 3, (5,)))
    assert all(p.grad is None for p in model.parameters())
