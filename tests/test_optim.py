"""The private optimizer step: noise of std sigma*C, averaging by the expected batch size."""

import math

import pytest
import torch

from fxclip.optim import PrivateOptimizer, gaussian_noise, secure_standard_normal


def _noised_grad(sigma, clip, expected_batch, clipped_sum, generator=None, secure=False):
    param = torch.nn.Parameter(torch.zeros_like(clipped_sum))
    opt = PrivateOptimizer(
        torch.optim.SGD([param], lr=1.0),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        expected_batch_size=expected_batch,
        generator=generator,
        secure_noise=secure,
    )
    param.grad = clipped_sum.clone()
    opt.step()
    return param.grad, param.detach()


@pytest.mark.parametrize("secure", [False, True])
def test_noise_has_std_sigma_times_clip(secure):
    sigma, clip, batch, n = 1.3, 0.7, 4.0, 200_000
    generator = None if secure else torch.Generator().manual_seed(0)
    clipped_sum = torch.full((n,), 2.0)
    grad, param = _noised_grad(sigma, clip, batch, clipped_sum, generator, secure)
    noise = grad * batch - clipped_sum
    # The sample std of n normals has std ~ std/sqrt(2n) (0.16% here); 1% is > 6 of those.
    assert noise.std().item() == pytest.approx(sigma * clip, rel=0.01)
    assert abs(noise.mean().item()) < 5 * sigma * clip / math.sqrt(n)
    assert torch.allclose(param, -grad)  # SGD with lr 1 took the noised, averaged step
    # Normality: fraction within one std is 68.27%.
    within = (noise.abs() < sigma * clip).double().mean().item()
    assert within == pytest.approx(0.6827, abs=0.005)


def test_seeded_noise_is_reproducible_and_secure_noise_is_not():
    seeded = [gaussian_noise(torch.zeros(8), 1.0, generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(*seeded)
    assert not torch.equal(secure_standard_normal((8,), torch.float32, "cpu"), secure_standard_normal((8,), torch.float32, "cpu"))
    with pytest.raises(ValueError, match="secure noise cannot be seeded"):
        gaussian_noise(torch.zeros(2), 1.0, secure=True, generator=torch.Generator())


def test_missing_grad_counts_as_zero_and_frozen_params_are_untouched():
    used, unused = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    frozen = torch.nn.Parameter(torch.ones(3), requires_grad=False)
    opt = PrivateOptimizer(
        torch.optim.SGD([used, unused, frozen], lr=1.0),
        noise_multiplier=0.0,
        max_grad_norm=1.0,
        expected_batch_size=2.0,
    )
    used.grad = torch.full((3,), 4.0)
    opt.step()
    assert torch.equal(used.detach(), torch.full((3,), -1.0))  # 1 - 4/2
    assert torch.equal(unused.grad, torch.zeros(3)) and frozen.grad is None
    opt.zero_grad()
    assert used.grad is None


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW])
def test_wraps_any_torch_optimizer(optimizer):
    param = torch.nn.Parameter(torch.zeros(5))
    reference = torch.nn.Parameter(torch.zeros(5))
    opt = PrivateOptimizer(optimizer([param], lr=0.1), noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=4)
    ref_opt = optimizer([reference], lr=0.1)
    param.grad = torch.arange(5.0)
    reference.grad = torch.arange(5.0) / 4
    opt.step()
    ref_opt.step()
    assert torch.allclose(param, reference)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(noise_multiplier=-1.0), "noise_multiplier must be a finite number >= 0"),
        (dict(noise_multiplier=math.nan), "noise_multiplier must be a finite number >= 0"),  # nan > 0 is False: no noise
        (dict(noise_multiplier=math.inf), "noise_multiplier must be a finite number >= 0"),
        (dict(noise_multiplier=True), "noise_multiplier must be a finite number >= 0"),
        (dict(noise_multiplier="1.0"), "noise_multiplier must be a finite number >= 0"),
        (dict(max_grad_norm=0.0), "max_grad_norm must be a finite number > 0"),
        (dict(max_grad_norm=math.inf), "max_grad_norm must be a finite number > 0"),
        (dict(max_grad_norm=math.nan), "max_grad_norm must be a finite number > 0"),
        (dict(expected_batch_size=0), "expected_batch_size must be a finite number > 0"),
        (dict(expected_batch_size=math.inf), "expected_batch_size must be a finite number > 0"),
        (dict(expected_batch_size=True), "expected_batch_size must be a finite number > 0"),
    ],
)
def test_bad_arguments(kwargs, message):
    args = dict(noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=8) | kwargs
    with pytest.raises(ValueError, match=message):
        PrivateOptimizer(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), **args)


