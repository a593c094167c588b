r"""The Gaussian mechanism and its two calibrations, the classic one and the exact analytic one.

Dwork and Roth (2014, Theorem A.1) for the classic calibration; Balle and Wang (2018, "Improving
the Gaussian Mechanism for Differential Privacy", ICML) for the exact privacy profile and the
analytic calibration.
"""

from __future__ import annotations

import math
from typing import Literal

import mpmath
import numpy as np
from scipy import optimize, special

from companion._random import RNGLike, as_generator
from companion._validation import check_delta, check_epsilon, check_finite_values, check_positive
from companion.mechanisms.laplace import add_noise

__all__ = [
    "analytic_gaussian_sigma",
    "classic_gaussian_sigma",
    "gaussian_mechanism",
    "gaussian_privacy_profile",
]


def classic_gaussian_sigma(*, epsilon: float, delta: float, sensitivity: float = 1.0) -> float:
    r"""The classic calibration of the Gaussian mechanism, valid only for ``epsilon < 1``.

    .. math:: \sigma = \frac{\Delta_2 \sqrt{2 \ln(1.25/\delta)}}{\varepsilon}

    gives :math:`(\varepsilon, \delta)`-DP for :math:`0 < \varepsilon < 1` (Dwork and Roth 2014,
    Theorem A.1). The proof needs :math:`\varepsilon < 1`; for larger epsilon the formula is not
    a guarantee, and it is loose everywhere. :func:`analytic_gaussian_sigma` is exact. See the
    chapter's section :ref:`sec-dp-gaussian`.

    Args:
        epsilon: the privacy parameter, in (0, 1).
        delta: in (0, 1).
        sensitivity: the L2 sensitivity of the query, > 0.

    Returns:
        The standard deviation of the noise.

    Raises:
        TypeError: if an argument is not a real number.
        ValueError: if ``epsilon >= 1`` (use :func:`analytic_gaussian_sigma`), or any argument
            is out of range.

    Example:
        >>> round(classic_gaussian_sigma(epsilon=0.5, delta=1e-5), 4)
        9.6896
    """
    epsilon = check_epsilon(epsilon)
    delta = check_delta(delta)
    sensitivity = check_positive("sensitivity", sensitivity)
    if epsilon >= 1:
        raise ValueError(
            f"the classic Gaussian calibration holds only for epsilon < 1, got epsilon={epsilon}; "
            "use analytic_gaussian_sigma, which is exact for every epsilon > 0."
        )
    return sensitivity * math.sqrt(2 * (math.log(1.25) - math.log(delta))) / epsilon


# Where delta = first - second loses more than about 3 digits to cancellation (the gap below),
# the profile is computed again in mpmath with the digits it loses; in double precision the
# relative error is then at most about 4 u (1 + |log first| + epsilon) / 1e-3 (u = 1.1e-16 the
# unit roundoff; the gap's rounding grows with both terms it adds): under 1e-12 wherever delta
# does not underflow.
_DOUBLE_GAP = 1e-3
# The profile's relative error, with a margin of 10 over that bound: the calibration solves for
# delta (1 - _PROFILE_ERROR) so that rounding never leaves the exact delta above the target.
_PROFILE_ERROR = 1e-11
# Below exp(-800), delta underflows as a float whatever it is, and no target delta (a positive
# float, at least exp(-745)) lies there: the first term, an upper bound, is returned as it is.
_UNDERFLOW_LOG = -800.0


def _log_gaussian_delta(sigma: float, epsilon: float, sensitivity: float) -> float:
    r"""Natural log of :func:`gaussian_privacy_profile`, computed in log space."""
    a = sensitivity / (2 * sigma)
    b = epsilon * sigma / sensitivity
    log_first = float(special.log_ndtr(a - b))
    if log_first < _UNDERFLOW_LOG:
        return log_first
    # delta = first (1 - e^gap); the gap is < 0 exactly, but rounding in its three terms (a few
    # units in the last place of |log first| and of epsilon) decides it when it is small.
    gap = epsilon + float(special.log_ndtr(-a - b)) - log_first
    if gap < -_DOUBLE_GAP * (1 + abs(log_first) + epsilon):
        return log_first + math.log(-math.expm1(gap))
    return _log_gaussian_delta_mpmath(sigma, epsilon, sensitivity)


