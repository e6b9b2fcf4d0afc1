"""What a rule returns: a per-example gradient in a form fxclip can take norms of and sum cheaply.

A rule never builds per-example gradients unless that is the cheap way. It returns one of:

- `LinearForm(left, right)`: example i's gradient is G_i = L_iᵀ R_i (one [k_L, k_R] block per
  group g), where L_i ∈ R^{T×k_L} and R_i ∈ R^{T×k_R} are factors over T positions. Linear layers,
  convolutions (patches), embeddings (one-hot rows) and biases (a column of ones) have this form.
  Its squared norm is available two ways, which must agree:
    ghost:        ‖L_iᵀ R_i‖² = ⟨L_i L_iᵀ, R_i R_iᵀ⟩      cost per example G·T²·(k_L + k_R)
    materialize:  build G_i, square and sum                  cost per example G·T·k_L·k_R
                  (one one-hot factor: only G_i's nonzero rows,               G·T·k)
  and the clipped sum Σ_i c_i G_i is one contraction of (c ⊙ L) with R over (i, t).
- `PerExampleGrad(grads)`: G_i itself, [B, *parameter shape]. For parameters whose per-example
  gradient is small (normalization affine weights, scales, broadcast biases) and for the fallback.

A factor is `Dense([B, G, T, k])` or `OneHot(index [B, G, T], k, weight [B, G, T])`, the latter
standing for rows of one-hot vectors scaled by `weight` (embeddings; weight 0 drops padding).

Norms are computed in the working precision, where the Gram products of factors of very different
scales (inputs near 1e20, output gradients near 1e-20) overflow, and cancellation can take a sum of
them below zero. A ghost norm that does either is NaN, so the step notices it in the check it makes
anyway (a NaN or infinite total norm) and computes the norms again with `safe=True`: every squared
norm in float64, of values scaled per example by a power of two (exact), so any finite gradient
gets its finite norm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import groupby
from typing import Callable, Sequence, Union

import sympy
import torch

from .ops import concat

# Cost formulas are per example (every strategy is linear in the batch size B).
T, KL, KR, G = sympy.symbols("T k_L k_R G", positive=True, integer=True)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype norms, clip factors and clipped sums are computed in: at least float32
    (bf16/fp16 Gram products and sums over positions or examples lose too much)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _accumulate(x: torch.Tensor) -> torch.Tensor:
    return x.to(accumulation_dtype(x.dtype))


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
        return _squares(_accumulate(x)).reshape(x.shape[0], -1).sum(1)
    e = _exponents(x)
    return torch.ldexp(_squares(_scaled(x, e)).reshape(x.shape[0], -1).sum(1), 2 * e)


class Dense:
    """A dense factor: values [B, G, T, k]. `Dense.deferred(shape, compute)` makes one whose
    values are computed on first use: a factor that the chosen strategy may never need (a conv's
    patches, when its per-example gradients come from a faster kernel)."""

    def __init__(self, values: torch.Tensor):
        self._values, self._compute, self.shape = values, None, tuple(values.shape)

    @classmethod
    def deferred(cls, shape, compute: Callable[[], torch.Tensor]) -> "Dense":
        factor = cls.__new__(cls)
        factor._values, factor._compute, factor.shape = None, compute, tuple(shape)
        return factor

    @property
    def values(self) -> torch.Tensor:
        if self._values is None:
            self._values = self._compute()
        return self._values

    def release(self) -> None:
        """Drop a deferred factor's values (they are computed again if used again)."""
        if self.is_deferred:
            self._values = None

    @property
    def is_deferred(self) -> bool:
        """Whether the values are computed on first use (and so are extra memory when used)."""
        return self._compute is not None

    @property
    def built(self) -> bool:
        """Whether the values exist (a deferred factor's are computed on first use)."""
        return self._values is not None

    @property
    def k(self) -> int:
        return self.shape[-1]

    @property
    def positions(self) -> int:
        return self.shape[2]

    @property
    def groups(self) -> int:
        return self.shape[1]

    def scaled(self, c: torch.Tensor) -> "Dense":
        values = _accumulate(self.values)
        return Dense(values * c.to(values.dtype).view(-1, 1, 1, 1))


