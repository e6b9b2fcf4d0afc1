"""The rule table: aten op -> rule, and the decorator that fills it (built-in and user rules alike).

A rule turns one call of a parameter-using op into per-example gradient forms (see
`fxclip.forms`) for the operands that carry parameters. It sees the call through `OpCall`: the
operands by schema name, the gradient at the op's output, and helpers that lay any operand out
example-major whatever its batch layout.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Mapping, Optional

import torch
from torch.fx import Node

from ..batch import BatchAxis
from ..errors import FxclipError
from ..forms import Form


@dataclass
class OpCall:
    """One call of a parameter-using op, as a rule sees it at run time."""

    node: Node
    arguments: dict[str, Any]  # schema name -> runtime value, defaults filled in
    grad: torch.Tensor  # ∂(Σ_i L_i)/∂z, laid out like z
    batch_size: int
    axes: dict[str, Optional[BatchAxis]]  # operand name (or "name.j" in a list) -> its batch axis
    output_axis: BatchAxis
    param_names: tuple[str, ...]  # operands that carry trainable parameters

    @cached_property
    def output(self) -> Any:
        """The op's output z, recomputed from the operands on first read: the step does not keep
        op outputs alive through the backward, since most rules never read them."""
        with torch.no_grad():
            return self.node.target(**self.arguments)

    def __getitem__(self, name: str) -> Any:
        """Operand by schema name; "indices.0" names element 0 of a list operand."""
        base, _, item = name.partition(".")
        value = self.arguments[base]
        return value[int(item)] if item else value

    def examples(self, name: str) -> torch.Tensor:
        """Operand `name` as [B, <that example's entries>] (see `BatchAxis.split`)."""
        return self.axes[name].split(self[name], self.batch_size)

    def grad_examples(self) -> torch.Tensor:
        """The output gradient as [B, <that example's entries>]."""
        return self.output_axis.split(self.grad, self.batch_size)


RuleFn = Callable[[OpCall], Mapping[str, Form]]


@dataclass
class Rule:
    """A rule for one aten op overload.

    `params`: the schema names of the operands this rule handles when they carry parameters
    (others fall back). `extra_check(node) -> bool` narrows when it applies (as in inductor's
    pattern matcher); when False the op's parameters go to the fallback."""

    op: Any
    fn: RuleFn
    params: tuple[str, ...]
    extra_check: Optional[Callable[[Node], bool]] = None
    name: str = ""
    source: str = ""

    def applies(self, node: Node) -> bool:
        return self.extra_check is None or bool(self.extra_check(node))


RULES: dict[Any, Rule] = {}
_FALLBACK: dict[str, Rule] = {}


def register_rule(
    op, *, params: tuple[str, ...], extra_check=None, override: bool = False
) -> Callable[[RuleFn], RuleFn]:
    """Register `fn(call: OpCall) -> {operand name: Form}` as the rule for the aten op overload
    `op` (or a list of overloads). Registering an op twice is an error unless `override=True`."""
    ops = op if isinstance(op, (list, tuple)) else [op]
    for o in ops:
        if not isinstance(o, torch._ops.OpOverload):
            raise FxclipError(
                f"register_rule needs an op overload such as torch.ops.aten.linear.default, got {o!r}"
            )
        schema_names = {a.name for a in o._schema.arguments}
        unknown = set(params) - schema_names
        if unknown:
            raise FxclipError(f"{o}: no operands named {sorted(unknown)}; its schema has {sorted(schema_names)}")

    def decorate(fn: RuleFn) -> RuleFn:
        try:
            src = f"{inspect.getsourcefile(fn)}:{inspect.getsourcelines(fn)[1]}"
        except (OSError, TypeError):
            src = "<unknown>"
        for o in ops:
            if o in RULES and not override:
                raise FxclipError(
                    f"a rule for {o} is already registered ({RULES[o].name} at {RULES[o].source}); "
                    "pass override=True to replace it"
                )
            RULES[o] = Rule(o, fn, tuple(params), extra_check, fn.__name__, src)
        return fn

    return decorate


def unregister_rule(op) -> None:
    """Remove the rule for `op` (mostly for tests and for replacing a rule in a session)."""
    RULES.pop(op, None)


def set_fallback(fn: RuleFn) -> RuleFn:
    """Install the rule used for parameter operands that no registered rule covers."""
    _FALLBACK["rule"] = Rule(None, fn, (), None, fn.__name__, f"{inspect.getsourcefile(fn)}")
    return fn


def fallback_rule() -> Rule:
    return _FALLBACK["rule"]


def find_rule(node: Node, name: str) -> Rule:
    """The rule that handles operand `name` of `node`: a registered rule that applies, else the
    fallback."""
    rule = RULES.get(node.target)
    if rule is not None and name in rule.params and rule.applies(node):
        return rule
    return fallback_rule()
