"""A Hugging Face `Trainer` that trains with DP-SGD through fxclip (needs the `hf` extra:
`pip install 'fxclip[hf]'`).

    trainer = PrivateTrainer(model=model, args=TrainingArguments(..., per_device_train_batch_size=64),
                             train_dataset=train, data_collator=collator, target_epsilon=3.0, target_delta=1e-5)
    trainer.train()          # the logs carry "epsilon", the privacy spent so far

A subclass, not a callback: DP-SGD replaces the three things a callback can only watch, the batches
(Poisson sampling: `get_train_dataloader`), the forward and backward (fxclip's per-example clipped
step: `training_step`) and the optimizer step (noise and the division by the expected batch size:
`create_optimizer`). Everything else (schedules, evaluation, checkpoints, logging) is the Trainer's.
See docs/lora.md for LoRA / peft models.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from fxclip.api import PrivateStep, transform
from fxclip.checks import check_number
from fxclip.dp.accounting import ACCOUNTANTS, epsilon_spent, noise_multiplier_for_epsilon
from fxclip.dp.optim import PrivateOptimizer
from fxclip.dp.sampling import poisson_data_loader
from fxclip.errors import FxclipError
from fxclip.integrations.engine import DPOptimizer, check_resampleable

IGNORE_INDEX = -100  # Hugging Face's label for positions without a loss (padding, prompt)


class Logits(nn.Module):
    """`model(**dict(zip(keys, inputs))).logits`: a Hugging Face model as a module of positional
    tensors, the form fxclip's step takes."""

    def __init__(self, model: nn.Module, keys: tuple[str, ...]):
        super().__init__()
        self.model, self.keys = model, keys

    def forward(self, *inputs):
        return self.model(**dict(zip(self.keys, inputs))).logits


