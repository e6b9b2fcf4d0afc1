"""Random whole models for test_random_models.py.

`generate(seed)` composes a stem (what the inputs are and how they enter), a chain of blocks drawn
from CATALOGUE and a head, and returns the model (float64) with its inputs, targets, batch dims
and per-example loss. The real inputs run through each block as it is drawn, so every shape is the
one PyTorch computes and a configuration PyTorch refuses (a reflect pad wider than the input, a
transposed conv that grows too much) is simply drawn again. Sizes stay small (batch 3-6, widths
<= 12) so a case costs about one capture.

The trunk between blocks is batch-first and one of three kinds: "vec" [B, D], "seq" [B, T, D],
"img" [B, C, *spatial] with 1-3 spatial dims. Layouts where the batch is elsewhere (time-major
inputs, attention and recurrent layers with batch_first=False, learned states expanded in dim 1)
happen inside stems and blocks.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from fxclip.zoo import PerExampleCrossEntropy
from helpers import mean_loss, sum_loss

MAX_WIDTH = 12
MAX_CHANNELS = 8
MAX_SPATIAL = {1: 10, 2: 6, 3: 4}  # per spatial dim, by number of spatial dims
MAX_TIME = 6  # of an input sequence
MAX_POSITIONS = MAX_TIME + 3  # of a trunk sequence (query tokens, flattened images)
MAX_FLAT = 48  # a trunk flattened into a vector
CONV_DIMS = {1: (nn.Conv1d, nn.ConvTranspose1d), 2: (nn.Conv2d, nn.ConvTranspose2d), 3: (nn.Conv3d, nn.ConvTranspose3d)}


def _softmax_last(x):
    return F.softmax(x, -1)


ACTIVATIONS = [torch.tanh, torch.sigmoid, F.gelu, F.silu, F.elu, F.softplus, F.leaky_relu, F.relu, F.hardtanh, F.mish, _softmax_last]


class Block(nn.Module):
    """One drawn piece of a model: `fn(self, x, inputs)` over the members given as keywords
    (modules, parameters, constants). `kind` is the catalogue entry, `note` its options."""

    def __init__(self, kind: str, note: str, fn: Callable, **members):
        super().__init__()
        self.kind, self.note, self.fn = kind, note, fn
        for k, v in members.items():
            setattr(self, k, v)

    def forward(self, x, inputs):
        return self.fn(self, x, inputs)


class RandomModel(nn.Module):
    def __init__(self, stem: Block, blocks: list[Block], head: Block):
        super().__init__()
        self.stem, self.blocks, self.head = stem, nn.ModuleList(blocks), head

    def forward(self, *inputs):
        x = self.stem(inputs[0], inputs)
        for block in self.blocks:
            x = block(x, inputs)
        return self.head(x, inputs)


@dataclass
class RandomCase:
    seed: int
    model: RandomModel
    loss_fn: Callable
    inputs: tuple
    targets: Any
    batch_dims: tuple
    frozen: list[str]  # parameters set to requires_grad=False
    drawn: tuple[str, ...]  # what was drawn (see ALL_DRAWS)

    def kind_of(self, path: str) -> str:
        """The catalogue kind of the innermost block that holds module or parameter `path`."""
        owners = [(name, m.kind) for name, m in self.model.named_modules() if isinstance(m, Block)]
        found = [(name, kind) for name, kind in owners if path == name or path.startswith(name + ".")]
        return max(found, key=lambda nk: len(nk[0]))[1] if found else "?"

    def describe(self) -> str:
        lines = [f"seed {self.seed}: batch_dims={self.batch_dims}, inputs {[tuple(x.shape) for x in self.inputs]}"]
        for name, m in self.model.named_modules(remove_duplicate=False):
            if isinstance(m, Block):
                lines.append(f"  {name}: {m.kind} {m.note}")
        lines.append(f"  loss {getattr(self.loss_fn, '__name__', type(self.loss_fn).__name__)}, frozen {self.frozen}")
        return "\n".join(lines)


class Rejected(Exception):
    """A drawn block that does not fit the trunk (the draw is repeated)."""


class Gen:
    """The state of one generation: the random source, the inputs so far and the trunk."""

    def __init__(self, seed: int, batch: int):
        self.r = random.Random(seed)
        self.data = torch.Generator().manual_seed(seed)
        self.batch = batch
        self.inputs: list[torch.Tensor] = []
        self.dims: list[int] = []
        self.blocks: list[tuple[Block, tuple, tuple]] = []  # (block, in shape, out shape)
        self.kind = "vec"  # of the trunk: "vec", "seq" or "img"
        self.drawn: list[str] = []  # the builders, stem and head drawn (see ALL_DRAWS)
        self.exclude: frozenset = frozenset()  # builders not to draw

    # random draws
    def flip(self, p=0.5) -> bool:
        return self.r.random() < p

    def choice(self, options):
        return self.r.choice(list(options))

    def width(self, lo=2, hi=MAX_WIDTH) -> int:
        return self.r.randint(lo, hi)

    def randn(self, *shape) -> torch.Tensor:
        return torch.randn(*shape, generator=self.data, dtype=torch.float64)

    def param(self, *shape, scale=None) -> nn.Parameter:
        scale = 1 / max(1, shape[-1]) ** 0.5 if scale is None else scale
        return nn.Parameter(torch.randn(*shape, dtype=torch.float64) * scale)

    def add_input(self, x: torch.Tensor, batch_dim: int) -> int:
        """A further model input (memory to attend to, a side input); its index in `inputs`."""
        self.inputs.append(x)
        self.dims.append(batch_dim)
        return len(self.inputs) - 1

    def activation(self):
        return self.choice(ACTIVATIONS)

    def divisor(self, *ns: int) -> int:
        return self.choice([d for d in range(1, min(ns) + 1) if all(n % d == 0 for n in ns)])


# ---- blocks on the feature dim (vec and seq) -------------------------------------------------


def linear(g: Gen, x):
    d, bias = g.width(), g.flip(0.7)
    return Block("linear", f"Linear({x.shape[-1]}, {d}, bias={bias})", lambda s, x, xs: s.lin(x), lin=nn.Linear(x.shape[-1], d, bias=bias))


def activation(g: Gen, x):
    act = g.activation()
    return Block("activation", act.__name__, lambda s, x, xs: act(x))


def dropout(g: Gen, x):
    """Off at check time (eval, or p=0 in training): the per-example reference cannot draw the
    batch's masks."""
    p = g.choice([0.1, 0.5])
    if x.dim() >= 4 and g.flip():
        drop, note = {4: nn.Dropout2d, 5: nn.Dropout3d}.get(x.dim(), nn.Dropout)(p).eval(), f"channel dropout p={p}, eval"
    elif g.flip():
        drop, note = nn.Dropout(p).eval(), f"p={p}, eval"
    else:
        drop, note = nn.Dropout(0.0), "p=0, training"
    return Block("dropout", note, lambda s, x, xs: s.drop(x), drop=drop)


