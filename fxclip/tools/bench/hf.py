"""Hugging Face `transformers` models for the benchmark and the CUDA trace tests: GPT-2, BERT and
ViT, randomly initialised (nothing is downloaded), at real width or tiny, and GPT-2 with LoRA
adapters through `peft`.

Each entry of `HF_MODELS` is a `ZooEntry`-like pair: a factory for a module that returns logits
(the Hugging Face output object unwrapped) and a batch maker. Dropout probabilities are 0 and the
models are in eval mode, so a step is deterministic: every method and the reference compute one
function (Hugging Face records each dropout even at p = 0; in eval mode it is the identity).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


class Logits(nn.Module):
    """`model(**{key: x}).logits`: a Hugging Face model as a module of one tensor input."""

    def __init__(self, model: nn.Module, key: str):
        super().__init__()
        self.model, self.key = model, key

    def forward(self, x):
        return self.model(**{self.key: x}).logits


def next_token_loss(logits, targets):
    """Per-example language-model loss: mean cross-entropy over the sequence ([B, T, V], [B, T])."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape).mean(1)


def class_loss(logits, targets):
    return F.cross_entropy(logits, targets, reduction="none")


@dataclass
class HFModel:
    factory: Callable[[], nn.Module]
    make_batch: Callable[[int, torch.Generator], tuple]  # (batch, generator) -> ((inputs,), targets)
    loss_fn: Callable
    batch: int  # the batch the benchmark runs it at


def _transformers():
    try:
        import transformers
    except ImportError as e:  # optional: pip install transformers
        raise ImportError("the Hugging Face models need `transformers` (pip install transformers)") from e
    return transformers


def _gpt2(width: int, layers: int, heads: int, vocab: int, length: int):
    tf = _transformers()
    config = tf.GPT2Config(
        n_embd=width, n_layer=layers, n_head=heads, vocab_size=vocab, n_positions=length,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    return Logits(tf.GPT2LMHeadModel(config), "input_ids").eval()


def _lora(model: Logits, rank: int) -> nn.Module:
    """LoRA adapters of rank `rank` on GPT-2's attention and MLP projections (peft); only the
    adapters train."""
    import peft

    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=["c_attn", "c_proj", "c_fc"],
                             fan_in_fan_out=True)
    model.model = peft.get_peft_model(model.model, config)
    return model.eval()


def _bert(width: int, layers: int, heads: int, vocab: int, length: int, labels: int = 2):
    tf = _transformers()
    config = tf.BertConfig(
        hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=4 * width,
        vocab_size=vocab, max_position_embeddings=length, num_labels=labels,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return Logits(tf.BertForSequenceClassification(config), "input_ids").eval()


def _vit(width: int, layers: int, heads: int, image: int, patch: int, labels: int = 10):
    tf = _transformers()
    config = tf.ViTConfig(
        hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=4 * width,
        image_size=image, patch_size=patch, num_labels=labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return Logits(tf.ViTForImageClassification(config), "pixel_values").eval()


def _tokens(vocab: int, length: int, targets: str, labels: int = 2):
    def make(batch: int, gen: torch.Generator):
        ids = torch.randint(0, vocab, (batch, length), generator=gen)
        if targets == "next":
            return (ids,), torch.randint(0, vocab, (batch, length), generator=gen)
        return (ids,), torch.randint(0, labels, (batch,), generator=gen)

    return make


def _images(side: int, labels: int = 10):
    def make(batch: int, gen: torch.Generator):
        return (torch.randn(batch, 3, side, side, generator=gen),), torch.randint(0, labels, (batch,), generator=gen)

    return make


# Real width (issue 21): GPT-2 small at sequence 256, BERT-base at 128, ViT-B/16 at 224x224.
HF_MODELS: dict[str, HFModel] = {
    "hf_gpt2": HFModel(lambda: _gpt2(768, 12, 12, 50257, 256), _tokens(50257, 256, "next"), next_token_loss, 32),
    "hf_gpt2_lora": HFModel(lambda: _lora(_gpt2(768, 12, 12, 50257, 256), 8), _tokens(50257, 256, "next"), next_token_loss, 32),
    "hf_bert": HFModel(lambda: _bert(768, 12, 12, 30522, 512), _tokens(30522, 128, "class"), class_loss, 64),
    "hf_vit": HFModel(lambda: _vit(768, 12, 12, 224, 16), _images(224), class_loss, 64),
}

# The same architectures, tiny: for the tests and a CPU dry run of the GPU script.
HF_TINY: dict[str, HFModel] = {
    "hf_gpt2": HFModel(lambda: _gpt2(32, 2, 2, 64, 16), _tokens(64, 12, "next"), next_token_loss, 4),
    "hf_gpt2_lora": HFModel(lambda: _lora(_gpt2(32, 2, 2, 64, 16), 4), _tokens(64, 12, "next"), next_token_loss, 4),
    "hf_bert": HFModel(lambda: _bert(32, 2, 2, 64, 16), _tokens(64, 12, "class"), class_loss, 4),
    "hf_vit": HFModel(lambda: _vit(32, 2, 2, 16, 4), _images(16), class_loss, 4),
}
