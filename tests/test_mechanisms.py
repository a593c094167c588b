"""Tests of companion.mechanisms.

Statistical tests use fixed seeds and tolerances derived from the sampling distribution of the
statistic they check (stated at each test), typically five standard deviations, so a correct
implementation fails with negligible probability and a wrong scale (off by a factor of 2 or more)
fails for certain.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate, stats

from companion import mechanisms as m

EPSILONS = st.floats(min_value=1e-2, max_value=20.0)
DELTAS = st.floats(min_value=1e-12, max_value=0.5)
HYPOTHESIS = settings(derandomize=True, max_examples=150, deadline=None)


# --- input validation ---------------------------------------------------------------------------

BAD_EPSILONS = [
    (0.0, ValueError, "epsilon must be > 0"),
    (-1.0, ValueError, "epsilon must be > 0"),
    (float("nan"), ValueError, "NaN"),
    (float("inf"), ValueError, "finite"),
    ("1", TypeError, "real number"),
    (None, TypeError, "real number"),
    (True, TypeError, "real number"),
]
BAD_DELTAS = [
    (0.0, ValueError, r"\(0, 1\)"),
    (1.0, ValueError, r"\(0, 1\)"),
    (-1e-5, ValueError, r"\(0, 1\)"),
    (float("nan"), ValueError, "NaN"),
    ("1e-5", TypeError, "real number"),
]


def _calls_taking_epsilon():
    """One valid call of each public function, as a function of epsilon alone."""
    bits = np.array([0, 1, 1, 0])
    return {
        "laplace": lambda e: m.laplace_mechanism(1.0, sensitivity=1.0, epsilon=e, rng=0),
        "gaussian": lambda e: m.gaussian_mechanism(1.0, sensitivity=1.0, epsilon=e, delta=1e-5),
        "analytic_sigma": lambda e: m.analytic_gaussian_sigma(epsilon=e, delta=1e-5),
        "classic_sigma": lambda e: m.classic_gaussian_sigma(epsilon=e, delta=1e-5),
        "profile": lambda e: m.gaussian_privacy_profile(sigma=1.0, epsilon=e),
        "rr": lambda e: m.randomized_response(bits, epsilon=e, rng=0),
        "rr_estimate": lambda e: m.randomized_response_estimate(bits, epsilon=e),
        "rr_keep": lambda e: m.randomized_response_keep_probability(epsilon=e),
        "exponential": lambda e: m.exponential_mechanism(
            np.array([1.0, 2.0]), sensitivity=1.0, epsilon=e
        ),
        "report_noisy_max": lambda e: m.report_noisy_max(np.array([1.0, 2.0]), epsilon=e),
        "count": lambda e: m.private_count(bits.astype(bool), epsilon=e),
        "sum": lambda e: m.private_sum(np.array([1.0, 2.0]), lower=0, upper=5, epsilon=e),
    }


@pytest.mark.parametrize("name", sorted(_calls_taking_epsilon()))
@pytest.mark.parametrize(("epsilon", "error", "message"), BAD_EPSILONS)
def test_every_mechanism_rejects_bad_epsilon(name, epsilon, error, message):
    with pytest.raises(error, match=message):
        _calls_taking_epsilon()[name](epsilon)


@pytest.mark.parametrize(
    "call",
    [
        lambda d: m.gaussian_mechanism(1.0, sensitivity=1.0, epsilon=1.0, delta=d),
        lambda d: m.analytic_gaussian_sigma(epsilon=1.0, delta=d),
        lambda d: m.classic_gaussian_sigma(epsilon=0.5, delta=d),
    ],
    ids=["gaussian", "analytic_sigma", "classic_sigma"],
)
@pytest.mark.parametrize(("delta", "error", "message"), BAD_DELTAS)
def test_gaussian_rejects_bad_delta(call, delta, error, message):
    with pytest.raises(error, match=message):
        call(delta)


@pytest.mark.parametrize("sensitivity", [0.0, -1.0, float("nan")])
def test_bad_sensitivity(sensitivity):
    with pytest.raises(ValueError, match="sensitivity"):
        m.laplace_mechanism(1.0, sensitivity=sensitivity, epsilon=1.0)
    with pytest.raises(ValueError, match="sensitivity"):
        m.analytic_gaussian_sigma(epsilon=1.0, delta=1e-5, sensitivity=sensitivity)
    with pytest.raises(ValueError, match="sensitivity"):
        m.exponential_mechanism(np.array([1.0]), sensitivity=sensitivity, epsilon=1.0)


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (float("nan"), ValueError, "NaN"),
        (np.array([1.0, np.nan]), ValueError, "NaN"),
        (float("inf"), ValueError, "value must be finite"),
        (np.array([1.0, -np.inf]), ValueError, "value must be finite"),
        (np.array([]), ValueError, "empty"),
        ("3", TypeError, "real number or a numpy array"),
        ([1.0, 2.0], TypeError, "real number or a numpy array"),
        (None, TypeError, "real number or a numpy array"),
        (np.array(["a"]), TypeError, "numeric"),
        (np.array([True]), TypeError, "numeric"),
        (np.array([1 + 2j]), TypeError, "real"),
    ],
)
def test_value_validation(value, error, message):
    with pytest.raises(error, match=message):
        m.laplace_mechanism(value, sensitivity=1.0, epsilon=1.0)
    with pytest.raises(error, match=message):
        m.gaussian_mechanism(value, sensitivity=1.0, epsilon=1.0, delta=1e-5)


@pytest.mark.parametrize(
    ("rng", "error"),
    [
        ("seed", TypeError),
        (1.5, TypeError),
        (True, TypeError),
        (-1, ValueError),
        (np.random.RandomState(0), TypeError),
    ],
)
def test_rng_validation(rng, error):
    with pytest.raises(error, match="rng"):
        m.laplace_mechanism(1.0, sensitivity=1.0, epsilon=1.0, rng=rng)


def test_classic_gaussian_refuses_epsilon_of_one_or_more_and_points_to_analytic():
    with pytest.raises(ValueError, match="analytic_gaussian_sigma"):
        m.classic_gaussian_sigma(epsilon=1.0, delta=1e-5)
    with pytest.raises(ValueError, match="epsilon < 1"):
        m.gaussian_mechanism(0.0, sensitivity=1.0, epsilon=2.0, delta=1e-5, calibration="classic")


def test_unknown_calibration_and_neighbouring_are_rejected():
    with pytest.raises(ValueError, match="calibration"):
        m.gaussian_mechanism(0.0, sensitivity=1.0, epsilon=1.0, delta=1e-5, calibration="tight")
    with pytest.raises(ValueError, match="neighbouring"):
        m.sum_sensitivity(lower=0, upper=1, neighbouring="swap")


@pytest.mark.parametrize(
    ("bits", "error", "message"),
    [
        ([0, 1], TypeError, "numpy array"),
        (np.array([0, 2]), ValueError, "only 0 and 1"),
        (np.array([0.0, 1.0]), TypeError, "bool or integer"),
        (np.array([[0, 1]]), ValueError, "one-dimensional"),
        (np.array([], dtype=int), ValueError, "non-empty"),
    ],
)
def test_randomized_response_bits_validation(bits, error, message):
    with pytest.raises(error, match=message):
        m.randomized_response(bits, epsilon=1.0)


@pytest.mark.parametrize(
    ("scores", "error", "message"),
    [
        (np.array([[1.0, 2.0]]), ValueError, "one-dimensional"),
        (np.array([1.0, np.inf]), ValueError, "finite"),
        (np.array([1.0, np.nan]), ValueError, "NaN"),
        ([1.0, 2.0], TypeError, "numpy array"),
    ],
)
def test_exponential_scores_validation(scores, error, message):
    with pytest.raises(error, match=message):
        m.exponential_mechanism(scores, sensitivity=1.0, epsilon=1.0)


def test_sum_bounds_validation():
    with pytest.raises(ValueError, match="lower must be < upper"):
        m.private_sum(np.array([1.0]), lower=5, upper=5, epsilon=1.0)


# --- types, shapes and seeds --------------------------------------------------------------------


def test_outputs_keep_type_and_shape_and_seeds_reproduce():
    assert isinstance(m.laplace_mechanism(3, sensitivity=1.0, epsilon=1.0, rng=1), float)
    out = m.gaussian_mechanism(np.zeros((2, 3)), sensitivity=1.0, epsilon=1.0, delta=1e-5, rng=1)
    assert out.shape == (2, 3)
    a = m.laplace_mechanism(np.zeros(5), sensitivity=1.0, epsilon=1.0, rng=7)
    b = m.laplace_mechanism(np.zeros(5), sensitivity=1.0, epsilon=1.0, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    bits = np.array([True, False, True])
    assert m.randomized_response(bits, epsilon=1.0, rng=0).dtype == bool


def test_generator_is_advanced_not_copied():
    rng = np.random.default_rng(3)
    first = m.laplace_mechanism(0.0, sensitivity=1.0, epsilon=1.0, rng=rng)
    second = m.laplace_mechanism(0.0, sensitivity=1.0, epsilon=1.0, rng=rng)
    assert first != second


# --- Laplace ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("sensitivity", "epsilon"), [(1.0, 1.0), (2.0, 0.5), (1.0, 4.0)])
def test_laplace_variance_matches_scale(sensitivity, epsilon):
    """Var(Lap(b)) = 2 b^2. For n draws the sample variance has relative sd sqrt(5/n)
    (fourth moment 24 b^4), so 5 sd at n = 200,000 is 2.5%."""
    n = 200_000
    b = sensitivity / epsilon
    noise = m.laplace_mechanism(np.zeros(n), sensitivity=sensitivity, epsilon=epsilon, rng=11)
    assert abs(noise.var() / (2 * b**2) - 1) < 5 * math.sqrt(5 / n)
    assert abs(noise.mean()) < 5 * math.sqrt(2 * b**2 / n)


def _max_log_ratio(sample_a, sample_b, bins, min_count=400):
    """Largest |log(p_a / p_b)| over histogram bins, and the 5-sd sampling allowance there.

    For bin counts k_a, k_b out of n draws each, log(k_a / k_b) has sd about
    sqrt(1/k_a + 1/k_b) (delta method). Bins with fewer than ``min_count`` draws are skipped.
    """
    count_a, _ = np.histogram(sample_a, bins=bins)
    count_b, _ = np.histogram(sample_b, bins=bins)
    keep = (count_a >= min_count) & (count_b >= min_count)
    log_ratio = np.abs(np.log(count_a[keep] / count_b[keep]))
    allowance = 5 * np.sqrt(1 / count_a[keep] + 1 / count_b[keep])
    worst = np.argmax(log_ratio - allowance)
    return log_ratio[worst], allowance[worst], log_ratio.max()


def test_laplace_histograms_on_neighbouring_counts_respect_e_to_the_epsilon():
    """A count of 10 versus 11 (neighbours). In every bin the ratio of output frequencies is at
    most e^epsilon up to sampling error; in the tails it equals e^epsilon, so the bound is tight."""
    epsilon, n = 1.0, 400_000
    rng = np.random.default_rng(5)
    a = m.laplace_mechanism(np.full(n, 10.0), sensitivity=1.0, epsilon=epsilon, rng=rng)
    b = m.laplace_mechanism(np.full(n, 11.0), sensitivity=1.0, epsilon=epsilon, rng=rng)
    bins = np.arange(0.0, 21.5, 0.5)
    log_ratio, allowance, largest = _max_log_ratio(a, b, bins)
    assert log_ratio <= epsilon + allowance
    assert largest > epsilon - 0.1  # the tails reach the bound


def test_laplace_histogram_check_catches_too_little_noise():
    """Negative control: noise of half the right scale gives ratios near e^(2 epsilon)."""
    epsilon, n = 1.0, 400_000
    rng = np.random.default_rng(5)
    a = m.laplace_mechanism(np.full(n, 10.0), sensitivity=0.5, epsilon=epsilon, rng=rng)
    b = m.laplace_mechanism(np.full(n, 11.0), sensitivity=0.5, epsilon=epsilon, rng=rng)
    log_ratio, allowance, _ = _max_log_ratio(a, b, np.arange(0.0, 21.5, 0.5))
    assert log_ratio > epsilon + allowance


# --- Gaussian ---------------------------------------------------------------------------------


@pytest.mark.parametrize("calibration", ["analytic", "classic"])
def test_gaussian_variance_matches_sigma(calibration):
    """The sample variance of n normal draws has relative sd sqrt(2/(n-1)); 5 sd at n = 200,000
    is 1.6%."""
    n, epsilon, delta, sensitivity = 200_000, 0.5, 1e-5, 2.0
    noise = m.gaussian_mechanism(
        np.zeros(n),
        sensitivity=sensitivity,
        epsilon=epsilon,
        delta=delta,
        calibration=calibration,
        rng=3,
    )
    if calibration == "analytic":
        sigma = m.analytic_gaussian_sigma(epsilon=epsilon, delta=delta, sensitivity=sensitivity)
    else:
        sigma = sensitivity * math.sqrt(2 * math.log(1.25 / delta)) / epsilon
    assert abs(noise.var() / sigma**2 - 1) < 5 * math.sqrt(2 / (n - 1))


@pytest.mark.parametrize(
    ("sigma", "epsilon", "sensitivity"), [(1.0, 1.0, 1.0), (3.0, 0.5, 2.0), (0.5, 3.0, 1.0)]
)
def test_gaussian_profile_equals_the_definition_by_integration(sigma, epsilon, sensitivity):
    """delta(epsilon) = sup_S P(S) - e^eps Q(S) = integral of max(0, p - e^eps q), computed here
    by quadrature for p = N(0, sigma^2), q = N(sensitivity, sigma^2): independent of the closed
    form."""
    p = stats.norm(0.0, sigma).pdf
    q = stats.norm(sensitivity, sigma).pdf
    # p - e^eps q > 0 exactly for x below this point (solve log p - log q = eps).
    x_star = sensitivity / 2 - epsilon * sigma**2 / sensitivity
    integral, _ = integrate.quad(
        lambda x: p(x) - math.exp(epsilon) * q(x), -np.inf, x_star, epsabs=1e-14
    )
    profile = m.gaussian_privacy_profile(sigma=sigma, epsilon=epsilon, sensitivity=sensitivity)
    assert profile == pytest.approx(integral, rel=1e-8)


@HYPOTHESIS
@given(epsilon=EPSILONS, delta=DELTAS, sensitivity=st.floats(min_value=0.1, max_value=10.0))
def test_analytic_sigma_is_private_and_smallest(epsilon, delta, sensitivity):
    """The returned sigma meets the exact privacy profile at (epsilon, delta), and 1e-6 less
    noise would not."""
    sigma = m.analytic_gaussian_sigma(epsilon=epsilon, delta=delta, sensitivity=sensitivity)
    profile = m.gaussian_privacy_profile
    assert profile(sigma=sigma, epsilon=epsilon, sensitivity=sensitivity) <= delta
    assert profile(sigma=sigma * (1 - 1e-6), epsilon=epsilon, sensitivity=sensitivity) > delta


@HYPOTHESIS
@given(epsilon=st.floats(min_value=1e-3, max_value=0.999), delta=DELTAS)
def test_classic_sigma_is_never_smaller_than_analytic(epsilon, delta):
    classic = m.classic_gaussian_sigma(epsilon=epsilon, delta=delta)
    analytic = m.analytic_gaussian_sigma(epsilon=epsilon, delta=delta)
    assert classic >= analytic


def test_analytic_sigma_scales_linearly_with_sensitivity():
    one = m.analytic_gaussian_sigma(epsilon=1.0, delta=1e-5)
    assert m.analytic_gaussian_sigma(epsilon=1.0, delta=1e-5, sensitivity=3.0) == pytest.approx(
        3 * one, rel=1e-10
    )


# --- randomized response ------------------------------------------------------------------------


def test_randomized_response_flips_with_the_right_probability():
    """Flip frequency over n bits has sd sqrt(p(1-p)/n); allow 5 sd."""
    epsilon, n = 1.0, 200_000
    bits = np.random.default_rng(0).integers(0, 2, size=n)
    reports = m.randomized_response(bits, epsilon=epsilon, rng=1)
    keep = math.exp(epsilon) / (1 + math.exp(epsilon))
    kept = np.mean(reports == bits)
    assert abs(kept - keep) < 5 * math.sqrt(keep * (1 - keep) / n)
    # the likelihood ratio of a report under the two true bits is exactly e^epsilon
    assert keep / (1 - keep) == pytest.approx(math.exp(epsilon))


@pytest.mark.parametrize(("fraction", "epsilon"), [(0.1, 0.5), (0.3, 1.0), (0.8, 2.0)])
def test_randomized_response_estimator_is_unbiased(fraction, epsilon):
    """Average the estimate over R surveys of the same n people. With the true bits fixed, each
    estimate has variance p (1 - p) / (n (2p - 1)^2), so the average is within 5 sd / sqrt(R) of
    the truth, and the spread of the estimates matches sd."""
    n, repeats = 1_000, 2_000
    rng = np.random.default_rng(42)
    bits = (np.arange(n) < fraction * n).astype(int)
    estimates = [
        m.randomized_response_estimate(
            m.randomized_response(bits, epsilon=epsilon, rng=rng), epsilon=epsilon
        )
        for _ in range(repeats)
    ]
    p = math.exp(epsilon) / (1 + math.exp(epsilon))
    sd = math.sqrt(p * (1 - p) / (n * (2 * p - 1) ** 2))
    assert abs(np.mean(estimates) - fraction) < 5 * sd / math.sqrt(repeats)
    # a sample sd from R draws has relative sd about 1/sqrt(2R) = 1.6%; allow 5 of those
    assert np.std(estimates) == pytest.approx(sd, rel=5 / math.sqrt(2 * repeats))


# --- exponential mechanism ----------------------------------------------------------------------


@HYPOTHESIS
@given(
    scores=st.lists(st.floats(-100, 100), min_size=2, max_size=8),
    shifts=st.lists(st.floats(-1, 1), min_size=8, max_size=8),
    epsilon=EPSILONS,
)
def test_exponential_mechanism_probability_ratio_is_bounded(scores, shifts, epsilon):
    """Neighbouring data change each utility by at most the sensitivity (here 1); every
    selection probability then changes by a factor of at most e^epsilon."""
    u = np.array(scores)
    u_neighbour = u + np.array(shifts[: u.size])
    p = m.exponential_mechanism_probabilities(u, sensitivity=1.0, epsilon=epsilon)
    p_neighbour = m.exponential_mechanism_probabilities(
        u_neighbour, sensitivity=1.0, epsilon=epsilon
    )
    assert p.sum() == pytest.approx(1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_ratio = np.abs(np.log(p) - np.log(p_neighbour))
    finite = np.isfinite(log_ratio)  # probabilities that underflow to 0 in both are skipped
    assert (log_ratio[finite] <= epsilon * (1 + 1e-9) + 1e-12).all()


def test_exponential_mechanism_samples_follow_the_probabilities():
    """Each frequency is within 5 binomial sd of its probability."""
    scores = np.array([0.0, 1.0, 2.0, 5.0])
    p = m.exponential_mechanism_probabilities(scores, sensitivity=1.0, epsilon=1.0)
    rng = np.random.default_rng(9)
    n = 20_000
    picks = np.array(
        [m.exponential_mechanism(scores, sensitivity=1.0, epsilon=1.0, rng=rng) for _ in range(n)]
    )
    freq = np.bincount(picks, minlength=4) / n
    assert np.all(np.abs(freq - p) < 5 * np.sqrt(p * (1 - p) / n))


# --- report noisy max ---------------------------------------------------------------------------


def _noisy_max_win_probabilities(scores, scale):
    """Oracle: P(candidate i has the largest noisy score) with independent Lap(scale) noise,

    P_i = integral of f(x - s_i) * prod_{j != i} F(x - s_j) dx, with the Laplace density
    f(z) = exp(-|z|/b) / (2b) and CDF F(z) = exp(z/b)/2 for z < 0, 1 - exp(-z/b)/2 otherwise,
    by adaptive quadrature (scipy) over [min s - 60 b, max s + 60 b] (the mass left out is
    below e^-60) with the kinks at the scores given as break points.
    """
    s = [float(score) for score in scores]

    def cdf(z):
        return 0.5 * math.exp(z / scale) if z < 0 else 1 - 0.5 * math.exp(-z / scale)

    low, high = min(s) - 60 * scale, max(s) + 60 * scale
    probabilities = []
    for i, own in enumerate(s):
        others = s[:i] + s[i + 1 :]

        def integrand(x, own=own, others=others):
            density = math.exp(-abs(x - own) / scale) / (2 * scale)
            return density * math.prod(cdf(x - other) for other in others)

        value, _ = integrate.quad(
            integrand, low, high, points=sorted(s), limit=200, epsabs=1e-13, epsrel=1e-11
        )
        probabilities.append(value)
    return np.array(probabilities)


# Pearson's statistic X^2 = sum (observed - expected)^2 / expected over k = 3 candidates is
# asymptotically chi-square with k - 1 = 2 degrees of freedom; with n = 20,000 draws every
# expected count is above 1,000, far in the range where the approximation holds. A correct
# sampler exceeds the 1 - 1e-6 quantile (27.6) with probability about 1e-6. A wrong noise scale
# gives X^2 about n * sum (p - q)^2 / q, in the thousands here (the negative controls).
CHI2_LIMIT = stats.chi2.isf(1e-6, df=2)


def _pearson(picks, probabilities):
    observed = np.bincount(picks, minlength=probabilities.size)
    expected = picks.size * probabilities
    return float(np.sum((observed - expected) ** 2 / expected))


@pytest.mark.parametrize(
    ("sensitivity", "epsilon", "monotone", "scale"),
    [(1.0, 1.0, False, 2.0), (1.0, 1.0, True, 1.0), (3.0, 0.5, False, 12.0), (3.0, 0.5, True, 6.0)],
)
def test_report_noisy_max_picks_with_the_integrated_probabilities(
    sensitivity, epsilon, monotone, scale
):
    """Selection frequencies of n draws match the winning probabilities integrated from the
    Laplace density at scale 2 Delta / epsilon (Delta / epsilon if monotone); chi-square test
    above. Negative control: the same frequencies are rejected against the other scale."""
    scores = np.array([0.0, 1.0, 2.5]) * sensitivity
    expected = _noisy_max_win_probabilities(scores, scale)
    assert expected.sum() == pytest.approx(1.0, abs=1e-9)
    rng = np.random.default_rng(21)
    n = 20_000
    picks = np.array(
        [
            m.report_noisy_max(
                scores, epsilon=epsilon, sensitivity=sensitivity, monotone=monotone, rng=rng
            )
            for _ in range(n)
        ]
    )
    assert _pearson(picks, expected) < CHI2_LIMIT
    other_scale = scale / 2 if not monotone else scale * 2
    wrong = _noisy_max_win_probabilities(scores, other_scale)
    assert _pearson(picks, wrong) > 10 * CHI2_LIMIT


def _corner_neighbours(scores):
    """Neighbouring utilities of sensitivity 1: every pattern of shifts in {-1, 0, 1}."""
    shifts = np.array(np.meshgrid(*[[-1.0, 0.0, 1.0]] * scores.size)).reshape(scores.size, -1).T
    return [(scores + shift, shift) for shift in shifts]


def test_report_noisy_max_scales_give_epsilon_dp_by_integration():
    """The calibration the docstring states, checked on the integrated probabilities (not on
    samples): with Lap(2 / epsilon) every pair of neighbours (all shifts in {-1, 0, 1}) keeps
    each log probability ratio within epsilon; with Lap(1 / epsilon) the monotone pairs (all
    shifts >= 0 or all <= 0) do, and a non-monotone pair does not (negative control)."""
    epsilon = 1.0
    scores = np.array([3.0, 5.0, 4.0])
    general = _noisy_max_win_probabilities(scores, 2 / epsilon)
    halved = _noisy_max_win_probabilities(scores, 1 / epsilon)
    worst_monotone_halved, worst_general, worst_other_halved = 0.0, 0.0, 0.0
    for neighbour, shift in _corner_neighbours(scores):
        ratio = np.max(np.abs(np.log(general / _noisy_max_win_probabilities(neighbour, 2.0))))
        worst_general = max(worst_general, ratio)
        ratio = np.max(np.abs(np.log(halved / _noisy_max_win_probabilities(neighbour, 1.0))))
        if (shift >= 0).all() or (shift <= 0).all():
            worst_monotone_halved = max(worst_monotone_halved, ratio)
        else:
            worst_other_halved = max(worst_other_halved, ratio)
    assert worst_general <= epsilon + 1e-9
    assert worst_monotone_halved <= epsilon + 1e-9
    assert worst_other_halved > 1.2 * epsilon


def test_gumbel_noisy_max_is_the_exponential_mechanism():
    """The equivalence the docstring states: argmax of the scores plus Gumbel(2 Delta / epsilon)
    noise has the exponential mechanism's probabilities (chi-square test above, n = 200,000
    vectorised draws). Negative control: Laplace noise of the same scale, report noisy max's
    general calibration, is rejected (expected X^2 about 200 at this n)."""
    scores = np.array([0.0, 1.0, 2.5])
    epsilon, sensitivity, n = 1.0, 1.0, 200_000
    probabilities = m.exponential_mechanism_probabilities(
        scores, sensitivity=sensitivity, epsilon=epsilon
    )
    rng = np.random.default_rng(22)
    scale = 2 * sensitivity / epsilon
    gumbel = np.argmax(scores + rng.gumbel(scale=scale, size=(n, scores.size)), axis=1)
    laplace = np.argmax(scores + rng.laplace(scale=scale, size=(n, scores.size)), axis=1)
    assert _pearson(gumbel, probabilities) < CHI2_LIMIT
    assert _pearson(laplace, probabilities) > 2 * CHI2_LIMIT


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"scores": [1.0, 2.0]}, TypeError, "numpy array"),
        ({"scores": np.array([[1.0, 2.0]])}, ValueError, "one-dimensional"),
        ({"scores": np.array([])}, ValueError, "empty"),
        ({"scores": np.array([1.0, np.inf])}, ValueError, "finite"),
        ({"scores": np.array([1.0, np.nan])}, ValueError, "NaN"),
        ({"sensitivity": 0.0}, ValueError, "sensitivity must be > 0"),
        ({"sensitivity": float("nan")}, ValueError, "sensitivity"),
        ({"sensitivity": "1"}, TypeError, "sensitivity"),
        ({"monotone": 1}, TypeError, "monotone must be True or False"),
        ({"monotone": None}, TypeError, "monotone"),
        ({"rng": "seed"}, TypeError, "rng"),
        ({"rng": -1}, ValueError, "rng"),
    ],
)
def test_report_noisy_max_validation(kwargs, error, message):
    arguments = {"scores": np.array([1.0, 2.0]), "epsilon": 1.0, **kwargs}
    with pytest.raises(error, match=message):
        m.report_noisy_max(arguments.pop("scores"), **arguments)


def test_report_noisy_max_seeds_reproduce_and_default_is_fresh_entropy():
    """Ten equal scores: each call is uniform over 10 candidates, so two independent sequences
    of 30 calls agree with probability 1e-30 (the fresh-entropy check cannot fail by chance)."""
    scores = np.zeros(10)
    first = [m.report_noisy_max(scores, epsilon=1.0, rng=seed) for seed in range(30)]
    again = [m.report_noisy_max(scores, epsilon=1.0, rng=seed) for seed in range(30)]
    assert first == again
    assert all(isinstance(pick, int) for pick in first)
    assert m.report_noisy_max(scores, epsilon=1.0, rng=7) == m.report_noisy_max(
        scores, epsilon=1.0, rng=np.random.default_rng(7)
    )
    generator = np.random.default_rng(3)
    advanced = [m.report_noisy_max(scores, epsilon=1.0, rng=generator) for _ in range(30)]
    assert len(set(advanced)) > 1  # the generator is advanced, not copied
    fresh = [m.report_noisy_max(scores, epsilon=1.0) for _ in range(30)]
    fresh_again = [m.report_noisy_max(scores, epsilon=1.0) for _ in range(30)]
    assert fresh != fresh_again
    assert m.report_noisy_max(np.array([5.0]), epsilon=1.0) == 0


# --- counts and sums ----------------------------------------------------------------------------


def test_sum_sensitivity_depends_on_the_neighbouring_notion():
    assert m.sum_sensitivity(lower=0, upper=100) == 100
    assert m.sum_sensitivity(lower=-30, upper=10) == 30
    assert m.sum_sensitivity(lower=-30, upper=10, neighbouring="replace") == 40


def test_private_sum_clips_then_adds_noise_of_the_clipped_sensitivity():
    """With values far outside the bounds the answer centres on the clipped sum, and its
    spread matches Lap(upper / epsilon): sample variance within 5 sd (relative sd sqrt(5/n))."""
    values = np.array([1.0, 2.0, 1000.0])  # 1000 is clipped to 10: clipped sum 13
    rng = np.random.default_rng(8)
    n = 20_000
    answers = np.array(
        [m.private_sum(values, lower=0, upper=10, epsilon=2.0, rng=rng) for _ in range(n)]
    )
    b = 10 / 2.0
    assert abs(answers.mean() - 13) < 5 * math.sqrt(2 * b**2 / n)
    assert abs(answers.var() / (2 * b**2) - 1) < 5 * math.sqrt(5 / n)


def test_private_count_is_centred_on_the_count():
    """Mean of n noisy counts within 5 sd (sqrt(2 / (eps^2 n))) of the true count."""
    mask = np.array([True] * 30 + [False] * 70)
    rng = np.random.default_rng(4)
    n = 20_000
    answers = [m.private_count(mask, epsilon=0.5, rng=rng) for _ in range(n)]
    assert abs(np.mean(answers) - 30) < 5 * math.sqrt(2 / (0.5**2 * n))


def test_gaussian_profile_where_its_two_terms_meet_in_rounding_is_their_upper_bound():
    """A coursework trial: with epsilon sigma / sensitivity above about 560 the two terms of the
    profile agree to rounding, and log(-expm1(x >= 0)) gave NaN (227 of 1,665 grid points), and
    analytic_gaussian_sigma a SciPy error. The profile is below its first term, Phi(a - b),
    here exp(-5e9): both underflow to 0; the calibration returns a finite sigma."""
    assert m.gaussian_privacy_profile(sigma=1e8, epsilon=1e-3) == 0.0
    assert m.gaussian_privacy_profile(sigma=1e10, epsilon=1e-6) == 0.0
    assert math.isfinite(m.analytic_gaussian_sigma(epsilon=1e-10, delta=1e-250))


def _log_profile_by_quadrature(sigma: float, epsilon: float) -> float:
    """log delta(epsilon) of N(0, sigma^2) against N(1, sigma^2), by quadrature of the definition
    written without the closed form's cancellation: with z = 1 / (2 sigma) - epsilon sigma (where
    p = e^eps q) and mu = 1 / sigma, substituting x = sigma (z - t) in the integral of
    p - e^eps q over x < sigma z gives delta = phi(z) int_0^inf exp(z t - t^2 / 2)
    (-expm1(-mu t)) dt, a positive integrand (factor exp(-shift) taken out at its largest)."""
    mu = 1 / sigma
    z = 1 / (2 * sigma) - epsilon * sigma
    peak = max(z, 0.0)
    shift = z * peak - peak * peak / 2

    def integrand(t: float) -> float:
        return math.exp(z * t - t * t / 2 - shift) * -math.expm1(-mu * t)

    options = {"epsabs": 0.0, "epsrel": 1e-13, "limit": 200}
    integral = integrate.quad(integrand, 0, peak + 1, **options)[0]
    integral += integrate.quad(integrand, peak + 1, np.inf, **options)[0]
    return -z * z / 2 - 0.5 * math.log(2 * math.pi) + shift + math.log(integral)


# (sigma, b = epsilon sigma): b sets delta (about exp(-b^2 / 2)); a large sigma with a small
# epsilon is where the closed form's two terms nearly cancel (they differ by about 1 / (sigma b)).
# b = 36 keeps delta (about e^-654) a normal float; below 2.2e-308 a float has fewer digits.
PROFILE_GRID = [
    (sigma, b)
    for sigma in (0.05, 1.0, 40.0, 1e4, 1e6, 5.6e9, 1e14)
    for b in (0.01, 0.5, 2.0, 10.0, 31.0, 36.0)
]


@pytest.mark.filterwarnings("ignore::scipy.integrate.IntegrationWarning")
@pytest.mark.parametrize(("sigma", "b"), PROFILE_GRID)
def test_gaussian_profile_matches_quadrature_where_its_terms_nearly_cancel(sigma, b):
    """A review measured delta 2.8% low at sigma = 5.6e9, epsilon = 5.6e-9: the closed form's two
    terms differed in their 12th digit. The docstring promises a relative error under 1e-12; the
    quadrature's is 1e-13 (its epsrel) plus |log delta| u (at most 745 * 1.1e-16 = 8e-14) from
    comparing logs."""
    epsilon = b / sigma
    log_profile = math.log(m.gaussian_privacy_profile(sigma=sigma, epsilon=epsilon))
    assert abs(math.expm1(log_profile - _log_profile_by_quadrature(sigma, epsilon))) < 1.2e-12


def test_gaussian_profile_at_a_large_epsilon_and_an_underflowing_half_sensitivity():
    """A review's points. At epsilon = 651 the rounding of epsilon itself in the gap between the
    two terms left the double-precision value 1.3e-12 low; where sensitivity / (2 sigma)
    underflows, the digit count took log10(0) (a math domain error). The profile depends on
    sigma / sensitivity and epsilon only."""
    sigma, epsilon, sensitivity = 34.183584378762525, 651.3400848091837, 582.053813386013
    profile = m.gaussian_privacy_profile(sigma=sigma, epsilon=epsilon, sensitivity=sensitivity)
    oracle = _log_profile_by_quadrature(sigma / sensitivity, epsilon)
    assert abs(math.expm1(math.log(profile) - oracle)) < 1.2e-12
    # delta is about Phi(-10) times 2a, far below the smallest float
    assert m.gaussian_privacy_profile(sigma=1.7e308, epsilon=10 / 1.7e308) == 0.0


@pytest.mark.filterwarnings("ignore::scipy.integrate.IntegrationWarning")
@pytest.mark.parametrize(
    ("epsilon", "delta"),
    [
        (1e-10, 1e-100),
        (5.6e-9, 1e-5),
        (1e-6, 1e-12),
        (0.5, 1e-5),
        (2.0, 0.3),
        (3e-308, 1e-5),
        (1.0, 1e-310),
        (1.0, 5e-324),
    ],
)
def test_analytic_sigma_meets_the_target_by_quadrature(epsilon, delta):
    """By the independent quadrature, the returned sigma's delta is at most the target (epsilon =
    1e-10, delta = 1e-100 gave 1.048 times it; below delta = 7e-309, 1.25 / delta overflowed and
    the bracket search never ended; epsilon = 3e-308 hit log10(0)), and within the calibration's
    margin of 1e-11 plus the quadrature's error and the last nudge (a relative step of 1e-14 in
    sigma moves log delta by at most b^2 1e-14 < 1e-10 here): 1e-9."""
    sigma = m.analytic_gaussian_sigma(epsilon=epsilon, delta=delta)
    ratio = math.exp(_log_profile_by_quadrature(sigma, epsilon) - math.log(delta))
    assert 1 - 1e-9 < ratio <= 1


def test_randomized_response_estimate_refuses_an_epsilon_that_leaves_no_information():
    """A coursework trial: at epsilon = 1e-17 the keep probability rounds to 1/2, and the
    estimate divided by 2p - 1 = 0 (ZeroDivisionError)."""
    reports = np.array([True, False, True])
    with pytest.raises(ValueError, match="epsilon=1e-17 is too small .* rounds to 1/2"):
        m.randomized_response_estimate(reports, epsilon=1e-17)
    assert math.isfinite(m.randomized_response_estimate(reports, epsilon=1e-3))