def feature_norm(g: Gen, x):
    d = x.shape[-1]
    affine = g.flip(0.8)
    variant = g.choice(["layer", "rms", "layer_two_dims"] if x.dim() == 3 else ["layer", "rms"])
    if variant == "rms":
        norm = nn.RMSNorm(d, eps=g.choice([None, 1e-5]), elementwise_affine=affine)
    elif variant == "layer":
        norm = nn.LayerNorm(d, elementwise_affine=affine, bias=g.flip(0.7))
    else:  # over [T, D]: a weight of that shape
        norm = nn.LayerNorm(tuple(x.shape[1:]), elementwise_affine=affine)
    return Block("norm", f"{variant} affine={affine}", lambda s, x, xs: s.norm(x), norm=norm)


def gate(g: Gen, x):
    """x ⊙ sigmoid(x W + b), or a GLU of a doubled projection."""
    d = x.shape[-1]
    if g.flip():
        return Block("gate", "x * sigmoid(Wx)", lambda s, x, xs: x * torch.sigmoid(s.lin(x)), lin=nn.Linear(d, d, bias=g.flip()))
    out = g.width(1, 6)
    return Block("gate", f"glu to {out}", lambda s, x, xs: F.glu(s.lin(x), -1), lin=nn.Linear(d, 2 * out))


def bilinear(g: Gen, x):
    d, out, bias = x.shape[-1], g.width(1, 6), g.flip()
    variant = g.choice(["flip", "tanh", "input"])
    if variant == "input":  # a second batched input beside the computed one
        other = g.width(1, 5)
        idx = g.add_input(g.randn(*x.shape[:-1], other), 0)
        return Block("bilinear", f"Bilinear({d}, input {other}, {out})", lambda s, x, xs: s.bil(x, xs[idx]), bil=nn.Bilinear(d, other, out, bias=bias))
    second = (lambda x: x.flip(-1)) if variant == "flip" else torch.tanh
    return Block("bilinear", f"Bilinear({d}, {d}, {out}) with {variant}", lambda s, x, xs: s.bil(x, second(x)), bil=nn.Bilinear(d, d, out, bias=bias))


def weight_norm(g: Gen, x):
    """Parameter-only computations before the op: W / ‖W‖, g ⊙ V / ‖V‖ per row, or torch's own
    weight_norm parametrization."""
    d_in, d = x.shape[-1], g.width()
    variant = g.choice(["whole", "rows", "parametrization"])
    if variant == "whole":
        return Block("weight_norm", "W / W.norm()", lambda s, x, xs: F.linear(x, s.w / s.w.norm()), w=g.param(d, d_in))
    if variant == "rows":
        return Block("weight_norm", "g * V / V.norm(dim=1)", lambda s, x, xs: F.linear(x, s.g * s.v / s.v.norm(dim=1, keepdim=True), s.b),
                     v=g.param(d, d_in), g=nn.Parameter(torch.rand(d, 1, dtype=torch.float64) + 0.5), b=g.param(d))
    lin = nn.utils.parametrizations.weight_norm(nn.Linear(d_in, d, bias=g.flip()))
    return Block("weight_norm", "parametrizations.weight_norm", lambda s, x, xs: s.lin(x), lin=lin)


def transposed_use(g: Gen, x):
    """One matrix used as F.linear(x, W) and then as h @ W (its transpose): a tied encoder/decoder."""
    d_in, d = x.shape[-1], g.width(2, 8)
    act = g.activation()
    return Block("transposed_use", f"{act.__name__}(x Wᵀ) W, W {d}x{d_in}", lambda s, x, xs: act(F.linear(x, s.w)) @ s.w, w=g.param(d, d_in))


def scale_shift(g: Gen, x):
    """Parameters entering by broadcasting: a per-feature scale and shift, or a scalar temperature."""
    if g.kind == "img":  # per channel: [C, 1, ...]
        shape = (x.shape[1],) + (1,) * (x.dim() - 2)
    else:
        shape = (x.shape[-1],)
    if g.flip(0.3):
        return Block("scale_shift", "x / temperature", lambda s, x, xs: x / s.t, t=nn.Parameter(torch.tensor(1.3, dtype=torch.float64)))
    return Block("scale_shift", f"x * gamma{list(shape)} + beta", lambda s, x, xs: x * s.gamma + s.beta,
                 gamma=nn.Parameter(torch.rand(*shape, dtype=torch.float64) + 0.5), beta=g.param(*shape))


