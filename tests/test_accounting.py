"""Tests of companion.accounting, the RDP accountant of the Poisson-subsampled Gaussian mechanism.

Expected values come from outside the module: Opacus 1.6's RDP accountant (the implementation
this one reproduces), closed forms (the Gaussian mechanism at q = 1, the binomial sums at orders 2
and 3), and numerical integration of the definition of A_alpha. Each tolerance is derived where it
is stated, from float64 rounding, from the truncation rule of the Opacus series, or from the
accuracy requested from the integrator.
"""

from __future__ import annotations

import math
import warnings
from functools import cache

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant as OpacusRDPAccountant
from opacus.accountants.analysis import rdp as opacus_rdp
from opacus.accountants.utils import get_noise_multiplier as opacus_get_noise_multiplier
from scipy import integrate, special

from companion.accounting import (
    DEFAULT_ORDERS,
    PLDAccountant,
    RDPAccountant,
    compute_rdp,
    get_noise_multiplier,
    get_privacy_spent,
    rdp,
    steps_for_epochs,
)

HYPOTHESIS = settings(derandomize=True, max_examples=60, deadline=None)

# Opacus warns whenever the best order is the smallest or largest one given; that is advice about
# the grid of orders, not a failure, and some grid points below hit it on purpose.
IGNORE_OPTIMAL_ORDER = pytest.mark.filterwarnings("ignore:Optimal order is the:UserWarning")

# The Opacus defaults (1.1, ..., 10.9, 12, ..., 63) plus orders near 1, between the defaults and
# larger ones, fractional and integer. (Not fractional orders much above 40 with q >= 0.1: there
# Opacus is wrong, see test_opacus_stops_too_early_at_large_fractional_orders.)
ORDERS = np.array(DEFAULT_ORDERS + (1.01, 12.5, 40.5, 100.0))
INTEGER_ORDERS = ORDERS == np.floor(ORDERS)

# Bound on the absolute error of Opacus's log A_alpha, the quantity it sums in log space:
# - integer orders: where this bound matters (the absolute comparison below, A_alpha ~ 1) Opacus
#   adds alpha + 1 positive terms of size at most ~1, each addition rounding by about 2**-53, so
#   alpha * 2**-53;
# - fractional orders: Opacus stops each of its two alternating series at the first term below
#   e**-30 (about 9e-14), and the remainder of such a series is below that term, so 2 e**-30. This
#   dominates its rounding. Ours is far more accurate (module docstring), so this bounds the
#   difference.
OPACUS_LOG_A_ERROR = np.where(INTEGER_ORDERS, ORDERS * 2.0**-53, 2 * math.exp(-30))
REL = 1e-6  # the agreement required by the issue wherever Opacus is accurate enough to show it


@cache
def _opacus_rdp(q: float, sigma: float, steps: int) -> np.ndarray:
    """Opacus's compute_rdp on ORDERS (cached: its fractional orders run in pure Python)."""
    return np.asarray(
        opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=list(ORDERS)),
        dtype=float,
    )


def _opacus_epsilon(rdp: np.ndarray, delta: float) -> float:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Optimal order is the", UserWarning)
        eps, _ = opacus_rdp.get_privacy_spent(orders=list(ORDERS), rdp=rdp, delta=delta)
    return float(eps)


def _assert_rdp_matches_opacus(ours: np.ndarray, theirs: np.ndarray, steps: int) -> None:
    """Relative agreement to 1e-6 where Opacus is accurate to 1e-6, absolute agreement elsewhere.

    The RDP is steps * log(A_alpha) / (alpha - 1), so Opacus's error is at most
    steps * OPACUS_LOG_A_ERROR / (alpha - 1). That is below 1e-6 of the value exactly where
    log A_alpha >= 1e6 * OPACUS_LOG_A_ERROR (about 2e-7 at fractional orders, alpha * 1e-10 at
    integer ones): those entries must agree to 1e-6 relative. The others (tiny q with large sigma,
    RDP down to 1e-16 per step) are where Opacus keeps only absolute precision: they must agree to
    within that absolute bound.
    """
    both_inf = np.isinf(ours) & np.isinf(theirs)
    assert np.array_equal(np.isinf(ours), np.isinf(theirs)), (ours, theirs)
    ours, theirs = ours[~both_inf], theirs[~both_inf]
    orders, bound = ORDERS[~both_inf], OPACUS_LOG_A_ERROR[~both_inf]
    log_a = ours / steps * (orders - 1)
    accurate = log_a >= bound / REL
    np.testing.assert_allclose(ours[accurate], theirs[accurate], rtol=REL, atol=0)
    absolute = steps * bound / (orders - 1)
    assert np.all(np.abs(ours - theirs)[~accurate] <= absolute[~accurate]), (ours, theirs)


# --- agreement with Opacus 1.6 ------------------------------------------------------------------

SAMPLE_RATES = [1.0, 0.25, 0.01, 1e-6]
NOISE_MULTIPLIERS = [0.3, 0.5, 1.0, 10.0, 50.0]
STEPS = [1, 1_000, 100_000]
DELTAS = [1e-3, 1e-5, 1e-10]


@IGNORE_OPTIMAL_ORDER
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("sigma", NOISE_MULTIPLIERS)
@pytest.mark.parametrize("q", SAMPLE_RATES)
def test_rdp_and_epsilon_match_opacus(q, sigma, steps):
    """compute_rdp agrees with Opacus entrywise (see _assert_rdp_matches_opacus), and the epsilon
    from get_privacy_spent agrees to 1e-6 relative at every delta. Epsilon is at least 0.013 on
    this grid (the conversion of zero RDP at order 100 and delta = 1e-3), and where the minimum is
    attained the bound on Opacus's RDP error, steps * OPACUS_LOG_A_ERROR / (alpha - 1), is below
    5e-9 of epsilon at every grid point (tiny RDP puts the best order high, where that bound is
    small), so 1e-6 holds everywhere with a wide margin."""
    ours = compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=ORDERS)
    theirs = _opacus_rdp(q, sigma, steps)
    _assert_rdp_matches_opacus(ours, theirs, steps)
    for delta in DELTAS:
        eps, best_order = get_privacy_spent(orders=ORDERS, rdp=ours, delta=delta)
        assert eps == pytest.approx(_opacus_epsilon(theirs, delta), rel=REL)
        assert best_order in ORDERS


def test_the_opacus_comparison_is_not_vacuous():
    """Most of the grid is compared at 1e-6 relative, not only within the absolute bound: count
    the entries that pass the accuracy criterion, per step, over the whole grid."""
    accurate = total = 0
    for q in SAMPLE_RATES:
        for sigma in NOISE_MULTIPLIERS:
            log_a = compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=ORDERS) * (ORDERS - 1)
            accurate += int(np.sum(log_a >= OPACUS_LOG_A_ERROR / REL))
            total += ORDERS.size
    assert accurate >= 0.75 * total


