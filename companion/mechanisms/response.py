r"""Randomized response: each person flips their own bit before anyone sees it.

Warner (1965) for the mechanism and its unbiased estimator; Dwork and Roth (2014, Section 3.2)
for its epsilon. ``check_bits``, the check of an array of 0/1 values, is shared with
:func:`~companion.mechanisms.private_count`.
"""

from __future__ import annotations

import math

import numpy as np

from companion._random import RNGLike, as_generator
from companion._validation import check_epsilon

__all__ = [
    "randomized_response",
    "randomized_response_estimate",
    "randomized_response_keep_probability",
]


def randomized_response_keep_probability(*, epsilon: float) -> float:
    r"""The probability :math:`e^{\varepsilon} / (1 + e^{\varepsilon})` of answering truthfully.

    This is the :math:`p` of :func:`randomized_response` (Dwork and Roth 2014, Section 3.2).

    Args:
        epsilon: > 0.

    Returns:
        The probability, in (1/2, 1).

    Raises:
        TypeError: if ``epsilon`` is not a real number.
        ValueError: if ``epsilon`` is not finite and > 0.

    Example:
        >>> round(randomized_response_keep_probability(epsilon=math.log(3)), 6)
        0.75
    """
    epsilon = check_epsilon(epsilon)
    return 1.0 / (1.0 + math.exp(-epsilon))


def check_bits(name: str, bits: object) -> np.ndarray:
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
    See the chapter's section :ref:`sec-dp-randomized-response`.

    Args:
        bits: a one-dimensional numpy array of bool or of integers 0/1.
        epsilon: > 0.
        rng: a ``numpy.random.Generator`` or an int seed; None (the default) draws fresh entropy.
            A seed makes the noise reproducible, so it is a secret: never release it.

    Returns:
        The reports, an array of the same dtype as ``bits``.

    Raises:
        TypeError: if ``bits`` is not a numpy array of bool or integers, ``epsilon`` is not a
            real number, or ``rng`` is not a Generator, an int or None.
        ValueError: if ``bits`` is empty, not one-dimensional or holds values other than 0
            and 1, ``epsilon`` is not finite and > 0, or ``rng`` is a negative seed.

    Example:
        >>> randomized_response(np.array([0, 0, 0, 1, 1, 1]), epsilon=1.0, rng=0)
        array([0, 0, 0, 1, 0, 0])
    """
    bits = check_bits("bits", bits)
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
    returned as is, so it stays unbiased. See the chapter's section
    :ref:`sec-dp-randomized-response`.

    Args:
        reports: the reports of :func:`randomized_response`, a one-dimensional numpy array of
            bool or of integers 0/1.
        epsilon: the epsilon the reports were made with, > 0.

    Returns:
        The estimated fraction of ones, a float (possibly outside [0, 1]).

    Raises:
        TypeError: if ``reports`` is not a numpy array of bool or integers, or ``epsilon`` is
            not a real number.
        ValueError: if ``reports`` is empty, not one-dimensional or holds values other than 0
            and 1, or ``epsilon`` is not finite and > 0, or so small (about 1e-16) that a true
            report's probability rounds to 1/2.

    Example:
        >>> bits = np.arange(10_000) < 3_000  # 30% ones
        >>> reports = randomized_response(bits, epsilon=1.0, rng=0)
        >>> estimate = randomized_response_estimate(reports, epsilon=1.0)
        >>> round(float(reports.mean()), 3), round(estimate, 3)
        (0.408, 0.3)
    """
    reports = check_bits("reports", reports)
    keep = randomized_response_keep_probability(epsilon=epsilon)
    if 2 * keep - 1 == 0:
        raise ValueError(
            f"epsilon={epsilon:g} is too small to estimate anything: the probability of a true "
            "report rounds to 1/2, so the reports hold no information about the bits."
        )
    return (float(np.mean(reports)) - (1 - keep)) / (2 * keep - 1)