def prelu(g: Gen, x):
    if (x >= 0).all():  # after a positive activation its slope would get no gradient
        raise Rejected
    channels = 1 if g.kind == "seq" else g.choice([1, x.shape[1]])  # PReLU's channels are dim 1
    return Block("prelu", f"PReLU({channels})", lambda s, x, xs: s.act(x), act=nn.PReLU(channels, init=g.r.uniform(0.05, 0.5)))


def residual(g: Gen, x):
    """x + f(x), with a projection back to x's width when f changes it."""
    inner, y, _ = draw(g, x, INNER)
    proj = None
    if g.kind != "img" and y.shape[:-1] == x.shape[:-1] and y.shape[-1] != x.shape[-1]:
        proj = nn.Linear(y.shape[-1], x.shape[-1], bias=g.flip())
    elif g.kind == "img" and y.shape[2:] == x.shape[2:] and y.shape[1] != x.shape[1]:
        proj = CONV_DIMS[x.dim() - 2][0](y.shape[1], x.shape[1], 1)
    elif y.shape != x.shape:
        raise Rejected
    note = f"x + {'proj(' if proj else ''}{inner.kind}{')' if proj else ''}"
    return Block("residual", note, lambda s, x, xs: x + (s.inner(x, xs) if s.proj is None else s.proj(s.inner(x, xs))), inner=inner, proj=proj)


def shared(g: Gen, x):
    """One module applied twice, f(act(f(x))): its parameters are used twice per example."""
    inner, y, _ = draw(g, x, INNER)
    if y.shape != x.shape:
        raise Rejected
    act = g.activation()
    return Block("shared", f"{inner.kind} twice around {act.__name__}", lambda s, x, xs: s.inner(act(s.inner(x, xs)), xs), inner=inner)


def reuse(g: Gen, x):
    """An earlier block applied again here (the same module at two places of the chain)."""
    fits = [b for b, shape_in, shape_out in g.blocks if shape_in == shape_out == tuple(x.shape) and any(True for _ in b.parameters())]
    if not fits:
        raise Rejected
    return g.choice(fits)


# ---- sequence blocks ----------------------------------------------------------------------------


def positions(g: Gen, x):
    """A learned positional table added by broadcast: exact [T, D], sliced from a longer one, or an
    nn.Embedding read with position ids of shape [1, T] (GPT-2 style)."""
    t, d = x.shape[1], x.shape[2]
    variant = g.choice(["table", "sliced", "ids"])
    if variant == "table":
        return Block("positions", "x + pos[T, D]", lambda s, x, xs: x + s.pos, pos=g.param(t, d))
    if variant == "sliced":
        return Block("positions", "x + pos[:T]", lambda s, x, xs: x + s.pos[: x.shape[1]], pos=g.param(t + 2, d))
    block = Block("positions", "x + Embedding(position ids [1, T])", lambda s, x, xs: x + s.emb(s.ids[:, : x.shape[1]]), emb=nn.Embedding(t + 1, d))
    block.register_buffer("ids", torch.arange(t + 1).unsqueeze(0))
    return block


def query_tokens(g: Gen, x):
    """Learned tokens expanded over the batch and concatenated to the sequence (a class token)."""
    q = g.r.randint(1, 2)
    if x.shape[1] + q > MAX_POSITIONS:
        raise Rejected
    first = g.flip()
    def fn(s, x, xs):
        tokens = s.q.expand(x.shape[0], -1, -1)
        return torch.cat([tokens, x] if first else [x, tokens], 1)
    return Block("query_tokens", f"{q} tokens {'before' if first else 'after'}", fn, q=g.param(1, q, x.shape[2]))


def _heads(g: Gen, d: int) -> int:
    return g.choice([h for h in range(1, 5) if d % h == 0])


def multihead_attention(g: Gen, x):
    """nn.MultiheadAttention, self or cross (memory from a further input, kdim/vdim), either layout."""
    t, d = x.shape[1], x.shape[2]
    options = dict(num_heads=_heads(g, d), batch_first=g.flip(), bias=g.flip(0.7), add_bias_kv=g.flip(0.25), add_zero_attn=g.flip(0.25))
    cross = g.flip(0.4)
    causal = not cross and g.flip(0.3)
    need_weights = g.flip(0.3)
    bf = options["batch_first"]
    key_idx = value_idx = None
    if cross:
        s_len, kdim = g.r.randint(2, 5), g.width(2, 8)
        vdim = kdim if g.flip() else g.width(2, 8)
        options.update(kdim=kdim, vdim=vdim)
        shape = lambda w: (g.batch, s_len, w) if bf else (s_len, g.batch, w)
        key_idx = g.add_input(g.randn(*shape(kdim)), 0 if bf else 1)
        value_idx = key_idx if vdim == kdim else g.add_input(g.randn(*shape(vdim)), 0 if bf else 1)
    attn = nn.MultiheadAttention(d, **options)
    mask = torch.ones(t, t, dtype=torch.bool).triu(1) if causal else None
    padding_idx = None
    if g.flip(0.3):  # a key padding mask [B, S] (True: ignored), never masking a whole row
        keys = g.inputs[key_idx].shape[1 if bf else 0] if cross else t
        padding = torch.rand(g.batch, keys, generator=g.data) < 0.3
        padding[:, 0] = False
        padding_idx = g.add_input(padding, 0)

    def fn(s, x, xs):
        q = x if bf else x.transpose(0, 1)
        k = q if key_idx is None else xs[key_idx]
        v = q if value_idx is None else xs[value_idx]
        key_padding_mask = None if padding_idx is None else xs[padding_idx]
        out = s.attn(q, k, v, need_weights=need_weights, attn_mask=mask, key_padding_mask=key_padding_mask)[0]
        return out if bf else out.transpose(0, 1)

    note = f"{'cross' if cross else 'self'} causal={causal} key_padding={padding_idx is not None} need_weights={need_weights} {options}"
    return Block("multihead_attention", note, fn, attn=attn)


