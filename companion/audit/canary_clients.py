r"""Auditing DP-FedAvg with canary clients (Andrew et al. 2024).

A *canary client* sends the same update in every round it takes part in: a random direction
:math:`u` (uniform on the unit sphere of :math:`\mathbb R^d`) times a norm above the clipping
norm :math:`S`. Canaries are put into the client population at random (each with probability
1/2); once in, a canary is Poisson-sampled in every round with probability :math:`q`, exactly like
the real clients and like the accountant assumes. After training, the auditor compares the
*final* model change :math:`\Delta` with each canary's direction through the cosine
:math:`\cos(\Delta, u)` (Andrew, Kairouz, Oh, Oprea, McMahan and Suriyakumar 2024, "One-shot
Empirical Privacy Estimation for Federated Learning", ICLR).

- A canary that was *not* inserted is a random direction independent of :math:`\Delta`, so its
  cosine follows the distribution of one coordinate of a uniform unit vector: mean 0, variance
  :math:`1/d`, close to :math:`\mathcal N(0, 1/d)` in high dimension.
- The cosines of the inserted canaries are fitted by a Gaussian :math:`\mathcal N(\hat\mu,
  \hat\sigma^2)`. The **estimate** :math:`\hat\varepsilon` is the epsilon, at the given delta, of
  telling :math:`\mathcal N(0, 1/d)` from :math:`\mathcal N(\hat\mu, \hat\sigma^2)` apart
  (:func:`~companion.audit.two_gaussians_epsilon`). It is an estimate, not a bound: it assumes the
  Gaussian shape, has no confidence level, and comes from a single run.
- Next to it, the cosines of inserted and not-inserted canaries give a Clopper-Pearson **lower
  bound** through a threshold (:func:`companion.audit.threshold_audit`; Jagielski, Ullman and
  Oprea 2020). It is rigorous when every run holds one canary (``num_canaries=1``, many
  ``runs``: independent trials); with several canaries per run their cosines share the run's
  noise and are only nearly independent in high dimension, so the bound is approximate.
- With one run of several canaries, the **one-run lower bound** of Steinke, Nasr and Jagielski
  (2023, NeurIPS; :func:`companion.audit.one_run_audit`) is rigorous: each canary is inserted
  by its own fair coin, and its score depends on the coins only through the released updates.

The round audited, :func:`~companion.audit.dp_fedavg_noisy_mean`, is written here from
:func:`companion.per_example.clip_factors` and :func:`companion.dpsgd.add_gaussian_noise`
(McMahan, Ramage, Talwar and Zhang 2018, "Learning Differentially Private Recurrent Language
Models", ICLR: clip each update to :math:`S`, sum, add :math:`\mathcal N(0, \sigma^2 S^2 I)`,
divide by the expected number of clients, a public constant). Another implementation with the
same signature can be passed as ``aggregate``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import optimize, stats

from companion._random import torch_generator
from companion._validation import (
    check_accountant_name,
    check_delta,
    check_nonnegative,
    check_positive,
    check_positive_int,
    check_probability,
    check_real,
)
from companion.audit.bounds import ThresholdAudit, check_confidence, threshold_audit
from companion.audit.gradient_canary import check_release, check_step, claimed_epsilon
from companion.audit.one_run import OneRunAudit, one_run_audit
from companion.dpsgd import add_gaussian_noise, poisson_sample
from companion.per_example import clip_factors

__all__ = [
    "Aggregate",
    "CanaryClientAudit",
    "audit_dp_fedavg",
    "dp_fedavg_noisy_mean",
    "two_gaussians_epsilon",
]

#: One DP-FedAvg round under audit: ``aggregate(updates, *, max_update_norm, noise_multiplier,
#: sample_rate, expected_clients, generator)`` takes every client's update, shape ``(n, d)``, and
#: returns the released model change, shape ``(d,)``.
Aggregate = Callable[..., torch.Tensor]


def dp_fedavg_noisy_mean(
    updates: torch.Tensor,
    *,
    max_update_norm: float,
    noise_multiplier: float,
    sample_rate: float,
    expected_clients: float,
    generator: torch.Generator,
) -> torch.Tensor:
    r"""One DP-FedAvg round: sample clients, clip their updates, sum, add noise, divide.

    .. math::

        \Delta = \frac{1}{qK}\Bigl(\sum_{k \in B} u_k \min\Bigl(1,
        \frac{S}{\lVert u_k \rVert + 10^{-6}}\Bigr) + \mathcal N(0, \sigma^2 S^2 I)\Bigr),

    each client in :math:`B` with probability :math:`q`, and :math:`qK` (``expected_clients``)
    fixed in advance, not counted from the data (McMahan et al. 2018).

    Args:
        updates: one update per client in the population, shape ``(n, d)``.
        max_update_norm: :math:`S`, > 0.
        noise_multiplier: :math:`\sigma`, >= 0.
        sample_rate: :math:`q`, in (0, 1].
        expected_clients: the public divisor :math:`qK`, > 0.
        generator: the :class:`torch.Generator` for sampling and noise (its seed is a secret).

    Returns:
        The noisy mean update, shape ``(d,)``.

    Raises:
        TypeError: if ``updates`` is not a floating tensor or numpy array.
        ValueError: if a parameter is out of range, or ``updates`` is not (n, d) or not finite.

    Example:
        >>> import torch
        >>> u = torch.tensor([[3.0, 4.0], [0.0, 0.5]])
        >>> dp_fedavg_noisy_mean(u, max_update_norm=1.0, noise_multiplier=0.0, sample_rate=1.0,
        ...                      expected_clients=2.0, generator=torch.Generator().manual_seed(0))
        tensor([0.3000, 0.6500])
    """
    updates = _check_updates(updates, "updates")
    expected_clients = check_positive("expected_clients", expected_clients)
    mask = poisson_sample(updates.shape[0], sample_rate=sample_rate, generator=generator)
    batch = updates[mask]
    factors = clip_factors(batch.norm(dim=1), max_grad_norm=max_update_norm)
    sums = {"sum": (factors[:, None] * batch).sum(dim=0)}
    add_gaussian_noise(sums, std=noise_multiplier * max_update_norm, generator=generator)
    return sums["sum"] / expected_clients


def _interval_mass(mean: float, std: float, low: float, high: float) -> float:
    """P[low < Y < high] for Y ~ N(mean, std^2), accurate in either tail."""
    if low >= mean:
        return float(stats.norm.sf(low, mean, std) - stats.norm.sf(high, mean, std))
    return float(stats.norm.cdf(high, mean, std) - stats.norm.cdf(low, mean, std))


def _hockey_stick(mp: float, sp: float, mq: float, sq: float, epsilon: float) -> float:
    r"""sup_S P(S) - e^eps Q(S) for P = N(mp, sp^2), Q = N(mq, sq^2): the set {log p/q > eps}."""
    # log p(y) - log q(y) - eps = a y^2 + b y + c
    a = 0.5 / sq**2 - 0.5 / sp**2
    b = mp / sp**2 - mq / sq**2
    c = 0.5 * (mq / sq) ** 2 - 0.5 * (mp / sp) ** 2 + math.log(sq / sp) - epsilon
    if a == 0:
        if b == 0:
            return 0.0  # identical distributions
        cut = -c / b
        intervals = [(cut, math.inf)] if b > 0 else [(-math.inf, cut)]
    else:
        disc = b * b - 4 * a * c
        if disc <= 0:
            return 0.0  # the set is empty (a < 0) or everything (a > 0, then 1 - e^eps <= 0)
        half = -0.5 * (b + math.copysign(math.sqrt(disc), b))  # stable roots: half/a, c/half
        low, high = sorted((half / a, c / half))
        intervals = [(-math.inf, low), (high, math.inf)] if a > 0 else [(low, high)]
    p_mass = sum(_interval_mass(mp, sp, lo, hi) for lo, hi in intervals)
    q_mass = sum(_interval_mass(mq, sq, lo, hi) for lo, hi in intervals)
    return max(p_mass - math.exp(epsilon) * q_mass, 0.0)


def two_gaussians_epsilon(
    *, mean0: float, std0: float, mean1: float, std1: float, delta: float
) -> float:
    r"""The epsilon, at ``delta``, of telling two Gaussians :math:`P, Q` apart.

    :math:`P = \mathcal N(\mu_0, s_0^2)`, :math:`Q = \mathcal N(\mu_1, s_1^2)`: the smallest
    :math:`\varepsilon \ge 0` with :math:`\max(\delta_{P\|Q}(\varepsilon),
    \delta_{Q\|P}(\varepsilon)) \le \delta`, where :math:`\delta_{P\|Q}(\varepsilon) = \sup_S P(S)
    - e^\varepsilon Q(S)` is attained on the set where the log-likelihood ratio, a quadratic in
    :math:`y`, exceeds :math:`\varepsilon`; its masses are normal CDFs (the computation of Andrew
    et al. 2024, "One-shot Empirical Privacy Estimation for Federated Learning", ICLR, for their
    estimate). With equal variances it is the epsilon of the Gaussian mechanism with
    :math:`\mu = |\mu_1 - \mu_0| / s` (Dong, Roth and Su 2022, Corollary 2.13). Found by Brent's
    method; ``inf`` if it exceeds 700.

    Args:
        mean0, std0: the first Gaussian (std > 0).
        mean1, std1: the second Gaussian (std > 0).
        delta: in (0, 1).

    Returns:
        Epsilon, >= 0.

    Raises:
        ValueError: if a std is not > 0, a mean not finite, or ``delta`` outside (0, 1).

    Example:
        >>> round(two_gaussians_epsilon(mean0=0, std0=1, mean1=1, std1=1, delta=1e-5), 3)
        4.377
    """
    m0, m1 = check_real("mean0", mean0), check_real("mean1", mean1)
    s0, s1 = check_positive("std0", std0), check_positive("std1", std1)
    delta = check_delta(delta)

    def excess(eps: float) -> float:
        return max(_hockey_stick(m0, s0, m1, s1, eps), _hockey_stick(m1, s1, m0, s0, eps)) - delta

    if excess(0.0) <= 0:
        return 0.0
    high = 1.0
    while excess(high) > 0:
        high *= 2.0
        if high > 700:  # e^eps would overflow: the distributions are (nearly) disjoint
            return math.inf
    return float(optimize.brentq(excess, high / 2 if high > 1 else 0.0, high, xtol=1e-10))


@dataclass(frozen=True)
class CanaryClientAudit:
    """The result of :func:`~companion.audit.audit_dp_fedavg`: a bound, an estimate, the claim and
    the set-up.

    Attributes:
        epsilon_lower_bound: the Clopper-Pearson lower bound from a threshold on the cosines
            (rigorous when ``independent_trials``).
        one_run: with one run of several canaries, the one-run audit of its cosines
            (:func:`companion.audit.one_run_audit`, rigorous: its ``epsilon`` is the bound to
            quote); otherwise ``None``.
        epsilon_estimate: the Andrew et al. estimate (Gaussian fit); an estimate, not a bound.
        claimed_epsilon: the accountant's epsilon (``accountant``, RDP by default) for
            ``rounds`` rounds at this ``noise_multiplier`` and ``sample_rate``.
        threshold_audit: counts, threshold and how it was chosen.
        inserted_mean, inserted_std: the Gaussian fitted to the inserted canaries' cosines.
        null_std: :math:`1/\\sqrt d`, the std of a not-inserted canary's cosine.
        not_inserted_mean, not_inserted_std: the observed not-inserted cosines (a check).
        max_update_norm, noise_multiplier, sample_rate, rounds: the claimed mechanism.
        num_canaries, runs, canary_norm: the canaries.
        independent_trials: whether every run held one canary.
        delta, confidence: of the bound (and of the estimate's delta).
        mechanism: a description of the round audited and of the score.
        cosines_inserted, cosines_not_inserted: every score, in run order.
    """

    epsilon_lower_bound: float
    epsilon_estimate: float
    claimed_epsilon: float
    threshold_audit: ThresholdAudit
    one_run: OneRunAudit | None
    inserted_mean: float
    inserted_std: float
    null_std: float
    not_inserted_mean: float
    not_inserted_std: float
    max_update_norm: float
    noise_multiplier: float
    sample_rate: float
    rounds: int
    num_canaries: int
    runs: int
    canary_norm: float
    independent_trials: bool
    delta: float
    confidence: float
    mechanism: str
    cosines_inserted: np.ndarray = field(repr=False, compare=False)
    cosines_not_inserted: np.ndarray = field(repr=False, compare=False)


def _check_updates(updates: object, name: str = "client_updates") -> torch.Tensor:
    if isinstance(updates, np.ndarray):
        updates = torch.from_numpy(updates)
    if not isinstance(updates, torch.Tensor) or not updates.is_floating_point():
        raise TypeError(f"{name} must be a floating torch.Tensor or numpy array (n, d).")
    if updates.ndim != 2 or 0 in updates.shape:
        raise ValueError(
            f"{name} must have shape (n, d) with n, d >= 1, got {tuple(updates.shape)}."
        )
    if not bool(torch.isfinite(updates).all()):
        raise ValueError(f"{name} must be finite (no NaN or inf).")
    return updates


def audit_dp_fedavg(
    client_updates: torch.Tensor,
    *,
    max_update_norm: float,
    noise_multiplier: float,
    sample_rate: float,
    rounds: int,
    delta: float,
    num_canaries: int = 100,
    runs: int = 1,
    canary_norm: float | None = None,
    confidence: float = 0.95,
    aggregate: Aggregate = dp_fedavg_noisy_mean,
    seed: int | None = None,
    accountant: str = "rdp",
) -> CanaryClientAudit:
    r"""Audit DP-FedAvg with random canary clients: an estimate (Andrew et al.) and a bound.

    Each of ``runs`` independent runs draws ``num_canaries`` random unit directions :math:`u_i`,
    inserts each canary client (update :math:`c\, u_i`) into the population with probability 1/2,
    runs ``rounds`` rounds of ``aggregate`` on the real clients plus the inserted canaries (all
    Poisson-sampled with rate :math:`q` in every round), and scores each canary by the cosine of
    the sum of the released round updates with :math:`u_i`. The real updates are held fixed
    across rounds, as the gradients are in :func:`companion.audit.audit_dpsgd`. Returns the Andrew
    et al. (2024, ICLR) estimate, labelled as such, the Clopper-Pearson lower bound of
    :func:`companion.audit.threshold_audit` (inserted: positives; not inserted: negatives),
    with one run of several canaries the one-run bound of
    :func:`companion.audit.one_run_audit`, and the accountant's claim for ``rounds`` rounds (the
    privacy unit is one client).

    The estimate is very sensitive to the fitted std at small delta: two Gaussians with unequal
    variances have an unbounded privacy loss in the tails. For :math:`\mathcal N(0, 1)` against
    :math:`\mathcal N(1, s^2)` at :math:`\delta = 10^{-5}` it is 4.38 for :math:`s = 1`, 5.39 for
    :math:`s = 1.05` and 5.73 for :math:`s = 0.95`; with a few hundred canaries the std is only
    known to a few percent. So it can exceed the claim of a correct mechanism and is no test of
    the claim. The bounds are tests: the Clopper-Pearson bound with one canary per run, the
    one-run bound with one run of several.

    Args:
        client_updates: the real clients' updates, shape ``(K, d)``; ``d`` should be large
            (hundreds or more) for the cosine of a random direction to be nearly Gaussian.
        max_update_norm, noise_multiplier, sample_rate: the claimed :math:`S`, :math:`\sigma`,
            :math:`q`.
        rounds: rounds per run, >= 1.
        delta: in (0, 1).
        num_canaries: canaries per run, >= 1.
        runs: independent runs, >= 1. Together they need at least 4 inserted and 4 not inserted
            canaries (the threshold audit chooses its threshold on half of each and counts the
            other half).
        canary_norm: :math:`c`, > 0; by default :math:`10 S`, so that skipped clipping shows.
        confidence: of the bound, in (0, 1).
        aggregate: the round under audit, an ``Aggregate``; by default
            :func:`~companion.audit.dp_fedavg_noisy_mean` with ``expected_clients`` = :math:`qK`.
        seed: seed of the canaries, sampling and noise; ``None`` for fresh entropy.
        accountant: the accountant of the claim, ``"rdp"`` (the default) or the tighter ``"pld"``
            (as in :func:`~companion.audit.audit_dpsgd`).

    Returns:
        A :class:`CanaryClientAudit`.

    Raises:
        TypeError: if ``client_updates`` is not a floating tensor or array, or ``aggregate`` not
            callable.
        ValueError: if an argument is out of range, too few canaries were (or were not)
            inserted, or ``aggregate`` returns something other than a finite tensor ``(d,)``.

    Example:
        >>> import torch
        >>> updates = torch.randn(20, 500, generator=torch.Generator().manual_seed(0))
        >>> audit = audit_dp_fedavg(updates, max_update_norm=1.0, noise_multiplier=1.0,
        ...                         sample_rate=1.0, rounds=1, delta=1e-5, num_canaries=200,
        ...                         seed=0)
        >>> round(audit.inserted_mean / audit.null_std, 2)  # the canary's shift, in null stds
        1.02
        >>> round(audit.epsilon_estimate, 1), round(audit.claimed_epsilon, 2)
        (5.0, 4.73)

        Each canary adds :math:`\mu = 1` null std to its own cosine (its update, clipped to
        :math:`S`, against noise :math:`\sigma S` per coordinate); but the cosine divides by
        the norm of the whole sum, which holds the real clients and the other canaries too, so
        the expected shift is nearer 0.9 (over seeds it averages about 0.91). With a fitted
        std a few percent off, the estimate of 5.0 exceeds even the claim, as the paragraph
        above warns.
    """
    updates = _check_updates(client_updates)
    clip = check_positive("max_update_norm", max_update_norm)
    sigma = check_nonnegative("noise_multiplier", noise_multiplier)
    q = check_probability("sample_rate", sample_rate, allow_zero=False)
    rounds = check_positive_int("rounds", rounds)
    delta = check_delta(delta)
    num_canaries = check_positive_int("num_canaries", num_canaries)
    runs = check_positive_int("runs", runs)
    norm = 10.0 * clip if canary_norm is None else check_positive("canary_norm", canary_norm)
    confidence = check_confidence(confidence)
    accountant = check_accountant_name(accountant)
    aggregate = check_step(aggregate, "aggregate")
    clients, d = updates.shape
    expected = q * clients
    generator = torch_generator(seed, device=updates.device)
    name = getattr(aggregate, "__qualname__", type(aggregate).__name__)
    inserted_cos, other_cos = [], []
    for _ in range(runs):
        directions = torch.randn(
            num_canaries, d, generator=generator, dtype=updates.dtype, device=updates.device
        )
        directions /= directions.norm(dim=1, keepdim=True)
        inserted = torch.rand(num_canaries, generator=generator, device=updates.device) < 0.5
        population = torch.cat([updates, norm * directions[inserted]])
        total = torch.zeros(d, dtype=updates.dtype, device=updates.device)
        for _ in range(rounds):
            out = aggregate(
                population,
                max_update_norm=clip,
                noise_multiplier=sigma,
                sample_rate=q,
                expected_clients=expected,
                generator=generator,
            )
            total += check_release(out, d, f"aggregate {name}")
        cosines = (directions @ total) / total.norm().clamp_min(torch.finfo(total.dtype).tiny)
        inserted_cos.append(cosines[inserted].double().cpu().numpy())
        other_cos.append(cosines[~inserted].double().cpu().numpy())
    positive, negative = np.concatenate(inserted_cos), np.concatenate(other_cos)
    if min(positive.size, negative.size) < 4:
        raise ValueError(
            f"too few canaries to audit: {positive.size} inserted and {negative.size} not; "
            "increase num_canaries or runs (at least 4 of each are needed)."
        )
    audit = threshold_audit(positive, negative, delta=delta, confidence=confidence)
    one_run = None
    if runs == 1 and num_canaries > 1:  # the canaries in their order, as the coins chose them
        one_run = one_run_audit(
            cosines.double().cpu().numpy(), inserted.cpu().numpy(), delta=delta,
            confidence=confidence,
        )  # fmt: skip
    mean, std = float(positive.mean()), float(positive.std(ddof=1))
    null_std = 1.0 / math.sqrt(d)
    estimate = two_gaussians_epsilon(
        mean0=0.0, std0=null_std, mean1=mean, std1=max(std, 1e-12), delta=delta
    )
    mechanism = (
        f"{name}: {rounds} round(s) on {clients} real clients of dimension {d} (claimed "
        f"sigma={sigma}, S={clip}, q={q}, expected clients {expected}); canaries: random unit "
        f"directions times {norm}, each inserted with probability 1/2, then Poisson-sampled with "
        "q in every round; score: cosine of the sum of the released round updates with the "
        "canary direction"
    )
    return CanaryClientAudit(
        epsilon_lower_bound=audit.epsilon,
        epsilon_estimate=estimate,
        claimed_epsilon=claimed_epsilon(
            noise_multiplier=sigma, sample_rate=q, steps=rounds, delta=delta, accountant=accountant
        ),
        threshold_audit=audit,
        one_run=one_run,
        inserted_mean=mean,
        inserted_std=std,
        null_std=null_std,
        not_inserted_mean=float(negative.mean()),
        not_inserted_std=float(negative.std(ddof=1)),
        max_update_norm=clip,
        noise_multiplier=sigma,
        sample_rate=q,
        rounds=rounds,
        num_canaries=num_canaries,
        runs=runs,
        canary_norm=norm,
        independent_trials=num_canaries == 1,
        delta=delta,
        confidence=confidence,
        mechanism=mechanism,
        cosines_inserted=positive,
        cosines_not_inserted=negative,
    )