@pytest.mark.parametrize(
    "perturbation",
    ["sigma_plus_1_percent", "q_plus_1_percent", "mironov_conversion"],
)
def test_negative_control_the_opacus_comparison_catches_errors(perturbation):
    """The checks above would fail for a 1% error in sigma or q, or for the older conversion
    eps = rdp + log(1/delta)/(alpha - 1) (Mironov 2017, Proposition 3) in place of Balle et al.
    (2020). Shown at q = 0.01, sigma = 1, 1000 steps, a typical DP-SGD setting."""
    q, sigma, steps, delta = 0.01, 1.0, 1_000, 1e-5
    theirs = _opacus_rdp(q, sigma, steps)
    if perturbation == "mironov_conversion":
        ours = compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=ORDERS)
        _assert_rdp_matches_opacus(ours, theirs, steps)  # the RDP itself is right
        mironov = float(np.min(ours + math.log(1 / delta) / (ORDERS - 1)))
        with pytest.raises(AssertionError):
            assert mironov == pytest.approx(_opacus_epsilon(theirs, delta), rel=REL)
        return
    if perturbation == "sigma_plus_1_percent":
        ours = compute_rdp(q=q, noise_multiplier=1.01 * sigma, steps=steps, orders=ORDERS)
    else:
        ours = compute_rdp(q=1.01 * q, noise_multiplier=sigma, steps=steps, orders=ORDERS)
    with pytest.raises(AssertionError):
        _assert_rdp_matches_opacus(ours, theirs, steps)
    eps = get_privacy_spent(orders=ORDERS, rdp=ours, delta=delta)[0]
    with pytest.raises(AssertionError):
        assert eps == pytest.approx(_opacus_epsilon(theirs, delta), rel=REL)


def test_default_orders_are_those_of_opacus():
    assert list(DEFAULT_ORDERS) == OpacusRDPAccountant.DEFAULT_ALPHAS


# A training run whose settings change twice: a warm-up at lower noise, then the main phase, then
# back to the warm-up settings (a separate history entry, as in Opacus).
PHASES = [(1.1, 256 / 60_000, 700), (0.8, 0.01, 150), (2.0, 0.05, 50), (1.1, 256 / 60_000, 300)]


@IGNORE_OPTIMAL_ORDER
def test_accountant_matches_opacus_accountant():
    """Same .step calls on both accountants: the same compressed history and, at each delta, the
    same epsilon to 1e-6 relative (all RDP values here are well inside the relative regime)."""
    ours, theirs = RDPAccountant(), OpacusRDPAccountant()
    for sigma, q, count in PHASES:
        for _ in range(count):
            ours.step(noise_multiplier=sigma, sample_rate=q)
            theirs.step(noise_multiplier=sigma, sample_rate=q)
    assert [tuple(entry) for entry in theirs.history] == list(ours.history)
    assert len(ours) == sum(count for _, _, count in PHASES)
    for delta in [1e-5, 1e-8]:
        assert ours.get_epsilon(delta) == pytest.approx(theirs.get_epsilon(delta), rel=REL)
        eps, best = ours.get_privacy_spent(delta=delta)
        assert eps == ours.get_epsilon(delta)
        assert best in DEFAULT_ORDERS


def test_mixed_history_is_the_sum_of_compute_rdp():
    """By composition the accountant's RDP is the sum over phases of compute_rdp; the epsilon of
    that sum must be what the accountant reports. The two add the same float64 vectors, possibly
    grouped differently, so they agree to rounding (1e-12 is generous)."""
    accountant = RDPAccountant()
    for sigma, q, count in PHASES:
        for _ in range(count):
            accountant.step(noise_multiplier=sigma, sample_rate=q)
    orders = np.array(DEFAULT_ORDERS)
    total = sum(compute_rdp(q=q, noise_multiplier=s, steps=n, orders=orders) for s, q, n in PHASES)
    for delta in [1e-5, 1e-8]:
        expected, expected_order = get_privacy_spent(orders=orders, rdp=total, delta=delta)
        eps, best_order = accountant.get_privacy_spent(delta=delta)
        assert eps == pytest.approx(expected, rel=1e-12)
        assert best_order == expected_order
    # asking again after more steps uses the cache and still adds up
    accountant.step(noise_multiplier=0.8, sample_rate=0.01)
    total = total + compute_rdp(q=0.01, noise_multiplier=0.8, steps=1, orders=orders)
    expected, _ = get_privacy_spent(orders=orders, rdp=total, delta=1e-5)
    assert accountant.get_epsilon(1e-5) == pytest.approx(expected, rel=1e-12)


def test_accountant_with_custom_orders():
    """The orders given are the ones used: epsilon equals get_privacy_spent over those orders."""
    orders = [1.5, 2.0, 4.0, 16.0, 64.0]
    accountant = RDPAccountant(orders=orders)
    for _ in range(10):
        accountant.step(noise_multiplier=1.0, sample_rate=0.1)
    rdp = compute_rdp(q=0.1, noise_multiplier=1.0, steps=10, orders=orders)
    assert accountant.orders == tuple(orders)
    assert accountant.get_epsilon(1e-5) == get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)[0]


# --- independent correctness --------------------------------------------------------------------


def _rdp_by_integration(q: float, sigma: float, alpha: float) -> tuple[float, float]:
    r"""RDP from the definition, log(A_alpha) / (alpha - 1), by quadrature; and A's error estimate.

    A_alpha = E_{z ~ N(0, sigma^2)}[(1 + x(z))^alpha] with x = q (mu_1/mu_0 - 1)
    = q expm1((2z - 1) / (2 sigma^2)). Since E[x] = 0,
    A_alpha - 1 = E[(1 + x)^alpha - 1 - alpha x], whose integrand is >= 0 (convexity), so the
    integral has no cancellation and keeps relative precision even when it is 1e-15. For
    |x| < 1e-3 the integrand is summed as its binomial series, avoiding the cancellation in
    (1 + x)^alpha - 1 - alpha x: the terms fall by |alpha - k| |x| / (k + 1), below 0.35 from k = 2
    on for alpha <= 1030.5, and the first one left out (k = 31) is below 1e-33 of the k = 2 term
    (binom(alpha, 31) / binom(alpha, 2) |x|^29); for x >= 1 the power is taken in log space so
    that it cannot overflow before the Gaussian density damps it. The integrand is a mixture of
    Gaussians of standard deviation sigma centred in [0, alpha], so integrating over
    [-40 sigma, alpha + 40 sigma] leaves out less than e^-800 of it.
    """
    ks = np.arange(2, 31)
    coefficients = special.binom(alpha, ks)
    log_norm = -math.log(sigma * math.sqrt(2 * math.pi))
    log_q = math.log(q)

    def integrand(z: float) -> float:
        log_pdf = log_norm - z * z / (2 * sigma**2)
        t = (2 * z - 1) / (2 * sigma**2)
        if t > 700:  # x = q (e^t - 1) = q e^t to within a factor 1 + e^-700
            log_x = log_q + t
            return (
                math.exp(log_pdf + alpha * log_x)
                - math.exp(log_pdf)
                - alpha * math.exp(log_pdf + log_x)
            )
        x = q * math.expm1(t)
        if abs(x) < 1e-3:
            return math.exp(log_pdf) * float(np.sum(coefficients * x**ks))
        if x < 1:
            return math.exp(log_pdf) * (math.expm1(alpha * math.log1p(x)) - alpha * x)
        return math.exp(log_pdf + alpha * math.log1p(x)) - math.exp(log_pdf) * (1 + alpha * x)

    value, error = integrate.quad(
        integrand,
        -40 * sigma,
        alpha + 40 * sigma,
        points=[0.0, 0.5, 1.0, alpha],
        epsabs=0.0,
        epsrel=1e-12,
        limit=1000,
    )
    return math.log1p(value) / (alpha - 1), error / value