def sdpa_attention(g: Gen, x):
    """Hand-written attention on F.scaled_dot_product_attention: self (causal, or with a boolean
    mask), across to a further input, over the sequence and a learned memory expanded over the
    batch, or from learned latent queries (the sequence becomes the queries')."""
    t, d = x.shape[1], x.shape[2]
    heads = g.r.randint(1, 3)
    head_dim = g.r.randint(1, 4)
    inner = heads * head_dim
    variant = g.choice(["self", "cross", "memory", "latents"])
    causal = variant == "self" and g.flip(0.4)
    bias = g.flip(0.7)
    kv_width = g.width(2, 8) if variant == "cross" else d
    members = dict(q=nn.Linear(d, inner, bias=bias), k=nn.Linear(kv_width, inner, bias=bias), v=nn.Linear(kv_width, inner, bias=bias), o=nn.Linear(inner, d, bias=g.flip()))
    idx = g.add_input(g.randn(g.batch, g.r.randint(2, 5), kv_width), 0) if variant == "cross" else None
    if variant == "memory":
        members["memory"] = g.param(1, g.r.randint(2, 4), d, scale=1.0)
    if variant == "latents":
        members["latents"] = g.param(1, g.r.randint(1, 3), d, scale=1.0)
    mask = None
    if variant == "self" and not causal and g.flip(0.4):  # every query sees itself at least
        mask = (torch.rand(t, t, generator=g.data) < 0.6) | torch.eye(t, dtype=torch.bool)

    def split(h):
        return h.unflatten(-1, (heads, head_dim)).transpose(1, 2)

    def fn(s, x, xs):
        b = x.shape[0]
        queries = s.latents.expand(b, -1, -1) if variant == "latents" else x
        keys = {"cross": lambda: xs[idx], "memory": lambda: torch.cat([x, s.memory.expand(b, -1, -1)], 1)}.get(variant, lambda: x)()
        out = F.scaled_dot_product_attention(split(s.q(queries)), split(s.k(keys)), split(s.v(keys)), attn_mask=mask, is_causal=causal)
        return s.o(out.transpose(1, 2).flatten(2))

    return Block("sdpa_attention", f"{variant} heads={heads}x{head_dim} causal={causal} mask={mask is not None}", fn, **members)


def transformer_layer(g: Gen, x):
    d = x.shape[2]
    bf, norm_first = g.flip(), g.flip()
    layer = nn.TransformerEncoderLayer(
        d, _heads(g, d), g.width(2, 12), dropout=0.0, activation=g.choice(["relu", "gelu"]),
        batch_first=bf, norm_first=norm_first, bias=g.flip(0.8),
    )
    causal = g.flip(0.3)
    t = x.shape[1]
    mask = nn.Transformer.generate_square_subsequent_mask(t, dtype=torch.float64) if causal else None

    def fn(s, x, xs):
        out = s.layer(x if bf else x.transpose(0, 1), src_mask=mask, is_causal=causal)
        return out if bf else out.transpose(0, 1)

    return Block("transformer_layer", f"batch_first={bf} norm_first={norm_first} causal={causal}", fn, layer=layer)


def recurrent(g: Gen, x):
    """nn.RNN/GRU/LSTM: layers, directions, either layout, with or without bias, LSTM projections,
    and a zero, learned (a parameter expanded over the batch in dim 1) or given initial state."""
    cls = g.choice([nn.RNN, nn.GRU, nn.LSTM])
    hidden = g.width(2, 6)
    options = dict(num_layers=g.choice([1, 1, 2]), bidirectional=g.flip(0.4), batch_first=g.flip(), bias=g.flip(0.8))
    if cls is nn.RNN:
        options["nonlinearity"] = g.choice(["tanh", "relu"])
    if cls is nn.LSTM and hidden > 2 and g.flip(0.3):
        options["proj_size"] = g.r.randint(1, hidden - 1)
    rnn = cls(x.shape[2], hidden, **options)
    states = options["num_layers"] * (2 if options["bidirectional"] else 1)
    out_h = options.get("proj_size") or hidden
    init = g.choice(["zero", "learned", "input"])
    members = dict(rnn=rnn)
    idx = None
    if init == "learned":
        members["h0"] = g.param(states, 1, out_h, scale=0.5)
        if cls is nn.LSTM:
            members["c0"] = g.param(states, 1, hidden, scale=0.5)
    elif init == "input":  # (layers·directions, B, H): the batch in dim 1
        idx = g.add_input(g.randn(states, g.batch, out_h), 1)
    bf = options["batch_first"]

    def fn(s, x, xs):
        seq = x if bf else x.transpose(0, 1)
        if init == "zero":
            state = None
        elif init == "learned":
            b = x.shape[0]
            h0 = s.h0.expand(-1, b, -1)
            state = (h0, s.c0.expand(-1, b, -1)) if cls is nn.LSTM else h0
        else:
            state = (xs[idx], torch.zeros_like(xs[idx][..., :1]).expand(-1, -1, hidden)) if cls is nn.LSTM else xs[idx]
        out = s.rnn(seq, state)[0]
        return out if bf else out.transpose(0, 1)

    return Block("recurrent", f"{cls.__name__}({x.shape[2]}, {hidden}, {options}) init={init}", fn, **members)


