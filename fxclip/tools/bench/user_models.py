"""Models written the way users write them, for the benchmark: not the zoo's shapes.

The zoo's models were written alongside fxclip; these follow the common tutorial forms instead —
`nn.Embedding` for positions indexed by `torch.arange`, dropout at its usual defaults (the
benchmark sets every probability to 0 so that each method computes one function), the recurrent
layer's own zero state, `nn.TransformerEncoder`'s defaults, log-softmax outputs — so that the speed
targets do not depend on the zoo's particular shapes. Each entry is a `fxclip.zoo.ZooEntry`;
`python -m fxclip.bench --models user` runs them all (or name them one by one).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fxclip.zoo import ZooEntry


class TransformerTextClassifier(nn.Module):
    """Token and learned position embeddings, a 2-layer nn.TransformerEncoder (batch_first,
    dropout 0.1), mean pooling, a linear head."""

    def __init__(self, vocab: int = 5000, d_model: int = 64, nhead: int = 4, num_layers: int = 2, max_len: int = 64,
                 num_classes: int = 2):
        super().__init__()
        self.token_emb = nn.Embedding(vocab, d_model)
        self.pos_emb = nn.Embedding(max_len, d_model)
        layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward=4 * d_model, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=num_layers)
        self.fc = nn.Linear(d_model, num_classes)

    def forward(self, x):
        positions = torch.arange(x.size(1), device=x.device)
        h = self.token_emb(x) + self.pos_emb(positions)
        h = self.encoder(h)
        return self.fc(h.mean(dim=1))


class EmbeddingMeanClassifier(nn.Module):
    """The fastText-style classifier: the mean of the token embeddings, then a small MLP."""

    def __init__(self, vocab: int = 5000, dim: int = 64, hidden: int = 64, num_classes: int = 4):
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(self.embedding(x).mean(dim=1))))


class LSTMTextClassifier(nn.Module):
    """Embedding, a 2-layer nn.LSTM (batch_first, dropout between layers, no initial state passed),
    a linear head on the last layer's final hidden state."""

    def __init__(self, vocab: int = 5000, embed_dim: int = 64, hidden_dim: int = 128, num_classes: int = 4):
        super().__init__()
        self.embedding = nn.Embedding(vocab, embed_dim)
        self.lstm = nn.LSTM(embed_dim, hidden_dim, num_layers=2, batch_first=True, dropout=0.2)
        self.fc = nn.Linear(hidden_dim, num_classes)

    def forward(self, x):
        _, (hidden, _) = self.lstm(self.embedding(x))
        return self.fc(hidden[-1])


class ResidualBlock(nn.Module):
    """conv3x3 → GroupNorm → ReLU → conv3x3 → GroupNorm, plus the input, → ReLU."""

    def __init__(self, channels: int, groups: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.gn1 = nn.GroupNorm(groups, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.gn2 = nn.GroupNorm(groups, channels)

    def forward(self, x):
        out = F.relu(self.gn1(self.conv1(x)))
        out = self.gn2(self.conv2(out))
        return F.relu(out + x)


class GroupNormResNet(nn.Module):
    """A stem conv, one GroupNorm residual block, global average pooling, a linear head (CIFAR-size
    images)."""

    def __init__(self, in_channels: int = 3, channels: int = 16, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1, bias=False), nn.GroupNorm(8, channels), nn.ReLU())
        self.block = ResidualBlock(channels)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.block(self.stem(x))), 1))


class MnistNet(nn.Module):
    """PyTorch's examples/mnist network: two 3x3 convs, max pooling, dropout, two linear layers,
    log-softmax."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = torch.flatten(self.dropout1(x), 1)
        x = self.dropout2(F.relu(self.fc1(x)))
        return F.log_softmax(self.fc2(x), dim=1)


def _images(channels: int, side: int, classes: int):
    def make(batch: int, gen: torch.Generator):
        return (torch.randn(batch, channels, side, side, generator=gen),), torch.randint(0, classes, (batch,), generator=gen)

    return make


def _tokens(vocab: int, length: int, classes: int):
    def make(batch: int, gen: torch.Generator):
        return (torch.randint(0, vocab, (batch, length), generator=gen),), torch.randint(0, classes, (batch,), generator=gen)

    return make


USER_MODELS: dict[str, ZooEntry] = {
    e.name: e
    for e in [
        ZooEntry("user_transformer", TransformerTextClassifier, _tokens(5000, 32, 2),
                 "2-layer nn.TransformerEncoder, learned nn.Embedding positions"),
        ZooEntry("user_embedding_mean", EmbeddingMeanClassifier, _tokens(5000, 32, 4), "embedding mean + MLP over 32 tokens"),
        ZooEntry("user_lstm", LSTMTextClassifier, _tokens(5000, 32, 4), "2-layer nn.LSTM classifier"),
        ZooEntry("user_resnet_block", GroupNormResNet, _images(3, 32, 10), "GroupNorm residual block on 32x32 images"),
        ZooEntry("user_mnist_cnn", MnistNet, _images(1, 28, 10), "PyTorch's examples/mnist CNN"),
    ]
}
