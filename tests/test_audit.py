"""Tests of companion.audit: Clopper-Pearson and one-run bounds, and audits of DP-SGD and DP-FedAvg.

Oracles are written here, independently of the package: Clopper-Pearson bounds from
``scipy.stats.beta`` quantiles (and their defining binomial tail), the one-run p-value from
``scipy.stats.binom`` with a plain loop, the epsilon of two Gaussians from the closed form of
Gaussian DP and from numerical integration, per-example gradients of logistic regression in
closed form (checked against autograd), the noise-free DP steps as plain loops, and the claimed
epsilon from :class:`companion.accounting.RDPAccountant`.

The audits' must-hold properties use fixed seeds. A correct mechanism must give a lower bound at
most the accountant's epsilon: a valid 95% bound exceeds the true epsilon (itself at most the
claim) with probability <= 5%, and the seeds are fixed, so the outcome is deterministic; the
measured bounds are far below the claims (margins are quoted at each test). A planted bug (noise
divided by 4; clipping skipped) must give a bound above the claim; the parameters are chosen so
that the expected bound exceeds the claim by a margin several times the spread of the bound
across seeds (measured over 4 seeds while writing the tests, quoted at each test), so the
assertion does not hang on a lucky seed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import integrate, optimize, stats

from companion import data, models
from companion.accounting import RDPAccountant
from companion.audit import (
    audit_dp_fedavg,
    audit_dpsgd,
    clopper_pearson_upper,
    dp_fedavg_noisy_mean,
    dpsgd_noisy_sum,
    epsilon_lower_bound,
    one_run_audit,
    one_run_epsilon_lower_bound,
    threshold_audit,
    two_gaussians_epsilon,
)
from companion.audit.gradient_canary import claimed_epsilon
from companion.dpsgd import add_gaussian_noise, poisson_sample

pytestmark = pytest.mark.usefixtures("one_thread")

DELTA = 1e-5


# --------------------------------------------------------------------------------------------
# Oracles
# --------------------------------------------------------------------------------------------


def cp_upper(k: int, n: int, level: float) -> float:
    """One-sided Clopper-Pearson upper bound from the Beta quantile."""
    return 1.0 if k == n else float(stats.beta.ppf(level, k + 1, n - k))


def eps_oracle(fp: int, neg: int, fn: int, pos: int, delta: float, confidence: float) -> float:
    level = 1 - (1 - confidence) / 2  # Bonferroni over the two rates
    fpr, fnr = cp_upper(fp, neg, level), cp_upper(fn, pos, level)
    terms = [0.0]
    if 1 - delta - fnr > 0:
        terms.append(math.log((1 - delta - fnr) / fpr))
    if 1 - delta - fpr > 0:
        terms.append(math.log((1 - delta - fpr) / fnr))
    return max(terms)


def gdp_epsilon(mu: float, delta: float) -> float:
    """Exact epsilon of the Gaussian mechanism with mu = sensitivity / std (Dong, Roth, Su)."""

    def excess(eps: float) -> float:
        return (
            stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2)
        ) - delta

    return optimize.brentq(excess, 0.0, 200.0, xtol=1e-12) if excess(0.0) > 0 else 0.0


def claimed(q: float, sigma: float, steps: int) -> float:
    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=sigma, sample_rate=q)
    return accountant.get_epsilon(DELTA)


# --------------------------------------------------------------------------------------------
# epsilon_lower_bound and clopper_pearson_upper
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fp, neg, fn, pos, delta, confidence",
    [
        (0, 1000, 100, 1000, 1e-5, 0.95),
        (3, 500, 250, 700, 1e-5, 0.95),
        (10, 1000, 10, 1000, 0.0, 0.99),
        (120, 200, 5, 300, 1e-3, 0.9),  # the second term (FNR small) decides
        (1, 50, 49, 50, 0.0, 0.95),
    ],
)
def test_epsilon_lower_bound_matches_scipy_beta_quantiles(fp, neg, fn, pos, delta, confidence):
    result = epsilon_lower_bound(
        false_positives=fp,
        negatives=neg,
        false_negatives=fn,
        positives=pos,
        delta=delta,
        confidence=confidence,
    )
    level = 1 - (1 - confidence) / 2
    # Same quantity computed twice in double precision: agreement to 1e-12 relative.
    assert result.fpr_upper == pytest.approx(cp_upper(fp, neg, level), rel=1e-12)
    assert result.fnr_upper == pytest.approx(cp_upper(fn, pos, level), rel=1e-12)
    assert result.epsilon == pytest.approx(
        eps_oracle(fp, neg, fn, pos, delta, confidence), rel=1e-12, abs=1e-12
    )
    assert (result.delta, result.confidence, result.negatives, result.positives) == (
        delta,
        confidence,
        neg,
        pos,
    )
    assert "Bonferroni" in result.method


@pytest.mark.parametrize("k, n", [(0, 10), (3, 50), (49, 50), (500, 1000)])
def test_clopper_pearson_upper_has_its_defining_tail(k, n):
    # The bound p solves P[Binomial(n, p) <= k] = 1 - confidence (Clopper and Pearson 1934).
    upper = clopper_pearson_upper(k, n, confidence=0.95)
    assert stats.binom.cdf(k, n, upper) == pytest.approx(0.05, abs=1e-9)
    assert clopper_pearson_upper(n, n, confidence=0.95) == 1.0


def test_zero_errors_give_the_closed_form():
    # With no error, beta.ppf(level, 1, n) = 1 - (1 - level)^(1/n) for both rates.
    n, confidence = 2000, 0.95
    u = 1 - ((1 - confidence) / 2) ** (1 / n)
    result = epsilon_lower_bound(
        false_positives=0, negatives=n, false_negatives=0, positives=n, delta=DELTA
    )
    assert result.fpr_upper == pytest.approx(u, rel=1e-10)
    assert result.epsilon == pytest.approx(math.log((1 - DELTA - u) / u), rel=1e-10)
    # ... which is the ceiling of any audit with n trials a side: log(n / log(2 / alpha)) - ish.
    assert result.epsilon == pytest.approx(math.log(n / math.log(2 / 0.05)), abs=0.01)


@pytest.mark.parametrize("fp, fn", [(100, 100), (100, 0), (0, 100), (50, 50)])
def test_useless_tests_give_zero(fp, fn):
    # All errors, one rate at 1, or a coin flip: nothing is learnt about epsilon.
    result = epsilon_lower_bound(
        false_positives=fp, negatives=100, false_negatives=fn, positives=100, delta=DELTA
    )
    assert result.epsilon == 0.0


def test_bound_is_valid_for_randomized_response_and_raw_rates_are_not():
    # Randomized response with epsilon = 1 (delta = 0): the test "output == 1" has
    # FPR = FNR = 1 / (1 + e), and log((1 - FNR) / FPR) = 1 exactly: a tight test, so a valid
    # 95% bound exceeds 1 in at most 5% of repetitions (binomial acceptance region for 2000
    # repetitions: 0.05 + 3 * sqrt(0.05 * 0.95 / 2000) = 0.065). Negative control: the same
    # formula on the raw rates (no confidence interval) exceeds 1 about half the time.
    rng = np.random.default_rng(0)
    eps, n, reps = 1.0, 1000, 2000
    rate = 1 / (1 + math.e**eps)
    fps, fns = rng.binomial(n, rate, reps), rng.binomial(n, rate, reps)
    bounds = np.array(
        [
            epsilon_lower_bound(
                false_positives=int(a), negatives=n, false_negatives=int(b), positives=n, delta=0.0
            ).epsilon
            for a, b in zip(fps, fns, strict=True)
        ]
    )
    assert np.mean(bounds > eps) <= 0.065
    raw = np.maximum(np.log((1 - fns / n) / (fps / n)), np.log((1 - fps / n) / (fns / n)))
    assert np.mean(raw > eps) > 0.3


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"false_positives": -1}, ValueError),
        ({"negatives": 0}, ValueError),
        ({"positives": 0, "false_negatives": 0}, ValueError),
        ({"false_positives": 11}, ValueError),
        ({"false_negatives": 11}, ValueError),
        ({"false_positives": 1.0}, TypeError),
        ({"false_positives": True}, TypeError),
        ({"delta": 1.0}, ValueError),
        ({"delta": -0.1}, ValueError),
        ({"delta": math.nan}, ValueError),
        ({"confidence": 1.0}, ValueError),
        ({"confidence": 0.0}, ValueError),
    ],
)
def test_epsilon_lower_bound_rejects_bad_input(kwargs, error):
    arguments = dict(false_positives=1, negatives=10, false_negatives=1, positives=10, delta=0.0)
    with pytest.raises(error):
        epsilon_lower_bound(**(arguments | kwargs))


# --------------------------------------------------------------------------------------------
# threshold_audit
# --------------------------------------------------------------------------------------------


def test_threshold_audit_with_a_given_threshold_counts_every_trial():
    rng = np.random.default_rng(1)
    pos, neg = rng.normal(2, 1, 300), rng.normal(0, 1, 400)
    audit = threshold_audit(pos, neg, delta=DELTA, threshold=1.5)
    fp = sum(1 for s in neg if s >= 1.5)  # plain loop: "positive" means score >= threshold
    fn = sum(1 for s in pos if s < 1.5)
    assert (audit.bound.false_positives, audit.bound.false_negatives) == (fp, fn)
    assert (audit.bound.negatives, audit.bound.positives) == (400, 300)
    assert audit.epsilon == pytest.approx(eps_oracle(fp, 400, fn, 300, DELTA, 0.95), rel=1e-12)
    assert audit.selection_positives == audit.selection_negatives == 0


def test_threshold_is_chosen_on_the_first_part_only():
    rng = np.random.default_rng(2)
    pos, neg = rng.normal(3, 1, 1000), rng.normal(0, 1, 1000)
    audit = threshold_audit(pos, neg, delta=DELTA)
    # Changing the evaluation half cannot move the threshold, only the counts.
    pos2, neg2 = pos.copy(), neg.copy()
    pos2[500:] -= 10.0
    other = threshold_audit(pos2, neg2, delta=DELTA)
    assert other.threshold == audit.threshold
    assert other.bound.false_negatives == 500 and other.epsilon == 0.0
    assert audit.bound.positives == audit.bound.negatives == 500
    assert "first 500" in audit.threshold_rule


def _threshold_audits_of_randomized_response(true_epsilon, audits, n, seed):
    """Bounds of ``audits`` threshold audits of randomized response at ``true_epsilon``: ``n``
    trials a side, each reporting the canary truthfully with probability e^eps / (1 + e^eps)."""
    rng = np.random.default_rng(seed)
    truthful = math.exp(true_epsilon) / (1 + math.exp(true_epsilon))
    bounds = []
    for _ in range(audits):
        positive = (rng.random(n) < truthful).astype(float)
        negative = (rng.random(n) < 1 - truthful).astype(float)
        bounds.append(threshold_audit(positive, negative, delta=DELTA).epsilon)
    return np.array(bounds)


def test_threshold_audit_covers_randomized_response():
    # Randomized response at eps = 1 (pure DP) has exactly the error rates that eps = 1 allows,
    # so the bound of a correct audit, threshold chosen on the first half, exceeds 1 in at most
    # 5% of audits. Over 400 seeded audits the count above is Binomial(400, p <= 0.05): accept
    # at most 0.05 + 3 * sqrt(0.05 * 0.95 / 400) = 8.3% (1% measured). Not vacuous: most bounds
    # are above 0.8 (median 0.88); the control at eps = 1.3 exceeds 1 in most audits.
    bounds = _threshold_audits_of_randomized_response(1.0, audits=400, n=2000, seed=0)
    assert np.mean(bounds > 1.0) <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / 400)
    assert np.mean(bounds > 0.8) > 0.5
    control = _threshold_audits_of_randomized_response(1.3, audits=100, n=2000, seed=1)
    assert np.mean(control > 1.0) > 0.5


@pytest.mark.parametrize(
    "pos, neg, kwargs, error",
    [
        (np.zeros(1), np.zeros(10), {}, ValueError),  # nothing left to choose the threshold
        (np.zeros(10), np.zeros(10), {"selection_fraction": 1.0}, ValueError),
        (np.array([0.0, np.nan]), np.zeros(10), {}, ValueError),
        ([0.0, 1.0], np.zeros(10), {}, TypeError),
        (np.zeros((2, 2)), np.zeros(10), {}, ValueError),
    ],
)
def test_threshold_audit_rejects_bad_input(pos, neg, kwargs, error):
    with pytest.raises(error):
        threshold_audit(pos, neg, delta=DELTA, **kwargs)


# --------------------------------------------------------------------------------------------
# DP-SGD: gradient canary
# --------------------------------------------------------------------------------------------


def logistic_gradients(x: torch.Tensor, y: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """Per-example gradients of softmax regression in closed form, flattened as (W, b).

    For logits W x + b and cross-entropy, d loss / d W = (p - onehot(y)) x^T and d loss / d b =
    p - onehot(y).
    """
    weight, bias = (p.detach().to(x.dtype) for p in model.parameters())
    residual = torch.softmax(x @ weight.T + bias, dim=1) - F.one_hot(y, weight.shape[0])
    per_weight = (residual[:, :, None] * x[:, None, :]).reshape(len(x), -1)
    return torch.cat([per_weight, residual], dim=1)


@pytest.fixture(scope="module")
def gradients(digits):
    """Per-example gradients of the untrained logistic regression on 200 training digits."""
    x = torch.tensor(digits.x_train[:200], dtype=torch.float64)
    y = torch.tensor(digits.y_train[:200])
    model = models.logistic_regression(seed=0).double()
    grads = logistic_gradients(x, y, model)
    for i in range(3):  # the closed form against autograd
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        auto = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        assert torch.allclose(grads[i], auto, atol=1e-12)
    return grads.float()


def divided_noise(g, *, noise_multiplier, **kwargs):
    """Planted bug: a quarter of the claimed noise."""
    return dpsgd_noisy_sum(g, noise_multiplier=noise_multiplier / 4, **kwargs)


def no_clipping(g, *, noise_multiplier, max_grad_norm, sample_rate, generator):
    """Planted bug: sums the sampled gradients without clipping them."""
    mask = poisson_sample(g.shape[0], sample_rate=sample_rate, generator=generator)
    sums = {"sum": g[mask].sum(dim=0)}
    add_gaussian_noise(sums, std=noise_multiplier * max_grad_norm, generator=generator)
    return sums["sum"]


def test_default_step_clips_and_sums_like_a_plain_loop(gradients):
    g = gradients[:20].double()
    out = dpsgd_noisy_sum(
        g,
        noise_multiplier=0.0,
        max_grad_norm=1.0,
        sample_rate=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    expected = sum(row * min(1.0, 1.0 / (float(row.norm()) + 1e-6)) for row in g)
    assert torch.allclose(out, expected, atol=1e-12)
    # Negative control: the unclipped sum is far from it (norms are about 3-5, C = 1).
    assert not torch.allclose(out, g.sum(dim=0), atol=1e-3)


def test_default_step_noise_has_std_sigma_c():
    # On zero gradients the output is pure noise N(0, (sigma C)^2): 20 draws of 650 coordinates.
    # The sample std of N = 13,000 normals has relative standard error 1 / sqrt(2N) = 0.0062;
    # accept within 4 of them (0.025).
    generator = torch.Generator().manual_seed(0)
    zeros = torch.zeros(5, 650, dtype=torch.float64)
    draws = torch.stack(
        [
            dpsgd_noisy_sum(
                zeros, noise_multiplier=2.0, max_grad_norm=0.5, sample_rate=0.5, generator=generator
            )
            for _ in range(20)
        ]
    )
    assert float(draws.std()) == pytest.approx(1.0, abs=0.025)


# (sample_rate, noise_multiplier, steps, trials, examples). Bounds measured over seeds 0-3 while
# writing the tests, claimed epsilon in brackets:
# q=0.1, sigma=1, T=1 [2.13]: correct 0.00-0.12, noise/4 2.72-3.66, no clipping 3.80-3.88;
# q=1, sigma=2, T=1 [2.17]: correct 0.15-0.59, noise/4 2.95-3.32, no clipping 5.13-5.55;
# q=1, sigma=2.8, T=2 [2.19]: correct 0.28-1.03, noise/4 2.94-3.39, no clipping 4.88-5.55
# (200 examples; the test takes 100 to halve the time).
DPSGD_SETTINGS = [(0.1, 1.0, 1, 4000, 200), (1.0, 2.0, 1, 2000, 200), (1.0, 2.8, 2, 2000, 100)]


@pytest.mark.parametrize("q, sigma, steps, trials, examples", DPSGD_SETTINGS)
@pytest.mark.parametrize(
    "step, buggy", [(dpsgd_noisy_sum, False), (divided_noise, True), (no_clipping, True)]
)
def test_dpsgd_audit_against_the_accountant(
    gradients, q, sigma, steps, trials, examples, step, buggy
):
    audit = audit_dpsgd(
        gradients[:examples],
        noise_multiplier=sigma,
        max_grad_norm=1.0,
        sample_rate=q,
        delta=DELTA,
        trials=trials,
        steps=steps,
        step=step,
        seed=0,
    )
    claim = claimed(q, sigma, steps)
    assert audit.claimed_epsilon == pytest.approx(claim, rel=1e-12)
    if buggy:
        assert audit.epsilon > claim
    else:
        assert audit.epsilon <= claim
    # What the result says it assumed.
    assert audit.threshold_audit.bound.positives == audit.threshold_audit.bound.negatives
    assert audit.threshold_audit.bound.positives == trials - trials // 2
    assert (audit.trials, audit.steps, audit.delta, audit.confidence) == (
        trials,
        steps,
        DELTA,
        0.95,
    )
    assert step.__name__ in audit.mechanism
    assert audit.canary_norm == 10.0
    # The canary sits on a coordinate no real gradient touches (the weight of a blank pixel).
    assert float(gradients[:examples, audit.canary_coordinate].abs().max()) == 0.0


def test_dpsgd_audit_full_batch_matches_the_gaussian_mechanism(gradients):
    # q = 1, one step, canary on a zero coordinate: the score is N(0, (sigma C)^2) without the
    # canary and N(C, (sigma C)^2) with it (the canary of norm 10 C is clipped to C (1 - 1e-7)).
    # Check the means of 1000 scores each within 4 standard errors (4 * 2 / sqrt(1000) = 0.25),
    # and the standard deviation within 4 of its standard errors (relative 1 / sqrt(2 * 1000)).
    audit = audit_dpsgd(
        gradients,
        noise_multiplier=2.0,
        max_grad_norm=1.0,
        sample_rate=1.0,
        delta=DELTA,
        trials=1000,
        seed=1,
    )
    assert audit.scores_without.mean() == pytest.approx(0.0, abs=0.25)
    assert audit.scores_with.mean() == pytest.approx(1.0, abs=0.25)
    assert audit.scores_with.std() == pytest.approx(2.0, rel=4 / math.sqrt(2 * 1000))


def test_dpsgd_audit_rejects_bad_input(gradients):
    kwargs = dict(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=1.0, delta=DELTA, seed=0)
    with pytest.raises(ValueError, match="shape"):
        audit_dpsgd(gradients, step=lambda g, **_: g.sum(), **kwargs)
    with pytest.raises(TypeError, match="callable"):
        audit_dpsgd(gradients, step="dpsgd", **kwargs)
    with pytest.raises(ValueError, match="shape"):
        audit_dpsgd(gradients[0], **kwargs)
    with pytest.raises(TypeError, match="floating"):
        audit_dpsgd(torch.ones(3, 2, dtype=torch.int64), **kwargs)
    with pytest.raises(ValueError, match="finite"):
        audit_dpsgd(torch.full((3, 2), math.nan), **kwargs)
    with pytest.raises(ValueError, match="canary_coordinate"):
        audit_dpsgd(gradients, canary_coordinate=650, **kwargs)
    with pytest.raises(ValueError, match="trials"):
        audit_dpsgd(gradients, trials=3, **kwargs)
    with pytest.raises(ValueError, match="delta"):
        audit_dpsgd(gradients, **(kwargs | {"delta": 0.0}))


# --------------------------------------------------------------------------------------------
# One-run audit
# --------------------------------------------------------------------------------------------


def one_run_p_value(eps: float, r: int, v: int, m: int, delta: float) -> float:
    """Steinke, Nasr, Jagielski 2023 p-value, from binomial CDFs (vectorised over i)."""
    p = 1 / (1 + math.exp(-eps))
    tail = stats.binom.sf(v - 1, r, p)
    if delta == 0:
        return tail
    i = np.arange(1, v + 1)
    between = stats.binom.cdf(v - 1, r, p) - stats.binom.cdf(v - 1 - i, r, p)  # cdf(-1) = 0
    return min(tail + 2 * m * delta * float(np.max(between / i)), 1.0)


def one_run_oracle(r: int, v: int, m: int, delta: float, beta: float = 0.05) -> float:
    """The largest eps with p-value <= beta: the last grid point below, then Brent's method."""
    if one_run_p_value(0.0, r, v, m, delta) > beta:
        return 0.0
    grid = np.linspace(0, 20, 801)
    values = np.array([one_run_p_value(e, r, v, m, delta) for e in grid])
    last = int(np.flatnonzero(values <= beta)[-1])
    return optimize.brentq(
        lambda e: one_run_p_value(e, r, v, m, delta) - beta, grid[last], grid[last + 1], xtol=1e-12
    )


