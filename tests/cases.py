"""The table of models every rule and option is checked on (see test_rules_table.py).

Each case is a small float64 model, a function making its inputs for a batch size, the batch dim
of each input, and the route its parameter uses must take. Names say which rule and option they
cover."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Case:
    name: str
    # the routes of its parameter uses, space-separated: rule names, "fallback" (the per-op
    # fallback), and "decomposed:<op>" for an aten op the graph must no longer hold (decompose
    # wrote it out as the ops it runs, whose routes are listed beside it)
    expect: str
    model: Callable[[], nn.Module]
    inputs: Callable[[int, torch.Generator], tuple]
    batch_dims: tuple = (0,)


def randn(*shape, batch_dim: int = 0):
    """Inputs [*shape] per example, the batch inserted at `batch_dim` (-1: last)."""

    def make(b, g):
        full = list(shape)
        full.insert(len(full) if batch_dim == -1 else batch_dim, b)
        return (torch.randn(*full, generator=g, dtype=torch.float64),)

    return make


def tokens(vocab, *shape, batch_dim: int = 0):
    def make(b, g):
        full = list(shape)
        full.insert(batch_dim, b)
        return (torch.randint(0, vocab, full, generator=g),)

    return make


def inputs(*makers):
    """Several inputs, each from its own maker, in order."""
    return lambda b, g: sum((make(b, g) for make in makers), ())


class Lambda(nn.Module):
    """A module around a function of (self, x), for one-off parameter uses."""

    def __init__(self, fn, **params):
        super().__init__()
        self.fn = fn
        for k, v in params.items():
            setattr(self, k, v)

    def forward(self, *xs):
        return self.fn(self, *xs)


def P(*shape):
    return nn.Parameter(torch.randn(*shape, dtype=torch.float64) / max(1, shape[-1]) ** 0.5)


class RelativePositionBias(nn.Module):
    """A table of 2T-1 biases indexed by a [T, T] map of offsets: the gather repeats entries."""

    def __init__(self, length=4):
        super().__init__()
        self.table = P(2 * length - 1)
        self.register_buffer("offsets", torch.arange(length)[:, None] - torch.arange(length)[None, :] + length - 1)

    def forward(self, x):
        return torch.tanh(x + self.table[self.offsets])


class FrozenUnderNoGrad(nn.Module):
    """A feature extractor run under torch.no_grad() (export wraps it in a region op) and a head."""

    def __init__(self):
        super().__init__()
        self.features = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        with torch.no_grad():
            f = torch.tanh(self.features(x))
        return self.head(f)


class TwiceApplied(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x):
        return self.lin(torch.tanh(self.lin(x)))


class TiedLM(nn.Module):
    def __init__(self, vocab=11, dim=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(7, dim) * 0.1)
        self.mix = nn.Linear(dim, dim)

    def forward(self, x):
        h = torch.tanh(self.mix(self.emb(x) + self.pos))
        return F.linear(h, self.emb.weight)  # [B, T, vocab]


class PositionIds(nn.Module):
    """Position ids of shape [1, T] into an embedding, broadcast over the batch (GPT-2/BERT style)."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(13, 5)
        self.pos = nn.Embedding(9, 5)
        self.register_buffer("position_ids", torch.arange(9).unsqueeze(0))

    def forward(self, x):
        return self.tok(x) + self.pos(self.position_ids[:, : x.shape[1]])


class ClassToken(nn.Module):
    def __init__(self):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, 4))
        self.proj = nn.Linear(3, 4)

    def forward(self, x):
        h = self.proj(x)
        return torch.cat([self.cls.expand(x.shape[0], -1, -1), h], dim=1)