@pytest.mark.parametrize(
    ("q", "sigma", "alpha"),
    [
        (0.01, 1.0, 2.0),
        (0.01, 1.0, 8.0),
        (0.1, 0.5, 3.0),
        (0.5, 2.0, 4.0),
        (1e-3, 0.7, 16.0),
        (1e-6, 10.0, 2.0),  # RDP ~ 1e-14: relative precision where Opacus has only absolute
        (1e-6, 50.0, 8.0),  # RDP ~ 2e-15
        (0.01, 1.0, 2.5),
        (0.1, 0.5, 1.5),
        (0.5, 2.0, 4.75),
        (1e-3, 10.0, 7.5),
        (0.25, 50.0, 40.5),
        (0.25, 50.0, 256.5),  # where Opacus is wrong (next test)
        (1e-4, 20.0, 1030.5),  # binom(alpha, alpha / 2) overflows float64 here
    ],
)
def test_rdp_equals_numerical_integration_of_the_definition(q, sigma, alpha):
    """The closed form (integer alpha) and the two series (fractional alpha) against quadrature
    of E_{mu_0}[(mu/mu_0)^alpha]. quad is asked for 1e-12 relative and must report an error
    estimate below 1e-9; the integrand is accurate to about 1e-13 relative. Ours is relatively
    precise at integer orders; at fractional orders it keeps absolute precision about 1e-16 in
    log A (module docstring), which is below 1e-9 of log A at the fractional cases chosen
    (log A >= 2e-7; at alpha = 256.5 rounding of its large log-binomial terms leaves about 1e-13,
    still far below). Hence 1e-8 relative."""
    expected, relative_error = _rdp_by_integration(q, sigma, alpha)
    assert relative_error < 1e-9
    assert compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=alpha) == pytest.approx(
        expected, rel=1e-8
    )


@pytest.mark.filterwarnings("ignore:Optimal order is the:UserWarning")
def test_opacus_stops_too_early_at_large_fractional_orders():
    """Known limitation of the reference, shown so that the grid above can avoid it: Opacus ends
    its fractional series at the first term below e^-30 even before the alternating part, so when
    (1 - q)^alpha < e^-30 it stops after one term and returns a wrong, even negative, RDP. Ours
    stops only past alpha (module docstring) and matches the quadrature (previous test)."""
    q, sigma, alpha = 0.25, 50.0, 256.5
    assert (1 - q) ** alpha < math.exp(-30)
    expected, _ = _rdp_by_integration(q, sigma, alpha)
    theirs = opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=[alpha])[0]
    assert theirs < 0 < expected
    assert compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=alpha) == pytest.approx(
        expected, rel=1e-8
    )


