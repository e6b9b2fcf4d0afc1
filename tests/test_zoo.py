"""Every zoo model through transform, against the reference, and the step's API contract."""

import warnings

import pytest
import torch
import torch.nn as nn

import fxclip
from fxclip.zoo import PerExampleCrossEntropy
from fxclip.zoo import ZOO
from fxclip.reference import clipped_sum, naive_per_example_grads
from helpers import check_against_reference, on_device


# classifiers ([B, C] logits, [B] labels) and sequence models ([B, T, C], [B, T]) alike
ce = PerExampleCrossEntropy()


def zoo_batch(entry, batch, seed, dtype=torch.float64):
    inputs, y = entry.make_batch(batch, torch.Generator().manual_seed(seed))
    return tuple(x.to(dtype) if x.is_floating_point() else x for x in inputs), y


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model_matches_reference(name):
    entry = ZOO[name]
    model = on_device(entry.factory().double())
    t = fxclip.transform(model, ce, max_grad_norm=1.0)
    for batch, seed in ((3, 0), (2, 1)):  # a second batch size reuses the captured graph
        check_against_reference(t, *on_device(zoo_batch(entry, batch, seed)))
    assert len(t.captures) == 1


def test_step_accumulates_like_backward():
    model = ZOO["mlp"].factory().double()
    t = fxclip.transform(model, ce, max_grad_norm=0.5)
    a, b = zoo_batch(ZOO["mlp"], 4, 0), zoo_batch(ZOO["mlp"], 3, 1)
    t.step(*a)
    first = [p.grad.clone() for p in model.parameters()]
    t.step(*b)
    both = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    t.step(*b)
    for f, s, p in zip(first, both, model.parameters()):
        torch.testing.assert_close(s, f + p.grad)


def test_empty_batch_adds_zeros():
    model = ZOO["mlp"].factory()
    t = fxclip.transform(model, ce, max_grad_norm=1.0)
    res = t.step(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))
    assert res.batch_size == 0 and res.norms.shape == (0,)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


def test_frozen_parameters_are_left_alone_and_excluded():
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    model[0].weight.requires_grad_(False)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    t = fxclip.transform(model, ce, max_grad_norm=0.3)
    check_against_reference(t, (x,), y)
    assert model[0].weight.grad is None


def test_clip_factors_and_losses():
    model = ZOO["small_cnn"].factory().double()
    inputs, y = zoo_batch(ZOO["small_cnn"], 6, 2)
    t = fxclip.transform(model, ce, max_grad_norm=0.01)
    res = t.step(inputs, y)
    torch.testing.assert_close(res.losses, ce(model(*inputs), y).detach())
    torch.testing.assert_close(res.clip_factors, (0.01 / (res.norms + 1e-6)).clamp(max=1))
    assert (res.clip_factors < 1).all()


def test_verify_passes_on_a_correct_model():
    model = ZOO["depthwise"].factory().double()
    t = fxclip.transform(model, ce, max_grad_norm=1.0, verify=True)
    t.step(*zoo_batch(ZOO["depthwise"], 4, 0))
    assert t.verify is False  # checked once, on the first step


def test_loss_that_reads_a_model_parameter():
    """A learned temperature used inside loss_fn is a parameter like any other: fxclip, the
    torch.func reference (verify=True) and the per-example loop all include its gradient."""
    model = nn.Linear(4, 3).double()
    model.temperature = nn.Parameter(torch.tensor(1.3, dtype=torch.float64))

    def loss_fn(out, y):
        return nn.functional.cross_entropy(out * model.temperature, y, reduction="none")

    inputs, y = (torch.randn(6, 4, dtype=torch.float64),), torch.randint(0, 3, (6,))
    t = fxclip.transform(model, loss_fn, max_grad_norm=0.5, verify=True)
    result = check_against_reference(t, inputs, y)
    loop = naive_per_example_grads(model, loss_fn, inputs, y)
    norms, _ = clipped_sum(loop, 0.5)
    assert float(loop["temperature"].abs().max()) > 0
    torch.testing.assert_close(result.norms, norms, rtol=1e-10, atol=0)


def test_loss_from_an_op_with_a_batch_free_second_output():
    """aten.nll_loss_forward returns (losses [B], total weight []); the unused total weight has no
    batch axis and is not a reduction over the batch (it was refused as one)."""
    model = nn.Linear(4, 3).double()

    def loss_fn(out, y):
        return torch.ops.aten.nll_loss_forward(out.log_softmax(-1), y, None, 0, -100)[0]

    inputs, y = (torch.randn(5, 4, dtype=torch.float64),), torch.randint(0, 3, (5,))
    check_against_reference(fxclip.transform(model, loss_fn, max_grad_norm=0.5), inputs, y)


