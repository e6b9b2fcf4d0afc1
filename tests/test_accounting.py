"""Privacy accounting: dp_accounting's PLD/RDP against Opacus's accountants on the same settings."""

import math

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


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(target_epsilon=0.0), "epsilon must be"),
        (dict(target_epsilon=-1.0), "epsilon must be"),
        (dict(delta=0.0), "delta must be"),
        (dict(delta=1.0), "delta must be"),
        (dict(sampling_rate=0.0), "sampling rate must be"),
        (dict(sampling_rate=1.5), "sampling rate must be"),
    ],
)
def test_bad_privacy_parameters_raise_clear_errors(kwargs, message):
    args = dict(target_epsilon=1.0, sampling_rate=0.1, steps=10, delta=1e-5) | kwargs
    with pytest.raises(ValueError, match=message):
        noise_multiplier_for_epsilon(**args)
