"""fxclip.integrations.transformers.PrivateTrainer: DP-SGD in a Hugging Face Trainer, offline on
tiny randomly initialised models and synthetic data, with and without peft LoRA adapters."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fxclip.dp.accounting import epsilon_spent
from fxclip.errors import FxclipError
from fxclip.integrations.transformers import Logits, PrivateTrainer, next_token_per_example
from fxclip.reference import any_per_example_grads, clipped_sum
from tests.helpers import relative_error

VOCAB, LENGTH, N, BATCH, LR, CLIP = 48, 10, 40, 8, 0.5, 0.3


def tiny_gpt2(lora: bool = False):
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).double()
    if lora:
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn", "c_fc"],
                                                          fan_in_fan_out=True))
    return model


def token_data(n=N):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, VOCAB, (n, LENGTH), generator=g)
    labels = ids.clone()
    labels[: n // 2, :3] = -100  # a prompt without loss in half of the examples
    return [{"input_ids": i, "attention_mask": torch.ones(LENGTH, dtype=torch.long), "labels": y} for i, y in zip(ids, labels)]


def arguments(tmp_path, **changes):
    settings = {"output_dir": str(tmp_path), "per_device_train_batch_size": BATCH, "num_train_epochs": 1, "learning_rate": LR, "optim": "sgd",
                "lr_scheduler_type": "constant", "weight_decay": 0.0, "logging_steps": 1, "report_to": [], "save_strategy": "no",
                "use_cpu": True, "disable_tqdm": True}
    return transformers.TrainingArguments(**(settings | changes))


class CheckedTrainer(PrivateTrainer):
    """Before each step, the update DP-SGD with noise 0 must make on the batch (from the torch.func
    reference); after it (a callback), the parameters are compared with it."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        batch = dict(inputs)
        labels = batch.pop("labels")
        params = {k: p for k, p in model.named_parameters() if p.requires_grad}
        grads, _ = any_per_example_grads(Logits(model, tuple(batch)), next_token_per_example, tuple(batch.values()), labels)
        _, sums = clipped_sum({k.removeprefix("model."): g for k, g in grads.items()}, CLIP)
        self.expected = {k: p.detach() - LR * sums[k] / BATCH for k, p in params.items()}
        self.frozen = {k: p.detach().clone() for k, p in model.named_parameters() if not p.requires_grad}
        self.sizes.append(len(labels))
        return super().training_step(model, inputs, num_items_in_batch)


class CompareAfterStep(transformers.TrainerCallback):
    def __init__(self):
        self.errors = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        trainer = self.trainer
        self.errors.append(max(relative_error(p.detach(), trainer.expected[k]) for k, p in model.named_parameters() if p.requires_grad))
        assert all(torch.equal(p, trainer.frozen[k]) for k, p in model.named_parameters() if not p.requires_grad)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_each_step_is_the_dp_sgd_step_on_the_poisson_batch(tmp_path, lora):
    model = tiny_gpt2(lora)
    check = CompareAfterStep()
    trainer = CheckedTrainer(model=model, args=arguments(tmp_path), train_dataset=token_data(), noise_multiplier=0.0, max_grad_norm=CLIP,
                             callbacks=[check])
    trainer.sizes, check.trainer = [], trainer
    trainer.train()
    assert len(trainer.sizes) == N // BATCH and len(set(trainer.sizes)) > 1  # Poisson batches of expected size 8
    assert len(check.errors) == N // BATCH and max(check.errors) <= 1e-10
    assert trainer.args.max_grad_norm == 0.0 and trainer.per_example_max_grad_norm == CLIP  # the Trainer does not clip again


def test_training_to_a_target_epsilon_logs_epsilon(tmp_path):
    trainer = PrivateTrainer(model=tiny_gpt2(lora=True).float(), args=arguments(tmp_path, num_train_epochs=2), train_dataset=token_data(),
                             target_epsilon=8.0, target_delta=1e-3)
    trainer.train()
    logged = [entry["epsilon"] for entry in trainer.state.log_history if "epsilon" in entry and "loss" in entry]
    assert len(logged) == 10 and logged == sorted(logged)
    assert logged[-1] == epsilon_spent(trainer.noise_multiplier, BATCH / N, 10, 1e-3) and 7.5 < logged[-1] <= 8.0
    assert all(entry["loss"] > 0 for entry in trainer.state.log_history if "loss" in entry)


def test_sequence_classification(tmp_path):
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=VOCAB,
                                     max_position_embeddings=16, num_labels=3)
    model = transformers.BertForSequenceClassification(config)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, VOCAB, (LENGTH,), generator=g), "labels": torch.randint(0, 3, (), generator=g)} for _ in range(N)]
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    trainer = PrivateTrainer(model=model, args=arguments(tmp_path, learning_rate=0.01), train_dataset=data, noise_multiplier=1.0)
    trainer.train()
    assert trainer.dp_optimizer.steps == N // BATCH
    assert all(not torch.equal(p, before[k]) for k, p in model.named_parameters())  # noise reaches every parameter


class Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(token_data())


@pytest.mark.parametrize("change, message", [
    ({"target_epsilon": 3.0, "noise_multiplier": 1.0}, "either target_epsilon"),
    ({}, "either target_epsilon"),
    ({"noise_multiplier": 1.0, "train_dataset": Stream(), "args": {"max_steps": 5}}, "cannot be resampled"),
    ({"noise_multiplier": 1.0, "args": {"gradient_accumulation_steps": 2}}, "gradient_accumulation_steps=2"),
    ({"noise_multiplier": 1.0, "args": {"per_device_train_batch_size": 100}}, "between 1 and the 40 examples"),
    ({"noise_multiplier": -1.0}, "noise_multiplier must be"),
], ids=["both", "neither", "iterable", "accumulation", "batch_too_large", "negative_noise"])
def test_bad_settings_are_refused(tmp_path, change, message):
    change = dict(change)
    args = arguments(tmp_path, **change.pop("args", {}))
    with pytest.raises(FxclipError, match=message):
        PrivateTrainer(model=tiny_gpt2(), args=args, **({"train_dataset": token_data()} | change))