@pytest.mark.parametrize(
    "r, v, m, delta",
    [
        (100, 90, 1000, 0.0),
        (500, 300, 1000, 0.0),
        (100, 90, 1000, 1e-5),
        (400, 380, 2000, 1e-6),
        (50, 40, 100, 1e-4),
    ],
)
def test_one_run_bound_matches_scipy_binom(r, v, m, delta):
    bound = one_run_epsilon_lower_bound(
        guesses_made=r, correct_guesses=v, num_canaries=m, delta=delta
    )
    # Both sides solve p(eps) = 0.05 to 1e-10; the p-values agree to about 1e-15, and p changes
    # with eps at a rate of order 0.05 per unit, so the roots agree to well under 1e-6.
    assert bound.epsilon == pytest.approx(one_run_oracle(r, v, m, delta), abs=1e-6)
    assert bound.epsilon > 0
    assert (bound.guesses_made, bound.correct_guesses, bound.num_canaries) == (r, v, m)


def papers_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """The p-value as the reference code of Steinke, Nasr and Jagielski (2023, arXiv:2305.08846,
    Appendix D) computes it, transcribed loop for loop: a second oracle, written from the paper
    rather than from the formula the package and ``one_run_p_value`` share."""
    q = 1 / (1 + math.exp(-eps))
    beta = stats.binom.sf(v - 1, r, q)
    alpha, total = 0.0, 0.0
    for i in range(1, v + 1):
        total += stats.binom.pmf(v - i, r, q)
        if total > i * alpha:
            alpha = total / i
    return min(beta + alpha * delta * 2 * m, 1.0)