def cell_loop(g: Gen, x):
    """RNNCell/GRUCell/LSTMCell stepped over time in Python (forwards or backwards), the outputs
    stacked; a learned initial state is expanded over the batch."""
    cls = g.choice([nn.RNNCell, nn.GRUCell, nn.LSTMCell])
    hidden = g.width(2, 6)
    options = dict(bias=g.flip(0.8))
    if cls is nn.RNNCell:
        options["nonlinearity"] = g.choice(["tanh", "relu"])
    backwards, learned = g.flip(0.3), g.flip(0.4)
    members = dict(cell=cls(x.shape[2], hidden, **options))
    if learned:
        members["h0"] = g.param(1, hidden, scale=0.5)

    def fn(s, x, xs):
        state = None
        if learned:
            h0 = s.h0.expand(x.shape[0], -1)
            state = (h0, torch.zeros_like(h0)) if cls is nn.LSTMCell else h0
        steps = range(x.shape[1] - 1, -1, -1) if backwards else range(x.shape[1])
        outs = []
        for t in steps:
            state = s.cell(x[:, t], state)
            outs.append(state[0] if cls is nn.LSTMCell else state)
        return torch.stack(outs[::-1] if backwards else outs, 1)

    return Block("cell_loop", f"{cls.__name__}({x.shape[2]}, {hidden}, {options}) backwards={backwards} learned_h0={learned}", fn, **members)


def attention_pool(g: Gen, x):
    """seq -> vec: softmax over time of x · q (a learned query vector), then the weighted sum."""
    def fn(s, x, xs):
        w = torch.softmax(x @ s.q, dim=1)
        return (w.unsqueeze(-1) * x).sum(1)
    return Block("attention_pool", "softmax(x q) x", fn, q=g.param(x.shape[2]))


def pool_time(g: Gen, x):
    how = g.choice(["mean", "amax", "last", "first", "logsumexp"])
    fns = {
        "mean": lambda x: x.mean(1), "amax": lambda x: x.amax(1), "last": lambda x: x[:, -1],
        "first": lambda x: x[:, 0], "logsumexp": lambda x: x.logsumexp(1),
    }
    return Block("pool", f"{how} over time", lambda s, x, xs: fns[how](x))


def flatten(g: Gen, x):
    if x[0].numel() > MAX_FLAT:
        raise Rejected
    return Block("flatten", "flatten(1)", lambda s, x, xs: x.flatten(1))


def to_channels(g: Gen, x):
    """seq [T, D] -> a 1-d image [D, T]."""
    return Block("to_channels", "transpose(1, 2)", lambda s, x, xs: x.transpose(1, 2))


# ---- vector to sequence or image ----------------------------------------------------------------


def unflatten_seq(g: Gen, x):
    t, d = g.r.randint(2, 4), g.width(2, 6)
    return Block("unflatten", f"Linear to [{t}, {d}]", lambda s, x, xs: s.lin(x).unflatten(1, (t, d)), lin=nn.Linear(x.shape[1], t * d))


def broadcast_time(g: Gen, x):
    """vec -> seq: x repeated over T steps plus a learned [T, D] table."""
    t = g.r.randint(2, 4)
    return Block("positions", f"x[:, None] + pos[{t}, D]", lambda s, x, xs: x.unsqueeze(1) + s.pos, pos=g.param(t, x.shape[1]))


def unflatten_img(g: Gen, x):
    nd = g.r.randint(1, 3)
    spatial = tuple(g.r.randint(2, {1: 6, 2: 4, 3: 3}[nd]) for _ in range(nd))
    c = g.r.randint(1, 3)
    n = c * int(torch.tensor(spatial).prod())
    return Block("unflatten", f"Linear to [{c}, {spatial}]", lambda s, x, xs: s.lin(x).unflatten(1, (c, *spatial)), lin=nn.Linear(x.shape[1], n))


# ---- image blocks -------------------------------------------------------------------------------


def _kernel(g: Gen, nd: int, lo=1, hi=3):
    if nd > 1 and g.flip(0.3):
        return tuple(g.r.randint(lo, hi) for _ in range(nd))
    return g.r.randint(lo, hi)


def conv(g: Gen, x):
    """Conv1d/2d/3d: kernel, stride, padding (an int, a tuple, 'same', 'valid'), padding_mode,
    dilation, groups, bias drawn at random."""
    nd, c = x.dim() - 2, x.shape[1]
    out = g.r.randint(1, MAX_CHANNELS)
    groups = g.divisor(c, out)
    padding = g.choice(["int", "tuple", "same", "valid"])
    stride = 1 if padding == "same" else _kernel(g, nd, 1, 2)
    dilation = _kernel(g, nd, 1, 2)
    kernel = _kernel(g, nd)
    pad = {"int": g.r.randint(0, 2), "tuple": tuple(g.r.randint(0, 2) for _ in range(nd)), "same": "same", "valid": "valid"}[padding]
    mode = g.choice(["zeros", "zeros", "reflect", "replicate", "circular"])
    layer = CONV_DIMS[nd][0](c, out, kernel, stride=stride, padding=pad, dilation=dilation, groups=groups, bias=g.flip(0.7), padding_mode=mode)
    note = f"Conv{nd}d({c}, {out}, {kernel}, stride={stride}, padding={pad!r}, dilation={dilation}, groups={groups}, mode={mode}, bias={layer.bias is not None})"
    return Block("conv", note, lambda s, x, xs: s.conv(x), conv=layer)


