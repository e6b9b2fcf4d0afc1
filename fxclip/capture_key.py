"""When a captured step still fits the model and the batch: the key `PrivateStep` keeps each
capture under.

torch.export captures one call of the model with only the batch size symbolic. Everything else it
met is fixed in the graph: every other size, dtype and device of the inputs and targets, their
structure (how many inputs, a dict's keys in order), Python numbers among the targets, the module
tree (types, training flags, hooks, every attribute holding a number, string or function, such as
a dropout's p or a layer's activation), the parameters (shapes, dtypes, which are trainable) and
buffers, and the autocast state. `capture_key` holds all of these, so a step on a model or batch
that differs in any of them captures again instead of running the graph of another model; a
model whose Python state changes on every step (a counter attribute) is captured every step,
and `PrivateStep` warns when that happens often. What the key cannot see stays fixed at capture:
global Python state and values a function closes over.
"""

from __future__ import annotations

import functools
import types

import torch
import torch.utils._pytree as pytree
from torch.nn.modules import module as module_globals

# attribute values a forward may read as Python constants (compared by value) and functions
# (compared by identity); exact types, a set lookup: the key is built on every step
_SCALARS = frozenset({bool, int, float, complex, str, type(None), torch.dtype, torch.device, torch.memory_format})
_FUNCTIONS = frozenset({types.FunctionType, types.MethodType, types.BuiltinFunctionType, functools.partial, type})
_MODULE_INTERNALS = frozenset(vars(torch.nn.Module())) - {"training"}  # hooks are keyed on their own
_GLOBAL_HOOKS = ("_global_forward_pre_hooks", "_global_forward_hooks", "_global_backward_pre_hooks", "_global_backward_hooks")


def capture_key(model: torch.nn.Module, loss_fn, inputs: tuple, targets, batch_dims: tuple) -> tuple:
    """(part, value) pairs; two steps share a capture iff their keys are equal."""
    leaves, spec = pytree.tree_flatten(targets)
    return (
        ("autocast", autocast_state(inputs)),
        ("inputs", tuple(_tensor_key(x, d) for x, d in zip(inputs, batch_dims))),
        ("targets", (spec, tuple(_tensor_key(t, 0) if isinstance(t, torch.Tensor) else _value_key(t) for t in leaves))),
        ("modules", _modules_key(model) + (_modules_key(loss_fn) if isinstance(loss_fn, torch.nn.Module) else ())),
        ("global hooks", tuple(k for h in _GLOBAL_HOOKS for k in getattr(module_globals, h))),
    )


def key_change(old: tuple, new: tuple) -> str:
    """What differs between two capture keys, in words (for the warning on frequent captures)."""
    for (part, a), (_, b) in zip(old, new):
        if a == b:
            continue
        if part == "modules" and len(a) == len(b):
            was, now = next((x, y) for x, y in zip(a, b) if x != y)
            return f"module {was[0] or '<root>'!r} changed: {_entry_change(was, now)}"
        return f"{part} changed: {a} -> {b}"
    return "nothing"


def autocast_state(inputs) -> tuple:
    """(device type, dtype) of each autocast region enabled for the inputs' devices, or ()."""
    devices = sorted({x.device.type for x in inputs if isinstance(x, torch.Tensor)} | {"cpu"})
    return tuple((d, torch.get_autocast_dtype(d)) for d in devices if torch.is_autocast_enabled(d))


def _tensor_key(t: torch.Tensor, batch_dim: int) -> tuple:
    sizes = tuple(None if i == batch_dim else s for i, s in enumerate(t.shape))
    return (t.dtype, t.device, sizes)


def _value_key(value):
    """A Python leaf of the targets: captured as a constant, so its value is part of the key."""
    return value if type(value) in _SCALARS else (type(value), id(value))


def _modules_key(model: torch.nn.Module) -> tuple:
    """Per module: name, type, attributes, hooks, parameters (shape, dtype, device, trainable)
    and buffers."""
    out = []
    for name, m in _modules(model):
        d = vars(m)
        out.append((
            name,
            type(m),
            _attributes(d),
            (*d["_forward_pre_hooks"], *d["_forward_hooks"], *d["_backward_pre_hooks"], *d["_backward_hooks"]),
            tuple([(k, p.shape, p.dtype, p.device, p.requires_grad) for k, p in d["_parameters"].items() if p is not None]),
            tuple([(k, b.shape, b.dtype, b.device) for k, b in d["_buffers"].items() if b is not None]),
        ))
    return tuple(out)


def _modules(root: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """`root.named_modules(remove_duplicate=False)`, walked without nested generators (each yield
    passes through every enclosing generator: that walk cost 2x this one on the zoo)."""
    out, stack = [], [("", root)]
    while stack:
        name, m = stack.pop()
        out.append((name, m))
        if m._modules:
            prefix = name + "." if name else ""
            stack.extend([(prefix + k, c) for k, c in reversed(m._modules.items()) if c is not None])
    return out


def _attributes(attributes: dict) -> tuple:
    """A module's own attributes a forward may read as constants: numbers, strings and tuples of
    them by value, functions (an activation, a replaced forward) by identity."""
    out = []
    for k, v in attributes.items():
        kind = type(v)
        if k in _MODULE_INTERNALS:
            continue
        if kind in _SCALARS or (kind is tuple and all(type(e) in _SCALARS for e in v)):
            out.append((k, v))
        elif kind in _FUNCTIONS:
            out.append((k, id(v)))
    return tuple(out)


def _entry_change(was: tuple, now: tuple) -> str:
    fields = ("name", "type", "attributes", "hooks", "parameters", "buffers")
    return "; ".join(f"{f} {a} -> {b}" for f, a, b in zip(fields, was, now) if a != b)
