"""The methods the benchmark times: the non-private step (the floor) and every way to get the
clipped gradient sum Σ_i min(1, C/‖g_i‖) g_i — fxclip, the naive per-example loop, torch.func
vmap(grad), and Opacus (hooks and ghost clipping) when it is installed.

Each builder takes a fresh copy of the model and returns a `Method` whose `step()` does one
training step's gradient work and whose `grads()` returns the clipped sum the last step computed
(None for the floor, which does not clip). A builder that cannot run a model raises
`MethodUnavailable` with the reason, and the benchmark reports the cell as skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from fxclip.api import TRACE_AFTER_STEPS, transform
from fxclip.errors import describe
from fxclip.reference import any_per_example_grads, clipped_sum, naive_per_example_grads, per_example_grads

# untimed steps before a method is measured: capture, lazy state, and the step graph a
# non-compiled fxclip step traces after TRACE_AFTER_STEPS completed steps
WARMUP_STEPS = TRACE_AFTER_STEPS + 1


class MethodUnavailable(Exception):
    """This method cannot run this model (or is not installed); the message says why."""


@dataclass
class Method:
    """One method set up on one model and batch."""

    step: Callable[[], None]
    grads: Callable[[], Optional[dict[str, torch.Tensor]]]


def _param_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _zero(model: torch.nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def floor(model, loss_fn, max_grad_norm, inputs, targets, compiled: bool = False) -> Method:
    """The non-private step: one forward, loss.sum(), one backward."""
    forward = torch.compile(model) if compiled else model

    def step():
        _zero(model)
        loss_fn(forward(*inputs), targets).sum().backward()

    return Method(step, lambda: None)


def fxclip_method(model, loss_fn, max_grad_norm, inputs, targets, compiled: bool | str = False, **options) -> Method:
    """fxclip.transform(...).step, eager or with compile=True (or a batch mode, "buckets");
    `options` go to `transform` (max_physical_batch_size, strategy, ...)."""
    private = transform(model, loss_fn, max_grad_norm, compile=compiled, **options)

    def step():
        _zero(model)
        private.step(inputs, targets)

    return Method(step, lambda: _param_grads(model))


def naive(model, loss_fn, max_grad_norm, inputs, targets) -> Method:
    """One forward and backward per example, then clip and sum."""
    out = {}

    def step():
        grads = naive_per_example_grads(model, loss_fn, inputs, targets)
        out["grads"] = clipped_sum(grads, max_grad_norm)[1]

    return Method(step, lambda: out["grads"])


def vmap_grad(model, loss_fn, max_grad_norm, inputs, targets, compiled: bool = False) -> Method:
    """torch.func.vmap(grad) over functional_call (fxclip.reference.per_example_grads), then clip
    and sum; the whole function under torch.compile when compiled."""

    def clipped(inputs, targets):
        return clipped_sum(per_example_grads(model, loss_fn, inputs, targets), max_grad_norm)[1]

    fn = torch.compile(clipped) if compiled else clipped
    out = {}

    def step():
        out["grads"] = fn(tuple(inputs), targets)

    return Method(step, lambda: out["grads"])


def _opacus(model: torch.nn.Module) -> None:
    """Opacus must be installed, and it records activations only in training mode: the model
    goes to it in training mode (the benchmark's dropout probabilities are 0, so both modes compute
    the same function; the Hugging Face models come in eval mode)."""
    try:
        import opacus  # noqa: F401  (optional: pip install fxclip[peers])
    except ImportError as e:
        raise MethodUnavailable("Opacus is not installed (pip install 'fxclip[peers]')") from e
    model.train()


def opacus_hooks(model, loss_fn, max_grad_norm, inputs, targets) -> Method:
    """Opacus GradSampleModule (per-sample gradients by hooks) and DPOptimizer's clipping
    (noise 0), the clipped sum read from p.summed_grad."""
    _opacus(model)
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    try:
        module = GradSampleModule(model, loss_reduction="sum")
    except Exception as e:  # Opacus raises several types for modules it does not support
        raise MethodUnavailable(f"Opacus cannot wrap the model: {describe(e)}") from e
    optimizer = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=max_grad_norm,
        expected_batch_size=targets.shape[0], loss_reduction="sum",
    )

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn(module(*inputs), targets).sum().backward()
        optimizer.clip_and_accumulate()

    return Method(step, lambda: {k: p.summed_grad.detach().clone() for k, p in model.named_parameters() if p.requires_grad})


class _Reducible:
    """A per-example loss with the `reduction` attribute ("none" or "sum") that Opacus' ghost
    clipping switches."""

    def __init__(self, loss_fn, reduction: str = "sum"):
        self.loss_fn, self.reduction = loss_fn, reduction

    def __call__(self, output, targets):
        losses = self.loss_fn(output, targets)
        return losses.sum() if self.reduction == "sum" else losses


def opacus_ghost(model, loss_fn, max_grad_norm, inputs, targets) -> Method:
    """Opacus ghost clipping (GradSampleModuleFastGradientClipping, DPLossFastGradientClipping):
    a first backward for the norms, a second one of the clip-weighted loss into p.grad."""
    _opacus(model)
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    try:
        module = GradSampleModuleFastGradientClipping(
            model, loss_reduction="sum", max_grad_norm=max_grad_norm, use_ghost_clipping=True
        )
    except Exception as e:  # Opacus raises several types for modules it does not support
        raise MethodUnavailable(f"Opacus cannot wrap the model: {describe(e)}") from e
    optimizer = DPOptimizerFastGradientClipping(
        torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=max_grad_norm,
        expected_batch_size=targets.shape[0], loss_reduction="sum",
    )
    criterion = DPLossFastGradientClipping(module, optimizer, _Reducible(loss_fn), loss_reduction="sum")

    def step():
        optimizer.zero_grad(set_to_none=True)
        criterion(module(*inputs), targets).backward()

    return Method(step, lambda: _param_grads(model))


# name -> builder(model, loss_fn, max_grad_norm, inputs, targets) -> Method
METHODS: dict[str, Callable[..., Method]] = {
    "floor": floor,
    "floor_compiled": lambda *a: floor(*a, compiled=True),
    "fxclip": fxclip_method,
    "fxclip_compiled": lambda *a: fxclip_method(*a, compiled=True),
    "fxclip_compiled_buckets": lambda *a: fxclip_method(*a, compiled="buckets"),
    # the memory bound: the batch in two chunks (max_physical_batch_size), same clipped sum
    "fxclip_compiled_halves": lambda *a: fxclip_method(*a, compiled=True, max_physical_batch_size=-(-a[4].shape[0] // 2)),
    # ... in chunks of 256 examples (the GPU check's B=1024 memory rows)
    "fxclip_compiled_mpbs256": lambda *a: fxclip_method(*a, compiled=True, max_physical_batch_size=256),
    # not replayed from CUDA graphs (on CUDA, "fxclip_compiled" is)
    "fxclip_compiled_nographs": lambda *a: fxclip_method(*a, compiled=True, cuda_graphs=False),
    "naive": naive,
    "vmap": vmap_grad,
    "vmap_compiled": lambda *a: vmap_grad(*a, compiled=True),
    "opacus_hooks": opacus_hooks,
    "opacus_ghost": opacus_ghost,
}
FLOOR = "floor"
NAIVE = "naive"
COMPILED = {
    "floor_compiled", "fxclip_compiled", "fxclip_compiled_buckets", "fxclip_compiled_halves", "fxclip_compiled_mpbs256",
    "fxclip_compiled_nographs", "vmap_compiled",
}
# what a plain run times: buckets (padding to static sizes), chunks and steps without CUDA graphs only on request
DEFAULT_METHODS = [m for m in METHODS if m not in (
    "fxclip_compiled_buckets", "fxclip_compiled_halves", "fxclip_compiled_mpbs256", "fxclip_compiled_nographs"
)]


def reference_clipped_sum(model, loss_fn, max_grad_norm, inputs, targets) -> dict[str, torch.Tensor]:
    """Σ_i c_i g_i by torch.func (fxclip.reference), the check every method must pass; by the
    per-example loop for models torch.func cannot run (cuDNN's LSTM under vmap)."""
    return clipped_sum(any_per_example_grads(model, loss_fn, inputs, targets)[0], max_grad_norm)[1]