def _log_gaussian_delta_mpmath(sigma: float, epsilon: float, sensitivity: float) -> float:
    """The same, with as many digits as the subtraction loses: 1 - second / first is of the order
    of a / max(b, 1), so log10(max(b, 1) / a) digits cancel (in logs: a may underflow); 20 more
    are kept."""
    log10_b = math.log10(epsilon) + math.log10(sigma) - math.log10(sensitivity)
    log10_a = math.log10(sensitivity) - math.log10(2) - math.log10(sigma)
    digits = 20 + max(0, math.ceil(max(log10_b, 0.0) - log10_a))
    while True:
        with mpmath.workdps(digits):
            sigma_, epsilon_, sensitivity_ = map(mpmath.mpf, (sigma, epsilon, sensitivity))
            a_ = sensitivity_ / (2 * sigma_)
            b_ = epsilon_ * sigma_ / sensitivity_
            first = mpmath.ncdf(a_ - b_)
            delta = first - mpmath.exp(epsilon_) * mpmath.ncdf(-a_ - b_)
            # Ten digits left after the subtraction, or more digits.
            if delta > first * mpmath.mpf(10) ** (10 - digits):
                return float(mpmath.log(delta))
        digits *= 2


def gaussian_privacy_profile(*, sigma: float, epsilon: float, sensitivity: float = 1.0) -> float:
    r"""The smallest delta for which the Gaussian mechanism is (epsilon, delta)-DP.

    Adding :math:`\mathcal{N}(0, \sigma^2 I)` to a query of L2 sensitivity :math:`\Delta_2` is
    :math:`(\varepsilon, \delta)`-DP if and only if

    .. math::

        \delta \ge \Phi\left(\frac{\Delta_2}{2\sigma} - \frac{\varepsilon\sigma}{\Delta_2}\right)
        - e^{\varepsilon}\, \Phi\left(-\frac{\Delta_2}{2\sigma}
        - \frac{\varepsilon\sigma}{\Delta_2}\right),

    where :math:`\Phi` is the standard normal CDF (Balle and Wang 2018, Theorem 8). This
    function returns the right-hand side, to a relative error under :math:`10^{-12}` where it is
    a normal float (above :math:`2.2 \times 10^{-308}`): in double precision where the two terms
    differ by more than about 0.1%, and otherwise (large :math:`\sigma` with small
    :math:`\varepsilon`, where they nearly cancel) in mpmath with as many digits as the
    subtraction loses. Where delta is below :math:`e^{-800}` it returns the first
    term, an upper bound; both round to 0. See the chapter's section :ref:`sec-dp-gaussian`.

    Args:
        sigma: the standard deviation of the noise, > 0.
        epsilon: > 0.
        sensitivity: the L2 sensitivity of the query, > 0.

    Returns:
        The smallest delta, a float in [0, 1).

    Raises:
        TypeError: if an argument is not a real number.
        ValueError: if an argument is not finite and > 0.

    Example:
        >>> f"{gaussian_privacy_profile(sigma=4.0, epsilon=1.0):.3e}"
        '2.924e-06'
    """
    sigma = check_positive("sigma", sigma)
    epsilon = check_epsilon(epsilon)
    sensitivity = check_positive("sensitivity", sensitivity)
    return math.exp(_log_gaussian_delta(sigma, epsilon, sensitivity))


