"""Rules, one op family per file, and what rules are made of. Importing this package registers the
built-in rules."""

from . import conv, elementwise, embedding, fallback, linear, norm, repeat  # noqa: F401  (registration)
from .helpers import Rows, bias_form, bilinear_rule, broadcast_rule, one, per_example_sum_to, positions
from .registry import RULES, OpCall, OpNode, Rule, find_rule, register_rule, unregister_rule

__all__ = [
    "RULES", "OpCall", "OpNode", "Rule", "find_rule", "register_rule", "unregister_rule",
    "bilinear_rule", "broadcast_rule", "Rows", "one", "positions", "bias_form", "per_example_sum_to",
]
