"""Unusual and bad inputs, one row each (issue 27). A row either expects a clear FxclipError and
then checks that the model's parameters and .grad are exactly as they were, or expects a result
equal to the per-example reference: each example's gradient alone (torch.func, or one backward per
example), computed in float64 on a float64 copy of the model and batch."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils._pytree as pytree
import torch.utils.checkpoint

import fxclip
from fxclip.reference import any_per_example_grads, clipped_sum


def squares(out, y):
    return ((out - y) ** 2).flatten(1).sum(1)


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


@dataclass(frozen=True)
class Row:
    """One unusual input. `model()` and `batch()` -> (inputs tuple, targets) build it (the batch
    inside `around()`, as the step runs); `prepare(t, model)` runs first, its changes are the
    state the row starts from. `error`: the FxclipError's message (a regex) from transform or the
    step, else the result must be the reference's, by fxclip's graph unless `whole_model` (the
    whole-model fallback); `check(t, model, result)` is a further condition that must hold."""

    id: str
    model: Callable[[], nn.Module]
    batch: Callable[[], tuple]
    loss: Callable = squares
    options: dict = field(default_factory=dict)
    around: Callable[[], Any] = contextlib.nullcontext
    prepare: Callable | None = None
    error: str | None = None
    check: Callable | None = None
    whole_model: bool = False
    marks: tuple = ()


def mlp(dtype=torch.float64):
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def regression_batch(n=6, dtype=torch.float64):
    return lambda: ((torch.randn(n, 4, dtype=dtype),), torch.randn(n, 3, dtype=dtype))


class ScaledDown(nn.Module):
    """A linear layer on inputs near 1e20 whose output is scaled back by 1e-20: per-example
    gradient norms of order 1, but Gram products of the inputs near 1e40 (float32 ends at 3e38)."""

    def __init__(self):
        super().__init__()
        self.lin, self.head = nn.Linear(5, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(x) * 1e-20))


def weighted_squares(out, y):
    """Squared error weighted per example by the targets' last column (0: a zero gradient)."""
    return (((out - y[..., :-1]) ** 2).sum(-1) * y[..., -1]).reshape(y.shape[0], -1).sum(1)


def huge_inputs(*positions):
    def batch():
        y = torch.cat([torch.randn(6, *positions, 3), torch.ones(6, *positions, 1)], -1)
        y[2, ..., -1] = 0  # example 2's gradient is exactly zero: its norm is 0, not inf · 0
        return (torch.randn(6, *positions, 5) * 1e20,), y

    return batch


def token_batch():
    return (torch.tensor([[0, 1, 1], [2, 0, 4]] * 3),), torch.randn(6, 3, dtype=torch.float64)


def _same_layout_as_backward(t, model, result) -> bool:
    """The embedding's .grad is sparse with backward's rows (padding left out), and
    torch.optim.SparseAdam steps on it."""
    grad = model[0].weight.grad
    inputs, targets = token_batch()  # the same tokens: backward's rows are the step's
    plain = copy.deepcopy(model)
    plain.zero_grad(set_to_none=True)
    squares(plain(*inputs), targets).sum().backward()
    torch.optim.SparseAdam([model[0].weight]).step()
    return grad.is_sparse and torch.equal(grad.coalesce().indices(), plain[0].weight.grad.coalesce().indices())


def _made_in_inference_mode(make):
    with torch.inference_mode():
        return make()


class Checkpointed(nn.Module):
    """The whole model inside a reentrant checkpoint: its output has no grad_fn (no input needs
    a gradient), so the loss looks as if it depended on no parameter."""

    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.body, x, use_reentrant=True)


class BilinearOfComputed(nn.Module):
    """nn.Bilinear of a tensor computed in the model and a second batch input."""

    def __init__(self):
        super().__init__()
        self.emb, self.bil = nn.Embedding(10, 5), nn.Bilinear(5, 3, 4)

    def forward(self, tokens, side):
        return self.bil(self.emb(tokens).sum(1), side)