def conv_transpose(g: Gen, x):
    nd, c = x.dim() - 2, x.shape[1]
    out = g.r.randint(1, MAX_CHANNELS)
    groups = g.divisor(c, out)
    kernel, stride, dilation = _kernel(g, nd), _kernel(g, nd, 1, 2), _kernel(g, nd, 1, 2)
    output_padding = g.choice([0, 1]) if max(_as_tuple(stride, nd)) > 1 or max(_as_tuple(dilation, nd)) > 1 else 0
    padding = _kernel(g, nd, 0, 1)
    layer = CONV_DIMS[nd][1](c, out, kernel, stride=stride, padding=padding, output_padding=output_padding, groups=groups, bias=g.flip(0.7), dilation=dilation)
    note = f"ConvTranspose{nd}d({c}, {out}, {kernel}, stride={stride}, padding={padding}, output_padding={output_padding}, dilation={dilation}, groups={groups})"
    return Block("conv_transpose", note, lambda s, x, xs: s.conv(x), conv=layer)


def _as_tuple(v, n):
    return v if isinstance(v, tuple) else (v,) * n


def depthwise_separable(g: Gen, x):
    nd, c = x.dim() - 2, x.shape[1]
    mult, out = g.r.randint(1, 2), g.r.randint(1, MAX_CHANNELS)
    cls = CONV_DIMS[nd][0]
    depth = cls(c, c * mult, _kernel(g, nd), padding="same", groups=c, bias=g.flip())
    point = cls(c * mult, out, 1, bias=g.flip())
    return Block("depthwise_separable", f"depthwise x{mult} then 1x1 to {out}", lambda s, x, xs: s.point(s.depth(x)), depth=depth, point=point)


def image_norm(g: Gen, x):
    """GroupNorm, InstanceNorm (affine) or BatchNorm in eval mode (random running statistics)."""
    nd, c = x.dim() - 2, x.shape[1]
    variant = g.choice(["group", "instance", "batch"])
    affine = g.flip(0.8)
    if variant == "group":
        if x.dim() >= 4 and not x.is_contiguous():
            # torch 2.13's CPU backward for the affine parameters alone segfaults on a
            # channels-last input (nn.GroupNorm(4, 4), randn(2, 6, 2, 4).movedim(-1, 1)); the
            # per-example loop would take that path
            raise Rejected
        groups = g.divisor(c)
        if c // groups * x[0, 0].numel() == 1:  # torch refuses to normalize one value (for a batch of one)
            raise Rejected
        norm = nn.GroupNorm(groups, c, affine=affine)
    elif variant == "instance":
        norm = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[nd](c, affine=affine)
    else:
        norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[nd](c, affine=affine).eval()
        norm.running_mean.normal_(0, 0.5)
        norm.running_var.uniform_(0.5, 2.0)
    return Block("norm", f"{variant} affine={affine}", lambda s, x, xs: s.norm(x), norm=norm)


def image_positions(g: Gen, x):
    """A learned table the size of one example added by broadcast."""
    return Block("positions", f"x + pos{list(x.shape[1:])}", lambda s, x, xs: x + s.pos, pos=g.param(*x.shape[1:]))


def squeeze_excite(g: Gen, x):
    """A channel gate from the spatial mean: x ⊙ sigmoid(W2 act(W1 mean(x)))."""
    nd, c = x.dim() - 2, x.shape[1]
    r = g.r.randint(1, 4)
    act = g.activation()
    def fn(s, x, xs):
        w = torch.sigmoid(s.up(act(s.down(x.mean(tuple(range(2, x.dim())))))))
        return x * w.reshape(*w.shape, *([1] * nd))
    return Block("gate", f"squeeze-excite {c}->{r}", fn, down=nn.Linear(c, r), up=nn.Linear(r, c))


def spatial_pool(g: Gen, x):
    nd = x.dim() - 2
    if min(x.shape[2:]) < 2:
        raise Rejected
    how = g.choice(["max", "avg"])
    pool = getattr(F, f"{how}_pool{nd}d")
    return Block("pool", f"{how} pool 2", lambda s, x, xs: pool(x, 2))


def flatten_spatial(g: Gen, x):
    """img [C, *S] -> seq [prod S, C]."""
    if x[0, 0].numel() > MAX_POSITIONS:
        raise Rejected
    return Block("to_sequence", "flatten(2).transpose(1, 2)", lambda s, x, xs: x.flatten(2).transpose(1, 2))


def global_pool(g: Gen, x):
    how = g.choice(["mean", "amax"])
    return Block("pool", f"global {how}", lambda s, x, xs: getattr(x.flatten(2), how)(-1))


# ---- the catalogue ------------------------------------------------------------------------------

# kind of trunk -> the blocks that can follow it, with weights (recurrent and attention layers
# cost the most to capture and are drawn less often)
CATALOGUE: dict[str, list[tuple[Callable, float]]] = {
    "vec": [
        (linear, 3), (activation, 2), (dropout, 0.5), (feature_norm, 1), (gate, 1), (bilinear, 0.7),
        (weight_norm, 0.7), (transposed_use, 0.5), (scale_shift, 0.7), (prelu, 0.5), (residual, 1),
        (shared, 0.7), (reuse, 0.5), (unflatten_seq, 0.8), (broadcast_time, 0.6), (unflatten_img, 1),
    ],
    "seq": [
        (linear, 2), (activation, 1.5), (dropout, 0.5), (feature_norm, 1), (gate, 0.7), (bilinear, 0.4),
        (weight_norm, 0.4), (transposed_use, 0.3), (scale_shift, 0.5), (prelu, 0.3), (residual, 0.8),
        (shared, 0.5), (reuse, 0.4), (positions, 1), (query_tokens, 0.7), (multihead_attention, 1),
        (sdpa_attention, 1), (transformer_layer, 0.4), (recurrent, 0.7), (cell_loop, 0.5),
        (attention_pool, 0.6), (pool_time, 1), (flatten, 0.5), (to_channels, 0.7),
    ],
    "img": [
        (conv, 4), (conv_transpose, 2), (depthwise_separable, 1), (activation, 1), (dropout, 0.5),
        (image_norm, 1.2), (image_positions, 0.4), (scale_shift, 0.5), (squeeze_excite, 0.6), (prelu, 0.4),
        (residual, 0.8), (shared, 0.5), (reuse, 0.4), (spatial_pool, 0.6), (flatten_spatial, 0.7),
        (global_pool, 0.8), (flatten, 0.5),
    ],
}
# blocks a residual or shared block may wrap: those that keep the trunk's kind
INNER = {linear, activation, feature_norm, gate, bilinear, weight_norm, transposed_use, scale_shift, prelu,
         positions, multihead_attention, sdpa_attention, transformer_layer, recurrent, cell_loop, conv,
         depthwise_separable, image_norm, squeeze_excite}