@pytest.mark.parametrize("alpha", [500.5, 1030.5, 2000.5, 10000.5])
@pytest.mark.parametrize(("q", "sigma"), [(0.01, 1.0), (1e-4, 20.0), (0.5, 3.0)])
def test_large_fractional_orders_lie_between_their_integer_neighbours(q, sigma, alpha):
    """The Renyi divergence is nondecreasing in its order (van Erven and Harremoes 2014, Theorem 3),
    so the RDP at alpha lies between the (relatively precise) integer-order values at alpha - 1/2
    and alpha + 1/2. Above alpha ~ 1030 the binomial coefficients overflow float64; the result must
    still be finite, in that interval and computed without RuntimeWarnings. The neighbours differ
    by at least 1e-4 relative here, far above rounding."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=alpha)
        below, above = compute_rdp(
            q=q, noise_multiplier=sigma, steps=1, orders=[alpha - 0.5, alpha + 0.5]
        )
    assert below <= rdp <= above


@pytest.mark.parametrize("sigma", [0.3, 1.0, 50.0, 1e4, 1e9])
@pytest.mark.parametrize("q", [1e-9, 1e-6, 0.01, 0.5, 0.99])
def test_orders_2_and_3_equal_their_binomial_closed_forms(q, sigma):
    """A_2 = 1 + q^2 (e^{1/sigma^2} - 1) and A_3 = 1 + 3 q^2 (1-q) (e^{1/sigma^2} - 1)
    + q^3 (e^{3/sigma^2} - 1) (the binomial sum of the module docstring written out). Evaluated
    with log1p and expm1, these are accurate to a few ulp in every regime, down to RDP ~ 1e-36
    (q = 1e-9, sigma = 1e9), so ours must match to 1e-13 relative (rounding of log-space terms of
    magnitude up to ~30 at sigma = 0.3)."""
    e1, e3 = math.expm1(1 / sigma**2), math.expm1(3 / sigma**2)
    expected_2 = math.log1p(q**2 * e1)
    expected_3 = math.log1p(3 * q**2 * (1 - q) * e1 + q**3 * e3) / 2
    rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=[2, 3])
    assert rdp == pytest.approx([expected_2, expected_3], rel=1e-13)


@pytest.mark.parametrize("sigma", [0.3, 0.5, 1.0, 3.0, 10.0, 50.0])
@pytest.mark.parametrize("q", [1e-6, 1e-3, 0.01, 0.1, 0.5, 0.9])
def test_fractional_series_at_integer_orders_equals_the_integer_sum(q, sigma):
    """_log_a_fractional is valid at integer orders (the coefficients vanish past alpha), where it
    must give the binomial sum of _log_a_integer: two different computations of log A. Both round
    log-space terms of magnitude up to a few hundred (gammaln(64) ~ 200), about 3e-14 each, and
    the fractional series keeps only absolute precision near A = 1, so 1e-12 relative plus 1e-13
    absolute."""
    alphas = np.arange(2.0, 64.0)
    np.testing.assert_allclose(
        rdp._log_a_fractional(q, sigma, alphas),
        rdp._log_a_integer(q, sigma, alphas),
        rtol=1e-12,
        atol=1e-13,
    )


@pytest.mark.parametrize("sigma", [0.1, 0.3, 1.0, 7.5, 1e3])
def test_without_subsampling_rdp_is_that_of_the_gaussian_mechanism(sigma):
    """q = 1: alpha / (2 sigma^2) (Mironov 2017, Proposition 7), up to rounding: two roundings
    in the module and two in the expected value, each at most 2**-53 relative, so 5e-16;
    1000 steps give 1000 times that. As q -> 1 the subsampled
    series tends to the same value: at q = 1 - 1e-9 they differ by O(1e-9) relative, and the
    two-series computation loses at most a few digits there, so 1e-6."""
    orders = np.array([1.01, 1.5, 2.0, 3.5, 10.0, 63.0, 256.5])
    expected = orders / (2 * sigma**2)
    np.testing.assert_allclose(
        compute_rdp(q=1.0, noise_multiplier=sigma, steps=1, orders=orders), expected, rtol=5e-16
    )
    np.testing.assert_allclose(
        compute_rdp(q=1.0, noise_multiplier=sigma, steps=1000, orders=orders),
        1000 * expected,
        rtol=1e-15,
    )
    near_one = compute_rdp(q=1 - 1e-9, noise_multiplier=sigma, steps=1, orders=orders)
    np.testing.assert_allclose(near_one, expected, rtol=1e-6)
    assert np.all(near_one <= expected * (1 + 1e-12))  # subsampling never increases the RDP


# Absolute precision of our log A_alpha at fractional orders up to ~64 (integer orders are
# relatively precise). The series stops below e^-37 (module docstring), but its log-space terms,
# log-binomials up to ~alpha log 2 ~ 45, each round by about 1e-16 relative: about 1e-16 in log A
# for small orders and up to ~1e-15 near alpha = 64 (measured at sigma = 1e9, where the exact value
# is known to 1e-20). 1e-14 leaves a margin of 10.
FRACTIONAL_LOG_A_PRECISION = 1e-14

# Per step, orders both fractional and integer; sigma from 0.3 (RDP ~ 1e4) to 50 and q on a log
# scale from 1e-8 to 1 (RDP down to ~1e-20). A property that holds exactly may be violated by
# rounding: allow 1e-9 relative (log-space terms up to ~1e4 at sigma = 0.3 round by ~2e-12) plus
# FRACTIONAL_LOG_A_PRECISION / (alpha - 1) absolute.
PROPERTY_ORDERS = st.sampled_from([1.1, 1.5, 2.0, 2.5, 3.0, 7.3, 8.0, 32.0, 63.5])
LOG10_Q = st.floats(min_value=-8.0, max_value=0.0)
SIGMAS = st.floats(min_value=0.3, max_value=50.0)


def _slack(value: float, alpha: float) -> float:
    return 1e-9 * abs(value) + FRACTIONAL_LOG_A_PRECISION / (alpha - 1)


@HYPOTHESIS
@given(
    log10_q=LOG10_Q,
    factor=st.floats(min_value=1.0, max_value=1e4),
    sigma=SIGMAS,
    alpha=PROPERTY_ORDERS,
)
def test_rdp_increases_with_the_sample_rate(log10_q, factor, sigma, alpha):
    q_small = 10.0**log10_q
    q_large = min(1.0, q_small * factor)
    small = compute_rdp(q=q_small, noise_multiplier=sigma, steps=1, orders=alpha)
    large = compute_rdp(q=q_large, noise_multiplier=sigma, steps=1, orders=alpha)
    assert small <= large + _slack(large, alpha)


@HYPOTHESIS
@given(
    log10_q=LOG10_Q,
    sigma=SIGMAS,
    factor=st.floats(min_value=1.0, max_value=10.0),
    alpha=PROPERTY_ORDERS,
)
def test_rdp_decreases_with_the_noise_multiplier(log10_q, sigma, factor, alpha):
    q = 10.0**log10_q
    low_noise = compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=alpha)
    high_noise = compute_rdp(q=q, noise_multiplier=sigma * factor, steps=1, orders=alpha)
    assert high_noise <= low_noise + _slack(low_noise, alpha)


@pytest.mark.parametrize(
    ("q", "sigma"), [(0.01, 1.0), (256 / 60_000, 1.1), (0.1, 5.0), (1.0, 20.0)]
)
def test_epsilon_increases_with_steps(q, sigma):
    """More steps spend more privacy: epsilon strictly increases along 1, 10, ..., 1e6 steps (the
    RDP at the best order grows by at least a factor of 10 per point, well above rounding)."""
    orders = np.array(DEFAULT_ORDERS)
    epsilons = []
    for n in [1, 10, 100, 1_000, 10_000, 100_000, 1_000_000]:
        rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=n, orders=orders)
        epsilons.append(get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)[0])
    assert all(a < b for a, b in zip(epsilons, epsilons[1:], strict=False)), epsilons


@IGNORE_OPTIMAL_ORDER
def test_negative_epsilon_is_reported_as_zero():
    """Documented difference from Opacus: with zero RDP, a huge order and a large delta the
    Balle et al. formula is negative; Opacus returns it, this module returns 0."""
    orders, rdp, delta = [1e6], [0.0], 0.5
    theirs, _ = opacus_rdp.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    assert theirs < 0
    assert get_privacy_spent(orders=orders, rdp=rdp, delta=delta) == (0.0, 1e6)


# --- edge cases ---------------------------------------------------------------------------------


@pytest.mark.parametrize("q", [1e-6, 0.5, 1.0])
def test_no_noise_gives_infinite_rdp_and_epsilon(q):
    rdp = compute_rdp(q=q, noise_multiplier=0.0, steps=10, orders=ORDERS)
    assert np.all(np.isinf(rdp))
    assert get_privacy_spent(orders=ORDERS, rdp=rdp, delta=1e-5) == (math.inf, ORDERS[0])
    accountant = RDPAccountant()
    accountant.step(noise_multiplier=1.0, sample_rate=0.01)
    accountant.step(noise_multiplier=0.0, sample_rate=q)
    assert accountant.get_epsilon(1e-5) == math.inf


@pytest.mark.parametrize("sigma", [1e-101, 1e-155, 1e-200, 5e-324])
@pytest.mark.parametrize("q", [1e-6, 0.5])
def test_vanishing_noise_gives_infinite_rdp_never_nan(q, sigma):
    """Below sigma = 1e-100 the RDP exceeds 1e199 at every order (it is at least
    alpha / (2 sigma^2) + alpha log(q) / (alpha - 1), see the next test), and compute_rdp reports it
    as inf, as for sigma = 0. Below about 1e-154, where 1 / sigma^2 overflows, it must in any case
    be inf and not NaN (inf - inf in the series), and the accountant must report an infinite
    epsilon rather than reject its own RDP as NaN."""
    rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=ORDERS)
    assert np.all(np.isinf(rdp))
    accountant = RDPAccountant()
    accountant.step(noise_multiplier=sigma, sample_rate=q)
    assert accountant.get_epsilon(1e-5) == math.inf


@pytest.mark.parametrize("sigma", [1e-3, 1e-50, 2e-100])
@pytest.mark.parametrize("q", [1e-6, 0.5])
def test_small_noise_rdp_is_above_its_lower_bound(q, sigma):
    """A_alpha >= q^alpha E_{mu_0}[(mu_1/mu_0)^alpha] = q^alpha e^{alpha (alpha - 1) / (2 sigma^2)}
    (drop the (1 - q) mu_0 part of mu), so RDP >= alpha / (2 sigma^2) + alpha log(q) / (alpha - 1).
    For sigma <= 1e-3 the dropped terms are smaller than the kept one by factors below
    e^{-(alpha - 1) / sigma^2} < e^{-1e5}, so the bound is attained up to rounding (1e-12 relative
    covers the rounding of log-space terms of size ~alpha / (2 sigma^2))."""
    orders = np.array([1.5, 2.0, 2.5, 8.0, 10.9, 63.0])
    bound = orders / (2 * sigma**2) + orders * math.log(q) / (orders - 1)
    rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=orders)
    assert np.all(rdp >= bound * (1 - 1e-12))
    np.testing.assert_allclose(rdp, bound, rtol=1e-12)


@pytest.mark.parametrize("sigma", [1e9, 1e50, 1e100, 1e120])
def test_huge_noise_gives_tiny_rdp_without_warnings(sigma):
    """Subsampling never increases the RDP, so it is at most alpha / (2 sigma^2) (1e-19 and
    below here); at integer orders, which are relatively precise, it is alpha (alpha - 1) q^2 /
    (2 sigma^2) / (alpha - 1) = alpha q^2 / (2 sigma^2) up to O(1/sigma^2) relative (the binomial
    sum to first order in 1/sigma^2 is E[K (K - 1)] / (2 sigma^2) with K ~ Bin(alpha, q)).
    Computed without numpy RuntimeWarnings, which a valid input must not produce."""
    q = 0.3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=ORDERS)
    assert np.all(rdp >= 0)
    slack = np.where(INTEGER_ORDERS, 0.0, FRACTIONAL_LOG_A_PRECISION / (ORDERS - 1))
    assert np.all(rdp <= ORDERS / (2 * sigma) / sigma * (1 + 1e-15) + slack)
    if sigma <= 1e100:  # above, the module returns the upper bound alpha / (2 sigma^2) itself
        expected = ORDERS * q**2 / (2 * sigma**2)
        np.testing.assert_allclose(rdp[INTEGER_ORDERS], expected[INTEGER_ORDERS], rtol=1e-12)


@pytest.mark.parametrize("sigma", [0.0, 1.0])
def test_zero_sample_rate_gives_zero_rdp(sigma):
    orders = list(ORDERS) + [math.inf]
    assert np.all(compute_rdp(q=0.0, noise_multiplier=sigma, steps=100, orders=orders) == 0)
    assert compute_rdp(q=0.0, noise_multiplier=sigma, steps=100, orders=2.5) == 0.0


@pytest.mark.parametrize(("q", "sigma"), [(0.01, 1.0), (1.0, 1.0), (0.5, 0.0)])
def test_zero_steps_give_zero_rdp(q, sigma):
    """Nothing released, nothing spent, even with no noise (where Opacus gives inf * 0 = NaN)."""
    orders = list(ORDERS) + [math.inf]
    assert np.all(compute_rdp(q=q, noise_multiplier=sigma, steps=0, orders=orders) == 0)


@pytest.mark.parametrize("q", [1e-6, 0.5, 1.0])
def test_infinite_order_gives_infinite_rdp(q):
    rdp = compute_rdp(q=q, noise_multiplier=1.0, steps=1, orders=[2.0, math.inf, 2.5])
    assert math.isinf(rdp[1]) and np.all(np.isfinite(rdp[[0, 2]]))
    assert compute_rdp(q=q, noise_multiplier=1.0, steps=1, orders=math.inf) == math.inf
    theirs = opacus_rdp.compute_rdp(q=q, noise_multiplier=1.0, steps=1, orders=[math.inf])
    assert math.isinf(theirs[0])


def test_infinite_orders_are_skipped_in_the_conversion():
    """The conversion at order inf is NaN (inf / inf); it is skipped like Opacus's nanargmin,
    and if every order is infinite nothing is left: (inf, nan)."""
    orders = [2.0, math.inf, 8.0]
    rdp = compute_rdp(q=0.01, noise_multiplier=1.0, steps=100, orders=orders)
    eps, best = get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)
    assert best in (2.0, 8.0)
    assert eps == get_privacy_spent(orders=[2.0, 8.0], rdp=rdp[[0, 2]], delta=1e-5)[0]
    eps, best = get_privacy_spent(orders=[math.inf], rdp=[math.inf], delta=1e-5)
    assert eps == math.inf and math.isnan(best)


def test_all_infinite_rdp_gives_infinite_epsilon_at_the_first_order():
    """As in Opacus: (inf, orders[0]) even when orders[0] is not the smallest order."""
    orders = [3.0, 2.0, 5.5]
    assert get_privacy_spent(orders=orders, rdp=[math.inf] * 3, delta=1e-5) == (math.inf, 3.0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Optimal order is the", UserWarning)
        assert opacus_rdp.get_privacy_spent(orders=orders, rdp=[math.inf] * 3, delta=1e-5) == (
            math.inf,
            3.0,
        )


def test_scalar_orders_give_a_float_and_sequences_an_array():
    assert isinstance(compute_rdp(q=0.1, noise_multiplier=1.0, steps=1, orders=2.5), float)
    assert isinstance(compute_rdp(q=0.1, noise_multiplier=1.0, steps=1, orders=2), float)
    out = compute_rdp(q=0.1, noise_multiplier=1.0, steps=1, orders=(2, 2.5))
    assert isinstance(out, np.ndarray) and out.shape == (2,)
    eps, best = get_privacy_spent(orders=2.0, rdp=0.5, delta=1e-5)
    assert isinstance(eps, float) and best == 2.0


def test_accountant_without_steps_has_spent_nothing():
    accountant = RDPAccountant()
    assert len(accountant) == 0 and accountant.history == ()
    assert accountant.get_epsilon(1e-5) == 0.0
    eps, best = accountant.get_privacy_spent(delta=1e-5)
    assert eps == 0.0 and math.isnan(best)


def test_accountant_compresses_its_history_and_instances_are_independent():
    a, b = RDPAccountant(), RDPAccountant()
    for _ in range(3):
        a.step(noise_multiplier=1, sample_rate=0.5)  # ints and floats give the same entry
    a.step(noise_multiplier=1.0, sample_rate=0.25)
    a.step(noise_multiplier=1.0, sample_rate=0.5)
    assert a.history == ((1.0, 0.5, 3), (1.0, 0.25, 1), (1.0, 0.5, 1))
    assert len(a) == 5 and len(b) == 0 and b.get_epsilon(1e-5) == 0.0
    assert "steps=5" in repr(a)


@pytest.mark.parametrize("accountant_class", [RDPAccountant, PLDAccountant])
def test_steps_in_one_call_equal_a_loop_of_single_steps(accountant_class):
    """step(..., steps=k) records what k calls of step record: the same compressed history and
    the same epsilon (the epsilon is a function of the history, so equal histories would do; it
    is compared too, as the accountant might keep more)."""
    looped, at_once = accountant_class(), accountant_class()
    for _ in range(40):
        looped.step(noise_multiplier=1.0, sample_rate=0.02)
    looped.step(noise_multiplier=2.0, sample_rate=0.02)
    at_once.step(noise_multiplier=1.0, sample_rate=0.02, steps=25)
    at_once.step(noise_multiplier=1.0, sample_rate=0.02, steps=15)  # joins the same entry
    at_once.step(noise_multiplier=2.0, sample_rate=0.02)
    assert at_once.history == looped.history == ((1.0, 0.02, 40), (2.0, 0.02, 1))
    assert len(at_once) == len(looped) == 41
    assert at_once.get_epsilon(1e-5) == looped.get_epsilon(1e-5)


@pytest.mark.parametrize(
    ("steps", "error"),
    [(0, ValueError), (-3, ValueError), (2.0, TypeError), (2**64 + 1, ValueError)],
)
@pytest.mark.parametrize("accountant_class", [RDPAccountant, PLDAccountant])
def test_a_bad_number_of_steps_is_refused_and_records_nothing(accountant_class, steps, error):
    accountant = accountant_class()
    with pytest.raises(error, match="steps must be"):
        accountant.step(noise_multiplier=1.0, sample_rate=0.5, steps=steps)
    assert len(accountant) == 0 and accountant.history == ()


@IGNORE_OPTIMAL_ORDER
def test_a_trillion_steps_are_recorded_at_once_and_compose_as_the_closed_form():
    """10**12 steps, which a loop of single steps could not record. Without subsampling (q = 1)
    a step of the Gaussian mechanism has RDP alpha / (2 sigma^2) at order alpha, and T steps T
    times that: sigma = 10**6 and T = 10**12 give alpha / 2, converted by Opacus."""
    accountant = RDPAccountant()
    accountant.step(noise_multiplier=1e6, sample_rate=1.0, steps=10**12)
    assert len(accountant) == 10**12 and accountant.history == ((1e6, 1.0, 10**12),)
    orders = np.array(DEFAULT_ORDERS)
    expected, _ = opacus_rdp.get_privacy_spent(orders=orders, rdp=orders / 2, delta=1e-5)
    assert accountant.get_epsilon(1e-5) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epochs": 1, "sample_rate": 1e-320}, "sample_rate=.* is too small"),
        ({"epochs": 10**400, "sample_rate": 0.5}, "more than 2\\*\\*64 steps: lower epochs"),
    ],
)
def test_steps_for_epochs_refuses_runs_past_two_to_the_64_steps(kwargs, message):
    """1/q of a subnormal q overflows a float, and so would the accountant's step count."""
    with pytest.raises(ValueError, match=message):
        steps_for_epochs(**kwargs)


