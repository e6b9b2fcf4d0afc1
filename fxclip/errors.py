"""Errors fxclip raises. Each message says what is wrong and how to fix it."""


def describe(e: BaseException) -> str:
    """'Type: first line of the message', for an error that names the exception it wraps."""
    lines = str(e).splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


class FxclipError(ValueError):
    """Base class: bad input or a model fxclip cannot make private as it stands."""


class CaptureError(FxclipError):
    """The model could not be captured as a graph by torch.export."""


class NotCovered(FxclipError):
    """fxclip's graph path does not cover this model: torch.export could not capture it, or an op or
    layout in its graph has no rule and the per-op fallback cannot run it. The model itself may be
    fine, so `PrivateStep` then takes the whole-model fallback (`fxclip.whole_model`) and warns."""


class ExampleMixingError(FxclipError):
    """An op lets one example influence another's output (BatchNorm in training mode, a batch
    reduction); per-example gradients, and so DP-SGD clipping, are then undefined."""


class VerificationError(FxclipError):
    """`verify=True` found norms or clipped gradients that differ from the torch.func reference."""


class ShardingError(FxclipError):
    """A model sharded in a way fxclip cannot follow (a tensor-parallel layout, a mesh of more than
    one dimension: `fxclip.sharded`), or a sharded step that failed on another rank, so that no
    rank wrote gradients."""