def test_targets_as_a_dict_take_the_fast_path():
    """Targets may be any pytree of tensors batched along dim 0 (export's dynamic shapes were
    given only tuples and lists: a dict made export fail)."""
    model = nn.Linear(4, 3).double()
    inputs = (torch.randn(6, 4, dtype=torch.float64),)
    targets = {"y": torch.randn(6, 3, dtype=torch.float64), "w": torch.rand(6, dtype=torch.float64)}
    t = fxclip.transform(model, lambda out, t: ((out - t["y"]) ** 2).sum(1) * t["w"], max_grad_norm=0.5, verify=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxclip.FallbackWarning)
        t.step(inputs, targets)
    assert t.program.plan  # captured: a plan, not the whole-model fallback


def test_verify_catches_a_wrong_rule():
    from fxclip.rules import linear as linear_rules
    from fxclip.rules.registry import RULES

    aten_linear = torch.ops.aten.linear.default
    original = RULES[aten_linear]

    def wrong_weight(call):
        return fxclip.PerExampleGrad(2 * linear_rules.linear.operands["weight"](call).materialize())

    fxclip.register_rule(aten_linear, weight=wrong_weight, bias=linear_rules.linear.operands["bias"], override=True)

    try:
        model = ZOO["mlp"].factory().double()
        t = fxclip.transform(model, ce, max_grad_norm=1.0, verify=True)
        before = [p.grad for p in model.parameters()]
        with pytest.raises(fxclip.VerificationError):
            t.step(*zoo_batch(ZOO["mlp"], 4, 0))
        assert [p.grad for p in model.parameters()] == before
    finally:
        RULES[aten_linear] = original


def test_registering_an_op_twice_needs_override():
    with pytest.raises(fxclip.FxclipError, match="already registered.*override=True"):
        fxclip.register_rule(torch.ops.aten.linear.default, weight=lambda call: None)


def test_dropout_masks_match_an_ordinary_backward():
    """One forward, one backward: with no clipping (huge C) the step's gradient is the ordinary
    gradient of Σ_i L_i under the same random masks."""
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3)).double()
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    t = fxclip.transform(model, ce, max_grad_norm=1e9)
    t.step(x, y)  # capture
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    t.step(x, y)
    private = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    ce(model(x), y).sum().backward()
    for a, b in zip(private, model.parameters()):
        torch.testing.assert_close(a, b.grad, rtol=1e-10, atol=1e-12)


def test_verify_refuses_a_random_model_and_writes_nothing():
    model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.3), nn.Linear(8, 3))
    t = fxclip.transform(model, ce, max_grad_norm=1.0, verify=True)
    with pytest.raises(fxclip.VerificationError, match="deterministic model.*eval"):
        t.step(torch.randn(4, 6), torch.randint(0, 3, (4,)))
    assert all(p.grad is None for p in model.parameters())


def test_no_targets_and_a_sequence_first_input():
    """A loss that needs no targets (targets=None) on a (T, B, E) input: the batch is found from
    batch_dims, not from the targets."""
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x = torch.randn(3, 6, 4, dtype=torch.float64)  # (T, B, E)

    def energy(out, _):
        return out.pow(2).sum((0, 2))  # [B]

    t = fxclip.transform(model, energy, max_grad_norm=0.4, batch_dims=(1,))
    res = t.step(x, None)
    assert res.norms.shape == (6,)
    from fxclip.reference import clipped_sum, naive_per_example_grads

    ref = naive_per_example_grads(model, lambda o, y: energy(o, None), (x,), torch.zeros(6), (1,))
    ref_norms, ref_clipped = clipped_sum(ref, 0.4)
    torch.testing.assert_close(res.norms, ref_norms, rtol=1e-10, atol=1e-12)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_clipped[name], rtol=1e-10, atol=1e-12)


class _Attention(nn.Module):
    def __init__(self, dropout: float):
        super().__init__()
        self.qkv, self.dropout = nn.Linear(4, 12), dropout

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        return nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0).sum(1)


@pytest.mark.parametrize("model", [
    nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.3), nn.Linear(8, 3)).eval(),
    nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.0), nn.Linear(8, 3)),
], ids=["eval", "p0"])
def test_verify_accepts_a_dropout_that_is_the_identity(model):
    """A dropout in eval mode or with p = 0 stays in the graph (Hugging Face models in eval mode)
    but draws nothing: verify=True checks the step instead of refusing it."""
    t = fxclip.transform(model.double(), ce, max_grad_norm=1.0, verify=True)
    t.step(torch.randn(4, 6, dtype=torch.float64), torch.randint(0, 3, (4,)))
    assert t.verify is False


def test_verify_tells_attention_with_dropout_from_attention_without():
    model = _Attention(0.2).double()
    x, y = torch.randn(3, 5, 4, dtype=torch.float64), torch.randint(0, 4, (3,))
    fxclip.transform(model.eval(), ce, max_grad_norm=1.0, verify=True).step(x, y)
    with pytest.raises(fxclip.VerificationError, match="scaled_dot_product_attention"):
        fxclip.transform(model.train(), ce, max_grad_norm=1.0, verify=True).step(x, y)


@pytest.mark.parametrize("bound", [1, torch.tensor(0.5), 2.0])
def test_clip_bound_accepts_numbers(bound):
    assert fxclip.transform(nn.Linear(2, 2), ce, max_grad_norm=bound).max_grad_norm == float(bound)
