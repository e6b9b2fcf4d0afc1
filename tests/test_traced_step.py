"""The non-compiled step after its first steps: the step graph run as Python code
(CompiledStep, backend "python"), equal to the program's step, traced once for every batch size."""

import re
import warnings

import pytest
import torch

import fxclip
import fxclip.passes.compile as compile_module
from fxclip.captures import TRACE_AFTER_STEPS
from fxclip.passes.compile import CompiledStep, _OpByOp, _python_binding
from fxclip.peak import peak_memory
from fxclip.zoo import ZOO, PerExampleCrossEntropy

LOSS = PerExampleCrossEntropy()


def _transformed(name: str, **options):
    torch.manual_seed(0)
    model = ZOO[name].factory()
    return model, fxclip.transform(model, LOSS, 1.0, **options)


def _warmed_up(name: str, **options):
    """A model and its PrivateStep after the steps that make it trace."""
    model, t = _transformed(name, **options)
    inputs, targets = ZOO[name].make_batch(6, torch.Generator().manual_seed(0))
    for _ in range(TRACE_AFTER_STEPS):
        t.step(inputs, targets)
    return model, t


def _traced(t: fxclip.PrivateStep) -> CompiledStep | None:
    (capture,) = t.captures
    return capture.step.compiled


def _targets(graph: torch.fx.GraphModule) -> list:
    return [n.target for n in graph.graph.nodes if n.op == "call_function"]


def _assert_step_is_the_programs(model, t, inputs, targets, strategy="auto"):
    """t.step equals the capture's program run on the same batch (norms, clip factors, sums)."""
    bound = t.bind(inputs, targets)
    want = bound.program(bound.flat_args, 1.0, strategy)
    model.zero_grad(set_to_none=True)
    got = t.step(inputs, targets)
    torch.testing.assert_close(got.losses, want.losses, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.norms, want.norms, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.clip_factors, want.clip_factors, rtol=1e-5, atol=1e-6)
    for key, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want.grads[key], rtol=1e-5, atol=1e-6, msg=key)


SLOW_TO_TRACE = {"lstm", "gru"}  # their recurrences unroll into thousands of nodes (5-13 s a trace)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_TO_TRACE else n for n in ZOO])
def test_traced_step_equals_the_program_and_traces_once_for_all_batch_sizes(name):
    model, t = _warmed_up(name)
    assert _traced(t) is None  # the steps so far ran the program
    gen = torch.Generator().manual_seed(1)
    for size in (9, 1, 4):  # a batch of one runs padded to two, with a padding row clipped to 0
        inputs, targets = ZOO[name].make_batch(size, gen)
        _assert_step_is_the_programs(model, t, inputs, targets)
    assert _traced(t).backend == "python" and _traced(t).compiles == 1


def test_a_graph_traced_under_autocast_runs_only_under_it():
    # the graph holds the forward's casts: one traced under bf16 autocast would cast again
    model, t = _transformed("mlp")
    inputs, targets = ZOO["mlp"].make_batch(8, torch.Generator().manual_seed(0))
    bound = t.bind(inputs, targets)
    step = CompiledStep(bound, 1.0, backend="python")
    for autocast in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            want = bound.program(bound.flat_args, 1.0, "auto")
            got = step(bound.flat_args)
        assert got.norms.dtype == want.norms.dtype == torch.float32
        torch.testing.assert_close(got.norms, want.norms, rtol=1e-5, atol=1e-6)
    assert step.compiles == 2


def test_a_new_strategy_traces_a_new_graph():
    model, t = _warmed_up("small_cnn")
    inputs, targets = ZOO["small_cnn"].make_batch(5, torch.Generator().manual_seed(0))
    t.step(inputs, targets)
    t.strategy = "materialize"
    _assert_step_is_the_programs(model, t, inputs, targets, strategy="materialize")
    assert _traced(t).strategy == "materialize"
    assert {entry.strategy for entry in t.program.plan} == {"materialize"}