KIND_AFTER = {attention_pool: "vec", pool_time: "vec", flatten: "vec", to_channels: "img", unflatten_seq: "seq",
              broadcast_time: "seq", unflatten_img: "img", flatten_spatial: "seq", global_pool: "vec"}
COSTLY = {recurrent, cell_loop, transformer_layer, multihead_attention}


def _fits(y: torch.Tensor, kind: str) -> bool:
    if kind == "img":
        nd = y.dim() - 2
        return 1 <= nd <= 3 and y.shape[1] <= MAX_CHANNELS and all(1 <= s <= MAX_SPATIAL[nd] for s in y.shape[2:])
    if kind == "seq":
        return y.dim() == 3 and 1 <= y.shape[1] <= MAX_POSITIONS and y.shape[2] <= MAX_WIDTH
    return y.dim() == 2 and y.shape[1] <= MAX_FLAT


def draw(g: Gen, x: torch.Tensor, among=None) -> tuple[Block, torch.Tensor, str]:
    """A block for trunk `x` (of kind `g.kind`), its output on x and the output's kind; a draw PyTorch
    refuses or whose output is out of bounds is drawn again, and the further inputs it added are
    dropped. `among`: the builders allowed (residual and shared draw what they wrap from INNER)."""
    options = [(b, w) for b, w in CATALOGUE[g.kind] if (among is None or b in among) and b not in g.exclude]
    for _ in range(50):
        builder = g.r.choices([b for b, _ in options], [w for _, w in options])[0]
        n_inputs, n_drawn = len(g.inputs), len(g.drawn)
        try:
            block = builder(g, x)
            with torch.no_grad():
                y = block.double()(x, tuple(g.inputs))
            after = KIND_AFTER.get(builder, g.kind)
            if not _fits(y, after):
                raise Rejected
            g.drawn.append(builder.__name__)
            return block, y, after
        except (Rejected, RuntimeError, ValueError):
            del g.inputs[n_inputs:], g.dims[n_inputs:], g.drawn[n_drawn:]
    raise AssertionError(f"no block fits a {g.kind} trunk of shape {tuple(x.shape)}")


# ---- stems and heads ----------------------------------------------------------------------------


STEMS = ("features", "sequence", "tokens", "bag", "image")


def stem(g: Gen, variants=STEMS) -> tuple[Block, str]:
    """The first input, how the model takes it in, and the kind of trunk it makes."""
    b = g.batch
    variant = g.choice(variants)
    g.drawn.append(f"stem:{variant}")
    if variant == "features":
        d = g.width()
        if g.flip(0.3):  # feature-major [D, B]: the batch in the last dim (given as -1 or 1)
            g.add_input(g.randn(d, b), g.choice([-1, 1]))
            return Block("stem", f"features [{d}, B]", lambda s, x, xs: x.transpose(0, 1)), "vec"
        g.add_input(g.randn(b, d), 0)
        return Block("stem", f"features [B, {d}]", lambda s, x, xs: x), "vec"
    if variant == "sequence":
        t, d = g.r.randint(2, MAX_TIME), g.width()
        if g.flip(0.3):
            g.add_input(g.randn(t, b, d), 1)
            return Block("stem", f"sequence [{t}, B, {d}]", lambda s, x, xs: x.transpose(0, 1)), "seq"
        g.add_input(g.randn(b, t, d), 0)
        return Block("stem", f"sequence [B, {t}, {d}]", lambda s, x, xs: x), "seq"
    if variant == "tokens":
        vocab, t, d = g.width(4, 12), g.r.randint(2, MAX_TIME), g.width()
        padding_idx = g.choice([None, 0, 1])
        emb = nn.Embedding(vocab, d, padding_idx=padding_idx)
        note = f"Embedding({vocab}, {d}, padding_idx={padding_idx})"
        if g.flip(0.3):  # time-major tokens [T, B]
            g.add_input(torch.randint(0, vocab, (t, b), generator=g.data), 1)
            return Block("stem", note + " of [T, B]", lambda s, x, xs: s.emb(x.transpose(0, 1)), emb=emb), "seq"
        g.add_input(torch.randint(0, vocab, (b, t), generator=g.data), 0)
        return Block("stem", note, lambda s, x, xs: s.emb(x), emb=emb), "seq"
    if variant == "bag":
        vocab, length, d = g.width(4, 12), g.r.randint(2, MAX_TIME), g.width()
        mode = g.choice(["sum", "mean", "max"])
        padding_idx = g.choice([None, 0])
        bag = nn.EmbeddingBag(vocab, d, mode=mode, padding_idx=padding_idx)
        g.add_input(torch.randint(0, vocab, (b, length), generator=g.data), 0)
        note = f"EmbeddingBag({vocab}, {d}, mode={mode}, padding_idx={padding_idx})"
        if mode == "sum" and g.flip():
            idx = g.add_input(g.randn(b, length), 0)
            return Block("stem", note + " per_sample_weights", lambda s, x, xs: s.bag(x, per_sample_weights=xs[idx]), bag=bag), "vec"
        return Block("stem", note, lambda s, x, xs: s.bag(x), bag=bag), "vec"
    nd = g.r.randint(1, 3)
    c = g.r.randint(1, 4)
    spatial = tuple(g.r.randint(2, MAX_SPATIAL[nd] - (nd == 1) * 3) for _ in range(nd))
    if g.flip(0.3):  # channels last [B, *S, C]
        g.add_input(g.randn(b, *spatial, c), 0)
        return Block("stem", f"image [B, {spatial}, {c}] channels last", lambda s, x, xs: x.movedim(-1, 1)), "img"
    g.add_input(g.randn(b, c, *spatial), 0)
    return Block("stem", f"image [B, {c}, {spatial}]", lambda s, x, xs: x), "img"