@dataclass
class OneHot:
    """Rows e_{index[b,g,t]} · weight[b,g,t] of a k-column one-hot matrix, index [B, G, T]."""

    index: torch.Tensor
    k: int
    weight: torch.Tensor

    @property
    def positions(self) -> int:
        return self.index.shape[2]

    @property
    def groups(self) -> int:
        return self.index.shape[1]

    built, is_deferred = True, False  # never deferred

    def scaled(self, c: torch.Tensor) -> "OneHot":
        weight = _accumulate(self.weight)
        return OneHot(self.index, self.k, weight * c.to(weight.dtype).view(-1, 1, 1))


Factor = Union[Dense, OneHot]


def gram(x: Factor, y: Factor) -> torch.Tensor:
    """Per example and group, the T_x × T_y matrix of row inner products X Yᵀ."""
    if isinstance(x, Dense) and isinstance(y, Dense):
        return _accumulate(x.values) @ _accumulate(y.values).transpose(-1, -2)
    if isinstance(x, OneHot) and isinstance(y, OneHot):
        same = x.index.unsqueeze(-1) == y.index.unsqueeze(-2)
        return same * (_accumulate(x.weight).unsqueeze(-1) * _accumulate(y.weight).unsqueeze(-2))
    if isinstance(x, Dense):
        return gram(y, x).transpose(-1, -2)
    # x one-hot, y dense: (X Yᵀ)[t, s] = weight_t · Y[s, index_t]
    yt = _accumulate(y.values).transpose(-1, -2)  # [B, G, k, Ty]
    idx = x.index.unsqueeze(-1).expand(*x.index.shape, yt.shape[-1])
    return yt.gather(2, idx) * _accumulate(x.weight).unsqueeze(-1)


def outer_sum(left: Factor, right: Factor) -> torch.Tensor:
    """Per example and group, Σ_t left_tᵀ right_t: the materialized gradient [B, G, k_L, k_R],
    accumulated in at least float32 (the factors may differ in dtype under autocast)."""
    if isinstance(left, Dense) and isinstance(right, Dense):
        return _accumulate(left.values).transpose(-1, -2) @ _accumulate(right.values)
    if isinstance(left, Dense):
        return outer_sum(right, left).transpose(-1, -2)
    if isinstance(right, OneHot):
        rows = torch.nn.functional.one_hot(right.index, right.k).to(accumulation_dtype(left.weight.dtype))
        return outer_sum(left, Dense(rows * _accumulate(right.weight).unsqueeze(-1)))
    values = _accumulate(right.values) * _accumulate(left.weight).unsqueeze(-1)
    b, g, _, kr = values.shape
    out = values.new_zeros(b, g, left.k, kr)
    return out.scatter_add(2, left.index.unsqueeze(-1).expand_as(values), values)


def _entries(f: Factor) -> int:
    """How many numbers scaling the factor touches."""
    return math.prod(f.shape) if isinstance(f, Dense) else f.weight.numel()


def _fold_batch(f: Factor) -> Factor:
    """[B, G, T, ...] -> [1, G, B·T, ...]: the batch becomes more positions."""
    if isinstance(f, Dense):
        return Dense(f.values.transpose(0, 1).flatten(1, 2).unsqueeze(0))
    return OneHot(
        f.index.transpose(0, 1).flatten(1, 2).unsqueeze(0),
        f.k,
        f.weight.transpose(0, 1).flatten(1, 2).unsqueeze(0),
    )


