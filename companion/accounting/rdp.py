r"""Renyi-DP accounting for the Poisson-subsampled Gaussian mechanism (the mechanism of DP-SGD).

**The mechanism.** One step of DP-SGD draws a Poisson sample of the data (each example joins
the batch independently with probability :math:`q`, the ``sample_rate``), sums the examples'
gradients clipped to L2 norm :math:`C`, and adds :math:`\mathcal{N}(0, \sigma^2 C^2 I)`, where
:math:`\sigma` is the ``noise_multiplier``. For neighbouring data sets that differ by adding or
removing one example, the worst case reduces to one dimension (Mironov, Talwar and Zhang 2019,
"Renyi Differential Privacy of the Sampled Gaussian Mechanism", arXiv:1908.10530, Section 3):
the output is distributed as :math:`\mu_0 = \mathcal{N}(0, \sigma^2)` without the example and as
the mixture :math:`\mu = (1-q)\,\mu_0 + q\,\mu_1`, :math:`\mu_1 = \mathcal{N}(1, \sigma^2)`, with
it.

**Renyi differential privacy.** The Renyi divergence of order :math:`\alpha > 1` is

.. math::

    D_\alpha(P \,\|\, Q) = \frac{1}{\alpha - 1}
    \log \mathbb{E}_{z \sim Q}\left[\left(\frac{P(z)}{Q(z)}\right)^{\alpha}\right],

and a mechanism is :math:`(\alpha, \rho)`-RDP if :math:`D_\alpha(M(D) \,\|\, M(D')) \le \rho` for
all neighbours (Mironov 2017, "Renyi Differential Privacy", CSF). RDP composes by addition:
``steps`` runs of an :math:`(\alpha, \rho)`-RDP mechanism are
:math:`(\alpha, \text{steps}\cdot\rho)`-RDP (Mironov 2017, Proposition 1), which is why an
accountant only needs to add up vectors :math:`\rho(\alpha)` over a grid of orders.

**The RDP of one step.** Without subsampling (:math:`q = 1`) it is the Gaussian mechanism's
:math:`\rho(\alpha) = \alpha / (2\sigma^2)` (Mironov 2017, Proposition 7). With subsampling,
Mironov, Talwar and Zhang (2019, Section 3) show that the larger of the two divergences is
:math:`D_\alpha(\mu \,\|\, \mu_0) = \log(A_\alpha) / (\alpha - 1)` with
:math:`A_\alpha = \mathbb{E}_{z \sim \mu_0}[(\mu(z)/\mu_0(z))^\alpha]`, and compute it as follows
(Section 3.3).

*Integer* :math:`\alpha`: expanding :math:`(1 - q + q\,\mu_1/\mu_0)^\alpha` by the binomial
theorem and integrating each Gaussian term,

.. math::

    A_\alpha = \sum_{k=0}^{\alpha} \binom{\alpha}{k} (1-q)^{\alpha-k} q^k
    \exp\left(\frac{k^2 - k}{2\sigma^2}\right).

The terms :math:`k = 0, 1` have exponent 0 and the binomial weights sum to 1, so
:math:`A_\alpha = 1 + S` with
:math:`S = \sum_{k=2}^{\alpha} \binom{\alpha}{k} (1-q)^{\alpha-k} q^k\,
\mathrm{expm1}\left(\frac{k^2-k}{2\sigma^2}\right) \ge 0`. This module sums :math:`S` (positive
terms only, in log space) and returns :math:`\mathrm{log1p}(S)/(\alpha-1)`, which keeps full
relative precision even when the RDP is :math:`10^{-15}` (tiny :math:`q`, large :math:`\sigma`),
where summing :math:`A_\alpha \approx 1` directly, as Opacus does, keeps only its absolute precision
(about :math:`10^{-16}`).

*Fractional* :math:`\alpha`: the binomial series of a non-integer power converges only where its
second term is the smaller, so the integral is split at
:math:`z_0 = \sigma^2 \log(1/q - 1) + \tfrac12`, the point where :math:`(1-q)\mu_0 = q\mu_1`, and
each half is expanded around its larger term: :math:`A_\alpha = A_0 + A_1` with

.. math::

    A_0 &= \sum_{k=0}^{\infty} \binom{\alpha}{k} q^k (1-q)^{\alpha-k}
    \exp\left(\frac{k^2 - k}{2\sigma^2}\right)
    \tfrac12 \operatorname{erfc}\left(\frac{k - z_0}{\sqrt{2}\,\sigma}\right), \\
    A_1 &= \sum_{k=0}^{\infty} \binom{\alpha}{k} q^{\alpha-k} (1-q)^{k}
    \exp\left(\frac{(\alpha-k)^2 - (\alpha-k)}{2\sigma^2}\right)
    \tfrac12 \operatorname{erfc}\left(\frac{z_0 - (\alpha - k)}{\sqrt{2}\,\sigma}\right).

For :math:`k > \alpha` the generalised binomial coefficients alternate in sign and the terms of
each series fall in magnitude (the magnitude is
:math:`|\binom{\alpha}{k}|\,(1-q)^\alpha e^{-z_0^2/(2\sigma^2)}\, e^{u^2/2}\,\tfrac12
\operatorname{erfc}(u/\sqrt2)` with :math:`u` increasing in :math:`k`, and :math:`e^{u^2/2}
\operatorname{erfc}(u/\sqrt2)` is decreasing), so the error of stopping is below the first
omitted term. The sums stop once that term is below :math:`e^{-37} < 2^{-53}`, under the float64
resolution of :math:`A_\alpha \ge 1`. (Opacus stops at :math:`e^{-30}`.) Everything is computed
in log space, so nothing overflows for small :math:`\sigma` or large :math:`\alpha`.

**From RDP to** :math:`(\varepsilon, \delta)`. If a mechanism is :math:`(\alpha, \rho)`-RDP it is
:math:`(\varepsilon, \delta)`-DP with

.. math::

    \varepsilon = \rho + \log\frac{\alpha - 1}{\alpha}
    - \frac{\log \delta + \log \alpha}{\alpha - 1}

(Balle, Barthe, Gaboardi, Hsu and Sato 2020, "Hypothesis Testing Interpretations and Renyi
Differential Privacy", AISTATS, Theorem 21 of arXiv:1905.09982), and the best bound is the
minimum over the orders. It improves Mironov's original :math:`\rho + \log(1/\delta)/(\alpha - 1)`
(2017, Proposition 3) and is what Opacus 1.6 uses.

.. note::

    RDP accounting gives an upper bound on epsilon, not the exact privacy loss: the conversion
    from RDP to :math:`(\varepsilon, \delta)` is lossy, and so is using a finite grid of orders.
    Accountants that track the whole privacy-loss distribution give smaller, nearly tight epsilons
    for the same training run: the PLD accountant (Koskela, Jalko and Honkela 2020, "Computing
    Tight Differential Privacy Guarantees Using FFT", AISTATS) and the PRV accountant (Gopi, Lee and
    Wutschitz 2021, "Numerical Composition of Differential Privacy", NeurIPS). This module is
    written to teach and to check; for production use Opacus (``opacus.accountants``, which offers
    ``"rdp"`` and ``"prv"``), whose RDP numbers this module reproduces (see the tests).

Example:
    >>> from companion.accounting import RDPAccountant
    >>> accountant = RDPAccountant()
    >>> for _ in range(1000):
    ...     accountant.step(noise_multiplier=1.1, sample_rate=256 / 60000)
    >>> round(accountant.get_epsilon(1e-5), 2)
    0.89
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
from scipy import special

from companion._validation import (
    check_delta,
    check_int,
    check_nonnegative,
    check_orders,
    check_probability,
    check_rdp,
)

__all__ = [
    "DEFAULT_ORDERS",
    "compute_rdp",
    "get_privacy_spent",
]

#: The default RDP orders, the same as Opacus 1.6's ``RDPAccountant.DEFAULT_ALPHAS``:
#: 1.1, 1.2, ..., 10.9, then the integers 12, ..., 63.
DEFAULT_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
)

# The fractional-order series stop at the first term, past the alternating point, whose log is
# below this: e**-37 < 2**-53, the float64 resolution of A_alpha >= 1.
_LOG_TAIL = -37.0
# ... or, where the tails fall slowly, after about this many terms, with the remainder bounded.
_MAX_TERMS = 2**17


# --- log A_alpha --------------------------------------------------------------------------------


def _logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """``log(sum(exp(x)))`` along ``axis``; rows that are all ``-inf`` give ``-inf``."""
    top = np.max(x, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return np.squeeze(top, axis=axis) + np.log(np.sum(np.exp(x - top), axis=axis))


def _log_expm1(x: np.ndarray) -> np.ndarray:
    """``log(exp(x) - 1)`` for ``x > 0``, without overflow for large ``x``."""
    small = x < 30.0
    # Both branches are evaluated; the discarded one overflows (x >= 710) or takes log(0)
    # (x < 1e-16, where exp(-x) rounds to 1), harmlessly.
    with np.errstate(over="ignore", divide="ignore"):
        return np.where(small, np.log(np.expm1(np.where(small, x, 1.0))), x + np.log1p(-np.exp(-x)))


def _log_a_integer(q: float, sigma: float, alphas: np.ndarray) -> np.ndarray:
    r"""``log A_alpha`` for integer orders ``alphas >= 2`` (an array), ``0 < q < 1``, ``sigma > 0``.

    Uses :math:`A_\alpha = 1 + S` with :math:`S` a sum of positive terms (module docstring), one
    row per order: the terms with :math:`k > \alpha` are masked out.
    """
    alpha = alphas[:, None]
    k = np.arange(2, int(alphas.max()) + 1, dtype=float)[None, :]
    in_sum = k <= alpha
    kk = np.where(in_sum, k, 0.0)  # keeps gammaln's arguments positive in the masked entries
    log_terms = (
        special.gammaln(alpha + 1)
        - special.gammaln(kk + 1)
        - special.gammaln(alpha - kk + 1)
        + kk * math.log(q)
        + (alpha - kk) * math.log1p(-q)
        + _log_expm1(kk * (kk - 1) / (2 * sigma**2) + (~in_sum))  # + 1 avoids log(0) when masked
    )
    log_s = _logsumexp(np.where(in_sum, log_terms, -np.inf))
    return np.logaddexp(0.0, log_s)  # log1p(S), accurate for tiny S


def _log_a_fractional(q: float, sigma: float, alphas: np.ndarray) -> np.ndarray:
    r"""``log A_alpha`` for real orders ``alphas > 1`` (an array) by the two series of MTZ (2019).

    Requires ``0 < q < 1`` and ``0 < sigma <= 1e100``. Valid for integer orders as well (the
    coefficients vanish past ``alpha``), which the tests use as a cross-check of
    :func:`_log_a_integer`. The terms are computed in chunks of growing length, one row per order
    still summing; a row stops at its first term past ``alpha`` below :math:`e^{-37}` (module
    docstring). Where that takes more than about :math:`1.5 \times 10^5` terms (the tails fall
    slowly only for large ``sigma`` with ``q`` near 1/2) the sums stop there and the magnitudes
    of the last terms, which bound the two remainders, are added: the result is then an upper
    bound on ``log A_alpha``, never an underestimate.
    """
    log_q, log_1mq = math.log(q), math.log1p(-q)
    variance = sigma * sigma
    z0 = variance * (log_1mq - log_q) + 0.5
    alternating_from = np.floor(alphas) + 1  # the first k > alpha
    log_pos = np.full(alphas.shape, -np.inf)  # log of the sum of the positive terms
    log_neg = np.full(alphas.shape, -np.inf)  # log of the sum of the negative terms' magnitudes
    active = np.arange(alphas.size)
    start, size = 0, int(alternating_from.max()) + 64
    while active.size:
        alpha = alphas[active][:, None]
        k = np.arange(start, start + size, dtype=float)[None, :]
        coef = special.binom(alpha, k)
        with np.errstate(divide="ignore"):  # coefficients that are exactly 0 give log 0 = -inf
            log_coef = np.log(np.abs(coef))
        # binom overflows for orders above about 1030 (binom(1030, 515) > 1e308): there take
        # log|binom| from log-gamma functions instead (the sign from binom is still right).
        overflow = np.isinf(coef)
        if overflow.any():
            alpha_b, k_b = np.broadcast_arrays(alpha, k)
            a, kk = alpha_b[overflow], k_b[overflow]
            log_coef[overflow] = (
                special.gammaln(a + 1) - special.gammaln(kk + 1) - special.gammaln(a - kk + 1)
            )
        j = alpha - k
        log_s0 = (  # the last factor is log(erfc((k - z0) / (sqrt(2) sigma)) / 2)
            log_coef
            + k * log_q
            + j * log_1mq
            + (k * k - k) / (2 * variance)
            + special.log_ndtr((z0 - k) / sigma)
        )
        log_s1 = (  # the last factor is log(erfc((z0 - j) / (sqrt(2) sigma)) / 2)
            log_coef
            + j * log_q
            + k * log_1mq
            + (j * j - j) / (2 * variance)
            + special.log_ndtr((j - z0) / sigma)
        )
        below = (k >= alternating_from[active][:, None]) & (np.maximum(log_s0, log_s1) < _LOG_TAIL)
        finished = below.any(axis=1)
        # keep each row's terms up to and including its first term below the threshold
        last = np.where(finished, np.argmax(below, axis=1), size - 1)
        kept = np.arange(size)[None, :] <= last[:, None]
        for sign_ok, accumulator in ((coef > 0, log_pos), (coef < 0, log_neg)):
            use = kept & sign_ok
            both = np.concatenate(
                [np.where(use, log_s0, -np.inf), np.where(use, log_s1, -np.inf)], axis=1
            )
            accumulator[active] = np.logaddexp(accumulator[active], _logsumexp(both))
        active = active[~finished]
        start, size = start + size, 2 * size
        if active.size and start > _MAX_TERMS:
            # Past alpha the terms alternate and shrink, so each remainder is smaller than the
            # last term kept: adding both keeps the result an upper bound.
            unfinished = ~finished
            bound = np.logaddexp(log_s0[unfinished, -1], log_s1[unfinished, -1])
            log_pos[active] = np.logaddexp(log_pos[active], bound)
            break
    # A_alpha = positive part - negative part > 0; the alternating tails keep the negative part
    # well below the positive one.
    return log_pos + np.log(-np.expm1(log_neg - log_pos))


def _rdp_one_step(q: float, sigma: float, orders: np.ndarray) -> np.ndarray:
    """RDP of one step of the sampled Gaussian mechanism at each order (validated inputs)."""
    if q == 0:
        return np.zeros_like(orders)
    if sigma == 0:
        return np.full_like(orders, np.inf)
    if q == 1 or sigma > 1e100:
        # q == 1: the Gaussian mechanism (inf for an infinite order). For sigma > 1e100 this is
        # an upper bound (subsampling never increases the RDP) below 1e-199 at every finite
        # order, which keeps sigma**2 from overflowing in the series.
        return orders / (2 * sigma) / sigma
    if sigma < 1e-100:
        # A_alpha >= q**alpha exp(alpha (alpha - 1) / (2 sigma**2)) (drop the (1 - q) mu_0 part of
        # mu), so the RDP exceeds alpha / (2 sigma**2) - alpha |log q| / (alpha - 1) > 1e199 at
        # every order: report it as infinite, like sigma == 0. This keeps 1 / sigma**2 from
        # overflowing in the series, which gave inf - inf = NaN at fractional orders.
        return np.full_like(orders, np.inf)
    rdp = np.full_like(orders, np.inf)  # the value at infinite orders
    integer = np.isfinite(orders) & (orders == np.floor(orders))
    fractional = np.isfinite(orders) & ~integer
    log_a = np.zeros_like(orders)
    if integer.any():
        log_a[integer] = _log_a_integer(q, sigma, orders[integer])
    if fractional.any():
        log_a[fractional] = _log_a_fractional(q, sigma, orders[fractional])
    finite = integer | fractional
    # A_alpha >= 1 (Jensen), so log A_alpha >= 0; rounding in the fractional sums can leave it a
    # few ulp below 0, which is no divergence: report 0.
    rdp[finite] = np.maximum(log_a[finite], 0.0) / (orders[finite] - 1)
    return rdp


# --- public functions ---------------------------------------------------------------------------


def compute_rdp(
    *,
    q: float,
    noise_multiplier: float,
    steps: int,
    orders: float | Iterable[float] | np.ndarray,
) -> float | np.ndarray:
    r"""RDP of ``steps`` runs of the Poisson-subsampled Gaussian mechanism, at each order.

    Returns :math:`\text{steps} \cdot \log(A_\alpha)/(\alpha - 1)` for each order :math:`\alpha`,
    with :math:`A_\alpha` from the integer-order binomial sum or, for fractional orders, the
    two-series formula of Mironov, Talwar and Zhang (2019, Section 3.3); see the module docstring
    for both. Edge cases, as in Opacus:

    - ``q == 0``: the example is never used, so the RDP is 0 at every order;
    - ``noise_multiplier == 0`` (and ``q > 0``): no noise, no privacy: ``inf`` at every order;
      likewise for ``0 < noise_multiplier < 1e-100`` with ``0 < q < 1``, where the RDP exceeds
      :math:`10^{199}` at every order;
    - ``q == 1``: no subsampling, the Gaussian mechanism's :math:`\alpha / (2\sigma^2)`
      (Mironov 2017, Proposition 7);
    - ``order == inf``: the RDP of order infinity is the max-divergence, which is infinite for
      any Gaussian noise, so ``inf`` (0 when ``q == 0``);
    - ``steps == 0``: nothing was released, so 0 at every order (even with no noise).

    See the chapter's section :ref:`sec-dpsgd-accounting`.

    Args:
        q: the sampling rate, in [0, 1].
        noise_multiplier: :math:`\sigma`, the noise standard deviation divided by the L2
            sensitivity (the clipping norm), >= 0 and finite.
        steps: the number of runs, an integer >= 0.
        orders: one order or a sequence of orders :math:`\alpha`, each > 1 (``inf`` allowed),
            integer or fractional.

    Returns:
        A float if ``orders`` is a single number, else a numpy array of floats, one per order.
        Entries may be ``inf``.

    Raises:
        TypeError: if an argument is of the wrong kind (``steps`` not an integer, say).
        ValueError: if an argument is out of range or NaN.

    Example:
        >>> compute_rdp(q=1.0, noise_multiplier=2.0, steps=10, orders=[2, 4.5])
        array([2.5  , 5.625])
    """
    q = check_probability("q", q, allow_zero=True)
    sigma = check_nonnegative("noise_multiplier", noise_multiplier)
    steps = check_int("steps", steps, minimum=0)
    if steps > 2**64:  # converted to a float below
        raise ValueError("steps must be at most 2**64.")
    order_array, scalar = check_orders(orders)
    if steps == 0:
        rdp = np.zeros_like(order_array)
    else:
        rdp = steps * _rdp_one_step(q, sigma, order_array)
    return float(rdp[0]) if scalar else rdp


def get_privacy_spent(
    *,
    orders: float | Iterable[float] | np.ndarray,
    rdp: float | Iterable[float] | np.ndarray,
    delta: float,
) -> tuple[float, float]:
    r"""Convert RDP guarantees at several orders into one :math:`(\varepsilon, \delta)` guarantee.

    For each order computes

    .. math::

        \varepsilon(\alpha) = \rho(\alpha) + \log\frac{\alpha - 1}{\alpha}
        - \frac{\log \delta + \log \alpha}{\alpha - 1}

    (Balle et al. 2020, Theorem 21) and returns the smallest, as Opacus 1.6 does. Orders where
    the formula is undefined (``inf`` orders give NaN) are skipped, like Opacus's ``nanargmin``; if
    every order is skipped the result is ``(inf, nan)``. An infinite :math:`\rho` gives an infinite
    epsilon at that order; if all are infinite the result is ``(inf, orders[0])``, as in Opacus.
    Where Opacus would return a negative epsilon (possible only with RDP near 0 and orders larger
    than about :math:`1/\delta`) this returns 0, as TF Privacy does: a negative epsilon is not a
    meaningful guarantee, and 0 is still a valid one. Unlike Opacus, no warning is issued when the
    best order is the smallest or largest one given; compare ``best_order`` with the ends of
    ``orders`` to see whether a wider range of orders would tighten the bound.

    Args:
        orders: one order or a sequence of orders, each > 1 (``inf`` allowed).
        rdp: the RDP at each order, one number or a sequence of the same length, each >= 0
            (``inf`` allowed, NaN not).
        delta: in (0, 1).

    Returns:
        ``(epsilon, best_order)``, two floats.

    Raises:
        TypeError: if ``orders``, ``rdp`` or ``delta`` is not a real number (or a sequence of
            them).
        ValueError: if an order is not > 1, an RDP value is negative or NaN, the sequences are
            empty or of different lengths, or ``delta`` is not in (0, 1).

    Example:
        >>> orders = DEFAULT_ORDERS
        >>> rdp = compute_rdp(q=0.01, noise_multiplier=1.0, steps=1000, orders=orders)
        >>> epsilon, best_order = get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)
        >>> round(epsilon, 3), best_order
        (2.101, 7.8)
    """
    orders_vec, _ = check_orders(orders)
    rdp_vec = check_rdp(rdp)
    delta = check_delta(delta)
    if len(orders_vec) != len(rdp_vec):
        raise ValueError(
            f"orders and rdp must have the same length, got {len(orders_vec)} and {len(rdp_vec)}."
        )
    with np.errstate(invalid="ignore"):
        eps = (
            rdp_vec
            - (np.log(delta) + np.log(orders_vec)) / (orders_vec - 1)
            + np.log((orders_vec - 1) / orders_vec)
        )
    if np.isnan(eps).all():
        return math.inf, math.nan
    best = int(np.nanargmin(eps))
    return max(float(eps[best]), 0.0), float(orders_vec[best])


def __getattr__(name: str) -> object:
    """``from companion.accounting.rdp import RDPAccountant`` still works (PEP 562).

    The accountant lives in :mod:`companion.accounting.rdp_accountant`, which imports this
    module; it is loaded here on first use, so there is no import cycle.
    """
    if name == "RDPAccountant":
        from companion.accounting.rdp_accountant import RDPAccountant

        return RDPAccountant
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