def head(g: Gen, x: torch.Tensor, first: Block) -> tuple[Block, str]:
    """The last block and the loss it suits: "regression" (any output) or "classes" (the last
    dim holds logits). A token model may end in its own embedding, transposed (tied weights)."""
    if g.kind == "img":
        g.drawn.append("head:linear")
        x_flat = x.flatten(1).shape[1]
        if x_flat > MAX_FLAT or g.flip(0.3):
            return Block("head", "global mean, Linear", lambda s, x, xs: s.lin(x.flatten(2).mean(-1)), lin=nn.Linear(x.shape[1], g.width(1, 4))), "regression"
        return Block("head", "flatten, Linear", lambda s, x, xs: s.lin(x.flatten(1)), lin=nn.Linear(x_flat, g.width(1, 4))), "regression"
    d = x.shape[-1]
    if g.kind == "seq" and hasattr(first, "emb") and g.flip(0.6):
        g.drawn.append("head:tied")
        emb = first.emb
        vocab, e = emb.weight.shape
        if g.flip():  # F.linear with the embedding's weight, read from the stem
            block = Block("tied_head", f"Linear({d}, {e}) then F.linear(h, embedding weight)", lambda s, x, xs: F.linear(s.proj(x), s.tied.emb.weight), proj=nn.Linear(d, e))
            block.tied = first  # registered twice: named_parameters lists the weight once, as the stem's
        else:  # an nn.Linear whose weight is the embedding's
            out = nn.Linear(e, vocab, bias=g.flip())
            out.weight = emb.weight
            block = Block("tied_head", f"Linear({d}, {e}) then Linear({e}, {vocab}) tied to the embedding", lambda s, x, xs: s.out(s.proj(x)), proj=nn.Linear(d, e), out=out)
        return block, "tokens"
    has_parameters = any(True for m in [first] + [b for b, _, _ in g.blocks] for _ in m.parameters())
    if g.flip(0.2) and has_parameters:
        g.drawn.append("head:none")
        return Block("head", "none", lambda s, x, xs: x), "regression"
    g.drawn.append("head:linear")
    k = g.width(1, 5)
    return Block("head", f"Linear({d}, {k})", lambda s, x, xs: s.lin(x), lin=nn.Linear(d, k)), ("classes" if k > 1 and g.flip(0.4) else "regression")


def generate(seed: int, max_blocks: int = 5, exclude=frozenset(), stems=STEMS) -> RandomCase:
    """A random model (float64), its inputs and targets for a batch of 3-6, its batch dims and
    loss; `exclude` names builders not to draw (e.g. COSTLY), `stems` the stems to draw from."""
    batch = random.Random(seed).randint(3, 6)
    g = Gen(seed, batch)
    g.exclude = frozenset(exclude)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        first, g.kind = stem(g, stems)
        x = first.double()(g.inputs[0], tuple(g.inputs))
        blocks = []
        for _ in range(g.r.randint(1, max_blocks)):
            block, y, g.kind = draw(g, x)
            blocks.append(block)
            g.blocks.append((block, tuple(x.shape), tuple(y.shape)))
            x = y
        last, target_kind = head(g, x, first)
        model = RandomModel(first, blocks, last).double()
        frozen = _freeze(g, model)
    with torch.no_grad():
        out = model(*g.inputs)
    if target_kind == "regression":
        loss_fn, targets = g.choice([sum_loss, mean_loss]), g.randn(*out.shape)
    else:
        loss_fn = PerExampleCrossEntropy()
        targets = torch.randint(0, out.shape[-1], out.shape[:-1], generator=g.data)
    dims = tuple(g.dims)
    return RandomCase(seed, model, loss_fn, tuple(g.inputs), targets, dims, frozen, tuple(g.drawn))


def _freeze(g: Gen, model: nn.Module) -> list[str]:
    """requires_grad=False on about one parameter in eight, and sometimes on a whole block; at
    least one parameter stays trainable. Returns the frozen names."""
    params = dict(model.named_parameters())
    frozen = {name for name in params if g.flip(0.12)}
    if model.blocks and g.flip(0.15):
        block = g.choice(model.blocks)
        frozen |= {name for name, p in params.items() if any(p is q for q in block.parameters())}
    if frozen == set(params):
        frozen.discard(g.choice(sorted(frozen)))
    for name in frozen:
        params[name].requires_grad_(False)
    return sorted(frozen)


# everything `generate` can draw: each builder by name, each stem and each kind of head
ALL_DRAWS = (
    {b.__name__ for entries in CATALOGUE.values() for b, _ in entries}
    | {f"stem:{v}" for v in STEMS}
    | {"head:linear", "head:tied", "head:none"}
)
