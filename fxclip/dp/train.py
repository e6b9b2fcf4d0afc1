"""Train a model with differential privacy (DP-SGD) to a target (epsilon, delta), and report.

`fxclip train` trains a zoo model on a data set (scikit-learn's digits by default) with Poisson
sampling, fxclip's fast per-example clipping, Gaussian noise calibrated by dp_accounting to the
target epsilon, and any torch optimizer. It also trains the same model without privacy for
comparison, times one step of the non-private, fxclip and naive (per-example loop) methods, and
writes `metrics.json` and `accuracy_vs_epsilon.png` to the output directory.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from fxclip import zoo
from fxclip.api import TRACE_AFTER_STEPS, transform
from fxclip.dp.accounting import ACCOUNTANTS, check_delta, check_epsilon, epsilon_spent, noise_multiplier_for_epsilon
from fxclip.checks import check_integer, check_number
from fxclip.clipping import clip_factors
from fxclip.dp.data import BUILTIN_DATASETS, Dataset, load_dataset
from fxclip.errors import describe
from fxclip.dp.optim import AdaptiveClipping, PrivateOptimizer
from fxclip.dp.sampling import PoissonBatchSampler

CLIPPING_STYLES = ("flat", "per_layer", "automatic")
OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def _image_model(cls: type[nn.Module]) -> Callable[[tuple, int], nn.Module]:
    def build(input_shape: tuple, num_classes: int) -> nn.Module:
        if len(input_shape) != 3:
            raise ValueError(
                f"this model takes images [N, C, H, W], but the data has inputs of shape {list(input_shape)} "
                "per example; use --model mlp, or image data."
            )
        return cls(input_shape[0], num_classes)

    return build


# Zoo model classes sized to a data set: (per-example input shape, number of classes) -> model.
MODEL_BUILDERS: dict[str, Callable[[tuple, int], nn.Module]] = {
    "mlp": lambda input_shape, num_classes: zoo.MLP(math.prod(input_shape), 128, num_classes),
    "small_cnn": _image_model(zoo.SmallCNN),
    "mnist_cnn": _image_model(zoo.MnistCNN),
    "resnet_gn": _image_model(zoo.ResNetGN),
    "depthwise": _image_model(zoo.DepthwiseSeparableNet),
}


def build_model(name: str, data: Dataset) -> nn.Module:
    """The zoo model `name` with its input and output layers sized to `data`."""
    if name not in MODEL_BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODEL_BUILDERS)}.")
    try:
        return MODEL_BUILDERS[name](data.input_shape, data.num_classes)
    except ValueError as err:
        raise ValueError(f"model {name!r} does not fit data set {data.name!r}: {err}") from err


# cross-entropy per example ([B]), the loss form `fxclip.transform` needs (sequence targets too)
per_example_cross_entropy = zoo.PerExampleCrossEntropy()


@dataclass
class TrainConfig:
    """Settings of a private training run (and of the non-private run it is compared with)."""

    model: str = "mlp"
    dataset: str = "digits"
    epsilon: float = 3.0
    delta: float = 1e-5
    epochs: int = 20
    batch_size: int = 128  # expected (Poisson) logical batch size
    physical_batch_size: int = 512  # largest batch run at once; larger batches are accumulated
    max_grad_norm: float = 1.0
    clipping: str = "flat"  # flat, per_layer (C / sqrt(K) for each of K parameters: sensitivity C) or automatic
    target_quantile: float | None = None  # adaptive clipping (flat): the fraction of examples C leaves unclipped
    lr: float = 1e-2
    optimizer: str = "adam"
    momentum: float = 0.0
    accountant: str = "pld"
    secure_noise: bool = False
    compile: bool = True  # a run of the default length repays the first step's compile many times
    device: str = "cpu"
    seed: int = 0

    def validate(self) -> None:
        """Raise ValueError, saying what to change, for any setting that cannot work."""
        check_epsilon(self.epsilon)
        check_delta(self.delta)
        for name in ("epochs", "batch_size", "physical_batch_size"):
            check_integer(name, getattr(self, name), at_least=1)
        check_number("max_grad_norm", self.max_grad_norm, above=0, hint="It is the clip bound C (--clip).")
        if self.clipping not in CLIPPING_STYLES:
            raise ValueError(f"unknown clipping style {self.clipping!r}; choose one of {CLIPPING_STYLES}.")
        if self.target_quantile is not None:
            check_number("target_quantile", self.target_quantile, at_least=0, at_most=1,
                         hint="It is the fraction of examples adaptive clipping leaves unclipped (--target-quantile), e.g. 0.5.")
            if self.clipping != "flat":
                raise ValueError(f"--target-quantile (adaptive clipping) moves one bound: use --clipping flat, not {self.clipping}.")
        check_number("lr", self.lr, above=0, hint="It is the learning rate (--lr), e.g. 1e-2.")
        check_number("momentum", self.momentum, at_least=0, hint="It is SGD's momentum (--momentum), e.g. 0.9.")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {sorted(OPTIMIZERS)}.")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"unknown accountant {self.accountant!r}; choose one of {ACCOUNTANTS}.")
        try:
            torch.empty(0, device=self.device)
        except (RuntimeError, AssertionError) as err:  # torch asserts when built without CUDA
            raise ValueError(
                f"device {self.device!r} is not usable here ({describe(err)}); use --device cpu, or cuda where "
                "CUDA is available."
            ) from err

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """The configured torch optimizer over the model's trainable parameters."""
        params = [p for p in model.parameters() if p.requires_grad]
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)
        return OPTIMIZERS[self.optimizer](params, lr=self.lr)