def cross_entropy_per_example(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each example's mean cross-entropy over its labelled positions (labels == -100 do not count):
    sequence classification ([B, C], [B]) and token classification ([B, T, C], [B, T])."""
    losses = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), reduction="none", ignore_index=IGNORE_INDEX).view(labels.shape)
    if labels.dim() == 1:
        return losses
    counted = (labels != IGNORE_INDEX).flatten(1).sum(1)
    return losses.flatten(1).sum(1) / counted.clamp(min=1)


def next_token_per_example(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A causal language model's per-example loss: position t predicts label t + 1, as the model's own
    loss shifts them; each example's mean over its labelled positions."""
    return cross_entropy_per_example(logits[:, :-1], labels[:, 1:])


def regression_per_example(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean squared error per example (num_labels == 1 or float labels), as the model's own loss."""
    return (logits.reshape(labels.shape) - labels).pow(2).flatten(1).mean(1) if labels.dim() > 1 else (logits.view(-1) - labels).pow(2)


def default_per_example_loss(model: nn.Module) -> Callable:
    """The per-example form of the loss the model computes itself from `labels`: next-token for a
    causal language model, else mean squared error for regression, else cross-entropy."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model
    if type(base).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()):
        return next_token_per_example
    if getattr(base.config, "problem_type", None) == "regression" or getattr(base.config, "num_labels", None) == 1:
        return regression_per_example
    return cross_entropy_per_example


class PrivateTrainer(transformers.Trainer):
    """`transformers.Trainer` with DP-SGD: Poisson batches of expected size
    `per_device_train_batch_size`, each example's gradient clipped to `max_grad_norm` (default:
    `args.max_grad_norm`, taken per example; the Trainer's own clipping of the noised average is
    off), Gaussian noise of multiplier `noise_multiplier`, or the least that keeps epsilon <=
    `target_epsilon` at `target_delta` after the run's steps, and "epsilon" in every log.

    `per_example_loss(logits, labels) -> [B]` defaults to the model's own loss taken per example
    (`default_per_example_loss`); batches are dicts of tensors with "labels". `step_options` go
    to `fxclip.transform` (compile, max_physical_batch_size, ...). One process, no gradient
    accumulation (use max_physical_batch_size for memory). Bad settings raise FxclipError here."""

    def __init__(self, *args, target_epsilon: float | None = None, target_delta: float = 1e-5, noise_multiplier: float | None = None,
                 max_grad_norm: float | None = None, accountant: str = "pld", secure_noise: bool = False,
                 per_example_loss: Callable | None = None, step_options: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if (target_epsilon is None) == (noise_multiplier is None):
            raise FxclipError("give PrivateTrainer either target_epsilon (the noise is calibrated to it) or noise_multiplier")
        if accountant not in ACCOUNTANTS:
            raise FxclipError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
        if self.args.gradient_accumulation_steps != 1:
            raise FxclipError(
                f"gradient_accumulation_steps={self.args.gradient_accumulation_steps}: a DP-SGD step is one Poisson batch; set it to 1 "
                "and bound memory with step_options={'max_physical_batch_size': N} (exact: clipping is per example)"
            )
        if self.args.world_size != 1:
            raise FxclipError(f"PrivateTrainer runs in one process; this run has {self.args.world_size} (see docs/distributed.md)")
        if self.train_dataset is None:
            raise FxclipError("PrivateTrainer needs a train_dataset")
        check_resampleable(self.train_dataset, self._train_batch_size, "the train_dataset", "per_device_train_batch_size")
        self.dataset_size, self.batch_size = len(self.train_dataset), self._train_batch_size
        self.sampling_rate = self.batch_size / self.dataset_size
        self.target_epsilon = target_epsilon if target_epsilon is None else check_number("target_epsilon", target_epsilon, above=0, error=FxclipError)
        self.target_delta = check_number("target_delta", target_delta, above=0, below=1, error=FxclipError)
        self.noise_multiplier = noise_multiplier if noise_multiplier is None else check_number(
            "noise_multiplier", noise_multiplier, at_least=0, error=FxclipError)
        self.per_example_max_grad_norm = check_number(
            "max_grad_norm", self.args.max_grad_norm if max_grad_norm is None else max_grad_norm, above=0,
            hint="It is the per-example clip bound C.", error=FxclipError)
        self.args = copy.copy(self.args)  # not the caller's: the Trainer must not clip the noised average again
        self.args.max_grad_norm = 0.0
        self.accountant, self.secure_noise = accountant, secure_noise
        self.per_example_loss = per_example_loss or default_per_example_loss(self.model)
        self.step_options = dict(step_options or {})
        self.dp_optimizer: DPOptimizer | None = None
        self._steps: dict[tuple[str, ...], PrivateStep] = {}  # by the batch's input names

    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        """Poisson batches of expected size `per_device_train_batch_size`, as many per epoch as the
        Trainer's own loader has batches (drop_last: 1 fewer when uneven)."""
        steps = self.dataset_size // self.batch_size if self.args.dataloader_drop_last else math.ceil(self.dataset_size / self.batch_size)
        dataset, collate = self.train_dataset, self._get_collator_with_removed_columns(self.data_collator, description="Training")
        if hasattr(dataset, "column_names") and hasattr(self, "_remove_unused_columns"):  # a datasets.Dataset
            dataset, collate = self._remove_unused_columns(dataset, description="Training"), self.data_collator
        return poisson_data_loader(dataset, self.batch_size, max(steps, 1), collate, num_workers=self.args.dataloader_num_workers,
                                   pin_memory=self.args.dataloader_pin_memory)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """The Trainer's optimizer, wrapped so that its step noises the clipped sums and divides by
        the expected batch size (`fxclip.dp.optim.PrivateOptimizer`); a target epsilon's noise is
        set when the Trainer makes the schedule, which is when it gives the number of steps."""
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        if not isinstance(optimizer, DPOptimizer):
            self.dp_optimizer = DPOptimizer(PrivateOptimizer(optimizer, noise_multiplier=self.noise_multiplier or 0.0,
                                                             max_grad_norm=self.per_example_max_grad_norm, expected_batch_size=self.batch_size,
                                                             secure_noise=self.secure_noise))
            self.optimizer = self.dp_optimizer
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if self.noise_multiplier is None:  # the least noise for the target after the run's steps
            self.noise_multiplier = noise_multiplier_for_epsilon(self.target_epsilon, self.sampling_rate, num_training_steps,
                                                                 self.target_delta, self.accountant)
        if self.dp_optimizer is not None:
            self.dp_optimizer.private.noise_multiplier = self.noise_multiplier
        return super().create_scheduler(num_training_steps, optimizer)

    def training_step(self, model: nn.Module, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
        """fxclip's private step on the batch: Σ_i clip_i ∇θ L_i into each .grad (one forward and
        one backward); returns the batch's mean loss."""
        if self.noise_multiplier is None or self.dp_optimizer is None or self.dp_optimizer.noise_multiplier != self.noise_multiplier:
            raise FxclipError("the private optimizer's noise is not set: the Trainer did not make its optimizer and schedule "
                              "through create_optimizer and create_scheduler (num_training_steps) before training")
        model.train()
        inputs = dict(self._prepare_inputs(inputs))
        if "labels" not in inputs:
            raise FxclipError(f"the batch has no 'labels' (it has {sorted(inputs)}): the private step needs each example's target")
        labels = inputs.pop("labels")
        keys = tuple(inputs)
        if keys not in self._steps:
            self._steps[keys] = transform(Logits(self.accelerator.unwrap_model(model), keys), self.per_example_loss,
                                          self.per_example_max_grad_norm, **self.step_options)
        losses = self._steps[keys].step(tuple(inputs.values()), labels).losses
        return losses.mean().detach() if losses.numel() else torch.zeros((), device=self.args.device)

    @property
    def epsilon(self) -> float:
        """Epsilon spent at `target_delta` by the optimizer steps taken so far."""
        steps = 0 if self.dp_optimizer is None else self.dp_optimizer.steps
        return epsilon_spent(self.noise_multiplier or 0.0, self.sampling_rate, steps, self.target_delta, self.accountant)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self.dp_optimizer is not None:
            logs = {**logs, "epsilon": self.epsilon}
        super().log(logs, *args, **kwargs)
