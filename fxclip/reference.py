"""The reference every test and `verify=True` compare against: per-example gradients by
`torch.func.vmap(torch.func.grad(...))` over `functional_call` of the model and then the loss, with
no fxclip code involved but the two-line module that chains them."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Sequence

import torch
import torch.utils._pytree as pytree
from torch.func import functional_call, grad, grad_and_value, vmap

from .batch import select_examples
from .clipping import FLAT, Clipping
from .errors import ExampleMixingError, FxclipError, describe
from .loss import ModelWithLoss


def _target_dims(targets):
    """vmap's in_dims for the targets (a tensor, a pytree of them and Python values, or None):
    dim 0 of each tensor, nothing of anything else."""
    return pytree.tree_map(lambda t: 0 if isinstance(t, torch.Tensor) else None, targets)


def _loss_of_one(model: torch.nn.Module, loss_fn: Callable, batch_dims: tuple, fixed: dict) -> Callable:
    """(trainable values, one example's inputs, its targets) -> its loss, the model run by
    functional_call on that example alone (as a batch of one), `fixed` holding the other values."""
    # the loss runs inside the functional call too: a loss_fn that reads one of the model's
    # parameters (a learned temperature) then sees the value being differentiated
    with_loss = ModelWithLoss(model, loss_fn)
    slots = _slots(model)

    def loss_of_one(params, xs, y):
        xs = tuple(x.unsqueeze(d) for x, d in zip(xs, batch_dims))
        values = {**params, **fixed}
        state = {f"model.{slot}": values[name] for slot, name in slots.items()}
        y = pytree.tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, y)
        return functional_call(with_loss, state, (xs, y), tie_weights=False).sum()

    return loss_of_one


def per_example_losses(model, loss_fn, inputs, targets, batch_dims=None) -> torch.Tensor:
    """Each example's loss with the example run alone [B] (vmap; no gradients)."""
    inputs = tuple(inputs)
    batch_dims = tuple(batch_dims or (0,) * len(inputs))
    values = {k: p.detach() for k, p in [*model.named_parameters(), *model.named_buffers()]}
    with torch.no_grad():
        return vmap(_loss_of_one(model, loss_fn, batch_dims, values), in_dims=(None, batch_dims, _target_dims(targets)))({}, inputs, targets)


def mixing_found(model, loss_fn, inputs, targets, batch_dims=None) -> str | None:
    """Which example's loss in the batch is not its loss alone, else None: evidence that the
    model mixes examples where no op is known to (an op whose batch semantics fxclip does not know;
    Python code the graph never saw). Run in eval mode without gradients, the RNG forked, so
    dropout draws nothing. Examples are run alone (torch.func, else one by one); a model that
    cannot run on one example (x.squeeze() drops a batch of one) is compared on sub-batches
    instead (halves, evens and odds). Where none of these runs, nothing is decided, so
    ExampleMixingError says so: an index along the batch from the inputs fails exactly this way.
    A model that draws random numbers even in eval mode (a VAE's sample) gives other losses on
    every run and is not compared (on the graph path the analysis pass decides alone)."""
    inputs = tuple(inputs)
    batch_dims = tuple(batch_dims or (0,) * len(inputs))
    batch = inputs[0].shape[batch_dims[0]]
    if batch < 2:
        return None
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad(), rng_forked(inputs), _attention_fast_path(False):
            try:
                together = loss_fn(model(*inputs), targets)
                if not torch.equal(together, loss_fn(model(*inputs), targets)):
                    return None
            except FxclipError:  # the loss's shape, checked by the caller's loss_fn
                raise
            except Exception as e:
                raise _undecided(f"the model fails on this batch in eval mode ({describe(e)})") from e
            return _compare_with_parts(model, loss_fn, inputs, targets, batch_dims, together)
    finally:
        for m, training in modes:
            m.train(training)


@contextmanager
def _attention_fast_path(enabled: bool):
    """nn.MultiheadAttention's and nn.TransformerEncoderLayer's fused inference kernels on or off:
    off, eval mode runs the ops training runs (the fused ones check masks and devices of their own)."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def _compare_with_parts(model, loss_fn, inputs, targets, batch_dims, together) -> str | None:
    """`mixing_found`'s comparison, from the finest partition of the batch that runs."""
    batch = together.shape[0]
    failures = []
    for kind, parts in _partitions(batch):
        try:
            if kind == "torch.func":
                alone = per_example_losses(model, loss_fn, inputs, targets, batch_dims)
            else:
                alone = torch.cat([loss_fn(model(*xs), ys).reshape(-1) for xs, ys in (_take(inputs, targets, batch_dims, p) for p in parts)])
        except Exception as e:
            failures.append(f"{kind}: {describe(e)}")
            continue
        order = torch.cat(parts) if kind != "torch.func" else torch.arange(batch)
        in_batch = together[order]
        tol = 5e-2 if torch.is_autocast_enabled(together.device.type) else _tolerance(together.dtype)
        if torch.allclose(in_batch, alone.to(in_batch.dtype), rtol=tol, atol=tol * float(alone.abs().max())):
            return None
        worst = int((in_batch - alone).abs().argmax())
        where = "alone" if kind in ("torch.func", "one by one") else f"in a sub-batch of the {kind}"
        return (
            f"example {int(order[worst])}'s loss in the batch ({float(in_batch[worst]):.6g}) is not its "
            f"loss {where} ({float(alone[worst]):.6g})"
        )
    raise _undecided("the model and loss_fn fail on every part of the batch run on its own (" + "; ".join(failures) + ")")


def _partitions(batch: int):
    """(kind, [index tensors]) to run the batch's examples apart: each alone (torch.func; the first
    few one by one), then the batch's halves, then its evens and odds."""
    yield "torch.func", None
    yield "one by one", [torch.tensor([i]) for i in range(min(8, batch))]
    if batch >= 4:
        yield "halves", [torch.arange(batch // 2), torch.arange(batch // 2, batch)]
        yield "evens and odds", [torch.arange(0, batch, 2), torch.arange(1, batch, 2)]


def _take(inputs: tuple, targets, dims, index: torch.Tensor) -> tuple:
    """(inputs, targets) of the examples `index`: each input along its batch dim, targets along 0."""
    sub_targets = pytree.tree_map(lambda t: t.index_select(0, index.to(t.device)) if isinstance(t, torch.Tensor) else t, targets)
    return tuple(x.index_select(d, index.to(x.device)) for x, d in zip(inputs, dims)), sub_targets


def _undecided(why: str) -> ExampleMixingError:
    return ExampleMixingError(
        f"fxclip cannot check that the examples in this batch are independent: {why}. A model "
        "whose examples reach each other through an index (h[partner], o - o[partner] in the loss) "
        "fails this way, and then one example can move the clipped sum by more than "
        "max_grad_norm. Make the model and loss_fn run on any subset of the batch's examples "
        "(every input and target per example, nothing indexing across the batch)."
    )


def gradient_mixing_found(model, loss_fn, inputs, targets, grads: dict) -> str | None:
    """The parameter whose batch gradient of the summed loss is not the sum of the examples'
    gradients `grads` ({name: [B, ...]}), else None: a model that mixes examples only in training
    mode (a hand-written batch norm) or only in its backward (h + h.mean(0) - h.mean(0).detach())
    has the same losses alone and together. Not checked for a model whose gradient changes from
    one run to the next (dropout), nor one that fails to run here."""
    params = {k: p for k, p in model.named_parameters() if k in grads}
    try:
        with rng_forked(inputs):
            runs = [
                torch.autograd.grad(loss_fn(model(*inputs), targets).sum(), list(params.values()), allow_unused=True)
                for _ in range(2)
            ]
    except Exception:
        return None
    if any(g is not None and not torch.equal(g, h) for g, h in zip(*runs)):
        return None
    together = [torch.zeros_like(p) if g is None else g for p, g in zip(params.values(), runs[0])]
    bound = _tolerance(together[0].dtype) * (max(float(g.abs().max()) for g in together) or 1.0)
    return next((name for name, g in zip(params, together) if float((grads[name].sum(0) - g).abs().max()) > bound), None)


def rng_forked(inputs):
    """A scope whose random draws leave the CPU RNG, and the inputs' GPUs', as they were."""
    return torch.random.fork_rng(devices=[x.device for x in inputs if isinstance(x, torch.Tensor) and x.is_cuda])


def _tolerance(dtype: torch.dtype) -> float:
    """Relative difference allowed between a batch's result and its examples' results alone
    (bf16/fp16 round differently in a batch of one than in the full batch)."""
    return {torch.float64: 1e-7, torch.float32: 1e-3}.get(dtype, 5e-2)


def per_example_grads(
    model: torch.nn.Module,
    loss_fn: Callable,
    inputs: Sequence[torch.Tensor],
    targets: torch.Tensor,
    batch_dims: Sequence[int] | None = None,
    chunk_size: int | None = None,
    with_losses: bool = False,
):
    """{name: [B, *param.shape]} for every parameter with requires_grad, each example run alone
    (and, `with_losses`, the examples' losses [B] as a second result)."""
    inputs = tuple(inputs)
    batch_dims = tuple(batch_dims or (0,) * len(inputs))
    trainable = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    fixed = {k: p.detach() for k, p in model.named_parameters() if not p.requires_grad}
    loss_of_one = _loss_of_one(model, loss_fn, batch_dims, {**fixed, **dict(model.named_buffers())})
    transform = grad_and_value if with_losses else grad
    per_example = vmap(transform(loss_of_one), in_dims=(None, batch_dims, _target_dims(targets)), chunk_size=chunk_size)
    return per_example(trainable, inputs, targets)


def _slots(model: torch.nn.Module) -> dict[str, str]:
    """{each place a tensor is registered (module path.attribute): its name in named_parameters
    or named_buffers}. A parameter shared by two modules has two places, both set in the
    functional call; a module registered under two names has one (functional_call's own tying
    sets it twice and leaves a plain tensor in it when it puts the originals back)."""
    name_of = {id(v): k for k, v in [*model.named_parameters(), *model.named_buffers()]}
    return {
        f"{path}.{attr}" if path else attr: name_of[id(v)]
        for path, module in model.named_modules()
        for attr, v in [*module._parameters.items(), *module._buffers.items()]
        if v is not None
    }


def any_per_example_grads(model, loss_fn, inputs, targets, batch_dims=None, with_losses=False):
    """(`per_example_grads`, "torch.func"), or, for models torch.func cannot transform (a custom
    op without a vmap rule, pytorch#168393; cuDNN's LSTM under vmap; Python control flow on a
    tensor's value), (`naive_per_example_grads`, "per-example loop")."""
    try:
        return per_example_grads(model, loss_fn, inputs, targets, batch_dims, with_losses=with_losses), "torch.func"
    except RuntimeError:  # NotImplementedError included
        return naive_per_example_grads(model, loss_fn, inputs, targets, batch_dims, with_losses), "per-example loop"


def clip_and_sum(grads: dict[str, torch.Tensor], max_grad_norm, clipping: Clipping = FLAT):
    """(norms ‖g_i‖ [B], clip factors, {name: Σ_i clip_i g_i}, group norms) from per-example
    gradients, clipped as `clipping` says (`clipping.Clipping.factors`): for per_layer, each
    group's norms [B, G] and factors [B, G] from `max_grad_norm`'s bound per group, and each
    parameter scaled by its group's factor; else one factor per example and no group norms."""
    flat = torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], dim=1)
    norms = flat.norm(dim=1)
    if not clipping.per_group:
        clip = clipping.factors(norms, max_grad_norm)
        return norms, clip, {k: torch.tensordot(clip.to(g.dtype), g, dims=1) for k, g in grads.items()}, None
    column = clipping.column_of()
    sq = {k: (g.reshape(norms.shape[0], -1).to(norms.dtype) ** 2).sum(1) for k, g in grads.items()}
    group_norms = torch.stack([sum((sq[k] for k in group if k in sq), norms.new_zeros(norms.shape)) for group in clipping.groups], dim=1).sqrt()
    clip = clipping.factors(group_norms, torch.as_tensor(max_grad_norm, dtype=norms.dtype, device=norms.device))
    return norms, clip, {k: torch.tensordot(clip[:, column[k]].to(g.dtype), g, dims=1) for k, g in grads.items()}, group_norms


def clipped_sum(grads: dict[str, torch.Tensor], max_grad_norm, clipping: Clipping = FLAT):
    """(norms [B], {name: Σ_i clip_i g_i}) from per-example gradients."""
    norms, _, sums, _ = clip_and_sum(grads, max_grad_norm, clipping)
    return norms, sums


def naive_per_example_grads(model, loss_fn, inputs, targets, batch_dims=None, with_losses=False):
    """One forward and backward per example (the method DP-SGD started with; also the reference
    for modules torch.func cannot vmap); with `with_losses`, also the losses [B]."""
    inputs = tuple(inputs)
    batch_dims = tuple(batch_dims or (0,) * len(inputs))
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    out, losses = {k: [] for k in params}, []
    for i in range(inputs[0].shape[batch_dims[0]]):
        xs, ys = select_examples(inputs, targets, batch_dims, i, 1)
        loss = loss_fn(model(*xs), ys).sum()
        gs = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (k, p), g in zip(params.items(), gs):  # dense, also for an nn.Embedding(sparse=True)
            out[k].append(torch.zeros_like(p) if g is None else g.to_dense())
        losses.append(loss.detach())
    grads = {k: torch.stack(v) for k, v in out.items()}
    return (grads, torch.stack(losses)) if with_losses else grads