@dataclass
class PrivacyPlan:
    """Sampling rate, step count and noise that make the run (epsilon, delta)-DP."""

    sampling_rate: float
    steps_per_epoch: int
    steps: int
    noise_multiplier: float
    delta: float
    accountant: str

    @classmethod
    def for_target(cls, config: TrainConfig, num_examples: int) -> PrivacyPlan:
        """q = batch/N, steps = epochs * round(N/batch), and the least noise meeting config.epsilon."""
        if num_examples == 0:
            raise ValueError("the training set is empty; private training needs at least one example.")
        if config.batch_size > num_examples:
            raise ValueError(
                f"batch size {config.batch_size} exceeds the {num_examples} training examples "
                "(sampling rate batch/N must be <= 1); choose a smaller --batch-size."
            )
        q = config.batch_size / num_examples
        steps_per_epoch = max(1, round(num_examples / config.batch_size))
        steps = config.epochs * steps_per_epoch
        if config.delta >= 1 / num_examples:
            warnings.warn(
                f"delta={config.delta:g} is not well below 1/N = {1 / num_examples:.3g} (N = {num_examples} training "
                "examples): releasing one random example in full is already (0, 1/N)-DP, so this guarantee may mean "
                "little; use a delta much smaller than 1/N.",
                stacklevel=2,
            )
        sigma = noise_multiplier_for_epsilon(config.epsilon, q, steps, config.delta, config.accountant)
        return cls(q, steps_per_epoch, steps, sigma, config.delta, config.accountant)

    def epsilon_after(self, steps: int) -> float:
        """Epsilon spent after `steps` steps of this plan."""
        return epsilon_spent(self.noise_multiplier, self.sampling_rate, steps, self.delta, self.accountant)


@dataclass
class EpochRecord:
    """Metrics at the end of one epoch."""

    epoch: int
    steps: int
    test_accuracy: float
    train_loss: float
    epsilon: float
    examples_per_second: float


@dataclass
class RunHistory:
    """Per-epoch metrics of one training run, and its training time (evaluation excluded)."""

    epochs: list[EpochRecord] = field(default_factory=list)
    train_seconds: float = 0.0
    final_max_grad_norm: float | None = None  # the clip bound at the end (private runs; it moves under adaptive clipping)

    @property
    def final_accuracy(self) -> float:
        """Test accuracy after the last epoch."""
        return self.epochs[-1].test_accuracy


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    """Fraction of (x, y) the model classifies correctly, evaluated in eval mode."""
    was_training = model.training
    model.eval()
    correct = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in zip(x.split(batch_size), y.split(batch_size)))
    model.train(was_training)
    return correct / len(y)


