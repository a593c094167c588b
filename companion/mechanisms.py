r"""The basic mechanisms of differential privacy.

A randomized mechanism :math:`M` is :math:`(\varepsilon, \delta)`-differentially private if for
every pair of neighbouring data sets :math:`D, D'` and every set of outputs :math:`S`

.. math::

    \Pr[M(D) \in S] \le e^{\varepsilon} \Pr[M(D') \in S] + \delta

(Dwork, McSherry, Nissim and Smith 2006; Dwork and Roth 2014, Definition 2.4). This module holds
the mechanisms the book's differential-privacy chapter teaches: randomized response, the Laplace
mechanism, the Gaussian mechanism with its classic and analytic calibrations, the exponential
mechanism, and counting and sum queries with clipped contributions.

.. warning::

    These samplers are for teaching. They draw noise from numpy's pseudo-random generator, which
    is not a cryptographically secure source, and they add floating-point Laplace and Gaussian
    noise, whose low-order bits can reveal the exact value they were added to (Mironov 2012, "On
    Significance of the Least Significant Bits for Differential Privacy"). A production release
    needs a library built for it, such as OpenDP (https://opendp.org), which samples noise
    exactly (for example the discrete Gaussian of Canonne, Kamath and Steinke 2020) from a secure
    source.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from scipy import optimize, special

from companion._random import RNGLike, as_generator
from companion._validation import (
    check_delta,
    check_epsilon,
    check_positive,
    check_real,
    check_values,
    check_vector,
)

Neighbouring = Literal["add_remove", "replace"]

__all__ = [
    "analytic_gaussian_sigma",
    "classic_gaussian_sigma",
    "exponential_mechanism",
    "exponential_mechanism_probabilities",
    "gaussian_mechanism",
    "gaussian_privacy_profile",
    "laplace_mechanism",
    "private_count",
    "private_sum",
    "randomized_response",
    "randomized_response_estimate",
    "randomized_response_keep_probability",
    "sum_sensitivity",
]


def _add_noise(value: float | np.ndarray, noise: np.ndarray) -> float | np.ndarray:
    r"""Return ``value + noise`` with the type of ``value`` (a float stays a float)."""
    if isinstance(value, np.ndarray):
        return value + noise
    return float(value + noise[()])


# --- Laplace ------------------------------------------------------------------------------------


def laplace_mechanism(
    value: float | np.ndarray,
    *,
    sensitivity: float,
    epsilon: float,
    rng: RNGLike = None,
) -> float | np.ndarray:
    r"""Release ``value`` with Laplace noise of scale ``sensitivity / epsilon``.

    For a query :math:`f` whose L1 sensitivity is
    :math:`\Delta_1 = \max_{D \sim D'} \lVert f(D) - f(D') \rVert_1`, the mechanism

    .. math:: M(D) = f(D) + (Y_1, \dots, Y_d), \quad Y_i \sim \mathrm{Lap}(\Delta_1/\varepsilon)

    is :math:`\varepsilon`-differentially private (Dwork et al. 2006; Dwork and Roth 2014,
    Theorem 3.6). The density of :math:`\mathrm{Lap}(b)` is :math:`e^{-|x|/b} / (2b)`; its
    variance is :math:`2b^2`.

    Args:
        value: the true answer, a real number or a numpy array (noise is added to each entry).
        sensitivity: the L1 sensitivity of the query, > 0. For an array it must bound the L1
            norm of the change of the whole array.
        epsilon: the privacy parameter, > 0.
        rng: a ``numpy.random.Generator`` or an int seed; None draws fresh entropy.

    Returns:
        The noisy answer, of the same type and shape as ``value``.

    Example:
        >>> laplace_mechanism(42.0, sensitivity=1.0, epsilon=1.0, rng=0)  # doctest: +SKIP
        42.25...
    """
    value = check_values("value", value)
    sensitivity = check_positive("sensitivity", sensitivity)
    epsilon = check_epsilon(epsilon)
    generator = as_generator(rng)
    noise = generator.laplace(0.0, sensitivity / epsilon, size=np.shape(value))
    return _add_noise(value, noise)


# --- Gaussian -----------------------------------------------------------------------------------


def classic_gaussian_sigma(*, epsilon: float, delta: float, sensitivity: float = 1.0) -> float:
    r"""The classic calibration of the Gaussian mechanism, valid only for ``epsilon < 1``.

    .. math:: \sigma = \frac{\Delta_2 \sqrt{2 \ln(1.25/\delta)}}{\varepsilon}

    gives :math:`(\varepsilon, \delta)`-DP for :math:`0 < \varepsilon < 1` (Dwork and Roth 2014,
    Theorem A.1). The proof needs :math:`\varepsilon < 1`; for larger epsilon the formula is not
    a guarantee, and it is loose everywhere. :func:`analytic_gaussian_sigma` is exact.

    Raises:
        ValueError: if ``epsilon >= 1`` (use :func:`analytic_gaussian_sigma`), or any argument
            is out of range.
    """
    epsilon = check_epsilon(epsilon)
    delta = check_delta(delta)
    sensitivity = check_positive("sensitivity", sensitivity)
    if epsilon >= 1:
        raise ValueError(
            f"the classic Gaussian calibration holds only for epsilon < 1, got epsilon={epsilon}; "
            "use analytic_gaussian_sigma, which is exact for every epsilon > 0."
        )
    return sensitivity * math.sqrt(2 * math.log(1.25 / delta)) / epsilon


def _log_gaussian_delta(sigma: float, epsilon: float, sensitivity: float) -> float:
    r"""Natural log of :func:`gaussian_privacy_profile`, computed in log space."""
    a = sensitivity / (2 * sigma)
    b = epsilon * sigma / sensitivity
    log_first = special.log_ndtr(a - b)
    log_second = epsilon + special.log_ndtr(-a - b)
    # delta = exp(log_first) - exp(log_second), and log_second < log_first for sigma > 0.
    return float(log_first + np.log(-np.expm1(log_second - log_first)))


def gaussian_privacy_profile(*, sigma: float, epsilon: float, sensitivity: float = 1.0) -> float:
    r"""The smallest delta for which the Gaussian mechanism is (epsilon, delta)-DP.

    Adding :math:`\mathcal{N}(0, \sigma^2 I)` to a query of L2 sensitivity :math:`\Delta_2` is
    :math:`(\varepsilon, \delta)`-DP if and only if

    .. math::

        \delta \ge \Phi\left(\frac{\Delta_2}{2\sigma} - \frac{\varepsilon\sigma}{\Delta_2}\right)
        - e^{\varepsilon}\, \Phi\left(-\frac{\Delta_2}{2\sigma}
        - \frac{\varepsilon\sigma}{\Delta_2}\right),

    where :math:`\Phi` is the standard normal CDF (Balle and Wang 2018, Theorem 8). This
    function returns the right-hand side.
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
    method on :math:`\log\sigma` and then nudged up until the profile is at most ``delta``, so
    the returned sigma never gives less privacy than asked for. It is valid for every
    ``epsilon > 0`` and never larger than :func:`classic_gaussian_sigma`.

    Args:
        epsilon: > 0.
        delta: in (0, 1).
        sensitivity: the L2 sensitivity of the query, > 0.

    Returns:
        The standard deviation of the noise.
    """
    epsilon = check_epsilon(epsilon)
    delta = check_delta(delta)
    sensitivity = check_positive("sensitivity", sensitivity)
    log_delta = math.log(delta)

    def excess(log_sigma: float) -> float:
        return _log_gaussian_delta(math.exp(log_sigma), epsilon, sensitivity) - log_delta

    # Bracket the root: excess(log sigma) falls from log(1/delta) > 0 towards -inf.
    low = high = math.log(sensitivity * math.sqrt(2 * math.log(1.25 / delta)) / epsilon)
    while excess(low) <= 0:
        low -= 1.0
    while excess(high) > 0:
        high += 1.0
    sigma = math.exp(optimize.brentq(excess, low, high, xtol=1e-14, rtol=1e-15))
    while math.exp(_log_gaussian_delta(sigma, epsilon, sensitivity)) > delta:
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

    Args:
        value: the true answer, a real number or a numpy array.
        sensitivity: L2 sensitivity, > 0.
        epsilon: > 0 (< 1 for the classic calibration).
        delta: in (0, 1); keep it well below 1/n for a data set of n people.
        calibration: ``"analytic"`` or ``"classic"``.
        rng: a ``numpy.random.Generator`` or an int seed; None draws fresh entropy.
    """
    value = check_values("value", value)
    if calibration == "analytic":
        sigma = analytic_gaussian_sigma(epsilon=epsilon, delta=delta, sensitivity=sensitivity)
    elif calibration == "classic":
        sigma = classic_gaussian_sigma(epsilon=epsilon, delta=delta, sensitivity=sensitivity)
    else:
        raise ValueError(f"calibration must be 'analytic' or 'classic', got {calibration!r}.")
    noise = as_generator(rng).normal(0.0, sigma, size=np.shape(value))
    return _add_noise(value, noise)


