"""Poisson sampling: batch sizes are Binomial(N, q), membership is independent, edge cases work."""

import math

import numpy as np
import pytest
import torch

from fxclip.sampling import PoissonBatchSampler


def test_batch_sizes_follow_binomial_distribution():
    n, q, steps = 500, 0.05, 4000
    sampler = PoissonBatchSampler(n, q, steps, generator=torch.Generator().manual_seed(0))
    sizes = torch.tensor([len(batch) for batch in sampler], dtype=torch.float64)
    mean, var = n * q, n * q * (1 - q)
    assert abs(sizes.mean() - mean) < 4 * math.sqrt(var / steps)
    assert sizes.var() == pytest.approx(var, rel=0.1)
    # Chi-square goodness of fit against Binomial(n, q) over the bulk of the distribution.
    binom = torch.distributions.Binomial(n, torch.tensor(q, dtype=torch.float64))
    ks = torch.arange(15, 36, dtype=torch.float64)
    expected = binom.log_prob(ks).exp() * steps
    observed = torch.stack([(sizes == k).sum() for k in ks]).double()
    chi2 = ((observed - expected) ** 2 / expected).sum()
    assert chi2 < 45  # 21 bins: the 99.9% quantile of chi-square(20) is 45.3


def test_each_example_included_at_rate_q_independently():
    n, q, steps = 50, 0.2, 5000
    counts = torch.zeros(n)
    pair = 0
    for batch in PoissonBatchSampler(n, q, steps, generator=torch.Generator().manual_seed(1)):
        counts[batch] += 1
        pair += int(0 in batch and 1 in batch)
        assert torch.equal(batch, batch.unique())  # no repeats, sorted
    assert (counts / steps - q).abs().max() < 4 * math.sqrt(q * (1 - q) / steps)
    assert abs(pair / steps - q * q) < 4 * math.sqrt(q * q / steps)


def test_empty_and_full_batches():
    tiny = PoissonBatchSampler(1000, 1e-6, 20, generator=torch.Generator().manual_seed(0))
    batches = list(tiny)
    assert all(b.numel() == 0 and b.dtype == torch.long for b in batches)
    everything = list(PoissonBatchSampler(100_000, 1.0, 2))
    assert all(torch.equal(b, torch.arange(100_000)) for b in everything)


def test_seeded_sampler_is_reproducible():
    draw = lambda: list(PoissonBatchSampler(100, 0.3, 5, generator=torch.Generator().manual_seed(7)))  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(draw(), draw()))


def test_from_batch_size_uses_q_equal_batch_over_n():
    sampler = PoissonBatchSampler.from_batch_size(1437, 128, 3)
    assert sampler.sampling_rate == pytest.approx(128 / 1437)
    assert sampler.expected_batch_size == pytest.approx(128)
    assert len(sampler) == 3


@pytest.mark.parametrize(
    "args,message",
    [
        ((0, 0.1, 5), "empty data set"),
        ((10, 0.0, 5), "sampling rate"),
        ((10, 1.01, 5), "sampling rate"),
        ((10, 0.1, 2.5), "steps must be an integer >= 0"),
        ((10, 0.1, 2.0), "steps must be an integer >= 0"),
        ((10, 0.1, True), "steps must be an integer >= 0"),
        ((10, 0.1, -1), "steps must be an integer >= 0"),
        ((10.5, 0.1, 2), "num_examples must be an integer >= 1"),
        ((True, 0.1, 2), "num_examples must be an integer >= 1"),
    ],
)
def test_bad_sampler_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        PoissonBatchSampler(*args)
    with pytest.raises(ValueError, match="batch size must be between 1"):
        PoissonBatchSampler.from_batch_size(10, 11, 5)


def test_numpy_integer_arguments_are_accepted():
    sampler = PoissonBatchSampler(np.int64(10), np.float32(0.5), np.int32(3))
    assert len(sampler) == 3 and len(list(sampler)) == 3
