"""Models sharded by FSDP2 (`torch.distributed.fsdp.fully_shard`): the step on the gathered
parameters, and the ranks' clipped sums reduce-scattered onto the shards.

FSDP's forward hooks all-gather a unit's parameters before its forward, free them after it, and
register the backward's reduce-scatter on its inputs. fxclip's step does not run the model's
forward and backward: it differentiates a captured graph that takes the parameters as inputs, so
those hooks cannot do their work inside it. For a model with FSDP units `PrivateStep.step` instead
runs `ShardedModel.step`:

1. every unit is unsharded (`FSDPModule.unshard`: the all-gather its forward would do; under a
   MixedPrecisionPolicy, in its param_dtype) and FSDP's forward hooks are set aside, so the step
   sees the full parameters as plain tensors, exactly as for an unsharded model (a parameter may
   then be used anywhere in the forward, also outside its own unit);
2. the step runs on this rank's own examples (the inputs cast to the root's param_dtype, as FSDP's
   root pre-forward casts them), giving the full clipped sum of its examples;
3. the ranks agree that every rank's step succeeded (one small all-reduce), else all raise and no
   gradient is written on any rank;
4. every unit is resharded and its hooks restored, and the clipped sums are summed over the ranks
   onto the shards by one reduce-scatter (in float32, or float64 for float64 weights): each
   sharded p.grad is a DTensor with p's placements whose value is the sum of all ranks' clipped
   sums, as FSDP's own backward leaves reduce-scattered gradients.
   `fxclip.distributed.DistributedPrivateOptimizer` then adds noise shard by shard.

What fxclip follows: parameters sharded by fully_shard over a one-dimensional device mesh with
Shard placements (FSDP2's default `Shard(0)`, or a shard_placement_fn's Shard(dim)). Parameters
that are plain tensors (modules outside every unit) stay as they are: their p.grad holds this
rank's clipped sum, which DistributedPrivateOptimizer all-reduces as for DDP. Refused, before any
collective, naming the module: a DTensor parameter fully_shard does not manage (tensor or
sequence parallelism: parallelize_module), and a unit on a mesh of more than one dimension (HSDP,
or FSDP combined with tensor parallelism).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree

from .errors import ShardingError

_FSDP_MODULE_PREFIX = "torch.distributed.fsdp._fully_shard"


def _fsdp_api():
    """torch's FSDP2 and DTensor classes, or None where torch.distributed is not built or not
    initialized (a device mesh, which DTensor and fully_shard need, initializes it): then no
    module walk on every step."""
    if not dist.is_available() or not dist.is_initialized():
        return None
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, Shard

    return FSDPModule, DTensor, Shard


@dataclass
class ShardedModel:
    """A model, its FSDP units (FSDPModules, outermost first in module order), their process group
    and the device its collectives take, and the dtype FSDP's root casts floating inputs to (None:
    no cast)."""

    model: torch.nn.Module
    units: list[tuple[str, torch.nn.Module]]
    group: object
    device: torch.device
    input_dtype: torch.dtype | None

    def step(self, run: Callable[[tuple], tuple[object, dict]], inputs: tuple) -> tuple[object, dict]:
        """`run(inputs) -> (result, {name: full clipped sum})` on the gathered parameters; returns
        the result and the gradient to add to each parameter by name: a DTensor with the sharded
        parameter's placements (the sum over ranks), this rank's sum for a plain one."""
        with self._gathered():
            failure = None
            try:
                result, grads = run(self._cast(inputs))
            except BaseException as e:  # noqa: BLE001  (every rank must still join the agreement below; re-raised)
                failure = e
            failed = torch.tensor([dist.get_rank(self.group) + 1 if failure is not None else 0], device=self.device)
            dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=self.group)
            if failure is not None:
                raise failure
            if int(failed):
                raise ShardingError(
                    f"the step failed on rank {int(failed) - 1} (its own error says why), so no rank wrote "
                    "gradients: fix that rank's batch or model and step again"
                )
        # the sharded parameters as resharding registered them (a root left unsharded by a forward
        # before the step had its unsharded ones registered until now)
        return result, _reduce_scatter(grads, dict(self.model.named_parameters()), self.group)

    def _cast(self, inputs: tuple) -> tuple:
        if self.input_dtype is None:
            return inputs
        cast = lambda x: x.to(self.input_dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
        return pytree.tree_map(cast, inputs)

    @contextmanager
    def _gathered(self) -> Iterator[None]:
        """Every unit unsharded and FSDP's forward hooks set aside; resharded and restored after."""
        for _, unit in self.units:
            # what the first forward through a root does: finds the nested units, sets dtypes
            unit._get_fsdp_state()._lazy_init()
        saved = [(unit, dict(unit._forward_pre_hooks), dict(unit._forward_hooks)) for _, unit in self.units]
        try:
            for _, unit in self.units:
                for hooks in (unit._forward_pre_hooks, unit._forward_hooks):
                    for key in [k for k, hook in hooks.items() if _is_fsdp_hook(hook)]:
                        del hooks[key]
            for _, unit in self.units:
                unit.unshard()
            yield
        finally:
            for _, unit in self.units:
                unit.reshard()
            for unit, pre, post in saved:  # in their order (FSDP's pre-forward hook runs first)
                for hooks, before in ((unit._forward_pre_hooks, pre), (unit._forward_hooks, post)):
                    hooks.clear()
                    hooks.update(before)


