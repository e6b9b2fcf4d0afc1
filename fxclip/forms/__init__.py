"""What a rule returns: a per-example gradient in a form fxclip can take norms of and sum cheaply.

A rule never builds per-example gradients unless that is the cheap way. It returns a `Form`:

- `LinearForm(left, right, shape)`: example i's gradient is G_i = L_iᵀ R_i (one [k_L, k_R] block
  per group g), where L_i ∈ R^{T×k_L} and R_i ∈ R^{T×k_R} are factors over T positions (see
  `factors`: `Dense`, or `OneHot` for rows of one-hot vectors such as an embedding's tokens).
  Linear layers, convolutions (patches) and embeddings (one-hot rows) have this form. Its
  squared norm is available two ways, which must agree:
    ghost:        ‖L_iᵀ R_i‖² = ⟨L_i L_iᵀ, R_i R_iᵀ⟩ (Gram products, never G_i itself)
    materialize:  build G_i (or, with one one-hot factor, its nonzero rows), square and sum
  with the costs of `costs`, and the clipped sum Σ_i c_i G_i is one contraction of (c ⊙ L) with R
  over (i, t).
- `PerExampleGrad(grads)`: G_i itself, [B, *parameter shape]. For parameters whose per-example
  gradient is small (normalization affine weights, scales, biases) and for the fallback.

The package: `factors` (the factor types and their products), `norms` (the squared-norm kernels),
`costs` (the cost model and the strategy choice), and here the form types.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from itertools import groupby
from typing import Callable, Sequence

import torch

from .costs import MEMORY_COST, STRATEGIES, choose_strategy, cost_formulas, cost_values, one_hot_side
from .factors import (
    Dense,
    Factor,
    OneHot,
    accumulate,
    accumulation_dtype,
    batch_outer_sum,
    concat_positions,
    gram,
    outer_sum,
    reusing_products,
)
from .norms import ghost_norm_sq, materialized_norm_sq, one_hot_rows_norm_sq


class Form(ABC):
    """A per-example gradient G_i, [B, *shape] when materialized, of one use of a parameter."""

    shape: torch.Size

    @abstractmethod
    def norm_sq(self, strategy: str, safe: bool = False) -> torch.Tensor:
        """‖G_i‖² per example ([B]) by `strategy` (one of `costs()`, or any when it is None);
        `safe`: in float64 without overflow (`norms`)."""

    @abstractmethod
    def costs(self) -> dict | None:
        """`costs.cost_values` of the strategies to choose from, or None when there is no choice."""

    @abstractmethod
    def materialize(self) -> torch.Tensor:
        """[B, *shape] per-example gradients."""

    @abstractmethod
    def clipped_sum(self, c: torch.Tensor) -> torch.Tensor:
        """Σ_i c_i G_i (book-keeping), of `shape`."""

    @abstractmethod
    def transposed(self) -> "Form":
        """The same gradient seen through a transpose of the parameter's last two dims."""


@dataclass
class LinearForm(Form):
    """G_i = L_iᵀ R_i per group; materialized gradients are reshaped to `shape`.

    A rule may give faster kernels for the same quantities: `materializer()` -> [B, *shape]
    per-example gradients, `contraction(c)` -> Σ_i c_i G_i. They must equal the factor forms
    (the rule tests check every strategy against the reference). `sparse` (a one-hot left factor:
    nn.Embedding(sparse=True)) makes the clipped sum a sparse COO tensor, as backward gives it.
    The factors' identities are written for real tensors: a rule for complex values returns
    `PerExampleGrad` (the built-in ones leave complex calls to the fallback)."""

    left: Factor
    right: Factor
    shape: torch.Size
    materializer: Callable[[], torch.Tensor] | None = field(default=None, repr=False, compare=False)
    contraction: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False, compare=False)
    _materialized: torch.Tensor | None = field(default=None, repr=False, compare=False)
    sparse: bool = False

    def norm_sq(self, strategy: str, safe: bool = False) -> torch.Tensor:
        return linear_forms_norm_sq([self], strategy, safe)

    def costs(self) -> dict:
        return cost_values([self])

    def transposed(self) -> "LinearForm":
        return LinearForm(self.right, self.left, torch.Size([*self.shape[:-2], self.shape[-1], self.shape[-2]]))

    def materialize(self) -> torch.Tensor:
        """[B, *shape] per-example gradients. Mutates the form: it keeps them (the clipped sum then
        reuses them), and releases a deferred factor built for them."""
        if self._materialized is None:
            grads = self.materializer() if self.materializer else outer_sum(self.left, self.right)
            self._materialized = grads.reshape(grads.shape[0], *self.shape)
            self.left.release()
            self.right.release()
        return self._materialized

    def clipped_sum(self, c: torch.Tensor) -> torch.Tensor:
        """Σ_i c_i G_i: a sum over B of already materialized gradients, else one contraction of
        (c ⊙ L) with R over examples and positions, by the rule's kernel unless the factors are
        already built (a conv's patches, made for its ghost norm, turn the clipped sum into one
        matrix product, faster than the conv weight-gradient kernel: docs/benchmarks.md)."""
        if self.sparse:
            return _sparse_rows(self.left.scaled(c), self.right, self.left.weight != 0, self.shape)
        if self._materialized is not None:
            return weighted_sum(c, self._materialized)
        if self.contraction is not None and not (self.left.built and self.right.built):
            return self.contraction(c).reshape(self.shape)
        left, right = self.left, self.right
        if left.entries <= right.entries:  # scale the smaller factor
            left = left.scaled(c)
        else:
            right = right.scaled(c)
        return batch_outer_sum(left, right).reshape(self.shape)


