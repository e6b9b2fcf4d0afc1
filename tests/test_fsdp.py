"""Models sharded by FSDP2 (fully_shard, fxclip.sharded): two gloo processes on a "cpu" device
mesh against one process on the union batch and the torch.func reference; one noise draw per
coordinate; mixed precision; layouts fxclip refuses; a failing rank. Also activation
checkpointing, which large sharded models use."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.checkpoint import checkpoint

import fxclip
from fxclip.distributed import DistributedPrivateOptimizer
from fxclip.optim import PrivateOptimizer
from fxclip.reference import any_per_example_grads, clipped_sum
from tests.helpers import ce, check_against_reference
from tests.test_distributed import free_port

WORLD = 2
BATCH = 10  # the union batch; rank r gets examples r, r + 2, ...
C = 0.5  # small enough that most examples are clipped
SIGMA = 1.0
LR = 0.1


class Encoder(nn.Module):
    """A small transformer encoder classifier: the blocks and the root are FSDP units. `scale` has
    one row, so rank 1 holds an empty shard of it; the head's 3 rows split 2/1."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.scale = nn.Parameter(torch.ones(1, 16))
        self.blocks = nn.ModuleList([nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True) for _ in range(2)])
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.embed(x) * self.scale
        for block in self.blocks:
            h = block(h)
        return self.head(h.mean(1))


class ReusesANorm(Encoder):
    """The root's forward also uses a parameter of the last block's unit, after that unit's forward
    (plain FSDP would find it resharded there)."""

    def forward(self, x):
        h = self.embed(x) * self.scale
        for block in self.blocks:
            h = block(h)
        return self.head((h * self.blocks[1].norm1.weight).mean(1))


def make_model(cls=Encoder) -> Encoder:
    torch.manual_seed(0)
    return cls()


def union_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 5, 8, generator=g), torch.randint(0, 3, (BATCH,), generator=g)


def shard(model: nn.Module, mesh, **kwargs) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block, mesh=mesh, **kwargs)
    return fully_shard(model, mesh=mesh, **kwargs)


def full(tensors) -> torch.Tensor:
    """The full values of DTensors (or tensors), flattened into one vector."""
    return torch.cat([t.full_tensor().flatten() if hasattr(t, "full_tensor") else t.flatten() for t in tensors])