class HandRMSNorm(nn.Module):
    def __init__(self, d=6):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class SeqFirst(nn.Module):
    """(T, B, E) input, flattened to (T·B, E) and back: the batch is not in dim 0 nor a dim alone."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        t, b, e = x.shape
        h = torch.tanh(self.inp(x.reshape(t * b, e)))
        return self.out(h).reshape(t, b, 3).transpose(0, 1)


class WeightNormLinear(nn.Module):
    """W = g · v / ‖v‖: a parameter reaches the op through a non-gather chain of two parameters."""

    def __init__(self):
        super().__init__()
        self.v = P(3, 5)
        self.g = nn.Parameter(torch.rand(3, 1, dtype=torch.float64) + 0.5)

    def forward(self, x):
        return F.linear(x, self.g * self.v / self.v.norm(dim=1, keepdim=True))


class Slices(nn.Module):
    """Disjoint slices of one parameter used by different ops."""

    def __init__(self):
        super().__init__()
        self.w = P(8, 5)

    def forward(self, x):
        return torch.cat([F.linear(x, self.w[:3]), torch.tanh(F.linear(x, self.w[3:]))], -1)


class OverlappingSlices(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = P(6, 5)

    def forward(self, x):
        return F.linear(x, self.w[:4]) * F.linear(x, self.w[2:]).tanh()


class TransposedUse(nn.Module):
    """One parameter used as F.linear(x, W) and as h @ W (= its transpose): exact shared norm."""

    def __init__(self):
        super().__init__()
        self.w = P(5, 5)

    def forward(self, x):
        return torch.tanh(F.linear(x, self.w)) @ self.w


class Frames(nn.Module):
    """Video-style (B, T, C, H, W) frames folded into the conv's batch as (B·T, C, H, W)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.norm = nn.GroupNorm(3, 3)

    def forward(self, x):
        b, t = x.shape[:2]
        h = self.norm(self.conv(x.flatten(0, 1)))
        return h.unflatten(0, (b, t)).mean(1)


class SeqFirstEmbedding(nn.Module):
    """Tokens (T, B) with the batch in dim 1, per-example mean over time."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(9, 4, padding_idx=1)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.emb(x)).mean(0))


class FilledBuffer(nn.Module):
    """A hand-written recurrent loop writing each step into a buffer it allocated,
    `outs[:, t] = h`: the writes are the only path from the cell's weights to the loss."""

    def __init__(self):
        super().__init__()
        self.cell = nn.GRUCell(3, 4)

    def forward(self, x):
        h = x.new_zeros(x.shape[0], 4)
        outs = x.new_zeros(x.shape[0], x.shape[1], 4)
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
            outs[:, t] = h
        return outs


class WritesThroughViews(nn.Module):
    """Writes into slices of an uninitialized buffer (nn.AdaptiveLogSoftmaxWithLoss.log_prob does
    this), an in-place add through a select, a view made before the writes read after them, and a
    copy_ into a whole tensor."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x):
        out = x.new_empty(x.shape[0], 6)
        pairs = out.view(x.shape[0], 3, 2)
        out[:, :3] = self.a(x).log_softmax(1)
        out[:, 3:] = torch.tanh(self.b(x))
        out[:, 0].add_(self.b(x)[:, 1])
        result = torch.empty_like(out[:, 1:4])
        return result.copy_(pairs.sum(-1) * out[:, 1:4])


class SpectralFilter(nn.Module):
    """A complex filter on a signal's spectrum (FNO-style), multiplied and divided."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(5, dtype=torch.complex128))
        self.v = nn.Parameter(torch.randn(5, dtype=torch.complex128))

    def forward(self, x):
        return torch.fft.irfft(torch.fft.rfft(x) * self.w / (self.v + 3), n=x.shape[-1])


class ComplexFromRealPair(nn.Module):
    """A complex weight made of two real parameters, and a real scale of a complex activation."""

    def __init__(self):
        super().__init__()
        self.re, self.im, self.scale = P(4), P(4), P(4)

    def forward(self, x):
        z = torch.complex(x[:, :4], x[:, 4:])
        w = torch.complex(self.re, self.im)
        return torch.cat([(z * w).real, (z / (w + 2)).imag, (z * self.scale).abs()], -1)


