"""The clip factor, one definition for the step, the reference and the naive method; the clipping
styles; and what every kind of private step returns.

Styles (`transform(..., clipping=...)`), with example i's gradient g_i and the bound C:
  "flat"       g_i scaled by min(1, C / (‖g_i‖ + EPS)); sensitivity C
  "per_layer"  parameter group j of example i scaled by min(1, C_j / (‖g_ij‖ + EPS)), one bound per
               group (per trainable parameter, or per block of them); sensitivity sqrt(Σ_j C_j²)
  "automatic"  g_i scaled by C / (‖g_i‖ + γ) (Bu et al., "Automatic clipping"); sensitivity C
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, NamedTuple, Sequence

import torch

from .checks import check_number
from .errors import FxclipError

EPS = 1e-6  # keeps the factor finite for a zero gradient
STYLES = ("flat", "per_layer", "automatic")
AUTOMATIC_GAMMA = 0.01  # automatic clipping's stability constant γ (Bu et al.'s default)


def clip_factors(norms: torch.Tensor, max_grad_norm) -> torch.Tensor:
    """min(1, C / (‖g_i‖ + EPS)) per example; C a number or a per-example tensor (per group: norms
    [B, G] with bounds [G] or [B, G])."""
    return (max_grad_norm / (norms + EPS)).clamp(max=1.0)


@dataclass(frozen=True)
class Clipping:
    """What a step's clipping is, apart from the bound values (which the step takes as a tensor,
    so that a compiled step does not recompile when they change): the style, for "per_layer" the
    parameter names of each group (one bound each, in the order of the bounds), and γ."""

    style: str = "flat"
    groups: tuple[tuple[str, ...], ...] = ()
    gamma: float = AUTOMATIC_GAMMA

    @property
    def per_group(self) -> bool:
        return self.style == "per_layer"

    def column_of(self) -> dict[str, int]:
        """Each parameter's group (its column in per-group norms and factors)."""
        return {name: j for j, group in enumerate(self.groups) for name in group}

    def factors(self, norms: torch.Tensor, bounds) -> torch.Tensor:
        """Clip factors from norms ([B], or [B, G] per group) and bounds (a number or tensor that
        broadcasts against them)."""
        if self.style == "automatic":
            return bounds / (norms + self.gamma)
        return clip_factors(norms, bounds)


FLAT = Clipping()


def bound_values(max_grad_norm) -> tuple[float, ...]:
    """The bound(s) as a tuple of floats (one for flat and automatic, one per group for
    per_layer), for comparing and for building the bound tensor."""
    if isinstance(max_grad_norm, torch.Tensor):
        return tuple(float(v) for v in max_grad_norm.reshape(-1).tolist())
    if isinstance(max_grad_norm, (tuple, list)):
        return tuple(float(v) for v in max_grad_norm)
    return (float(max_grad_norm),)


def sensitivity(style: str, bounds: Sequence[float]) -> float:
    """How far one example can move the clipped sum: C, or sqrt(Σ_j C_j²) per group."""
    return math.sqrt(sum(b * b for b in bounds)) if style == "per_layer" else float(bounds[0])


# ---- per_layer bounds ---------------------------------------------------------------------------


def checked_per_layer_bounds(max_grad_norm) -> tuple | dict:
    """`max_grad_norm` for clipping="per_layer", checked without the model: a list (tuple) of
    bounds, or a dict whose keys are names (a parameter's or a module's) or tuples of them, each
    bound finite and > 0; returned as a tuple of floats or a dict of floats."""
    hint = 'Each is the clip bound C_j of one group; see fxclip.transform(clipping="per_layer").'
    if isinstance(max_grad_norm, Mapping):
        out, seen = {}, {}
        for key, value in max_grad_norm.items():
            names = key if isinstance(key, tuple) else (key,)
            if not names or not all(isinstance(n, str) for n in names):
                raise FxclipError(
                    f"max_grad_norm's keys must be parameter or module names (str), or tuples of them for a group "
                    f"sharing one bound; got the key {key!r}"
                )
            for n in names:
                if n in seen:
                    raise FxclipError(f"max_grad_norm names {n!r} in two groups ({seen[n]!r} and {key!r}): give each parameter one bound")
                seen[n] = key
            out[key] = check_number(f"max_grad_norm[{key!r}]", value, above=0, hint=hint, error=FxclipError)
        if not out:
            raise FxclipError("max_grad_norm is an empty dict: give every trainable parameter a bound")
        return out
    if isinstance(max_grad_norm, (list, tuple)) or (isinstance(max_grad_norm, torch.Tensor) and max_grad_norm.dim() == 1):
        values = list(max_grad_norm)
        if not values:
            raise FxclipError("max_grad_norm is an empty list: give one bound per trainable parameter")
        return tuple(check_number(f"max_grad_norm[{j}]", v, above=0, hint=hint, error=FxclipError) for j, v in enumerate(values))
    raise FxclipError(
        'clipping="per_layer" takes max_grad_norm as a list with one bound per trainable parameter (in '
        "model.parameters() order) or a dict {parameter or module name, or a tuple of names: bound}; got "
        f"{max_grad_norm!r}"
    )


