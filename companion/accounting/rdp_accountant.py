r"""The :class:`~companion.accounting.RDPAccountant`: Renyi-DP accounting, one step at a time.

The analysis it relies on (the RDP of one step of the Poisson-subsampled Gaussian mechanism, and
the conversion from RDP to :math:`(\varepsilon, \delta)`) is derived in
:mod:`companion.accounting.rdp`; this module keeps the history of the steps and adds up their
RDP by composition (Mironov 2017, "Renyi Differential Privacy", CSF, Proposition 1).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from companion._validation import (
    check_delta,
    check_nonnegative,
    check_orders,
    check_positive_int,
    check_probability,
)
from companion.accounting.rdp import DEFAULT_ORDERS, compute_rdp, get_privacy_spent

__all__ = ["RDPAccountant"]


class RDPAccountant:
    r"""Track the privacy spent by a run of DP-SGD, one step at a time, with RDP.

    Each call to :meth:`step` records one step of the Poisson-subsampled Gaussian mechanism. The
    history is kept compressed, as in Opacus: consecutive steps with the same
    ``(noise_multiplier, sample_rate)`` share one entry ``(noise_multiplier, sample_rate, count)``,
    so a training run of any length costs a few entries, and :meth:`step` does no numerical work.
    The RDP is computed only when epsilon is asked for: by composition (Mironov 2017,
    Proposition 1) it is the sum over entries of ``count`` times the RDP of one step, then
    converted with :func:`get_privacy_spent`. The one-step RDP of each distinct
    ``(noise_multiplier, sample_rate)`` is cached in the instance, so asking again after more steps
    is cheap. There is no shared state between accountants. See the chapter's section
    :ref:`sec-dpsgd-accounting`.

    Unlike Opacus, whose ``len(accountant)`` is the number of history entries, ``len`` here is the
    number of steps taken.

    Args:
        orders: the RDP orders to track, each > 1 (``inf`` allowed); by default
            ``DEFAULT_ORDERS``, those of Opacus.

    Raises:
        TypeError: if ``orders`` is a single number, or not a sequence of real numbers.
        ValueError: if ``orders`` is empty, not one-dimensional, or holds an order <= 1 or NaN.

    Example:
        >>> accountant = RDPAccountant()
        >>> for _ in range(100):
        ...     accountant.step(noise_multiplier=1.0, sample_rate=0.01)
        >>> len(accountant), accountant.history
        (100, ((1.0, 0.01, 100),))
    """

    def __init__(self, orders: Iterable[float] | np.ndarray = DEFAULT_ORDERS) -> None:
        order_array, scalar = check_orders(orders)
        if scalar:
            raise TypeError("orders must be a sequence of orders, not a single number.")
        self._orders = order_array
        self._history: list[tuple[float, float, int]] = []
        self._steps = 0
        self._rdp_cache: dict[tuple[float, float], np.ndarray] = {}

    @property
    def orders(self) -> tuple[float, ...]:
        """The RDP orders this accountant tracks."""
        return tuple(float(a) for a in self._orders)

    @property
    def history(self) -> tuple[tuple[float, float, int], ...]:
        """Compressed history, as ``(noise_multiplier, sample_rate, count)`` entries in order."""
        return tuple(self._history)

    def step(self, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        r"""Record a step (or ``steps`` steps) with the given noise multiplier (>= 0) and sample
        rate (in (0, 1]).

        Args:
            noise_multiplier: :math:`\sigma`, the noise standard deviation divided by the
                clipping norm, >= 0 and finite.
            sample_rate: :math:`q`, the Poisson sampling rate, in (0, 1].
            steps: how many such steps, from 1 to 2**64 (one call instead of a loop).

        Raises:
            TypeError: if an argument is not a real number (``steps`` not an integer).
            ValueError: if ``noise_multiplier`` is negative or not finite, ``sample_rate``
                is not in (0, 1], or ``steps < 1``.

        Example:
            >>> accountant = RDPAccountant()
            >>> accountant.step(noise_multiplier=1.0, sample_rate=0.01)
            >>> accountant.step(noise_multiplier=2.0, sample_rate=0.01, steps=3)
            >>> accountant.history, len(accountant)
            (((1.0, 0.01, 1), (2.0, 0.01, 3)), 4)
        """
        sigma = check_nonnegative("noise_multiplier", noise_multiplier)
        q = check_probability("sample_rate", sample_rate, allow_zero=False)
        steps = check_positive_int("steps", steps)
        if steps > 2**64:  # converted to a float to compose
            raise ValueError("steps must be at most 2**64.")
        if self._history and self._history[-1][:2] == (sigma, q):
            self._history[-1] = (sigma, q, self._history[-1][2] + steps)
        else:
            self._history.append((sigma, q, steps))
        self._steps += steps

    def _rdp(self) -> np.ndarray:
        """The RDP of all steps so far, at each order."""
        total = np.zeros_like(self._orders)
        for sigma, q, count in self._history:
            per_step = self._rdp_cache.get((sigma, q))
            if per_step is None:
                per_step = compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=self._orders)
                self._rdp_cache[(sigma, q)] = per_step
            total += count * per_step
        return total

    def get_privacy_spent(self, *, delta: float) -> tuple[float, float]:
        """``(epsilon, best_order)`` for the steps so far at the given delta in (0, 1).

        With no steps taken nothing has been released: the result is ``(0.0, nan)``.

        Args:
            delta: in (0, 1); keep it well below 1/n for a data set of n examples.

        Returns:
            ``(epsilon, best_order)``, two floats (see :func:`get_privacy_spent`).

        Raises:
            TypeError: if ``delta`` is not a real number.
            ValueError: if ``delta`` is not in (0, 1).

        Example:
            >>> accountant = RDPAccountant()
            >>> accountant.get_privacy_spent(delta=1e-5)
            (0.0, nan)
            >>> for _ in range(500):
            ...     accountant.step(noise_multiplier=1.0, sample_rate=0.01)
            >>> epsilon, best_order = accountant.get_privacy_spent(delta=1e-5)
            >>> round(epsilon, 3), best_order
            (1.653, 8.2)
        """
        delta = check_delta(delta)
        if not self._history:
            return 0.0, math.nan
        return get_privacy_spent(orders=self._orders, rdp=self._rdp(), delta=delta)

    def get_epsilon(self, delta: float) -> float:
        """The epsilon spent so far at the given delta in (0, 1); 0.0 before any step.

        Args:
            delta: in (0, 1).

        Returns:
            The first element of :meth:`get_privacy_spent`, a float.

        Raises:
            TypeError: if ``delta`` is not a real number.
            ValueError: if ``delta`` is not in (0, 1).

        Example:
            >>> accountant = RDPAccountant()
            >>> for _ in range(500):
            ...     accountant.step(noise_multiplier=1.0, sample_rate=0.01)
            >>> round(accountant.get_epsilon(1e-5), 3)
            1.653
        """
        return self.get_privacy_spent(delta=delta)[0]

    def __len__(self) -> int:
        return self._steps

    def __repr__(self) -> str:
        return f"RDPAccountant(steps={self._steps}, history={self.history!r})"