class WritesIntoPieces(nn.Module):
    """A mask built by writing into pieces of unbind and chunk (views that come in several)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x):
        mask = torch.ones_like(x)
        mask.unbind(1)[2].zero_()
        mask.chunk(2, 1)[1].mul_(x[:, 3:] > 0)
        return self.lin(x) * mask


class WritesIntoCopies(nn.Module):
    """Writes into the results of contiguous() and reshape() of a transposed tensor, which are
    copies (the tensor they were made from keeps its values), and of a true view."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x):
        h = self.lin(x)
        swapped = h.view(-1, 2, 3).transpose(1, 2)
        copied = swapped.contiguous()
        copied[:, 0] = 0.0
        reshaped = swapped.reshape(-1, 6)
        reshaped.mul_(2.0)
        scaled = h * 1.5
        aliased = scaled.reshape(-1, 6)
        aliased.add_(x)
        return copied.flatten(1) + reshaped + h + scaled


class RegisteredTwice(nn.Module):
    """A module under two attributes (self.b = self.a) and a parameter under two names (the
    model's own attribute and its layer's weight): named_parameters lists each once."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(4, 4), nn.Linear(4, 2)
        self.b = self.a
        self.mix = self.head.weight

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x))))) @ self.mix


class WritesWithOut(nn.Module):
    """out= writes: a mask into a slice of a buffer (under no_grad), a tanh into a new tensor."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x):
        mask = torch.zeros(x.shape[0], 8, dtype=x.dtype)
        with torch.no_grad():
            torch.gt(x, 0.2, out=mask[:, 1:7])
        squashed = torch.empty_like(x)
        torch.tanh(x, out=squashed)
        return self.lin(x) * mask[:, :6] * squashed


class TransposedElementwiseUse(nn.Module):
    """One parameter used whole as x * W and as x * Wᵀ: per-example gradients of a shared
    parameter, one of them seen through a transpose."""

    def __init__(self):
        super().__init__()
        self.w = P(4, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x * self.w.t() + x * self.w)


class BatchedMatmul(nn.Module):
    """torch.bmm with a [3, ·, ·] parameter on either side, the batch in the activation's rows."""

    def __init__(self, param_left: bool):
        super().__init__()
        self.param_left = param_left
        self.w = P(3, 2, 4) if param_left else P(3, 4, 2)

    def forward(self, x):  # [B, 3, 4]
        if self.param_left:
            return torch.bmm(self.w, x.permute(1, 2, 0)).permute(2, 0, 1)
        return torch.bmm(x.transpose(0, 1), self.w).transpose(0, 1)


class IndexedBias(nn.Module):
    """A vector parameter indexed by the tokens (a per-token bias b[x]) beside an embedding."""

    def __init__(self):
        super().__init__()
        self.emb, self.lin, self.bias = nn.Embedding(6, 4), nn.Linear(4, 2), P(6)

    def forward(self, x):
        return self.lin(self.emb(x).mean(1)) + self.bias[x].sum(1, keepdim=True)


class IndexedMatrices(nn.Module):
    """A table of matrices indexed by the tokens, each applied to a vector of the example's."""

    def __init__(self):
        super().__init__()
        self.w = P(5, 3, 2)

    def forward(self, x, v):
        return torch.tanh(self.w[x] @ v.unsqueeze(-1)).flatten(1)


class BagsPerExample(nn.Module):
    """Several bags per example, [B, bags, T] folded into the bag's 2-D input."""

    def __init__(self, mode: str):
        super().__init__()
        self.bag = nn.EmbeddingBag(6, 3, mode=mode, dtype=torch.float64)

    def forward(self, x):
        return self.bag(x.flatten(0, 1)).unflatten(0, (x.shape[0], -1))


class WeightedBags(nn.Module):
    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(6, 3, mode="sum", dtype=torch.float64)

    def forward(self, x, weights):
        return self.bag(x, per_sample_weights=weights)


