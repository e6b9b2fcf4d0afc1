"""The model and its per-example loss as one module, and the check that a loss is one number per
example: what capture traces, the reference differentiates and the whole-model fallback runs."""

from __future__ import annotations

import re

import torch

from .errors import CaptureError


class ModelWithLoss(torch.nn.Module):
    """model(*inputs) then loss_fn(output, targets): one graph that ends in per-example losses."""

    def __init__(self, model: torch.nn.Module, loss_fn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, inputs: tuple, targets):
        return self.loss_fn(self.model(*inputs), targets)


def is_batch_size(size) -> bool:
    """`size` is the batch's symbol itself (in a captured graph's shapes)."""
    return isinstance(size, torch.SymInt) and size.node.expr.is_Symbol


def loss_shape_error(loss) -> CaptureError:
    """The error for a loss_fn whose result `loss` is not one floating-point loss per example."""
    if isinstance(loss, torch.Tensor) and loss.dim() == 1 and not loss.is_floating_point():
        return CaptureError(
            f"loss_fn must return real floating-point losses, one per example; it returned {loss.dtype} "
            "values. Integer results (argmax, comparisons) have no gradient: compute the loss from the "
            "model's output with differentiable ops, e.g. F.cross_entropy(out, y, reduction='none')."
        )
    if isinstance(loss, torch.Tensor):  # B for the symbolic batch of a captured graph
        sizes = ("B" if is_batch_size(s) else re.sub(r"\bs\d+\b", "B", str(s)) for s in loss.shape)
        what = f"shape [{', '.join(sizes)}]"
    elif isinstance(loss, tuple):
        what = f"a tuple of {len(loss)} values (return the loss alone; keep other outputs out of loss_fn)"
    else:
        what = "None" if loss is None else f"a {type(loss).__name__}"
    return CaptureError(
        f"loss_fn must return one loss per example, a tensor of shape [B]; it returned {what}. "
        "Use reduction='none' (e.g. F.cross_entropy(out, y, reduction='none')) and, for sequence "
        "or pixel losses, sum or average over every dim but the batch."
    )