@pytest.mark.parametrize("sigma", [1e155, 1e-200])
def test_the_pld_accountant_refuses_a_noise_multiplier_whose_square_is_not_a_float(sigma):
    """sigma**2 overflowed (OverflowError) or underflowed to 0 (ZeroDivisionError) later, in
    get_epsilon."""
    accountant = PLDAccountant()
    with pytest.raises(ValueError, match="noise_multiplier must be 0 or between 1e-100 and 1e100"):
        accountant.step(noise_multiplier=sigma, sample_rate=0.5)
    assert len(accountant) == 0


# --- get_noise_multiplier -----------------------------------------------------------------------

TARGET_EPSILONS = [0.5, 1.0, 2.0, 4.0, 8.0]


@IGNORE_OPTIMAL_ORDER
@pytest.mark.parametrize(
    ("sample_rate", "steps"), [(0.01, 1_000), (0.004, 10_000), (1e-3, 100_000), (1.0, 10)]
)
@pytest.mark.parametrize("target_epsilon", TARGET_EPSILONS)
def test_noise_multiplier_is_conservative_and_matches_opacus(target_epsilon, sample_rate, steps):
    """The returned sigma spends at most the target and at least target - epsilon_tolerance
    (recomputed with compute_rdp and get_privacy_spent; Opacus's accounting of it agrees up to
    the 1e-6 shown above), and is within 1% of Opacus's. Both bisect from the same bracket, so they
    return the same point unless some epsilon comparison flips on a difference of ~1e-10; 1% (the
    issue's requirement) is a loose check of that. The band target - 0.01 <= eps <= target alone
    would allow up to ~2% in sigma at target 0.5, where eps is roughly proportional to 1/sigma."""
    delta, tolerance = 1e-5, 0.01
    sigma = get_noise_multiplier(
        target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate, steps=steps
    )
    orders = np.array(DEFAULT_ORDERS)
    rdp = compute_rdp(q=sample_rate, noise_multiplier=sigma, steps=steps, orders=orders)
    eps = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0]
    assert target_epsilon - tolerance <= eps <= target_epsilon
    # Opacus's own accounting of that sigma agrees that the budget is met
    theirs_rdp = opacus_rdp.compute_rdp(
        q=sample_rate, noise_multiplier=sigma, steps=steps, orders=list(orders)
    )
    theirs_eps, _ = opacus_rdp.get_privacy_spent(orders=list(orders), rdp=theirs_rdp, delta=delta)
    assert theirs_eps <= target_epsilon * (1 + REL)
    theirs = opacus_get_noise_multiplier(
        target_epsilon=target_epsilon,
        target_delta=delta,
        sample_rate=sample_rate,
        steps=steps,
        accountant="rdp",
    )
    assert sigma == pytest.approx(theirs, rel=0.01)


