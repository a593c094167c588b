r"""Lower bounds on epsilon from the errors of a test that tells two neighbouring data sets apart.

If a mechanism :math:`M` is :math:`(\varepsilon, \delta)`-DP, then every test that looks at its
output and guesses "was it run on :math:`D` or on the neighbour :math:`D'`?" has false-positive
and false-negative rates inside the region (Kairouz, Oh and Viswanath 2015, "The Composition
Theorem for Differential Privacy", ICML)

.. math::

    \mathrm{FPR} + e^{\varepsilon}\, \mathrm{FNR} \ge 1 - \delta, \qquad
    \mathrm{FNR} + e^{\varepsilon}\, \mathrm{FPR} \ge 1 - \delta .

Read backwards, observed error rates force

.. math::

    \varepsilon \ge \max\Bigl(\log\frac{1 - \delta - \mathrm{FNR}}{\mathrm{FPR}},\
    \log\frac{1 - \delta - \mathrm{FPR}}{\mathrm{FNR}},\ 0\Bigr).

The rates are estimated from a finite number of trials, so Jagielski, Ullman and Oprea (2020,
"Auditing Differentially Private Machine Learning: How Private is Private SGD?", NeurIPS) replace
them by Clopper-Pearson upper confidence bounds: the result is a lower bound on the true epsilon
that holds with the stated confidence. :func:`~companion.audit.epsilon_lower_bound` does this from
counts; :func:`~companion.audit.threshold_audit` turns two samples of scores into counts by a
threshold chosen on a separate part of the trials, so that the choice does not spoil the confidence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from companion._validation import check_delta, check_int, check_real, check_vector

__all__ = [
    "EpsilonLowerBound",
    "ThresholdAudit",
    "clopper_pearson_upper",
    "epsilon_lower_bound",
    "threshold_audit",
]

#: How :func:`~companion.audit.epsilon_lower_bound` spends its confidence, in words (stored
#: in every result).
BONFERRONI = (
    "one-sided Clopper-Pearson upper bounds on FPR and FNR, each at level 1 - (1 - confidence) / 2"
    " (Bonferroni), so that both hold together with probability >= confidence"
)


@dataclass(frozen=True)
class EpsilonLowerBound:
    """A lower bound on epsilon from the error counts of one test, and what it assumed.

    Attributes:
        epsilon: the lower bound, >= 0. With probability at least ``confidence`` over the trials,
            a mechanism that is (epsilon', delta)-DP has epsilon' >= this value.
        fpr_upper, fnr_upper: the Clopper-Pearson upper bounds on the two error rates.
        false_positives, negatives, false_negatives, positives: the counts the bound came from.
        delta: the delta of the claim being tested.
        confidence: the probability with which the bound holds.
        method: how the confidence is split between the two rates.
    """

    epsilon: float
    fpr_upper: float
    fnr_upper: float
    false_positives: int
    negatives: int
    false_negatives: int
    positives: int
    delta: float
    confidence: float
    method: str = BONFERRONI


@dataclass(frozen=True)
class ThresholdAudit:
    """The result of :func:`~companion.audit.threshold_audit`: a bound and the threshold it used.

    Attributes:
        bound: the :class:`EpsilonLowerBound` computed on the evaluation trials.
        threshold: a trial is guessed "positive" (canary present) when its score is >= this.
        threshold_rule: how the threshold was chosen, in words.
        selection_positives, selection_negatives: trials spent on choosing the threshold (0 when
            the threshold was given).
    """

    bound: EpsilonLowerBound
    threshold: float
    threshold_rule: str
    selection_positives: int
    selection_negatives: int

    @property
    def epsilon(self) -> float:
        """The lower bound on epsilon (``bound.epsilon``)."""
        return self.bound.epsilon


def check_confidence(confidence: object) -> float:
    """A confidence level: a real number in the open interval (0, 1)."""
    confidence = check_real("confidence", confidence)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in the open interval (0, 1), got {confidence}.")
    return confidence


def _cp_upper(k: np.ndarray, n: int, level: float) -> np.ndarray:
    """Vectorised one-sided Clopper-Pearson upper bound at ``level`` (1 when k == n)."""
    k = np.asarray(k, dtype=float)
    inside = k < n
    # beta.ppf(level, k + 1, n - k) needs n - k > 0; the k == n entries are set to 1 below.
    upper = stats.beta.ppf(level, k + 1, np.where(inside, n - k, 1.0))
    return np.where(inside, upper, 1.0)


def clopper_pearson_upper(k: int, n: int, *, confidence: float) -> float:
    r"""One-sided Clopper-Pearson upper confidence bound on a binomial proportion.

    For :math:`k` successes in :math:`n` trials the bound is the :math:`p` with
    :math:`P[\mathrm{Binomial}(n, p) \le k] = 1 - \text{confidence}`, which is the quantile
    :math:`B^{-1}(\text{confidence};\ k + 1,\ n - k)` of a Beta distribution (Clopper and Pearson
    1934), and 1 when :math:`k = n`. It is exact, not asymptotic: the true proportion lies below
    it with probability at least ``confidence``.

    Args:
        k: number of successes, an integer in [0, n].
        n: number of trials, >= 1.
        confidence: in (0, 1).

    Returns:
        The upper bound, in (0, 1].

    Raises:
        TypeError: if ``k`` or ``n`` is not an integer.
        ValueError: if ``n < 1``, ``k`` is outside [0, n] or ``confidence`` outside (0, 1).

    Example:
        >>> round(clopper_pearson_upper(0, 100, confidence=0.95), 4)  # 1 - 0.05 ** (1 / 100)
        0.0295
    """
    n = check_int("n", n, minimum=1)
    k = check_int("k", k, minimum=0)
    if k > n:
        raise ValueError(f"k must be at most n = {n}, got {k}.")
    return float(_cp_upper(np.array(k), n, check_confidence(confidence)))


def _epsilon_from_rates(fpr: np.ndarray, fnr: np.ndarray, delta: float) -> np.ndarray:
    """max(log((1 - delta - fnr) / fpr), log((1 - delta - fpr) / fnr), 0), elementwise.

    A term whose numerator is <= 0 says nothing and counts as 0. ``fpr`` and ``fnr`` are > 0.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        first = np.log(1.0 - delta - fnr) - np.log(fpr)
        second = np.log(1.0 - delta - fpr) - np.log(fnr)
    first = np.where(1.0 - delta - fnr > 0, first, 0.0)
    second = np.where(1.0 - delta - fpr > 0, second, 0.0)
    return np.maximum(np.maximum(first, second), 0.0)


def epsilon_lower_bound(
    *,
    false_positives: int,
    negatives: int,
    false_negatives: int,
    positives: int,
    delta: float,
    confidence: float = 0.95,
) -> EpsilonLowerBound:
    r"""A lower bound on epsilon from the errors of a test between neighbouring data sets.

    ``positives`` trials ran the mechanism on the data set with the canary (:math:`D'`), of
    which the test missed ``false_negatives``; ``negatives`` trials ran it without the canary
    (:math:`D`), of which the test flagged ``false_positives``. With
    :math:`\alpha = 1 - \text{confidence}`, the two rates are replaced by one-sided
    Clopper-Pearson upper bounds :math:`\overline{\mathrm{FPR}}, \overline{\mathrm{FNR}}` at level
    :math:`1 - \alpha/2` each (Bonferroni: both hold together with probability
    :math:`\ge 1 - \alpha`), and

    .. math::

        \varepsilon_{\mathrm{lb}} = \max\Bigl(
        \log\frac{1 - \delta - \overline{\mathrm{FNR}}}{\overline{\mathrm{FPR}}},\
        \log\frac{1 - \delta - \overline{\mathrm{FPR}}}{\overline{\mathrm{FNR}}},\ 0\Bigr)

    (Jagielski, Ullman and Oprea 2020, "Auditing Differentially Private Machine Learning: How
    Private is Private SGD?", NeurIPS; the region is that of Kairouz, Oh and Viswanath
    2015). A term whose numerator is <= 0 is dropped. The test is taken as given: one that is
    always wrong gives 0 (its flipped decisions form another test, with other counts). If the
    mechanism is :math:`(\varepsilon, \delta)`-DP, then
    :math:`\varepsilon \ge \varepsilon_{\mathrm{lb}}` with probability at least ``confidence``
    over the trials, provided the trials are independent and the test was fixed before seeing
    them.

    The bound can never exceed :math:`\log(1/\overline{\mathrm{FPR}})` with no false positive at
    all, about :math:`\log(n / \log(2/\alpha))` for :math:`n` negatives: an audit with 1,000
    trials a side cannot certify more than about 5.6 whatever the mechanism.

    Args:
        false_positives: negatives (canary absent) the test called positive, in [0, negatives].
        negatives: trials without the canary, >= 1.
        false_negatives: positives (canary present) the test missed, in [0, positives].
        positives: trials with the canary, >= 1.
        delta: the delta of the privacy claim, in [0, 1).
        confidence: probability that the bound holds, in (0, 1).

    Returns:
        An :class:`EpsilonLowerBound` with the bound, both rate bounds and the inputs.

    Raises:
        TypeError: if a count is not an integer or ``delta``/``confidence`` not a number.
        ValueError: if a count is negative, ``negatives`` or ``positives`` is 0, an error count
            exceeds its total, ``delta`` is outside [0, 1) or ``confidence`` outside (0, 1).

    Example:
        >>> result = epsilon_lower_bound(
        ...     false_positives=0, negatives=1000, false_negatives=100, positives=1000, delta=1e-5
        ... )
        >>> round(result.epsilon, 3), round(result.fpr_upper, 5)
        (5.476, 0.00368)
    """
    negatives = check_int("negatives", negatives, minimum=1)
    positives = check_int("positives", positives, minimum=1)
    false_positives = check_int("false_positives", false_positives, minimum=0)
    false_negatives = check_int("false_negatives", false_negatives, minimum=0)
    if false_positives > negatives:
        raise ValueError(
            f"false_positives must be at most negatives = {negatives}, got {false_positives}."
        )
    if false_negatives > positives:
        raise ValueError(
            f"false_negatives must be at most positives = {positives}, got {false_negatives}."
        )
    delta = check_delta(delta, allow_zero=True)
    confidence = check_confidence(confidence)
    level = 1.0 - (1.0 - confidence) / 2.0
    fpr = float(_cp_upper(np.array(false_positives), negatives, level))
    fnr = float(_cp_upper(np.array(false_negatives), positives, level))
    epsilon = float(_epsilon_from_rates(np.array(fpr), np.array(fnr), delta))
    return EpsilonLowerBound(
        epsilon=epsilon,
        fpr_upper=fpr,
        fnr_upper=fnr,
        false_positives=false_positives,
        negatives=negatives,
        false_negatives=false_negatives,
        positives=positives,
        delta=delta,
        confidence=confidence,
    )


def _counts(
    positive: np.ndarray, negative: np.ndarray, thresholds: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(false positives, false negatives) of the rule "score >= t" at each threshold t."""
    negative, positive = np.sort(negative), np.sort(positive)
    false_positives = negative.size - np.searchsorted(negative, thresholds, side="left")
    false_negatives = np.searchsorted(positive, thresholds, side="left")
    return false_positives, false_negatives


def _select_threshold(
    positive: np.ndarray, negative: np.ndarray, delta: float, confidence: float
) -> tuple[float, str]:
    """The candidate threshold with the largest bound on the selection trials."""
    thresholds = np.unique(np.concatenate([positive, negative]))
    fp, fn = _counts(positive, negative, thresholds)
    level = 1.0 - (1.0 - confidence) / 2.0
    bounds = _epsilon_from_rates(
        _cp_upper(fp, negative.size, level), _cp_upper(fn, positive.size, level), delta
    )
    if bounds.max() > 0:
        return float(thresholds[int(np.argmax(bounds))]), "the largest lower bound"
    youden = (1.0 - fn / positive.size) - fp / negative.size
    return float(thresholds[int(np.argmax(youden))]), "the largest TPR - FPR (no bound was > 0)"


def threshold_audit(
    positive_scores: np.ndarray,
    negative_scores: np.ndarray,
    *,
    delta: float,
    confidence: float = 0.95,
    threshold: float | None = None,
    selection_fraction: float = 0.5,
) -> ThresholdAudit:
    r"""Turn scores of trials with and without a canary into a lower bound on epsilon.

    The test guesses "canary present" when a trial's score is at least a threshold :math:`t`.
    Choosing :math:`t` on the same trials that are then counted would make the bound optimistic (the
    best of many thresholds is a multiple comparison). So, unless ``threshold`` is given, the first
    ``selection_fraction`` of each array selects :math:`t` (the candidate, among the selection
    scores, with the largest :func:`~companion.audit.epsilon_lower_bound` on those trials) and only
    the remaining trials are counted for :func:`~companion.audit.epsilon_lower_bound`. The trials
    must be
    independent and in the order they were run (not sorted), as in Jagielski, Ullman and Oprea
    2020 and Nasr et al. 2021.

    Args:
        positive_scores: one score per trial with the canary, a 1-D array, higher meaning
            "canary more likely".
        negative_scores: one score per trial without it.
        delta: the delta of the claim, in [0, 1).
        confidence: in (0, 1).
        threshold: a threshold fixed in advance; then every trial is counted.
        selection_fraction: share of each array used to choose the threshold, in (0, 1).

    Returns:
        A :class:`ThresholdAudit`.

    Raises:
        TypeError: if the scores are not numpy arrays.
        ValueError: if they are empty, not 1-D or contain NaN; if a part (selection or
            evaluation) would be empty; if an argument is out of range.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> audit = threshold_audit(rng.normal(4, 1, 2000), rng.normal(0, 1, 2000), delta=1e-5)
        >>> round(audit.epsilon, 2), audit.bound.positives, audit.selection_positives
        (4.97, 1000, 1000)
    """
    positive = check_vector("positive_scores", positive_scores)
    negative = check_vector("negative_scores", negative_scores)
    delta = check_delta(delta, allow_zero=True)
    confidence = check_confidence(confidence)
    if threshold is not None:
        threshold = check_real("threshold", threshold)
        rule = "given in advance"
        select_pos = select_neg = 0
    else:
        fraction = check_real("selection_fraction", selection_fraction)
        if not 0 < fraction < 1:
            raise ValueError(
                f"selection_fraction must lie in the open interval (0, 1), got {fraction}."
            )
        select_pos = math.floor(fraction * positive.size)
        select_neg = math.floor(fraction * negative.size)
        if (
            min(select_pos, select_neg) < 1
            or select_pos == positive.size
            or (select_neg == negative.size)
        ):
            raise ValueError(
                "each score array needs trials both to choose the threshold and to count; got "
                f"{positive.size} positive and {negative.size} negative scores with "
                f"selection_fraction={fraction}."
            )
        threshold, chosen_by = _select_threshold(
            positive[:select_pos], negative[:select_neg], delta, confidence
        )
        rule = (
            f"chosen by {chosen_by} on the first {select_pos} positive and {select_neg} "
            "negative trials, which are then left out of the count"
        )
        positive, negative = positive[select_pos:], negative[select_neg:]
    fp, fn = _counts(positive, negative, np.array([threshold]))
    bound = epsilon_lower_bound(
        false_positives=int(fp[0]),
        negatives=negative.size,
        false_negatives=int(fn[0]),
        positives=positive.size,
        delta=delta,
        confidence=confidence,
    )
    return ThresholdAudit(bound, float(threshold), rule, select_pos, select_neg)
