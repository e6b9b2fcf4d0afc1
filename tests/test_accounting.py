"""Privacy accounting: dp_accounting's PLD/RDP against Opacus's accountants on the same settings."""

import math

import numpy as np
import pytest

from fxclip.accounting import epsilon_spent, noise_multiplier_for_epsilon

SETTINGS = [  # (noise multiplier, sampling rate, steps, delta)
    (1.0, 0.01, 1000, 1e-5),
    (1.1, 256 / 60000, 60 * 235, 1e-5),  # Abadi et al.'s MNIST setting
    (2.0, 0.1, 200, 1e-6),
]


@pytest.mark.parametrize("sigma,q,steps,delta", SETTINGS)
def test_rdp_agrees_with_opacus_rdp_and_pld_is_tighter(sigma, q, steps, delta):
    opacus_accountants = pytest.importorskip("opacus.accountants")
    reference = opacus_accountants.RDPAccountant()
    reference.history = [(sigma, q, steps)]
    opacus_rdp = reference.get_epsilon(delta)
    rdp = epsilon_spent(sigma, q, steps, delta, accountant="rdp")
    pld = epsilon_spent(sigma, q, steps, delta, accountant="pld")
    # Same RDP bound (the order grids differ slightly, which barely moves the optimum).
    assert rdp == pytest.approx(opacus_rdp, rel=1e-3)
    assert pld < 0.97 * min(rdp, opacus_rdp)


@pytest.mark.parametrize("sigma,q,steps,delta", SETTINGS[:2])
def test_pld_agrees_with_opacus_prv(sigma, q, steps, delta):
    opacus_accountants = pytest.importorskip("opacus.accountants")
    reference = opacus_accountants.PRVAccountant()
    reference.history = [(sigma, q, steps)]
    # PRV and PLD compute the same (tight) curve by different numerics.
    assert epsilon_spent(sigma, q, steps, delta) == pytest.approx(reference.get_epsilon(delta), rel=0.01)


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_noise_multiplier_meets_target_tightly(accountant):
    q, steps, delta, target = 128 / 1437, 300, 1e-5, 3.0
    sigma = noise_multiplier_for_epsilon(target, q, steps, delta, accountant=accountant)
    assert epsilon_spent(sigma, q, steps, delta, accountant) <= target
    assert epsilon_spent(sigma - 0.01, q, steps, delta, accountant) > target


def test_noise_multiplier_matches_opacus_for_rdp():
    opacus_utils = pytest.importorskip("opacus.accountants.utils")
    q, steps, delta, target = 0.02, 2000, 1e-5, 4.0
    ours = noise_multiplier_for_epsilon(target, q, steps, delta, accountant="rdp")
    theirs = opacus_utils.get_noise_multiplier(
        target_epsilon=target, target_delta=delta, sample_rate=q, steps=steps, accountant="rdp"
    )
    assert ours == pytest.approx(theirs, rel=0.02)
    assert noise_multiplier_for_epsilon(target, q, steps, delta) < ours  # PLD needs less noise


def test_epsilon_grows_with_steps_and_edge_cases():
    eps = [epsilon_spent(1.0, 0.05, steps, 1e-5) for steps in (1, 10, 100)]
    assert eps[0] < eps[1] < eps[2]
    assert epsilon_spent(1.0, 0.05, 0, 1e-5) == 0.0
    assert epsilon_spent(0.0, 0.05, 10, 1e-5) == math.inf
    assert epsilon_spent(1.0, 0.05, np.int64(10), 1e-5) == eps[1]


def test_epsilon_at_usual_noise_is_dp_accountings():
    # dp_accounting's RdpAccountant (orders >= 2) and PLDAccountant (grid 1e-3) on sigma 1, q 0.01, 1000 steps.
    assert epsilon_spent(1.0, 0.01, 1000, 1e-5, "rdp") == pytest.approx(2.101366525, abs=1e-8)
    assert epsilon_spent(1.0, 0.01, 1000, 1e-5, "pld") == pytest.approx(1.828934413, abs=1e-8)


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "sigma,q,steps,fine_grid_epsilon",
    [(0.3, 0.01, 1000, 69.81576), (0.1, 0.5, 10_000, 254163.73)],  # fine: dp_accounting's PLD at grid 1e-3
)
def test_small_noise_epsilon_is_quick_and_as_precise(sigma, q, steps, fine_grid_epsilon):
    # At a 1e-3 grid the second case takes 40 s and 4 GB: the privacy loss spans ~1/(2 sigma^2).
    assert epsilon_spent(sigma, q, steps, 1e-5) == pytest.approx(fine_grid_epsilon, rel=1e-4)


@pytest.mark.timeout(10)
def test_noise_below_the_floor_gets_rdps_bound_with_a_warning():
    with pytest.warns(UserWarning, match="RDP accountant's bound"):
        pld = epsilon_spent(0.001, 0.01, 10, 1e-5)
    assert pld == epsilon_spent(0.001, 0.01, 10, 1e-5, accountant="rdp")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(noise_multiplier=math.inf), "noise_multiplier must be a finite number >= 0"),
        (dict(noise_multiplier=math.nan), "noise_multiplier must be a finite number >= 0"),
        (dict(noise_multiplier=-1.0), "noise_multiplier must be a finite number >= 0"),
        (dict(noise_multiplier=True), "noise_multiplier must be a finite number >= 0"),
        (dict(delta=None), "delta must be a finite number > 0 and < 1"),
        (dict(delta="1e-5"), "delta must be a finite number > 0 and < 1"),
        (dict(sampling_rate=math.nan), "sampling rate must be a finite number > 0 and <= 1"),
        (dict(steps=2.5), "steps must be an integer >= 0"),
        (dict(steps=10.0), "steps must be an integer >= 0"),
        (dict(steps=True), "steps must be an integer >= 0"),
    ],
)
def test_bad_epsilon_spent_arguments_raise_clear_errors(kwargs, message):
    args = dict(noise_multiplier=1.0, sampling_rate=0.1, steps=10, delta=1e-5) | kwargs
    with pytest.raises(ValueError, match=message):
        epsilon_spent(**args)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(target_epsilon=0.0), "epsilon must be"),
        (dict(target_epsilon=-1.0), "epsilon must be"),
        (dict(delta=0.0), "delta must be"),
        (dict(delta=1.0), "delta must be"),
        (dict(sampling_rate=0.0), "sampling rate must be"),
        (dict(sampling_rate=1.5), "sampling rate must be"),
        (dict(delta=None), "delta must be"),
        (dict(steps=np.float64(3)), "steps must be an integer"),
        (dict(tol=0.0), "tol must be"),
    ],
)
def test_bad_privacy_parameters_raise_clear_errors(kwargs, message):
    args = dict(target_epsilon=1.0, sampling_rate=0.1, steps=10, delta=1e-5) | kwargs
    with pytest.raises(ValueError, match=message):
        noise_multiplier_for_epsilon(**args)
