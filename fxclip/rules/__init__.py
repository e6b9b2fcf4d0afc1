"""Rules, one op family per file. Importing this package registers the built-in rules."""

from . import conv, elementwise, embedding, fallback, linear, norm, repeat  # noqa: F401  (registration)
from .registry import RULES, OpCall, Rule, find_rule, register_rule, unregister_rule

__all__ = ["RULES", "OpCall", "Rule", "find_rule", "register_rule", "unregister_rule"]
