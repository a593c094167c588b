r"""Auditing with one training run (Steinke, Nasr and Jagielski 2023).

Instead of many training runs with and without one canary, one run with :math:`m` canaries:
each canary is included independently with probability 1/2 (:math:`S_i \in \{-1, +1\}`). After
training, the auditor scores every canary and guesses "in" for the :math:`k_+` highest scores,
"out" for the :math:`k_-` lowest, and abstains on the rest. With :math:`r = k_+ + k_-` guesses of
which :math:`v` are right, the theorem of Steinke, Nasr and Jagielski (2023, "Privacy Auditing
with One (1) Training Run", NeurIPS; their main theorem, for pure DP) says that for an
:math:`\varepsilon`-DP mechanism the number of correct guesses :math:`W` is stochastically
dominated by a binomial:

.. math::

    P[W \ge v] \le f_\varepsilon(v) := P\bigl[\mathrm{Binomial}(r, p_\varepsilon) \ge v\bigr],
    \qquad p_\varepsilon = \frac{e^\varepsilon}{1 + e^\varepsilon},

as if each guess were randomized response with parameter :math:`\varepsilon`, even though the
canaries share one run. For :math:`(\varepsilon, \delta)`-DP their approximate-DP theorem adds a
term; this is the p-value computed by the code of their Appendix D (arXiv:2305.08846):

.. math::

    P[W \ge v] \le f_\varepsilon(v) + 2 m \delta \max_{i = 1, \dots, v}
    \frac{f_\varepsilon(v - i) - f_\varepsilon(v)}{i}.

The right-hand side is a p-value for the claim ":math:`M` is :math:`(\varepsilon, \delta)`-DP";
the lower bound is the largest :math:`\varepsilon` it rejects at level
:math:`1 - \text{confidence}`. With perfect guesses and :math:`\delta = 0` this is
:math:`\log\frac{\beta^{1/r}}{1 - \beta^{1/r}}` with :math:`\beta = 1 - \text{confidence}`,
about :math:`\log(r / \log(1/\beta))`: it grows like the log of the number of guesses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize, special, stats

from companion._validation import check_delta, check_int, check_vector
from companion.audit.bounds import check_confidence

__all__ = ["OneRunAudit", "OneRunBound", "one_run_audit", "one_run_epsilon_lower_bound"]

_GRID = 400  # points of the scan for the largest rejected epsilon when delta > 0
# members whose count a fair draw gives with a smaller two-sided binomial p-value are refused
_UNFAIR_P = 1e-6


@dataclass(frozen=True)
class OneRunBound:
    """A one-run lower bound on epsilon and what it assumed.

    Attributes:
        epsilon: the lower bound, >= 0.
        guesses_made: :math:`r`, the canaries on which the auditor did not abstain.
        correct_guesses: :math:`v`.
        num_canaries: :math:`m`, each included with probability 1/2.
        delta, confidence: of the bound.
        method: the theorem used, in words.
    """

    epsilon: float
    guesses_made: int
    correct_guesses: int
    num_canaries: int
    delta: float
    confidence: float
    method: str


@dataclass(frozen=True)
class OneRunAudit:
    """The result of :func:`~companion.audit.one_run_audit`.

    Attributes:
        bound: the best :class:`OneRunBound` among the candidates, each computed at the
            Bonferroni-corrected confidence.
        k_plus, k_minus: the guess counts of the best candidate.
        candidates: every ``(k_plus, k_minus)`` tried.
        confidence: the overall confidence (each candidate used
            ``1 - (1 - confidence) / len(candidates)``).
    """

    bound: OneRunBound
    k_plus: int
    k_minus: int
    candidates: tuple[tuple[int, int], ...]
    confidence: float

    @property
    def epsilon(self) -> float:
        """The lower bound on epsilon (``bound.epsilon``)."""
        return self.bound.epsilon


def _p_value(epsilon: float, r: int, v: int, m: int, delta: float) -> float:
    """The p-value of Steinke et al. (their Appendix D) for an (epsilon, delta) claim."""
    p = special.expit(epsilon)
    tail = float(stats.binom.sf(v - 1, r, p))  # f(v) = P[Binomial(r, p) >= v]
    if delta == 0 or v == 0:
        return min(tail, 1.0)
    # f(v - i) - f(v) = P[v - i <= Binomial < v] = pmf(v - 1) + ... + pmf(v - i), i = 1..v
    between = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, p))
    alpha = float(np.max(between / np.arange(1, v + 1)))
    return min(tail + 2.0 * m * delta * alpha, 1.0)


def one_run_epsilon_lower_bound(
    *,
    guesses_made: int,
    correct_guesses: int,
    num_canaries: int,
    delta: float,
    confidence: float = 0.95,
) -> OneRunBound:
    r"""Lower bound on epsilon from one run with ``num_canaries`` randomly included canaries.

    The largest :math:`\varepsilon` such that the p-value of the claim ":math:`M` is
    :math:`(\varepsilon, \delta)`-DP" is at most :math:`\beta = 1 - \text{confidence}` (Steinke,
    Nasr and Jagielski 2023, "Privacy Auditing with One (1) Training Run", NeurIPS): with
    :math:`p_\varepsilon = e^\varepsilon / (1 + e^\varepsilon)` and
    :math:`f_\varepsilon(v) = P[\mathrm{Binomial}(r, p_\varepsilon) \ge v]`,

    .. math::

        \varepsilon_{\mathrm{lb}} = \sup\Bigl\{\varepsilon \ge 0 :\ f_\varepsilon(v)
        + 2 m \delta \max_{1 \le i \le v} \frac{f_\varepsilon(v - i) - f_\varepsilon(v)}{i}
        \le \beta \Bigr\}

    (their pure-DP theorem when :math:`\delta = 0`, with the :math:`\delta` term of their
    approximate-DP theorem otherwise),
    and 0 when no :math:`\varepsilon \ge 0` is rejected. For :math:`\delta = 0` the p-value
    increases with :math:`\varepsilon` and the bound is its root (Brent's method); for
    :math:`\delta > 0` it is found by a scan of 400 points of :math:`[0, \varepsilon_0]`
    (:math:`\varepsilon_0` the :math:`\delta = 0` root, above which nothing is rejected) refined by
    Brent's method. Valid whatever the dependence between canaries in the run, provided each was
    included independently with probability 1/2 and the guesses were fixed without looking at
    the inclusions.

    Args:
        guesses_made: :math:`r`, in [0, num_canaries].
        correct_guesses: :math:`v`, in [0, guesses_made].
        num_canaries: :math:`m`, >= 1.
        delta: in [0, 1).
        confidence: in (0, 1).

    Returns:
        A :class:`OneRunBound`.

    Raises:
        TypeError: if a count is not an integer.
        ValueError: if the counts are out of order (``v <= r <= m`` is required) or
            ``delta``/``confidence`` out of range.

    Example:
        >>> b = one_run_epsilon_lower_bound(
        ...     guesses_made=100, correct_guesses=100, num_canaries=1000, delta=0.0)
        >>> round(b.epsilon, 4)  # log(0.05 ** 0.01 / (1 - 0.05 ** 0.01))
        3.493
    """
    m = check_int("num_canaries", num_canaries, minimum=1)
    r = check_int("guesses_made", guesses_made, minimum=0)
    v = check_int("correct_guesses", correct_guesses, minimum=0)
    if r > m:
        raise ValueError(f"guesses_made must be at most num_canaries = {m}, got {r}.")
    if v > r:
        raise ValueError(f"correct_guesses must be at most guesses_made = {r}, got {v}.")
    delta = check_delta(delta, allow_zero=True)
    confidence = check_confidence(confidence)
    beta = 1.0 - confidence
    method = (
        "Steinke, Nasr and Jagielski 2023: P[Binomial(r, e^eps / (1 + e^eps)) >= v]"
        + (" (pure DP)" if delta == 0 else " + 2 m delta max_i (...) / i (approximate DP)")
        + " <= 1 - confidence"
    )
    epsilon = _largest_rejected(r, v, m, delta, beta)
    return OneRunBound(epsilon, r, v, m, delta, confidence, method)


def _largest_rejected(r: int, v: int, m: int, delta: float, beta: float) -> float:
    if v == 0 or _p_value(0.0, r, v, m, delta) > beta:
        return 0.0

    def pure(eps: float) -> float:
        return _p_value(eps, r, v, m, 0.0) - beta

    high = 1.0
    while pure(high) <= 0:  # the binomial tail tends to 1 > beta as eps grows (v <= r)
        high *= 2.0
    root = optimize.brentq(pure, 0.0, high, xtol=1e-10)
    if delta == 0:
        return float(root)
    grid = np.linspace(0.0, root, _GRID)
    rejected = [eps for eps in grid if _p_value(eps, r, v, m, delta) <= beta]
    low = rejected[-1]
    if low == grid[-1]:
        return float(low)
    upper = grid[np.searchsorted(grid, low) + 1]
    return float(
        optimize.brentq(lambda e: _p_value(e, r, v, m, delta) - beta, low, upper, xtol=1e-10)
    )


def _default_candidates(m: int) -> list[tuple[int, int]]:
    ks = sorted({max(1, round(m * f)) for f in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)})
    return [(k, 0) for k in ks] + [(k, k) for k in ks if 2 * k <= m]


def one_run_audit(
    scores: np.ndarray,
    members: np.ndarray,
    *,
    delta: float,
    confidence: float = 0.95,
    guess_counts: Sequence[tuple[int, int]] | None = None,
) -> OneRunAudit:
    r"""One-run audit from canary scores: choose :math:`k_+, k_-`, then bound epsilon.

    For each candidate :math:`(k_+, k_-)` the auditor guesses "in" for the :math:`k_+` highest
    scores and "out" for the :math:`k_-` lowest (ties broken by position), counts the correct
    guesses against ``members`` and computes :func:`~companion.audit.one_run_epsilon_lower_bound` at
    confidence :math:`1 - (1 - \text{confidence}) / K` for :math:`K` candidates. The largest of
    the :math:`K` bounds is returned: by the union bound (Bonferroni) it holds with probability
    at least ``confidence`` although it was chosen after looking at the results (Steinke, Nasr
    and Jagielski 2023 choose :math:`k_+, k_-` by such a search).

    Args:
        scores: one score per canary, higher meaning "more likely included"; a 1-D array.
        members: whether each canary was included, a boolean array of the same length; each
            must have been included independently with probability 1/2. The bound rests on
            those coins: with 80% of the canaries included, scores that know nothing would
            "prove" epsilon > 0.8. A count of included canaries that a fair draw gives with a
            two-sided binomial p-value below 1e-6 is refused; that catches a wrong probability
            or a forgotten draw, not a subtle bias (a fair draw is refused once in a million
            audits, never with 20 canaries or fewer).
        delta: in [0, 1).
        confidence: overall, in (0, 1).
        guess_counts: the candidates ``(k_plus, k_minus)``, each with ``k_plus + k_minus <= m``
            and at least one guess. By default :math:`k \in \{1, 2, 5, 10, 20, 50\}\%` of
            :math:`m` (rounded, at least 1) as ``(k, 0)`` and, where ``2k <= m``, ``(k, k)``.

    Returns:
        A :class:`OneRunAudit`.

    Raises:
        TypeError: if ``members`` is not a boolean array or a candidate is not a pair of ints.
        ValueError: if the arrays differ in length, contain NaN, a candidate is out of range,
            or the members are far from half of the canaries (above).

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> members = rng.random(1000) < 0.5
        >>> scores = 4.0 * members + rng.normal(size=1000)  # Gaussian mechanism, mu = 4
        >>> audit = one_run_audit(scores, members, delta=0.0)
        >>> round(audit.epsilon, 2), (audit.k_plus, audit.k_minus)
        (4.28, (200, 200))
    """
    scores = check_vector("scores", scores)
    if not isinstance(members, np.ndarray) or members.dtype != bool:
        raise TypeError("members must be a boolean numpy array (True: canary included).")
    if members.shape != scores.shape:
        raise ValueError(
            f"members must have the shape of scores {scores.shape}, got {members.shape}."
        )
    m = scores.size
    included = int(members.sum())
    fair = stats.binomtest(included, m, 0.5).pvalue
    if fair < _UNFAIR_P:
        raise ValueError(
            f"members holds {included} included canaries of {m}; the bound assumes each was "
            f"included independently with probability 1/2, and such a draw gives a count this "
            f"far from {m / 2:g} with probability {fair:.1g}. Draw the coins with, for example, "
            f"np.random.default_rng().random({m}) < 0.5."
        )
    candidates = _default_candidates(m) if guess_counts is None else list(guess_counts)
    if not candidates:
        raise ValueError("guess_counts must not be empty.")
    for pair in candidates:
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise TypeError(f"each guess count must be a pair (k_plus, k_minus), got {pair!r}.")
        k_plus = check_int("k_plus", pair[0], minimum=0)
        k_minus = check_int("k_minus", pair[1], minimum=0)
        if not 1 <= k_plus + k_minus <= m:
            raise ValueError(
                f"k_plus + k_minus must lie in [1, {m}] (the number of canaries), got {pair}."
            )
    delta = check_delta(delta, allow_zero=True)
    confidence = check_confidence(confidence)
    each = 1.0 - (1.0 - confidence) / len(candidates)
    ranked = members[np.argsort(-scores, kind="stable")]  # membership, highest score first
    best: tuple[OneRunBound, int, int] | None = None
    for k_plus, k_minus in candidates:
        correct = int(ranked[:k_plus].sum()) + int((~ranked[m - k_minus :]).sum())
        bound = one_run_epsilon_lower_bound(
            guesses_made=k_plus + k_minus,
            correct_guesses=correct,
            num_canaries=m,
            delta=delta,
            confidence=each,
        )
        if best is None or bound.epsilon > best[0].epsilon:
            best = (bound, int(k_plus), int(k_minus))
    assert best is not None
    pairs = tuple((int(a), int(b)) for a, b in candidates)
    return OneRunAudit(best[0], best[1], best[2], pairs, confidence)
