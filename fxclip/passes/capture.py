"""capture: the model and its loss as one torch.export graph with a symbolic batch."""

from __future__ import annotations

import logging
import sys
import warnings
from contextlib import contextmanager
from functools import partial

import torch
import torch.utils._pytree as pytree
from torch._guards import detect_fake_mode
from torch.autograd.function import BackwardCFunction
from torch.export import Dim
from torch.fx import GraphModule, Node
from torch.nn.modules import module as _module_globals
from torch.overrides import TorchFunctionMode
from torch.utils._sympy.numbers import int_oo
from torch.utils.checkpoint import CheckpointFunction

from ..batch import select_examples
from ..errors import CaptureError, ExampleMixingError, FxclipError, NotCovered, describe
from ..loss import ModelWithLoss, is_batch_size, loss_shape_error
from ..provenance import where
from .context import Context
from .inline import inline_trace

REGIONS = (torch.ops.higher_order.wrap_with_set_grad_enabled, torch.ops.higher_order.wrap_with_autocast)


class ExportFailed(CaptureError, NotCovered):
    """torch.export could not capture the model."""


def reject_batch_statistics(model: torch.nn.Module) -> None:
    """BatchNorm in training mode (or built without running statistics) normalizes with batch
    statistics: every example's output then depends on every other example, and per-example
    gradients do not exist. A norm that updates running statistics in the forward (InstanceNorm
    with track_running_stats in training mode) would carry the batch's data into its buffers
    without noise."""
    for name, module in model.named_modules():
        which = f"module '{name or '<root>'}' ({type(module).__name__})"
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.training:
            raise ExampleMixingError(
                f"{which} is in training mode: batch statistics mix examples, so per-example gradients "
                "are undefined. Replace it with nn.GroupNorm or nn.LayerNorm, or call .eval() on it to "
                "use its running statistics."
            )
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not module.track_running_stats:
            raise ExampleMixingError(
                f"{which} has track_running_stats=False, so it normalizes with batch statistics even "
                "in eval mode: they mix examples. Replace it with nn.GroupNorm or nn.LayerNorm."
            )
        if isinstance(module, torch.nn.modules.instancenorm._InstanceNorm) and module.training and module.track_running_stats:
            raise ExampleMixingError(
                f"{which} updates its running statistics from the batch in training mode, which would "
                "put the examples' data into its buffers without noise. Build it with "
                "track_running_stats=False (the default) or call .eval() on it."
            )


def _guard_detail(e: Exception) -> str:
    """The line of a 'Constraints violated' export error that says which guard fixed the batch."""
    detail = next((line.strip() for line in str(e).splitlines() if line.strip().startswith("- ")), "")
    return f" ({detail[2:]})" if detail else ""


def _reject_backward_hooks(model: torch.nn.Module) -> None:
    """Backward hooks change gradients in ways a graph of the forward cannot show."""
    for name, module in model.named_modules():
        if module._backward_hooks or module._backward_pre_hooks:
            raise NotCovered(
                f"module '{name or '<root>'}' ({type(module).__name__}) has a backward hook, which may "
                "change its gradients; fxclip's graph differentiates the forward and would skip it"
            )
    if _module_globals._global_backward_hooks or _module_globals._global_backward_pre_hooks:
        raise NotCovered("a global module backward hook is registered; fxclip's graph would skip it")


class _CustomBackwards(TorchFunctionMode):
    """Watches the capture for what torch.export drops: a tensor hook (Tensor.register_hook) and
    a custom torch.autograd.Function, whose forward export records without its backward. `found`
    is the error to raise: NotCovered (the whole-model fallback runs them as written), or for a
    reentrant checkpoint, whose backward cannot run under torch.autograd.grad, a CaptureError."""

    def __init__(self):
        super().__init__()
        self.found: FxclipError | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.found is None:
            # a reentrant checkpoint whose inputs need no gradient has an output without grad_fn
            # (below); the function it checkpoints runs under no_grad, inside its forward
            if not torch.is_grad_enabled() and _in_reentrant_checkpoint():
                self.found = _reentrant_checkpoint_error()
            elif func is torch.Tensor.register_hook:
                self.found = NotCovered(
                    "the model registers a tensor hook (Tensor.register_hook) in its forward, which may "
                    "change gradients; fxclip's graph differentiates the forward and would skip it"
                )
            else:
                self.found = next(filter(None, map(_custom_function_error, pytree.tree_leaves((args, kwargs)))), None)
        return func(*args, **kwargs)


def _custom_function_error(value) -> FxclipError | None:
    node = value.grad_fn if isinstance(value, torch.Tensor) else None
    # a torch.library.custom_op's autograd is such a Function too, but export keeps the op whole
    if not isinstance(node, BackwardCFunction) or node._forward_cls.__module__ == "torch._library.autograd":
        return None
    function = type(node).__name__.removesuffix("Backward")
    if function == "CheckpointFunction":
        return _reentrant_checkpoint_error()
    return NotCovered(
        f"the model calls a custom torch.autograd.Function ({function}), whose backward fxclip's graph "
        "would replace by the derivative of its forward. For speed, make it a torch.library.custom_op "
        "with a rule (fxclip.register_rule)"
    )