# --- Randomized response ------------------------------------------------------------------------


def randomized_response_keep_probability(*, epsilon: float) -> float:
    r"""The probability :math:`e^{\varepsilon} / (1 + e^{\varepsilon})` of answering truthfully."""
    epsilon = check_epsilon(epsilon)
    return 1.0 / (1.0 + math.exp(-epsilon))


def _check_bits(name: str, bits: object) -> np.ndarray:
    if not isinstance(bits, np.ndarray):
        raise TypeError(f"{name} must be a numpy array of 0/1 or bool, got {type(bits).__name__}.")
    if bits.ndim != 1 or bits.size == 0:
        raise ValueError(
            f"{name} must be a non-empty one-dimensional array, got shape {bits.shape}."
        )
    if bits.dtype != bool:
        if not np.issubdtype(bits.dtype, np.integer):
            raise TypeError(f"{name} must hold bool or integer 0/1 values, got dtype {bits.dtype}.")
        if not np.isin(bits, (0, 1)).all():
            raise ValueError(f"{name} must hold only 0 and 1.")
    return bits


def randomized_response(bits: np.ndarray, *, epsilon: float, rng: RNGLike = None) -> np.ndarray:
    r"""Each person reports their true bit with probability :math:`e^\varepsilon/(1+e^\varepsilon)`.

    Otherwise they report the opposite bit. This is the symmetric form of Warner's (1965)
    randomized response. For one person, the ratio of the probabilities of any report under the
    two possible true bits is at most :math:`p/(1-p) = e^{\varepsilon}`, so the release is
    :math:`\varepsilon`-DP with respect to changing one person's bit (Dwork and Roth 2014,
    Section 3.2). Each person randomizes on their own device, so no curator sees a true bit.

    Args:
        bits: a one-dimensional numpy array of bool or of integers 0/1.
        epsilon: > 0.
        rng: a ``numpy.random.Generator`` or an int seed; None draws fresh entropy.

    Returns:
        The reports, an array of the same dtype as ``bits``.
    """
    bits = _check_bits("bits", bits)
    keep = randomized_response_keep_probability(epsilon=epsilon)
    flip = as_generator(rng).random(bits.shape) >= keep
    return np.where(flip, 1 - bits.astype(int), bits.astype(int)).astype(bits.dtype)