def padding_only_bag(b, g):
    """Bags of 4 tokens of 5, example 1's (when there is one) padding (token 0) only."""
    return (torch.randint(0, 5, (b, 4), generator=g).index_fill(0, torch.arange(1, min(b, 2)), 0),)


class Temperature(nn.Module):
    """Logits divided by a 0-dim parameter."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.temperature = nn.Parameter(torch.tensor(1.5, dtype=torch.float64))

    def forward(self, x):
        return self.lin(x) / self.temperature


class ShiftAndScale(nn.Module):
    """A raw bias subtracted and a raw scale divided by."""

    def __init__(self):
        super().__init__()
        self.b = P(5)
        self.d = nn.Parameter(torch.rand(5, dtype=torch.float64) + 1)

    def forward(self, x):
        return torch.tanh(x - self.b) / self.d


class IndexWithinExamples(nn.Module):
    """Advanced indexing that picks entries within each example (batch index arange(B))."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x)[torch.arange(x.shape[0])[:, None], torch.tensor([[0, 2]])]


class TwoInputs(nn.Module):
    """Two inputs, the second with its batch in dim 1."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(2, 4)

    def forward(self, x, y):
        return self.a(x) * self.b(y.T)


class SeqFirstPositionalTable(nn.Module):
    """A [T, 1, d] positional table and a scale on (T, B, d) input."""

    def __init__(self):
        super().__init__()
        self.pos, self.scale = P(5, 1, 3), P(3)

    def forward(self, x):
        return torch.tanh(x * self.scale + self.pos).transpose(0, 1)


class AdaptiveLogSoftmax(nn.Module):
    def __init__(self):
        super().__init__()
        self.asm = nn.AdaptiveLogSoftmaxWithLoss(6, 10, cutoffs=[3, 6], div_value=2.0)

    def forward(self, x):
        return self.asm.log_prob(x)


class Bilinear(nn.Module):
    """nn.Bilinear of the input and its reverse; `seq_first`: (T, B, d) input, mean over T."""

    def __init__(self, seq_first: bool = False):
        super().__init__()
        self.seq_first = seq_first
        self.bil = nn.Bilinear(4, 4, 3)

    def forward(self, x):
        out = self.bil(x, x.flip(-1))
        return out.mean(0) if self.seq_first else out


class ComplexLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3, dtype=torch.complex128)

    def forward(self, x):
        return self.lin(torch.complex(x[:, :4], x[:, 4:])).abs()


def conv(dim, **kw):
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
    return lambda: nn.Sequential(cls(**kw), nn.Flatten(), nn.Tanh())


def conv_transpose(dim, *args, **kw):
    cls = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dim]
    return lambda: nn.Sequential(cls(*args, **kw), nn.Flatten(), nn.Tanh())


def conv_input(dim, channels, side):
    return randn(channels, *([side] * dim))


CASES = [
    # linear family
    Case("linear", "linear", lambda: nn.Linear(5, 3), randn(5)),
    Case("linear_leading_dims", "linear", lambda: nn.Linear(5, 3), randn(4, 2, 5)),
    Case("linear_no_bias", "linear", lambda: nn.Linear(5, 3, bias=False), randn(4, 5)),
    Case("matmul_param_right", "matmul", lambda: Lambda(lambda s, x: x @ s.w, w=P(5, 3)), randn(4, 5)),
    Case("matmul_param_left", "matmul", lambda: Lambda(lambda s, x: s.w @ x, w=P(3, 4)), randn(4, 2)),
    Case("matmul_vector_param_right", "matmul", lambda: Lambda(lambda s, x: torch.softmax(x @ s.v, 1), v=P(4)), randn(3, 4)),
    Case("matmul_vector_param_left", "matmul", lambda: Lambda(lambda s, x: torch.tanh(s.v @ x), v=P(4)), randn(4, 3)),
    Case("matmul_vector_param_seq_first", "matmul", lambda: Lambda(lambda s, x: torch.tanh(x @ s.v).T, v=P(4)),
         randn(3, 4, batch_dim=1), (1,)),
    Case("mm", "matmul", lambda: Lambda(lambda s, x: torch.mm(x, s.w), w=P(5, 3)), randn(5)),
    Case("bmm_param_right", "bmm", lambda: BatchedMatmul(param_left=False), randn(3, 4)),
    Case("bmm_param_left", "bmm", lambda: BatchedMatmul(param_left=True), randn(3, 4)),
    Case("addmm", "addmm", lambda: Lambda(lambda s, x: torch.addmm(s.b, x, s.w, beta=0.5, alpha=2.0), w=P(5, 3), b=P(3)), randn(5)),
    # composite ops without a rule are written as the ops they run (einsum: permutes and a bmm)
    Case("einsum", "decomposed:einsum bmm",
         lambda: Lambda(lambda s, x: torch.einsum("btj,jk->btk", x, s.w), w=P(4, 3)), randn(5, 4)),
    Case("einsum_three_operands", "decomposed:einsum bmm",
         lambda: Lambda(lambda s, x: torch.einsum("bi,oij,bj->bo", x, s.w, x), w=P(3, 4, 4)), randn(4)),
    # convolutions
    Case("conv1d", "conv", conv(1, in_channels=3, out_channels=4, kernel_size=3, stride=2, padding=1), conv_input(1, 3, 9)),
    Case("conv2d", "conv", conv(2, in_channels=3, out_channels=4, kernel_size=3), conv_input(2, 3, 6)),
    Case("conv2d_stride_pad_tuple", "conv",
         conv(2, in_channels=2, out_channels=3, kernel_size=(3, 2), stride=(2, 1), padding=(1, 2)), conv_input(2, 2, 7)),
    Case("conv2d_same_even_kernel", "conv",
         conv(2, in_channels=2, out_channels=3, kernel_size=4, padding="same", dilation=2), conv_input(2, 2, 7)),
    Case("conv2d_valid", "conv", conv(2, in_channels=2, out_channels=3, kernel_size=2, padding="valid", bias=False), conv_input(2, 2, 5)),
    Case("conv2d_dilation", "conv", conv(2, in_channels=2, out_channels=2, kernel_size=3, dilation=2, padding=2), conv_input(2, 2, 7)),
    Case("conv2d_groups", "conv", conv(2, in_channels=4, out_channels=6, kernel_size=3, groups=2, padding=1), conv_input(2, 4, 5)),
    Case("conv2d_depthwise", "conv", conv(2, in_channels=3, out_channels=6, kernel_size=3, groups=3), conv_input(2, 3, 5)),
    Case("conv2d_reflect", "conv",
         conv(2, in_channels=2, out_channels=2, kernel_size=3, padding=1, padding_mode="reflect"), conv_input(2, 2, 5)),
    Case("conv_transpose1d_groups_dilation", "conv_transpose",
         conv_transpose(1, 4, 6, 3, stride=2, groups=2, dilation=2), conv_input(1, 4, 5)),
    Case("conv_transpose2d_output_padding", "conv_transpose",
         conv_transpose(2, 2, 3, 3, stride=2, padding=1, output_padding=1), conv_input(2, 2, 4)),
    # output_padding at or above the stride (allowed below the dilation)
    Case("conv_transpose1d_output_padding_over_stride", "conv_transpose",
         conv_transpose(1, 2, 3, 2, padding=1, output_padding=1, dilation=2), conv_input(1, 2, 4)),
    Case("conv_transpose2d_output_padding_over_stride", "conv_transpose",
         conv_transpose(2, 4, 2, 2, stride=(2, 1), output_padding=(2, 1), dilation=(3, 2), groups=2), conv_input(2, 4, 3)),
    Case("conv_transpose2d_no_bias", "conv_transpose", conv_transpose(2, 2, 3, (2, 3), stride=(1, 2), bias=False), conv_input(2, 2, 3)),
    Case("conv_transpose3d", "conv_transpose", conv_transpose(3, 2, 2, 2, stride=2), conv_input(3, 2, 2)),
    Case("conv3d", "conv", conv(3, in_channels=2, out_channels=3, kernel_size=2, stride=(1, 2, 1), padding=1), conv_input(3, 2, 4)),
    # embeddings
    Case("embedding", "embedding", lambda: nn.Embedding(7, 4), tokens(7, 6)),
    Case("embedding_padding_idx", "embedding", lambda: nn.Embedding(5, 4, padding_idx=0), tokens(5, 8)),
    Case("index_rows", "index_rows", lambda: Lambda(lambda s, x: s.w[x], w=P(6, 3)), tokens(6, 5)),
    Case("index_rows_vector", "embedding index_rows linear", IndexedBias, tokens(6, 5)),
    Case("index_rows_of_matrices", "index_rows", IndexedMatrices, inputs(tokens(5, 4), randn(4, 2)), (0, 0)),
    Case("embedding_bag_mean_padding", "embedding_bag",
         lambda: nn.EmbeddingBag(5, 4, mode="mean", padding_idx=0, dtype=torch.float64), tokens(5, 8)),
    Case("embedding_bag_max_padding", "embedding_bag",
         lambda: nn.EmbeddingBag(5, 4, mode="max", padding_idx=0, dtype=torch.float64), padding_only_bag),
    Case("embedding_bag_max_bags_per_example", "embedding_bag", lambda: BagsPerExample("max"), tokens(6, 3, 2)),
    Case("embedding_bag_sum_weights", "embedding_bag", WeightedBags, inputs(tokens(6, 5), randn(5)), (0, 0)),
    Case("embedding_bag_bags_per_example", "embedding_bag", lambda: BagsPerExample("mean"), tokens(6, 3, 4)),
    Case("position_ids_broadcast", "add embedding", PositionIds, tokens(13, 9)),
    # normalization
    Case("layer_norm", "layer_norm linear", lambda: nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6)), randn(3, 4)),
    Case("group_norm", "conv group_norm", lambda: nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4)), conv_input(2, 2, 5)),
    # channels last moved to dim 1: [B, L, C] -> [B, C, L] is not dense in any layout the kernel takes
    Case("group_norm_moved_channels", "group_norm",
         lambda: Lambda(lambda s, x: s.norm(torch.tanh(x.movedim(-1, 1))), norm=nn.GroupNorm(3, 3)), randn(4, 3)),
    Case("instance_norm", "conv instance_norm",
         lambda: nn.Sequential(nn.Conv1d(2, 3, 2), nn.InstanceNorm1d(3, affine=True)), conv_input(1, 2, 6)),
    Case("rms_norm", "linear rms_norm", lambda: nn.Sequential(nn.Linear(4, 6), nn.RMSNorm(6)), randn(3, 4)),
    Case("batch_norm_eval", "batch_norm_eval conv",
         lambda: nn.Sequential(nn.Conv2d(2, 3, 2), nn.BatchNorm2d(3)).eval(), conv_input(2, 2, 4)),
    # parameters entering by broadcasting
    Case("layer_scale", "mul", lambda: Lambda(lambda s, x: x * s.gamma, gamma=P(5)), randn(3, 5)),
    Case("hand_rms_norm", "linear mul", lambda: nn.Sequential(nn.Linear(4, 6), HandRMSNorm()), randn(3, 4)),
    Case("scalar_parameter", "div linear", Temperature, randn(4)),
    Case("raw_bias", "div sub", ShiftAndScale, randn(3, 5)),
    Case("positional_table", "add", lambda: Lambda(lambda s, x: torch.tanh(x + s.pos), pos=P(3, 5)), randn(3, 5)),
    Case("class_token", "expand linear", ClassToken, randn(2, 3)),
    Case("relative_position_table", "add", RelativePositionBias, randn(4, 4)),
    # parameters gradients do not reach: detached, or used under torch.no_grad()
    Case("detached_parameter", "add linear",
         lambda: Lambda(lambda s, x: s.lin(x) * s.g.detach() + s.g, lin=nn.Linear(4, 3), g=P(3)), randn(4)),
    Case("no_grad_region", "linear", FrozenUnderNoGrad, randn(4)),
    # shared, sliced and computed parameters
    Case("module_twice", "linear", TwiceApplied, randn(6)),
    Case("tied_embedding_output", "add embedding linear", TiedLM, tokens(11, 7)),
    Case("registered_twice", "linear matmul", RegisteredTwice, randn(4)),
    Case("index_within_examples", "linear", IndexWithinExamples, randn(4)),
    Case("disjoint_slices", "linear", Slices, randn(5)),
    Case("overlapping_slices", "linear", OverlappingSlices, randn(5)),
    Case("transposed_use", "linear matmul", TransposedUse, randn(3, 5)),
    Case("transposed_elementwise_use", "linear mul", TransposedElementwiseUse, randn(4, 4)),
    Case("weight_norm_chain", "linear", WeightNormLinear, randn(5)),
    Case("weight_norm_parametrization", "decomposed:_weight_norm linear",
         lambda: nn.utils.parametrizations.weight_norm(nn.Linear(5, 3)), randn(5)),
    # layouts
    Case("seq_first_flattened", "linear", SeqFirst, randn(5, 4, batch_dim=1), (1,)),
    Case("two_inputs_batch_in_dim1", "linear", TwoInputs, inputs(randn(3), randn(2, batch_dim=1)), (0, 1)),
    Case("seq_first_positional_table", "add mul", SeqFirstPositionalTable, randn(5, 3, batch_dim=1), (1,)),
    Case("frames_folded_into_conv_batch", "conv group_norm", Frames, randn(3, 2, 4, 4)),
    Case("batch_dim_negative", "matmul", lambda: Lambda(lambda s, x: torch.tanh(s.w @ x).T, w=P(3, 4)), randn(4, batch_dim=-1), (-1,)),
    Case("seq_first_embedding", "embedding linear", SeqFirstEmbedding, tokens(9, 6, batch_dim=1), (1,)),
    # in-place writes into tensors the forward made (functionalize)
    Case("filled_buffer", "decomposed:gru_cell linear", FilledBuffer, randn(3, 3)),
    Case("writes_through_views", "linear", WritesThroughViews, randn(4)),
    Case("writes_into_pieces", "linear", WritesIntoPieces, randn(6)),
    Case("writes_into_copies", "linear", WritesIntoCopies, randn(6)),
    Case("adaptive_log_softmax", "linear", AdaptiveLogSoftmax, randn(6)),
    # complex values (gradients are g ⊙ conj(∂z/∂·))
    Case("complex_spectral_filter", "div mul", SpectralFilter, randn(8)),
    Case("complex_from_real_pair", "div mul", ComplexFromRealPair, randn(8)),
    # the fallback (ops no rule covers; the factor forms' rules leave complex values to it)
    Case("fallback_prelu", "decomposed:prelu fallback linear", lambda: nn.Sequential(nn.Linear(4, 5), nn.PReLU(5)), randn(4)),
    Case("fallback_bilinear_seq_first", "decomposed:bilinear add fallback", lambda: Bilinear(seq_first=True), randn(3, 4, batch_dim=1), (1,)),
    Case("fallback_complex_linear", "fallback", ComplexLinear, randn(8)),
    # a stack of matrices broadcast against the activation: [B, D] @ [k, D, E] -> [k, B, E]
    Case("fallback_matmul_param_stack", "fallback", lambda: Lambda(lambda s, x: (x @ s.w).transpose(0, 1), w=P(2, 4, 3)), randn(4)),
    Case("fallback_bilinear", "decomposed:bilinear add fallback", Bilinear, randn(4)),
]
