"""The options of a private step (`fxclip.transform`'s keywords), validated in one place."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .checks import check_bool, check_integer, check_number
from .clipping import AUTOMATIC_GAMMA, STYLES, Clipping, checked_per_layer_bounds, per_layer_groups
from .errors import FxclipError
from .passes.compile import BATCH_MODES

STRATEGIES = ("auto", "ghost", "materialize")


@dataclass(frozen=True)
class StepOptions:
    """Every option of `transform` (see its docstring), checked when made: a bad value raises
    FxclipError saying what is allowed. Change one with `dataclasses.replace`, which checks again."""

    max_grad_norm: float | tuple | dict  # per_layer: a tuple (one per trainable parameter) or a dict
    batch_dims: tuple[int, ...] | None = None
    strategy: str = "auto"
    verify: bool = False
    memory_budget: float | None = None
    compile: bool | str = False
    max_physical_batch_size: int | None = None
    cuda_graphs: bool | None = None
    clipping: str = "flat"
    automatic_gamma: float = AUTOMATIC_GAMMA
    memory_limit: float | None = None

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731  (frozen)
        if self.clipping not in STYLES:
            raise FxclipError(f"clipping must be one of {STYLES}, got {self.clipping!r}")
        if self.clipping == "per_layer":
            set_("max_grad_norm", checked_per_layer_bounds(self.max_grad_norm))
        else:
            hint = "It is the clip bound C." + (' For one bound per parameter pass clipping="per_layer".' if isinstance(self.max_grad_norm, (list, tuple, dict)) else "")
            set_("max_grad_norm", check_number("max_grad_norm", self.max_grad_norm, above=0, hint=hint, error=FxclipError))
        set_("automatic_gamma", check_number("automatic_gamma", self.automatic_gamma, above=0, hint="It is automatic clipping's γ in C / (‖g_i‖ + γ).", error=FxclipError))
        if self.strategy not in STRATEGIES:
            raise FxclipError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if not isinstance(self.compile, bool) and self.compile not in BATCH_MODES:
            raise FxclipError(f"compile must be True, False or a batch mode {BATCH_MODES}, got {self.compile!r}")
        if self.cuda_graphs is not None and not isinstance(self.cuda_graphs, bool):
            raise FxclipError(f"cuda_graphs must be None (on CUDA when compiled), True or False, got {self.cuda_graphs!r}")
        if self.cuda_graphs and not self.compile:
            raise FxclipError("cuda_graphs=True replays the compiled step: pass compile=True (or a batch mode) too")
        if self.max_physical_batch_size == "auto" or self.memory_limit is not None:
            if self.max_physical_batch_size != "auto" or self.memory_limit is None:
                raise FxclipError(
                    'max_physical_batch_size="auto" and memory_limit=<bytes> go together: "auto" picks the largest '
                    f"physical batch that fits memory_limit (got max_physical_batch_size={self.max_physical_batch_size!r}, "
                    f"memory_limit={self.memory_limit!r})"
                )
            set_("memory_limit", check_number(
                "memory_limit", self.memory_limit, above=0,
                hint="It counts the bytes a step may allocate above what the model and the batch hold.", error=FxclipError,
            ))
        elif self.max_physical_batch_size is not None:
            set_("max_physical_batch_size", check_integer(
                "max_physical_batch_size", self.max_physical_batch_size, at_least=1,
                hint='Or None: each batch in one piece; or "auto" with memory_limit.', error=FxclipError,
            ))
        dims = self.batch_dims
        if dims is not None:
            if not isinstance(dims, Sequence) or isinstance(dims, str) or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
                raise FxclipError(f"batch_dims must be a sequence of ints, one per model input (e.g. (1,)), got {dims!r}")
            set_("batch_dims", tuple(dims))
        if self.memory_budget is not None:
            set_("memory_budget", check_number("memory_budget", self.memory_budget, above=0, hint="It counts elements per example.", error=FxclipError))
        check_bool("verify", self.verify, error=FxclipError)

    def clipping_for(self, model) -> tuple[Clipping, tuple[float, ...]]:
        """The step's Clipping and its bounds for `model` as it is now (per_layer groups follow
        which parameters are trainable): (Clipping, one bound, or one per group)."""
        if self.clipping != "per_layer":
            return Clipping(self.clipping, gamma=self.automatic_gamma), (self.max_grad_norm,)
        groups, bounds = per_layer_groups(self.max_grad_norm, model)
        return Clipping("per_layer", groups), bounds

    @property
    def batch_mode(self) -> str:
        """How a compiled step handles changing batch sizes (passes/compile.py)."""
        return self.compile if isinstance(self.compile, str) else "dynamic"