@dataclass
class LinearForm:
    """G_i = L_iᵀ R_i per group; materialized gradients are reshaped to `shape`.

    A rule may give faster kernels for the same quantities: `materializer()` -> [B, *shape]
    per-example gradients, `contraction(c)` -> Σ_i c_i G_i. They must equal the factor forms
    (the rule tests check every strategy against the reference). `sparse` (a one-hot left factor:
    nn.Embedding(sparse=True)) makes the clipped sum a sparse COO tensor, as backward gives it."""

    left: Factor
    right: Factor
    shape: torch.Size
    materializer: Callable[[], torch.Tensor] | None = field(default=None, repr=False, compare=False)
    contraction: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False, compare=False)
    _materialized: torch.Tensor | None = field(default=None, repr=False, compare=False)
    sparse: bool = False

    def transposed(self) -> "LinearForm":
        """The same gradient seen through a transpose of the parameter's last two dims."""
        return LinearForm(self.right, self.left, torch.Size([*self.shape[:-2], self.shape[-1], self.shape[-2]]))

    def materialize(self) -> torch.Tensor:
        """[B, *shape] per-example gradients (kept: the clipped sum then reuses them, so a
        deferred factor built for them is released)."""
        if self._materialized is None:
            grads = self.materializer() if self.materializer else outer_sum(self.left, self.right)
            self._materialized = grads.reshape(grads.shape[0], *self.shape)
            for factor in (self.left, self.right):
                if isinstance(factor, Dense):
                    factor.release()
        return self._materialized

    def clipped_sum(self, c: torch.Tensor) -> torch.Tensor:
        """Σ_i c_i G_i (book-keeping): a sum over B of already materialized gradients, else one
        contraction of (c ⊙ L) with R over examples and positions — by the rule's kernel unless
        the factors are already built (a conv's patches, made for its ghost norm, turn the clipped
        sum into one matrix product, which beats the conv weight-gradient kernel: 0.14 vs 0.43 ms
        for the 16->32 3x3 stride-2 conv of the zoo's small_cnn at B=128 on a CPU)."""
        if self.sparse:
            return _sparse_rows(self.left.scaled(c), self.right, self.left.weight != 0, self.shape)
        if self._materialized is not None:
            return torch.tensordot(c.to(self._materialized.dtype), self._materialized, dims=1)
        if self.contraction is not None and not (self.left.built and self.right.built):
            return self.contraction(c).reshape(self.shape)
        left, right = self.left, self.right
        if _entries(left) <= _entries(right):  # scale the smaller factor (a bias's column of ones)
            left = left.scaled(c)
        else:
            right = right.scaled(c)
        grads = outer_sum(_fold_batch(left), _fold_batch(right))
        return grads.reshape(self.shape)