def per_layer_groups(bounds: tuple | dict, model: torch.nn.Module) -> tuple[tuple[tuple[str, ...], ...], tuple[float, ...]]:
    """The groups of trainable parameters and their bounds, for `model` as it is now: a list gives
    one group per trainable parameter (model.parameters() order); a dict's key is a parameter, a
    module (its trainable parameters) or a tuple of these. Every trainable parameter must be in
    exactly one group; a name that is not a trainable parameter or module of the model is an
    error naming it."""
    params = dict(model.named_parameters())
    trainable = [k for k, p in params.items() if p.requires_grad]
    if isinstance(bounds, tuple):
        if len(bounds) != len(trainable):
            raise FxclipError(
                f"max_grad_norm has {len(bounds)} per-layer bounds but the model has {len(trainable)} trainable "
                f"parameters ({_listed(trainable)}): give one bound per trainable parameter, in model.parameters() "
                "order, or a dict {name: bound}"
            )
        return tuple((k,) for k in trainable), bounds
    modules = {name for name, _ in model.named_modules()}
    groups, owner = [], {}
    for key in bounds:
        members = []
        for name in key if isinstance(key, tuple) else (key,):
            if name in params:
                if not params[name].requires_grad:
                    raise FxclipError(f"max_grad_norm names {name!r}, which is frozen (requires_grad=False): bound only trainable parameters")
                found = [name]
            elif name in modules:
                prefix = f"{name}." if name else ""
                found = [k for k in trainable if k.startswith(prefix)]
                if not found:
                    raise FxclipError(f"max_grad_norm names the module {name!r}, which has no trainable parameter")
            else:
                raise FxclipError(
                    f"max_grad_norm names {name!r}, which is not a trainable parameter or a module of the model "
                    f"(its trainable parameters: {_listed(trainable)})"
                )
            for k in found:
                if k in owner:
                    raise FxclipError(f"parameter {k!r} is in two groups of max_grad_norm ({owner[k]!r} and {key!r}): give each parameter one bound")
                owner[k] = key
            members += found
        groups.append(tuple(members))
    missing = [k for k in trainable if k not in owner]
    if missing:
        raise FxclipError(f"max_grad_norm gives no bound for the trainable parameter(s) {_listed(missing)}: every trainable parameter needs one")
    return tuple(groups), tuple(bounds.values())


def _listed(names: list[str], most: int = 6) -> str:
    shown = ", ".join(repr(n) for n in names[:most])
    return shown + (f", ... ({len(names)} in all)" if len(names) > most else "")


class _StepOutputFields(NamedTuple):
    losses: torch.Tensor
    norms: torch.Tensor
    clip_factors: torch.Tensor
    grads: dict[str, torch.Tensor]


class StepOutput(_StepOutputFields):
    """One private step on a batch: per-example losses, gradient norms (before clipping) and clip
    factors ([B], or [B, G] per group for per_layer clipping), and each trainable parameter's
    clipped gradient sum Σ_i c_i ∇θ L_i by name; unpacks as those four. `group_norms`: per_layer,
    each group's norms [B, G] (an attribute, not a fifth item: callers unpack four), else None."""

    def __new__(cls, losses, norms, clip_factors, grads, group_norms: torch.Tensor | None = None):
        output = super().__new__(cls, losses, norms, clip_factors, grads)
        output.group_norms = group_norms
        return output
