"""Privacy accounting for DP-SGD with Poisson sampling, using Google's `dp_accounting` library.

DP-SGD with Poisson sampling at rate q and Gaussian noise of multiplier sigma, run for T steps, is
the event "T-fold self-composition of a Poisson-subsampled Gaussian mechanism". Its (epsilon, delta)
is computed here by dp_accounting's PLD (privacy loss distribution) accountant by default, or its
RDP (Renyi DP) accountant. Both are upper bounds; PLD is the tighter one.
"""

from __future__ import annotations

import math
import warnings

import dp_accounting
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from fxclip.checks import check_integer, check_number

ACCOUNTANTS = ("pld", "rdp")

# The PLD accountant discretizes the privacy loss pessimistically, so a coarser grid still gives a
# valid upper bound on epsilon. At 1e-3 it is within ~1e-4 of the 1e-4 grid and about 15x faster.
PLD_DISCRETIZATION = 1e-3

# One Gaussian step's privacy loss spans about 1/(2 sigma^2), so at a fixed spacing the grid grows
# like 1/sigma^2 (sigma 0.1, q 0.5, 10^4 steps: 40 s and 4 GB). Below PLD_FINE_NOISE the spacing
# grows like 1/sigma^2 too; epsilon grows alike, so its relative precision stays about 1e-4.
PLD_FINE_NOISE = 0.5

# dp_accounting's default RDP orders from 2 up: for orders below 2 its series for fractional orders
# often fails to converge (the library then drops them with a log warning per call), and they only
# give the best bound when epsilon is far beyond any useful privacy guarantee.
RDP_ORDERS = [a for a in rdp_privacy_accountant.DEFAULT_RDP_ORDERS if a >= 2]

# Smaller noise gives an epsilon in the hundreds or more, which is no privacy guarantee. The noise
# search never goes below it, nor does epsilon_spent's PLD accountant (it answers with RDP's bound):
# near sigma 1e-3 the grid spacing that PLD_FINE_NOISE asks for overflows dp_accounting.
MIN_NOISE_MULTIPLIER = 0.1


def check_epsilon(epsilon) -> float:
    """epsilon as a float; ValueError unless it is a finite number > 0."""
    return check_number("epsilon", epsilon, above=0, hint="Choose the privacy budget you want, e.g. epsilon=3.")


def check_delta(delta) -> float:
    """delta as a float; ValueError unless it is a number strictly between 0 and 1."""
    return check_number(
        "delta", delta, above=0, below=1,
        hint="Use a value well below 1/(number of training examples), e.g. delta=1e-5.",
    )


def check_sampling_rate(sampling_rate) -> float:
    """q as a float; ValueError unless it is a number in (0, 1]."""
    return check_number(
        "sampling rate", sampling_rate, above=0, at_most=1,
        hint="It is the expected batch size divided by the number of training examples, so pick a "
        "batch size between 1 and the data set size.",
    )


def _check_steps(steps) -> int:
    return check_integer("steps", steps, hint="It is the number of DP-SGD steps taken.")


def pld_discretization(noise_multiplier: float) -> float:
    """The PLD loss grid's spacing for noise multiplier sigma: 1e-3, coarser below PLD_FINE_NOISE."""
    return PLD_DISCRETIZATION * max(1.0, (PLD_FINE_NOISE / noise_multiplier) ** 2)


def make_accountant(accountant: str = "pld", noise_multiplier: float = 1.0) -> dp_accounting.PrivacyAccountant:
    """A fresh dp_accounting accountant: "pld" (default, tighter; its loss grid suits events with
    this noise multiplier or more) or "rdp"."""
    if accountant == "pld":
        return pld_privacy_accountant.PLDAccountant(value_discretization_interval=pld_discretization(noise_multiplier))
    if accountant == "rdp":
        return rdp_privacy_accountant.RdpAccountant(orders=RDP_ORDERS)
    raise ValueError(f"unknown accountant {accountant!r}; choose one of {ACCOUNTANTS}.")


def dpsgd_event(noise_multiplier: float, sampling_rate: float, steps: int) -> dp_accounting.DpEvent:
    """The DpEvent of `steps` DP-SGD steps with Poisson sampling rate q and noise multiplier sigma."""
    step = dp_accounting.PoissonSampledDpEvent(sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier))
    return dp_accounting.SelfComposedDpEvent(step, steps)


