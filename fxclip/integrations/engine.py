"""`fxclip.PrivacyEngine`: an unchanged PyTorch training loop made private, with Opacus's names.

    engine = fxclip.PrivacyEngine()
    module, optimizer, criterion, data_loader = engine.make_private(
        module=model, optimizer=opt, data_loader=loader, criterion=nn.CrossEntropyLoss(),
        noise_multiplier=1.0, max_grad_norm=1.0)
    for x, y in data_loader:
        optimizer.zero_grad(); loss = criterion(module(x), y); loss.backward(); optimizer.step()
    engine.get_epsilon(1e-5)

fxclip's step runs the forward and the backward together (`PrivateStep.step`), so the loop's
three calls share one of each: with gradients on and in training mode `module(x)` runs nothing
and returns a `PendingOutput` that records x; `criterion(output, y)` runs the private step on
(x, y) once, keeps the clipped sums Σ_i clip_i ∇θ L_i aside (the parameters' .grad stays as it
was) and returns the batch's loss; `loss.backward()` adds the clipped sums into .grad (through
autograd, as any backward accumulates); `optimizer.step()` adds the noise, divides by the
expected batch size and steps (`fxclip.dp.optim.PrivateOptimizer`). See docs/migration.md.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable

import torch
import torch.utils._pytree as pytree
from torch import nn

from fxclip.api import PrivateStep, transform
from fxclip.checks import check_integer, check_number
from fxclip.dp.accounting import ACCOUNTANTS, check_delta, epsilon_spent, noise_multiplier_for_epsilon
from fxclip.dp.optim import PrivateOptimizer
from fxclip.dp.sampling import poisson_data_loader
from fxclip.errors import FxclipError

REDUCTIONS = ("mean", "sum")
# DataLoader keywords the Poisson loader keeps from the given one (the sampling is replaced)
_LOADER_OPTIONS = ("num_workers", "pin_memory", "timeout", "worker_init_fn", "multiprocessing_context", "persistent_workers")


class PerExampleLoss:
    """A criterion with reduction "mean" or "sum" as `loss_fn(output, target) -> [B]`: the same
    loss with reduction "none", reduced over every dim but the batch the way the criterion
    reduces (so the criterion's "mean" is the mean of these, its "sum" their sum).

    With an `ignore_index` (cross-entropy, NLL) and "mean", an example's loss is the mean over its
    own counted targets; the batch's mean of those differs from the criterion's mean over all
    counted targets when examples count different numbers."""

    def __init__(self, criterion: Callable):
        if isinstance(criterion, nn.Module) and hasattr(criterion, "reduction"):
            self.reduction = criterion.reduction
            self.unreduced = copy.copy(criterion)  # shares the criterion's parameters and buffers (weights)
            self.unreduced.reduction = "none"
            self.ignore_index = getattr(criterion, "ignore_index", None)
        elif callable(criterion) and not isinstance(criterion, nn.Module) and "reduction" in _parameters(criterion):
            self.reduction = _parameters(criterion)["reduction"].default
            self.unreduced = functools.partial(criterion, reduction="none")
            ignore = _parameters(criterion).get("ignore_index")
            self.ignore_index = None if ignore is None else ignore.default
        else:
            raise FxclipError(
                f"criterion {_name(criterion)} has no `reduction` fxclip can set to 'none', so its per-example losses "
                "are unknown (a custom mean over a subset of the elements cannot be undone). Pass a torch loss module "
                "(nn.CrossEntropyLoss(), nn.MSELoss(), ...) or a function with a `reduction` keyword "
                "(F.cross_entropy), or write the loss as a module with one."
            )
        if self.reduction not in REDUCTIONS:
            raise FxclipError(
                f"criterion {_name(criterion)} has reduction {self.reduction!r}; the loop's loss.backward() needs one "
                f"number per batch: use reduction 'mean' or 'sum' (fxclip takes the per-example losses itself)."
            )
        weight = getattr(criterion, "weight", None)
        if self.reduction == "mean" and isinstance(criterion, (nn.CrossEntropyLoss, nn.NLLLoss)) and weight is not None:
            raise FxclipError(
                f"criterion {_name(criterion)} has class weights and reduction 'mean': it divides by the batch's total "
                "weight, which mixes examples, so its per-example losses are not defined. Use reduction 'sum' (the "
                "optimizer divides by the expected batch size anyway) or no class weights."
            )

    def __call__(self, output, target):
        losses = self.unreduced(output, target)
        if not isinstance(losses, torch.Tensor) or losses.dim() == 0:
            raise FxclipError(
                "the criterion with reduction='none' still returned one number for the batch, so fxclip cannot get "
                "per-example losses from it; pass a loss that honours `reduction`."
            )
        if losses.dim() == 1:
            return losses
        losses = losses.flatten(1)
        if self.reduction == "sum":
            return losses.sum(1)
        if self.ignore_index is not None and not target.is_floating_point() and target.shape == losses.shape:
            counted = (target != self.ignore_index).flatten(1).sum(1)
            return losses.sum(1) / counted.clamp(min=1)
        return losses.mean(1)

    def reduce(self, losses: torch.Tensor) -> torch.Tensor:
        """The batch's loss from its per-example losses, as the criterion reduces (0 for no example)."""
        if losses.numel() == 0:
            return losses.new_zeros(())
        return losses.mean() if self.reduction == "mean" else losses.sum()


def _parameters(fn) -> dict:
    try:
        return dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # a builtin without a signature
        return {}


def _name(obj) -> str:
    return getattr(obj, "__name__", None) or type(obj).__name__


class PendingOutput:
    """What the private module returns in training with gradients on: the inputs, kept for the
    private criterion, which runs forward and backward together on them. It is no tensor: any
    other use is an error that says what to do instead."""

    __slots__ = ("inputs", "module")

    def __init__(self, module: PrivateModule, inputs: tuple):
        self.module, self.inputs = module, inputs

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        raise FxclipError(_PENDING_USE.format(what=f"passed to {getattr(func, '__name__', func)}"))

    def __getattr__(self, name):
        if name.startswith("__"):  # protocol probes (copy, pickle, hasattr checks) get the usual answer
            raise AttributeError(name)
        raise FxclipError(_PENDING_USE.format(what=f"asked for .{name}"))

    def __repr__(self) -> str:
        return f"PendingOutput(batch of {len(self.inputs)} input(s); for the private criterion)"


_PENDING_USE = (
    "the private module's output in training ({what}) is a placeholder that only the private criterion takes: "
    "fxclip runs the forward and the backward together there, once per batch. To use the output itself "
    "(predictions, accuracy), run the module under torch.no_grad() (or in eval() mode under no_grad); the last "
    "step's per-example losses and norms are criterion.last_result."
)


class PrivateModule(nn.Module):
    """The model made private (Opacus's GradSampleModule's place; the model is `._module`).

    In training mode with gradients on, `forward` returns a `PendingOutput` for the private
    criterion and runs nothing; otherwise (eval() mode, torch.no_grad()) it runs the model."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self._module = module

    def forward(self, *inputs, **kwargs):
        if not (self.training and torch.is_grad_enabled()):
            return self._module(*inputs, **kwargs)
        if kwargs:
            raise FxclipError(
                f"the private module takes its inputs by position in training (fxclip's step gets a tuple of inputs), "
                f"got keywords {sorted(kwargs)}; pass them positionally in the order of the model's forward."
            )
        return PendingOutput(self, inputs)


class _AddClippedSums(torch.autograd.Function):
    """The batch's loss, whose backward hands each parameter its clipped sum, which autograd then
    accumulates into .grad."""

    @staticmethod
    def forward(ctx, loss, clipped_sums, *params):
        ctx.clipped_sums = clipped_sums
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        if float(grad_loss) != 1.0:
            raise FxclipError(
                f"loss.backward() reached the private loss with gradient {float(grad_loss):g}, not 1: the loss was "
                "scaled (loss * k, loss / accumulation_steps). Per-example clipping comes before any scale, so a scaled "
                "loss has no private meaning: call backward on the criterion's loss itself; to accumulate batches, call "
                "it once per batch before optimizer.step(), or set max_physical_batch_size."
            )
        return (None, None, *ctx.clipped_sums)


class PrivateCriterion:
    """The criterion made private: on the private module's `PendingOutput` it runs fxclip's step
    (one forward and one backward) and returns the batch's loss, whose backward adds the clipped
    sums into .grad; on a plain output (evaluation, no gradients) it is the criterion itself."""

    def __init__(self, criterion: Callable, per_example: PerExampleLoss, step: PrivateStep, module: PrivateModule):
        self.criterion, self.per_example, self.step, self.module = criterion, per_example, step, module
        self.last_result = None  # the StepResult of the last private step: per-example losses, norms, clip factors

    def __call__(self, output, target):
        if isinstance(output, PendingOutput):
            if output.module is not self.module:
                raise FxclipError("this output comes from another private module than the criterion's: use the pair make_private returned")
            return self._private_loss(output.inputs, target)
        if isinstance(output, torch.Tensor) and output.requires_grad:
            raise FxclipError(
                "the criterion got an output that requires grad but did not come from the private module in training mode "
                "(an eval() module with gradients on, or the model called directly): its backward would not be private. "
                "Train in module.train() mode; evaluate under torch.no_grad()."
            )
        return self.criterion(output, target)

    def _private_loss(self, inputs: tuple, target) -> torch.Tensor:
        params = [p for p in self.module.parameters() if p.requires_grad]
        result, clipped_sums = clipped_sums_aside(self.step, inputs, target, params)
        self.last_result = result
        return _AddClippedSums.apply(self.per_example.reduce(result.losses), clipped_sums, *params)


def clipped_sums_aside(step: PrivateStep, inputs: tuple, target, params: list) -> tuple:
    """(StepResult, [clipped sum per param]) of `step` on the batch, with every param's .grad as
    it was: the step writes into .grad, so .grad is swapped out around it (no copy)."""
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        result = step.step(inputs, target)
        return result, [p.grad for p in params]
    finally:
        for p, grad in zip(params, grads):
            p.grad = grad


class DPOptimizer(torch.optim.Optimizer):
    """The optimizer made private: `step()` noises the clipped sums, divides them by the expected
    batch size and takes the wrapped optimizer's step (`PrivateOptimizer`); `steps` counts them.

    A torch Optimizer (LR schedulers take it) whose param groups and state are the wrapped
    optimizer's own, so a schedule set on either is the other's. `Optimizer.__init__` is not
    called: it would copy the groups."""

    def __init__(self, private: PrivateOptimizer):
        self.private = private
        self.original_optimizer = private.optimizer
        self.steps = 0

    param_groups = property(lambda self: self.original_optimizer.param_groups)
    state = property(lambda self: self.original_optimizer.state)
    defaults = property(lambda self: self.original_optimizer.defaults)

    @property
    def noise_multiplier(self) -> float:
        return self.private.noise_multiplier

    @property
    def expected_batch_size(self) -> float:
        return self.private.expected_batch_size

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.original_optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        if closure is not None:
            raise FxclipError("the private optimizer takes no closure: the clipped sums come from loss.backward() before step()")
        self.private.step()
        self.steps += 1

    def state_dict(self) -> dict:
        return self.original_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.original_optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict) -> None:
        raise FxclipError("add parameter groups before make_private: the private step was planned for the module's parameters")

    def __repr__(self) -> str:
        return f"DPOptimizer(noise_multiplier={self.noise_multiplier:g}, expected_batch_size={self.expected_batch_size:g}, {self.original_optimizer!r})"


class PrivacyEngine:
    """Opacus's `PrivacyEngine`, by fxclip: `make_private` (or `make_private_with_epsilon`) turns a
    module, optimizer, data loader and criterion into private ones for an unchanged training loop;
    `get_epsilon(delta)` is the privacy spent by the optimizer's steps so far.

    `accountant` is "pld" (default, tighter) or "rdp" (fxclip.dp.accounting); `secure_mode=True`
    draws the noise from the OS's CSPRNG. One engine makes one model private."""

    def __init__(self, accountant: str = "pld", secure_mode: bool = False):
        if accountant not in ACCOUNTANTS:
            raise FxclipError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
        self.accountant, self.secure_mode = accountant, secure_mode
        self.optimizer: DPOptimizer | None = None
        self.sampling_rate: float | None = None

    def make_private(
        self, *, module: nn.Module, optimizer: torch.optim.Optimizer, data_loader: torch.utils.data.DataLoader,
        criterion: Callable, noise_multiplier: float, max_grad_norm: float, noise_generator: torch.Generator | None = None,
        **step_options,
    ) -> tuple[PrivateModule, DPOptimizer, PrivateCriterion, torch.utils.data.DataLoader]:
        """(module, optimizer, criterion, data_loader) for DP-SGD with noise multiplier sigma and
        clip bound C. The loader yields Poisson batches whose expected size is its batch_size, as
        many per epoch as it had batches. `step_options` go to `fxclip.transform` (compile,
        max_physical_batch_size, strategy, batch_dims, ...). Bad input raises FxclipError here and
        changes nothing."""
        if self.optimizer is not None:
            raise FxclipError("this PrivacyEngine already made a model private (its epsilon counts those steps): use a new engine")
        if not isinstance(module, nn.Module):
            raise FxclipError(f"module must be a torch.nn.Module, got a {type(module).__name__}")
        noise_multiplier = check_number("noise_multiplier", noise_multiplier, at_least=0, hint="It is sigma (0: no noise).", error=FxclipError)
        if self.secure_mode and noise_generator is not None:
            raise FxclipError("secure_mode draws noise from the OS and cannot be seeded: pass noise_generator=None")
        dataset, batch_size = _resampleable(data_loader)
        _check_optimizer(optimizer, module)
        per_example = PerExampleLoss(criterion)
        step = transform(module, per_example, max_grad_norm, **step_options)
        private_module = PrivateModule(module)
        private_criterion = PrivateCriterion(criterion, per_example, step, private_module)
        try:
            private = PrivateOptimizer(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=step.max_grad_norm,
                                       expected_batch_size=batch_size, secure_noise=self.secure_mode, generator=noise_generator)
        except ValueError as e:  # SparseAdam
            raise FxclipError(str(e)) from e
        _trial_step(step, data_loader, dataset, module)
        loader = poisson_data_loader(dataset, batch_size, len(data_loader), data_loader.collate_fn,
                                     **{k: getattr(data_loader, k) for k in _LOADER_OPTIONS})
        self.optimizer, self.sampling_rate = DPOptimizer(private), batch_size / len(dataset)
        return private_module, self.optimizer, private_criterion, loader

    def make_private_with_epsilon(
        self, *, module: nn.Module, optimizer: torch.optim.Optimizer, data_loader: torch.utils.data.DataLoader,
        criterion: Callable, target_epsilon: float, target_delta: float, epochs: int, max_grad_norm: float, **options,
    ) -> tuple[PrivateModule, DPOptimizer, PrivateCriterion, torch.utils.data.DataLoader]:
        """`make_private` with the least noise multiplier that keeps epsilon <= target_epsilon at
        target_delta after `epochs` epochs of the loader's number of batches."""
        epochs = check_integer("epochs", epochs, at_least=1, error=FxclipError)
        dataset, batch_size = _resampleable(data_loader)
        try:
            sigma = noise_multiplier_for_epsilon(target_epsilon, batch_size / len(dataset), epochs * len(data_loader),
                                                 target_delta, self.accountant)
        except ValueError as e:
            raise FxclipError(str(e)) from e
        return self.make_private(module=module, optimizer=optimizer, data_loader=data_loader, criterion=criterion,
                                 noise_multiplier=sigma, max_grad_norm=max_grad_norm, **options)

    def get_epsilon(self, delta: float) -> float:
        """Epsilon spent by the private optimizer's steps so far, at `delta`."""
        delta = check_delta(delta)
        if self.optimizer is None:
            return 0.0
        return epsilon_spent(self.optimizer.noise_multiplier, self.sampling_rate, self.optimizer.steps, delta, self.accountant)


def _resampleable(loader) -> tuple:
    """(dataset, batch size) of a DataLoader that Poisson sampling can draw from; FxclipError if not."""
    if not isinstance(loader, torch.utils.data.DataLoader):
        raise FxclipError(f"data_loader must be a torch.utils.data.DataLoader, got a {type(loader).__name__}")
    if loader.batch_size is None:
        raise FxclipError("the data loader has no batch_size (it was given a batch_sampler): pass batch_size=B, the expected Poisson batch size")
    check_resampleable(loader.dataset, loader.batch_size, "the data loader's dataset", "batch_size")
    return loader.dataset, loader.batch_size


def check_resampleable(dataset, batch_size: int, what: str, batch_name: str) -> None:
    """FxclipError unless Poisson batches of expected size `batch_size` can be drawn from `dataset`."""
    if isinstance(dataset, torch.utils.data.IterableDataset) or not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise FxclipError(
            f"{what} ({type(dataset).__name__}) cannot be resampled: Poisson sampling, which the privacy accounting assumes, "
            "draws examples by index, so it needs a map-style dataset with __len__ and __getitem__ (not an IterableDataset)."
        )
    if len(dataset) == 0:
        raise FxclipError(f"{what} is empty: there is nothing to train on")
    if not 1 <= batch_size <= len(dataset):
        raise FxclipError(f"{batch_name} {batch_size} must be between 1 and the {len(dataset)} examples of {what}")


def _check_optimizer(optimizer, module: nn.Module) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise FxclipError(f"optimizer must be a torch.optim.Optimizer over the module's parameters, got a {type(optimizer).__name__}")
    own = {id(p) for p in module.parameters()}
    foreign = [p for group in optimizer.param_groups for p in group["params"] if id(p) not in own]
    if foreign:
        raise FxclipError(
            f"{len(foreign)} of the optimizer's parameters (shapes {[tuple(p.shape) for p in foreign[:3]]}...) are not the "
            "module's: build the optimizer from module.parameters() of the module you make private"
        )


def _trial_step(step: PrivateStep, loader, dataset, module: nn.Module) -> None:
    """fxclip's step on the first two examples, with every .grad as it was after it: the model and
    the criterion fail here, at make_private, if they cannot be made private (also a criterion
    that ignores reduction='none'). Only for batches that are (inputs..., target) sequences; on
    the module's device, where the loop moves its batches."""
    batch = loader.collate_fn([dataset[i] for i in range(min(2, len(dataset)))])
    device = next((p.device for p in module.parameters()), None)
    batch = pytree.tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) and device is not None else x, batch)
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        clipped_sums_aside(step, tuple(batch[:-1]), batch[-1], [p for p in module.parameters() if p.requires_grad])
