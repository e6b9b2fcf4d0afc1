"""The factors of a linear form: [B, G, T, k] per example, group and position, dense or one-hot.

Every factor implements `Factor`; code that must tell them apart reads `kind` ("dense" or
"one_hot"), never a class name.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, ClassVar, Sequence

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..ops import add_rows, concat


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype norms, clip factors and clipped sums are computed in: at least float32
    (bf16/fp16 Gram products and sums over positions or examples lose too much)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def accumulate(x: torch.Tensor) -> torch.Tensor:
    dtype = accumulation_dtype(x.dtype)
    return x if x.dtype == dtype else x.to(dtype)  # `to` costs a call even when it returns x


# One eager step's products and concatenations of factors, by the memory they read (`reusing_products`).
_PRODUCTS: ContextVar[dict | None] = ContextVar("fxclip_products", default=None)


@contextmanager
def reusing_products():
    """Inside: a Gram product or a concatenation of factors that an earlier use made from the same
    tensors is reused (an LSTM's W_hh and b_hh read the same per-step gate gradients: one
    concatenation and one Gram product of it instead of several). For eager steps:
    tensors are matched by their memory (address, sizes, strides), and each result keeps its
    inputs alive so no other tensor takes their address meanwhile. A traced step has no addresses;
    its graph merges the same ops by fx_graph_cse instead."""
    token = _PRODUCTS.set({})
    try:
        yield
    finally:
        _PRODUCTS.reset(token)


def _reused(kind: str, tensors: Sequence[torch.Tensor], compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    memo = _PRODUCTS.get()
    if memo is None:
        return compute()
    key = (kind, *((t.data_ptr(), t.dtype, t.device, tuple(t.shape), t.stride()) for t in tensors))
    if key not in memo:
        memo[key] = (compute(), tuple(tensors))
    return memo[key][0]


class Factor(ABC):
    """Rows [B, G, T, k]: per example and group, T positions of k-vectors."""

    kind: ClassVar[str]
    is_deferred: ClassVar[bool] = False  # values computed on first use (extra memory when used)

    @property
    @abstractmethod
    def groups(self) -> int: ...

    @property
    @abstractmethod
    def positions(self) -> int: ...

    @property
    @abstractmethod
    def k(self) -> int: ...

    @property
    def built(self) -> bool:
        """Whether the values exist (a deferred factor's are computed on first use)."""
        return True

    @property
    @abstractmethod
    def numbers(self) -> torch.Tensor:
        """The numbers the factor is scaled by: a dense factor's values, a one-hot factor's weights."""

    @abstractmethod
    def with_numbers(self, numbers: torch.Tensor) -> "Factor":
        """The same factor with `numbers` in place of its own (same shape)."""

    @property
    def entries(self) -> int:
        """How many numbers scaling the factor touches."""
        return self.numbers.numel()

    def scaled(self, c: torch.Tensor) -> "Factor":
        """Example i's rows times c_i, in the accumulation dtype."""
        numbers = accumulate(self.numbers)
        return self.with_numbers(numbers * c.to(numbers.dtype).view(-1, *[1] * (numbers.dim() - 1)))

    def release(self) -> None:
        """Drop values that are computed again if used again (a deferred factor's)."""


class Dense(Factor):
    """A dense factor: values [B, G, T, k]. `Dense.deferred(shape, compute)` makes one whose
    values are computed on first use: a factor that the chosen strategy may never need (a conv's
    patches, when its per-example gradients come from a faster kernel)."""

    kind = "dense"

    def __init__(self, values: torch.Tensor | None, *, shape=None, compute: Callable[[], torch.Tensor] | None = None):
        self._values, self._compute = values, compute
        self.shape = tuple(values.shape if shape is None else shape)
        self.is_deferred = compute is not None

    @classmethod
    def deferred(cls, shape, compute: Callable[[], torch.Tensor]) -> "Dense":
        return cls(None, shape=shape, compute=compute)

    @property
    def values(self) -> torch.Tensor:
        if self._values is None:
            self._values = self._compute()
        return self._values

    numbers = values

    def with_numbers(self, numbers: torch.Tensor) -> "Dense":
        return Dense(numbers)

    def release(self) -> None:
        if self.is_deferred:
            self._values = None

    @property
    def built(self) -> bool:
        return self._values is not None

    @property
    def entries(self) -> int:
        return math.prod(self.shape)  # without computing a deferred factor's values

    @property
    def k(self) -> int:
        return self.shape[-1]

    @property
    def positions(self) -> int:
        return self.shape[2]

    @property
    def groups(self) -> int:
        return self.shape[1]


class OneHot(Factor):
    """Rows e_{index[b,g,t]} · weight[b,g,t] of a k-column one-hot matrix, index [B, G, T]."""

    kind = "one_hot"

    def __init__(self, index: torch.Tensor, k: int, weight: torch.Tensor):
        self.index, self.weight = index, weight
        self._k = k

    @property
    def k(self) -> int:
        return self._k

    @property
    def positions(self) -> int:
        return self.index.shape[2]

    @property
    def groups(self) -> int:
        return self.index.shape[1]

    @property
    def numbers(self) -> torch.Tensor:
        return self.weight

    def with_numbers(self, numbers: torch.Tensor) -> "OneHot":
        return OneHot(self.index, self.k, numbers)

    def dense(self) -> torch.Tensor:
        """The rows as a dense [B, G, T, k] tensor, in the accumulation dtype."""
        rows = torch.nn.functional.one_hot(self.index, self.k).to(accumulation_dtype(self.weight.dtype))
        return rows * accumulate(self.weight).unsqueeze(-1)


def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for [B, G, m, k] @ [B, G, k, n] as one bmm over B·G: a third of the ops `matmul`
    dispatches for 4-d operands (per-call overhead is most of a small model's step)."""
    return torch.bmm(a.flatten(0, 1), b.flatten(0, 1)).unflatten(0, a.shape[:2])


def gram(x: Factor, y: Factor) -> torch.Tensor:
    """Per example and group, the T_x × T_y matrix of row inner products X Yᵀ."""
    if isinstance(x, Dense) and isinstance(y, Dense):
        if x.positions == 1 and y.positions == 1:  # one inner product: no matrix product needed
            return (accumulate(x.values) * accumulate(y.values)).sum(-1, keepdim=True)
        return _reused(
            "gram", (x.values, y.values), lambda: _bmm(accumulate(x.values), accumulate(y.values).transpose(-1, -2))
        )
    if isinstance(x, OneHot) and isinstance(y, OneHot):
        same = x.index.unsqueeze(-1) == y.index.unsqueeze(-2)
        return same * (accumulate(x.weight).unsqueeze(-1) * accumulate(y.weight).unsqueeze(-2))
    if isinstance(x, Dense):
        return gram(y, x).transpose(-1, -2)
    # x one-hot, y dense: (X Yᵀ)[t, s] = weight_t · Y[s, index_t]
    yt = accumulate(y.values).transpose(-1, -2)  # [B, G, k, Ty]
    idx = x.index.unsqueeze(-1).expand(*x.index.shape, yt.shape[-1])
    return yt.gather(2, idx) * accumulate(x.weight).unsqueeze(-1)


def outer_sum(left: Factor, right: Factor) -> torch.Tensor:
    """Per example and group, Σ_t left_tᵀ right_t: the materialized gradient [B, G, k_L, k_R],
    accumulated in at least float32 (the factors may differ in dtype under autocast)."""
    if isinstance(left, Dense) and isinstance(right, Dense):
        return _bmm(accumulate(left.values).transpose(-1, -2), accumulate(right.values))
    if isinstance(left, Dense):
        return outer_sum(right, left).transpose(-1, -2)
    if isinstance(right, OneHot):
        return outer_sum(left, Dense(right.dense()))
    values = accumulate(right.values) * accumulate(left.weight).unsqueeze(-1)
    return add_rows(values, left.index, left.k)


def batch_outer_sum(left: Factor, right: Factor) -> torch.Tensor:
    """Σ over examples and positions of left_tᵀ right_t, per group: [G, k_L, k_R] (the clipped
    sum's contraction, once one factor is scaled by the clip factors)."""
    if isinstance(left, Dense) and isinstance(right, Dense):
        # the sum runs over (example, position) pairs in any order: take them in the order of
        # left's memory, where the fold is a view (a sequence-first layout, [T, B, k], has the
        # batch inner: folded batch-major, both factors were copied)
        batch_inner = statically_known_true(left.values.stride(0) < left.values.stride(2))  # no guard on a traced batch

        def fold(x: torch.Tensor) -> torch.Tensor:  # [G, B·T, k]
            x = accumulate(x).transpose(0, 1)
            return (x.transpose(1, 2) if batch_inner else x).flatten(1, 2)

        return torch.bmm(fold(left.values).transpose(1, 2), fold(right.values))
    return outer_sum(fold_batch(left), fold_batch(right))[0]


def fold_batch(f: Factor) -> Factor:
    """[B, G, T, ...] -> [1, G, B·T, ...]: the batch becomes more positions."""
    def fold(x: torch.Tensor) -> torch.Tensor:
        return x.transpose(0, 1).flatten(1, 2).unsqueeze(0)

    if isinstance(f, Dense):
        return Dense(fold(f.values))
    return OneHot(fold(f.index), f.k, fold(f.weight))


def concat_positions(factors: Sequence[Factor]) -> Factor:
    """Factors of one kind (and k) as one, their positions one after another."""
    if len(factors) == 1:
        return factors[0]

    def joined(pieces: list[torch.Tensor]) -> torch.Tensor:
        return _reused("concat", pieces, lambda: concat(pieces, 2))

    if isinstance(factors[0], Dense):
        return Dense(joined([f.values for f in factors]))
    return OneHot(joined([f.index for f in factors]), factors[0].k, joined([f.weight for f in factors]))