def _train_epochs(
    model: nn.Module,
    data: Dataset,
    config: TrainConfig,
    batches: Iterable[torch.Tensor],
    take_step: Callable[[torch.Tensor], torch.Tensor],
    steps_per_epoch: int,
    epsilon_after: Callable[[int], float],
    description: str,
    progress: bool,
) -> RunHistory:
    """Run take_step(batch indices) -> losses over `batches`, evaluating after every epoch."""
    history = RunHistory()
    bar = tqdm(total=config.epochs * steps_per_epoch, desc=description, unit="step", disable=not progress, leave=False)
    epoch_seconds, epoch_examples, epoch_loss = 0.0, 0, 0.0
    for step, indices in enumerate(batches, start=1):
        start = time.perf_counter()
        losses = take_step(indices)
        epoch_seconds += time.perf_counter() - start
        epoch_examples += len(indices)
        epoch_loss += float(losses.sum())
        bar.update()
        if step % steps_per_epoch == 0:
            record = EpochRecord(
                epoch=step // steps_per_epoch,
                steps=step,
                test_accuracy=accuracy(model, data.x_test, data.y_test),
                train_loss=epoch_loss / max(epoch_examples, 1),
                epsilon=epsilon_after(step),
                examples_per_second=epoch_examples / max(epoch_seconds, 1e-9),
            )
            history.epochs.append(record)
            history.train_seconds += epoch_seconds
            bar.set_postfix(acc=f"{record.test_accuracy:.3f}", eps=f"{record.epsilon:.2f}", ex_s=f"{record.examples_per_second:.0f}")
            if progress:
                bar.write(
                    f"  {description} epoch {record.epoch:3d}: test accuracy {record.test_accuracy:6.1%}  "
                    f"epsilon {record.epsilon:5.2f}  {record.examples_per_second:8.0f} examples/s"
                )
            epoch_seconds, epoch_examples, epoch_loss = 0.0, 0, 0.0
    bar.close()
    return history


def make_transform(model: nn.Module, config: TrainConfig):
    """fxclip's private step for `model` with per-example cross-entropy, config's clip bound C and
    clipping style; per_layer gives each of the K trainable parameters C / sqrt(K), so that the
    sensitivity is C as for the other styles."""
    bound = config.max_grad_norm
    if config.clipping == "per_layer":
        k = sum(1 for p in model.parameters() if p.requires_grad)
        bound = [config.max_grad_norm / math.sqrt(k)] * k
    return transform(
        model, per_example_cross_entropy, max_grad_norm=bound, compile=config.compile,
        max_physical_batch_size=config.physical_batch_size, clipping=config.clipping,
    )


def prepare_private_training(
    model: nn.Module, data: Dataset, config: TrainConfig
) -> tuple[object, PrivateOptimizer, PrivacyPlan]:
    """Check everything and build the transform, private optimizer and privacy plan, before training.

    Bad settings, an empty data set, or a model fxclip cannot make private (BatchNorm in training
    mode, inputs it cannot take) raise ValueError here. The model is checked by a trial
    `transform.step` on two training examples whose gradients are then discarded: no parameter
    changes and nothing is released, so no privacy is spent.
    """
    config.validate()
    if len(data.x_train) == 0:
        raise ValueError(f"data set {data.name!r} has no training examples.")
    plan = PrivacyPlan.for_target(config, len(data.x_train))
    transform = make_transform(model, config)
    transform.step(data.x_train[:2], data.y_train[:2])
    model.zero_grad(set_to_none=True)
    generator = None if config.secure_noise else torch.Generator(device=config.device).manual_seed(config.seed + 1)
    expected_batch_size = plan.sampling_rate * len(data.x_train)
    # made after the trial step, whose norms must not enter the released count
    adaptive = None if config.target_quantile is None else AdaptiveClipping(
        transform, target_quantile=config.target_quantile, expected_batch_size=expected_batch_size
    )
    optimizer = PrivateOptimizer(
        config.make_optimizer(model),
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=None if adaptive else transform.sensitivity,
        expected_batch_size=expected_batch_size,
        secure_noise=config.secure_noise,
        generator=generator,
        adaptive_clipping=adaptive,
    )
    return transform, optimizer, plan


