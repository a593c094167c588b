r"""How privacy losses add up: composition and group privacy.

Running several differentially private mechanisms on the same data spends privacy each time. The
theorems here bound the total (Dwork and Roth 2014, Sections 2.3 and 3.5):

- basic composition: :math:`k` mechanisms that are each :math:`(\varepsilon, \delta)`-DP are
  together :math:`(k\varepsilon, k\delta)`-DP;
- advanced composition (Dwork, Rothblum and Vadhan 2010): for any :math:`\delta' > 0` they are
  :math:`(\varepsilon', k\delta + \delta')`-DP with
  :math:`\varepsilon' = \sqrt{2k\ln(1/\delta')}\,\varepsilon + k\varepsilon(e^{\varepsilon}-1)`;
- group privacy: an :math:`(\varepsilon, \delta)`-DP mechanism protects groups of :math:`g`
  people with :math:`(g\varepsilon, g e^{(g-1)\varepsilon}\delta)`.

Both composition theorems hold for adaptively chosen mechanisms. They are bounds, not the exact
total: the optimal composition theorem (Kairouz, Oh and Viswanath 2015) and the Renyi-DP
accounting of the DP-SGD chapter are tighter.
"""

from __future__ import annotations

import math

from companion._validation import check_delta, check_epsilon, check_positive_int, warn

__all__ = ["advanced_composition", "basic_composition", "group_privacy"]


def basic_composition(*, epsilon: float, delta: float = 0.0, k: int) -> tuple[float, float]:
    """Total (epsilon, delta) of ``k`` mechanisms, each (epsilon, delta)-DP: ``(k eps, k delta)``.

    Dwork and Roth (2014), Theorem 3.16; it holds for adaptively chosen mechanisms too. See the
    chapter's section :ref:`sec-dp-properties`.

    Args:
        epsilon: the epsilon of each mechanism, > 0.
        delta: the delta of each mechanism, in [0, 1); 0 (the default) for pure DP.
        k: the number of mechanisms, >= 1.

    Returns:
        ``(total_epsilon, total_delta)``, two floats (a warning if the delta reaches 1, where
        the bound guarantees nothing).

    Raises:
        TypeError: if ``epsilon`` or ``delta`` is not a real number, or ``k`` is not an integer.
        ValueError: if ``epsilon`` is not finite and > 0, ``delta`` is not in [0, 1), or
            ``k < 1``.

    Example:
        >>> total_epsilon, total_delta = basic_composition(epsilon=0.5, delta=1e-6, k=10)
        >>> total_epsilon, f"{total_delta:.1e}"
        (5.0, '1.0e-05')
    """
    epsilon = check_epsilon(epsilon)
    delta = check_delta(delta, allow_zero=True)
    k = check_positive_int("k", k)
    return k * epsilon, _total_delta(k * delta)


def advanced_composition(
    *, epsilon: float, delta: float = 0.0, k: int, delta_prime: float
) -> tuple[float, float]:
    r"""Total (epsilon, delta) of ``k`` adaptive (epsilon, delta)-DP mechanisms, advanced theorem.

    .. math::

        \varepsilon' = \sqrt{2k \ln(1/\delta')}\,\varepsilon + k \varepsilon (e^{\varepsilon} - 1),
        \qquad \delta_{\text{total}} = k\delta + \delta'

    (Dwork, Rothblum and Vadhan 2010; Dwork and Roth 2014, Theorem 3.20). It grows like
    :math:`\sqrt{k}` rather than :math:`k`, but for few mechanisms or large epsilon it is worse
    than :func:`basic_composition`; both are valid, so use the smaller. See the chapter's section
    :ref:`sec-dp-properties`.

    Args:
        epsilon: the epsilon of each mechanism, > 0.
        delta: the delta of each mechanism, in [0, 1).
        k: the number of mechanisms, >= 1.
        delta_prime: the extra failure probability the theorem spends, in (0, 1).

    Returns:
        ``(total_epsilon, total_delta)``, two floats (a warning if the delta reaches 1, where
        the bound guarantees nothing).

    Raises:
        TypeError: if ``epsilon``, ``delta`` or ``delta_prime`` is not a real number, or ``k``
            is not an integer.
        ValueError: if ``epsilon`` is not finite and > 0, ``delta`` is not in [0, 1),
            ``delta_prime`` is not in (0, 1), or ``k < 1``.

    Example:
        >>> total_epsilon, total_delta = advanced_composition(
        ...     epsilon=0.1, k=100, delta_prime=1e-6
        ... )
        >>> round(total_epsilon, 3), total_delta, basic_composition(epsilon=0.1, k=100)[0]
        (6.308, 1e-06, 10.0)
    """
    epsilon = check_epsilon(epsilon)
    delta = check_delta(delta, allow_zero=True)
    k = check_positive_int("k", k)
    delta_prime = check_delta(
        delta_prime,
        "delta_prime",
        why_not_zero="The bound grows like sqrt(log(1 / delta_prime)): at 0 it is infinite.",
    )
    total_epsilon = math.sqrt(
        2 * k * math.log(1 / delta_prime)
    ) * epsilon + k * epsilon * math.expm1(epsilon)
    return total_epsilon, _total_delta(k * delta + delta_prime)


def group_privacy(*, epsilon: float, delta: float = 0.0, group_size: int) -> tuple[float, float]:
    r"""The guarantee an (epsilon, delta)-DP mechanism gives a group of ``group_size`` people.

    Data sets that differ in :math:`g` people are joined by a chain of :math:`g` neighbours;
    applying the definition along the chain gives
    :math:`(g\varepsilon,\; g\, e^{(g-1)\varepsilon} \delta)`-DP (Dwork and Roth 2014,
    Theorem 2.2 for delta = 0; the delta term follows by the same chain argument). See the
    chapter's section :ref:`sec-dp-properties`.

    Args:
        epsilon: the epsilon of the mechanism, > 0.
        delta: the delta of the mechanism, in [0, 1); 0 (the default) for pure DP.
        group_size: the number of people in the group, >= 1.

    Returns:
        ``(group_epsilon, group_delta)``, two floats (a warning if the delta reaches 1, where
        the bound guarantees nothing).

    Raises:
        TypeError: if ``epsilon`` or ``delta`` is not a real number, or ``group_size`` is not
            an integer.
        ValueError: if ``epsilon`` is not finite and > 0, ``delta`` is not in [0, 1), or
            ``group_size < 1``.

    Example:
        >>> group_epsilon, group_delta = group_privacy(epsilon=0.5, delta=1e-6, group_size=3)
        >>> group_epsilon, f"{group_delta:.3e}"
        (1.5, '8.155e-06')
    """
    epsilon = check_epsilon(epsilon)
    delta = check_delta(delta, allow_zero=True)
    group_size = check_positive_int("group_size", group_size)
    return group_size * epsilon, _total_delta(
        group_size * math.exp((group_size - 1) * epsilon) * delta
    )


def _total_delta(delta: float) -> float:
    """``delta``, with a warning if it is 1 or more: such a bound holds for any mechanism."""
    if delta >= 1:
        warn(
            f"the total delta is {delta:.3g}, 1 or more: an (epsilon, delta) bound with delta >= 1 "
            "holds for every mechanism and guarantees nothing. Take fewer mechanisms, a smaller "
            "delta each or a smaller group."
        )
    return delta