def _worker(rank: int, port: int, out_path: str, run=None) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        results = (run or _run)(rank)
        if rank == 0:
            torch.save(results, out_path)
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _run(rank: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (WORLD,))
    x, y = union_batch()
    mine = torch.arange(rank, BATCH, WORLD)
    out = {}

    # the contract: each rank's own examples, then one optimizer step, noise 0
    model = shard(make_model(), mesh)
    t = fxclip.transform(model, ce, C)
    opt = DistributedPrivateOptimizer(torch.optim.SGD(model.parameters(), lr=LR), noise_multiplier=0.0, max_grad_norm=C, expected_batch_size=BATCH)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxclip.FallbackWarning)  # the graph path, not the whole-model fallback
        result = t.step(x[mine], y[mine])
    out["norms"] = result.norms
    out["grad_types"] = {type(p.grad).__name__ for p in model.parameters()}
    out["clipped_sum"] = full(p.grad for p in model.parameters())
    out["explained"] = str(t.explain())  # the last step's plan
    try:
        t.explain(x[mine], y[mine])  # a dry run would gather the parameters on one rank only
        out["dry_run"] = None
    except fxclip.FxclipError as e:
        out["dry_run"] = str(e)
    opt.step()
    out["stepped"] = full(model.parameters())
    out["plain_forward_after"] = float(ce(model(x), y).sum())  # FSDP's own forward still works

    # the noise: one draw per coordinate, rank r drawing shard r's
    opt.zero_grad()
    t.step(x[mine], y[mine])
    clean = {name: p.grad.full_tensor() / BATCH for name, p in model.named_parameters()}
    noisy_opt = DistributedPrivateOptimizer(
        torch.optim.SGD(model.parameters(), lr=LR), noise_multiplier=SIGMA, max_grad_norm=C, expected_batch_size=BATCH
    )
    noisy_opt.add_noise_and_average()
    out["noise"] = {name: (p.grad.full_tensor() - clean[name]) * BATCH for name, p in model.named_parameters()}
    seeded_alike = DistributedPrivateOptimizer(
        torch.optim.SGD(model.parameters(), lr=LR), noise_multiplier=SIGMA, max_grad_norm=C, expected_batch_size=BATCH,
        generator=torch.Generator().manual_seed(7),
    )
    try:
        seeded_alike.add_noise_and_average()
        out["alike_error"] = None
    except ValueError as e:
        out["alike_error"] = str(e)

    # an empty batch on rank 1: it still joins the collectives and adds nothing
    model = shard(make_model(), mesh)
    t = fxclip.transform(model, ce, C)
    own = mine[:0] if rank == 1 else torch.arange(BATCH)
    t.step(x[own], y[own])
    out["empty_on_rank_1"] = full(p.grad for p in model.parameters())

    # a failing rank: every rank raises, none writes gradients
    bad = x[mine] if rank == 0 else x[mine][..., :7]  # rank 1's features are one short
    try:
        t.step(bad, y[mine])
        out["failure"] = None
    except fxclip.FxclipError as e:
        out["failure"] = (type(e).__name__, str(e))
    out["after_failure"] = full(p.grad for p in model.parameters())

    # a parameter used outside its unit's forward: the step has every parameter gathered
    model = shard(make_model(ReusesANorm), mesh)
    fxclip.transform(model, ce, C).step(x[mine], y[mine])
    out["reused_norm"] = full(p.grad for p in model.parameters())

    # mixed precision: bf16 unsharded parameters, float32 norms and reduction
    model = shard(make_model(), mesh, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    result = fxclip.transform(model, ce, C).step(x[mine], y[mine])
    out["bf16_norms"] = result.norms
    out["bf16_clipped_sum"] = full(p.grad for p in model.parameters())
    out["bf16_grad_dtypes"] = {p.grad.dtype for p in model.parameters()}

    # a tensor-parallel layout fxclip cannot follow: refused, naming the module, nothing written
    model = make_model()
    parallelize_module(model.head, mesh, ColwiseParallel())
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    try:
        fxclip.transform(model, ce, C).step(x[mine], y[mine])
        out["tp_error"] = None
    except fxclip.FxclipError as e:
        out["tp_error"] = str(e)
    out["tp_grads"] = [p.grad for p in model.parameters()]

    # HSDP (a two-dimensional mesh: replicate x shard): refused too
    model = shard(make_model(), init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("replicate", "shard")))
    try:
        fxclip.transform(model, ce, C).step(x[mine], y[mine])
        out["hsdp_error"] = None
    except fxclip.FxclipError as e:
        out["hsdp_error"] = str(e)
    return out


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp") / "result.pt"
    mp.start_processes(_worker, args=(free_port(), str(out)), nprocs=WORLD, start_method="spawn")
    return torch.load(out, weights_only=False)


