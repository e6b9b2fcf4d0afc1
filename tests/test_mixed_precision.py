"""Mixed precision: bf16 autocast (CPU; fp16 and bf16 on CUDA when present) and a model stored in
bf16. Norms must be within 1e-2 relative of the float64 reference, norms and clip factors are
float32, and removing one example changes the clipped sum by at most C."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import fxclip
from fxclip import zoo
from fxclip.reference import clipped_sum, per_example_grads

MODELS = ["mlp", "small_cnn", "resnet_gn", "bow", "tied"]
BATCH = 8
NORM_RTOL = 1e-2


def loss_fn(out, y):
    return F.cross_entropy(out.float(), y, reduction="none")


def setup(name: str, device: str = "cpu"):
    entry = zoo.ZOO[name]
    model = entry.factory().to(device)
    (x,), y = entry.make_batch(BATCH, torch.Generator().manual_seed(0))
    return model, x.to(device), y.to(device)


def reference(model, x, y, max_grad_norm):
    """Norms and clipped sum of the float64 copy of `model` (its weights as stored)."""
    model64 = copy.deepcopy(model).double().cpu()
    x64 = x.double().cpu() if x.is_floating_point() else x.cpu()
    return clipped_sum(per_example_grads(model64, loss_fn, (x64,), y.cpu()), max_grad_norm)


def private_step(t, x, y, autocast: torch.dtype | None):
    for p in t.model.parameters():
        p.grad = None
    if autocast is None:
        return t.step(x, y)
    with torch.autocast(x.device.type, dtype=autocast):
        return t.step(x, y)


def grads_of(model) -> torch.Tensor:
    return torch.cat([p.grad.double().flatten().cpu() for p in model.parameters()])


def plain_weighted_grads(model, x, y, weights, autocast) -> torch.Tensor:
    """∇ Σ_i w_i L_i by an ordinary backward in the same precision: Σ_i w_i ∇L_i, the clipped sum
    for w = the clip factors, as reduced-precision autograd computes it."""
    for p in model.parameters():
        p.grad = None
    with torch.autocast(x.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        (loss_fn(model(x), y) * weights).sum().backward()
    return grads_of(model)


def check_norms_and_sums(name, device, autocast, stored, strategy="auto"):
    model, x, y = setup(name, device)
    if stored is not None:
        model = model.to(stored)
        x = x.to(stored) if x.is_floating_point() else x
    t = fxclip.transform(model, loss_fn, max_grad_norm=1.0, strategy=strategy)
    result = private_step(t, x, y, autocast)
    assert result.norms.dtype == torch.float32 and result.clip_factors.dtype == torch.float32
    assert all(p.grad.dtype == p.dtype for p in model.parameters())  # gradients in the weights' dtype
    ref_norms, _ = reference(model, x, y, 1.0)
    rel = ((result.norms.double().cpu() - ref_norms).abs() / ref_norms).max().item()
    assert rel <= NORM_RTOL, (name, rel)
    # The clipped sum: reduced-precision backprop through a deep net is itself a few % off float64
    # (3.7% for resnet_gn, fxclip or not), so fxclip's sum is held to what an ordinary backward in
    # the same precision computes for Σ_i c_i L_i, within 1.5% of the gradient's norm (four bf16
    # roundoffs, 2^-8 each: the two sums round differently, by 0.5-0.6% for resnet_gn on an AMD EPYC
    # CPU; a sum without the clip factors is off by 13% to 92%).
    got = grads_of(model)
    plain = plain_weighted_grads(model, x, y, result.clip_factors.to(device), autocast)
    assert (got - plain).norm() <= 1.5e-2 * plain.norm(), (name, ((got - plain).norm() / plain.norm()).item())


@pytest.mark.parametrize("name", MODELS)
def test_bf16_autocast_on_cpu_matches_float64(name):
    check_norms_and_sums(name, "cpu", torch.bfloat16, stored=None)


@pytest.mark.parametrize("strategy", ["ghost", "materialize"])
def test_bf16_autocast_every_strategy(strategy):
    check_norms_and_sums("small_cnn", "cpu", torch.bfloat16, stored=None, strategy=strategy)


# bf16 convolutions are slow on CPUs: the ResNet case runs with -m slow
STORED_MODELS = [pytest.param(n, marks=pytest.mark.slow) if n == "resnet_gn" else n for n in MODELS]


@pytest.mark.parametrize("name", STORED_MODELS)
def test_model_stored_in_bf16_matches_float64(name):
    check_norms_and_sums(name, "cpu", None, stored=torch.bfloat16)


CUDA_CASES = [(torch.float16, None), (torch.bfloat16, None), (None, torch.bfloat16), (None, torch.float16)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("autocast,stored", CUDA_CASES)
@pytest.mark.parametrize("name", MODELS)
def test_cuda_reduced_precision_matches_float64(name, autocast, stored):
    check_norms_and_sums(name, "cuda", autocast, stored)


def removal_changes(name: str, autocast, stored, max_grad_norm: float):
    """For each j: ‖S − S_{−j}‖ with S the clipped sum over the batch and S_{−j} without example j;
    also ‖S‖ and the clip factors of the full batch."""
    model, x, y = setup(name)
    if stored is not None:
        model = model.to(stored)
        x = x.to(stored) if x.is_floating_point() else x
    t = fxclip.transform(model, loss_fn, max_grad_norm=max_grad_norm)
    full = private_step(t, x, y, autocast)
    total = grads_of(model)
    changes = []
    for j in range(BATCH):
        keep = torch.arange(BATCH) != j
        private_step(t, x[keep], y[keep], autocast)
        changes.append((total - grads_of(model)).norm().item())
    return torch.tensor(changes), total.norm().item(), full.clip_factors


@pytest.mark.parametrize("name", ["mlp", "small_cnn"])
def test_privacy_bound_under_bf16_autocast(name):
    c = 0.05  # far below every example's norm: every example is clipped, the bound is tight
    changes, _, clip = removal_changes(name, torch.bfloat16, None, c)
    assert (clip < 0.5).all()
    # float32 clipped sums of float32 weights: the bound holds up to float32 rounding and the
    # bf16 forward of the other examples (which can round differently in a smaller batch)
    assert (changes <= c * 1.01).all(), changes / c
    assert (changes >= c * 0.9).all()  # the test is not vacuous: each example moves the sum by ~C


@pytest.mark.parametrize("name", ["mlp", "small_cnn"])
def test_privacy_bound_with_bf16_weights(name):
    c = 0.05
    changes, total_norm, clip = removal_changes(name, None, torch.bfloat16, c)
    assert (clip < 0.5).all()
    # The clipped sum is computed in float32, then stored in the bf16 p.grad: rounding moves each
    # of S and S_{-j} by at most 2^-9 of its norm.
    slack = 2 * 2**-9 * total_norm * 1.2
    assert (changes <= c * 1.01 + slack).all(), (changes / c, slack / c)
    assert (changes >= c * 0.9 - slack).all()


def test_one_capture_per_autocast_setting():
    model, x, y = setup("mlp")
    t = fxclip.transform(model, loss_fn, max_grad_norm=1.0)
    plain = private_step(t, x, y, None)
    program = t.program
    mixed = private_step(t, x, y, torch.bfloat16)
    assert t.program is not program  # a graph captured under autocast asserts autocast's dtypes
    assert private_step(t, x, y, None).norms.equal(plain.norms)
    assert t.program is program
    assert not mixed.norms.equal(plain.norms)  # the autocast forward really ran in bf16
    torch.testing.assert_close(mixed.norms, plain.norms, rtol=NORM_RTOL, atol=0)


class AutocastInside(torch.nn.Module):
    """Casts inside the model: a bf16 autocast region (export wraps it in a region op)."""

    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Linear(6, 8)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = torch.tanh(self.inner(x))
        return self.head(h.float())


def test_autocast_region_inside_the_model_keeps_its_casts():
    model = AutocastInside()
    x, y = torch.randn(BATCH, 6, generator=torch.Generator().manual_seed(3)), torch.randint(0, 3, (BATCH,))
    t = fxclip.transform(model, loss_fn, max_grad_norm=0.1)
    result = t.step((x,), y)
    (capture,) = t.captures
    captured = capture.step.exported.graph_module.graph.nodes
    to_bf16 = [n for n in captured if n.kwargs.get("dtype") is torch.bfloat16 or torch.bfloat16 in n.args]
    assert to_bf16, "the region's casts to bfloat16 are not in the graph"
    ref_norms, _ = clipped_sum(per_example_grads(model, loss_fn, (x,), y), 0.1)
    assert torch.allclose(result.norms, ref_norms, rtol=NORM_RTOL)
