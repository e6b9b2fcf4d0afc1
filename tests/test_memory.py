"""Memory: the peak-memory probe, the memory side of the cost model (memory_budget), and the
peak memory of a private step relative to the non-private one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import fxclip
from fxclip.memory import peak_memory, step_memory
from helpers import check_against_reference, sum_loss

MiB = 2**20


def test_peak_memory_counts_tensors_alive_together():
    def fn():
        a = torch.ones(MiB // 4)  # 1 MiB of float32
        view = a[: MiB // 8]  # a view shares its storage: not counted again
        b = torch.ones(2 * MiB // 4)  # 2 MiB while `a` is alive
        del a, view, b
        c = torch.ones(MiB // 4)  # after both are freed: the peak stays at 3 MiB
        return c

    peak = peak_memory(fn)
    assert 3 * MiB <= peak < 3 * MiB + 64 * 1024


def test_peak_memory_of_a_first_step_that_captures_the_model():
    # the capture traces with fake tensors inside the measurement: they hold no memory to count
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 3))
    step = fxclip.transform(model, sum_loss, 1.0)
    x, y = torch.randn(64, 6), torch.randn(64, 3)
    first = peak_memory(lambda: step.step(x, y))
    assert 64 * 32 * 4 <= first < 64 * MiB  # at least the hidden activations; no fake tensor counted


def test_peak_memory_rejects_other_devices():
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
        peak_memory(lambda: None, device="meta")


class SequenceLinear(nn.Module):
    """One linear layer over T positions of width k: ghost needs 2T² extra numbers per example,
    materialize k², while the flop counts prefer materialize when k < about 2T."""

    def __init__(self, k: int):
        super().__init__()
        self.proj = nn.Linear(k, k, bias=False)

    def forward(self, x):
        return self.proj(x).sum(1)


def weight_strategy(t: fxclip.PrivateStep) -> tuple[str, dict]:
    (entry,) = [e for e in t.program.plan if e.use.params == ("proj.weight",)]
    return entry.strategy, entry.costs


def test_memory_budget_flips_materialize_to_ghost():
    positions, k = 16, 24  # materialize: least flops + MEMORY_COST · memory, though ghost needs less memory
    x = torch.randn(4, positions, k, dtype=torch.float64)
    y = torch.randn(4, k, dtype=torch.float64)
    model = SequenceLinear(k).double()
    loss = lambda out, target: ((out - target) ** 2).sum(1)

    free = fxclip.transform(model, loss, 1.0)
    free_norms = free.step(x, y).norms
    strategy, costs = weight_strategy(free)
    assert strategy == "materialize"
    assert costs["flops"]["materialize"] < costs["flops"]["ghost"]
    assert costs["memory"] == {"ghost": 2 * positions**2, "materialize": k * k}

    budget = (costs["memory"]["ghost"] + costs["memory"]["materialize"]) / 2  # only ghost fits
    tight = fxclip.transform(model, loss, 1.0, memory_budget=budget)
    tight_norms = tight.step(x, y).norms
    assert weight_strategy(tight)[0] == "ghost"
    torch.testing.assert_close(tight_norms, free_norms, rtol=1e-12, atol=0)


def test_memory_budget_below_every_strategy_takes_the_smallest():
    model = SequenceLinear(14).double()
    t = fxclip.transform(model, lambda out, y: ((out - y) ** 2).sum(1), 1.0, memory_budget=1)
    t.step(torch.randn(4, 8, 14, dtype=torch.float64), torch.randn(4, 14, dtype=torch.float64))
    strategy, costs = weight_strategy(t)
    assert strategy == min(costs["memory"], key=costs["memory"].get) == "ghost"


def test_private_step_memory_relative_to_non_private():
    mem = step_memory("mlp", batch=256)
    assert {"nonprivate", "fxclip"} <= set(mem)
    assert mem["nonprivate"] > 0
    # Book-keeping keeps every parametrized op's output gradient until the clip factors are known:
    # about 2x the non-private step for this MLP (docs/benchmarks.md has B=1024 numbers); a regression
    # that materializes per-example gradients of the 128x128 layers would exceed 3x.
    assert mem["fxclip"] <= 3 * mem["nonprivate"], mem


def _peak(name: str, batch: int, method: str = "fxclip", **options) -> int:
    from fxclip.tools.bench.methods import METHODS
    from fxclip.zoo import ZOO, PerExampleCrossEntropy

    inputs, targets = ZOO[name].make_batch(batch, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    step = METHODS[method](ZOO[name].factory(), PerExampleCrossEntropy(), 1.0, inputs, targets, **options).step
    step()  # capture first
    return peak_memory(step)


def test_cnn_step_does_not_keep_op_outputs_alive():
    # The step holds gradient edges, not the conv outputs: 1.25x the non-private step at B=1024
    # (docs/memory.md); holding the conv outputs through the backward was 1.52x.
    assert _peak("mnist_cnn", 256) <= 1.35 * _peak("mnist_cnn", 256, "floor")


def test_physical_batches_bound_memory():
    full = _peak("transformer", 128)
    chunked = _peak("transformer", 128, max_physical_batch_size=32)
    assert chunked <= 0.4 * full, (chunked, full)


@pytest.mark.parametrize("size", [4, 5, 100])
def test_physical_batches_give_the_batch_result(size):
    """A batch in chunks equals the batch in one go: per-example results concatenated, clipped
    sums added; here with the batch along dim 1 of the input (sequence-first)."""
    torch.manual_seed(0)
    model = nn.GRU(6, 5).double()
    loss = lambda out, y: ((out[0].sum(0) - y) ** 2).sum(1)
    x = torch.randn(7, 10, 6, dtype=torch.float64)  # [T, B, E]
    y = torch.randn(10, 5, dtype=torch.float64)
    results = {}
    for chunk in (None, size):
        model.zero_grad(set_to_none=True)
        res = fxclip.transform(model, loss, 0.5, batch_dims=(1,), max_physical_batch_size=chunk).step(x, y)
        results[chunk] = res, [p.grad.clone() for p in model.parameters()]
    (whole, whole_grads), (parts, part_grads) = results[None], results[size]
    for a, b in zip((whole.losses, whole.norms, whole.clip_factors, *whole_grads), (parts.losses, parts.norms, parts.clip_factors, *part_grads)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "8", np.float64(4.0)])
def test_physical_batch_size_must_be_a_positive_int(bad):
    with pytest.raises(fxclip.FxclipError, match="max_physical_batch_size"):
        fxclip.transform(nn.Linear(2, 2), lambda out, y: out.sum(1), 1.0, max_physical_batch_size=bad)


def test_physical_batch_size_takes_a_numpy_int():
    t = fxclip.transform(nn.Linear(2, 2), lambda out, y: out.sum(1), 1.0, max_physical_batch_size=np.int64(3))
    assert t.options.max_physical_batch_size == 3 and type(t.options.max_physical_batch_size) is int
    t.step(torch.randn(7, 2), torch.zeros(7))


def _zoo_step(name: str, batch: int, **options):
    from fxclip.zoo import ZOO, PerExampleCrossEntropy

    inputs, targets = ZOO[name].make_batch(batch, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = ZOO[name].factory()
    return model, fxclip.transform(model, PerExampleCrossEntropy(), 1.0, **options), inputs, targets


def test_auto_physical_batch_is_the_largest_that_fits_the_memory_limit():
    model, t, inputs, targets = _zoo_step("transformer", 64)
    whole = t.step(inputs, targets)
    whole_grads = [p.grad.clone() for p in model.parameters()]
    limit = 0.3 * peak_memory(lambda: t.step(inputs, targets))

    model, t, inputs, targets = _zoo_step("transformer", 64, max_physical_batch_size="auto", memory_limit=limit)
    parts = t.step(inputs, targets)  # measured as it runs: the same result as the batch in one piece
    for a, b in zip((whole.losses, whole.norms, *whole_grads), (parts.losses, parts.norms, *(p.grad for p in model.parameters()))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    size = t.physical_batch_size
    assert 4 < size < 64
    model.zero_grad(set_to_none=True)
    assert peak_memory(lambda: t.step(inputs, targets)) <= limit  # later steps, unmeasured, fit
    _, larger, inputs, targets = _zoo_step("transformer", 64, max_physical_batch_size=size + size // 4)
    larger.step(inputs, targets)
    assert peak_memory(lambda: larger.step(inputs, targets)) > limit  # and a quarter more would not


def test_auto_physical_batch_refuses_a_limit_below_one_example():
    model, t, inputs, targets = _zoo_step("transformer", 16, max_physical_batch_size="auto", memory_limit=100_000)
    with pytest.raises(fxclip.FxclipError, match="does not hold a step on one example"):
        t.step(inputs, targets)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("options", [{"max_physical_batch_size": "auto"}, {"memory_limit": 2**20}, {"max_physical_batch_size": 8, "memory_limit": 2**20},
                                     {"max_physical_batch_size": "auto", "memory_limit": -1}])
def test_auto_physical_batch_and_memory_limit_go_together(options):
    with pytest.raises(fxclip.FxclipError, match="memory_limit"):
        fxclip.transform(nn.Linear(2, 2), lambda out, y: out.sum(1), 1.0, **options)


@pytest.mark.slow
def test_compiled_resnet_step_peak_within_target_of_non_private():
    """The compiled step's peak resident memory, measured as the benchmark does (a fresh process
    per method), is within 1.3x the non-private step's on the GroupNorm ResNet. It read 1.8x when
    inductor fused the per-example reductions into one kernel at the end of the step, keeping
    every group norm's input alive through the backward."""
    from fxclip.tools.bench.runner import _peak_bytes

    cpu = torch.device("cpu")
    floor = _peak_bytes("resnet_gn", 64, "floor", cpu, None)
    private = _peak_bytes("resnet_gn", 64, "fxclip_compiled", cpu, None)
    assert floor and private, "the peak-memory subprocess failed"
    assert private <= 1.3 * floor, f"{private / MiB:.1f} MiB vs {floor / MiB:.1f} MiB non-private"


