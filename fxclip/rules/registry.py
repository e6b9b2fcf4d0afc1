"""The rule table: aten op -> its rules, tried in order, and `register_rule`, which fills it for
built-in and user rules alike.

A rule gives, for each operand that may carry a parameter, a function from one call of the op to
that operand's per-example gradient form (see `fxclip.forms`), as JAX's `defjvp` gives one
function per operand. It sees the call through `OpCall`: the operands by schema name, the
gradient at the op's output, and helpers that lay any operand out example-major whatever its
batch layout. An op may have several rules, as a target of Inductor's pattern matcher has several
patterns: the newest first, the first whose `extra_check` accepts the node (seen as an `OpNode`)
handles it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Mapping, Optional

import torch
import torch.utils._pytree as pytree
from torch.fx import Node

from ..batch import BatchAxis
from ..errors import FxclipError
from ..forms import Form
from ..schema import argument_nodes


def _by_name(arguments: Mapping[str, Any], name: str) -> Any:
    """An argument by schema name; "indices.0" names element 0 of a list argument."""
    base, _, item = name.partition(".")
    value = arguments[base]
    return value[int(item)] if item else value


@dataclass
class OpCall:
    """One call of a parameter-using op, as a rule sees it at run time."""

    node: Node
    arguments: dict[str, Any]  # schema name -> runtime value, defaults filled in
    grad: torch.Tensor  # ∂(Σ_i L_i)/∂z, laid out like z
    batch_size: int
    axes: dict[str, Optional[BatchAxis]]  # operand name (or "name.j" in a list) -> its batch axis
    output_axis: BatchAxis
    param_names: tuple[str, ...]  # the operands this call of the rule makes forms for

    @cached_property
    def output(self) -> Any:
        """The op's output z, recomputed from the operands on first read: the step does not keep
        op outputs alive through the backward, since most rules never read them."""
        with torch.no_grad():
            return self.node.target(**self.arguments)

    def __getitem__(self, name: str) -> Any:
        """Operand by schema name; "indices.0" names element 0 of a list operand."""
        return _by_name(self.arguments, name)

    def examples(self, name: str) -> torch.Tensor:
        """Operand `name` as [B, <that example's entries>] (see `BatchAxis.split`)."""
        return self.axes[name].split(self[name], self.batch_size)

    def grad_examples(self) -> torch.Tensor:
        """The output gradient as [B, <that example's entries>]."""
        return self.output_axis.split(self.grad, self.batch_size)


def _first(axis):
    return axis[0] if isinstance(axis, tuple) else axis


class OpNode:
    """A parameter-using op's node, as an `extra_check` sees it when the model is captured:
    arguments by schema name, tensors as their fake values (shape and dtype, no data), and batch
    axes. `arguments` holds the raw fx arguments (Nodes and constants) for structural checks."""

    def __init__(self, node: Node):
        self.node = node
        self.arguments = argument_nodes(node)

    def __getitem__(self, name: str) -> Any:
        """Argument by schema name ("indices.0": element 0 of a list): a constant, or a tensor
        operand's fake value."""
        return _static(_by_name(self.arguments, name))

    def batch_axis(self, name: str) -> Optional[BatchAxis]:
        """The batch axis of tensor operand `name`, None where it holds no batch."""
        value = _by_name(self.arguments, name)
        return _first(value.meta.get("fxclip_batch_axis")) if isinstance(value, Node) else None

    @property
    def output_axis(self) -> Optional[BatchAxis]:
        """The batch axis of the op's output (of its first output, for several)."""
        return _first(self.node.meta.get("fxclip_batch_axis"))

    @property
    def output(self) -> Any:
        """The op's output as a fake value (a tuple for several outputs)."""
        return self.node.meta.get("val")

    def has_complex_values(self) -> bool:
        """Whether any tensor operand or output is complex."""
        values = [_static(v) for v in self.arguments.values()] + [self.output]
        flat = pytree.tree_leaves(values)
        return any(isinstance(v, torch.Tensor) and v.is_complex() for v in flat)


def _static(value: Any) -> Any:
    if isinstance(value, Node):
        return value.meta.get("val")
    if isinstance(value, (list, tuple)):
        return type(value)(_static(v) for v in value)
    return value


OperandRule = Callable[[OpCall], Form]
ExtraCheck = Callable[[OpNode], bool]


@dataclass(eq=False)
class Rule:
    """The rule for some ops: `operands` maps each operand it handles (when that operand carries a
    parameter) to its form; `extra_check(OpNode) -> bool` narrows the calls it handles (when False,
    the op's next rule is tried, and at last the fallback)."""

    operands: Mapping[str, OperandRule]
    extra_check: Optional[ExtraCheck] = None
    name: str = ""
    source: str = ""  # where it was registered, "file:line"

    def handles(self, node: OpNode, operand: str) -> bool:
        return operand in self.operands and (self.extra_check is None or bool(self.extra_check(node)))

    def __call__(self, call: OpCall) -> dict[str, Form]:
        """The forms of the operands in `call.param_names`."""
        return {name: self.operands[name](call) for name in call.param_names}


RULES: dict[Any, list[Rule]] = {}


def call_site(depth: int = 2) -> str:
    """"file:line" of the code that called the function calling this (`depth` frames up)."""
    frame = inspect.currentframe()
    for _ in range(depth):
        frame = frame.f_back
    return f"{frame.f_code.co_filename}:{frame.f_lineno}"


def _check_op(op, operands) -> None:
    if not isinstance(op, torch._ops.OpOverload):
        raise FxclipError(f"register_rule needs an op overload such as torch.ops.aten.linear.default, got {op!r}")
    schema_names = {a.name for a in op._schema.arguments}
    unknown = set(operands) - schema_names
    if unknown:
        raise FxclipError(f"{op}: no operands named {sorted(unknown)}; its schema has {sorted(schema_names)}")


def add_rule(ops, rule: Rule, override: bool = False) -> Rule:
    """Put `rule` first among the rules of each op in `ops` (an op overload or a list of them), or,
    with `override`, in place of them. A rule without an `extra_check` would hide an existing rule
    for the same operands entirely, so that is an error unless `override`."""
    ops = ops if isinstance(ops, (list, tuple)) else [ops]
    for op in ops:
        _check_op(op, rule.operands)
        hidden = [r for r in RULES.get(op, []) if set(r.operands) & set(rule.operands)]
        if hidden and rule.extra_check is None and not override:
            raise FxclipError(
                f"a rule for {op} is already registered ({hidden[0].name} at {hidden[0].source}); give the "
                "new rule an extra_check for the calls it handles (it is then tried first), or pass "
                "override=True to replace the op's rules"
            )
    for op in ops:
        RULES[op] = [rule] if override else [rule, *RULES.get(op, [])]
    return rule


def register_rule(op, *, extra_check: Optional[ExtraCheck] = None, name: str | None = None, override: bool = False,
                  **operands: OperandRule) -> Rule:
    """Register a rule for the aten op overload `op` (or a list of overloads): one function per
    operand that may carry a parameter, by schema name, each `fn(call: OpCall) -> Form`, e.g.
    `register_rule(aten.linear.default, weight=linear_weight, bias=linear_bias)`.

    The rule is tried before the op's earlier rules, for the calls its `extra_check(OpNode)`
    accepts; one without an `extra_check` for operands an earlier rule handles needs
    `override=True`, which replaces the op's rules. `name` (default: the first function's name)
    is what `explain()` shows. Returns the `Rule`."""
    not_functions = [f"{k}={v!r}" for k, v in operands.items() if not callable(v)]
    if not operands or not_functions:
        raise FxclipError(
            "register_rule takes one function per operand that may carry a parameter, "
            f"register_rule(op, weight=fn) with fn(call) -> Form; got {', '.join(not_functions) or 'none'} "
            "(params=(...) with a decorated function returning {operand: Form} is gone: docs/custom_rules.md)"
        )
    name = name or next(iter(operands.values())).__name__
    return add_rule(op, Rule(operands, extra_check, name, call_site()), override)


def unregister_rule(rule_or_op) -> None:
    """Remove a `Rule` (wherever it is registered) or every rule of an op."""
    if not isinstance(rule_or_op, Rule):
        RULES.pop(rule_or_op, None)
        return
    for op in [op for op, rules in RULES.items() if rule_or_op in rules]:
        RULES[op] = [r for r in RULES[op] if r is not rule_or_op]
        if not RULES[op]:
            del RULES[op]


class _FallbackRule(Rule):
    """The fallback: one function for all the parameter operands of a call."""

    def __init__(self, fn: Callable[[OpCall], Mapping[str, Form]]):
        super().__init__({}, None, fn.__name__, inspect.getsourcefile(fn))
        self.fn = fn

    def __call__(self, call: OpCall) -> dict[str, Form]:
        return dict(self.fn(call))


_fallback: Optional[Rule] = None


def set_fallback(fn: Callable[[OpCall], Mapping[str, Form]]):
    """Install `fn(call) -> {operand: Form}` as the rule for parameter operands that no registered
    rule handles."""
    global _fallback
    _fallback = _FallbackRule(fn)
    return fn


def fallback_rule() -> Rule:
    return _fallback


def find_rule(node: Node, operand: str) -> Rule:
    """The rule that handles operand `operand` of `node`: the first of the op's rules that does,
    else the fallback. An extra_check may raise `NotCovered` when no per-op treatment can be right
    (the whole-model fallback then takes the model)."""
    view = OpNode(node)
    return next((rule for rule in RULES.get(node.target, []) if rule.handles(view, operand)), fallback_rule())