def _reentrant_checkpoint_error() -> CaptureError:
    return CaptureError(
        "torch.utils.checkpoint with use_reentrant=True runs its backward by hand, which fxclip "
        "cannot take apart; pass use_reentrant=False (the same memory saving)"
    )


def _in_reentrant_checkpoint() -> bool:
    """Whether the caller runs inside torch.utils.checkpoint's reentrant forward."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is CheckpointFunction.forward.__code__:
            return True
        frame = frame.f_back
    return False


@contextmanager
def _quiet(logger: logging.Logger):
    """`logger` silenced: fake tensors log a traceback for an op that fails while export runs,
    an error that capture reports itself."""
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


_FAKE_TENSOR_LOG = logging.getLogger("torch._subclasses.fake_tensor")


def _tree_batch_dims(value, dim: int, batch: Dim):
    """dynamic_shapes entry marking `dim` of every tensor in `value` (a tensor, or tuples, lists
    and dicts of them) as the batch."""
    return pytree.tree_map(lambda v: {dim: batch} if isinstance(v, torch.Tensor) else None, value)


def _at_least_two(value, dim: int):
    """torch.export specializes a size-1 dimension; capture with the batch repeated to 2."""
    return pytree.tree_map(
        lambda v: torch.cat([v] * 2, dim) if isinstance(v, torch.Tensor) and v.shape[dim] < 2 else v, value
    )


def _export(ctx: Context, inputs: tuple, targets, batch, custom_backward) -> torch.export.ExportedProgram:
    """torch.export of the model and loss with `batch` (a Dim) for every batch dim."""
    dynamic = (
        tuple(_tree_batch_dims(x, d, batch) for x, d in zip(inputs, ctx.batch_dims)),
        _tree_batch_dims(targets, 0, batch),
    )
    # opt_einsum picks a contraction order from the operands' sizes, which would fix the batch
    # size; without it an einsum of three or more operands contracts left to right
    with warnings.catch_warnings(), torch.backends.opt_einsum.flags(enabled=False), _quiet(_FAKE_TENSOR_LOG), custom_backward:
        # nn.RNN modules re-read their weights into `_flat_weights` on every call; harmless here
        warnings.filterwarnings("ignore", message=r".*_flat_weights.*were assigned during export")
        return torch.export.export(
            ModelWithLoss(ctx.model, ctx.loss_fn), (inputs, targets), dynamic_shapes=dynamic, strict=False
        )


def _batch_range(ep: torch.export.ExportedProgram) -> tuple[int, int | None]:
    """The range of the one symbol every batch dim of `ep`'s inputs has (Dim.DYNAMIC gives each
    its own, unified only where ops relate them); ValueError if they are not one symbol."""
    user = {spec.arg.name for spec in ep.graph_signature.input_specs if spec.kind.name == "USER_INPUT"}
    symbols = {
        sym
        for n in ep.graph_module.graph.nodes if n.op == "placeholder" and n.name in user and isinstance(n.meta.get("val"), torch.Tensor)
        for size in n.meta["val"].shape if isinstance(size, torch.SymInt)
        for sym in size.node.expr.free_symbols
    }
    if len(symbols) != 1:
        raise ValueError(f"the batch dims are {len(symbols)} symbols")
    (symbol,) = symbols
    bounds = ep.range_constraints[symbol]
    return int(bounds.lower), (None if bounds.upper == int_oo else int(bounds.upper))


def capture(gm: GraphModule | None, ctx: Context) -> GraphModule:
    """Guarantees: the returned graph computes per-example losses [B] from (params, buffers,
    constants, inputs, targets) with B symbolic; `ctx.placeholders` names each graph input."""
    reject_batch_statistics(ctx.model)
    inputs = tuple(_at_least_two(x, d) for x, d in zip(ctx.example_inputs, ctx.batch_dims))
    targets = _at_least_two(ctx.example_targets, 0)
    _reject_backward_hooks(ctx.model)
    custom_backward = _CustomBackwards()
    try:
        try:
            ep = _export(ctx, inputs, targets, Dim("batch"), custom_backward)
        except Exception as first:
            if "Constraints violated" not in str(first):
                raise
            # A kernel may bound the batch (cuDNN's batch norm: B <= 65535; torch.cdist picks
            # its algorithm by size), which a named Dim's unbounded range refuses. On two of the
            # examples, the smallest batch captured: the bound Dim.DYNAMIC infers, if a named Dim
            # up to it then holds every guard (a guard such as B != 4 is no bound: refused as
            # before). Larger batches run in chunks that the graph holds (PrivateStep).
            two = select_examples(inputs, targets, ctx.batch_dims, 0, 2)
            try:
                low, high = _batch_range(_export(ctx, *two, Dim.DYNAMIC, custom_backward))
                if low > 2 or high is None:
                    raise ValueError(f"the batch's range {low}..{high} is no upper bound")
                ep = _export(ctx, *two, Dim("batch", max=high), custom_backward)
                ctx.batch_limit = high
            except Exception:
                raise first from None
    except Exception as e:  # torch.export raises many types; say what failed and keep the cause
        raise ExportFailed(
            f"torch.export could not capture the model with a symbolic batch size: {describe(e)}{_guard_detail(e)}"
            "\nCommon causes: Python control flow on tensor values (.item(), a mask check such as "
            "nn.Transformer's causal-mask detection: pass is_causal/tgt_is_causal), a batch size "
            "written into the model's code (use x.shape[0]) or fixed by an op's size checks "
            "(torch.cdist), or batch_dims that do not match the inputs."
        ) from e
    if custom_backward.found:
        raise custom_backward.found
    ctx.exported = ep
    sig = ep.graph_signature
    # export names a tensor registered twice (a module under two attributes) by either path;
    # fxclip by its name in named_parameters / named_buffers
    model = ctx.model
    name_of = {id(v): k for k, v in [*model.named_parameters(), *model.named_buffers()]}
    canonical = {
        k: name_of[id(v)]
        for k, v in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    }
    kinds = {}
    for spec in sig.input_specs:
        name = spec.arg.name
        if spec.kind.name == "PARAMETER":
            kinds[name] = ("param", canonical[spec.target.removeprefix("model.")])
        elif spec.kind.name == "BUFFER":
            kinds[name] = ("buffer", canonical[spec.target.removeprefix("model.")])
        elif spec.kind.name in ("CONSTANT_TENSOR", "CUSTOM_OBJ"):
            kinds[name] = ("constant", spec.target)
        else:
            kinds[name] = ("input", None)
    ctx.placeholders = [kinds[n.name] for n in ep.graph_module.graph.nodes if n.op == "placeholder"]
    _check_loss_shape(ep.graph_module)
    _inline_regions(ep.graph_module)
    return ep.graph_module


def graph_inputs(placeholders: list, model: torch.nn.Module, constants: dict, inputs: tuple, targets, params: dict | None = None) -> list:
    """The values of the captured graph's inputs, in order, for `placeholders` (`ctx.placeholders`):
    the model's parameters and buffers and the captured constants by name, then the leaves of
    (inputs, targets). `params`: the model's named parameters, when the caller has them."""
    params = dict(model.named_parameters()) if params is None else params
    buffers = dict(model.named_buffers()) if any(kind == "buffer" for kind, _ in placeholders) else {}
    user = iter(pytree.tree_leaves((inputs, targets)))
    values = {"param": params, "buffer": buffers, "constant": constants}
    return [next(user) if kind == "input" else values[kind][key] for kind, key in placeholders]