def _is_fsdp_hook(hook) -> bool:
    func = getattr(hook, "func", hook)  # a functools.partial's function
    return getattr(func, "__module__", "").startswith(_FSDP_MODULE_PREFIX)


def sharded_model(model: torch.nn.Module) -> ShardedModel | None:
    """The model's FSDP units, or None for a model without them and without DTensor parameters.
    Raises ShardingError, naming the module, for a layout fxclip cannot follow."""
    api = _fsdp_api()
    if api is None:
        return None
    FSDPModule, DTensor, Shard = api
    modules = list(model.named_modules())
    units = [(name, m) for name, m in modules if isinstance(m, FSDPModule)]
    managed = {}  # id(sharded parameter) -> the unit's name
    for name, unit in units:
        for group in unit._get_fsdp_state()._fsdp_param_groups:
            managed.update({id(fp.sharded_param): name for fp in group.fsdp_params})
    meshes = {}
    for module_name, module in modules:
        for pname, p in module._parameters.items():
            if not isinstance(p, DTensor):
                continue
            where = f"parameter '{pname}' of module '{module_name or '<root>'}' ({type(module).__name__})"
            if id(p) not in managed:
                raise ShardingError(
                    f"{where} is a DTensor with placements {p.placements} that fully_shard does not manage "
                    "(tensor or sequence parallelism?). fxclip follows models sharded by FSDP2's fully_shard "
                    "over a one-dimensional device mesh; keep tensor-parallel layouts out of the model it clips."
                )
            if p.device_mesh.ndim != 1 or not all(isinstance(pl, Shard) for pl in p.placements):
                raise ShardingError(
                    f"{where} is sharded over a {p.device_mesh.ndim}-dimensional device mesh with placements "
                    f"{p.placements} (HSDP or FSDP with tensor parallelism). fxclip follows fully_shard over a "
                    "one-dimensional mesh (init_device_mesh(device, (world_size,))) only."
                )
            meshes[p.device_mesh] = managed[id(p)]
    if not units:
        return None
    if len(meshes) > 1:
        names = list(meshes.values())
        raise ShardingError(
            f"FSDP units '{names[0]}' and '{names[1]}' shard over different device meshes; fxclip reduce-scatters "
            "all clipped sums over one mesh: pass the same mesh to every fully_shard call"
        )
    sharded = [p for p in model.parameters() if isinstance(p, DTensor)]
    group = sharded[0].device_mesh.get_group() if sharded else None
    device = sharded[0].to_local().device if sharded else torch.device("cpu")
    # units are in module order, so the first is outermost: the root whose pre-forward casts inputs
    root_policy = units[0][1]._get_fsdp_state()._mp_policy
    input_dtype = root_policy.param_dtype if root_policy.cast_forward_inputs else None
    return ShardedModel(model, units, group, device, input_dtype)


def _reduce_scatter(grads: dict, params: dict, group) -> dict:
    """{name: gradient to add}: for each sharded trainable parameter of `params`, its shard of the sum over
    ranks of the full clipped sums in `grads` (missing: zero), by one reduce-scatter of a bucket
    that holds each rank's pieces (torch.chunk along the shard dim, as DTensor and FSDP2 split
    them), each padded to the largest rank's; plain parameters' sums as they are."""
    from torch.distributed.tensor import DTensor

    sharded = {k: p for k, p in params.items() if isinstance(p, DTensor) and p.requires_grad}
    out = {k: g for k, g in grads.items() if k not in sharded}
    if not sharded:
        return out
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in sharded.values()) else torch.float32
    rows, sizes = [[] for _ in range(world)], []
    for key, p in sharded.items():
        full = grads.get(key)
        full = torch.zeros(p.shape, dtype=dtype, device=p.to_local().device) if full is None else full.to(dtype).reshape(p.shape)
        (placement,) = p.placements
        pieces = list(torch.chunk(full, world, dim=placement.dim))
        pieces += [full.narrow(placement.dim, 0, 0)] * (world - len(pieces))  # ranks past the last chunk hold none
        width = max(piece.numel() for piece in pieces)
        for r, piece in enumerate(pieces):
            rows[r].append(torch.nn.functional.pad(piece.reshape(-1), (0, width - piece.numel())))
        sizes.append((key, p, pieces[rank].shape, width))
    bucket = torch.stack([torch.cat(row) for row in rows])
    mine = bucket.new_empty(bucket.shape[1])
    dist.reduce_scatter_single(mine, bucket.reshape(-1), op=dist.ReduceOp.SUM, group=group)
    for (key, p, shape, width), flat in zip(sizes, mine.split([width for *_, width in sizes])):
        local = flat[: shape.numel()].reshape(shape)
        if local.shape != p.to_local().shape:
            raise ShardingError(f"parameter '{key}' holds a shard of shape {tuple(p.to_local().shape)} on this rank, "
                                f"not torch.chunk's {tuple(local.shape)}: fxclip cannot follow this sharding")
        out[key] = DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
    return out
