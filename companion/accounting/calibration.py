r"""Calibration: the smallest noise multiplier that meets a privacy target.

The search is monotone and conservative, as in Opacus and dp_accounting: it returns the upper end
of a bracket whose epsilon is at or below the target, so the budget is never exceeded. The epsilon
is that of the RDP accountant (:mod:`companion.accounting.rdp`) or of the PLD accountant
(:mod:`companion.accounting.pld`), which is tighter for ordinary runs and so allows less noise
for the same target (over very many steps at a large noise multiplier RDP can be the tighter).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Literal

import numpy as np

from companion._validation import (
    check_accountant_name,
    check_delta,
    check_epsilon,
    check_int,
    check_orders,
    check_probability,
)
from companion.accounting.pld import PLDAccountant
from companion.accounting.rdp import DEFAULT_ORDERS, compute_rdp, get_privacy_spent
from companion.accounting.steps import steps_for_epochs

__all__ = ["get_noise_multiplier"]

# get_noise_multiplier gives up above this noise multiplier, as Opacus does.
_MAX_SIGMA = 1e6
# Where the PLD accountant's range, not the target, bounds the search, it stops with the bracket
# this narrow (relative to its upper end): each candidate there costs seconds, and float64 would
# take about 50 of them.
_GRID_EDGE_RTOL = 1e-3


def get_noise_multiplier(
    *,
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int | None = None,
    epochs: int | None = None,
    orders: Iterable[float] | np.ndarray = DEFAULT_ORDERS,
    epsilon_tolerance: float = 0.01,
    accountant: Literal["rdp", "pld"] = "rdp",
) -> float:
    r"""The noise multiplier that spends at most ``(target_epsilon, target_delta)`` in ``steps``.

    Epsilon falls as the noise multiplier :math:`\sigma` grows, so the smallest admissible
    :math:`\sigma` is found by search, the same search as Opacus's
    ``opacus.accountants.utils.get_noise_multiplier`` with the RDP accountant: a bracket
    :math:`[0, \sigma_{\text{high}}]` whose upper end starts at 20 and doubles until its epsilon is
    at most the target, then bisection, moving the upper end down only to points whose epsilon is
    below the target, until the upper end's epsilon is within ``epsilon_tolerance`` of the target.
    The upper end is returned, so

    .. math:: \text{target\_epsilon} - \text{epsilon\_tolerance} \le \varepsilon(\sigma)
        \le \text{target\_epsilon}:

    the budget is never exceeded, and :math:`\sigma` is at most slightly larger than the
    smallest admissible one.

    With ``accountant="pld"`` the epsilon of each candidate :math:`\sigma` is that of a
    :class:`~companion.accounting.PLDAccountant` (default discretisation) after ``steps`` steps,
    an upper bound on the true epsilon and within :math:`5 \times 10^{-4}` of it on the tested
    settings (Koskela, Jalko and Honkela 2020; Doroshenko et al. 2022), so the returned
    :math:`\sigma` meets the target under the true privacy profile too. Each candidate costs up
    to about a second. A candidate so small that its privacy loss does not fit the PLD grid
    counts as missing the target. With a very small sample rate (say ``1e-7``) that edge,
    not the target, can set the answer, as epsilon jumps there from missing the target to far
    below it: once the bracket's lower end is such a candidate and the bracket is within 0.1%,
    the search stops and warns (the RDP accountant may then need less noise).

    With the RDP accountant, even infinite noise cannot bring the bound below
    :math:`\min_\alpha \left[\log\frac{\alpha-1}{\alpha}
    - \frac{\log\delta + \log\alpha}{\alpha-1}\right]`
    (the conversion of zero RDP; about 0.10 for ``delta = 1e-5`` and ``DEFAULT_ORDERS``), so a
    target at or below that floor is refused at once.

    Args:
        target_epsilon: > 0.
        target_delta: in (0, 1).
        sample_rate: the Poisson sampling rate, in (0, 1].
        steps: the number of steps, an integer >= 1.
        epochs: instead of ``steps``: the number of epochs of
            :func:`companion.dpsgd.train_dpsgd`, turned into steps by
            :func:`~companion.accounting.steps_for_epochs` (the rule the training loop follows:
            ``epochs * round(1/q)``; Opacus's ``get_noise_multiplier(epochs=...)`` takes
            ``int(epochs / q)`` steps, so the two may differ for the same arguments).
        orders: the RDP orders, each > 1; by default ``DEFAULT_ORDERS`` (used only with
            ``accountant="rdp"``).
        epsilon_tolerance: > 0 and below ``target_epsilon``, how far below the target the
            returned sigma's epsilon may be.
        accountant: ``"rdp"`` (the default, as before) or ``"pld"``: which accountant's epsilon
            must meet the target. Opacus's ``"prv"`` has no separate name here: like its PRV
            accountant, ``"pld"`` discretises the privacy-loss distribution (both directions,
            where PRV takes the remove direction; see :mod:`companion.accounting.pld`). Opacus's
            PRV accountant may read a sigma calibrated with ``"pld"`` slightly above the target,
            whatever its ``eps_error``: it adds its own error bounds (in epsilon and in delta).

    Returns:
        The noise multiplier :math:`\sigma`.

    Raises:
        TypeError: if an argument is of the wrong kind (``accountant`` not a string, say).
        ValueError: if an argument is out of range, not exactly one of ``steps`` and ``epochs``
            is given, ``accountant`` is not ``"rdp"`` or ``"pld"`` (for ``"prv"`` the message
            points to ``"pld"``),
            or the target cannot be reached (below the floor above, or needing a noise multiplier
            above :math:`10^6`).

    Example:
        >>> sigma = get_noise_multiplier(target_epsilon=2.0, target_delta=1e-5,
        ...                              sample_rate=0.01, steps=1000)
        >>> round(sigma, 2)
        1.02

        The PLD accountant is tighter, so the same target needs less noise:

        >>> [round(get_noise_multiplier(target_epsilon=1.0, target_delta=1e-5, sample_rate=0.01,
        ...                             steps=1000, accountant=name), 2) for name in ("rdp", "pld")]
        [1.52, 1.42]
    """
    target_epsilon = check_epsilon(target_epsilon, "target_epsilon")
    target_delta = check_delta(target_delta, "target_delta")
    sample_rate = check_probability("sample_rate", sample_rate, allow_zero=False)
    if (steps is None) == (epochs is None):
        raise ValueError("give exactly one of steps and epochs.")
    if steps is None:
        steps = steps_for_epochs(epochs=epochs, sample_rate=sample_rate)
    steps = check_int("steps", steps, minimum=1)
    order_array, scalar = check_orders(orders)
    if scalar:
        raise TypeError("orders must be a sequence of orders, not a single number.")
    epsilon_tolerance = check_epsilon(epsilon_tolerance, "epsilon_tolerance")
    if epsilon_tolerance >= target_epsilon:
        raise ValueError(
            f"epsilon_tolerance={epsilon_tolerance:g} must be below target_epsilon="
            f"{target_epsilon:g}: the search stops once epsilon is within the tolerance below "
            "the target, which any noise multiplier large enough would then be. Pass a smaller "
            "epsilon_tolerance (a hundredth of the target, say)."
        )
    accountant = check_accountant_name(accountant)

    floor, _ = get_privacy_spent(
        orders=order_array, rdp=np.zeros_like(order_array), delta=target_delta
    )
    if accountant == "rdp" and target_epsilon <= floor:
        raise ValueError(
            f"target_epsilon={target_epsilon} cannot be reached: with target_delta={target_delta} "
            f"and these orders the RDP bound is at least {floor:.4g} even with infinite noise. "
            "Raise target_epsilon or target_delta, or add larger orders."
        )

    def epsilon(sigma: float) -> float:
        if accountant == "pld":
            pld = PLDAccountant()
            pld.step(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps)
            try:
                return pld.get_epsilon(target_delta)
            except ValueError:  # the loss overflows the grid or float64: counts as missing it
                return math.inf
        rdp = compute_rdp(q=sample_rate, noise_multiplier=sigma, steps=steps, orders=order_array)
        return get_privacy_spent(orders=order_array, rdp=rdp, delta=target_delta)[0]

    sigma_low, sigma_high, eps_high = 0.0, 10.0, math.inf
    while eps_high > target_epsilon:
        sigma_high *= 2
        if sigma_high > _MAX_SIGMA:
            raise ValueError(
                f"target_epsilon={target_epsilon} at target_delta={target_delta} needs a "
                f"noise_multiplier above {_MAX_SIGMA:g} for sample_rate={sample_rate} and "
                f"steps={steps}; raise target_epsilon or target_delta, or lower steps or "
                "sample_rate."
            )
        eps_high = epsilon(sigma_high)

    # The lower end is a sigma whose privacy loss the PLD accountant cannot hold (its grid, or
    # float64, overflows): epsilon jumps there from "missing the target" to a value that may lie
    # far below the tolerance band.
    low_overflows = False
    while target_epsilon - eps_high > epsilon_tolerance:
        if low_overflows and sigma_high - sigma_low <= _GRID_EDGE_RTOL * sigma_high:
            warnings.warn(
                f"get_noise_multiplier: the search stopped at noise_multiplier={sigma_high:.6g}, "
                f"within 0.1% of a value below which the PLD accountant cannot hold the privacy "
                f"loss of {steps} steps at sample_rate={sample_rate:g} (in its grid or in "
                f"float64); its epsilon, {eps_high:.3g}, is more than epsilon_tolerance below "
                "target_epsilon. The RDP accountant may reach the target with less noise: try "
                'accountant="rdp".',
                stacklevel=2,
            )
            break
        sigma = (sigma_low + sigma_high) / 2
        if not sigma_low < sigma < sigma_high:  # the bracket cannot shrink further in float64
            break
        eps = epsilon(sigma)
        if eps < target_epsilon:
            sigma_high, eps_high = sigma, eps
        else:
            sigma_low, low_overflows = sigma, eps == math.inf
    return sigma_high