class LayerNormTagger(nn.Module):
    """Linear, layer norm, a learned per-channel scale, linear: over [B, T, 6] sequences."""

    def __init__(self):
        super().__init__()
        self.inp, self.norm, self.out = nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3)
        self.scale = nn.Parameter(torch.randn(8))

    def forward(self, x):
        return self.out(torch.tanh(self.norm(self.inp(x)) * self.scale))


def test_small_per_example_gradients_are_made_inside_the_backward():
    """The layer norm's and the scale's per-example gradients (smaller than their output
    gradients) are made by hooks inside the backward, chosen when the step is planned, so that
    the compiled step frees what they read there; the linear layers' factor forms wait for the
    clip factors. Every step gives the reference's norms and clipped sums."""
    torch.manual_seed(0)
    model = LayerNormTagger().double()
    x, y = torch.randn(5, 7, 6, dtype=torch.float64), torch.randn(5, 7, 3, dtype=torch.float64)
    t = fxclip.transform(model, sum_loss, 0.5)
    check_against_reference(t, (x,), y, rtol=1e-10)
    chosen = sorted(str(node.target) for node in t.program.step_plan.in_backward)
    assert any("layer_norm" in op for op in chosen) and any("mul" in op for op in chosen), chosen
    assert not any("linear" in op for op in chosen), chosen
    check_against_reference(t, (x,), y, rtol=1e-10)
    made = {entry.use.node for entry in t.program.plan if entry.in_backward}
    assert made == t.program.step_plan.in_backward
