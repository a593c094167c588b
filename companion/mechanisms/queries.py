r"""Counting and sum queries released with the Laplace mechanism.

A count has sensitivity 1; a sum has a finite sensitivity only once each person's value is
clipped to bounds chosen without looking at the data (Dwork and Roth 2014, Section 3.3). The
sensitivity of a sum depends on the notion of neighbouring data sets, :data:`Neighbouring`.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from companion._random import RNGLike
from companion._validation import check_real, check_vector
from companion.mechanisms.laplace import laplace_mechanism
from companion.mechanisms.response import check_bits

#: Neighbouring data sets: ``"add_remove"`` (one person more or less) or ``"replace"`` (one
#: person's record changed).
Neighbouring = Literal["add_remove", "replace"]

__all__ = [
    "Neighbouring",
    "private_count",
    "private_sum",
    "sum_sensitivity",
]


def private_count(mask: np.ndarray, *, epsilon: float, rng: RNGLike = None) -> float:
    r"""The number of ``True`` entries of ``mask`` with Laplace noise of scale ``1 / epsilon``.

    Adding, removing or changing one person's record changes a count by at most 1, so the
    sensitivity is 1 under both notions of neighbouring data sets, and the count is
    :math:`\varepsilon`-DP (Dwork and Roth 2014, Section 3.3). See the chapter's section
    :ref:`sec-dp-laplace`.

    Args:
        mask: a one-dimensional numpy array of bool or of integers 0/1, one entry per person.
        epsilon: > 0.
        rng: a ``numpy.random.Generator`` or an int seed; None (the default) draws fresh entropy.
            A seed makes the noise reproducible, so it is a secret: never release it.

    Returns:
        The noisy count, a float.

    Raises:
        TypeError: if ``mask`` is not a numpy array of bool or integers, ``epsilon`` is not a
            real number, or ``rng`` is not a Generator, an int or None.
        ValueError: if ``mask`` is empty, not one-dimensional or holds values other than 0
            and 1, ``epsilon`` is not finite and > 0, or ``rng`` is a negative seed.

    Example:
        >>> mask = np.arange(100) < 30  # 30 people with the property
        >>> round(private_count(mask, epsilon=1.0, rng=0), 3)
        30.32
    """
    mask = check_bits("mask", mask)
    return float(laplace_mechanism(float(np.sum(mask)), sensitivity=1.0, epsilon=epsilon, rng=rng))


def sum_sensitivity(
    *, lower: float, upper: float, neighbouring: Neighbouring = "add_remove"
) -> float:
    r"""L1 sensitivity of the sum of values clipped to ``[lower, upper]``.

    - ``"add_remove"``: neighbours differ by one person's presence; the sum moves by that
      person's value, so :math:`\Delta = \max(|\text{lower}|, |\text{upper}|)`.
    - ``"replace"``: neighbours differ by one person's value; the sum moves by at most
      :math:`\Delta = \text{upper} - \text{lower}`.

    See the chapter's section :ref:`sec-dp-laplace`.

    Args:
        lower: the lower clipping bound, a finite real number.
        upper: the upper clipping bound, a finite real number > ``lower``.
        neighbouring: ``"add_remove"`` or ``"replace"``.

    Returns:
        The L1 sensitivity, a float > 0.

    Raises:
        TypeError: if ``lower`` or ``upper`` is not a real number.
        ValueError: if a bound is not finite, ``lower >= upper``, or ``neighbouring`` is
            unknown.

    Example:
        >>> sum_sensitivity(lower=-30, upper=10), sum_sensitivity(
        ...     lower=-30, upper=10, neighbouring="replace")
        (30.0, 40.0)
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
    a bounded sensitivity. The noise is :math:`\mathrm{Lap}(\Delta/\varepsilon)`, so the release
    is :math:`\varepsilon`-DP under the chosen neighbouring relation. See the chapter's section
    :ref:`sec-dp-laplace`.

    Args:
        values: a one-dimensional numeric numpy array, one value per person.
        lower: the lower clipping bound, chosen without looking at the data.
        upper: the upper clipping bound, > ``lower``.
        epsilon: > 0.
        neighbouring: ``"add_remove"`` or ``"replace"`` (see :func:`sum_sensitivity`).
        rng: a ``numpy.random.Generator`` or an int seed; None (the default) draws fresh entropy.
            A seed makes the noise reproducible, so it is a secret: never release it.

    Returns:
        The noisy clipped sum, a float.

    Raises:
        TypeError: if ``values`` is not a numeric numpy array, a bound or ``epsilon`` is not a
            real number, or ``rng`` is not a Generator, an int or None.
        ValueError: if ``values`` is empty, not one-dimensional or holds NaN, the bounds are
            not finite or ``lower >= upper``, ``neighbouring`` is unknown, ``epsilon`` is not
            finite and > 0, or ``rng`` is a negative seed.

    Example:
        >>> incomes = np.array([20.0, 35.0, 50.0, 1000.0])  # 1000 is clipped to 100
        >>> round(private_sum(incomes, lower=0, upper=100, epsilon=1.0, rng=0), 3)
        237.01
    """
    values = check_vector("values", values)
    sensitivity = sum_sensitivity(lower=lower, upper=upper, neighbouring=neighbouring)
    clipped_sum = float(np.clip(values, lower, upper).sum())
    return float(laplace_mechanism(clipped_sum, sensitivity=sensitivity, epsilon=epsilon, rng=rng))