def test_optimizer_must_be_a_torch_optimizer():
    with pytest.raises(ValueError, match="optimizer must be a torch.optim.Optimizer"):
        PrivateOptimizer([torch.nn.Parameter(torch.zeros(1))], noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=8)


def _sgd_step_with_changed_freezing(freeze_later, unfreeze_later):
    """One noisy SGD step (lr 1, sigma 1, C 1, qN 2) whose parameters were (un)frozen after the
    optimizer was built, each with a clipped sum of ones; returns the step each parameter took."""
    params = {name: torch.nn.Parameter(torch.zeros(2000)) for name in ("trained", "frozen_later", "unfrozen_later")}
    params["unfrozen_later"].requires_grad_(False)
    opt = PrivateOptimizer(
        torch.optim.SGD(params.values(), lr=1.0), noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=2.0,
        generator=torch.Generator().manual_seed(0),
    )
    params["frozen_later"].requires_grad_(not freeze_later)
    params["unfrozen_later"].requires_grad_(unfreeze_later)
    for p in params.values():
        p.grad = torch.ones(2000)  # a stale sum on a frozen parameter must not be stepped either
    opt.step()
    return {name: -p.detach() for name, p in params.items()}


def test_noise_and_averaging_follow_requires_grad_at_step_time():
    steps = _sgd_step_with_changed_freezing(freeze_later=True, unfreeze_later=True)
    for name in ("trained", "unfrozen_later"):  # (1 + N(0, 1)) / 2: noised and averaged
        assert steps[name].mean().item() == pytest.approx(0.5, abs=0.05), name
        assert steps[name].std().item() == pytest.approx(0.5, rel=0.1), name
    assert torch.equal(steps["frozen_later"], torch.zeros(2000))


def test_sparse_clipped_sums_are_noised_on_every_coordinate():
    """nn.Embedding(sparse=True) gets a sparse clipped sum from the step; the noise goes on every
    row, touched by the batch or not (noise on the touched rows alone would reveal them), so the
    noised gradient is dense and the wrapped optimizer (Adam) steps every row."""
    import fxclip

    model = torch.nn.Sequential(torch.nn.Embedding(50, 4, sparse=True), torch.nn.Flatten(), torch.nn.Linear(8, 3))
    t = fxclip.transform(model, lambda out, y: ((out - y) ** 2).sum(1), max_grad_norm=1.0)
    t.step(torch.randint(0, 5, (6, 2)), torch.randn(6, 3))  # rows 0..4 only
    assert model[0].weight.grad.is_sparse
    before = model[0].weight.detach().clone()
    opt = PrivateOptimizer(torch.optim.Adam(model.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=6)
    opt.add_noise_and_average()
    grad = model[0].weight.grad
    assert not grad.is_sparse and bool((grad[5:] != 0).all())
    opt.optimizer.step()
    assert bool((model[0].weight[5:] != before[5:]).all())


def test_sparse_only_optimizers_are_refused_with_the_reason():
    embedding = torch.nn.Embedding(10, 4, sparse=True)
    with pytest.raises(ValueError, match="SparseAdam takes only sparse gradients.*noise goes on every coordinate.*Adam"):
        PrivateOptimizer(torch.optim.SparseAdam(embedding.parameters()), noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=8)