def epsilon_spent(
    noise_multiplier: float, sampling_rate: float, steps: int, delta: float, accountant: str = "pld"
) -> float:
    """Epsilon of `steps` Poisson-sampled DP-SGD steps at the given delta (inf when sigma is 0).

    With the PLD accountant, sigma below MIN_NOISE_MULTIPLIER gets the RDP accountant's (looser,
    still valid) bound and a warning.
    """
    sampling_rate, delta, steps = check_sampling_rate(sampling_rate), check_delta(delta), _check_steps(steps)
    noise_multiplier = check_number(
        "noise_multiplier", noise_multiplier, at_least=0, hint="It is sigma (0: no noise, epsilon is inf)."
    )
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    if accountant == "pld" and noise_multiplier < MIN_NOISE_MULTIPLIER:
        warnings.warn(
            f"noise_multiplier {noise_multiplier:g} is below {MIN_NOISE_MULTIPLIER:g}, where epsilon is in the "
            "hundreds or more (no meaningful privacy) and the PLD accountant is not used: this epsilon is the "
            "RDP accountant's bound, looser but still an upper bound.",
            stacklevel=2,
        )
        accountant = "rdp"
    acc = make_accountant(accountant, noise_multiplier)
    acc.compose(dpsgd_event(noise_multiplier, sampling_rate, steps))
    return float(acc.get_epsilon(delta))


def noise_multiplier_for_epsilon(
    target_epsilon: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    accountant: str = "pld",
    tol: float = 1e-3,
) -> float:
    """The smallest noise multiplier (within `tol`) whose epsilon after `steps` steps is <= target.

    Calls dp_accounting's `calibrate_dp_mechanism` (Brent's method on the accountant's epsilon).
    """
    target_epsilon, delta = check_epsilon(target_epsilon), check_delta(delta)
    sampling_rate, steps = check_sampling_rate(sampling_rate), _check_steps(steps)
    tol = check_number("tol", tol, above=0, hint="It is the precision of the noise multiplier, e.g. 1e-3.")
    if steps == 0:
        return 0.0
    def calibrate(name: str, bracket) -> float:
        return dp_accounting.calibrate_dp_mechanism(
            lambda: make_accountant(name),
            lambda s: dpsgd_event(s, sampling_rate, steps),
            target_epsilon,
            delta,
            bracket_interval=bracket,
            tol=tol,
        )

    def epsilon_at(sigma: float, name: str) -> float:
        return epsilon_spent(sigma, sampling_rate, steps, delta, name)

    # RDP is cheap at any sigma and looser than PLD, so its answer bounds the PLD answer from above.
    if epsilon_at(MIN_NOISE_MULTIPLIER, "rdp") <= target_epsilon:
        sigma = MIN_NOISE_MULTIPLIER
    else:
        sigma = calibrate("rdp", dp_accounting.LowerEndpointAndGuess(MIN_NOISE_MULTIPLIER, 1.0))
    if accountant != "rdp":
        lower = sigma / 2
        while lower > MIN_NOISE_MULTIPLIER and epsilon_at(lower, accountant) <= target_epsilon:
            lower /= 2
        if epsilon_at(max(lower, MIN_NOISE_MULTIPLIER), accountant) <= target_epsilon:
            sigma = MIN_NOISE_MULTIPLIER
        else:
            sigma = calibrate(accountant, dp_accounting.ExplicitBracketInterval(lower, sigma * 1.5))
    # Brent returns a point within tol of the root on either side; step up until the budget holds.
    while epsilon_at(sigma, accountant) > target_epsilon:
        sigma += tol
    return float(sigma)


def adaptive_clipping_noise_multiplier(noise_multiplier: float, count_noise_std: float) -> float:
    """The gradient's noise multiplier sigma_grad under adaptive clipping (Andrew et al. 2021,
    "Differentially Private Learning with Adaptive Clipping", Theorem 1), such that a step costs
    the privacy of one Gaussian mechanism with the stated `noise_multiplier` sigma:

        sigma_grad = (sigma^-2 - (2 sigma_b)^-2)^(-1/2)

    Each step releases two sums of the same Poisson batch: the clipped gradients (sensitivity C,
    noise std sigma_grad C) and the count of examples whose norm is at most C, centred as
    Σ_i (b_i - 1/2) (sensitivity 1/2, noise std sigma_b = `count_noise_std`, so multiplier
    2 sigma_b). Together they are one Gaussian query whose multiplier sigma satisfies
    sigma^-2 = sigma_grad^-2 + (2 sigma_b)^-2, so the accountant is run with sigma, unchanged,
    and the gradient gets the slightly larger sigma_grad. Needs sigma_b > sigma / 2; sigma 0 (no
    privacy) gives 0."""
    noise_multiplier = check_number("noise_multiplier", noise_multiplier, at_least=0, hint="It is sigma, the stated noise multiplier.")
    count_noise_std = check_number(
        "count_noise_std", count_noise_std, above=0, hint="It is sigma_b, the noise std of the unclipped count (Andrew et al.: expected batch size / 20)."
    )
    if noise_multiplier == 0:
        return 0.0
    if 2 * count_noise_std <= noise_multiplier:
        raise ValueError(
            f"count_noise_std {count_noise_std:g} must exceed noise_multiplier / 2 = {noise_multiplier / 2:g}: the count's "
            "share of the privacy budget would be all of it. Use a larger count_noise_std (Andrew et al.: expected batch size / 20)."
        )
    return float((noise_multiplier**-2 - (2 * count_noise_std) ** -2) ** -0.5)
