"""The table of models every rule and option is checked on (see test_rules_table.py).

Each case is a small float64 model, a function making its inputs for a batch size, and the batch
dim of each input. Names say which rule and option they cover."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Case:
    name: str
    model: Callable[[], nn.Module]
    inputs: Callable[[int, torch.Generator], tuple]
    batch_dims: tuple = (0,)


def randn(*shape):
    return lambda b, g: (torch.randn(b, *shape, generator=g, dtype=torch.float64),)


def tokens(vocab, length):
    return lambda b, g: (torch.randint(0, vocab, (b, length), generator=g),)


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


def conv(dim, **kw):
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
    return lambda: nn.Sequential(cls(**kw), nn.Flatten(), nn.Tanh())


def conv_input(dim, channels, side):
    return randn(channels, *([side] * dim))


CASES = [
    # linear family
    Case("linear", lambda: nn.Linear(5, 3), randn(5)),
    Case("linear_leading_dims", lambda: nn.Linear(5, 3), randn(4, 2, 5)),
    Case("linear_no_bias", lambda: nn.Linear(5, 3, bias=False), randn(4, 5)),
    Case("matmul_param_right", lambda: Lambda(lambda s, x: x @ s.w, w=P(5, 3)), randn(4, 5)),
    Case("matmul_param_left", lambda: Lambda(lambda s, x: s.w @ x, w=P(3, 4)), randn(4, 2)),
    Case("matmul_vector_param_right", lambda: Lambda(lambda s, x: torch.softmax(x @ s.v, 1), v=P(4)), randn(3, 4)),
    Case("matmul_vector_param_left", lambda: Lambda(lambda s, x: torch.tanh(s.v @ x), v=P(4)), randn(4, 3)),
    Case("matmul_vector_param_seq_first", lambda: Lambda(lambda s, x: torch.tanh(x @ s.v).T, v=P(4)),
         lambda b, g: (torch.randn(3, b, 4, generator=g, dtype=torch.float64),), (1,)),
    Case("mm", lambda: Lambda(lambda s, x: torch.mm(x, s.w), w=P(5, 3)), randn(5)),
    Case("bmm_param_right", lambda: Lambda(lambda s, x: torch.bmm(x.transpose(0, 1), s.w).transpose(0, 1), w=P(3, 4, 2)), randn(3, 4)),
    Case("bmm_param_left", lambda: Lambda(lambda s, x: torch.bmm(s.w, x.permute(1, 2, 0)).permute(2, 0, 1), w=P(3, 2, 4)), randn(3, 4)),
    Case("addmm", lambda: Lambda(lambda s, x: torch.addmm(s.b, x, s.w, beta=0.5, alpha=2.0), w=P(5, 3), b=P(3)), randn(5)),
    # composite ops without a rule are written as the ops they run (einsum: permutes and a bmm)
    Case("einsum", lambda: Lambda(lambda s, x: torch.einsum("btj,jk->btk", x, s.w), w=P(4, 3)), randn(5, 4)),
    Case("einsum_three_operands", lambda: Lambda(lambda s, x: torch.einsum("bi,oij,bj->bo", x, s.w, x), w=P(3, 4, 4)), randn(4)),
    # convolutions
    Case("conv1d", conv(1, in_channels=3, out_channels=4, kernel_size=3, stride=2, padding=1), conv_input(1, 3, 9)),
    Case("conv2d", conv(2, in_channels=3, out_channels=4, kernel_size=3), conv_input(2, 3, 6)),
    Case("conv2d_stride_pad_tuple", conv(2, in_channels=2, out_channels=3, kernel_size=(3, 2), stride=(2, 1), padding=(1, 2)), conv_input(2, 2, 7)),
    Case("conv2d_same_even_kernel", conv(2, in_channels=2, out_channels=3, kernel_size=4, padding="same", dilation=2), conv_input(2, 2, 7)),
    Case("conv2d_valid", conv(2, in_channels=2, out_channels=3, kernel_size=2, padding="valid", bias=False), conv_input(2, 2, 5)),
    Case("conv2d_dilation", conv(2, in_channels=2, out_channels=2, kernel_size=3, dilation=2, padding=2), conv_input(2, 2, 7)),
    Case("conv2d_groups", conv(2, in_channels=4, out_channels=6, kernel_size=3, groups=2, padding=1), conv_input(2, 4, 5)),
    Case("conv2d_depthwise", conv(2, in_channels=3, out_channels=6, kernel_size=3, groups=3), conv_input(2, 3, 5)),
    Case("conv2d_reflect", conv(2, in_channels=2, out_channels=2, kernel_size=3, padding=1, padding_mode="reflect"), conv_input(2, 2, 5)),
    Case("conv_transpose1d_groups_dilation", lambda: nn.Sequential(nn.ConvTranspose1d(4, 6, 3, stride=2, groups=2, dilation=2), nn.Flatten(), nn.Tanh()), conv_input(1, 4, 5)),
    Case("conv_transpose2d_output_padding", lambda: nn.Sequential(nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1), nn.Flatten(), nn.Tanh()), conv_input(2, 2, 4)),
    # output_padding at or above the stride (allowed below the dilation)
    Case("conv_transpose1d_output_padding_over_stride", lambda: nn.Sequential(nn.ConvTranspose1d(2, 3, 2, padding=1, output_padding=1, dilation=2), nn.Flatten(), nn.Tanh()), conv_input(1, 2, 4)),
    Case("conv_transpose2d_output_padding_over_stride", lambda: nn.Sequential(nn.ConvTranspose2d(4, 2, 2, stride=(2, 1), output_padding=(2, 1), dilation=(3, 2), groups=2), nn.Flatten(), nn.Tanh()), conv_input(2, 4, 3)),
    Case("conv_transpose2d_no_bias", lambda: nn.Sequential(nn.ConvTranspose2d(2, 3, (2, 3), stride=(1, 2), bias=False), nn.Flatten(), nn.Tanh()), conv_input(2, 2, 3)),
    Case("conv_transpose3d", lambda: nn.Sequential(nn.ConvTranspose3d(2, 2, 2, stride=2), nn.Flatten(), nn.Tanh()), conv_input(3, 2, 2)),
    Case("conv3d", conv(3, in_channels=2, out_channels=3, kernel_size=2, stride=(1, 2, 1), padding=1), conv_input(3, 2, 4)),
    # embeddings
    Case("embedding", lambda: nn.Embedding(7, 4), tokens(7, 6)),
    Case("embedding_padding_idx", lambda: nn.Embedding(5, 4, padding_idx=0), tokens(5, 8)),
    Case("index_rows", lambda: Lambda(lambda s, x: s.w[x], w=P(6, 3)), tokens(6, 5)),
    Case("index_rows_vector", lambda: Lambda(lambda s, x: s.lin(s.emb(x).mean(1)) + s.bias[x].sum(1, keepdim=True), emb=nn.Embedding(6, 4), lin=nn.Linear(4, 2), bias=P(6)), tokens(6, 5)),
    Case("index_rows_of_matrices", lambda: Lambda(lambda s, x, v: torch.tanh(s.w[x] @ v.unsqueeze(-1)).flatten(1), w=P(5, 3, 2)),
         lambda b, g: (torch.randint(0, 5, (b, 4), generator=g), torch.randn(b, 4, 2, generator=g, dtype=torch.float64)), (0, 0)),
    Case("embedding_bag_mean_padding", lambda: nn.EmbeddingBag(5, 4, mode="mean", padding_idx=0, dtype=torch.float64), tokens(5, 8)),
    Case("embedding_bag_max_padding", lambda: nn.EmbeddingBag(5, 4, mode="max", padding_idx=0, dtype=torch.float64),
         lambda b, g: (torch.randint(0, 5, (b, 4), generator=g).index_fill(0, torch.arange(1, min(b, 2)), 0),)),  # example 1: padding only
    Case("embedding_bag_max_bags_per_example", lambda: Lambda(lambda s, x: s.bag(x.flatten(0, 1)).unflatten(0, (x.shape[0], -1)), bag=nn.EmbeddingBag(6, 3, mode="max", dtype=torch.float64)), lambda b, g: (torch.randint(0, 6, (b, 3, 2), generator=g),)),
    Case("embedding_bag_sum_weights", lambda: Lambda(lambda s, x, w: s.bag(x, per_sample_weights=w), bag=nn.EmbeddingBag(6, 3, mode="sum", dtype=torch.float64)),
         lambda b, g: (torch.randint(0, 6, (b, 5), generator=g), torch.randn(b, 5, generator=g, dtype=torch.float64)), (0, 0)),
    Case("embedding_bag_bags_per_example", lambda: Lambda(lambda s, x: s.bag(x.flatten(0, 1)).unflatten(0, (x.shape[0], -1)), bag=nn.EmbeddingBag(6, 3, dtype=torch.float64)), lambda b, g: (torch.randint(0, 6, (b, 3, 4), generator=g),)),
    Case("position_ids_broadcast", PositionIds, tokens(13, 9)),
    # normalization
    Case("layer_norm", lambda: nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6)), randn(3, 4)),
    Case("group_norm", lambda: nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4)), conv_input(2, 2, 5)),
    # channels last moved to dim 1: [B, L, C] -> [B, C, L] is not dense in any layout the kernel takes
    Case("group_norm_moved_channels", lambda: Lambda(lambda s, x: s.norm(torch.tanh(x.movedim(-1, 1))), norm=nn.GroupNorm(3, 3)), randn(4, 3)),
    Case("instance_norm", lambda: nn.Sequential(nn.Conv1d(2, 3, 2), nn.InstanceNorm1d(3, affine=True)), conv_input(1, 2, 6)),
    Case("rms_norm", lambda: nn.Sequential(nn.Linear(4, 6), nn.RMSNorm(6)), randn(3, 4)),
    Case("batch_norm_eval", lambda: nn.Sequential(nn.Conv2d(2, 3, 2), nn.BatchNorm2d(3)).eval(), conv_input(2, 2, 4)),
    # parameters entering by broadcasting
    Case("layer_scale", lambda: Lambda(lambda s, x: x * s.gamma, gamma=P(5)), randn(3, 5)),
    Case("hand_rms_norm", lambda: nn.Sequential(nn.Linear(4, 6), HandRMSNorm()), randn(3, 4)),
    Case("scalar_parameter", lambda: Lambda(lambda s, x: s.lin(x) / s.temperature, lin=nn.Linear(4, 3), temperature=nn.Parameter(torch.tensor(1.5, dtype=torch.float64))), randn(4)),
    Case("raw_bias", lambda: Lambda(lambda s, x: torch.tanh(x - s.b) / s.d, b=P(5), d=nn.Parameter(torch.rand(5, dtype=torch.float64) + 1)), randn(3, 5)),
    Case("positional_table", lambda: Lambda(lambda s, x: torch.tanh(x + s.pos), pos=P(3, 5)), randn(3, 5)),
    Case("class_token", ClassToken, randn(2, 3)),
    Case("relative_position_table", RelativePositionBias, randn(4, 4)),
    # parameters gradients do not reach: detached, or used under torch.no_grad()
    Case("detached_parameter", lambda: Lambda(lambda s, x: s.lin(x) * s.g.detach() + s.g, lin=nn.Linear(4, 3), g=P(3)), randn(4)),
    Case("no_grad_region", FrozenUnderNoGrad, randn(4)),
    # shared, sliced and computed parameters
    Case("module_twice", TwiceApplied, randn(6)),
    Case("tied_embedding_output", TiedLM, tokens(11, 7)),
    Case("registered_twice", RegisteredTwice, randn(4)),
    Case("index_within_examples", lambda: Lambda(lambda s, x: s.lin(x)[torch.arange(x.shape[0])[:, None], torch.tensor([[0, 2]])], lin=nn.Linear(4, 3)), randn(4)),
    Case("disjoint_slices", Slices, randn(5)),
    Case("overlapping_slices", OverlappingSlices, randn(5)),
    Case("transposed_use", TransposedUse, randn(3, 5)),
    Case("weight_norm_chain", WeightNormLinear, randn(5)),
    Case("weight_norm_parametrization", lambda: nn.utils.parametrizations.weight_norm(nn.Linear(5, 3)), randn(5)),
    # layouts
    Case("seq_first_flattened", SeqFirst, lambda b, g: (torch.randn(5, b, 4, generator=g, dtype=torch.float64),), (1,)),
    Case("two_inputs_batch_in_dim1", lambda: Lambda(lambda s, x, y: s.a(x) * s.b(y.T), a=nn.Linear(3, 4), b=nn.Linear(2, 4)),
         lambda b, g: (torch.randn(b, 3, generator=g, dtype=torch.float64), torch.randn(2, b, generator=g, dtype=torch.float64)), (0, 1)),
    Case("seq_first_positional_table", lambda: Lambda(lambda s, x: torch.tanh(x * s.scale + s.pos).transpose(0, 1), pos=P(5, 1, 3), scale=P(3)),
         lambda b, g: (torch.randn(5, b, 3, generator=g, dtype=torch.float64),), (1,)),
    Case("frames_folded_into_conv_batch", Frames, randn(3, 2, 4, 4)),
    Case("batch_dim_negative", lambda: Lambda(lambda s, x: torch.tanh(s.w @ x).T, w=P(3, 4)),
         lambda b, g: (torch.randn(4, b, generator=g, dtype=torch.float64),), (-1,)),
    Case("seq_first_embedding", SeqFirstEmbedding, lambda b, g: (torch.randint(0, 9, (6, b), generator=g),), (1,)),
    # in-place writes into tensors the forward made (functionalize)
    Case("filled_buffer", FilledBuffer, randn(3, 3)),
    Case("writes_through_views", WritesThroughViews, randn(4)),
    Case("writes_into_pieces", WritesIntoPieces, randn(6)),
    Case("writes_into_copies", WritesIntoCopies, randn(6)),
    Case("adaptive_log_softmax", lambda: Lambda(lambda s, x: s.asm.log_prob(x), asm=nn.AdaptiveLogSoftmaxWithLoss(6, 10, cutoffs=[3, 6], div_value=2.0)), randn(6)),
    # complex values (gradients are g ⊙ conj(∂z/∂·))
    Case("complex_spectral_filter", SpectralFilter, randn(8)),
    Case("complex_from_real_pair", ComplexFromRealPair, randn(8)),
    # the fallback (ops no rule covers)
    Case("fallback_prelu", lambda: nn.Sequential(nn.Linear(4, 5), nn.PReLU(5)), randn(4)),
    Case("fallback_bilinear_seq_first", lambda: Lambda(lambda s, x: s.bil(x, x.flip(-1)).mean(0), bil=nn.Bilinear(4, 4, 3)),
         lambda b, g: (torch.randn(3, b, 4, generator=g, dtype=torch.float64),), (1,)),
    Case("fallback_complex_linear", lambda: Lambda(lambda s, x: s.lin(torch.complex(x[:, :4], x[:, 4:])).abs(), lin=nn.Linear(4, 3, dtype=torch.complex128)), randn(8)),
    # a stack of matrices broadcast against the activation: [B, D] @ [k, D, E] -> [k, B, E]
    Case("fallback_matmul_param_stack", lambda: Lambda(lambda s, x: (x @ s.w).transpose(0, 1), w=P(2, 4, 3)), randn(4)),
    Case("fallback_bilinear", lambda: Lambda(lambda s, x: s.bil(x, x.flip(-1)), bil=nn.Bilinear(4, 4, 3)), randn(4)),
]

FALLBACK_CASES = {c.name for c in CASES if c.name.startswith("fallback_")}