def train_private(
    model: nn.Module, data: Dataset, config: TrainConfig, progress: bool = True
) -> tuple[RunHistory, PrivacyPlan]:
    """DP-SGD on `data` to (config.epsilon, config.delta); `model` and `data` on config.device."""
    transform, optimizer, plan = prepare_private_training(model, data, config)
    sampler = PoissonBatchSampler(
        len(data.x_train), plan.sampling_rate, plan.steps, generator=torch.Generator().manual_seed(config.seed)
    )

    def private_step(indices: torch.Tensor) -> torch.Tensor:
        indices = indices.to(data.x_train.device)
        optimizer.zero_grad()
        losses = transform.step(data.x_train[indices], data.y_train[indices]).losses
        optimizer.step()
        return losses

    history = _train_epochs(
        model, data, config, sampler, private_step, plan.steps_per_epoch, plan.epsilon_after, "private", progress
    )
    history.final_max_grad_norm = transform.sensitivity
    return history, plan


def train_nonprivate(model: nn.Module, data: Dataset, config: TrainConfig, progress: bool = True) -> RunHistory:
    """Ordinary training with the same model, optimizer, batch size and epochs: shuffled batches,
    mean loss, no clipping or noise. The reference for what privacy costs in accuracy."""
    config.validate()
    n = len(data.x_train)
    steps_per_epoch = max(1, round(n / config.batch_size))
    generator = torch.Generator().manual_seed(config.seed)
    batches = (
        batch
        for _ in range(config.epochs)
        for batch in torch.randperm(n, generator=generator).tensor_split(steps_per_epoch)
    )
    optimizer = config.make_optimizer(model)

    def step(indices: torch.Tensor) -> torch.Tensor:
        indices = indices.to(data.x_train.device)
        optimizer.zero_grad(set_to_none=True)
        losses = per_example_cross_entropy(model(data.x_train[indices]), data.y_train[indices])
        losses.mean().backward()
        optimizer.step()
        return losses.detach()

    return _train_epochs(model, data, config, batches, step, steps_per_epoch, lambda _: math.inf, "non-private", progress)


def naive_clipped_grad_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor, max_grad_norm: float) -> None:
    """The naive method: one forward and backward pass per example, clip, add into p.grad."""
    params = [p for p in model.parameters() if p.requires_grad]
    for xi, yi in zip(x.split(1), y.split(1)):
        grads = torch.autograd.grad(per_example_cross_entropy(model(xi), yi).sum(), params)
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        factor = clip_factors(norm, max_grad_norm)
        for p, g in zip(params, grads):
            p.grad = factor * g if p.grad is None else p.grad + factor * g