def papers_epsilon(m: int, r: int, v: int, delta: float, p: float = 0.05) -> float:
    """The reference code's search: raise the upper end by 1 until its p-value reaches ``p``,
    then bisect (40 halvings)."""
    low, high = 0.0, 1.0
    while papers_p_value(m, r, v, high, delta) < p:
        high += 1
    for _ in range(40):
        middle = (low + high) / 2
        if papers_p_value(m, r, v, middle, delta) < p:
            low = middle
        else:
            high = middle
    return low


@pytest.mark.parametrize(
    "m, r, v, delta",
    [(1000, 100, 100, 0.0), (1000, 100, 90, 1e-5), (2000, 400, 380, 1e-6), (100, 50, 40, 1e-4),
     (1797, 72, 65, 1e-5), (1797, 72, 50, 1e-5)],
)  # fmt: skip
def test_one_run_bound_matches_the_papers_reference_code(m, r, v, delta):
    bound = one_run_epsilon_lower_bound(
        guesses_made=r, correct_guesses=v, num_canaries=m, delta=delta
    )
    # Both solve p(eps) = 0.05; the bisection stops within about 1e-11 of the root.
    assert bound.epsilon == pytest.approx(papers_epsilon(m, r, v, delta), abs=1e-6)


def test_perfect_guesses_grow_like_the_log_of_their_number():
    # All r guesses correct, delta = 0: the root of expit(eps)^r = beta is log(b / (1 - b)) with
    # b = beta^(1/r), which is log(r / log(1/beta)) + O(1/r).
    beta = 0.05
    bounds = []
    for r in (10, 100, 1000, 10000):
        eps = one_run_epsilon_lower_bound(
            guesses_made=r, correct_guesses=r, num_canaries=10000, delta=0.0
        ).epsilon
        b = beta ** (1 / r)
        assert eps == pytest.approx(math.log(b / (1 - b)), abs=1e-8)
        bounds.append(eps)
    assert bounds[-1] == pytest.approx(math.log(10000 / math.log(1 / beta)), abs=1e-3)
    assert np.all(np.diff(bounds) > 2.0)  # ten times the guesses: + log 10 = 2.3 each


