"""Checks of numeric and boolean arguments (privacy parameters, sizes, counts, switches) shared by
fxclip's modules.

Each raises ValueError (or the subclass given as `error`: `transform` passes FxclipError) saying
which argument is wrong, what it got, and what is allowed. Bools are refused although Python counts
them as integers: `steps=True` is a mistake, not 1.
"""

from __future__ import annotations

import math
import numbers
import operator

_COMPARE = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}


def check_number(
    name: str,
    value,
    *,
    above: float | None = None,
    at_least: float | None = None,
    below: float | None = None,
    at_most: float | None = None,
    hint: str = "",
    error: type[ValueError] = ValueError,
) -> float:
    """`value` as a float, after checking it is a finite real number (Python, NumPy or a 0-d tensor;
    not a bool, nor a string) that is > `above`, >= `at_least`, < `below` and <= `at_most` (each
    bound only if given)."""
    given = ((">", above), (">=", at_least), ("<", below), ("<=", at_most))
    limits = {op: limit for op, limit in given if limit is not None}
    number = value.item() if getattr(value, "shape", None) == () and hasattr(value, "item") else value
    ok = isinstance(number, numbers.Real) and not isinstance(number, bool) and math.isfinite(number)
    if not (ok and all(_COMPARE[op](number, limit) for op, limit in limits.items())):
        allowed = " and ".join(f"{op} {limit:g}" for op, limit in limits.items())
        raise error(f"{name} must be a finite number {allowed}, got {value!r}.{hint and ' ' + hint}")
    return float(number)


def check_integer(name: str, value, *, at_least: int = 0, hint: str = "", error: type[ValueError] = ValueError) -> int:
    """`value` as an int, after checking it is an integer (Python, NumPy or a 0-d integer tensor;
    not a bool or a float, even an integral one) that is >= `at_least`."""
    try:
        number = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        number = None
    if number is None or number < at_least:
        raise error(f"{name} must be an integer >= {at_least}, got {value!r}.{hint and ' ' + hint}")
    return number


def check_bool(name: str, value, *, hint: str = "", error: type[ValueError] = ValueError) -> bool:
    """`value` after checking it is True or False (not a string such as "no", nor a number)."""
    if not isinstance(value, bool):
        raise error(f"{name} must be True or False, got {value!r}.{hint and ' ' + hint}")
    return value