def _sparse_rows(rows: OneHot, values: Dense, kept: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Σ over examples and positions of e_{x_t} w_t r_tᵀ as a sparse COO tensor of `shape`: one row
    per position where `kept` (not padding), uncoalesced, as backward gives nn.Embedding(sparse=True)."""
    group_rows = torch.arange(rows.groups, device=rows.index.device).view(1, -1, 1) * rows.k
    index = (rows.index + group_rows)[kept]
    entries = (_accumulate(values.values) * rows.weight.unsqueeze(-1))[kept]
    return torch.sparse_coo_tensor(index.unsqueeze(0), entries.reshape(-1, *shape[1:]), shape, check_invariants=False)


@dataclass
class PerExampleGrad:
    """Per-example gradients [B, *shape], already materialized."""

    grads: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.grads.shape[1:]

    def materialize(self) -> torch.Tensor:
        return self.grads

    def clipped_sum(self, c: torch.Tensor) -> torch.Tensor:
        grads = _accumulate(self.grads)
        return torch.tensordot(c.to(grads.dtype), grads, dims=1)


Form = Union[LinearForm, PerExampleGrad]


# ---- norms ------------------------------------------------------------------------------------

STRATEGIES = ("ghost", "materialize")


def _kinds(forms: Sequence[LinearForm]) -> tuple[str, str]:
    """The factor kinds to cost: dense if any use's factor is dense (uses of a tied weight mix a
    one-hot embedding with a dense output layer; the dense Gram products dominate)."""
    left = "Dense" if any(isinstance(f.left, Dense) for f in forms) else "OneHot"
    right = "Dense" if any(isinstance(f.right, Dense) for f in forms) else "OneHot"
    return left, right


def _one_hot_side(left_kind: str, right_kind: str) -> str | None:
    """"left" or "right" when exactly that factor is one-hot (an embedding's per-example gradient
    is then materialized as its nonzero rows, see `one_hot_rows_norm_sq`), else None."""
    if (left_kind == "OneHot") != (right_kind == "OneHot"):
        return "left" if left_kind == "OneHot" else "right"
    return None


@lru_cache(maxsize=None)
def _formulas(left_kind: str, right_kind: str) -> dict[str, sympy.Expr]:
    # a Gram entry costs k multiply-adds for a dense factor, one compare for a one-hot factor
    gram_left = KL if left_kind == "Dense" else sympy.Integer(1)
    gram_right = KR if right_kind == "Dense" else sympy.Integer(1)
    one_hot = _one_hot_side(left_kind, right_kind)
    # with one one-hot factor, materializing sums each example's rows of the dense factor per
    # index (T·k, plus a sort of T indices) instead of building the [k_L, k_R] gradient
    materialize = G * T * KL * KR + G * KL * KR if one_hot is None else G * T * (KR if one_hot == "left" else KL)
    return {"ghost": G * T**2 * (gram_left + gram_right + 1), "materialize": materialize}


@lru_cache(maxsize=None)
def _cost_functions(left_kind: str, right_kind: str):
    """The formulas compiled to plain Python (evaluated every step, so no sympy on the hot path)."""
    return {name: sympy.lambdify((T, KL, KR, G), expr) for name, expr in _formulas(left_kind, right_kind).items()}


def cost_formulas(forms: Sequence[LinearForm]) -> dict[str, sympy.Expr]:
    """Per-example multiply-adds of each strategy for the squared norm of Σ_u G_u, symbolically."""
    return _formulas(*_kinds(forms))


def cost_values(forms: Sequence[LinearForm]) -> dict:
    """The formulas evaluated on these forms' shapes, plus the extra memory each needs (elements);
    "formulas" holds the sympy expressions themselves (for `explain`)."""
    f = forms[0]
    groups = f.left.groups
    positions = sum(u.left.positions for u in forms)
    shapes = {"T": positions, "k_L": f.left.k, "k_R": f.right.k, "G": groups}
    kinds = _kinds(forms)
    flops = {name: int(fn(positions, f.left.k, f.right.k, groups)) for name, fn in _cost_functions(*kinds).items()}
    one_hot = _one_hot_side(*kinds)
    rows = f.left.k * f.right.k if one_hot is None else positions * (f.right.k if one_hot == "left" else f.left.k)
    # a deferred factor (a conv's patches) is extra memory wherever a strategy builds it: ghost
    # always, materialize unless the rule's kernel makes the gradients without it
    deferred = sum(x.groups * x.positions * x.k for u in forms for x in (u.left, u.right) if x.is_deferred)
    memory = {
        "ghost": 2 * groups * positions**2 + deferred,
        "materialize": groups * rows + (0 if len(forms) == 1 and f.materializer else deferred),
    }
    return {"flops": flops, "memory": memory, "shapes": shapes, "formulas": _formulas(*kinds)}


# What one extra element per example costs, in multiply-adds, when "auto" weighs a strategy:
# it is written to memory and read back (a Gram matrix once, a per-example gradient for its norm
# and again for the clipped sum) and held until the clip factors exist. A CPU core does ~25 G
# multiply-adds/s in matrix products and moves ~2.5 G float32/s, so about 10-20; at 16 the
# GRU tagger's input weights (flops 230k ghost vs 203k materialize, memory 2k vs 6k) take ghost.
MEMORY_COST = 16


def choose_strategy(forms: Sequence[LinearForm], strategy: str, memory_budget: float | None = None) -> str:
    """`strategy` if forced, else, among those within `memory_budget` (elements per example), the
    one with the least flops + MEMORY_COST · extra elements."""
    if strategy != "auto":
        return strategy
    costs = cost_values(forms)
    allowed = [s for s in STRATEGIES if memory_budget is None or costs["memory"][s] <= memory_budget]
    candidates = allowed or [min(STRATEGIES, key=lambda s: costs["memory"][s])]
    return min(candidates, key=lambda s: costs["flops"][s] + MEMORY_COST * costs["memory"][s])


def _concat(factors: Sequence[Factor]) -> Factor:
    if len(factors) == 1:
        return factors[0]
    if isinstance(factors[0], Dense):
        return Dense(concat([f.values for f in factors], 2))
    return OneHot(concat([f.index for f in factors], 2), factors[0].k, concat([f.weight for f in factors], 2))


def concatenated(forms: Sequence[LinearForm]) -> list[LinearForm]:
    """Σ_u G_u (uses of one parameter in one orientation) as few forms as possible: uses whose
    factors have the same kinds are concatenated along T (G = Σ_t L_tᵀ R_t whichever use a
    position came from), so a weight used at every step of a recurrence becomes one form."""
    key = lambda f: (type(f.left).__name__, type(f.right).__name__)
    return [
        grp[0] if len(grp) == 1 else LinearForm(_concat([f.left for f in grp]), _concat([f.right for f in grp]), grp[0].shape)
        for grp in (list(g) for _, g in groupby(sorted(forms, key=key), key=key))
    ]


def _factor_values(f: Factor) -> torch.Tensor:
    """The numbers a factor scales by: a dense factor's values, a one-hot factor's weights."""
    return f.values if isinstance(f, Dense) else f.weight


def _scaled_factor(f: Factor, e: torch.Tensor) -> Factor:
    """The factor in float64, example i's entries multiplied by 2^-e_i."""
    if isinstance(f, Dense):
        return Dense(_scaled(f.values, e))
    return OneHot(f.index, f.k, _scaled(f.weight, e))


