"""The non-compiled step after its first steps: the step graph run as Python code
(CompiledStep, backend "python"), equal to the program's step, traced once for every batch size."""

import warnings

import pytest
import torch

import fxclip
from fxclip.captures import TRACE_AFTER_STEPS
from fxclip.passes.compile import CompiledStep
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
