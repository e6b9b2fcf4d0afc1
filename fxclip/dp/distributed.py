"""Data-parallel DP-SGD on torch.distributed: each process clips its own examples, the clipped sums
are all-reduced, and Gaussian noise is added exactly once per step.

    dist.init_process_group("gloo" or "nccl")
    sync_parameters(model)                        # or wrap in DistributedDataParallel, which does it
    t = fxclip.transform(model, loss_fn, C)        # a DDP-wrapped model is accepted (unwrapped)
    sampler = ShardedPoissonSampler(N, q, steps)   # this process's share of a global Poisson batch
    opt = DistributedPrivateOptimizer(torch.optim.SGD(...), noise_multiplier=sigma,
                                      max_grad_norm=C, expected_batch_size=sampler.expected_batch_size)
    for idx in sampler:
        t.step(x[idx], y[idx]); opt.step(); opt.zero_grad()

Why fxclip does its own all-reduce rather than DDP's: DDP all-reduces from hooks that fire while
`loss.backward()` accumulates parameter gradients through DDP's forward. fxclip never runs that
backward (it differentiates only to the outputs of the parameter-using ops and writes the clipped
sums into p.grad itself), so DDP's hooks never fire; and DDP averages over processes, while DP-SGD
needs the plain sum of clipped gradients plus one noise draw, divided by the expected global batch
size. The all-reduce below is one flattened bucket per step.
"""

from __future__ import annotations

import hashlib
import os
from typing import Iterator

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from .optim import PrivateOptimizer, gaussian_noise
from .sampling import PoissonBatchSampler


def _require_process_group(what: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{what} needs torch.distributed: call torch.distributed.init_process_group(...) in every "
            "process first (backend 'gloo' on CPU, 'nccl' on GPUs)."
        )


def sync_parameters(model: torch.nn.Module, src: int = 0, group=None) -> None:
    """Copy every parameter and buffer of `model` from process `src` to all processes, so that
    all processes start from the same weights (DistributedDataParallel does this when it wraps)."""
    _require_process_group("sync_parameters")
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor, src=src, group=group)


class ShardedPoissonSampler:
    """This process's part of a Poisson-sampled global batch.

    The N example indices are split into disjoint shards, rank r holding r, r + W, r + 2W, ...
    (W processes). Every step, each process includes each of its examples independently with
    probability q, so the union over processes is exactly a Poisson sample of rate q from all N
    examples: the privacy accountant is run with q and the number of steps, and the noisy sum is
    divided by the expected global batch size q·N (`expected_batch_size`), as in one process.

    Processes must draw independently: `generator` must be seeded differently on each rank; by
    default each process seeds its own from os.urandom.
    """

    def __init__(
        self,
        num_examples: int,
        sampling_rate: float,
        steps: int,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        generator: torch.Generator | None = None,
    ):
        if rank is None or world_size is None:
            _require_process_group("ShardedPoissonSampler without rank and world_size")
            rank, world_size = dist.get_rank(), dist.get_world_size()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if num_examples < world_size:
            raise ValueError(
                f"{num_examples} examples cannot be sharded over {world_size} processes; use fewer "
                "processes or more data."
            )
        if generator is None:
            generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))
        self.num_examples = num_examples
        self.rank, self.world_size = rank, world_size
        self.indices = torch.arange(rank, num_examples, world_size)
        self._shard = PoissonBatchSampler(len(self.indices), sampling_rate, steps, generator)

    @property
    def sampling_rate(self) -> float:
        """q, the probability that any one of the N examples is in a step's global batch."""
        return self._shard.sampling_rate

    @property
    def expected_batch_size(self) -> float:
        """q·N, the expected size of the global batch (all processes together)."""
        return self.sampling_rate * self.num_examples

    def __len__(self) -> int:
        return len(self._shard)

    def __iter__(self) -> Iterator[torch.Tensor]:
        """Global indices (into the full data set) of this process's examples, step by step."""
        for local in self._shard:
            yield self.indices[local]


