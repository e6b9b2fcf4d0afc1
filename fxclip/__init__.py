"""fxclip: fast per-example gradient clipping for DP-SGD, as a torch.fx graph rewrite.

    t = fxclip.transform(model, loss_fn, max_grad_norm=1.0)
    res = t.step(inputs, targets)   # p.grad += Σ_i min(1, C/‖g_i‖) g_i ; res.norms = ‖g_i‖
"""

from . import rules  # noqa: F401  (registers the built-in rules)
from .api import PrivateStep, StepResult, transform
from .errors import CaptureError, ExampleMixingError, FxclipError, NotCovered, ShardingError, VerificationError
from .forms import Dense, LinearForm, OneHot, PerExampleGrad
from .rules import OpCall, OpNode, register_rule, unregister_rule
from .whole_model import FallbackWarning

__all__ = [
    "transform", "PrivateStep", "StepResult", "register_rule", "unregister_rule", "OpCall", "OpNode",
    "LinearForm", "PerExampleGrad", "Dense", "OneHot",
    "FxclipError", "CaptureError", "NotCovered", "ExampleMixingError", "VerificationError", "ShardingError",
    "FallbackWarning", "PrivacyEngine",
]


def __getattr__(name: str):
    # loaded on first use: it brings in DP-SGD (dp_accounting), which `import fxclip` does not need
    if name == "PrivacyEngine":
        from .integrations.engine import PrivacyEngine

        return PrivacyEngine
    raise AttributeError(f"module 'fxclip' has no attribute {name!r}")
