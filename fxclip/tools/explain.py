"""What fxclip did to a model, as a table: `PrivateStep.explain()` and `fxclip inspect`.

One row per trainable parameter (each exactly once), with a line per op that uses it: the op, its
module path, the rule that matched (and where that rule is defined), the strategy chosen (ghost,
materialize or fallback), the shapes the cost formulas were evaluated on, each strategy's cost
(per-example multiply-adds; the sympy formulas are printed under the table) and the extra memory
the chosen strategy needs. Fallbacks and shared parameters are marked and listed after the table.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

import sympy
import torch

from fxclip.errors import FxclipError
from fxclip.forms import MEMORY_COST
from fxclip.passes.program import run
from fxclip.provenance import module_of

_PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the directory that holds fxclip/


def short_source(source: str) -> str:
    """A rule's 'file:line', relative to fxclip's checkout or the working directory when inside."""
    path, _, line = source.rpartition(":")
    if not line.isdigit():
        path, line = source, ""
    for root in (_PACKAGE_ROOT, Path.cwd()):
        try:
            path = str(Path(path).resolve().relative_to(root))
            break
        except ValueError:
            continue
    return f"{path}:{line}" if line else path


@dataclass
class UseRow:
    """One op that uses a parameter, and what fxclip does there."""

    op: str  # the aten (or custom) op overload
    module: str  # "path (Class)" of the module that called it
    operand: str  # the op's schema name for the parameter operand
    rule: str  # the rule's function name ("per_example_vjp" for the fallback)
    source: str  # where the rule is defined, file:line
    strategy: str  # "ghost", "materialize" or "fallback"
    forced: bool  # the strategy was forced by transform(strategy=...)
    component: str  # "separate", "shared" or "general" (see passes.emit.Component)
    shapes: dict = field(default_factory=dict)  # T, k_L, k_R, G the costs were evaluated on
    formulas: dict = field(default_factory=dict)  # strategy -> sympy expression (linear forms)
    flops: dict = field(default_factory=dict)  # strategy -> value of its formula
    memories: dict = field(default_factory=dict)  # strategy -> its extra elements per example
    memory: int = 0  # extra elements per example for the chosen strategy


@dataclass
class ParamRow:
    """A trainable parameter and every op that uses it (none if it does not reach the loss)."""

    name: str
    shape: tuple
    uses: list[UseRow]

    @property
    def fallback(self) -> bool:
        return any(u.strategy == "fallback" for u in self.uses)

    @property
    def shared(self) -> bool:
        """Used whole by several ops (tied, recurrent): its norm is ‖Σ_u G_u‖², not a sum."""
        return any(u.component == "shared" for u in self.uses)


@dataclass
class Explanation:
    """The plan of a `PrivateStep` as rows; `str()` renders the table."""

    model: str
    requested_strategy: str
    batch_size: int | None  # None when explained from the last step without example inputs
    element_size: int  # bytes per element of the norm arithmetic
    rows: list[ParamRow]
    extra_memory_per_example: int  # elements, each shared component counted once

    @property
    def fallbacks(self) -> list[ParamRow]:
        return [r for r in self.rows if r.fallback]

    @property
    def shared(self) -> list[ParamRow]:
        return [r for r in self.rows if r.shared]

    def row(self, name: str) -> ParamRow:
        """The row of parameter `name`."""
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"{name} is not a trainable parameter of {self.model}")

    def __str__(self) -> str:
        return render(self)


def _use_row(entry, strategy_requested: str) -> UseRow:
    use, costs = entry.use, entry.costs
    path, cls = module_of(use.node)
    if costs:
        memory = costs["memory"][entry.strategy]
    else:  # a materialized per-example gradient of the operand
        memory = math.prod(use.value.meta["val"].shape)
    return UseRow(
        op=str(use.node.target),
        module=f"{path} ({cls})" if path else "?",
        operand=use.operand,
        rule=use.rule.name,
        source=short_source(use.rule.source),
        strategy=entry.strategy,
        forced=bool(costs) and strategy_requested != "auto",
        component=entry.component.kind,
        shapes=dict(costs.get("shapes", {})),
        formulas=dict(costs.get("formulas", {})),
        flops=dict(costs.get("flops", {})),
        memories=dict(costs.get("memory", {})),
        memory=int(memory),
    )


def explain(step, inputs=None, targets=None) -> Explanation:
    """The plan of `step` (a `PrivateStep`): from a dry run on (inputs, targets) when given (no
    gradients are written), else from the last `step()`."""
    if inputs is not None:
        bound = step.bind(inputs, targets)
        clipping, bound_arg = step.clip_settings
        output, plan = run(bound.program.step_plan, bound.flat_args, bound_arg, step.strategy, clipping=clipping)
        batch = output.losses.shape[0]
    else:
        if not any(capture.completed for capture in step.captures):
            raise FxclipError(
                "explain() has no plan yet: run t.step(inputs, targets) first, or pass a batch, "
                "t.explain(inputs, targets), to plan it without writing gradients"
            )
        plan = step.program.plan
        batch = None
    by_param: dict[str, list[UseRow]] = {}
    counted, extra = set(), 0
    for entry in plan:
        row = _use_row(entry, step.strategy)
        for p in entry.use.params:
            by_param.setdefault(p, []).append(row)
        key = id(entry.component) if entry.component.kind == "shared" and entry.costs else id(entry)
        if key not in counted:
            counted.add(key)
            extra += row.memory
    rows = [
        ParamRow(name, tuple(p.shape), by_param.get(name, []))
        for name, p in step.model.named_parameters()
        if p.requires_grad
    ]
    dtype = next((p.dtype for p in step.model.parameters()), torch.float32)
    element_size = torch.empty((), dtype=torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype).element_size()
    return Explanation(type(step.model).__name__, step.strategy, batch, element_size, rows, extra)


# ---- rendering ---------------------------------------------------------------------------------

HEADERS = ("parameter", "shape", "op", "module", "rule (source)", "strategy", "T, k_L, k_R, G", "ghost", "materialize", "extra/example")


def _count(n: int) -> str:
    return f"{n:,}"


def _cells(row: ParamRow, use: UseRow | None, first: bool, legend: dict) -> list[str]:
    mark = "!" if row.fallback else ("=" if row.shared else " ")
    name = f"{mark} {row.name}" if first else ""
    shape = "×".join(map(str, row.shape)) or "scalar" if first else ""
    if use is None:
        return [name, shape, "—", "—", "—", "unused (no gradient)", "", "", "", "0"]
    strategy = "FALLBACK" if use.strategy == "fallback" else use.strategy + (" (forced)" if use.forced else "")
    costs = []
    if use.formulas:
        key = tuple(use.formulas[s] for s in ("ghost", "materialize"))
        letter = legend.setdefault(key, ("abcdefghijklmnopqrstuvwxyz"[len(legend)], use.formulas))[0]
        for s in ("ghost", "materialize"):
            costs.append(f"{'*' if s == use.strategy else ' '}{_count(use.flops[s])} [{letter}]")
        shapes = ", ".join(str(use.shapes[k]) for k in ("T", "k_L", "k_R", "G"))
    else:
        costs, shapes = ["—", "—"], "per-example grad"
    return [name, shape, use.op, use.module, f"{use.rule} ({use.source})", strategy, shapes, *costs, _count(use.memory)]


def _runs(items: list, key=lambda x: x) -> list[tuple]:
    """(first item, count) for each run of consecutive items with equal keys: a recurrent layer's
    step-by-step uses of one weight are one line, not one per step."""
    return [(group[0], len(group)) for group in (list(g) for _, g in itertools.groupby(items, key))]


def render(exp: Explanation) -> str:
    """The explanation as a fixed-width table, the cost formulas, and notes on fallbacks and
    shared parameters."""
    legend: dict = {}
    lines = []
    for row in exp.rows:
        for i, (use, count) in enumerate(_runs(row.uses) or [(None, 1)]):
            cells = _cells(row, use, i == 0, legend)
            cells[2] += f" ×{count}" if count > 1 else ""
            lines.append(cells)
    widths = [max(len(h), *(len(c[j]) for c in lines)) for j, h in enumerate(HEADERS)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    batch = f"batch {exp.batch_size}" if exp.batch_size is not None else "last step"
    out = [
        f"fxclip plan for {exp.model} ({batch}; strategy={exp.requested_strategy}; "
        f"{len(exp.rows)} trainable parameters)",
        fmt(HEADERS),
        fmt(["-" * w for w in widths]),
        *(fmt(c) for c in lines),
        "",
        "Costs are multiply-adds per example for the squared norm; * marks the strategy chosen",
        f"(auto: the least multiply-adds + {MEMORY_COST} x extra elements per example, within memory_budget).",
        "T: positions per example, k_L/k_R: widths of the two factors (G_i = L_iᵀR_i), G: groups.",
    ]
    for letter, formulas in legend.values():
        for i, strategy in enumerate(("ghost", "materialize")):
            equation = sympy.Eq(sympy.Symbol(strategy), formulas[strategy], evaluate=False)
            text = sympy.pretty(equation, use_unicode=True, wrap_line=False).splitlines()
            prefix = f"[{letter}] " if i == 0 else "    "
            out += [(prefix if j == len(text) - 1 else " " * len(prefix)) + t for j, t in enumerate(text)]
    per_example = exp.extra_memory_per_example
    memory = f"Extra memory for per-example norms: {_count(per_example)} elements per example"
    if exp.batch_size is not None:
        total = per_example * exp.batch_size * exp.element_size
        memory += f", {total / 2**20:.2f} MiB for the batch of {exp.batch_size}"
    out.append(memory + ".")
    for row in exp.shared:
        runs = _runs(row.uses, key=lambda u: (u.op, u.module))
        ops = ", ".join(f"{u.op} in {u.module}" + (f" ×{n}" if n > 1 else "") for u, n in runs)
        out.append(f"= {row.name} is shared by {len(row.uses)} uses ({ops}): its norm is ‖Σ_u G_u‖², computed together.")
    for row in exp.fallbacks:
        for use in row.uses:
            if use.strategy == "fallback":
                out.append(
                    f"! {row.name}: no rule covers {use.op} in {use.module}; the fallback materializes "
                    f"per-example gradients op by op (torch.func). Register a rule: "
                    f"fxclip.register_rule({use.op}, {use.operand}=...) (docs/custom_rules.md)."
                )
    return "\n".join(out)