def randomized_response_estimate(reports: np.ndarray, *, epsilon: float) -> float:
    r"""Unbiased estimate of the fraction of ones among the true bits, from the reports.

    If a fraction :math:`\pi` of the true bits are 1, a report is 1 with probability
    :math:`\lambda = \pi p + (1 - \pi)(1 - p)`. Solving for :math:`\pi` and replacing
    :math:`\lambda` by the observed fraction :math:`\hat\lambda` gives the unbiased estimator

    .. math:: \hat\pi = \frac{\hat\lambda - (1 - p)}{2p - 1}

    (Warner 1965). For fixed true bits its variance is :math:`p(1-p) / (n (2p-1)^2)`, the
    randomization alone; if the n people are a random sample of a population it is
    :math:`\lambda(1-\lambda) / (n (2p-1)^2)`. The estimate can fall outside [0, 1]; it is
    returned as is, so it stays unbiased.
    """
    reports = _check_bits("reports", reports)
    keep = randomized_response_keep_probability(epsilon=epsilon)
    return (float(np.mean(reports)) - (1 - keep)) / (2 * keep - 1)


# --- Exponential ------------------------------------------------------------------------------


def exponential_mechanism_probabilities(
    scores: np.ndarray, *, sensitivity: float, epsilon: float
) -> np.ndarray:
    r"""Selection probabilities of the exponential mechanism (McSherry and Talwar 2007).

    Candidate :math:`r` with utility :math:`u(D, r)` is chosen with probability proportional to

    .. math:: \exp\left(\frac{\varepsilon\, u(D, r)}{2 \Delta u}\right),

    where :math:`\Delta u` bounds how much one person can change any utility. The selection is
    :math:`\varepsilon`-DP (Dwork and Roth 2014, Theorem 3.10).

    Args:
        scores: a one-dimensional numpy array of utilities, one per candidate.
        sensitivity: the sensitivity of the utility, > 0.
        epsilon: > 0.
    """
    scores = check_vector("scores", scores)
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite.")
    sensitivity = check_positive("sensitivity", sensitivity)
    epsilon = check_epsilon(epsilon)
    logits = epsilon * scores / (2 * sensitivity)
    weights = np.exp(logits - logits.max())
    return weights / weights.sum()


