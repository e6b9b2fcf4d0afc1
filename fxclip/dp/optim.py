"""The private optimizer step of DP-SGD: noise the clipped gradient sum, average, then step.

`fxclip.transform(...).step` accumulates into each `p.grad` the sum over examples of the clipped
per-example gradients. `PrivateOptimizer.step` then adds Gaussian noise of standard deviation
sigma*C to that sum, divides by the expected batch size, and lets any torch optimizer (SGD, Adam,
AdamW, ...) take its step. Calling `transform.step` on several physical batches before one
`PrivateOptimizer.step` is gradient accumulation: clipped per example, noised once.

The noised gradient is dense, also where the clipped sum is sparse (an nn.Embedding(sparse=True)):
the noise goes on every coordinate, since noise on only the rows a batch touched would reveal which
rows those are. So an optimizer that takes only sparse gradients (torch.optim.SparseAdam) is
refused; torch.optim.Adam makes the same update from dense ones.

Adaptive clipping (`AdaptiveClipping`, Andrew et al. 2021): the bound C follows a target quantile
of the per-example norms, from a noised count of the examples it left unclipped; the gradient's
noise is raised so that the step's total privacy cost is that of the stated noise multiplier
(`fxclip.accounting.adaptive_clipping_noise_multiplier`).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from fxclip.checks import check_number

from .accounting import adaptive_clipping_noise_multiplier


def secure_standard_normal(shape: torch.Size | tuple, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Standard normal samples from the operating system's CSPRNG (os.urandom), by Box-Muller.

    Uniforms have 53 random bits (float64), so the sampler is unpredictable and not seedable, unlike
    torch's Mersenne-Twister/Philox generators.
    """
    n = math.prod(shape)
    bits = np.frombuffer(os.urandom(16 * ((n + 1) // 2)), dtype=np.uint64) >> np.uint64(11)
    u1, u2 = np.split((bits.astype(np.float64) + 1.0) * 2.0**-53, 2)  # both in (0, 1]
    radius = np.sqrt(-2.0 * np.log(u1))
    normals = np.concatenate([radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)])[:n]
    return torch.from_numpy(normals).reshape(shape).to(device=device, dtype=dtype)


def gaussian_noise(
    like: torch.Tensor, std: float, *, secure: bool = False, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Gaussian noise with mean 0 and standard deviation `std`, shaped like `like`.

    secure=True draws from the OS's cryptographically secure source (`generator` must be None);
    otherwise from torch's generator (`generator`, or the global one for `like`'s device).
    """
    if secure:
        if generator is not None:
            raise ValueError("secure noise cannot be seeded: pass generator=None with secure=True.")
        return std * secure_standard_normal(like.shape, like.dtype, like.device)
    return torch.normal(0.0, std, like.shape, generator=generator, dtype=like.dtype, device=like.device)


class PrivateOptimizer:
    """Wraps a torch optimizer so that its step is the DP-SGD step on clipped gradient sums.

    Args:
        optimizer: any torch.optim optimizer over the model's parameters.
        noise_multiplier: sigma; the noise added to each clipped sum has std sigma * max_grad_norm.
        max_grad_norm: C, the clip bound used by the transform (its `sensitivity`, sqrt(Σ_j C_j²),
            for per_layer clipping: what one example can move the clipped sum by).
        expected_batch_size: q*N, the divisor of the noisy sum (fixed, not the drawn batch size,
            so that the divisor reveals nothing about the batch).
        secure_noise: draw noise from the OS's cryptographically secure source.
        generator: torch.Generator for reproducible (non-secure) noise.
        adaptive_clipping: an `AdaptiveClipping` of the transform: the bound C is then its
            current one (leave max_grad_norm out), the gradient's noise multiplier is
            `gradient_noise_multiplier` (a bit above noise_multiplier, which stays the one to
            account), and each step ends by moving C towards the target quantile.

    Which parameters a step trains is read at that step, so freezing or unfreezing parameters
    between steps (gradual unfreezing) is safe: every parameter of the wrapped optimizer that
    requires grad gets noise and the division by q*N (a missing .grad counts as a zero sum, so the
    step does not reveal which parameters a batch touched), and every frozen one has its .grad
    cleared, so the wrapped optimizer leaves it alone. No parameter is ever stepped without noise.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        noise_multiplier: float,
        max_grad_norm: float | None = None,
        expected_batch_size: float,
        secure_noise: bool = False,
        generator: torch.Generator | None = None,
        adaptive_clipping: AdaptiveClipping | None = None,
    ):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(
                f"optimizer must be a torch.optim.Optimizer over the model's parameters, got {type(optimizer).__name__}; "
                "e.g. PrivateOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), ...)."
            )
        if isinstance(optimizer, torch.optim.SparseAdam):
            raise ValueError(
                "SparseAdam takes only sparse gradients, but the private gradient is dense: DP noise goes on "
                "every coordinate (noise on only the rows a batch touched would reveal which rows those are). "
                "Use torch.optim.Adam, which makes the same update from dense gradients."
            )
        noise_multiplier = check_number(
            "noise_multiplier", noise_multiplier, at_least=0,
            hint="It is sigma, the noise std in units of the clip bound (0: no noise, no privacy).",
        )
        if adaptive_clipping is None:
            max_grad_norm = check_number(
                "max_grad_norm", max_grad_norm, above=0,
                hint="Pass the transform's clip bound C (its `sensitivity` for per_layer clipping).",
            )
        elif not isinstance(adaptive_clipping, AdaptiveClipping):
            raise ValueError(f"adaptive_clipping must be an AdaptiveClipping, got {type(adaptive_clipping).__name__}")
        elif max_grad_norm is not None:
            raise ValueError("with adaptive_clipping the bound is adaptive_clipping's current one: leave max_grad_norm out")
        expected_batch_size = check_number(
            "expected_batch_size", expected_batch_size, above=0,
            hint="It is q*N, the sampling rate times the number of training examples.",
        )
        if secure_noise and generator is not None:
            raise ValueError("secure noise cannot be seeded: pass generator=None with secure_noise=True.")
        self.optimizer = optimizer
        self.noise_multiplier = noise_multiplier
        self.adaptive_clipping = adaptive_clipping
        self.gradient_noise_multiplier = (
            noise_multiplier if adaptive_clipping is None
            else adaptive_clipping_noise_multiplier(noise_multiplier, adaptive_clipping.count_noise_std)
        )
        self._max_grad_norm = max_grad_norm
        self.expected_batch_size = expected_batch_size
        self.secure_noise = secure_noise
        self.generator = generator
        self._noised_count: torch.Tensor | None = None  # adaptive: this step's noised unclipped count

    @property
    def max_grad_norm(self) -> float:
        """C, the bound the clipped sums were made with (adaptive clipping's current one)."""
        return self.adaptive_clipping.max_grad_norm if self.adaptive_clipping is not None else self._max_grad_norm

    @max_grad_norm.setter
    def max_grad_norm(self, value: float) -> None:
        if self.adaptive_clipping is not None:
            raise ValueError("with adaptive_clipping the bound is adaptive_clipping's: it moves it")
        self._max_grad_norm = check_number("max_grad_norm", value, above=0, hint="Pass the transform's clip bound C.")

    @property
    def params(self) -> list[torch.Tensor]:
        """The parameters a step trains: those of the wrapped optimizer that require grad now."""
        return [p for group in self.optimizer.param_groups for p in group["params"] if p.requires_grad]

    @property
    def noise_std(self) -> float:
        """sigma * C (sigma_grad * C under adaptive clipping), the standard deviation of the noise
        added to each clipped gradient sum."""
        return self.gradient_noise_multiplier * self.max_grad_norm

    def zero_grad(self) -> None:
        """Clear the accumulated clipped sums (sets p.grad to None)."""
        self.optimizer.zero_grad(set_to_none=True)

    def clipped_sums(self) -> list[torch.Tensor]:
        """Each trained parameter's clipped sum as a dense tensor (None counts as 0; a sparse sum is
        made dense, as the noise will be)."""
        return [torch.zeros_like(p) if p.grad is None else p.grad if p.grad.layout == torch.strided else p.grad.to_dense() for p in self.params]

    def add_noise_and_average(self) -> None:
        """Replace each p.grad (clipped sum; None counts as 0) by (sum + N(0, (sigma C)^2)) / (q N),
        dense (module docstring)."""
        for p, grad in zip(self.params, self.clipped_sums()):
            if self.noise_std > 0:
                grad = grad + gaussian_noise(grad, self.noise_std, secure=self.secure_noise, generator=self.generator)
            p.grad = grad / self.expected_batch_size
        if self.adaptive_clipping is not None:
            count = self.adaptive_clipping.take_count()
            self._noised_count = count + self._count_noise(count)

    def _count_noise(self, like: torch.Tensor) -> torch.Tensor:
        """N(0, sigma_b^2) for adaptive clipping's unclipped count, from the gradient noise's source."""
        return gaussian_noise(like, self.adaptive_clipping.count_noise_std, secure=self.secure_noise, generator=self.generator)

    def _drop_frozen_grads(self) -> None:
        """Clear the .grad of every frozen parameter of the wrapped optimizer, which would otherwise
        step it (torch optimizers step each parameter that has a .grad) without noise."""
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if not p.requires_grad:
                    p.grad = None

    def step(self) -> None:
        """Noise and average the accumulated clipped sums, then take the wrapped optimizer's step."""
        self._drop_frozen_grads()
        self.add_noise_and_average()
        self.optimizer.step()
        if self.adaptive_clipping is not None:  # C for the next step, after this one's noise used this C
            self.adaptive_clipping.update(self._noised_count)
            self._noised_count = None


class AdaptiveClipping:
    """The clip bound follows a target quantile of the per-example gradient norms (Andrew et al.
    2021, "Differentially Private Learning with Adaptive Clipping"), for flat clipping.

    Made on a transform (`fxclip.transform(...)`, clipping="flat"), it counts after every
    `transform.step` the examples whose norm was at most C (a step hook), centred: Σ_i (b_i - 1/2).
    `PrivateOptimizer(..., adaptive_clipping=this)` noises that count once per step with std
    sigma_b = `count_noise_std`, and then `update` sets

        b~ = noised count / expected_batch_size + 1/2,   C <- C * exp(-learning_rate * (b~ - target_quantile))

    on the transform (geometric update: C grows while more than the target fraction is unclipped).
    The optimizer raises the gradient's noise multiplier so the step's privacy is that of its
    stated noise multiplier (`fxclip.accounting.adaptive_clipping_noise_multiplier`), which is the
    one to account. Defaults are the paper's: learning_rate 0.2, sigma_b = expected batch size / 20.
    """

    def __init__(
        self,
        transform,
        *,
        target_quantile: float,
        expected_batch_size: float,
        learning_rate: float = 0.2,
        count_noise_std: float | None = None,
    ):
        if not hasattr(transform, "register_step_hook"):
            raise ValueError(f"AdaptiveClipping needs the transform (fxclip.transform(...)), got a {type(transform).__name__}")
        style = transform.options.clipping
        if style != "flat":
            raise ValueError(
                f'adaptive clipping moves one bound C, for clipping="flat"; this transform clips "{style}" '
                "(automatic clipping has no bound to adapt; per_layer has one per group)"
            )
        self.target_quantile = check_number(
            "target_quantile", target_quantile, at_least=0, at_most=1,
            hint="It is the fraction of examples the bound should leave unclipped, e.g. 0.5.",
        )
        self.expected_batch_size = check_number(
            "expected_batch_size", expected_batch_size, above=0, hint="It is q*N, the sampling rate times the number of training examples."
        )
        self.learning_rate = check_number("learning_rate", learning_rate, above=0, hint="It is eta_C of the geometric update, e.g. 0.2.")
        self.count_noise_std = check_number(
            "count_noise_std", expected_batch_size / 20 if count_noise_std is None else count_noise_std, above=0,
            hint="It is sigma_b, the noise std of the unclipped count (default expected batch size / 20).",
        )
        self.transform = transform
        self._count: torch.Tensor | None = None  # on the norms' device: counting does not synchronize
        self.handle = transform.register_step_hook(self._observe)

    @property
    def max_grad_norm(self) -> float:
        """The current bound C (the transform's)."""
        return self.transform.max_grad_norm

    def _observe(self, result) -> None:
        centred = (result.norms <= self.max_grad_norm).sum(dtype=torch.float64) - 0.5 * result.norms.shape[0]
        self._count = centred if self._count is None else self._count + centred.to(self._count.device)

    def take_count(self) -> torch.Tensor:
        """Σ_i (1[‖g_i‖ <= C] - 1/2) over the examples stepped since the last call (0-d float64), and reset."""
        count, self._count = self._count, None
        return torch.zeros((), dtype=torch.float64) if count is None else count

    def update(self, noised_count: torch.Tensor | float) -> float:
        """C <- C exp(-learning_rate (b~ - target_quantile)) from the noised centred count; returns
        b~, the noised fraction of unclipped examples."""
        fraction = float(noised_count) / self.expected_batch_size + 0.5
        self.transform.max_grad_norm = self.max_grad_norm * math.exp(-self.learning_rate * (fraction - self.target_quantile))
        return fraction