def test_random_guesses_give_about_zero():
    # Scores independent of membership: the true epsilon is 0, so each 95% bound is > 0 with
    # probability <= 5%: over 20 seeds, 3 or more positive bounds has probability 0.075 even at
    # exactly 5%. Measured: 0 of 20.
    bounds = []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        members = rng.random(1000) < 0.5
        bounds.append(one_run_audit(rng.normal(size=1000), members, delta=DELTA).epsilon)
    assert sum(b > 0 for b in bounds) <= 2


def test_one_run_audit_of_a_gaussian_mechanism_is_below_its_epsilon():
    # Each canary shifts its score by mu = 2 against N(0, 1) noise: Gaussian DP with mu = 2,
    # exact epsilon 10.0 at delta 1e-5. The bound must not exceed it, and must be > 0.
    rng = np.random.default_rng(0)
    members = rng.random(2000) < 0.5
    audit = one_run_audit(2.0 * members + rng.normal(size=2000), members, delta=DELTA)
    assert 0 < audit.epsilon <= gdp_epsilon(2.0, DELTA)
    assert audit.bound.confidence == pytest.approx(1 - 0.05 / len(audit.candidates))
    assert audit.bound.guesses_made == audit.k_plus + audit.k_minus
    assert (audit.k_plus, audit.k_minus) in audit.candidates