@pytest.mark.parametrize("error", [RuntimeError("an op without a fake kernel"), fxclip.FxclipError("a refusal on fake tensors")])
def test_a_step_that_cannot_be_traced_runs_the_program_without_a_warning(monkeypatch, error):
    def untraceable(self, *args, **kwargs):
        raise error

    monkeypatch.setattr(CompiledStep, "_trace", untraceable)
    model, t = _warmed_up("mlp")
    inputs, targets = ZOO["mlp"].make_batch(5, torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _assert_step_is_the_programs(model, t, inputs, targets)
    assert t.captures[0].step.compile_failed and _traced(t) is None


def test_traced_step_frees_values_after_their_last_use():
    # the program holds the forward's values, forms and products until its norms and sums are done
    model, t = _transformed("transformer")
    inputs, targets = ZOO["transformer"].make_batch(16, torch.Generator().manual_seed(0))
    t.step(inputs, targets)  # the capture
    program_peak = peak_memory(lambda: t.step(inputs, targets))
    for _ in range(TRACE_AFTER_STEPS - 1):
        t.step(inputs, targets)
    assert _traced(t) is not None
    assert peak_memory(lambda: t.step(inputs, targets)) < 0.85 * program_peak


def _aten_overloads():
    for schema in torch._C._jit_get_all_schemas():
        namespace, _, name = schema.name.partition("::")
        if namespace == "aten":
            yield getattr(getattr(torch.ops.aten, name), schema.overload_name or "default")


def test_every_python_binding_is_called_by_the_name_the_graph_code_gives_it():
    # the python backend calls aten ops through their C bindings; fx writes each as a dotted name
    # (torch.mul, torch.Tensor.view), which must be that binding and not a Python wrapper of it
    bindings = {b for op in _aten_overloads() if (b := _python_binding(op)) is not None}
    assert torch._C._VariableFunctions.mul in bindings and torch._C.TensorBase.view in bindings
    assert torch._C.TensorBase.split not in bindings  # Tensor.split is Python, with other arguments
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    nodes = {binding: graph.call_function(binding, (x,)) for binding in bindings}
    graph.output(list(nodes.values()))
    code = torch.fx.GraphModule(torch.nn.Module(), graph)
    called = dict(re.findall(r"^\s*(\w+) = ([\w.]+)\(", code.code, re.MULTILINE))
    namespace = code.forward.__globals__
    for binding, node in nodes.items():
        assert eval(called[node.name], namespace) is binding, node.name


def test_the_traced_graph_runs_aten_ops_through_python_bindings_and_shows_aten_ops():
    model, t = _warmed_up("mlp")
    inputs, targets = ZOO["mlp"].make_batch(5, torch.Generator().manual_seed(0))
    _assert_step_is_the_programs(model, t, inputs, targets)
    shown = _targets(_traced(t).step_graph)
    assert torch.ops.aten.mm.default in shown and torch._C._VariableFunctions.mm not in shown
    (run,) = _traced(t)._compiled.values()
    ran = _targets(run.bound)
    assert torch._C._VariableFunctions.mm in ran and torch.ops.aten.mm.default not in ran
    # backward ops have no binding and stay aten ops
    assert torch.ops.aten.tanh_backward.default in ran
    # a factor's view, permute, view, unsqueeze is one view (test_a_chain_of_views_...); detach goes
    assert not {torch.permute, torch.detach} & set(ran)


def _index_put_graph() -> torch.fx.GraphModule:
    # index_put's Python binding takes no None among its indices; the aten op does
    graph = torch.fx.Graph()
    x, index, values = graph.placeholder("x"), graph.placeholder("index"), graph.placeholder("values")
    put = graph.call_function(torch.ops.aten.index_put.default, (x, [None, index], values, True))
    graph.output([graph.call_function(torch.ops.aten.mul.Tensor, (put, put))])
    return torch.fx.GraphModule(torch.nn.Module(), graph)


def test_a_binding_that_disagrees_with_its_aten_op_is_not_used(monkeypatch):
    args = (torch.zeros(2, 3), torch.tensor([0, 2, 0]), torch.ones(2, 3))
    want = _index_put_graph()(*args)
    run = _OpByOp(_index_put_graph(), "cpu")
    # a wrong binding for mul: the check sees other values and keeps the aten op
    wrong = {torch.ops.aten.mul.Tensor: torch._C._VariableFunctions.add}
    monkeypatch.setattr(compile_module, "_python_binding", wrong.get)
    for _ in range(2):  # the checked run, then the bound graph
        assert torch.equal(run(*args)[0], want[0])
    assert _targets(run.bound) == [torch.ops.aten.index_put.default, torch.ops.aten.mul.Tensor]
    monkeypatch.undo()
    run = _OpByOp(_index_put_graph(), "cpu")
    for _ in range(2):
        assert torch.equal(run(*args)[0], want[0])
    assert _targets(run.bound) == [torch.ops.aten.index_put.default, torch.mul]


def _traced_with_symbolic_batch(fn, x: torch.Tensor) -> torch.fx.GraphModule:
    """`fn` traced as the step graph is: fake tensors whose first dim is the one symbol."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    mode = FakeTensorMode(shape_env=ShapeEnv(duck_shape=False))
    sizes = [DimDynamic.DYNAMIC] + [DimDynamic.STATIC] * (x.dim() - 1)
    fake = mode.from_tensor(x, symbolic_context=StatelessSymbolicContext(dynamic_sizes=sizes))
    with mode:
        return make_fx(lambda x: (fn(x),), tracing_mode="fake")(fake)


VIEW = torch._C.TensorBase.view
# (the function on a [B, 6] batch, the ops its bound graph calls): a chain of views that keeps the
# elements' order is one view of its first input (or that input itself); a transpose of two sizes
# > 1 reorders them and ends a chain
VIEW_CHAINS = {
    "size-1 dims moved": (lambda x: x.view(1, -1, 1, 6).permute(1, 0, 2, 3).view(-1, 1, 6).unsqueeze(1) * 2, [VIEW, torch.mul]),
    "back to its own sizes": (lambda x: x.unsqueeze(0).transpose(0, 1).view(-1, 6) * 2, [torch.mul]),
    "a transpose of two sizes > 1": (
        lambda x: x.view(-1, 2, 3).transpose(1, 2).unsqueeze(0).view(1, -1, 3, 2) * 2,
        [VIEW, torch.transpose, VIEW, torch.mul],
    ),
    "a detach": (lambda x: x.detach() * 2, [torch.mul]),
}


@pytest.mark.parametrize("case", VIEW_CHAINS)
def test_a_chain_of_views_that_keeps_the_order_runs_as_one_view(case):
    fn, ops = VIEW_CHAINS[case]
    run = _OpByOp(_traced_with_symbolic_batch(fn, torch.randn(4, 6)), "cpu")
    for size in (4, 4, 7):  # the checked run, then the bound graph at the checked size and another
        x = torch.randn(size, 6)
        (got,) = run(x)
        want = fn(x)
        assert torch.equal(got, want) and got.stride() == want.stride()
    assert [t for t in _targets(run.bound) if t is not torch._C.TensorBase.size] == ops


def test_a_collapsed_view_with_other_strides_than_the_chain_is_not_used():
    # the permute gives the moved size-1 dim its own stride ([B, 1, 1, 6]: (6, 6B, 6, 1)), one
    # view another ((6, 6, 6, 1)): the same values, but the check keeps the chain
    def fn(x):
        return x.view(1, -1, 1, 6).permute(1, 0, 2, 3) * 2

    run = _OpByOp(_traced_with_symbolic_batch(fn, torch.randn(4, 6)), "cpu")
    for size in (4, 4, 7):
        x = torch.randn(size, 6)
        (got,) = run(x)
        assert torch.equal(got, fn(x))
    assert [t for t in _targets(run.bound) if t is not torch._C.TensorBase.size] == [VIEW, torch.permute, torch.mul]
