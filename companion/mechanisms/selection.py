r"""Private selection: the exponential mechanism and report noisy max.

Both release only the index of a good candidate, never the utilities: McSherry and Talwar (2007)
for the exponential mechanism; Dwork and Roth (2014, Sections 3.3 and 3.4) for both.
"""

from __future__ import annotations

import numpy as np

from companion._random import RNGLike, as_generator
from companion._validation import check_epsilon, check_positive, check_vector

__all__ = [
    "exponential_mechanism",
    "exponential_mechanism_probabilities",
    "report_noisy_max",
]


def _check_scores(scores: object) -> np.ndarray:
    """A non-empty one-dimensional numpy array of finite utilities."""
    scores = check_vector("scores", scores)
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite.")
    return scores


def exponential_mechanism_probabilities(
    scores: np.ndarray, *, sensitivity: float, epsilon: float
) -> np.ndarray:
    r"""Selection probabilities of the exponential mechanism (McSherry and Talwar 2007).

    Candidate :math:`r` with utility :math:`u(D, r)` is chosen with probability proportional to

    .. math:: \exp\left(\frac{\varepsilon\, u(D, r)}{2 \Delta u}\right),

    where :math:`\Delta u` bounds how much one person can change any utility. The selection is
    :math:`\varepsilon`-DP (Dwork and Roth 2014, Theorem 3.10). See the chapter's section
    :ref:`sec-dp-exponential`.

    Args:
        scores: a one-dimensional numpy array of utilities, one per candidate.
        sensitivity: the sensitivity of the utility, > 0.
        epsilon: > 0.

    Returns:
        A float array of the same length as ``scores``, summing to 1.

    Raises:
        TypeError: if ``scores`` is not a numeric numpy array, or ``sensitivity`` or
            ``epsilon`` is not a real number.
        ValueError: if ``scores`` is empty, not one-dimensional or not finite, or
            ``sensitivity`` or ``epsilon`` is not finite and > 0.

    Example:
        >>> p = exponential_mechanism_probabilities(
        ...     np.array([0.0, 1.0, 2.0]), sensitivity=1.0, epsilon=2.0
        ... )
        >>> p.round(3)
        array([0.09 , 0.245, 0.665])
    """
    scores = _check_scores(scores)
    sensitivity = check_positive("sensitivity", sensitivity)
    epsilon = check_epsilon(epsilon)
    logits = epsilon * scores / (2 * sensitivity)
    weights = np.exp(logits - logits.max())
    return weights / weights.sum()


def exponential_mechanism(
    scores: np.ndarray, *, sensitivity: float, epsilon: float, rng: RNGLike = None
) -> int:
    r"""Choose the index of a candidate with the exponential mechanism.

    See :func:`exponential_mechanism_probabilities` for the distribution and the chapter's
    section :ref:`sec-dp-exponential`.

    Args:
        scores: a one-dimensional numpy array of utilities, one per candidate.
        sensitivity: the sensitivity of the utility, > 0.
        epsilon: > 0.
        rng: a ``numpy.random.Generator`` or an int seed; None (the default) draws fresh entropy.
            A seed makes the noise reproducible, so it is a secret: never release it.

    Returns:
        The index of the chosen candidate, an int.

    Raises:
        TypeError: as :func:`exponential_mechanism_probabilities`, or if ``rng`` is not a
            Generator, an int or None.
        ValueError: as :func:`exponential_mechanism_probabilities`, or if ``rng`` is a
            negative seed.

    Example:
        >>> scores = np.array([0.0, 1.0, 2.0])
        >>> rng = np.random.default_rng(0)
        >>> picks = [exponential_mechanism(scores, sensitivity=1.0, epsilon=2.0, rng=rng)
        ...          for _ in range(1000)]
        >>> np.bincount(picks, minlength=3)
        array([ 84, 219, 697])
    """
    probabilities = exponential_mechanism_probabilities(
        scores, sensitivity=sensitivity, epsilon=epsilon
    )
    return int(as_generator(rng).choice(probabilities.size, p=probabilities))


def report_noisy_max(
    scores: np.ndarray,
    *,
    epsilon: float,
    sensitivity: float = 1.0,
    monotone: bool = False,
    rng: RNGLike = None,
) -> int:
    r"""Add Laplace noise to every utility and report only the index of the largest.

    .. math:: M(D) = \arg\max_r \bigl(u(D, r) + Y_r\bigr), \qquad
        Y_r \sim \mathrm{Lap}(b) \text{ independent},

    is :math:`\varepsilon`-DP with :math:`b = 2\Delta u/\varepsilon` for any utility of
    sensitivity :math:`\Delta u`, and with :math:`b = \Delta u/\varepsilon` (``monotone=True``)
    when the utilities are *monotone*: for every pair of neighbours all utilities move in the
    same direction. Counting queries under add/remove are monotone with :math:`\Delta u = 1`, and
    :math:`b = 1/\varepsilon` is the report noisy max of Dwork and Roth (2014, Section 3.3,
    Claim 3.9). Their proof carries over: fixing the other candidates' noise, the smallest noise
    with which :math:`r` wins moves by at most :math:`2\Delta u` between neighbours (its own
    utility falls by :math:`\Delta u` while another rises by :math:`\Delta u`), and by at most
    :math:`\Delta u` for monotone utilities; the Laplace density changes by at most
    :math:`e^{\varepsilon}` under such a shift. Only the index is released, never the noisy
    values, so the cost is one :math:`\varepsilon` however many candidates there are. With
    Gumbel noise of scale :math:`2\Delta u/\varepsilon` instead, the argmax has exactly the
    distribution of :func:`exponential_mechanism`. See the chapter's section
    :ref:`sec-dp-report-noisy-max`.

    Args:
        scores: a one-dimensional numpy array of utilities, one per candidate.
        epsilon: > 0.
        sensitivity: the sensitivity :math:`\Delta u` of the utility, > 0 (1 for counts).
        monotone: halve the noise scale; claim this only if neighbours change all utilities in
            the same direction (counts under add/remove, not under replace).
        rng: a ``numpy.random.Generator`` or an int seed; None (the default) draws fresh entropy.
            A seed makes the noise reproducible, so it is a secret: never release it.

    Returns:
        The index of the largest noisy utility, an int.

    Raises:
        TypeError: if ``scores`` is not a numeric numpy array, ``epsilon`` or ``sensitivity``
            is not a real number, ``monotone`` is not a bool, or ``rng`` is not a Generator, an
            int or None.
        ValueError: if ``scores`` is empty, not one-dimensional or not finite, ``epsilon`` or
            ``sensitivity`` is not finite and > 0, or ``rng`` is a negative seed.

    Example:
        >>> counts = np.array([30.0, 32.0, 40.0])
        >>> rng = np.random.default_rng(0)
        >>> picks = [report_noisy_max(counts, epsilon=0.5, monotone=True, rng=rng)
        ...          for _ in range(1000)]
        >>> np.bincount(picks, minlength=3)
        array([  9,  30, 961])
    """
    scores = _check_scores(scores)
    epsilon = check_epsilon(epsilon)
    sensitivity = check_positive("sensitivity", sensitivity)
    if not isinstance(monotone, (bool, np.bool_)):
        raise TypeError(f"monotone must be True or False, got {type(monotone).__name__}.")
    scale = (1.0 if monotone else 2.0) * sensitivity / epsilon
    noise = as_generator(rng).laplace(0.0, scale, size=scores.size)
    return int(np.argmax(scores + noise))