ROWS = [
    # ---- the step needs gradients whatever the caller's grad mode ----
    Row("step_under_no_grad", mlp, regression_batch(), around=torch.no_grad),
    Row("step_under_inference_mode", mlp, regression_batch(), around=torch.inference_mode),
    # ---- ops written out ----
    Row(
        "bilinear_of_a_computed_tensor",
        lambda: BilinearOfComputed().double(),
        lambda: ((torch.randint(0, 10, (6, 7)), torch.randn(6, 3, dtype=torch.float64)), torch.randn(6, 4, dtype=torch.float64)),
        # written out as the ops it runs (traced with the batch symbolic), not left whole
        check=lambda t, model, result: not any("aten.bilinear." in f for f in t.fallbacks),
    ),
    # ---- numerics: finite problems get finite, exact norms ----
    Row("inputs_near_1e20", ScaledDown, huge_inputs(), weighted_squares, check=lambda t, m, r: r.norms[2] == 0),
    Row("inputs_near_1e20_ghost_sequence", ScaledDown, huge_inputs(7), weighted_squares, {"strategy": "ghost"}),
    Row(
        "inputs_near_1e20_compiled", ScaledDown, huge_inputs(), weighted_squares, {"compile": True},
        check=lambda t, m, r: r.norms[2] == 0 and all(c.step.compiled is not None for c in t.captures), marks=(pytest.mark.compile,),
    ),
    Row(
        "gradient_norms_near_1e20",  # their squares overflow float32, whichever strategy
        lambda: nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 3)),
        lambda: ((torch.randint(0, 10, (6, 3)),), torch.randn(6, 3)),
        lambda out, y: ((out - y) ** 2).sum(1) * 1e20,
        check=lambda t, m, r: (r.norms > 1e19).all() and (r.clip_factors > 0).all(),
    ),
    # ---- gradient layouts: a sparse .grad where backward gives one ----
    *(
        Row(
            f"sparse_{name}{how}", make, token_batch, options=options, check=_same_layout_as_backward,
            marks=(pytest.mark.compile,) * ("compile" in options),
        )
        for name, make in [
            ("embedding", lambda: nn.Sequential(nn.Embedding(10, 4, padding_idx=0, sparse=True), nn.Flatten(), nn.Linear(12, 3)).double()),
            ("embedding_bag", lambda: nn.Sequential(nn.EmbeddingBag(10, 4, mode="mean", sparse=True), nn.Linear(4, 3)).double()),
        ]
        for how, options in [("", {}), ("_compiled", {"compile": True}), ("_verified_in_chunks", {"verify": True, "max_physical_batch_size": 4})]
    ),
    # ---- torch's errors from inside the step: kept, with the likely cause ----
    Row(
        "int64_inputs_to_a_float_model", lambda: mlp(torch.float32),
        lambda: ((torch.randint(0, 5, (6, 4)),), torch.randn(6, 3)),
        error=r"(?s)plain PyTorch: the model raises RuntimeError: mat1 and mat2 must have the same dtype.*"
        r"Likely cause: input 0 is torch.int64 but the model computes in torch.float32",
    ),
    Row(
        "float32_inputs_to_a_float64_model", mlp, regression_batch(dtype=torch.float32),
        error=r"Likely cause: input 0 is torch.float32 but the model's parameters are torch.float64; convert",
    ),
    Row(
        "class_label_out_of_range", mlp, lambda: ((torch.randn(6, 4, dtype=torch.float64),), torch.tensor([0, 1, 2, 7, 1, 0])), ce,
        error=r"loss_fn raises IndexError: Target 7 is out of bounds. Likely cause: a class label outside the "
        r"output's classes: the targets hold 0..7 and the model's output has shape \(6, 3\)",
    ),
    Row(
        "token_id_out_of_range", lambda: nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 3)).double(),
        lambda: ((torch.tensor([[1, 2, 3]] * 5 + [[1, 12, 3]]),), torch.randn(6, 3, dtype=torch.float64)),
        error=r"the model raises IndexError: index out of range in self. Likely cause: an index out of range.*hold 1..12",
    ),
    # ---- errors fxclip names itself ----
    Row(
        "integer_loss", mlp, regression_batch(), lambda out, y: (out - y).argmax(1),
        error=r"loss_fn must return real floating-point losses, one per example; it returned torch.int64",
    ),
    Row(
        "inputs_on_the_meta_device", mlp, lambda: ((torch.randn(6, 4, dtype=torch.float64, device="meta"),), torch.randn(6, 3, dtype=torch.float64)),
        error=r"input 0 is on the meta device, which holds shapes but no values",
    ),
    Row(
        "targets_on_the_meta_device", mlp, lambda: ((torch.randn(6, 4, dtype=torch.float64),), torch.randn(6, 3, dtype=torch.float64, device="meta")),
        error=r"the targets are on the meta device",
    ),
    Row("reentrant_checkpoint_around_the_whole_model", lambda: Checkpointed(mlp()), regression_batch(), error=r"use_reentrant=True.*pass use_reentrant=False"),
    Row("model_made_in_inference_mode", lambda: _made_in_inference_mode(mlp), regression_batch(), error=r"parameter '0.weight' was made under torch.inference_mode\(\)"),
    Row(
        "empty_batch_of_the_wrong_feature_size", mlp,
        lambda: ((torch.randn(0, 7, dtype=torch.float64),), torch.randn(0, 3, dtype=torch.float64)),
        error=r"fail on one example of zeros shaped like this empty batch run as plain PyTorch: the model raises "
        r"RuntimeError: mat1 and mat2 shapes cannot be multiplied \(1x7 and 4x8\)",
    ),
    # ---- options of transform, each type-checked ----
    *(
        Row(f"option_{name}_{value!r}", mlp, regression_batch(), options={name: value}, error=message)
        for name, value, message in [
            ("max_grad_norm", "1.0", r"max_grad_norm must be a finite number > 0, got '1.0'"),
            ("max_grad_norm", True, r"max_grad_norm must be a finite number > 0, got True"),
            ("verify", "no", r"verify must be True or False, got 'no'"),
            ("verify", 1, r"verify must be True or False, got 1"),
            ("strategy", None, r"strategy must be one of \('auto', 'ghost', 'materialize'\), got None"),
            ("compile", "yes", r"compile must be True, False or a batch mode"),
            ("batch_dims", 0.0, r"batch_dims must be a sequence of ints"),
            ("batch_dims", "0", r"batch_dims must be a sequence of ints"),
            ("max_physical_batch_size", 2.5, r"max_physical_batch_size must be an integer >= 1, got 2.5"),
            ("memory_budget", "1e6", r"memory_budget must be a finite number > 0, got '1e6'"),
        ]
    ),
    Row("loss_fn_none", mlp, regression_batch(), loss=None, error=r"loss_fn must be a function \(output, targets\)"),
    # ---- state changed between steps ----
    Row(
        "float64_after_a_float32_step",  # fxclip's .grads of the first step are still there
        lambda: mlp(torch.float32), regression_batch(),
        prepare=lambda t, model: (t.step(*regression_batch(dtype=torch.float32)()), model.double()),
        check=lambda t, model, result: all(p.grad.dtype == torch.float64 for p in model.parameters()),
    ),
]


