"""Reference models: every family fxclip claims to support, small enough to test on a CPU.

Each entry of `ZOO` names a factory and a function that makes a batch of inputs and targets for
it, so tests, the benchmark and the `fxclip train` command all draw from one table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLP(nn.Module):
    """Two hidden layers with tanh, on flattened inputs."""

    def __init__(self, in_features: int = 64, hidden: int = 128, num_classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, hidden),
            nn.Tanh(),
            nn.Linear(hidden, hidden),
            nn.Tanh(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.net(x)


class MnistCNN(nn.Module):
    """The CNN of Abadi et al. and Lee & Kifer (Opacus' MNIST example) for 28x28 images."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 8, stride=2, padding=3)
        self.conv2 = nn.Conv2d(16, 32, 4, stride=2)
        self.fc1 = nn.Linear(32 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2, 1)  # [B, 16, 13, 13]
        x = F.max_pool2d(F.relu(self.conv2(x)), 2, 1)  # [B, 32, 4, 4]
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class SmallCNN(nn.Module):
    """A CNN for small images (scikit-learn's 8x8 digits): two 3x3 convs and a linear head."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.norm = nn.GroupNorm(4, 2 * width)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.norm(self.conv2(x)))
        return self.head(x.mean((2, 3)))


class BasicBlock(nn.Module):
    """ResNet basic block with GroupNorm; a strided 1x1 conv downsamples the shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(min(8, cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(min(8, cout), cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.GroupNorm(min(8, cout), cout)
            )

    def forward(self, x):
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class ResNetGN(nn.Module):
    """A small ResNet with GroupNorm in place of BatchNorm (BatchNorm mixes examples)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, widths=(16, 32, 64)):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.norm = nn.GroupNorm(min(8, widths[0]), widths[0])
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks.append(BasicBlock(cin, w, stride=1 if i == 0 else 2))
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = F.relu(self.norm(self.stem(x)))
        x = self.blocks(x)
        return self.fc(x.mean((2, 3)))


class DepthwiseSeparableNet(nn.Module):
    """MobileNet-style blocks: depthwise 3x3 conv (groups = channels) then pointwise 1x1 conv."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
        layers = []
        for cin, cout, stride in [(width, 2 * width, 1), (2 * width, 4 * width, 2)]:
            layers += [
                nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin),
                nn.GroupNorm(4, cin),
                nn.ReLU(),
                nn.Conv2d(cin, cout, 1),
                nn.ReLU(),
            ]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        return self.fc(self.features(F.relu(self.stem(x))).mean((2, 3)))


class BagOfWords(nn.Module):
    """Embedding bag-of-words text classifier: mean of token embeddings (padding ignored)."""

    def __init__(self, vocab: int = 1000, dim: int = 32, num_classes: int = 4, padding_idx: int = 0):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=padding_idx)
        self.padding_idx = padding_idx
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, tokens):
        mask = (tokens != self.padding_idx).unsqueeze(-1).to(self.embed.weight.dtype)
        pooled = (self.embed(tokens) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.fc(pooled)


class TiedAutoencoder(nn.Module):
    """Token embedding reused (tied) as the output layer, plus a learned scale: a shared parameter."""

    def __init__(self, vocab: int = 100, dim: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.hidden = nn.Linear(dim, dim)
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, tokens):
        h = torch.tanh(self.hidden(self.embed(tokens))) * self.scale
        return F.linear(h.mean(1), self.embed.weight)  # logits over the vocabulary


class TransformerEncoderClassifier(nn.Module):
    """Token embedding plus a learned positional table, nn.TransformerEncoder (self-attention, MLP,
    LayerNorm; batch_first), mean pooling and a linear head."""

    def __init__(self, vocab: int = 1000, dim: int = 64, heads: int = 4, layers: int = 2, length: int = 32, num_classes: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(length, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens) + self.pos[: tokens.shape[1]]).mean(1))


