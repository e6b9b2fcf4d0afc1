"""Per-example squared norms: ghost (Gram products of the factors), one-hot rows, materialized.

Norms are computed in the working precision, where the Gram products of factors of very different
scales (inputs near 1e20, output gradients near 1e-20) overflow, and cancellation can take a sum of
them below zero. A ghost norm that does either is NaN, so the step notices it in the check it makes
anyway (a NaN or infinite total norm) and computes the norms again with `safe=True`: every squared
norm in float64, of values scaled per example by a power of two (exact), so any finite gradient
gets its finite norm.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..ops import add_rows
from .factors import Factor, OneHot, accumulate, gram


def _squares(x: torch.Tensor) -> torch.Tensor:
    """|x|² elementwise; a complex entry's is the sum of its real and imaginary parts' squares."""
    return torch.view_as_real(x).pow(2).sum(-1) if x.is_complex() else x.pow(2)


def _exponents(x: torch.Tensor) -> torch.Tensor:
    """Per example (dim 0), the e with max |x_i| in [2^(e-1), 2^e) (0 for an all-zero x_i):
    x_i · 2^-e lies in (-1, 1), and scaling by a power of two changes no digit."""
    peak = x.abs().flatten(1).amax(1) if x.numel() else torch.zeros(x.shape[0], device=x.device)
    return torch.frexp(peak.double())[1]


def _scaled(x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """x in float64 (complex128 if complex) with example i multiplied by 2^-e_i."""
    wide = x.to(torch.complex128 if x.is_complex() else torch.float64)
    return wide * torch.ldexp(torch.ones_like(e, dtype=torch.float64), -e).view(-1, *[1] * (x.dim() - 1))


def _sum_squares(x: torch.Tensor, safe: bool = False) -> torch.Tensor:
    """Σ over all but dim 0 of |x|² ([B]); `safe`: in float64 of x scaled per example (no overflow
    for any finite x)."""
    if not safe:
        return _squares(accumulate(x)).reshape(x.shape[0], -1).sum(1)
    e = _exponents(x)
    return torch.ldexp(_squares(_scaled(x, e)).reshape(x.shape[0], -1).sum(1), 2 * e)


def ghost_norm_sq(blocks: Sequence, safe: bool = False) -> torch.Tensor:
    """‖Σ_u L_uᵀ R_u‖² per example without materializing, for blocks with factors `.left` and
    `.right` (linear forms): Σ_{u,v} ⟨L_u L_vᵀ, R_u R_vᵀ⟩.

    NaN for an example whose sum overflowed or fell below zero in the working precision (the step
    then computes the norms again, `safe`). `safe`: in float64, of the left and the right factors
    each scaled per example by a power of two that brings its largest entry into (-1, 1), so no
    Gram product overflows; the result is scaled back (exact) and clamped at 0 (rounding)."""
    pairs = [(b.left, b.right) for b in blocks]
    if safe:
        e_left, e_right = (
            torch.stack([_exponents(f.numbers) for f in side]).amax(0) for side in zip(*pairs)
        )
        pairs = [(left.with_numbers(_scaled(left.numbers, e_left)), right.with_numbers(_scaled(right.numbers, e_right)))
                 for left, right in pairs]
    total = None
    for u, (left_u, right_u) in enumerate(pairs):
        for v, (left_v, right_v) in enumerate(pairs[u:], start=u):
            term = (gram(left_u, left_v) * gram(right_u, right_v)).sum((1, 2, 3))
            term = term if u == v else 2 * term  # the (v, u) term is the same number
            total = term if total is None else total + term
    if safe:
        return torch.ldexp(total.clamp_min(0), 2 * (e_left + e_right))
    if len(pairs) == 1 and pairs[0][0].positions == 1 and pairs[0][1].positions == 1:
        return total  # a product of two sums of squares: never below zero
    return torch.where(total >= 0, total, torch.nan)  # inf stays inf


def one_hot_rows_norm_sq(left: Factor, right: Factor, safe: bool = False) -> torch.Tensor:
    """‖G_i‖² for G_i = Lᵀ R with exactly one one-hot factor, G_i = Σ_t w_t e_{x_t} r_tᵀ (an
    embedding): the nonzero rows of G_i are Σ_{t: x_t = v} w_t r_t, one per distinct index v, so
    ‖G_i‖² = Σ_v ‖Σ_{t: x_t = v} w_t r_t‖². Sorting each example's indices numbers its distinct
    ones; the rows are summed into those slots (at most T) and squared: work and memory linear in
    T, with no Gram product and no dense gradient (`costs`)."""
    one_hot, dense = (left, right) if isinstance(left, OneHot) else (right, left)
    rows = accumulate(dense.values) * accumulate(one_hot.weight).unsqueeze(-1)  # [B, G, T, k]
    ordered, order = one_hot.index.sort(dim=-1)
    starts = torch.cat([torch.ones_like(ordered[..., :1], dtype=torch.bool), ordered[..., 1:] != ordered[..., :-1]], -1)
    slot_of_ordered = starts.long().cumsum(-1) - 1  # the rank of each position's index among the distinct ones
    slot = slot_of_ordered.scatter(-1, order, slot_of_ordered)  # back to the positions' order
    sums = add_rows(rows, slot, rows.shape[2])
    return _sum_squares(sums, safe)


def materialized_norm_sq(grads: torch.Tensor, safe: bool = False) -> torch.Tensor:
    """Σ over all but the batch dim of the squares of per-example gradients [B, ...] ([B] for a
    0-dim parameter); `safe`: in float64, without overflow (`_sum_squares`)."""
    return _sum_squares(grads, safe)
