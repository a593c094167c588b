"""Composition of discretised privacy loss distributions, and delta and epsilon from one.

Part of :mod:`companion.accounting.pld` (see its docstring for the math); import
:class:`~companion.accounting.PLDAccountant` from :mod:`companion.accounting`.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import fft

# Helpers of companion.accounting.pld, not part of the public API.
__all__: list[str] = []

#: Grids longer than this are refused (an FFT of 2**24 points takes several hundred MB).
MAX_GRID = 2**24


def _window(entries: list[tuple[int, np.ndarray, float, int]], tail: float) -> tuple[int, int]:
    r"""Index bounds ``[lo, hi]`` of the composed sum outside which its mass is below ``tail``.

    Chernoff: :math:`P(S \ge u) \le \exp(\Lambda(\lambda) - \lambda u)` for :math:`\lambda > 0`
    (:math:`P(S \le u)` for :math:`\lambda < 0`), :math:`\Lambda` the sum of the steps' log moment
    generating functions; ``tail / 2`` a side, minimised over :math:`|\lambda| = s\,2^k` (``k`` in
    steps of 2 from -8 to 8, then of 1/2 around the best; :math:`s` optimal for a normal sum).
    """
    variance, top = 0.0, 0
    for _, p, _, count in entries:
        j = np.arange(p.size)
        mass = p.sum()
        mean = (j @ p) / mass
        variance += count * (((j - mean) ** 2) @ p) / mass
        top += count * (p.size - 1)
    if variance <= 0:
        return 0, top
    log_two_over_tail = math.log(2 / tail)
    scale = math.sqrt(2 * log_two_over_tail / variance)
    logs = [
        (np.log(p[p > 0]), np.flatnonzero(p).astype(float), count) for _, p, _, count in entries
    ]

    def bound(lam: float) -> float:  # the u with exp(Lambda(lam) - lam u) = tail / 2
        total = 0.0
        for log_p, j, count in logs:
            exponents = log_p + lam * j
            top_exponent = exponents.max()
            total += count * (top_exponent + math.log(np.exp(exponents - top_exponent).sum()))
        value = (total + log_two_over_tail) / lam
        return value if math.isfinite(value) else (top if lam > 0 else 0.0)

    ends = []
    for sign in (1.0, -1.0):
        best = min(range(-8, 9, 2), key=lambda k: sign * bound(sign * scale * 2.0**k))
        fine = np.arange(best - 1.5, best + 1.75, 0.5)
        ends.append(min(sign * bound(sign * scale * 2.0**k) for k in fine) * sign)
    return max(0, math.floor(ends[1])), min(top, math.ceil(ends[0]))


def _power(spectrum: np.ndarray, count: int) -> np.ndarray:
    """``spectrum ** count``; entries below ``e**-800`` (most, for many steps) are set to 0."""
    if count == 1:
        return spectrum
    out = np.zeros_like(spectrum)
    with np.errstate(divide="ignore"):
        keep = count * 0.5 * np.log(spectrum.real**2 + spectrum.imag**2) > -800.0
    out[keep] = np.exp(count * np.log(spectrum[keep]))
    return out


def compose(
    entries: list[tuple[int, np.ndarray, float, int]], tail: float
) -> tuple[int, np.ndarray, float]:
    """``count`` copies of each ``(low, masses, infinity, count)`` composed by FFT, as ``(low,
    masses, infinity)``; the mass outside the window (at most ``tail``) goes to infinity."""
    log_finite = sum(  # log of the probability that no loss is infinite
        count * math.log1p(-infinity) if infinity < 1 else -math.inf
        for _, _, infinity, count in entries
    )
    offset = sum(count * low for low, _, _, count in entries)
    if log_finite == -math.inf:  # some step releases the data outright (no noise, q = 1)
        return 0, np.zeros(1), 1.0
    if len(entries) == 1 and entries[0][3] == 1:  # one step: nothing to compose
        return entries[0][0], entries[0][1], entries[0][2]
    lo, hi = _window(entries, tail)
    size = fft.next_fast_len(max(hi - lo + 1, max(p.size for _, p, _, _ in entries)), real=True)
    if size > MAX_GRID:
        raise ValueError(
            f"the composed privacy loss distribution needs {size} grid points (at most "
            f"{MAX_GRID}); use a larger value_discretization_interval."
        )
    spectrum = np.ones(size // 2 + 1, dtype=complex)
    for _, p, _, count in entries:
        spectrum *= _power(fft.rfft(p, size), count)
    # Start the circular result at index lo: masses[t] = result[(lo + t) mod size], a phase shift.
    nonzero = np.flatnonzero(spectrum)
    spectrum[nonzero] *= np.exp(2j * math.pi * ((nonzero * (lo % size)) % size) / size)
    masses = fft.irfft(spectrum, size)
    np.maximum(masses, 0.0, out=masses)  # rounding leaves tiny negative masses
    infinity = min(1.0, -math.expm1(log_finite) + tail)
    return offset + lo, masses, infinity


def delta_at(low: int, masses: np.ndarray, infinity: float, h: float, epsilon: float) -> float:
    r"""The hockey-stick divergence :math:`\delta(\varepsilon)` of a discrete PLD."""
    start = min(masses.size, max(0, math.floor(epsilon / h) - low))  # losses below are <= epsilon
    p = masses[start:]
    losses = (low + start + np.arange(p.size)) * h
    above = losses > epsilon
    return float(min(1.0, infinity + p[above] @ -np.expm1(epsilon - losses[above])))


def epsilon_at(low: int, masses: np.ndarray, infinity: float, h: float, delta: float) -> float:
    r"""The smallest :math:`\varepsilon \ge 0` with :math:`\delta(\varepsilon) \le` ``delta``."""
    if infinity > delta:
        return math.inf
    start = min(masses.size, max(0, 1 - low))  # the first index with a positive loss
    p = masses[start:]
    losses = (low + start + np.arange(p.size)) * h
    if p.size == 0:
        return 0.0
    # On [losses[j-1], losses[j]) (j = 0: [0, losses[0])) delta(eps) = upper[j] - e^eps lower[j]
    # (module docstring). delta(losses[k]) <= upper[k + 1] <= delta: the answer is <= losses[k].
    upper = infinity + np.cumsum(p[::-1])[::-1]
    k = int(np.argmax(np.append(upper[1:], infinity) <= delta))
    # delta(eps) >= infinity + (1 - e^(eps - losses[m])) (upper[m] - infinity), so the answer is
    # above losses[m] - log 4 where upper[m] - infinity >= 2 (delta - infinity), and above
    # losses[k] - 700 (up to e**-700): only indices from ``first`` matter, and the factors of
    # lower[j] = e^-losses[k] scaled[j] stay below e**700.
    m = int(np.searchsorted(-upper, -(infinity + 2 * (delta - infinity)), side="right")) - 1
    first = max(0, k - math.floor(700 / h), m - math.ceil(math.log(4) / h) - 1)
    beyond = float(p[k + 1 :] @ np.exp(losses[k] - losses[k + 1 :]))  # factors below 1
    scaled = (
        beyond
        + np.cumsum((p[first : k + 1] * np.exp(losses[k] - losses[first : k + 1]))[::-1])[::-1]
    )
    left = np.concatenate(([0.0], losses[:-1]))[first : k + 1]
    at_left = upper[first : k + 1] - np.exp(left - losses[k]) * scaled
    above = np.flatnonzero(at_left > delta)
    if above.size == 0:  # delta(0) <= delta, or (only by rounding) the answer is below left[0]
        return 0.0 if first == 0 else float(losses[k])  # losses[k] is an upper bound
    j = int(above[-1])
    eps = math.log(upper[first + j] - delta) + losses[k] - math.log(scaled[j])
    return float(min(max(eps, left[j]), losses[first + j]))