def ghost_norm_sq(forms: Sequence[LinearForm], safe: bool = False) -> torch.Tensor:
    """‖Σ_u L_uᵀ R_u‖² per example without materializing: Σ_{u,v} ⟨L_u L_vᵀ, R_u R_vᵀ⟩, over the
    `concatenated` blocks (one Gram product for a recurrent weight, not T² of them).

    NaN for an example whose sum overflowed or fell below zero in the working precision (the step
    then computes the norms again, `safe`). `safe`: in float64, of the left and the right factors
    each scaled per example by a power of two that brings its largest entry into (-1, 1), so no
    Gram product overflows; the result is scaled back (exact) and clamped at 0 (rounding)."""
    blocks = concatenated(forms)
    if safe:
        e_left, e_right = (
            torch.stack([_exponents(_factor_values(f)) for f in side]).amax(0)
            for side in ([b.left for b in blocks], [b.right for b in blocks])
        )
        blocks = [LinearForm(_scaled_factor(b.left, e_left), _scaled_factor(b.right, e_right), b.shape) for b in blocks]
    total = None
    for u, block_u in enumerate(blocks):
        for v, block_v in enumerate(blocks[u:], start=u):
            term = (gram(block_u.left, block_v.left) * gram(block_u.right, block_v.right)).sum((1, 2, 3))
            term = term if u == v else 2 * term  # the (v, u) term is the same number
            total = term if total is None else total + term
    if safe:
        return torch.ldexp(total.clamp_min(0), 2 * (e_left + e_right))
    return torch.where(total >= 0, total, torch.nan)  # inf stays inf


def one_hot_rows_norm_sq(form: LinearForm, safe: bool = False) -> torch.Tensor:
    """‖G_i‖² for a form with one one-hot factor, G_i = Σ_t w_t e_{x_t} r_tᵀ (an embedding): the
    nonzero rows of G_i are Σ_{t: x_t = v} w_t r_t, one per distinct index v, so
    ‖G_i‖² = Σ_v ‖Σ_{t: x_t = v} w_t r_t‖². Sorting each example's indices numbers its distinct
    ones; the rows are summed into those slots (at most T) and squared: T·k work and memory per
    example, where the Gram products cost T²·k and the dense gradient k_L·k_R."""
    one_hot, dense = (form.left, form.right) if isinstance(form.left, OneHot) else (form.right, form.left)
    rows = _accumulate(dense.values) * _accumulate(one_hot.weight).unsqueeze(-1)  # [B, G, T, k]
    ordered, order = one_hot.index.sort(dim=-1)
    starts = torch.cat([torch.ones_like(ordered[..., :1], dtype=torch.bool), ordered[..., 1:] != ordered[..., :-1]], -1)
    slot_of_ordered = starts.long().cumsum(-1) - 1  # the rank of each position's index among the distinct ones
    slot = slot_of_ordered.scatter(-1, order, slot_of_ordered)  # back to the positions' order
    sums = torch.zeros_like(rows).scatter_add(2, slot.unsqueeze(-1).expand_as(rows), rows)
    return _sum_squares(sums, safe)


def materialized_norm_sq(grads: torch.Tensor, safe: bool = False) -> torch.Tensor:
    """Σ over all but the batch dim of the squares of per-example gradients [B, ...] ([B] for a
    0-dim parameter); `safe`: in float64, without overflow (`_sum_squares`)."""
    return _sum_squares(grads, safe)


def linear_forms_norm_sq(forms: Sequence[LinearForm], strategy: str, safe: bool = False) -> torch.Tensor:
    """Squared norm of Σ_u G_u (uses of one parameter in one orientation) by `strategy`; `safe`
    as in `ghost_norm_sq`."""
    if strategy == "ghost":
        return ghost_norm_sq(forms, safe)
    blocks = concatenated(forms)
    if len(blocks) == 1 and _one_hot_side(type(blocks[0].left).__name__, type(blocks[0].right).__name__):
        return one_hot_rows_norm_sq(blocks[0], safe)
    total = blocks[0].materialize()
    for f in blocks[1:]:
        total = total + f.materialize()
    return materialized_norm_sq(total, safe)
