"""Privacy accounting for DP-SGD with Poisson sampling, using Google's `dp_accounting` library.

DP-SGD with Poisson sampling at rate q and Gaussian noise of multiplier sigma, run for T steps, is
the event "T-fold self-composition of a Poisson-subsampled Gaussian mechanism". Its (epsilon, delta)
is computed here by dp_accounting's PLD (privacy loss distribution) accountant by default, or its
RDP (Renyi DP) accountant. Both are upper bounds; PLD is the tighter one.
"""

from __future__ import annotations

import math

import dp_accounting
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

ACCOUNTANTS = ("pld", "rdp")

# The PLD accountant discretizes the privacy loss pessimistically, so a coarser grid still gives a
# valid upper bound on epsilon. At 1e-3 it is within ~1e-4 of the 1e-4 grid and about 15x faster.
PLD_DISCRETIZATION = 1e-3

# dp_accounting's default RDP orders from 2 up: for orders below 2 its series for fractional orders
# often fails to converge (the library then drops them with a log warning per call), and they only
# give the best bound when epsilon is far beyond any useful privacy guarantee.
RDP_ORDERS = [a for a in rdp_privacy_accountant.DEFAULT_RDP_ORDERS if a >= 2]

# The noise multiplier search never goes below this: smaller noise gives an epsilon in the hundreds,
# which is no privacy guarantee, and makes the PLD grid huge.
MIN_NOISE_MULTIPLIER = 0.1


def check_privacy_params(
    *, epsilon: float | None = None, delta: float | None = None, sampling_rate: float | None = None
) -> None:
    """Raise ValueError, saying what is wrong and how to fix it, if a privacy parameter is invalid.

    Only the parameters that are given are checked: epsilon > 0, 0 < delta < 1, 0 < q <= 1.
    """
    if epsilon is not None and not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(
            f"epsilon must be a finite number > 0, got {epsilon}; "
            "choose the privacy budget you want, e.g. epsilon=3."
        )
    if delta is not None and not (0 < delta < 1):
        raise ValueError(
            f"delta must be strictly between 0 and 1, got {delta}; "
            "use a value well below 1/(number of training examples), e.g. delta=1e-5."
        )
    if sampling_rate is not None and not (0 < sampling_rate <= 1):
        raise ValueError(
            f"sampling rate must be in (0, 1], got {sampling_rate}; it is the expected batch size "
            "divided by the number of training examples, so pick a batch size between 1 and the "
            "data set size."
        )


def _check_steps_and_noise(noise_multiplier: float | None, steps: int) -> None:
    if noise_multiplier is not None and not noise_multiplier >= 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}.")
    if not (isinstance(steps, int) and steps >= 0):
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}.")


def make_accountant(accountant: str = "pld") -> dp_accounting.PrivacyAccountant:
    """A fresh dp_accounting accountant: "pld" (default, tighter) or "rdp"."""
    if accountant == "pld":
        return pld_privacy_accountant.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
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
    """Epsilon of `steps` Poisson-sampled DP-SGD steps at the given delta (inf when sigma is 0)."""
    check_privacy_params(delta=delta, sampling_rate=sampling_rate)
    _check_steps_and_noise(noise_multiplier, steps)
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    acc = make_accountant(accountant)
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
    check_privacy_params(epsilon=target_epsilon, delta=delta, sampling_rate=sampling_rate)
    _check_steps_and_noise(None, steps)
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
    # (PLD itself must not be searched from tiny sigma: its loss grid then needs gigabytes.)
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
