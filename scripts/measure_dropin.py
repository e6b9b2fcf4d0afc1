"""Measure the drop-in paths (docs/migration.md, docs/lora.md), side by side in one process:

1. the `fxclip.PrivacyEngine` loop (zero_grad; criterion(module(x), y); backward) against
   `t.step(x, y)` on the same model and batch, and the non-private step;
2. GPT-2 with peft LoRA adapters: fxclip's step against the non-private step (time), and its
   norms and clipped sums against the torch.func reference in float64 (exactness).

Times are medians of interleaved repeats after warm-up, so the methods see the same load.

    python scripts/measure_dropin.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import peft
import torch
import torch.nn.functional as F
import transformers

import fxclip
from fxclip import zoo
from fxclip.integrations.transformers import Logits, next_token_per_example
from fxclip.reference import any_per_example_grads, clipped_sum


def interleaved_medians(functions: dict, repeats: int, warmup: int = 3) -> dict:
    """Median seconds of each function, the functions run in turn `warmup + repeats` times."""
    times = {name: [] for name in functions}
    for i in range(warmup + repeats):
        for name, fn in list(functions.items())[:: 1 if i % 2 else -1]:  # the order alternates: neither always runs first
            start = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def engine_loop(repeats: int) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    model, twin, plain = zoo.MnistCNN(), zoo.MnistCNN(), zoo.MnistCNN()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    module, optimizer, criterion, _ = fxclip.PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
        criterion=torch.nn.CrossEntropyLoss(), noise_multiplier=1.0, max_grad_norm=1.0)
    t = fxclip.transform(twin, lambda out, target: F.cross_entropy(out, target, reduction="none"), max_grad_norm=1.0)

    def loop():
        optimizer.zero_grad()
        loss = criterion(module(x), y)
        loss.backward()

    def step():
        twin.zero_grad(set_to_none=True)
        t.step(x, y)

    def nonprivate():
        plain.zero_grad(set_to_none=True)
        F.cross_entropy(plain(x), y).backward()

    m = interleaved_medians({"loop": loop, "step": step, "nonprivate": nonprivate}, repeats)
    print(f"MnistCNN, batch 64: engine loop {m['loop'] * 1e3:.1f} ms, t.step {m['step'] * 1e3:.1f} ms, "
          f"non-private {m['nonprivate'] * 1e3:.1f} ms; loop / t.step = {m['loop'] / m['step']:.3f}, "
          f"t.step / non-private = {m['step'] / m['nonprivate']:.2f}")


def gpt2_lora(width: int, layers: int, vocab: int, length: int, rank: int, dtype=torch.float32):
    config = transformers.GPT2Config(n_embd=width, n_layer=layers, n_head=4, vocab_size=vocab, n_positions=length,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).to(dtype)
    lora = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    return peft.get_peft_model(model, lora).train()


def lora(repeats: int) -> None:
    width, layers, vocab, length, batch, rank = 256, 4, 2048, 64, 16, 8
    torch.manual_seed(0)
    model = gpt2_lora(width, layers, vocab, length, rank)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ids = torch.randint(0, vocab, (batch, length))
    t = fxclip.transform(Logits(model, ("input_ids",)), next_token_per_example, max_grad_norm=1.0)

    def step():
        model.zero_grad(set_to_none=True)
        t.step((ids,), ids)

    def nonprivate():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()

    m = interleaved_medians({"step": step, "nonprivate": nonprivate}, repeats)
    print(f"GPT-2 LoRA (width {width}, {layers} layers, sequence {length}, r={rank}, {trainable} trainable), batch {batch}: "
          f"fxclip {m['step'] * 1e3:.1f} ms, non-private {m['nonprivate'] * 1e3:.1f} ms, ratio {m['step'] / m['nonprivate']:.2f}; "
          f"fallbacks {t.fallbacks}")

    torch.manual_seed(1)
    model64 = gpt2_lora(width, layers, vocab, length, rank, torch.float64)
    wrapped, ids = Logits(model64, ("input_ids",)), torch.randint(0, vocab, (8, length))
    t64 = fxclip.transform(wrapped, next_token_per_example, max_grad_norm=1.0)
    result = t64.step((ids,), ids)
    grads, _ = any_per_example_grads(wrapped, next_token_per_example, (ids,), ids)
    norms, sums = clipped_sum(grads, 1.0)
    norm_error = float(((result.norms - norms).abs() / norms).max())
    scale = max(float(s.abs().max()) for s in sums.values())  # LoRA's B starts at 0, so A's sums are 0: one scale for all
    sum_error = max(float((p.grad - sums[k]).abs().max()) / scale for k, p in wrapped.named_parameters() if p.requires_grad)
    print(f"exactness, float64, batch 8: norms max relative error {norm_error:.1e}, clipped sums {sum_error:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    engine_loop(args.repeats)
    lora(args.repeats)


if __name__ == "__main__":
    main()