def analytic_gaussian_sigma(*, epsilon: float, delta: float, sensitivity: float = 1.0) -> float:
    r"""The smallest noise scale sigma for which the Gaussian mechanism is (epsilon, delta)-DP.

    This is the analytic calibration of Balle and Wang (2018, "Improving the Gaussian Mechanism
    for Differential Privacy", Theorem 8 and Algorithm 1): instead of a sufficient condition it
    solves the exact condition :func:`gaussian_privacy_profile` ``(sigma) = delta`` for sigma.
    The profile falls strictly as sigma grows, so the solution is unique; it is found by Brent's
    method on :math:`\log\sigma` and then nudged up until the profile is at most
    :math:`\delta (1 - 10^{-11})`, ten times the profile's rounding error below ``delta``, so the
    returned sigma never gives less privacy than asked for. It is valid for every
    ``epsilon > 0`` and never larger than :func:`classic_gaussian_sigma`.

    See the chapter's section :ref:`sec-dp-gaussian`.

    Args:
        epsilon: > 0.
        delta: in (0, 1).
        sensitivity: the L2 sensitivity of the query, > 0.

    Returns:
        The standard deviation of the noise.

    Raises:
        TypeError: if an argument is not a real number.
        ValueError: if ``epsilon`` or ``sensitivity`` is not finite and > 0, or ``delta`` is
            not in (0, 1).

    Example:
        >>> sigma = analytic_gaussian_sigma(epsilon=0.5, delta=1e-5)
        >>> round(sigma, 4), round(classic_gaussian_sigma(epsilon=0.5, delta=1e-5), 4)
        (7.0318, 9.6896)
        >>> gaussian_privacy_profile(sigma=sigma, epsilon=0.5) <= 1e-5
        True
    """
    epsilon = check_epsilon(epsilon)
    delta = check_delta(delta)
    sensitivity = check_positive("sensitivity", sensitivity)
    log_delta = math.log(delta) + math.log1p(-_PROFILE_ERROR)

    def excess(log_sigma: float) -> float:
        return _log_gaussian_delta(math.exp(log_sigma), epsilon, sensitivity) - log_delta

    # Bracket the root, from the classic sigma (in logs, which neither 1.25 / delta nor a tiny
    # epsilon overflows): excess(log sigma) falls from log(1/delta) > 0 towards -inf.
    log_classic = math.log(2 * (math.log(1.25) - math.log(delta))) / 2
    low = high = math.log(sensitivity) + log_classic - math.log(epsilon)
    while excess(low) <= 0:
        low -= 1.0
    while excess(high) > 0:
        high += 1.0
    sigma = math.exp(optimize.brentq(excess, low, high, xtol=1e-14, rtol=1e-15))
    while _log_gaussian_delta(sigma, epsilon, sensitivity) > log_delta:
        sigma *= 1 + 1e-14
    return sigma


def gaussian_mechanism(
    value: float | np.ndarray,
    *,
    sensitivity: float,
    epsilon: float,
    delta: float,
    calibration: Literal["analytic", "classic"] = "analytic",
    rng: RNGLike = None,
) -> float | np.ndarray:
    r"""Release ``value`` with Gaussian noise calibrated to (epsilon, delta).

    .. math:: M(D) = f(D) + \mathcal{N}(0, \sigma^2 I)

    where :math:`\sigma` comes from :func:`analytic_gaussian_sigma` (the default: exact, any
    epsilon) or from :func:`classic_gaussian_sigma` (``calibration="classic"``: Dwork and Roth
    2014, Theorem A.1, epsilon < 1 only). ``sensitivity`` is the L2 sensitivity of the query.
    See the chapter's section :ref:`sec-dp-gaussian`.

    Args:
        value: the true answer, a real number or a numpy array.
        sensitivity: L2 sensitivity, > 0.
        epsilon: > 0 (< 1 for the classic calibration).
        delta: in (0, 1); keep it well below 1/n for a data set of n people.
        calibration: ``"analytic"`` or ``"classic"``.
        rng: a ``numpy.random.Generator`` or an int seed; None (the default) draws fresh entropy.
            A seed makes the noise reproducible, so it is a secret: never release it.

    Returns:
        The noisy answer, of the same type and shape as ``value`` (a float for a number).

    Raises:
        TypeError: if ``value`` is not a real number or a real numeric numpy array, a privacy
            parameter is not a real number, or ``rng`` is not a Generator, an int or None.
        ValueError: if ``value`` is empty or holds NaN or an infinite entry, a parameter is out
            of range, ``calibration`` is unknown, or ``calibration="classic"`` with
            ``epsilon >= 1``.

    Example:
        >>> round(gaussian_mechanism(100.0, sensitivity=1.0, epsilon=1.0, delta=1e-5, rng=0), 3)
        100.469
    """
    value = check_finite_values("value", value)
    if calibration == "analytic":
        sigma = analytic_gaussian_sigma(epsilon=epsilon, delta=delta, sensitivity=sensitivity)
    elif calibration == "classic":
        sigma = classic_gaussian_sigma(epsilon=epsilon, delta=delta, sensitivity=sensitivity)
    else:
        raise ValueError(f"calibration must be 'analytic' or 'classic', got {calibration!r}.")
    noise = as_generator(rng).normal(0.0, sigma, size=np.shape(value))
    return add_noise(value, noise)