def _with_grads(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return model


def _snapshot(model):
    return {k: (p.detach().clone(), None if p.grad is None else p.grad.clone()) for k, p in model.named_parameters()}


def _assert_unchanged(model, before):
    for k, p in model.named_parameters():
        value, grad = before[k]
        assert torch.equal(p.detach(), value), f"{k} changed"
        assert (p.grad is None and grad is None) or torch.equal(p.grad, grad), f"{k}.grad changed"


def _float64(tree):
    return pytree.tree_map(lambda v: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v, tree)


def _rows(refused: bool):
    return [pytest.param(r, marks=r.marks, id=r.id) for r in ROWS if bool(r.error) == refused]


@pytest.mark.parametrize("row", _rows(refused=True))
def test_bad_input_is_refused_and_changes_nothing(row):
    model = _with_grads(row.model())
    before = _snapshot(model)
    with pytest.raises(fxclip.FxclipError, match=row.error):
        t = fxclip.transform(model, row.loss, **{"max_grad_norm": 1.0, **row.options})
        if row.prepare:
            row.prepare(t, model)
            before = _snapshot(model)
        with row.around():
            t.step(*row.batch())
    _assert_unchanged(model, before)


@pytest.mark.parametrize("row", _rows(refused=False))
def test_unusual_input_gives_the_reference_result(row):
    model = row.model()
    options = {"max_grad_norm": 1.0, **row.options}
    t = fxclip.transform(model, row.loss, **options)
    if row.prepare:
        row.prepare(t, model)
    before = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    with row.around():
        inputs, targets = row.batch()
        result = t.step(inputs, targets)
    # the reference on copies made outside the row's context (inference tensors cannot be saved
    # for backward)
    inputs, targets = pytree.tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, (inputs, targets))
    reference = copy.deepcopy(model).double()
    grads, _ = any_per_example_grads(reference, row.loss, _float64(inputs), _float64(targets), options.get("batch_dims"))
    norms, clipped = clipped_sum(grads, t.max_grad_norm)
    tol = 1e-8 if next(model.parameters()).dtype == torch.float64 else 1e-5
    torch.testing.assert_close(result.norms.double(), norms, rtol=tol, atol=tol * float(norms.max()))
    scale = max(float(g.abs().max()) for g in clipped.values())
    for name, p in model.named_parameters():
        if p.requires_grad:  # the step adds the clipped sum to .grad
            added = p.grad.to_dense() - before[name] if name in before else p.grad.to_dense()
            torch.testing.assert_close(added.double(), clipped[name], rtol=tol, atol=tol * scale, msg=name)
    assert any(f.startswith("the whole model") for f in t.fallbacks) == row.whole_model, t.fallbacks
    if row.check:
        assert row.check(t, model, result), f"{row.id}: check failed"


@pytest.mark.parametrize("grad_mode", [torch.no_grad, torch.inference_mode])
def test_explain_and_graph_work_without_grad_mode(grad_mode):
    t = fxclip.transform(mlp(), squares, 1.0)
    with grad_mode():
        inputs, targets = regression_batch()()
        assert "0.weight" in str(t.explain(inputs, targets))
        assert "0.weight" in t.graph(inputs, targets).code()
