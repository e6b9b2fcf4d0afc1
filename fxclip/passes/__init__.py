"""The passes, in order. Each is `pass(graph module, context) -> graph module` with a docstring
stating what it guarantees; `run_passes` checks the graph after each one."""

from __future__ import annotations

from torch.fx import GraphModule

from .analyze import analyze
from .capture import capture
from .context import Context, ParamUse
from .decompose import decompose
from .emit import StepProgram, emit
from .functionalize import functionalize
from .match import match

PASSES = [capture, functionalize, decompose, analyze, match, emit]


def run_passes(ctx: Context) -> StepProgram:
    gm: GraphModule | None = None
    for p in PASSES:
        gm = p(gm, ctx)
        gm.graph.lint()
    return ctx.program


__all__ = ["PASSES", "Context", "ParamUse", "StepProgram", "run_passes"]
