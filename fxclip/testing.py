"""Checking a user's rule before trusting it with privacy: `check_rule`.

A wrong rule does not crash: it silently gives wrong per-example norms, so some examples are
clipped too little and the privacy guarantee is void. `check_rule` runs the op alone, inside a tiny
model, through fxclip with the registered rule and through a reference that never calls the rule
(torch.func's vmap(grad), or one backward pass per example where torch.func cannot transform the
op), in float64, on shapes the user chooses, and compares per-example norms and clipped sums.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from .api import transform
from .errors import FxclipError
from .reference import any_per_example_grads, clipped_sum
from .forms import STRATEGIES
from .rules.registry import RULES


class _OneOp(torch.nn.Module):
    """op(**arguments) with the operands named in `params` as trainable parameters and the other
    tensor operands as the model's inputs (in schema order)."""

    def __init__(self, op, arguments: Mapping[str, Any], params: Sequence[str]):
        super().__init__()
        self.op = op
        self.constants = {k: v for k, v in arguments.items() if k not in params and not isinstance(v, torch.Tensor)}
        self.input_names = [k for k, v in arguments.items() if k not in params and isinstance(v, torch.Tensor)]
        self.weights = torch.nn.ParameterDict({k: torch.nn.Parameter(arguments[k].detach().clone()) for k in params})

    def forward(self, *inputs):
        out = self.op(**self.constants, **dict(zip(self.input_names, inputs)), **dict(self.weights))
        return out[0] if isinstance(out, (tuple, list)) else out


def _squared_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-example loss ½‖out_i − target_i‖²: its gradient at the op's output is out − target,
    a generic (random) direction per example."""
    return 0.5 * (out - target).pow(2).flatten(1).sum(1)


@dataclass
class RuleCheck:
    """What `check_rule` compared: the largest relative errors over the strategies tried."""

    op: Any
    reference: str  # "torch.func" or "per-example loop"
    norm_error: float
    clipped_sum_error: float


def _bind(op, example_args) -> dict[str, Any]:
    if isinstance(example_args, Mapping):
        return dict(example_args)
    names = [a.name for a in op._schema.arguments]
    if len(example_args) > len(names):
        raise FxclipError(f"{op} takes {len(names)} arguments ({names}); got {len(example_args)}")
    return dict(zip(names, example_args))


def _diff_report(title: str, got: torch.Tensor, expected: torch.Tensor, labels: Sequence[str]) -> str:
    rows = [f"{title}:", f"  {'':>14} {'fxclip':>14} {'reference':>14} {'rel. error':>11}"]
    scale = float(expected.abs().max().clamp(min=1e-30))
    for label, g, e in zip(labels, got.flatten().tolist(), expected.flatten().tolist()):
        rows.append(f"  {label:>14} {g:14.6g} {e:14.6g} {abs(g - e) / scale:11.2e}")
    return "\n".join(rows)


def check_rule(
    op,
    example_args: Sequence | Mapping[str, Any],
    param_names: Sequence[str],
    *,
    rtol: float = 1e-9,
    strategies: Sequence[str] = STRATEGIES,
    seed: int = 0,
) -> RuleCheck:
    """Check the rule registered last for `op` (the one tried first) against a reference, in float64.

    `example_args`: the op's arguments for a whole batch, positionally or by schema name; every
    tensor operand not in `param_names` is an activation with the batch in dim 0, and the op's
    output must have the batch in dim 0 too. `param_names`: the operands to treat as trainable
    parameters (their values here are the parameters' values). The op runs alone in a model with
    the loss ½‖out_i − target_i‖² (random targets), for each strategy in `strategies`, with the
    clip bound at the median norm so that some examples are clipped and some are not.

    Raises AssertionError, with a per-example table, if the per-example norms or the clipped sums
    differ from the reference by more than `rtol` (relative to the largest reference value), or if
    fxclip did not use the registered rule (it fell back, or another rule matched). Returns the
    errors found otherwise."""
    if op not in RULES:
        raise FxclipError(f"no rule is registered for {op}; register one with fxclip.register_rule({op}, <operand>=fn)")
    rule = RULES[op][0]
    arguments = {
        k: v.detach().to(torch.float64) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
        for k, v in _bind(op, example_args).items()
    }
    unknown = [p for p in param_names if not isinstance(arguments.get(p), torch.Tensor)]
    if unknown:
        raise FxclipError(f"param_names {unknown} are not tensor arguments of {op} in example_args")
    model = _OneOp(op, arguments, tuple(param_names))
    inputs = tuple(arguments[k] for k in model.input_names)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        out = model(*inputs)
    targets = torch.randn(out.shape, generator=generator, dtype=out.dtype)

    ref, reference = any_per_example_grads(model, _squared_error, inputs, targets)
    ref_norms = clipped_sum(ref, 1.0)[0]
    bound = float(ref_norms.median().clamp(min=1e-12))
    ref_norms, ref_clipped = clipped_sum(ref, bound)
    labels = [f"example {i}" for i in range(len(ref_norms))]

    norm_error = clipped_error = 0.0
    for strategy in strategies:
        t = transform(model, _squared_error, bound, strategy=strategy)
        for p in model.parameters():
            p.grad = None
        result = t.step(inputs, targets)
        used = {entry.use.rule.name for entry in t.program.plan if entry.use.node.target == op}
        if used != {rule.name}:
            raise AssertionError(
                f"fxclip did not use the rule {rule.name} ({rule.source}) for {op}: it used "
                f"{sorted(used) or 'nothing'}. Check that register_rule was given a function for each of "
                f"{list(param_names)} and that its extra_check accepts this call."
            )
        scale = float(ref_norms.abs().max().clamp(min=1e-30))
        err = float((result.norms - ref_norms).abs().max()) / scale
        norm_error = max(norm_error, err)
        if err > rtol:
            raise AssertionError(
                f"the rule for {op} gives wrong per-example norms (strategy={strategy}, reference: "
                f"{reference}); largest relative error {err:.2e} > rtol={rtol:g}\n"
                + _diff_report("per-example gradient norms", result.norms, ref_norms, labels)
            )
        for name, expected in ref_clipped.items():
            got = model.get_parameter(name).grad
            scale = max(float(expected.abs().max()), 1e-30)
            err = float((got - expected).abs().max()) / scale
            clipped_error = max(clipped_error, err)
            if err > rtol:
                worst = (got - expected).abs().flatten().topk(min(5, expected.numel())).indices
                raise AssertionError(
                    f"the rule for {op} gives a wrong clipped gradient sum for '{name.removeprefix('weights.')}' "
                    f"(strategy={strategy}, reference: {reference}); largest relative error {err:.2e} > "
                    f"rtol={rtol:g}. The norms matched, so the book-keeping form (clipped_sum) is wrong, e.g. "
                    "transposed or scaled.\n"
                    + _diff_report("worst entries", got.flatten()[worst], expected.flatten()[worst],
                                   [f"entry {i}" for i in worst.tolist()])
                )
    return RuleCheck(op, reference, norm_error, clipped_error)
