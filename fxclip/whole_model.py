"""The whole-model fallback, for models torch.export cannot capture (Python control flow on a
tensor's value, packed sequences, code export does not trace) and models with a part the graph
path does not cover (`errors.NotCovered`: an op neither a rule nor the per-op fallback can run).

Without a graph there are no ops to rewrite, so the step takes each example's gradient of the
whole model: torch.func (vmap of grad over functional_call), or, where torch.func cannot run the
model either, one forward and backward per example. Then it clips and sums, as the fast path does.
The result is exact and private by the same bound (each example moves the sum by at most C), but
it materializes every per-example gradient (B × the parameters) and costs what those methods cost
(docs/benchmarks.md: vmap and naive); `explain`, `graph` and compilation need a graph and are not
available. `PrivateStep` warns with `FallbackWarning` when it takes this path.
"""

from __future__ import annotations

import torch

from .clipping import FLAT, Clipping, StepOutput
from .errors import ExampleMixingError, FxclipError, describe
from .loss import loss_shape_error
from .reference import any_per_example_grads, clip_and_sum, gradient_mixing_found, mixing_found, naive_per_example_grads


class FallbackWarning(UserWarning):
    """fxclip could not capture the model and takes the slower whole-model fallback. Make it an
    error with warnings.simplefilter("error", fxclip.FallbackWarning)."""


class WholeModelStep:
    """`__call__(inputs, targets, max_grad_norm)` -> StepOutput for one batch, called like the graph
    path's `captures.GraphStep` (every per-example gradient is materialized, so its `strategy` and
    `safe` do not apply). `method` is "torch.func" or "per-example loop" once a step has run;
    `reason` is why the graph path does not cover the model."""

    batch_limit = None
    verifiable = False  # it is the reference's own method
    compiled = None  # never compiled
    steps_completed = 0

    def __init__(self, model: torch.nn.Module, loss_fn, batch_dims, reason: str):
        self.model, self.batch_dims, self.reason = model, tuple(batch_dims), reason
        self.method: str | None = None

        def per_example_loss(output, targets):
            loss = loss_fn(output, targets)
            if not isinstance(loss, torch.Tensor) or loss.dim() != 1 or not loss.is_floating_point():
                raise loss_shape_error(loss)
            return loss

        self.loss_fn = per_example_loss

    @property
    def fallbacks(self) -> list[str]:
        return [f"the whole model ({self.reason.splitlines()[0]})"]

    @property
    def program(self):
        """There is none: what `PrivateStep.program`, explain() and graph() raise on this path."""
        raise self._no_graph()

    def bind(self, inputs: tuple, targets, params=None):
        raise self._no_graph()

    def _no_graph(self) -> FxclipError:
        return FxclipError(
            "the model's step takes the whole-model fallback, which has no graph or plan to show. "
            f"Why: {self.reason}"
        )

    def __call__(
        self, inputs: tuple, targets, max_grad_norm, strategy: str = "auto", safe: bool = False, params=None, clipping: Clipping = FLAT
    ) -> StepOutput:
        first = self.method is None
        if first:
            self._check_examples_independent(inputs, targets)
        args = (self.model, self.loss_fn, inputs, targets, self.batch_dims)
        try:
            if self.method == "per-example loop":  # torch.func failed on this model before
                grads, losses = naive_per_example_grads(*args, with_losses=True)
            else:
                (grads, losses), self.method = any_per_example_grads(*args, with_losses=True)
        except FxclipError:
            raise
        except Exception as e:  # the model fails on one example alone (a batch size in its code)
            raise FxclipError(
                f"the whole-model fallback could not run the model one example at a time "
                f"({describe(e)}). It took the fallback "
                f"because: {self.reason}"
            ) from e
        losses = losses.detach()
        if first:
            self._check_gradients_add_up(inputs, targets, grads)
        return StepOutput(losses, *clip_and_sum(grads, max_grad_norm, clipping))

    def _check_examples_independent(self, inputs: tuple, targets) -> None:
        """This path runs examples one at a time, so a model that mixes them (a roll or a mean
        over the batch, a concatenation of shifted slices) would be clipped and summed as some
        other model, silently: compare each example's loss in the batch with its loss alone."""
        try:
            found = mixing_found(self.model, self.loss_fn, inputs, targets, self.batch_dims)
        except ExampleMixingError as e:  # undecided: the model fails on the batch's parts
            raise ExampleMixingError(f"{e} (fxclip runs this model one example at a time because: {self.reason})") from e
        if found:
            raise ExampleMixingError(
                f"{found}: the model mixes examples (an op along the batch dim such as a roll, a "
                "flip, a mean, or a concatenation of shifted slices), so per-example gradients are "
                "undefined. Keep every op within an example; check batch_dims. (fxclip runs this "
                f"model one example at a time because: {self.reason})"
            )

    def _check_gradients_add_up(self, inputs: tuple, targets, grads: dict) -> None:
        """Mixing that the losses do not show: in training mode only, or in the backward only."""
        name = gradient_mixing_found(self.model, self.loss_fn, inputs, targets, grads)
        if name:
            raise ExampleMixingError(
                f"the gradient of the batch's summed loss for {name} is not the sum of the examples' "
                "gradients: the model mixes examples in training mode or in its backward (a "
                "hand-written batch norm, a mean over the batch), so per-example gradients are "
                "undefined. Keep every op within an example. (fxclip runs this model one example "
                f"at a time because: {self.reason})"
            )
