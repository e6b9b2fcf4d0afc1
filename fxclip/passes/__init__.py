"""The passes, in order. Each is `pass(graph module, context) -> graph module` with a docstring
stating what it guarantees; `run_passes` checks the graph after each one."""

from __future__ import annotations

from torch.fx import GraphModule

from .analyze import analyze
from .capture import capture
from .context import Context, ParamUse
from .decompose import decompose
from .emit import StepPlan, emit
from .functionalize import functionalize
from .match import match
from .program import StepProgram

PASSES = [capture, functionalize, decompose, analyze, match, emit]


def run_passes(ctx: Context) -> StepProgram:
    """The passes in order on `ctx`; the program that runs emit's plan."""
    gm: GraphModule | None = None
    for p in PASSES:
        gm = p(gm, ctx)
        gm.graph.lint()
    return StepProgram(ctx.plan)


__all__ = ["PASSES", "Context", "ParamUse", "StepPlan", "StepProgram", "run_passes"]
