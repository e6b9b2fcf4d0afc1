"""What each norm strategy of linear forms costs, and the choice between them.

`_formulas` is the one statement of the costs: sympy formulas in T (positions), k_L and k_R (the
factors' widths) and G (groups), in multiply-adds per example (every strategy is linear in the
batch size B), for the squared norm of Σ_u G_u over the uses of one parameter in one orientation.
`explain()` prints them with their values on the model's shapes; docs/rules.md quotes them (a test
keeps the quote true).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import sympy

T, KL, KR, G = sympy.symbols("T k_L k_R G", positive=True, integer=True)

STRATEGIES = ("ghost", "materialize")

# What one extra element per example costs, in multiply-adds, when "auto" weighs a strategy:
# it is written to memory and read back (a Gram matrix once, a per-example gradient for its norm
# and again for the clipped sum) and held until the clip factors exist. A CPU core does ~25 G
# multiply-adds/s in matrix products and moves ~2.5 G float32/s, so about 10-20; at 16 the
# GRU tagger's input weights (flops 230k ghost vs 203k materialize, memory 2k vs 6k) take ghost.
MEMORY_COST = 16


def factor_kinds(forms: Sequence) -> tuple[str, str]:
    """The factor kinds to cost: dense if any use's factor is dense (uses of a tied weight mix a
    one-hot embedding with a dense output layer; the dense Gram products dominate)."""
    left = "dense" if any(f.left.kind == "dense" for f in forms) else "one_hot"
    right = "dense" if any(f.right.kind == "dense" for f in forms) else "one_hot"
    return left, right


def one_hot_side(left_kind: str, right_kind: str) -> str | None:
    """"left" or "right" when exactly that factor is one-hot (an embedding's per-example gradient
    is then materialized as its nonzero rows, see `norms.one_hot_rows_norm_sq`), else None."""
    if (left_kind == "one_hot") != (right_kind == "one_hot"):
        return "left" if left_kind == "one_hot" else "right"
    return None


# What sorting an example's indices and summing its rows into their slots (the one-hot rows of
# `norms.one_hot_rows_norm_sq`) costs per position beyond the T·k additions, in multiply-adds: the
# sort, the scatter of slot numbers and the row sums are ops that no matrix product or fusion
# speeds up. Side by side at B=128, k=64 on a CPU the rows and the T² Gram products took the same
# time near T = 40 (0.28 ms each at T=32; the compiled embedding-mean classifier at T=32, k=64:
# 1.63x the eager floor with the rows, 1.18x with the Gram products); with this constant "auto"
# takes the Gram products below T = (17·k + 2800) / (k + 34): about 40 at k = 64, 20 at k = 768.
ONE_HOT_ROWS_PER_POSITION = 2800


@lru_cache(maxsize=None)
def _formulas(left_kind: str, right_kind: str) -> dict[str, sympy.Expr]:
    # ghost: two T×T Gram matrices (an entry costs k for a dense factor, one compare for a one-hot
    # one) and their inner product; materialize: build each [k_L, k_R] block and square it, or,
    # with exactly one one-hot factor, only its nonzero rows (T·k: a sum of the dense rows per
    # index, after sorting the indices: ONE_HOT_ROWS_PER_POSITION)
    gram_left = KL if left_kind == "dense" else sympy.Integer(1)
    gram_right = KR if right_kind == "dense" else sympy.Integer(1)
    one_hot = one_hot_side(left_kind, right_kind)
    dense_k = KR if one_hot == "left" else KL
    materialize = G * T * KL * KR + G * KL * KR if one_hot is None else G * T * (dense_k + ONE_HOT_ROWS_PER_POSITION)
    return {"ghost": G * T**2 * (gram_left + gram_right + 1), "materialize": materialize}


@lru_cache(maxsize=None)
def _cost_functions(left_kind: str, right_kind: str):
    """The formulas compiled to plain Python (evaluated every step, so no sympy on the hot path)."""
    return {name: sympy.lambdify((T, KL, KR, G), expr) for name, expr in _formulas(left_kind, right_kind).items()}


def cost_formulas(forms: Sequence) -> dict[str, sympy.Expr]:
    """Per-example multiply-adds of each strategy for the squared norm of Σ_u G_u, symbolically."""
    return _formulas(*factor_kinds(forms))


def cost_values(forms: Sequence) -> dict:
    """The formulas evaluated on these linear forms' shapes, plus the extra memory each needs
    (elements); "formulas" holds the sympy expressions themselves (for `explain`). The same shapes
    give the same dict (computed once: an eager step asks for every use's costs)."""
    f = forms[0]
    # a deferred factor (a conv's patches) is extra memory wherever a strategy builds it: ghost
    # always, materialize unless the rule's kernel makes the gradients without it
    deferred = sum(x.groups * x.positions * x.k for u in forms for x in (u.left, u.right) if x.is_deferred)
    key = (
        factor_kinds(forms), sum(u.left.positions for u in forms), f.left.k, f.right.k, f.left.groups, deferred,
        len(forms) == 1 and f.materializer is not None,
    )
    if all(type(n) is int for n in key[1:6]):  # not a size traced as a symbol (unhashable)
        return _cost_values(*key)
    return _cost_values.__wrapped__(*key)


@lru_cache(maxsize=4096)
def _cost_values(kinds, positions, k_left, k_right, groups, deferred, own_kernel: bool) -> dict:
    shapes = {"T": positions, "k_L": k_left, "k_R": k_right, "G": groups}
    flops = {name: int(fn(positions, k_left, k_right, groups)) for name, fn in _cost_functions(*kinds).items()}
    one_hot = one_hot_side(*kinds)
    rows = k_left * k_right if one_hot is None else positions * (k_right if one_hot == "left" else k_left)
    memory = {
        "ghost": 2 * groups * positions**2 + deferred,
        "materialize": groups * rows + (0 if own_kernel else deferred),
    }
    return {"flops": flops, "memory": memory, "shapes": shapes, "formulas": _formulas(*kinds)}


def choose_strategy(forms: Sequence, strategy: str, memory_budget: float | None = None, costs: dict | None = None) -> str:
    """`strategy` if forced, else, among those within `memory_budget` (elements per example), the
    one with the least flops + MEMORY_COST · extra elements; `costs`: the forms' `cost_values`,
    when the caller has them already."""
    if strategy != "auto":
        return strategy
    costs = costs or cost_values(forms)
    allowed = [s for s in STRATEGIES if memory_budget is None or costs["memory"][s] <= memory_budget]
    candidates = allowed or [min(STRATEGIES, key=lambda s: costs["memory"][s])]
    return min(candidates, key=lambda s: costs["flops"][s] + MEMORY_COST * costs["memory"][s])
