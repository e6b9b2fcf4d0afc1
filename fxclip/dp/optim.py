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
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from fxclip.checks import check_number


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
        max_grad_norm: C, the clip bound used by the transform.
        expected_batch_size: q*N, the divisor of the noisy sum (fixed, not the drawn batch size,
            so that the divisor reveals nothing about the batch).
        secure_noise: draw noise from the OS's cryptographically secure source.
        generator: torch.Generator for reproducible (non-secure) noise.

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
        max_grad_norm: float,
        expected_batch_size: float,
        secure_noise: bool = False,
        generator: torch.Generator | None = None,
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
        max_grad_norm = check_number("max_grad_norm", max_grad_norm, above=0, hint="Pass the transform's clip bound C.")
        expected_batch_size = check_number(
            "expected_batch_size", expected_batch_size, above=0,
            hint="It is q*N, the sampling rate times the number of training examples.",
        )
        if secure_noise and generator is not None:
            raise ValueError("secure noise cannot be seeded: pass generator=None with secure_noise=True.")
        self.optimizer = optimizer
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.expected_batch_size = expected_batch_size
        self.secure_noise = secure_noise
        self.generator = generator

    @property
    def params(self) -> list[torch.Tensor]:
        """The parameters a step trains: those of the wrapped optimizer that require grad now."""
        return [p for group in self.optimizer.param_groups for p in group["params"] if p.requires_grad]

    @property
    def noise_std(self) -> float:
        """sigma * C, the standard deviation of the noise added to each clipped gradient sum."""
        return self.noise_multiplier * self.max_grad_norm

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
