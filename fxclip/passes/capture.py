"""Pass 1, capture: the model and its loss as one torch.export graph with a symbolic batch."""

from __future__ import annotations

import warnings

import torch
from torch.export import Dim
from torch.fx import GraphModule

from ..errors import CaptureError, ExampleMixingError
from .context import Context


class ModelWithLoss(torch.nn.Module):
    """model(*inputs) then loss_fn(output, targets): one graph that ends in per-example losses."""

    def __init__(self, model: torch.nn.Module, loss_fn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, inputs: tuple, targets):
        return self.loss_fn(self.model(*inputs), targets)


def reject_batchnorm_in_training(model: torch.nn.Module) -> None:
    """BatchNorm in training mode normalizes with batch statistics: every example's output then
    depends on every other example, and per-example gradients do not exist."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.training:
            raise ExampleMixingError(
                f"module '{name or '<root>'}' ({type(module).__name__}) is in training mode: batch "
                "statistics mix examples, so per-example gradients are undefined. Replace it with "
                "nn.GroupNorm or nn.LayerNorm, or call .eval() on it to use its running statistics."
            )


def _tree_batch_dims(value, dim: int, batch: Dim):
    """dynamic_shapes entry marking `dim` of every tensor in `value` as the batch."""
    if isinstance(value, torch.Tensor):
        return {dim: batch}
    if isinstance(value, (tuple, list)):
        return type(value)(_tree_batch_dims(v, dim, batch) for v in value)
    return None


def _at_least_two(value, dim: int):
    """torch.export specializes a size-1 dimension; capture with the batch repeated to 2."""
    if isinstance(value, torch.Tensor):
        return value if value.shape[dim] >= 2 else torch.cat([value] * 2, dim)
    if isinstance(value, (tuple, list)):
        return type(value)(_at_least_two(v, dim) for v in value)
    return value


def capture(gm: GraphModule | None, ctx: Context) -> GraphModule:
    """Guarantees: the returned graph computes per-example losses [B] from (params, buffers,
    constants, inputs, targets) with B symbolic; `ctx.placeholders` names each graph input."""
    reject_batchnorm_in_training(ctx.model)
    batch = Dim("batch")
    inputs = tuple(_at_least_two(x, d) for x, d in zip(ctx.example_inputs, ctx.batch_dims))
    targets = _at_least_two(ctx.example_targets, 0)
    dynamic = (
        tuple(_tree_batch_dims(x, d, batch) for x, d in zip(inputs, ctx.batch_dims)),
        _tree_batch_dims(targets, 0, batch),
    )
    try:
        # opt_einsum picks a contraction order from the operands' sizes, which would fix the batch
        # size; without it an einsum of three or more operands contracts left to right
        with warnings.catch_warnings(), torch.backends.opt_einsum.flags(enabled=False):
            # nn.RNN modules re-read their weights into `_flat_weights` on every call; harmless here
            warnings.filterwarnings("ignore", message=r".*_flat_weights.*were assigned during export")
            ep = torch.export.export(
                ModelWithLoss(ctx.model, ctx.loss_fn), (inputs, targets), dynamic_shapes=dynamic, strict=False
            )
    except Exception as e:  # torch.export raises many types; say what failed and keep the cause
        raise CaptureError(
            f"torch.export could not capture the model with a symbolic batch size: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}\nCommon causes: Python control flow on tensor "
            "values, a batch size written into the model's code (use x.shape[0]), or batch_dims that "
            "do not match the inputs."
        ) from e
    ctx.exported = ep
    sig = ep.graph_signature
    kinds = {}
    for spec in sig.input_specs:
        name = spec.arg.name
        if spec.kind.name == "PARAMETER":
            kinds[name] = ("param", spec.target.removeprefix("model."))
        elif spec.kind.name == "BUFFER":
            kinds[name] = ("buffer", spec.target.removeprefix("model."))
        elif spec.kind.name in ("CONSTANT_TENSOR", "CUSTOM_OBJ"):
            kinds[name] = ("constant", spec.target)
        else:
            kinds[name] = ("input", None)
    ctx.placeholders = [kinds[n.name] for n in ep.graph_module.graph.nodes if n.op == "placeholder"]
    _check_loss_shape(ep.graph_module)
    return ep.graph_module


def _check_loss_shape(gm: GraphModule) -> None:
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    val = out[0].meta.get("val") if isinstance(out, (tuple, list)) and len(out) == 1 else None
    if not isinstance(val, torch.Tensor) or val.dim() != 1 or not isinstance(val.shape[0], torch.SymInt):
        shape = tuple(val.shape) if isinstance(val, torch.Tensor) else type(val).__name__
        raise CaptureError(
            f"loss_fn must return one loss per example, a tensor of shape [batch]; it returned {shape}. "
            "Use reduction='none' (e.g. F.cross_entropy(out, y, reduction='none')) and, for sequence "
            "or pixel losses, sum or average over every dim but the batch."
        )