class PerExampleCrossEntropy:
    """Cross entropy summed over every position of an example: one loss per example ([B]) for
    classifiers ([B, C] logits, [B] labels) and sequence models ([B, T, C], [B, T]) alike.
    `reduction` ("none" or "sum") is read by Opacus' ghost clipping, which switches it."""

    def __init__(self, reduction: str = "none"):
        self.reduction = reduction

    def __call__(self, output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        per_position = F.cross_entropy(output.flatten(0, -2), targets.flatten(), reduction="none")
        losses = per_position.view(targets.shape[0], -1).sum(1)
        return losses.sum() if self.reduction == "sum" else losses


@dataclass(frozen=True)
class ZooEntry:
    """A model factory and a batch maker: `make_batch(B, generator) -> (inputs_tuple, targets)`."""

    name: str
    factory: Callable[[], nn.Module]
    make_batch: Callable[[int, torch.Generator], tuple]
    description: str


def _images(channels: int, side: int, classes: int):
    def make(batch: int, gen: torch.Generator):
        x = torch.randn(batch, channels, side, side, generator=gen)
        return (x,), torch.randint(0, classes, (batch,), generator=gen)

    return make


def _tokens(vocab: int, length: int, classes: int):
    def make(batch: int, gen: torch.Generator):
        x = torch.randint(0, vocab, (batch, length), generator=gen)
        return (x,), torch.randint(0, classes, (batch,), generator=gen)

    return make


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in [
        ZooEntry("mlp", lambda: MLP(64, 128, 10), _images(1, 8, 10), "MLP on 8x8 images"),
        ZooEntry("mnist_cnn", lambda: MnistCNN(1, 10), _images(1, 28, 10), "paper's MNIST CNN"),
        ZooEntry("small_cnn", lambda: SmallCNN(1, 10), _images(1, 8, 10), "CNN for 8x8 digits"),
        ZooEntry("resnet_gn", lambda: ResNetGN(3, 10), _images(3, 32, 10), "ResNet with GroupNorm"),
        ZooEntry(
            "depthwise", lambda: DepthwiseSeparableNet(3, 10), _images(3, 32, 10), "depthwise-separable"
        ),
        ZooEntry("bow", lambda: BagOfWords(1000, 32, 4), _tokens(1000, 64, 4), "embedding bag of words"),
        ZooEntry("tied", lambda: TiedAutoencoder(100, 16), _tokens(100, 12, 100), "tied embedding"),
        ZooEntry(
            "transformer", lambda: TransformerEncoderClassifier(1000, 64, 4, 2, 32, 4), _tokens(1000, 32, 4),
            "2-layer Transformer encoder",
        ),
    ]
}


# ---- recurrent and attention models (issue 3) ----------------------------------------------------


class LSTMClassifier(nn.Module):
    """Token embedding, a one-layer nn.LSTM (batch_first), a linear head on the last hidden state:
    the paper's recurrent text classifier. The recurrent weights are used at every time step."""

    def __init__(self, vocab: int = 1000, dim: int = 64, hidden: int = 128, num_classes: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, hidden, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, tokens):
        x = self.embed(tokens)
        # an explicit zero initial state: the same as none, and torch.func can vmap the module then
        zeros = x.new_zeros(1, x.shape[0], self.lstm.hidden_size)
        _, (h_n, _) = self.lstm(x, (zeros, zeros))
        return self.head(h_n[-1])


class GRUTagger(nn.Module):
    """A sequence model: token embedding, a two-layer bidirectional nn.GRU, a tag for every token
    ([B, T, tags] logits; the loss sums over the tokens of each example)."""

    def __init__(self, vocab: int = 1000, dim: int = 32, hidden: int = 64, num_tags: int = 8):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.gru = nn.GRU(dim, hidden, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, num_tags)

    def forward(self, tokens):
        x = self.embed(tokens)
        zeros = x.new_zeros(2 * self.gru.num_layers, x.shape[0], self.gru.hidden_size)  # as in LSTMClassifier
        return self.head(self.gru(x, zeros)[0])


class TinyGPT(nn.Module):
    """A decoder-only language model: token embedding tied to the output layer, a learned positional
    parameter, pre-norm causal self-attention blocks, [B, T, vocab] next-token logits."""

    def __init__(self, vocab: int = 256, dim: int = 64, heads: int = 4, layers: int = 2, length: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(length, dim) * 0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens):
        length = tokens.shape[1]
        h = self.embed(tokens) + self.pos[:length]
        causal = nn.Transformer.generate_square_subsequent_mask(length, device=h.device, dtype=h.dtype)
        for block in self.blocks:
            h = block(h, src_mask=causal, is_causal=True)
        return F.linear(self.norm(h), self.embed.weight)


def _token_tags(vocab: int, length: int, tags: int):
    """Token sequences [B, T] and a tag for every token [B, T]."""

    def make(batch: int, gen: torch.Generator):
        x = torch.randint(0, vocab, (batch, length), generator=gen)
        return (x,), torch.randint(0, tags, (batch, length), generator=gen)

    return make


def _next_tokens(vocab: int, length: int):
    """Language modelling: sequences [B, T] and, as targets, each position's next token [B, T]."""

    def make(batch: int, gen: torch.Generator):
        text = torch.randint(0, vocab, (batch, length + 1), generator=gen)
        return (text[:, :-1],), text[:, 1:]

    return make


ZOO.update(
    {
        e.name: e
        for e in [
            ZooEntry("lstm", lambda: LSTMClassifier(1000, 64, 128, 4), _tokens(1000, 32, 4), "LSTM text classifier"),
            ZooEntry("gru", lambda: GRUTagger(1000, 32, 64, 8), _token_tags(1000, 32, 8), "bidirectional GRU tagger"),
            ZooEntry("gpt", lambda: TinyGPT(256, 64, 4, 2, 64), _next_tokens(256, 64), "tied GPT-style LM"),
        ]
    }
)
