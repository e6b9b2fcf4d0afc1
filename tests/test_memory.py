"""Memory: the peak-memory probe, the memory side of the cost model (memory_budget), and the
peak memory of a private step relative to the non-private one."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxclip
from fxclip.memory import peak_memory, step_memory

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
    positions, k = 8, 14
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