def _inline_regions(gm: GraphModule) -> None:
    """torch.export wraps what the model runs under torch.no_grad() (or enable_grad) and
    torch.autocast(...) into higher-order ops over a submodule. Each becomes the submodule's ops,
    retraced under its context, so autocast's casts are ops of the graph; the outputs of a region
    without grad are detached (no gradient reaches the parameters it used)."""
    fake_mode = detect_fake_mode([n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"])
    while (node := next((n for n in gm.graph.nodes if n.target in REGIONS), None)) is not None:
        if node.target is torch.ops.higher_order.wrap_with_set_grad_enabled:
            grad_enabled, submodule, *operands = node.args
            context = partial(torch.set_grad_enabled, grad_enabled)
        else:
            device, dtype, enabled, cache, submodule, *operands = node.args
            grad_enabled, context = True, partial(torch.autocast, device, dtype, enabled, cache)
        region = getattr(gm, submodule.target)

        def run(*values, region=region, grad_enabled=grad_enabled):
            outputs = region(*values)
            return outputs if grad_enabled else type(outputs)(o.detach() for o in outputs)

        if not inline_trace(gm, node, run, operands, fake_mode, context):
            raise NotCovered(f"{where(node)}: fxclip could not write out the ops of this {node.target.__name__} region")
        if not submodule.users:
            gm.graph.erase_node(submodule)
            gm.delete_submodule(submodule.target)
    gm.recompile()


def _check_loss_shape(gm: GraphModule) -> None:
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    result = out[0] if len(out) == 1 else tuple(out)
    val = result.meta.get("val") if isinstance(result, Node) else result
    # the batch size itself, not a multiple of it (per-token losses flattened to [B·T])
    if not isinstance(val, torch.Tensor) or val.dim() != 1 or not is_batch_size(val.shape[0]) or not val.is_floating_point():
        raise loss_shape_error(val)