def _randomized_response_bounds(true_epsilon: float, runs: int, m: int, seed: int) -> np.ndarray:
    """One-run bounds of ``runs`` audits of randomized response at ``true_epsilon`` (pure DP):
    each of ``m`` canaries is reported truthfully with probability e^eps / (1 + e^eps)."""
    rng = np.random.default_rng(seed)
    truthful = math.exp(true_epsilon) / (1 + math.exp(true_epsilon))
    bounds = []
    for _ in range(runs):
        members = rng.random(m) < 0.5
        reported = np.where(rng.random(m) < truthful, members, ~members)
        bounds.append(one_run_audit(reported.astype(float), members, delta=0.0).epsilon)
    return np.array(bounds)


def test_one_run_audit_covers_randomized_response():
    # Randomized response at eps = 1 is exactly as strong as the theorem allows an eps-DP
    # mechanism to be, so it is the hardest case for the coverage: the bound may exceed the true
    # eps in at most 5% of audits. Over 400 independent audits (seed 0) the count above is
    # Binomial(400, p <= 0.05): accept at most 0.05 + 3 * sqrt(0.05 * 0.95 / 400) = 8.3%. The
    # control: randomized response at eps = 1.5 makes the bound exceed 1 in most audits.
    bounds = _randomized_response_bounds(1.0, runs=400, m=1000, seed=0)
    assert np.mean(bounds > 1.0) <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / 400)
    assert np.mean(bounds > 0.0) > 0.5  # not vacuous: most audits find something
    assert np.mean(_randomized_response_bounds(1.5, runs=100, m=1000, seed=1) > 1.0) > 0.5