def test_noise_multiplier_honours_a_finer_tolerance_and_custom_orders():
    orders = [1.5, 2.0, 3.0, 5.0, 8.0, 16.0, 32.0, 64.0]
    sigma = get_noise_multiplier(
        target_epsilon=3.0,
        target_delta=1e-6,
        sample_rate=0.02,
        steps=2_000,
        orders=orders,
        epsilon_tolerance=1e-4,
    )
    rdp = compute_rdp(q=0.02, noise_multiplier=sigma, steps=2_000, orders=orders)
    assert 3.0 - 1e-4 <= get_privacy_spent(orders=orders, rdp=rdp, delta=1e-6)[0] <= 3.0


def _floor(delta: float) -> float:
    """The smallest epsilon any noise can reach: the Balle et al. conversion of zero RDP,
    log((a - 1)/a) - (log(delta) + log(a)) / (a - 1), minimised over the default orders."""
    a = np.array(DEFAULT_ORDERS)
    return float(np.min(np.log((a - 1) / a) - (math.log(delta) + np.log(a)) / (a - 1)))


def test_unreachable_targets_are_refused():
    floor = _floor(1e-5)
    assert 0.05 < floor < 0.2  # about 0.10, as the docstring says
    for target in [0.5 * floor, floor]:
        with pytest.raises(ValueError, match="cannot be reached"):
            get_noise_multiplier(
                target_epsilon=target, target_delta=1e-5, sample_rate=0.01, steps=1_000
            )
    # just above the floor it is reachable, with a large sigma
    sigma = get_noise_multiplier(
        target_epsilon=1.05 * floor, target_delta=1e-5, sample_rate=0.01, steps=10
    )
    assert sigma > 1.0
    # reachable in principle but needing sigma > 1e6
    with pytest.raises(ValueError, match="noise_multiplier above"):
        get_noise_multiplier(
            target_epsilon=floor + 1e-7, target_delta=1e-5, sample_rate=1.0, steps=1_000_000
        )