class DistributedPrivateOptimizer(PrivateOptimizer):
    """`PrivateOptimizer` whose step sums the clipped sums of all processes and adds one noise draw.

    Every process's p.grad holds the clipped sum of its own examples (from `fxclip.transform`).
    `add_noise_and_average` flattens them into one bucket (in float32, or float64 for float64
    parameters), adds N(0, (sigma·C)²) on process `noise_rank` only, all-reduces the bucket by
    sum, and divides by `expected_batch_size` (the expected *global* batch size q·N). Every process
    ends with the same noisy average gradient, one noise draw in total, so the wrapped optimizers
    take identical steps and the replicas stay equal (start them equal: `sync_parameters` or DDP).

    Adding the noise before the all-reduce on one process, rather than after it, costs no second
    collective; with secure_noise the draw comes from that process's OS randomness.

    A model sharded by FSDP2 (`fully_shard`): its p.grad are DTensors whose value is already the
    sum over processes (the step reduce-scatters the clipped sums onto the shards, fxclip.sharded),
    so each process adds the noise of the shard it holds: rank r draws the noise of shard r, and
    every coordinate gets one draw. Those draws must be independent across ranks: without a
    `generator`, each process draws them from its own generator seeded from os.urandom (torch's
    global generator is often seeded alike on every rank, for equal initial weights); a
    `generator` must be seeded differently on each rank, which the first such step checks.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, noise_rank: int = 0, group=None, **kwargs):
        _require_process_group("DistributedPrivateOptimizer")
        super().__init__(optimizer, **kwargs)
        world = dist.get_world_size(group)
        if not 0 <= noise_rank < world:
            raise ValueError(f"noise_rank must be a rank of the group (0..{world - 1}), got {noise_rank}")
        self.noise_rank = noise_rank
        self.group = group
        self._shard_generator: torch.Generator | None = None  # draws the noise of this rank's shards

    def add_noise_and_average(self) -> None:
        """Replace each p.grad by (Σ over processes of the clipped sums + one N(0, (σC)²) draw) / (qN).
        With adaptive clipping the processes' unclipped counts ride in the same bucket, noised
        once with std sigma_b, so every process moves C alike. A sharded (FSDP2) gradient is already
        the sum over processes (`fxclip.sharded`): each rank adds the noise of its own shard."""
        grads = self.clipped_sums()
        adaptive = self.adaptive_clipping is not None
        sharded = [isinstance(g, DTensor) for g in grads]
        plain = [g for g, is_sharded in zip(grads, sharded) if not is_sharded]
        averaged = iter(self._all_reduced(plain, adaptive) if plain or adaptive else [])
        for p, g, is_sharded in zip(self.params, grads, sharded):
            p.grad = (self._noised_shard(g) / self.expected_batch_size).to(p.dtype) if is_sharded else next(averaged).reshape(p.shape).to(p.dtype)

    def _all_reduced(self, grads: list[torch.Tensor], adaptive: bool) -> list[torch.Tensor]:
        """The plain gradients summed over processes in one bucket, with one noise draw (on
        `noise_rank`), divided by the expected batch size; with adaptive clipping the unclipped
        count rides in the same bucket, noised once there (std sigma_b)."""
        dtype = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32  # a count is exact in float32 to 2^24
        device = grads[0].device if grads else torch.device("cpu")
        count = [self.adaptive_clipping.take_count().to(device, dtype).reshape(1)] if adaptive else []
        bucket = torch.cat([g.reshape(-1).to(dtype) for g in grads] + count)
        sizes = [g.numel() for g in grads]
        n = sum(sizes)
        if dist.get_rank(self.group) == self.noise_rank:
            if self.noise_std > 0:
                bucket[:n] += gaussian_noise(bucket[:n], self.noise_std, secure=self.secure_noise, generator=self.generator)
            if adaptive:
                bucket[n:] += self._count_noise(bucket[n:])
        dist.all_reduce(bucket, op=dist.ReduceOp.SUM, group=self.group)
        if adaptive:
            self._noised_count = bucket[n].clone()
        return (bucket[:n] / self.expected_batch_size).split(sizes)

    def _noised_shard(self, grad: DTensor) -> DTensor:
        """A sharded sum (already over all processes) with noise on this rank's shard."""
        if self.noise_std == 0:
            return grad
        dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
        local = grad.to_local().to(dtype)
        local = local + gaussian_noise(local, self.noise_std, secure=self.secure_noise, generator=self._shard_noise_generator(grad))
        return DTensor.from_local(local, grad.device_mesh, grad.placements, run_check=False, shape=grad.shape, stride=grad.stride())

    def _shard_noise_generator(self, grad: DTensor) -> torch.Generator | None:
        """The generator of this rank's shard noise (None: secure noise), checked or made on first use."""
        if self.secure_noise:
            return None
        if self._shard_generator is None:
            if self.generator is None:
                self._shard_generator = torch.Generator(grad.device).manual_seed(int.from_bytes(os.urandom(8), "little"))
            else:
                states = [None] * dist.get_world_size(self.group)
                dist.all_gather_object(states, hashlib.sha256(self.generator.get_state().numpy().tobytes()).hexdigest(), group=self.group)
                if len(set(states)) < len(states):
                    raise ValueError(
                        "the generator is in the same state on two ranks, so their shards would get the same noise "
                        "(correlated, not one independent draw per coordinate): seed it differently on each rank, "
                        "e.g. torch.Generator().manual_seed(seed + rank)"
                    )
                self._shard_generator = self.generator
        return self._shard_generator