def test_one_run_audit_counts_guesses_like_a_plain_loop():
    rng = np.random.default_rng(3)
    members = rng.random(200) < 0.5
    scores = members + rng.normal(size=200)
    audit = one_run_audit(scores, members, delta=0.0, guess_counts=[(30, 20)])
    order = sorted(range(200), key=lambda i: -scores[i])
    correct = sum(members[i] for i in order[:30]) + sum(not members[i] for i in order[-20:])
    assert audit.bound.correct_guesses == correct
    assert audit.epsilon == pytest.approx(one_run_oracle(50, correct, 200, 0.0), abs=1e-6)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"guesses_made": 11}, ValueError),
        ({"correct_guesses": 6}, ValueError),
        ({"num_canaries": 0}, ValueError),
        ({"guesses_made": 5.0}, TypeError),
        ({"delta": 1.0}, ValueError),
        ({"confidence": 1.5}, ValueError),
    ],
)
def test_one_run_bound_rejects_bad_input(kwargs, error):
    arguments = dict(guesses_made=5, correct_guesses=5, num_canaries=10, delta=0.0)
    with pytest.raises(error):
        one_run_epsilon_lower_bound(**(arguments | kwargs))


def test_one_run_audit_rejects_bad_input():
    scores, members = np.zeros(10), np.zeros(10, dtype=bool)
    with pytest.raises(TypeError, match="boolean"):
        one_run_audit(scores, members.astype(int), delta=0.0)
    with pytest.raises(ValueError, match="shape"):
        one_run_audit(scores, members[:5], delta=0.0)
    with pytest.raises(ValueError, match="k_plus"):
        one_run_audit(scores, members, delta=0.0, guess_counts=[(6, 5)])
    with pytest.raises(TypeError, match="pair"):
        one_run_audit(scores, members, delta=0.0, guess_counts=[3])


def _two_sided_fair_p(k: int, m: int) -> float:
    """P[|Binomial(m, 1/2) - m/2| >= |k - m/2|], summed exactly with integers (the oracle)."""
    far = abs(2 * k - m)
    return sum(math.comb(m, j) for j in range(m + 1) if abs(2 * j - m) >= far) / 2**m


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_the_claim_can_come_from_the_pld_accountant(gradients, sigma):
    # One step with q = 1 is the Gaussian mechanism with mu = 1 / sigma, whose exact epsilon the
    # oracle gdp_epsilon solves for. The PLD accountant rounds pessimistically: at or above it,
    # within 1e-3; RDP's claim is looser, above both.
    exact = gdp_epsilon(1 / sigma, DELTA)
    pld = claimed_epsilon(
        noise_multiplier=sigma, sample_rate=1.0, steps=1, delta=DELTA, accountant="pld"
    )
    assert exact - 1e-9 <= pld <= exact + 1e-3
    rdp = claimed_epsilon(noise_multiplier=sigma, sample_rate=1.0, steps=1, delta=DELTA)
    assert rdp > pld + 0.1
    audit = audit_dpsgd(
        gradients[:20], noise_multiplier=sigma, max_grad_norm=1.0, sample_rate=1.0, delta=DELTA,
        trials=8, seed=0, accountant="pld",
    )  # fmt: skip
    assert audit.claimed_epsilon == pld


def test_the_audits_refuse_an_unknown_accountant_before_running(gradients, client_updates):
    def never(*args, **kwargs):
        raise AssertionError("the audit ran")

    common = dict(noise_multiplier=1.0, sample_rate=1.0, delta=DELTA, accountant="PLD")
    with pytest.raises(ValueError, match="lower case: accountant='pld'"):
        audit_dpsgd(gradients, max_grad_norm=1.0, step=never, **common)
    with pytest.raises(ValueError, match="lower case: accountant='pld'"):
        audit_dp_fedavg(client_updates, max_update_norm=0.5, rounds=1, aggregate=never, **common)
    fedavg = audit_dp_fedavg(
        client_updates, max_update_norm=0.5, noise_multiplier=2.0, sample_rate=1.0, rounds=1,
        delta=DELTA, num_canaries=1, runs=16, seed=0, accountant="pld",
    )  # fmt: skip
    assert fedavg.claimed_epsilon == pytest.approx(gdp_epsilon(0.5, DELTA), abs=1e-3)


def test_one_run_audit_refuses_members_not_drawn_with_probability_one_half():
    # The theorem needs each canary included with probability 1/2. Scores that know nothing,
    # with 80% of the canaries included: guessing "in" for the top half is right 80% of the time,
    # which a fair draw would read as epsilon > 0.8 (0.87 with this seed before this check).
    rng = np.random.default_rng(0)
    scores = rng.normal(size=1000)
    unfair = rng.random(1000) < 0.8
    with pytest.raises(ValueError, match="probability 1/2"):
        one_run_audit(scores, unfair, delta=DELTA)
    with pytest.raises(ValueError, match="1000 included canaries of 1000"):
        one_run_audit(scores, np.ones(1000, dtype=bool), delta=DELTA)
    # The threshold, p < 1e-6 for a fair draw, on both sides of it (the oracle sums exactly):
    assert _two_sided_fair_p(580, 1000) < 1e-6 < _two_sided_fair_p(570, 1000)
    for included, refused in ((580, True), (420, True), (570, False), (430, False)):
        members = np.arange(1000) < included
        if refused:
            with pytest.raises(ValueError, match=f"{included} included canaries of 1000"):
                one_run_audit(scores, members, delta=DELTA)
        else:
            one_run_audit(scores, members, delta=DELTA)
    # 20 canaries all included happen once in 2^19 fair draws, above 1e-6: accepted.
    assert _two_sided_fair_p(20, 20) > 1e-6
    one_run_audit(np.arange(20.0), np.ones(20, dtype=bool), delta=0.0)


