"""Attention: nn.MultiheadAttention in every configuration, Transformer encoder/decoder layers and
stacks, hand-written attention, and a tied GPT-style language model, against the torch.func
reference; and the ghost/materialize choice at long sequence lengths."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxclip
from fxclip.zoo import PerExampleCrossEntropy
from fxclip.zoo import TinyGPT
from helpers import check_against_reference

E, HEADS, CLASSES, BATCH, LENGTH, MEMORY = 8, 2, 3, 3, 5, 6
ce = PerExampleCrossEntropy()  # [B, C] logits or [B, T, C] token logits, one loss per example


def to64(*xs):
    return tuple(x.double() if x.is_floating_point() else x for x in xs)


class Attention(nn.Module):
    """One MultiheadAttention (self or cross), mean over the queries, a linear head."""

    def __init__(self, batch_first=True, cross=False, kv_dim=None, masks=False, need_weights=False, **options):
        super().__init__()
        self.batch_first, self.cross, self.masks, self.need_weights = batch_first, cross, masks, need_weights
        self.attn = nn.MultiheadAttention(E, HEADS, batch_first=batch_first, kdim=kv_dim, vdim=kv_dim, **options)
        self.head = nn.Linear(E, CLASSES)

    def forward(self, x, other=None):
        """`other`: the memory to attend to (cross attention) or the key padding mask (masks)."""
        kv = other if self.cross else x
        options = {}
        if self.masks:
            padding = other
            queries, keys = x.shape[1 if self.batch_first else 0], kv.shape[1 if self.batch_first else 0]
            options = {"attn_mask": torch.ones(queries, keys, dtype=torch.bool).triu(1), "key_padding_mask": padding}
        out, weights = self.attn(x, kv, kv, need_weights=self.need_weights, **options)
        logits = self.head(out.mean(1 if self.batch_first else 0))
        return logits if weights is None else logits + weights.sum((1, 2)).unsqueeze(1)


def attention_batch(seed=0, kv_dim=E):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, LENGTH, E, generator=gen)
    memory = torch.randn(BATCH, MEMORY, kv_dim, generator=gen)
    return x, memory, torch.randint(0, CLASSES, (BATCH,), generator=gen)


MHA_CASES = {
    "self": {},
    "self_time_major": {"batch_first": False},
    "cross": {"cross": True},
    "cross_time_major": {"cross": True, "batch_first": False},
    "cross_kdim_vdim": {"cross": True, "kv_dim": 4},
    "bias_off": {"bias": False},
    "add_bias_kv": {"add_bias_kv": True},
    "add_zero_attn": {"add_zero_attn": True},
    "bias_kv_zero_attn_cross": {"add_bias_kv": True, "add_zero_attn": True, "cross": True},
    "masks": {"masks": True},
    "masks_time_major_weights": {"masks": True, "batch_first": False, "need_weights": True},
}


@pytest.mark.parametrize("case", sorted(MHA_CASES))
def test_multihead_attention_matches_reference(case):
    torch.manual_seed(0)
    options = MHA_CASES[case]
    model = Attention(**options).double()
    x, memory, y = attention_batch(kv_dim=options.get("kv_dim", E))
    inputs = (x, memory) if options.get("cross") else (x,)
    if not options.get("batch_first", True):
        inputs = tuple(t.transpose(0, 1) for t in inputs)
    batch_dims = (0 if options.get("batch_first", True) else 1,) * len(inputs)
    if options.get("masks"):  # self-attention with a causal mask and a key padding mask
        padding = torch.zeros(BATCH, LENGTH, dtype=torch.bool)
        padding[0, -2:] = True
        inputs, batch_dims = inputs + (padding,), batch_dims + (0,)
    t = fxclip.transform(model, ce, 0.5, batch_dims=batch_dims)
    check_against_reference(t, to64(*inputs), y, batch_dims)
    assert not t.fallbacks


class EncoderDecoder(nn.Module):
    """An encoder stack and, optionally, a decoder stack over it (causal self-attention)."""

    def __init__(self, norm_first, layers=1, decoder=False, batch_first=True):
        super().__init__()
        self.batch_first = batch_first
        layer = nn.TransformerEncoderLayer(E, HEADS, 16, dropout=0.0, batch_first=batch_first, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.decoder = None
        if decoder:
            block = nn.TransformerDecoderLayer(E, HEADS, 16, dropout=0.0, batch_first=batch_first, norm_first=norm_first)
            self.decoder = nn.TransformerDecoder(block, layers)
        self.head = nn.Linear(E, CLASSES)

    def forward(self, x, target_seq=None):
        out = self.encoder(x)
        if self.decoder is not None:
            length = target_seq.shape[1 if self.batch_first else 0]
            causal = nn.Transformer.generate_square_subsequent_mask(length, dtype=x.dtype)
            out = self.decoder(target_seq, out, tgt_mask=causal, tgt_is_causal=True)
        return self.head(out.mean(1 if self.batch_first else 0))


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
@pytest.mark.parametrize("layout", ["encoder", "encoder_stack_time_major", "encoder_decoder_stack"])
def test_transformer_layers_match_reference(norm_first, layout):
    torch.manual_seed(1)
    x, memory, y = attention_batch(1)
    if layout == "encoder":
        model, inputs, dims = EncoderDecoder(norm_first), (x,), (0,)
    elif layout == "encoder_stack_time_major":
        model, inputs, dims = EncoderDecoder(norm_first, 2, batch_first=False), (x.transpose(0, 1),), (1,)
    else:
        model, inputs, dims = EncoderDecoder(norm_first, 2, decoder=True), (memory, x), (0, 0)
    t = fxclip.transform(model.double(), ce, 0.5, batch_dims=dims)
    check_against_reference(t, to64(*inputs), y, dims)
    assert not t.fallbacks


class HandWritten(nn.Module):
    """Causal attention written by hand from a packed qkv projection."""

    def __init__(self, use_sdpa):
        super().__init__()
        self.use_sdpa = use_sdpa
        self.qkv = nn.Linear(E, 3 * E)
        self.out = nn.Linear(E, CLASSES)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, HEADS, E // HEADS).permute(2, 0, 3, 1, 4)
        if self.use_sdpa:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = q @ k.transpose(-1, -2) / (E // HEADS) ** 0.5
            causal = torch.ones(t, t, dtype=torch.bool).triu(1)
            a = scores.masked_fill(causal, float("-inf")).softmax(-1) @ v
        return self.out(a.transpose(1, 2).reshape(b, t, E).mean(1))


@pytest.mark.parametrize("use_sdpa", [True, False], ids=["sdpa", "softmax_qk_v"])
def test_hand_written_attention_matches_reference(use_sdpa):
    torch.manual_seed(2)
    x, _, y = attention_batch(2)
    t = fxclip.transform(HandWritten(use_sdpa).double(), ce, 0.5)
    check_against_reference(t, to64(x), y)


def gpt_batch(vocab, length, seed=3, size=BATCH):
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(0, vocab, (size, length + 1), generator=gen)
    return text[:, :-1], text[:, 1:]


@pytest.mark.parametrize("strategy", ["auto", "ghost", "materialize"])
def test_tied_gpt_language_model_exact_tied_norm(strategy):
    """Token embedding tied to the output layer: one shared component over the embedding lookup
    and the output projection, its norm the norm of the sum of both uses."""
    torch.manual_seed(3)
    model = TinyGPT(vocab=20, dim=E, heads=HEADS, layers=2, length=6).double()
    tokens, targets = gpt_batch(20, 6)
    t = fxclip.transform(model, ce, 0.5, strategy=strategy)
    check_against_reference(t, (tokens,), targets)
    tied = [e for e in t.program.plan if e.use.params == ("embed.weight",)]
    assert len(tied) == 2 and {e.component.kind for e in tied} == {"shared"}


def test_float32_within_1e4():
    torch.manual_seed(4)
    model = TinyGPT(vocab=20, dim=E, heads=HEADS, layers=1, length=6)
    tokens, targets = gpt_batch(20, 6, seed=4)
    check_against_reference(fxclip.transform(model, ce, 0.5), (tokens,), targets, rtol=1e-4)
    x, memory, y = attention_batch(4)
    model = Attention(cross=True, add_bias_kv=True)
    check_against_reference(fxclip.transform(model, ce, 0.5), (x, memory), y, rtol=1e-4)


def test_long_sequences_choose_materialize_and_stay_exact():
    """At T=1024 a ghost norm needs 2·T² = 2M numbers per example and layer (B·T² in all); the
    cost model sees it and "auto" materializes every T=1024 form instead (d·p numbers)."""
    torch.manual_seed(5)
    length, vocab = 1024, 16
    model = TinyGPT(vocab=vocab, dim=E, heads=HEADS, layers=1, length=length).double()
    tokens, targets = gpt_batch(vocab, length, seed=5, size=2)
    t = fxclip.transform(model, ce, 0.5)
    check_against_reference(t, (tokens,), targets)
    long = [e for e in t.program.plan if e.costs and e.costs["shapes"]["T"] >= length]
    assert long, "expected forms over the whole sequence"
    for entry in long:
        assert entry.strategy == "materialize", entry.use.params
        assert entry.costs["memory"]["ghost"] >= 2 * length**2 > entry.costs["memory"]["materialize"]