def _median_seconds(fn: Callable[[], None], repeats: int, warmup: int, device: str) -> float:
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    times = []
    for i in range(warmup + repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_step_times(
    model: nn.Module, data: Dataset, config: TrainConfig, repeats: int = 5, warmup: int = TRACE_AFTER_STEPS + 1
) -> dict[str, float]:
    """Median seconds of one gradient step on a batch of config.batch_size training examples, for
    the non-private step (mean loss backward), fxclip's clipped step as the run took it (compiled
    or not, `config.compile`), fxclip's eager step, and the naive per-example loop, each after
    `warmup` untimed steps (by default through the one on which the eager step traces its graph).
    Works on a copy of `model`."""
    model = copy.deepcopy(model)
    n = min(config.batch_size, len(data.x_train))
    x, y = data.x_train[:n], data.y_train[:n]

    def nonprivate() -> None:
        model.zero_grad(set_to_none=True)
        per_example_cross_entropy(model(x), y).mean().backward()

    def private_step(transform) -> Callable[[], None]:
        def step() -> None:
            model.zero_grad(set_to_none=True)
            transform.step(x, y)

        return step

    def naive() -> None:
        model.zero_grad(set_to_none=True)
        naive_clipped_grad_sum(model, x, y, config.max_grad_norm)

    eager = make_transform(model, replace(config, compile=False))
    ran = make_transform(model, config) if config.compile else eager
    methods = {"nonprivate": nonprivate, "fxclip": private_step(ran), "fxclip_eager": private_step(eager), "naive": naive}
    times = {name: _median_seconds(fn, repeats, warmup, config.device) for name, fn in methods.items()}
    return {"batch_size": n, **{f"{name}_seconds": t for name, t in times.items()}}


def plot_accuracy_vs_epsilon(private: RunHistory, nonprivate: RunHistory, title: str, path: Path) -> None:
    """Save a PNG: test accuracy against epsilon spent (private run, with the non-private final
    accuracy as a line), next to accuracy against epoch for both runs."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    left, right = fig.subplots(1, 2)
    left.plot([r.epsilon for r in private.epochs], [r.test_accuracy for r in private.epochs], "o-", label="DP-SGD (fxclip)")
    left.axhline(nonprivate.final_accuracy, color="gray", ls="--", label="non-private, final")
    left.set(xlabel="epsilon spent", ylabel="test accuracy", title="accuracy vs privacy spent")
    for history, label in ((private, "DP-SGD (fxclip)"), (nonprivate, "non-private")):
        right.plot([r.epoch for r in history.epochs], [r.test_accuracy for r in history.epochs], "o-", label=label)
    right.set(xlabel="epoch", ylabel="test accuracy", title="accuracy vs epoch")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.suptitle(title)
    fig.savefig(path, dpi=120)


def _clip_text(config: TrainConfig, private: RunHistory) -> str:
    """The clip bound as the summary gives it: C, its style unless flat, and where adaptive clipping took it."""
    text = f"{config.max_grad_norm:g}" + ("" if config.clipping == "flat" else f" {config.clipping}")
    if config.target_quantile is not None:
        text += f" adapted to quantile {config.target_quantile:g}: {private.final_max_grad_norm:.3g} at the end"
    return text


def summary_lines(config: TrainConfig, data: Dataset, plan: PrivacyPlan, private: RunHistory,
                  nonprivate: RunHistory, speed: dict[str, float]) -> list[str]:
    """The at-a-glance result of a run, one line per fact."""
    final = private.epochs[-1]
    fx, plain, naive = speed["fxclip_seconds"], speed["nonprivate_seconds"], speed["naive_seconds"]
    how = f"compiled; eager {speed['fxclip_eager_seconds'] / plain:.2f}x" if config.compile else "eager; --compile is faster"
    return [
        f"fxclip train: {config.model} on {data.name} ({len(data.x_train)} train / {len(data.x_test)} test examples), "
        f"{config.epochs} epochs of {plan.steps_per_epoch} steps, expected batch {config.batch_size}",
        f"  privacy : (epsilon = {final.epsilon:.2f}, delta = {plan.delta:g}) spent of target epsilon {config.epsilon:g} "
        f"[{plan.accountant.upper()} accountant; noise multiplier {plan.noise_multiplier:.3f}, clip {_clip_text(config, private)}, "
        f"sampling rate {plan.sampling_rate:.4f}]",
        f"  accuracy: {final.test_accuracy:.1%} private   vs   {nonprivate.final_accuracy:.1%} non-private (same model, data, epochs)",
        f"  speed   : {final.examples_per_second:.0f} examples/s private training; one step on batch {speed['batch_size']}: "
        f"non-private {plain * 1e3:.2f} ms, fxclip {fx * 1e3:.2f} ms, naive per-example loop {naive * 1e3:.1f} ms",
        f"            fxclip costs {fx / plain:.2f}x the non-private step ({how}) and is {naive / fx:.1f}x faster than the naive method",
    ]


def check_output_dir(out_dir: Path) -> None:
    """Raise ValueError, before any training, if `out_dir` cannot be created or written to."""
    existing = next(p for p in (out_dir, *out_dir.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"cannot write to {out_dir}: {existing} is a file, not a directory; choose another --out.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write to {out_dir}: directory {existing} is not writable; choose another --out.")


def run_training_job(config: TrainConfig, data_path: str | None = None, out: str | None = None,
                     progress: bool = True) -> dict:
    """The whole `fxclip train` job; returns the metrics written to <out>/metrics.json."""
    config.validate()
    out_dir = Path(out or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))
    check_output_dir(out_dir)
    data = load_dataset(data_path or config.dataset, seed=config.seed)
    data = Dataset(data.name, *(t.to(config.device) for t in (data.x_train, data.y_train, data.x_test, data.y_test)),
                   data.num_classes)
    torch.manual_seed(config.seed)
    model = build_model(config.model, data).to(config.device)
    initial_state = copy.deepcopy(model.state_dict())

    private, plan = train_private(model, data, config, progress)
    baseline_model = build_model(config.model, data).to(config.device)
    baseline_model.load_state_dict(initial_state)
    nonprivate = train_nonprivate(baseline_model, data, config, progress)
    speed = measure_step_times(model, data, config)

    metrics = {
        "config": asdict(config) | {"data": data.name},
        "privacy": asdict(plan) | {"epsilon_spent": private.epochs[-1].epsilon},
        "private": {"final_test_accuracy": private.final_accuracy, "train_seconds": private.train_seconds,
                    "final_max_grad_norm": private.final_max_grad_norm,
                    "epochs": [asdict(r) for r in private.epochs]},
        "nonprivate": {"final_test_accuracy": nonprivate.final_accuracy, "train_seconds": nonprivate.train_seconds,
                       "epochs": [asdict(r) | {"epsilon": None} for r in nonprivate.epochs]},
        "step_speed": speed | {"fxclip_over_nonprivate": speed["fxclip_seconds"] / speed["nonprivate_seconds"],
                               "naive_over_fxclip": speed["naive_seconds"] / speed["fxclip_seconds"]},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_accuracy_vs_epsilon(private, nonprivate, f"{config.model} on {data.name}, DP-SGD vs non-private",
                             out_dir / "accuracy_vs_epsilon.png")
    for line in summary_lines(config, data, plan, private, nonprivate, speed):
        print(line)
    print(f"  wrote   : {out_dir / 'metrics.json'}, {out_dir / 'accuracy_vs_epsilon.png'}")
    return metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `fxclip train` options."""
    d = TrainConfig()
    parser.add_argument("--model", default=d.model, choices=sorted(MODEL_BUILDERS), help="zoo model (default %(default)s)")
    parser.add_argument("--dataset", default=d.dataset, choices=BUILTIN_DATASETS, help="built-in data set (default %(default)s)")
    parser.add_argument("--data", metavar="PATH", help="your own .pt/.npz file with x, y [, x_test, y_test]; overrides --dataset")
    parser.add_argument("--epsilon", type=float, default=d.epsilon, help="target epsilon (default %(default)s)")
    parser.add_argument("--delta", type=float, default=d.delta, help="delta (default %(default)s)")
    parser.add_argument("--epochs", type=int, default=d.epochs, help="default %(default)s")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="expected Poisson batch size (default %(default)s)")
    parser.add_argument("--physical-batch-size", type=int, default=d.physical_batch_size,
                        help="most examples processed at once; larger batches are accumulated (default %(default)s)")
    parser.add_argument("--max-grad-norm", "--clip", type=float, default=d.max_grad_norm, help="clip bound C (default %(default)s)")
    parser.add_argument("--clipping", default=d.clipping, choices=CLIPPING_STYLES,
                        help="clipping style: flat, per_layer (C/sqrt(K) per parameter) or automatic (default %(default)s)")
    parser.add_argument("--target-quantile", type=float, default=d.target_quantile, metavar="Q",
                        help="adaptive clipping (Andrew et al.): C follows the Q-quantile of the gradient norms (flat only)")
    parser.add_argument("--lr", type=float, default=d.lr, help="learning rate (default %(default)s)")
    parser.add_argument("--optimizer", default=d.optimizer, choices=sorted(OPTIMIZERS), help="default %(default)s")
    parser.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum (default %(default)s)")
    parser.add_argument("--accountant", default=d.accountant, choices=ACCOUNTANTS, help="default %(default)s")
    parser.add_argument("--secure-noise", action="store_true", help="draw noise from the OS's cryptographically secure source")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=d.compile,
                        help="compile the private step (default; the first step takes seconds longer)")
    parser.add_argument("--device", default=d.device, help="default %(default)s")
    parser.add_argument("--seed", type=int, default=d.seed, help="default %(default)s")
    parser.add_argument("--out", metavar="DIR", help="output directory (default runs/<timestamp>)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or per-epoch lines")


def run(args: argparse.Namespace) -> int:
    """Run `fxclip train` with parsed arguments."""
    fields = TrainConfig.__dataclass_fields__
    config = TrainConfig(**{name: getattr(args, name) for name in fields})
    run_training_job(config, data_path=args.data, out=args.out, progress=not args.no_progress)
    return 0