# --- input validation ---------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")


def _rdp(**kwargs):
    args = {"q": 0.01, "noise_multiplier": 1.0, "steps": 10, "orders": [2.0, 2.5]} | kwargs
    return lambda: compute_rdp(**args)


def _spent(**kwargs):
    args = {"orders": [2.0, 2.5], "rdp": [0.1, 0.2], "delta": 1e-5} | kwargs
    return lambda: get_privacy_spent(**args)


def _sigma(**kwargs):
    args = {"target_epsilon": 1.0, "target_delta": 1e-5, "sample_rate": 0.01, "steps": 100} | kwargs
    return lambda: get_noise_multiplier(**args)


def _step(**kwargs):
    args = {"noise_multiplier": 1.0, "sample_rate": 0.01} | kwargs
    return lambda: RDPAccountant().step(**args)


def _stepped_accountant():
    accountant = RDPAccountant()
    accountant.step(noise_multiplier=1.0, sample_rate=0.01)
    return accountant


# Every kind of bad orders, for each function that takes orders (message names the parameter).
BAD_ORDERS = [
    (1.0, ValueError, "every order in orders must be > 1"),
    (0.5, ValueError, "every order in orders must be > 1"),
    (-INF, ValueError, "every order in orders must be > 1"),
    ([2.0, 1.0], ValueError, "every order in orders must be > 1"),
    ([], ValueError, "orders must not be empty"),
    (np.array([]), ValueError, "orders must not be empty"),
    ([2.0, NAN], ValueError, "orders must not contain NaN"),
    (NAN, ValueError, "orders must not contain NaN"),
    (np.array([[2.0, 3.0]]), ValueError, "orders must be one-dimensional"),
    (np.array(2.0), ValueError, "orders must be one-dimensional"),
    ([[2.0, 3.0]], TypeError, "orders must hold real numbers"),
    ("2", TypeError, "orders must be a real number or a sequence"),
    (None, TypeError, "orders must be a real number or a sequence"),
    (True, TypeError, "orders must be a real number or a sequence"),
    (["2"], TypeError, "orders must hold real numbers"),
    ([2.0, True], TypeError, "orders must hold real numbers"),
]
BAD_DELTAS = [
    (0.0, ValueError, r"delta must lie in the open interval \(0, 1\)"),
    (1.0, ValueError, r"delta must lie in the open interval \(0, 1\)"),
    (-1e-5, ValueError, r"delta must lie in the open interval \(0, 1\)"),
    (NAN, ValueError, "delta must be a number, got NaN"),
    (INF, ValueError, "delta must be finite"),
    ("1e-5", TypeError, "delta must be a real number"),
    (None, TypeError, "delta must be a real number"),
]