def _run_compiled(rank: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    model = shard(make_model(), init_device_mesh("cpu", (WORLD,)))
    x, y = union_batch()
    mine = torch.arange(rank, BATCH, WORLD)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = fxclip.transform(model, ce, C, compile=True)
        t.step(x[mine], y[mine])
    return {"clipped_sum": full(p.grad for p in model.parameters()), "compiled": t.captures[0].step.compiled is not None,
            "warnings": [str(w.message) for w in caught if "eagerly" in str(w.message) or issubclass(w.category, fxclip.FallbackWarning)]}


@pytest.mark.slow
@pytest.mark.compile
def test_compiled_sharded_step_equals_the_reference(tmp_path):
    out = tmp_path / "result.pt"
    mp.start_processes(_worker, args=(free_port(), str(out), _run_compiled), nprocs=WORLD, start_method="spawn")
    result = torch.load(out, weights_only=False)
    assert result["compiled"] and not result["warnings"]
    x, y = union_batch()
    torch.testing.assert_close(result["clipped_sum"], reference_clipped_sum(make_model(), x, y), rtol=1e-4, atol=1e-5)


def reference_clipped_sum(model, x, y) -> torch.Tensor:
    """The torch.func reference: per-example gradients, clipped at C, summed."""
    grads, _ = any_per_example_grads(model, ce, (x,), y)
    _, clipped = clipped_sum(grads, C)
    return torch.cat([clipped[name].flatten() for name, _ in model.named_parameters()])


def test_sharded_step_equals_one_process_on_the_union_batch(two_process_run):
    x, y = union_batch()
    assert two_process_run["grad_types"] == {"DTensor"}  # sharded gradients, like FSDP's own backward
    torch.testing.assert_close(two_process_run["clipped_sum"], reference_clipped_sum(make_model(), x, y), rtol=1e-5, atol=1e-6)
    # one process's DP-SGD step (noise 0) on the union batch
    model = make_model()
    opt = PrivateOptimizer(torch.optim.SGD(model.parameters(), lr=LR), noise_multiplier=0.0, max_grad_norm=C, expected_batch_size=BATCH)
    result = fxclip.transform(model, ce, C).step(x, y)
    assert (result.clip_factors < 1).any()  # the bound is active on this batch
    torch.testing.assert_close(two_process_run["norms"], result.norms[0::WORLD], rtol=1e-5, atol=1e-6)  # rank 0's examples
    opt.step()
    torch.testing.assert_close(two_process_run["stepped"], full(model.parameters()), rtol=1e-5, atol=1e-7)
    assert torch.isfinite(torch.tensor(two_process_run["plain_forward_after"]))


def test_explain_shows_the_last_step_and_refuses_a_dry_run(two_process_run):
    assert "blocks.1.linear2.weight" in two_process_run["explained"]
    assert "fully_shard" in two_process_run["dry_run"] and "t.explain()" in two_process_run["dry_run"]


def test_noise_is_one_independent_draw_per_coordinate(two_process_run):
    noise = full(two_process_run["noise"].values())
    n = noise.numel()
    # the sample variance of n normals has relative std sqrt(2/n) (≈0.02 here); noise drawn by both
    # ranks on every coordinate would double it
    assert abs(noise.var().item() / (SIGMA * C) ** 2 - 1) < 6 * (2 / n) ** 0.5
    assert abs(noise.mean().item()) < 6 * SIGMA * C / n**0.5
    # rank 0 drew the noise of the first 24 rows of this weight, rank 1 of the last 24: independent
    # draws (torch's global generator, seeded alike on both ranks, would make the halves equal)
    first, second = two_process_run["noise"]["blocks.0.self_attn.in_proj_weight"].view(2, -1)
    assert abs(float(torch.corrcoef(torch.stack([first, second]))[0, 1])) < 6 / first.numel() ** 0.5
    assert "seed it differently on each rank" in two_process_run["alike_error"]


def test_an_empty_batch_on_one_rank_adds_nothing(two_process_run):
    x, y = union_batch()
    torch.testing.assert_close(two_process_run["empty_on_rank_1"], reference_clipped_sum(make_model(), x, y), rtol=1e-5, atol=1e-6)


def test_a_failing_rank_stops_every_rank_and_writes_nothing(two_process_run):
    kind, message = two_process_run["failure"]
    assert kind == "ShardingError" and "failed on rank 1" in message  # rank 1 raised its own error
    assert torch.equal(two_process_run["after_failure"], two_process_run["empty_on_rank_1"])


def test_a_parameter_used_outside_its_unit_is_exact(two_process_run):
    x, y = union_batch()
    torch.testing.assert_close(two_process_run["reused_norm"], reference_clipped_sum(make_model(ReusesANorm), x, y), rtol=1e-5, atol=1e-6)


def test_mixed_precision_takes_bf16_parameters_and_float32_norms(two_process_run):
    x, y = union_batch()
    assert two_process_run["bf16_norms"].dtype == torch.float32
    assert two_process_run["bf16_grad_dtypes"] == {torch.float32}
    expected = reference_clipped_sum(make_model(), x, y)
    # bf16 forward and backward: within bf16's precision of the float32 reference
    assert float((two_process_run["bf16_clipped_sum"] - expected).norm() / expected.norm()) < 3e-2


def test_tensor_parallel_and_hsdp_layouts_are_refused_naming_the_module(two_process_run):
    assert "module 'head'" in two_process_run["tp_error"] and "fully_shard" in two_process_run["tp_error"]
    assert all(g is None for g in two_process_run["tp_grads"])
    assert "2-dimensional device mesh" in two_process_run["hsdp_error"] and "module '<root>'" in two_process_run["hsdp_error"]


class Checkpointed(nn.Module):
    def __init__(self, use_reentrant: bool):
        super().__init__()
        self.use_reentrant = use_reentrant
        self.embed, self.head = nn.Linear(8, 16), nn.Linear(16, 3)
        self.blocks = nn.ModuleList([nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True) for _ in range(2)])

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = checkpoint(block, h, use_reentrant=self.use_reentrant)
        return self.head(h.mean(1))


def test_non_reentrant_activation_checkpointing_is_exact():
    model = Checkpointed(use_reentrant=False).double()
    x, y = union_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxclip.FallbackWarning)  # traced through, on the graph path
        check_against_reference(fxclip.transform(model, ce, C), (x.double(),), y)


def test_reentrant_activation_checkpointing_is_refused_with_the_fix():
    model = Checkpointed(use_reentrant=True)
    x, y = union_batch()
    with pytest.raises(fxclip.FxclipError, match="use_reentrant=False"):
        fxclip.transform(model, ce, C).step(x, y)
    assert all(p.grad is None for p in model.parameters())
