"""The clip factor, one definition for the step, the reference and the naive method."""

from __future__ import annotations

import torch

EPS = 1e-6  # keeps the factor finite for a zero gradient


def clip_factors(norms: torch.Tensor, max_grad_norm) -> torch.Tensor:
    """min(1, C / (‖g_i‖ + EPS)) per example; C a number or a per-example tensor."""
    return (max_grad_norm / (norms + EPS)).clamp(max=1.0)
