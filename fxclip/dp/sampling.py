"""Poisson sampling of batches, the sampling that DP-SGD's privacy accounting assumes.

Every step, each of the N training examples is included independently with probability q, so the
batch size is Binomial(N, q): it varies from step to step, can be 0, and has mean q*N.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch

from fxclip.checks import check_integer
from fxclip.dp.accounting import check_sampling_rate


class PoissonBatchSampler:
    """Yields, for each of `steps` steps, the sorted indices of a Poisson-sampled batch.

    Args:
        num_examples: N, the size of the data set sampled from (an integer > 0).
        sampling_rate: q in (0, 1], the probability that any one example is in a batch.
        steps: how many batches to draw (an integer >= 0).
        generator: torch.Generator for reproducible draws (None: the global generator).
    """

    def __init__(
        self, num_examples: int, sampling_rate: float, steps: int, generator: torch.Generator | None = None
    ):
        num_examples = check_integer(
            "num_examples", num_examples, at_least=1,
            hint="It is N, the data set's size; batches cannot be sampled from an empty data set, so "
            "check that the training data was loaded.",
        )
        sampling_rate = check_sampling_rate(sampling_rate)
        steps = check_integer("steps", steps, hint="It is how many batches to draw.")
        self.num_examples = num_examples
        self.sampling_rate = sampling_rate
        self.steps = steps
        self.generator = generator

    @classmethod
    def from_batch_size(
        cls, num_examples: int, expected_batch_size: int, steps: int, generator: torch.Generator | None = None
    ) -> PoissonBatchSampler:
        """A sampler with q = expected_batch_size / num_examples."""
        if not 1 <= expected_batch_size <= max(num_examples, 1):
            raise ValueError(
                f"batch size must be between 1 and the number of training examples ({num_examples}), "
                f"got {expected_batch_size}."
            )
        return cls(num_examples, expected_batch_size / num_examples, steps, generator)

    @property
    def expected_batch_size(self) -> float:
        """q * N, the mean batch size (the divisor of the noisy gradient sum)."""
        return self.sampling_rate * self.num_examples

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[torch.Tensor]:
        for _ in range(self.steps):
            included = torch.rand(self.num_examples, generator=self.generator) < self.sampling_rate
            yield included.nonzero().squeeze(1)


class _IndexLists:
    """A PoissonBatchSampler's batches as lists of ints, the indices any map-style data set takes."""

    def __init__(self, sampler: PoissonBatchSampler):
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[int]]:
        return (indices.tolist() for indices in self.sampler)


def _empty_like(batch):
    """`batch` (a collated structure) with every tensor cut to 0 examples along dim 0."""
    if isinstance(batch, torch.Tensor):
        return batch[:0]
    if isinstance(batch, Mapping):  # dicts and Hugging Face's BatchEncoding alike
        return {key: _empty_like(value) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_empty_like(value) for value in batch)
    return batch


class EmptyBatchCollate:
    """`collate_fn(examples)`, and for an empty Poisson batch the first example's collated
    structure cut to 0 examples: default collate functions fail on [], but DP-SGD must take the
    (noise-only) step, since skipping it would reveal that the batch was empty."""

    def __init__(self, dataset, collate_fn: Callable):
        self.dataset, self.collate_fn = dataset, collate_fn

    def __call__(self, examples: list):
        if examples:
            return self.collate_fn(examples)
        return _empty_like(self.collate_fn([self.dataset[0]]))


def poisson_data_loader(
    dataset, expected_batch_size: int, steps: int, collate_fn: Callable | None = None,
    generator: torch.Generator | None = None, **loader_options,
) -> torch.utils.data.DataLoader:
    """A DataLoader over `dataset` (map-style, with a length) whose every iteration yields `steps`
    Poisson batches of expected size `expected_batch_size`, collated by `collate_fn` (torch's
    default if None; an empty batch has every tensor cut to 0 examples). `loader_options` are
    DataLoader's other keywords (num_workers, pin_memory, ...)."""
    sampler = PoissonBatchSampler.from_batch_size(len(dataset), expected_batch_size, steps, generator)
    collate = EmptyBatchCollate(dataset, collate_fn or torch.utils.data.default_collate)
    return torch.utils.data.DataLoader(dataset, batch_sampler=_IndexLists(sampler), collate_fn=collate, **loader_options)
