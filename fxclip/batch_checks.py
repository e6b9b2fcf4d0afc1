"""A batch checked against the step, and the errors that name the batch's fault.

`checked_batch` checks that inputs and targets agree on where the batch is and how large it is.
When something fails inside a step (or torch.export cannot capture the model), the batch itself
may be at fault (a wrong feature size or dtype, a label out of range): `raise_if_the_batch_fails`
runs the model as plain PyTorch on it and reports that error, with its likely cause, instead of a
fallback or fxclip's traceback. `raise_if_not_finite` names the cause of NaN or infinite results.
"""

from __future__ import annotations

import torch
import torch.utils._pytree as pytree

from .errors import FxclipError, describe
from .reference import rng_forked


def _batch_dims_for(inputs: tuple, batch_dims: tuple[int, ...] | None) -> tuple[int, ...]:
    """`batch_dims` (default 0 for each input) for these inputs, negative dims counted from the
    end of each input."""
    dims = (0,) * len(inputs) if batch_dims is None else batch_dims
    if len(dims) != len(inputs):
        raise FxclipError(f"batch_dims has {len(dims)} entries but the model gets {len(inputs)} inputs")
    return tuple(d + x.dim() if d < 0 and isinstance(x, torch.Tensor) else d for x, d in zip(inputs, dims))


def checked_batch(inputs, targets, batch_dims: tuple[int, ...] | None) -> tuple[tuple, int, tuple[int, ...]]:
    """(the inputs as a tuple, the number of examples, each input's batch dim): every input
    (along its batch dim) and target (along dim 0) must agree on the number; tensors on the meta
    device are refused."""
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    dims = _batch_dims_for(inputs, batch_dims)
    sizes = []
    for i, (x, d) in enumerate(zip(inputs, dims)):
        if not isinstance(x, torch.Tensor):
            raise FxclipError(f"input {i} is a {type(x).__name__}; step() takes tensors")
        if x.is_meta:
            raise FxclipError(f"input {i} is on the meta device, which holds shapes but no values; move the batch to a real device (x.to('cpu'))")
        if not 0 <= d < x.dim():
            given = (batch_dims or dims)[i]
            raise FxclipError(f"input {i} has shape {tuple(x.shape)}, which has no dim {given} for the batch")
        sizes.append(x.shape[d])
    for t in pytree.tree_leaves(targets):
        if isinstance(t, torch.Tensor):
            if t.is_meta:
                raise FxclipError("the targets are on the meta device, which holds shapes but no values; move them to a real device")
            sizes.append(t.shape[0] if t.dim() else -1)
    if len(set(sizes)) != 1:
        raise FxclipError(
            f"inputs and targets disagree on the batch size: {sizes} (inputs along batch_dims={dims}, "
            "targets along dim 0)"
        )
    return inputs, sizes[0], dims


def raise_if_an_empty_batch_fails(model, loss_fn, inputs: tuple, targets, dims: tuple[int, ...]) -> None:
    """An empty batch adds nothing, but its shapes must fit the model: the model runs as plain
    PyTorch on one example of zeros shaped like them (an empty batch itself is no test:
    x.view(len(x), -1) fails on it)."""
    one = tuple(x.new_zeros((*x.shape[:d], 1, *x.shape[d + 1 :])) for x, d in zip(inputs, dims))
    ones = pytree.tree_map(lambda t: t.new_zeros((1, *t.shape[1:])) if isinstance(t, torch.Tensor) else t, targets)
    raise_if_the_batch_fails(model, loss_fn, one, ones, "one example of zeros shaped like this empty batch")


def raise_if_the_batch_fails(model, loss_fn, inputs: tuple, targets, what: str = "this batch") -> None:
    """The model and loss run as plain PyTorch on the batch; if they fail, FxclipError with the
    likely cause."""
    with torch.no_grad(), rng_forked(inputs):
        try:
            out = model(*inputs)
        except Exception as e:
            cause = _dtype_cause(model, inputs, e) or _index_cause(inputs, e)
            failure, error = f"the model raises {describe(e).rstrip('.')}{cause}", e
        else:
            try:
                loss_fn(out, targets)
                return
            except Exception as e:
                failure, error = f"loss_fn raises {describe(e).rstrip('.')}{_index_cause(targets, e, out)}", e
    raise FxclipError(
        f"the model and loss_fn fail on {what} run as plain PyTorch: {failure}. Check the inputs, "
        "targets and batch_dims."
    ) from error


def _dtype_cause(model, inputs: tuple, error: Exception) -> str:
    """For an error about types: an input whose dtype is not the parameters' (one float dtype)."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if "type" not in str(error).lower() or len(dtypes) != 1:
        return ""
    (dtype,) = dtypes
    floats = [(i, x) for i, x in enumerate(inputs) if x.is_floating_point() and x.dtype != dtype]
    if floats:
        i, x = floats[0]
        return (
            f". Likely cause: input {i} is {x.dtype} but the model's parameters are {dtype}; convert one "
            f"to the other (x.to({dtype}) or model.to({x.dtype}))"
        )
    ints = [i for i, x in enumerate(inputs) if not (x.is_floating_point() or x.is_complex())]
    if ints:
        return (
            f". Likely cause: input {ints[0]} is {inputs[ints[0]].dtype} but the model computes in {dtype}; "
            f"pass {dtype} features (x.to({dtype})), or feed integer ids to an nn.Embedding first"
        )
    return ""


def _index_cause(values, error: Exception, output=None) -> str:
    """For an index error: the range of the integer tensors among `values` (the targets' class
    labels, given the model's output; else the inputs' ids)."""
    if not isinstance(error, IndexError) and "out of range" not in str(error) and "out of bounds" not in str(error):
        return ""
    ints = [
        t for t in pytree.tree_leaves(values)
        if isinstance(t, torch.Tensor) and t.numel() and not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)
    ]
    if not ints:
        return ""
    low, high = min(int(t.min()) for t in ints), max(int(t.max()) for t in ints)
    if output is None:
        return f". Likely cause: an index out of range, such as a token id beyond an embedding's rows: the integer inputs hold {low}..{high}"
    shape = f" and the model's output has shape {tuple(output.shape)}" if isinstance(output, torch.Tensor) else ""
    return f". Likely cause: a class label outside the output's classes: the targets hold {low}..{high}{shape}; labels must be 0..C-1"


def raise_if_not_finite(inputs: tuple, losses: torch.Tensor, norms: torch.Tensor | None = None) -> None:
    """The error for a step whose losses or norms (if given) are not all finite, naming the
    cause: a NaN or infinity in an input (checked only here, so a step with finite results pays
    nothing for it), else the examples whose loss or norm is not finite."""
    for i, x in enumerate(inputs):
        if x.is_floating_point() and not torch.isfinite(x).all():
            raise FxclipError(f"input {i} contains NaN or infinite values; clean the data before the step")
    for name, values in (("loss", losses), ("gradient norm", norms)):
        if values is None:
            continue
        bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
        if bad:
            raise FxclipError(f"{name} is NaN or infinite for examples {bad[:10]}; no gradients were written")
