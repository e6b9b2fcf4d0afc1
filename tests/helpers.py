"""Shared test helpers: run fxclip and the torch.func reference on the same batch and compare."""

from __future__ import annotations

import os

import torch
import torch.utils._pytree as pytree

import fxclip
from fxclip.reference import any_per_example_grads, clipped_sum


# The conformance tests (test_rules_table.py, test_zoo.py) run on this device:
# FXCLIP_TEST_DEVICE=cuda runs them on a GPU (scripts/gpu_check.sh); the default is the CPU.
DEVICE = torch.device(os.environ.get("FXCLIP_TEST_DEVICE", "cpu"))
if DEVICE.type == "cuda":  # full float32, as on the CPU: TF32 would miss the float32 tolerances
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False


def on_device(tree):
    """Every tensor (and module) in `tree` moved to DEVICE."""
    return pytree.tree_map(lambda x: x.to(DEVICE) if isinstance(x, (torch.Tensor, torch.nn.Module)) else x, tree)


def snapshot(model):
    """Each parameter's value and gradient (None if it has none), copied."""
    return {k: (p.detach().clone(), None if p.grad is None else p.grad.clone()) for k, p in model.named_parameters()}


def assert_unchanged(model, before):
    """Every parameter's value and gradient are as `snapshot` saw them (a refused call changes nothing)."""
    for k, p in model.named_parameters():
        value, grad = before[k]
        assert torch.equal(p.detach(), value), k
        assert (p.grad is None and grad is None) or torch.equal(p.grad, grad), k


def sum_loss(out, target):
    return ((out - target) ** 2).flatten(1).sum(1)


def mean_loss(out, target):
    return ((out - target) ** 2).flatten(1).mean(1)


def ce(out, y):
    """Per-example cross entropy (one loss per example, as fxclip needs)."""
    return torch.nn.functional.cross_entropy(out, y, reduction="none")


def targets_for(model, inputs, batch_dims, generator):
    """Regression targets shaped like the model's output, batch first."""
    with torch.no_grad():
        out = model(*inputs)
    return torch.randn(out.shape, generator=generator, dtype=out.dtype).to(out.device)


def relative_error(got: torch.Tensor, expected: torch.Tensor, scale: float | None = None) -> float:
    """max |got - expected| relative to `scale` (default: the largest |expected|)."""
    scale = float(expected.abs().max()) if scale is None else scale
    return float((got - expected).abs().max()) / max(scale, 1e-30)


def check_against_reference(t: fxclip.PrivateStep, inputs, targets, batch_dims=None, rtol=1e-8):
    """One step of `t`; assert norms and every parameter's clipped sum match the reference."""
    model = t.model
    for p in model.parameters():
        p.grad = None
    result = t.step(inputs, targets)
    # torch.func cannot run cuDNN's recurrent kernels: those take the per-example loop
    ref, _ = any_per_example_grads(model, t.loss_fn, inputs, targets, batch_dims)
    ref_norms, ref_clipped = clipped_sum(ref, t.max_grad_norm)
    assert relative_error(result.norms, ref_norms) <= rtol, (result.norms, ref_norms)
    # a parameter whose gradient is ~0 (a conv bias before a norm layer) is judged on the scale of
    # the whole clipped gradient
    scale = max(float(g.abs().max()) for g in ref_clipped.values())
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
            error = relative_error(p.grad, ref_clipped[name], scale)
            assert error <= rtol, f"{name}: relative error {error:.3g}"
    return result