# --------------------------------------------------------------------------------------------
# DP-FedAvg: canary clients
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client_updates(digits):
    """Mean gradients of the MLP (d = 9,610) on 20 IID clients of the digits: norms 0.37-0.50."""
    x = torch.tensor(digits.x_train, dtype=torch.float32)
    y = torch.tensor(digits.y_train)
    model = models.mlp(seed=0)
    rows = []
    for part in data.partition_iid(len(x), num_clients=20, rng=0):
        model.zero_grad()
        F.cross_entropy(model(x[part]), y[part]).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    return torch.stack(rows)


def fedavg_divided_noise(u, *, noise_multiplier, **kwargs):
    """Planted bug: a quarter of the claimed noise."""
    return dp_fedavg_noisy_mean(u, noise_multiplier=noise_multiplier / 4, **kwargs)


def fedavg_no_clipping(
    u, *, max_update_norm, noise_multiplier, sample_rate, expected_clients, generator
):
    """Planted bug: averages the sampled updates without clipping them."""
    mask = poisson_sample(u.shape[0], sample_rate=sample_rate, generator=generator)
    sums = {"sum": u[mask].sum(dim=0)}
    add_gaussian_noise(sums, std=noise_multiplier * max_update_norm, generator=generator)
    return sums["sum"] / expected_clients


def test_fedavg_round_is_the_clipped_mean_of_a_plain_loop():
    u = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = dp_fedavg_noisy_mean(
        u,
        max_update_norm=1.0,
        noise_multiplier=0.0,
        sample_rate=1.0,
        expected_clients=3.0,
        generator=torch.Generator().manual_seed(0),
    )
    expected = sum(row * min(1.0, 1.0 / (float(row.norm()) + 1e-6)) for row in u) / 3.0
    assert torch.allclose(out, expected, atol=1e-12)


@pytest.mark.parametrize(
    ("updates", "error", "message"),
    [
        (torch.ones(3), ValueError, r"updates must have shape \(n, d\)"),  # was an IndexError
        (np.ones((4, 3), dtype=int), TypeError, "updates must be a floating"),  # AttributeError
        (torch.full((4, 3), float("nan")), ValueError, "updates must be finite"),  # returned NaN
    ],
)
def test_fedavg_round_checks_its_updates(updates, error, message):
    """helper-104's trial: the public round, the default aggregate of audit_dp_fedavg."""
    with pytest.raises(error, match=message):
        dp_fedavg_noisy_mean(
            updates,
            max_update_norm=1.0,
            noise_multiplier=1.0,
            sample_rate=1.0,
            expected_clients=4.0,
            generator=torch.Generator().manual_seed(0),
        )


def two_gaussian_delta_by_quadrature(eps, m0, s0, m1, s1):
    """max over both orders of the integral of (p - e^eps q)_+, by adaptive quadrature."""

    def hockey(ma, sa, mb, sb):
        def f(y):
            return max(stats.norm.pdf(y, ma, sa) - math.exp(eps) * stats.norm.pdf(y, mb, sb), 0.0)

        edges = np.linspace(min(m0, m1) - 40 * max(s0, s1), max(m0, m1) + 40 * max(s0, s1), 101)
        return sum(
            integrate.quad(f, a, b, epsabs=1e-13)[0]
            for a, b in zip(edges[:-1], edges[1:], strict=True)
        )

    return max(hockey(m0, s0, m1, s1), hockey(m1, s1, m0, s0))


@pytest.mark.parametrize("mu", [0.5, 1.0, 3.0])
def test_two_gaussians_equal_variance_is_gaussian_dp(mu):
    eps = two_gaussians_epsilon(mean0=0.0, std0=2.0, mean1=2.0 * mu, std1=2.0, delta=DELTA)
    assert eps == pytest.approx(gdp_epsilon(mu, DELTA), abs=1e-8)


@pytest.mark.parametrize("s1", [0.9, 0.95, 1.05, 1.3])
def test_two_gaussians_unequal_variance_matches_quadrature(s1):
    eps = two_gaussians_epsilon(mean0=0.0, std0=1.0, mean1=1.0, std1=s1, delta=DELTA)
    # At the returned epsilon the integral equals delta (quadrature error ~1e-12 absolute).
    assert two_gaussian_delta_by_quadrature(eps, 0.0, 1.0, 1.0, s1) == pytest.approx(
        DELTA, rel=1e-4
    )
    assert eps == two_gaussians_epsilon(mean0=1.0, std0=s1, mean1=0.0, std1=1.0, delta=DELTA)


def test_two_gaussians_edge_cases():
    assert two_gaussians_epsilon(mean0=0.0, std0=1.0, mean1=0.0, std1=1.0, delta=DELTA) == 0.0
    with pytest.raises(ValueError, match="std0"):
        two_gaussians_epsilon(mean0=0.0, std0=0.0, mean1=0.0, std1=1.0, delta=DELTA)
    with pytest.raises(ValueError, match="delta"):
        two_gaussians_epsilon(mean0=0.0, std0=1.0, mean1=0.0, std1=1.0, delta=0.0)


