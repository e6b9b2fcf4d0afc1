"""The clip factor, one definition for the step, the reference and the naive method, and what
every kind of private step returns."""

from __future__ import annotations

from typing import NamedTuple

import torch

EPS = 1e-6  # keeps the factor finite for a zero gradient


def clip_factors(norms: torch.Tensor, max_grad_norm) -> torch.Tensor:
    """min(1, C / (‖g_i‖ + EPS)) per example; C a number or a per-example tensor."""
    return (max_grad_norm / (norms + EPS)).clamp(max=1.0)


class StepOutput(NamedTuple):
    """One private step on a batch: per-example losses, gradient norms (before clipping) and clip
    factors, and each trainable parameter's clipped gradient sum Σ_i c_i ∇θ L_i by name."""

    losses: torch.Tensor
    norms: torch.Tensor
    clip_factors: torch.Tensor
    grads: dict[str, torch.Tensor]
