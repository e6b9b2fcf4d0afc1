"""The public rule API: user rules for custom ops and uncovered aten ops, check_rule, and the
fallback for custom ops without a rule."""

from __future__ import annotations

import pytest
import torch

import fxclip
from fxclip import PerExampleGrad
from fxclip.reference import clipped_sum, naive_per_example_grads, per_example_grads
from fxclip.rules import RULES
from fxclip.testing import check_rule
from helpers import ce


@torch.library.custom_op("fxclip_tests::channel_scale", mutates_args=())
def channel_scale(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """y[b, c, l] = x[b, c, l] · w[c]"""
    return x * weight[:, None]


@channel_scale.register_fake
def _(x, weight):
    return torch.empty_like(x)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    return grad * weight[:, None], (grad * x).sum((0, 2))


channel_scale.register_autograd(_backward, setup_context=_setup)


@torch.library.custom_op("fxclip_tests::no_autograd_scale", mutates_args=())
def no_autograd_scale(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x * weight[:, None]


@no_autograd_scale.register_fake
def _(x, weight):
    return torch.empty_like(x)


CHANNEL_SCALE = torch.ops.fxclip_tests.channel_scale.default


def per_channel(call, h):
    """[B, C, L] laid out like the op's output (batch in dim 0) -> Σ_l per example: [B, C]."""
    return h.reshape(call.batch_size, call["weight"].shape[0], -1).sum(-1)


def channel_scale_rule(call):
    """y = x ⊙ w (w per channel): G_i = Σ_l g_i[:, l] ⊙ x_i[:, l], materialized [B, C]."""
    return PerExampleGrad(per_channel(call, call.grad * call["x"]))


def no_x_rule(call):
    """Wrong: forgets the x factor."""
    return PerExampleGrad(per_channel(call, call.grad))


def flipped_rule(call):
    """Wrong only in the book-keeping: channels reversed (same norms)."""
    return PerExampleGrad(per_channel(call, call.grad * call["x"]).flip(-1))


class Scaled(torch.nn.Module):
    """conv -> op(·, scale) -> tanh -> mean -> linear; `on_input` applies the op to the input
    instead (so the backward to the other ops never passes through it)."""

    def __init__(self, op=CHANNEL_SCALE, on_input: bool = False):
        super().__init__()
        self.op, self.on_input = op, on_input
        self.conv = torch.nn.Conv1d(3, 4, 3)
        self.scale = torch.nn.Parameter(torch.rand(3 if on_input else 4) + 0.5)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        if self.on_input:
            return self.head(torch.tanh(self.conv(self.op(x, self.scale))).mean(-1))
        return self.head(torch.tanh(self.op(self.conv(x), self.scale)).mean(-1))


@pytest.fixture(autouse=True)
def _clean_registry():
    yield
    for op in (CHANNEL_SCALE, torch.ops.fxclip_tests.no_autograd_scale.default, torch.ops.aten.prelu.default):
        fxclip.unregister_rule(op)


def batch(n=6):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 9, generator=g, dtype=torch.float64), torch.randint(0, 2, (n,), generator=g)


def assert_matches_reference(t, x, y, reference):
    model = t.model
    for p in model.parameters():
        p.grad = None
    result = t.step(x, y)
    norms, sums = clipped_sum(reference(model, ce, (x,), y), t.max_grad_norm)
    torch.testing.assert_close(result.norms, norms, rtol=1e-12, atol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, sums[name], rtol=1e-12, atol=1e-14)


def test_custom_op_without_rule_falls_back_exactly():
    model = Scaled().double()
    x, y = batch()
    t = fxclip.transform(model, ce, 0.5)
    assert_matches_reference(t, x, y, naive_per_example_grads)
    explanation = t.explain()
    assert [r.name for r in explanation.fallbacks] == ["scale"]
    assert "FALLBACK" in str(explanation) and "register_rule(fxclip_tests.channel_scale.default" in str(explanation)


def test_custom_op_with_registered_rule_is_used_and_exact():
    fxclip.register_rule(CHANNEL_SCALE, weight=channel_scale_rule)
    model = Scaled().double()
    x, y = batch()
    t = fxclip.transform(model, ce, 0.5)
    assert_matches_reference(t, x, y, naive_per_example_grads)
    assert t.fallbacks == []
    (use,) = t.explain().row("scale").uses
    assert use.rule == "channel_scale_rule" and use.source.startswith("tests/test_user_rules.py:")


def test_check_rule_accepts_a_correct_rule():
    fxclip.register_rule(CHANNEL_SCALE, weight=channel_scale_rule)
    report = check_rule(CHANNEL_SCALE, (torch.randn(5, 4, 7), torch.rand(4)), ["weight"])
    assert report.reference == "per-example loop"  # torch.func cannot transform this custom op
    assert report.norm_error < 1e-12 and report.clipped_sum_error < 1e-12


def test_check_rule_catches_wrong_norms():
    fxclip.register_rule(CHANNEL_SCALE, weight=no_x_rule)
    with pytest.raises(AssertionError, match=r"wrong per-example norms(.|\n)*example 4"):
        check_rule(CHANNEL_SCALE, (torch.randn(5, 4, 7), torch.rand(4)), ["weight"])


def test_check_rule_catches_wrong_book_keeping():
    fxclip.register_rule(CHANNEL_SCALE, weight=flipped_rule)
    with pytest.raises(AssertionError, match="wrong clipped gradient sum for 'weight'"):
        check_rule(CHANNEL_SCALE, {"x": torch.randn(5, 4, 7), "weight": torch.rand(4)}, ["weight"])


def test_check_rule_says_when_the_rule_is_not_used():
    fxclip.register_rule(CHANNEL_SCALE, weight=channel_scale_rule, extra_check=lambda node: False)
    with pytest.raises(AssertionError, match="did not use the rule channel_scale_rule"):
        check_rule(CHANNEL_SCALE, (torch.randn(5, 4, 7), torch.rand(4)), ["weight"])
    fxclip.unregister_rule(CHANNEL_SCALE)
    with pytest.raises(fxclip.FxclipError, match="no rule is registered"):
        check_rule(CHANNEL_SCALE, (torch.randn(5, 4, 7), torch.rand(4)), ["weight"])


def test_registering_twice_needs_override():
    fxclip.register_rule(CHANNEL_SCALE, weight=channel_scale_rule)
    with pytest.raises(fxclip.FxclipError, match="already registered.*override=True"):
        fxclip.register_rule(CHANNEL_SCALE, weight=no_x_rule)
    assert [rule.operands["weight"] for rule in RULES[CHANNEL_SCALE]] == [channel_scale_rule]
    fxclip.register_rule(CHANNEL_SCALE, weight=no_x_rule, override=True)
    assert [rule.operands["weight"] for rule in RULES[CHANNEL_SCALE]] == [no_x_rule]


def test_custom_op_without_autograd_gives_a_clear_error():
    model = Scaled(torch.ops.fxclip_tests.no_autograd_scale.default, on_input=True).double()
    x, y = batch()
    t = fxclip.transform(model, ce, 0.5)
    with pytest.raises(fxclip.FxclipError, match="no_autograd_scale(.|\n)*register_rule"):
        t.step(x, y)
    assert all(p.grad is None for p in model.parameters())


def prelu_rule(call):
    """F.prelu(x, w), w per channel (dim 1) or one shared slope: ∂y/∂w = min(0, x), so example
    i's G = Σ over its positions (and, for one slope, its channels) of g ⊙ min(0, x)."""
    h = call.grad * call["self"].clamp(max=0)  # laid out like x: [B, C, *positions]
    per_channel = h.flatten(2).sum(-1) if h.dim() > 2 else h
    if call["weight"].numel() == 1:
        per_channel = per_channel.sum(1, keepdim=True)
    return PerExampleGrad(per_channel)


def _batch_first(node) -> bool:
    return node.output_axis.dim == 0


@pytest.mark.parametrize("num_parameters", [1, 4])
def test_rule_for_an_uncovered_aten_op(num_parameters):
    prelu = torch.ops.aten.prelu.default
    fxclip.register_rule(prelu, weight=prelu_rule, extra_check=_batch_first)
    for x in (torch.randn(5, 4), torch.randn(5, 4, 7)):
        check_rule(prelu, (x, torch.rand(num_parameters)), ["weight"])
    model = torch.nn.Sequential(
        torch.nn.Conv1d(3, 4, 3), torch.nn.PReLU(num_parameters), torch.nn.Flatten(), torch.nn.Linear(28, 2)
    ).double()
    x, y = batch()
    t = fxclip.transform(model, ce, 0.5)
    assert_matches_reference(t, x, y, per_example_grads)
    assert t.fallbacks == [] and t.explain().row("1.weight").uses[0].rule == "prelu_rule"


def stacked_matmul_rows(call, param):
    """z = x @ W with x [B, D] and a stack W [k, D, E] (z [k, B, E]): z[j, i] = x_iᵀ W[j], so W[j]
    is group j, with one position: x_i (the same in every group) and g[j, i]."""
    k = call[param].shape[0]
    x = call.examples("self").reshape(call.batch_size, 1, 1, -1).expand(-1, k, -1, -1)
    g = call.grad_examples().reshape(call.batch_size, k, 1, -1)
    return fxclip.rules.Rows(fxclip.Dense(x), fxclip.Dense(g))


def _stack_times_rows(node) -> bool:
    return node.batch_axis("other") is None and node["other"].dim() == 3 and node["self"].dim() == 2


class MatmulStackAndMatrix(torch.nn.Module):
    """x @ (a stack of matrices) beside x @ (a matrix): one op, two cases."""

    def __init__(self):
        super().__init__()
        self.stack = torch.nn.Parameter(torch.randn(3, 4, 2, dtype=torch.float64))
        self.matrix = torch.nn.Parameter(torch.randn(4, 2, dtype=torch.float64))

    def forward(self, x):
        return torch.tanh(x @ self.stack).sum(0) + x @ self.matrix


def test_a_rule_for_one_case_of_an_op_extends_its_rules():
    matmul = torch.ops.aten.matmul.default
    built_in = list(RULES[matmul])
    rule = fxclip.rules.bilinear_rule(matmul, "stacked_matmul", stacked_matmul_rows, right="other", extra_check=_stack_times_rows)
    try:
        assert RULES[matmul] == [rule, *built_in]  # tried first
        model = MatmulStackAndMatrix()
        x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 2, (6,))
        t = fxclip.transform(model, ce, 0.5)
        assert_matches_reference(t, x, y, per_example_grads)
        assert t.fallbacks == []
        assert {row.name: row.uses[0].rule for row in t.explain().rows} == {"stack": "stacked_matmul", "matrix": "matmul"}
    finally:
        fxclip.unregister_rule(rule)
    assert RULES[matmul] == built_in


def test_the_old_registration_says_the_new_one():
    with pytest.raises(fxclip.FxclipError, match=r"one function per operand(.|\n)*register_rule\(op, weight=fn\)"):
        fxclip.register_rule(CHANNEL_SCALE, params=("weight",))
