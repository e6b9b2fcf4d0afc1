"""Recurrent layers (nn.RNN, nn.GRU, nn.LSTM and their cells): exact per-example norms and clipped
sums against a per-example reference, and the decompose pass that makes them possible."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxclip
from fxclip.passes import Context
from fxclip.passes.capture import capture
from fxclip.passes.decompose import CELLS, LAYERS, decompose
from fxclip.passes.functionalize import functionalize
from fxclip.reference import clipped_sum, naive_per_example_grads, per_example_grads
from helpers import relative_error

IN, HIDDEN, CLASSES, STEPS = 3, 5, 3, 4


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


class Recurrent(nn.Module):
    """`cls(IN, HIDDEN, **options)`, mean over time, a linear head; initial states are optional
    model inputs after the sequence."""

    def __init__(self, cls, batch_first=True, **options):
        super().__init__()
        self.batch_first = batch_first
        self.rnn = cls(IN, HIDDEN, batch_first=batch_first, **options)
        directions = 2 if options.get("bidirectional") else 1
        self.head = nn.Linear(directions * (options.get("proj_size") or HIDDEN), CLASSES)

    def forward(self, x, *state):
        hx = tuple(state) if len(state) == 2 else (state[0] if state else None)
        out = self.rnn(x, hx)[0]
        return self.head(out.mean(1 if self.batch_first else 0))


class Cells(nn.Module):
    """LSTMCell -> GRUCell -> RNNCell stepped in a user loop: each cell's weights are used at
    every step."""

    def __init__(self, bias=True):
        super().__init__()
        self.lstm = nn.LSTMCell(IN, HIDDEN, bias=bias)
        self.gru = nn.GRUCell(HIDDEN, HIDDEN, bias=bias)
        self.rnn = nn.RNNCell(HIDDEN, HIDDEN, bias=bias, nonlinearity="relu")
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x):
        state, g, r = None, None, None
        for t in range(x.shape[1]):
            state = self.lstm(x[:, t], state)
            g = self.gru(state[0], g)
            r = self.rnn(g, r)
        return self.head(r)


def check(model, inputs, targets, batch_dims=None, dtype=torch.float64, strategy="auto", rtol=1e-8, max_grad_norm=0.5):
    """One fxclip step against the per-example loop (torch.func cannot vmap a fused recurrent
    op that creates its own zero state); returns the transform."""
    model = model.to(dtype)
    inputs = tuple(x.to(dtype) if x.is_floating_point() else x for x in inputs)
    t = fxclip.transform(model, ce, max_grad_norm, batch_dims=batch_dims, strategy=strategy)
    result = t.step(inputs, targets)
    ref_norms, ref_clipped = clipped_sum(naive_per_example_grads(model, ce, inputs, targets, batch_dims), max_grad_norm)
    assert relative_error(result.norms, ref_norms) <= rtol, (result.norms, ref_norms)
    scale = max(float(g.abs().max()) for g in ref_clipped.values())
    for name, p in model.named_parameters():
        assert relative_error(p.grad, ref_clipped[name], scale) <= rtol, name
    assert not t.fallbacks
    return t


def batch(size=4, seed=0, steps=STEPS):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(size, steps, IN, generator=gen), torch.randint(0, CLASSES, (size,), generator=gen)


LAYER_OPTIONS = {
    "plain": {},
    "bias_off": {"bias": False},
    "two_layers_bidirectional": {"num_layers": 2, "bidirectional": True},
}
RECURRENT = {"rnn_tanh": (nn.RNN, {}), "rnn_relu": (nn.RNN, {"nonlinearity": "relu"}), "gru": (nn.GRU, {}), "lstm": (nn.LSTM, {})}


@pytest.mark.parametrize("option", sorted(LAYER_OPTIONS))
@pytest.mark.parametrize("kind", sorted(RECURRENT))
def test_layer_matches_per_example_loop(kind, option):
    torch.manual_seed(0)
    cls, base = RECURRENT[kind]
    x, y = batch()
    check(Recurrent(cls, **base, **LAYER_OPTIONS[option]), (x,), y)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_time_major_layer_with_initial_states_passed_in(kind):
    torch.manual_seed(1)
    cls, _ = RECURRENT[kind]
    x, y = batch()
    gen = torch.Generator().manual_seed(5)
    states = [torch.randn(2, 4, HIDDEN, generator=gen) for _ in range(2 if kind == "lstm" else 1)]
    model = Recurrent(cls, batch_first=False, num_layers=2)
    check(model, (x.transpose(0, 1), *states), y, batch_dims=(1,) + (1,) * len(states))


def test_lstm_with_projection_stacked_and_bidirectional():
    torch.manual_seed(2)
    x, y = batch()
    check(Recurrent(nn.LSTM, proj_size=2, num_layers=2, bidirectional=True), (x,), y)


@pytest.mark.parametrize("bias", [True, False])
def test_cells_in_a_user_loop(bias):
    torch.manual_seed(3)
    x, y = batch()
    check(Cells(bias), (x,), y)


def test_float32_within_1e4():
    torch.manual_seed(4)
    x, y = batch(6)
    check(Recurrent(nn.LSTM, num_layers=2), (x,), y, dtype=torch.float32, rtol=1e-4)
    check(Recurrent(nn.GRU, bidirectional=True), (x,), y, dtype=torch.float32, rtol=1e-4)


@pytest.mark.parametrize("strategy", ["ghost", "materialize"])
def test_forced_strategies_agree(strategy):
    torch.manual_seed(5)
    x, y = batch()
    check(Recurrent(nn.LSTM, bidirectional=True), (x,), y, strategy=strategy)


def test_recurrent_weights_are_one_shared_norm_over_all_steps():
    """W_hh and b_hh: one "shared" component with a use per step and one strategy for all of
    them, costed over T positions (the norm of the sum over steps, not a sum of step norms)."""
    torch.manual_seed(6)
    x, y = batch(steps=7)
    t = check(Recurrent(nn.GRU), (x,), y)
    for name in ("rnn.weight_hh_l0", "rnn.bias_hh_l0"):
        entries = [e for e in t.program.plan if e.use.params == (name,)]
        assert len(entries) == 7
        assert {e.component.kind for e in entries} == {"shared"}
        assert len({e.strategy for e in entries}) == 1
    # the weight's steps are one linear form over T positions; the bias's are built (bias_form)
    assert [e for e in t.program.plan if e.use.params == ("rnn.weight_hh_l0",)][0].costs["shapes"]["T"] == 7
    hoisted = [e for e in t.program.plan if e.use.params == ("rnn.weight_ih_l0",)]
    assert len(hoisted) == 1 and hoisted[0].component.kind == "separate"


def test_matches_vmap_reference_when_states_are_given():
    """With the initial state passed in, torch.func can vmap the fused op: a second reference."""
    torch.manual_seed(7)
    x, y = batch()
    h0 = torch.randn(1, 4, HIDDEN, dtype=torch.float64)
    model = Recurrent(nn.LSTM).double()
    inputs = (x.double(), h0, torch.zeros_like(h0))
    t = fxclip.transform(model, ce, 1.0, batch_dims=(0, 1, 1))
    result = t.step(inputs, y)
    ref_norms, _ = clipped_sum(per_example_grads(model, ce, inputs, y, (0, 1, 1)), 1.0)
    assert relative_error(result.norms, ref_norms) <= 1e-8


def _captured(model, x, y):
    ctx = Context(model=model, loss_fn=ce, example_inputs=(x,), example_targets=y, batch_dims=(0,))
    return functionalize(capture(None, ctx), ctx), ctx


@pytest.mark.parametrize(
    "model",
    [
        Recurrent(nn.LSTM, num_layers=2, bidirectional=True, proj_size=2),
        Recurrent(nn.GRU, num_layers=2, bidirectional=True),
        Recurrent(nn.RNN, num_layers=2, nonlinearity="relu", bias=False),
        Cells(),
    ],
    ids=["lstm", "gru", "rnn", "cells"],
)
def test_decomposition_computes_the_same_values(model):
    """The pass leaves no fused op and changes no value (float64, where ATen runs the same
    arithmetic; float32 LSTM/GRU kernels may go through oneDNN and round differently)."""
    model = model.double()
    x, y = batch(5)
    x = x.double()
    gm, ctx = _captured(model, x, y)
    args = [*model.parameters(), x, y]
    before = gm(*args)[0]
    after = decompose(gm, ctx)(*args)[0]
    fused = set(LAYERS) | set(CELLS)
    assert not any(n.target in fused for n in gm.graph.nodes)
    assert any(n.target is torch.ops.aten.linear.default for n in gm.graph.nodes)
    torch.testing.assert_close(after, before, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(after, ce(model(x), y), rtol=1e-14, atol=1e-14)


def test_dropout_between_layers_is_kept_in_training_mode():
    model = Recurrent(nn.LSTM, num_layers=3, dropout=0.5)
    x, y = batch()
    gm, ctx = _captured(model, x, y)
    gm = decompose(gm, ctx)
    dropouts = [n for n in gm.graph.nodes if n.target is torch.ops.aten.dropout.default]
    assert len(dropouts) == 2 and all(n.args[1:] == (0.5, True) for n in dropouts)
    model.eval()
    gm, ctx = _captured(model, x, y)
    assert not any(n.target is torch.ops.aten.dropout.default for n in decompose(gm, ctx).graph.nodes)


def test_every_decomposed_node_names_the_module():
    """New nodes carry the fused op's source (error messages name the user's module) and values."""
    x, y = batch()
    gm, ctx = _captured(Recurrent(nn.GRU), x, y)
    before = {n.name for n in gm.graph.nodes}
    added = [n for n in decompose(gm, ctx).graph.nodes if n.name not in before]
    assert len(added) > 4 * STEPS
    assert all("rnn" in str(n.meta["nn_module_stack"]) and "val" in n.meta for n in added)


def test_fused_gpu_cells_written_out_compute_the_cells():
    """What nn.GRUCell and nn.LSTMCell run on a GPU after their matrix products (aten's fused
    cells, which have no CPU kernel) is written out by decompose; the same values as the cells."""
    from fxclip.passes.decompose import _gru_cell_unfused, _lstm_cell_unfused

    torch.manual_seed(0)
    x, h, c = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    gru, lstm = nn.GRUCell(5, 4).double(), nn.LSTMCell(5, 4).double()
    h_gru, workspace = _gru_cell_unfused(x @ gru.weight_ih.T, h @ gru.weight_hh.T, h, gru.bias_ih, gru.bias_hh)
    torch.testing.assert_close(h_gru, gru(x, h), rtol=1e-12, atol=1e-12)
    assert workspace.shape == (3, 20)
    h_lstm, c_lstm, _ = _lstm_cell_unfused(x @ lstm.weight_ih.T, h @ lstm.weight_hh.T, c, lstm.bias_ih, lstm.bias_hh)
    for got, expected in zip((h_lstm, c_lstm), lstm(x, (h, c))):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_an_eager_step_concatenates_the_per_step_gradients_once(monkeypatch):
    """W_hh and b_hh of an LSTM read the same per-step gate gradients: the eager step concatenates
    them once and reuses the Gram product of the concatenation (the compiled step's graph merges
    them by CSE), with the same results as computing each use's own."""
    from contextlib import nullcontext

    from torch.utils._python_dispatch import TorchDispatchMode

    import fxclip.passes.program as program

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func)
            return func(*args, **(kwargs or {}))

    def step():
        torch.manual_seed(0)
        model = Recurrent(nn.LSTM).double()
        x, y = batch()
        private = fxclip.transform(model, ce, max_grad_norm=0.5, strategy="ghost")
        private.step(x.double(), y)  # the capture
        model.zero_grad()
        counter = Count()
        counter.ops = []
        with counter:
            result = private.step(x.double(), y)
        return result, {k: p.grad.clone() for k, p in model.named_parameters()}, counter.ops

    reused, reused_grads, reused_ops = step()
    monkeypatch.setattr(program, "reusing_products", nullcontext)
    own, own_grads, own_ops = step()
    concats = [ops.count(torch.ops.fxclip.concat.default) for ops in (reused_ops, own_ops)]
    grams = [ops.count(torch.ops.aten.bmm.default) for ops in (reused_ops, own_ops)]
    assert concats[0] < concats[1] and grams[0] < grams[1], (concats, grams)
    torch.testing.assert_close(reused.norms, own.norms, rtol=0, atol=0)
    for k in own_grads:
        torch.testing.assert_close(reused_grads[k], own_grads[k], rtol=0, atol=0)