def exponential_mechanism(
    scores: np.ndarray, *, sensitivity: float, epsilon: float, rng: RNGLike = None
) -> int:
    r"""Choose the index of a candidate with the exponential mechanism.

    See :func:`exponential_mechanism_probabilities` for the distribution.
    """
    probabilities = exponential_mechanism_probabilities(
        scores, sensitivity=sensitivity, epsilon=epsilon
    )
    return int(as_generator(rng).choice(probabilities.size, p=probabilities))


# --- Counting and sum queries -------------------------------------------------------------------


def private_count(mask: np.ndarray, *, epsilon: float, rng: RNGLike = None) -> float:
    r"""The number of ``True`` entries of ``mask`` with Laplace noise of scale ``1 / epsilon``.

    Adding, removing or changing one person's record changes a count by at most 1, so the
    sensitivity is 1 under both notions of neighbouring data sets.
    """
    mask = _check_bits("mask", mask)
    return float(laplace_mechanism(float(np.sum(mask)), sensitivity=1.0, epsilon=epsilon, rng=rng))


def sum_sensitivity(
    *, lower: float, upper: float, neighbouring: Neighbouring = "add_remove"
) -> float:
    r"""L1 sensitivity of the sum of values clipped to ``[lower, upper]``.

    - ``"add_remove"``: neighbours differ by one person's presence; the sum moves by that
      person's value, so :math:`\Delta = \max(|\text{lower}|, |\text{upper}|)`.
    - ``"replace"``: neighbours differ by one person's value; the sum moves by at most
      :math:`\Delta = \text{upper} - \text{lower}`.
    """
    lower = check_real("lower", lower)
    upper = check_real("upper", upper)
    if not lower < upper:
        raise ValueError(f"lower must be < upper, got lower={lower}, upper={upper}.")
    if neighbouring == "add_remove":
        return max(abs(lower), abs(upper))
    if neighbouring == "replace":
        return upper - lower
    raise ValueError(f"neighbouring must be 'add_remove' or 'replace', got {neighbouring!r}.")


def private_sum(
    values: np.ndarray,
    *,
    lower: float,
    upper: float,
    epsilon: float,
    neighbouring: Neighbouring = "add_remove",
    rng: RNGLike = None,
) -> float:
    r"""The sum of ``values`` clipped to ``[lower, upper]``, released with the Laplace mechanism.

    Clipping bounds each person's contribution, which is what gives the sum a finite sensitivity
    (:func:`sum_sensitivity`). The bounds must be chosen without looking at the data; values
    outside them are moved to the nearest bound, which biases the sum: that bias is the price of
    a bounded sensitivity.
    """
    values = check_vector("values", values)
    sensitivity = sum_sensitivity(lower=lower, upper=upper, neighbouring=neighbouring)
    clipped_sum = float(np.clip(values, lower, upper).sum())
    return float(laplace_mechanism(clipped_sum, sensitivity=sensitivity, epsilon=epsilon, rng=rng))