def _sparse_rows(rows: OneHot, values: Dense, kept: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Σ over examples and positions of e_{x_t} w_t r_tᵀ as a sparse COO tensor of `shape`: one row
    per position where `kept` (not padding), uncoalesced, as backward gives nn.Embedding(sparse=True)."""
    group_rows = torch.arange(rows.groups, device=rows.index.device).view(1, -1, 1) * rows.k
    index = (rows.index + group_rows)[kept]
    entries = (accumulate(values.values) * rows.weight.unsqueeze(-1))[kept]
    return torch.sparse_coo_tensor(index.unsqueeze(0), entries.reshape(-1, *shape[1:]), shape, check_invariants=False)


@dataclass
class PerExampleGrad(Form):
    """Per-example gradients [B, *shape], already materialized."""

    grads: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.grads.shape[1:]

    def norm_sq(self, strategy: str, safe: bool = False) -> torch.Tensor:
        return materialized_norm_sq(self.grads, safe)

    def costs(self) -> None:
        return None

    def transposed(self) -> "PerExampleGrad":
        return PerExampleGrad(self.grads.transpose(-1, -2))

    def materialize(self) -> torch.Tensor:
        return self.grads

    def clipped_sum(self, c: torch.Tensor) -> torch.Tensor:
        return weighted_sum(c, accumulate(self.grads))


def weighted_sum(c: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Σ_i c_i grads_i over the batch dim: one matrix-vector product (tensordot's is six ops)."""
    return torch.mv(grads.reshape(grads.shape[0], -1).t(), c.to(grads.dtype)).reshape(grads.shape[1:])


def concatenated(forms: Sequence[LinearForm]) -> list[LinearForm]:
    """Σ_u G_u (uses of one parameter in one orientation) as few forms as possible: uses whose
    factors have the same kinds are concatenated along T (G = Σ_t L_tᵀ R_t whichever use a
    position came from), so a weight used at every step of a recurrence becomes one form."""
    key = lambda f: (f.left.kind, f.right.kind)
    return [
        grp[0] if len(grp) == 1 else LinearForm(concat_positions([f.left for f in grp]), concat_positions([f.right for f in grp]), grp[0].shape)
        for grp in (list(g) for _, g in groupby(sorted(forms, key=key), key=key))
    ]


def linear_forms_norm_sq(forms: Sequence[LinearForm], strategy: str, safe: bool = False) -> torch.Tensor:
    """Squared norm of Σ_u G_u (uses of one parameter in one orientation) by `strategy`, over the
    `concatenated` blocks (one Gram product for a recurrent weight, not T² of them); `safe` as in
    `ghost_norm_sq`."""
    blocks = concatenated(forms)
    if strategy == "ghost":
        return ghost_norm_sq(blocks, safe)
    if len(blocks) == 1 and one_hot_side(blocks[0].left.kind, blocks[0].right.kind):
        return one_hot_rows_norm_sq(blocks[0].left, blocks[0].right, safe)
    total = blocks[0].materialize()
    for f in blocks[1:]:
        total = total + f.materialize()
    return materialized_norm_sq(total, safe)


__all__ = [
    "Form", "LinearForm", "PerExampleGrad", "Factor", "Dense", "OneHot",
    "concatenated", "linear_forms_norm_sq", "ghost_norm_sq", "one_hot_rows_norm_sq", "materialized_norm_sq",
    "gram", "outer_sum", "accumulation_dtype", "reusing_products",
    "STRATEGIES", "MEMORY_COST", "choose_strategy", "cost_formulas", "cost_values",
]
