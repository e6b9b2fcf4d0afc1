"""Data-parallel DP-SGD (fxclip.distributed): two gloo processes on localhost against one process
on the union batch; one noise draw per step; Poisson sampling shards."""

from __future__ import annotations

import gc
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import fxclip
from fxclip import zoo
from fxclip.distributed import DistributedPrivateOptimizer, ShardedPoissonSampler, sync_parameters
from fxclip.optim import PrivateOptimizer

WORLD = 2
BATCH = 12  # the union batch; rank r gets examples r, r + 2, ...
C = 0.5  # small enough that most examples are clipped
SIGMA = 1.0


def loss_fn(out, y):
    return F.cross_entropy(out, y, reduction="none")


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return zoo.MLP(64, 64, 10)  # ~9k parameters: enough coordinates to estimate a noise variance


def union_batch():
    (x,), y = zoo.ZOO["mlp"].make_batch(BATCH, torch.Generator().manual_seed(1))
    return x, y


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_path: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        _run(rank, out_path)
        # Tear down together and only after DDP's reducer (which holds gloo work) is gone: a rank that
        # destroys its group while the peer or a live reducer still uses it can abort in gloo's threads.
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _run(rank: int, out_path: str) -> None:
    torch.set_num_threads(1)
    # different initial weights per rank: DDP's construction must broadcast rank 0's
    model = torch.nn.parallel.DistributedDataParallel(make_model(seed=rank))
    x, y = union_batch()
    mine = torch.arange(rank, BATCH, WORLD)
    t = fxclip.transform(model, loss_fn, C)
    results = {}
    for sigma in (0.0, SIGMA):
        opt = DistributedPrivateOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1),
            noise_multiplier=sigma,
            max_grad_norm=C,
            expected_batch_size=BATCH,
        )
        opt.zero_grad()
        t.step(x[mine], y[mine])
        opt.add_noise_and_average()
        grads = torch.cat([p.grad.flatten() for p in model.module.parameters()])
        gathered = [torch.empty_like(grads) for _ in range(WORLD)]
        dist.all_gather(gathered, grads)
        results[sigma] = torch.stack(gathered)
    # sync_parameters brings a model with other weights to rank 0's
    other = make_model(seed=100 + rank)
    sync_parameters(other)
    weights = torch.cat([p.detach().flatten() for p in other.parameters()])
    gathered = [torch.empty_like(weights) for _ in range(WORLD)]
    dist.all_gather(gathered, weights)
    if rank == 0:
        torch.save({"grads": results, "synced": torch.stack(gathered)}, out_path)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "result.pt"
    mp.start_processes(_worker, args=(free_port(), str(out)), nprocs=WORLD, start_method="spawn")  # fork can inherit a busy OpenMP pool and hang
    return torch.load(out)


def single_process_grads(sigma: float, generator=None) -> torch.Tensor:
    model = make_model(seed=0)
    x, y = union_batch()
    opt = PrivateOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        noise_multiplier=sigma,
        max_grad_norm=C,
        expected_batch_size=BATCH,
        generator=generator,
    )
    result = fxclip.transform(model, loss_fn, C).step(x, y)
    assert (result.clip_factors < 1).any()  # the bound is active on this batch
    opt.add_noise_and_average()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_two_processes_equal_one_process_on_the_union_batch(two_process_run):
    grads = two_process_run["grads"][0.0]
    expected = single_process_grads(0.0)
    assert torch.equal(grads[0], grads[1])  # every process holds the same averaged gradient
    torch.testing.assert_close(grads[0], expected, rtol=1e-5, atol=1e-7)


def test_noise_is_one_draw_of_std_sigma_c_per_step(two_process_run):
    noisy, clean = two_process_run["grads"][SIGMA], two_process_run["grads"][0.0]
    assert torch.equal(noisy[0], noisy[1])  # the same noise on every replica
    noise = (noisy[0] - clean[0]) * BATCH  # undo the division by the expected batch size
    n = noise.numel()
    # the sample variance of n normals has relative std sqrt(2/n) ≈ 0.015 here; two draws (one per
    # process) would give variance 2 (σC)², one draw gives (σC)²
    assert abs(noise.var().item() / (SIGMA * C) ** 2 - 1) < 6 * (2 / n) ** 0.5
    assert abs(noise.mean().item()) < 6 * SIGMA * C / n**0.5


def test_ddp_and_sync_parameters_start_replicas_equal(two_process_run):
    synced = two_process_run["synced"]
    assert torch.equal(synced[0], synced[1])


def test_sharded_poisson_sampler_is_a_global_poisson_sample():
    n, q, steps = 200, 0.1, 400
    samplers = [
        ShardedPoissonSampler(n, q, steps, rank=r, world_size=3, generator=torch.Generator().manual_seed(r))
        for r in range(3)
    ]
    assert all(s.expected_batch_size == pytest.approx(q * n) and s.sampling_rate == q for s in samplers)
    shards = torch.cat([s.indices for s in samplers])
    assert torch.equal(shards.sort().values, torch.arange(n))  # the shards partition the data
    counts = torch.zeros(n)
    for batches in zip(*samplers):
        union = torch.cat(batches)
        assert union.unique().numel() == union.numel()  # no example in two processes' batches
        counts[union] += 1
    # each example is included with probability q in each step: counts ~ Binomial(steps, q)
    assert abs(counts.mean().item() / steps - q) < 0.01
    std = (steps * q * (1 - q)) ** 0.5
    assert ((counts - steps * q).abs() < 6 * std).all()


def test_bad_sharding_and_missing_process_group_are_explained():
    with pytest.raises(ValueError, match="rank must be in"):
        ShardedPoissonSampler(10, 0.5, 1, rank=2, world_size=2)
    with pytest.raises(ValueError, match="cannot be sharded"):
        ShardedPoissonSampler(1, 0.5, 1, rank=0, world_size=2)
    with pytest.raises(RuntimeError, match="init_process_group"):
        DistributedPrivateOptimizer(
            torch.optim.SGD(make_model(0).parameters(), lr=0.1),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=4,
        )
