r"""The Laplace mechanism: noise of scale ``sensitivity / epsilon`` gives pure epsilon-DP.

Dwork, McSherry, Nissim and Smith (2006); Dwork and Roth (2014, Section 3.3). ``add_noise``, which
returns the noisy value with the type of the true one, is shared with the Gaussian mechanism.
"""

from __future__ import annotations

import numpy as np

from companion._random import RNGLike, as_generator
from companion._validation import check_epsilon, check_finite_values, check_positive

__all__ = [
    "laplace_mechanism",
]


def add_noise(value: float | np.ndarray, noise: np.ndarray) -> float | np.ndarray:
    r"""Return ``value + noise`` with the type of ``value`` (a float stays a float)."""
    if isinstance(value, np.ndarray):
        return value + noise
    return float(value + noise[()])


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
    variance is :math:`2b^2`. See the chapter's section :ref:`sec-dp-laplace`.

    Args:
        value: the true answer, a real number or a numpy array (noise is added to each entry).
        sensitivity: the L1 sensitivity of the query, > 0. For an array it must bound the L1
            norm of the change of the whole array.
        epsilon: the privacy parameter, > 0.
        rng: a ``numpy.random.Generator`` or an int seed; None (the default) draws fresh entropy.
            A seed makes the noise reproducible, so it is a secret: never release it.

    Returns:
        The noisy answer, of the same type and shape as ``value`` (a float for a number).

    Raises:
        TypeError: if ``value`` is not a real number or a real numeric numpy array,
            ``sensitivity`` or ``epsilon`` is not a real number, or ``rng`` is not a Generator,
            an int or None.
        ValueError: if ``value`` is empty or holds NaN or an infinite entry, ``sensitivity`` or
            ``epsilon`` is not finite and > 0, or ``rng`` is a negative seed.

    Example:
        >>> round(laplace_mechanism(42.0, sensitivity=1.0, epsilon=1.0, rng=0), 3)
        42.32
        >>> laplace_mechanism(np.zeros(3), sensitivity=1.0, epsilon=2.0, rng=0).round(3)
        array([ 0.16 , -0.308, -1.251])
    """
    value = check_finite_values("value", value)
    sensitivity = check_positive("sensitivity", sensitivity)
    epsilon = check_epsilon(epsilon)
    generator = as_generator(rng)
    noise = generator.laplace(0.0, sensitivity / epsilon, size=np.shape(value))
    return add_noise(value, noise)