BAD_CALLS = {
    # compute_rdp
    "rdp q negative": (_rdp(q=-0.1), ValueError, r"q must lie in \[0, 1\]"),
    "rdp q above 1": (_rdp(q=1.5), ValueError, r"q must lie in \[0, 1\]"),
    "rdp q nan": (_rdp(q=NAN), ValueError, "q must be a number, got NaN"),
    "rdp q inf": (_rdp(q=INF), ValueError, "q must be finite"),
    "rdp q string": (_rdp(q="0.1"), TypeError, "q must be a real number"),
    "rdp q bool": (_rdp(q=True), TypeError, "q must be a real number"),
    "rdp q None": (_rdp(q=None), TypeError, "q must be a real number"),
    "rdp sigma negative": (
        _rdp(noise_multiplier=-1.0),
        ValueError,
        "noise_multiplier must be >= 0",
    ),
    "rdp sigma nan": (
        _rdp(noise_multiplier=NAN),
        ValueError,
        "noise_multiplier must be a number, got NaN",
    ),
    "rdp sigma inf": (_rdp(noise_multiplier=INF), ValueError, "noise_multiplier must be finite"),
    "rdp sigma string": (
        _rdp(noise_multiplier="1"),
        TypeError,
        "noise_multiplier must be a real number",
    ),
    "rdp steps float": (_rdp(steps=10.0), TypeError, "steps must be an integer"),
    "rdp steps fractional": (_rdp(steps=1.5), TypeError, "steps must be an integer"),
    "rdp steps bool": (_rdp(steps=True), TypeError, "steps must be an integer"),
    "rdp steps string": (_rdp(steps="10"), TypeError, "steps must be an integer"),
    "rdp steps negative": (_rdp(steps=-1), ValueError, "steps must be an integer >= 0"),
    "rdp steps past float": (_rdp(steps=10**400), ValueError, r"steps must be at most 2\*\*64"),
    # get_privacy_spent
    "spent rdp negative": (_spent(rdp=[0.1, -0.1]), ValueError, "rdp values .* must be >= 0"),
    "spent rdp -inf": (_spent(rdp=[0.1, -INF]), ValueError, "rdp values .* must be >= 0"),
    "spent rdp nan": (_spent(rdp=[0.1, NAN]), ValueError, "rdp must not contain NaN"),
    "spent rdp scalar nan": (_spent(orders=2.0, rdp=NAN), ValueError, "rdp must not contain NaN"),
    "spent rdp empty": (_spent(rdp=[]), ValueError, "rdp must not be empty"),
    "spent rdp 2-D": (
        _spent(rdp=np.array([[0.1, 0.2]])),
        ValueError,
        "rdp must be one-dimensional",
    ),
    "spent rdp string": (_spent(rdp="0.1"), TypeError, "rdp must be a real number or a sequence"),
    "spent rdp strings": (_spent(rdp=["0.1", "0.2"]), TypeError, "rdp must hold real numbers"),
    "spent rdp bool": (
        _spent(orders=2.0, rdp=True),
        TypeError,
        "rdp must be a real number or a sequence",
    ),
    "spent lengths": (_spent(rdp=[0.1]), ValueError, "orders and rdp must have the same length"),
    "spent lengths scalar": (
        _spent(rdp=0.1),
        ValueError,
        "orders and rdp must have the same length",
    ),
    # RDPAccountant
    "accountant scalar orders": (
        lambda: RDPAccountant(orders=2.0),
        TypeError,
        "orders must be a sequence",
    ),
    "step sigma negative": (
        _step(noise_multiplier=-0.5),
        ValueError,
        "noise_multiplier must be >= 0",
    ),
    "step sigma nan": (
        _step(noise_multiplier=NAN),
        ValueError,
        "noise_multiplier must be a number, got NaN",
    ),
    "step sigma inf": (_step(noise_multiplier=INF), ValueError, "noise_multiplier must be finite"),
    "step sigma string": (
        _step(noise_multiplier="1"),
        TypeError,
        "noise_multiplier must be a real number",
    ),
    "step rate zero": (_step(sample_rate=0.0), ValueError, r"sample_rate must lie in \(0, 1\]"),
    "step rate negative": (
        _step(sample_rate=-0.1),
        ValueError,
        r"sample_rate must lie in \(0, 1\]",
    ),
    "step rate above 1": (_step(sample_rate=1.1), ValueError, r"sample_rate must lie in \(0, 1\]"),
    "step rate nan": (_step(sample_rate=NAN), ValueError, "sample_rate must be a number, got NaN"),
    "step rate bool": (_step(sample_rate=True), TypeError, "sample_rate must be a real number"),
    # get_noise_multiplier
    "sigma eps zero": (_sigma(target_epsilon=0.0), ValueError, "target_epsilon must be > 0"),
    "sigma eps negative": (_sigma(target_epsilon=-1.0), ValueError, "target_epsilon must be > 0"),
    "sigma eps nan": (
        _sigma(target_epsilon=NAN),
        ValueError,
        "target_epsilon must be a number, got NaN",
    ),
    "sigma eps inf": (_sigma(target_epsilon=INF), ValueError, "target_epsilon must be finite"),
    "sigma eps string": (
        _sigma(target_epsilon="1"),
        TypeError,
        "target_epsilon must be a real number",
    ),
    "sigma delta zero": (
        _sigma(target_delta=0.0),
        ValueError,
        r"target_delta must lie in the open interval \(0, 1\), got 0.0. Gaussian noise is not "
        r"\(epsilon, 0\)-DP for any finite epsilon",
    ),
    "sigma delta one": (
        _sigma(target_delta=1.0),
        ValueError,
        r"target_delta must lie in the open interval",
    ),
    "sigma delta nan": (
        _sigma(target_delta=NAN),
        ValueError,
        "target_delta must be a number, got NaN",
    ),
    "sigma rate zero": (_sigma(sample_rate=0.0), ValueError, r"sample_rate must lie in \(0, 1\]"),
    "sigma rate above 1": (
        _sigma(sample_rate=2.0),
        ValueError,
        r"sample_rate must lie in \(0, 1\]",
    ),
    "sigma rate nan": (
        _sigma(sample_rate=NAN),
        ValueError,
        "sample_rate must be a number, got NaN",
    ),
    "sigma steps zero": (_sigma(steps=0), ValueError, "steps must be an integer >= 1"),
    "sigma steps float": (_sigma(steps=100.0), TypeError, "steps must be an integer"),
    "sigma steps bool": (_sigma(steps=True), TypeError, "steps must be an integer"),
    "sigma scalar orders": (_sigma(orders=8.0), TypeError, "orders must be a sequence"),
    "sigma tolerance zero": (
        _sigma(epsilon_tolerance=0.0),
        ValueError,
        "epsilon_tolerance must be > 0",
    ),
    "sigma tolerance negative": (
        _sigma(epsilon_tolerance=-0.01),
        ValueError,
        "epsilon_tolerance must be > 0",
    ),
    "sigma tolerance nan": (
        _sigma(epsilon_tolerance=NAN),
        ValueError,
        "epsilon_tolerance must be a number",
    ),
    # a coursework trial: target 0.005 with the default tolerance 0.01 returned sigma = 20, the
    # first end of the bracket, where sigma between 1 and 2 met the target
    "sigma tolerance above target": (
        _sigma(target_epsilon=0.005, sample_rate=1e-3, steps=1, accountant="pld"),
        ValueError,
        r"epsilon_tolerance=0.01 must be below target_epsilon=0.005",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_CALLS))
def test_bad_input_is_rejected_with_a_message_naming_the_parameter(name):
    call, error, message = BAD_CALLS[name]
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize(
    "call",
    [
        lambda o: compute_rdp(q=0.01, noise_multiplier=1.0, steps=1, orders=o),
        lambda o: get_privacy_spent(orders=o, rdp=[0.1, 0.2], delta=1e-5),
        lambda o: RDPAccountant(orders=o),
        lambda o: get_noise_multiplier(
            target_epsilon=1.0, target_delta=1e-5, sample_rate=0.01, steps=10, orders=o
        ),
    ],
    ids=["compute_rdp", "get_privacy_spent", "RDPAccountant", "get_noise_multiplier"],
)
@pytest.mark.parametrize(
    ("orders", "error", "message"), BAD_ORDERS, ids=[repr(o) for o, _, _ in BAD_ORDERS]
)
def test_bad_orders_are_rejected_everywhere(call, orders, error, message):
    """The same check, with the same message, in every function that takes orders (for
    RDPAccountant and get_noise_multiplier it runs before their refusal of a scalar)."""
    with pytest.raises(error, match=message):
        call(orders)


@pytest.mark.parametrize(
    "call",
    [
        lambda d: get_privacy_spent(orders=[2.0], rdp=[0.1], delta=d),
        lambda d: RDPAccountant().get_epsilon(d),
        lambda d: RDPAccountant().get_privacy_spent(delta=d),
        lambda d: _stepped_accountant().get_epsilon(d),
        lambda d: _stepped_accountant().get_privacy_spent(delta=d),
    ],
    ids=[
        "get_privacy_spent",
        "empty.get_epsilon",
        "empty.get_privacy_spent",
        "stepped.get_epsilon",
        "stepped.get_privacy_spent",
    ],
)
@pytest.mark.parametrize(
    ("delta", "error", "message"), BAD_DELTAS, ids=[repr(d) for d, _, _ in BAD_DELTAS]
)
def test_bad_delta_is_rejected_everywhere(call, delta, error, message):
    with pytest.raises(error, match=message):
        call(delta)