# q=1, sigma=2, one round, S = 0.5, 4000 runs of one canary each [claim 2.17]; bounds measured over
# seeds 0-3: correct 0.32-0.87, noise/4 2.95-3.15, no clipping 4.57-5.54.
@pytest.mark.parametrize(
    "aggregate, buggy",
    [(dp_fedavg_noisy_mean, False), (fedavg_divided_noise, True), (fedavg_no_clipping, True)],
)
def test_fedavg_audit_against_the_accountant(client_updates, aggregate, buggy):
    audit = audit_dp_fedavg(
        client_updates,
        max_update_norm=0.5,
        noise_multiplier=2.0,
        sample_rate=1.0,
        rounds=1,
        delta=DELTA,
        num_canaries=1,
        runs=4000,
        aggregate=aggregate,
        seed=0,
    )
    claim = claimed(1.0, 2.0, 1)
    assert audit.claimed_epsilon == pytest.approx(claim, rel=1e-12)
    assert audit.independent_trials
    if buggy:
        assert audit.epsilon_lower_bound > claim
        assert audit.epsilon_estimate > claim  # an estimate, but the bug is gross
    else:
        assert audit.epsilon_lower_bound <= claim
        # The Gaussian fit: a canary moves the cosine by S / (||sum|| / sqrt(d)) ~ 1 / sigma null
        # stds (the noise dominates the norm of the sum); the mean of n inserted cosines has
        # standard error 1 / sqrt(n) null stds: accept within 4 of them.
        n = audit.cosines_inserted.size
        assert audit.inserted_mean / audit.null_std == pytest.approx(0.5, abs=4 / math.sqrt(n))
    # Not-inserted canaries are random directions: mean 0, std 1 / sqrt(d) (to 4 standard errors).
    m = audit.cosines_not_inserted.size
    assert audit.not_inserted_mean / audit.null_std == pytest.approx(0.0, abs=4 / math.sqrt(m))
    assert audit.not_inserted_std / audit.null_std == pytest.approx(1.0, abs=4 / math.sqrt(2 * m))
    assert audit.null_std == pytest.approx(1 / math.sqrt(9610))
    assert aggregate.__name__ in audit.mechanism


def test_fedavg_one_shot_audit_fits_the_canary_shift(client_updates):
    # One run, 500 canaries (Andrew et al.'s one-shot setting): the fit of the inserted cosines
    # sees the shift 1 / sigma = 0.5 null stds (to 4 standard errors); the bound is flagged as
    # not from independent trials.
    audit = audit_dp_fedavg(
        client_updates,
        max_update_norm=0.5,
        noise_multiplier=2.0,
        sample_rate=1.0,
        rounds=1,
        delta=DELTA,
        num_canaries=500,
        seed=0,
    )
    n = audit.cosines_inserted.size
    assert n + audit.cosines_not_inserted.size == 500
    assert audit.inserted_mean / audit.null_std == pytest.approx(0.5, abs=4 / math.sqrt(n))
    assert not audit.independent_trials
    assert audit.epsilon_lower_bound <= audit.claimed_epsilon


# One run of 1,000 canaries, q = 1, sigma = 2, S = 0.5 [claim 2.17]. The one-run bound of a correct
# round is below the claim with probability >= 95% in any run (the theorem); the planted bugs are
# caught in this one run: measured over seeds 0-2, correct 0.32-0.59, noise / 4 2.44-2.75, no
# clipping 3.87-4.16. Clopper-Pearson on the same cosines caught noise / 4 in one of the three.
@pytest.mark.parametrize(
    "aggregate, buggy",
    [(dp_fedavg_noisy_mean, False), (fedavg_divided_noise, True), (fedavg_no_clipping, True)],
)
def test_fedavg_one_run_bound_against_the_accountant(client_updates, aggregate, buggy):
    audit = audit_dp_fedavg(
        client_updates, max_update_norm=0.5, noise_multiplier=2.0, sample_rate=1.0, rounds=1,
        delta=DELTA, num_canaries=1000, aggregate=aggregate, seed=0,
    )  # fmt: skip
    assert audit.one_run is not None and audit.one_run.bound.num_canaries == 1000
    assert (audit.one_run.epsilon > audit.claimed_epsilon) == buggy


def test_fedavg_one_run_bound_only_for_one_run_of_several_canaries(client_updates):
    kwargs = dict(
        max_update_norm=0.5, noise_multiplier=2.0, sample_rate=1.0, rounds=1, delta=DELTA, seed=0
    )
    assert audit_dp_fedavg(client_updates, num_canaries=1, runs=20, **kwargs).one_run is None
    assert audit_dp_fedavg(client_updates, num_canaries=10, runs=2, **kwargs).one_run is None


def test_fedavg_audit_rejects_bad_input(client_updates):
    kwargs = dict(
        max_update_norm=0.5, noise_multiplier=2.0, sample_rate=1.0, rounds=1, delta=DELTA, seed=0
    )
    with pytest.raises(ValueError, match="too few canaries"):
        audit_dp_fedavg(client_updates, num_canaries=3, **kwargs)
    with pytest.raises(ValueError, match="shape"):
        audit_dp_fedavg(client_updates, aggregate=lambda u, **_: u, **kwargs)
    with pytest.raises(TypeError, match="callable"):
        audit_dp_fedavg(client_updates, aggregate=None, **kwargs)
    with pytest.raises(ValueError, match="rounds"):
        audit_dp_fedavg(client_updates, **(kwargs | {"rounds": 0}))


def test_two_gaussians_epsilon_of_nearly_disjoint_distributions_is_infinite():
    """A fitted std near zero (canaries inserted without noise) separates the two Gaussians
    completely: no finite epsilon, and no overflow on the way (a regression)."""
    assert two_gaussians_epsilon(mean0=0.0, std0=1.0, mean1=1.0, std1=1e-9, delta=1e-5) == math.inf
