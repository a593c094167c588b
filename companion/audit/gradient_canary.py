r"""White-box audit of DP-SGD steps with a gradient canary (Nasr et al. 2021, 2023).

The strongest adversary of DP-SGD's analysis controls one example's *gradient* and sees every
noisy update (Nasr, Song, Thakurta, Papernot and Carlini 2021, "Adversary Instantiation: Lower
Bounds for Differentially Private Machine Learning", IEEE S&P; Nasr, Hayes, Steinke,
Balle, Tramèr, Jagielski, Carlini and Terzis 2023, "Tight Auditing of Differentially Private
Machine Learning", USENIX Security). The auditor here plays that adversary:

1. The data set :math:`D` is given by its per-example gradients :math:`g_1, \dots, g_n`
   (rows of a matrix). The neighbour :math:`D' = D \cup \{\text{canary}\}` adds one row, a
   *Dirac canary* :math:`c\, e_j`: norm :math:`c \ge C` on a single coordinate :math:`j`, by
   default the coordinate the real gradients touch least (for logistic regression on the
   digits, the weight of a pixel that is always 0).
2. A trial runs ``steps`` independent noisy steps on :math:`D` or on :math:`D'` and records the
   score :math:`s = \sum_t \langle \tilde g_t, e_j \rangle`, the sum over steps of coordinate
   :math:`j` of the released noisy sum. Each step Poisson-samples the rows again, so the canary
   is in a step's batch with probability :math:`q`, exactly as the accountant assumes. The
   gradients are held fixed across steps: DP-SGD's guarantee holds for any gradients, adaptively
   chosen, so fixing them is allowed and only removes noise the auditor does not need.
3. The scores of many trials with and without the canary go to
   :func:`companion.audit.threshold_audit`, which picks a threshold on half of them and turns
   the other half into a Clopper-Pearson lower bound on epsilon.

For a correct step the canary moves the score by at most :math:`C` per step in which it is
sampled, against noise of standard deviation :math:`\sigma C`, so the bound stays below the
accountant's epsilon in at least a fraction ``confidence`` of audits. A step that adds too
little noise, or does not clip (the canary then moves the score by :math:`c > C`), is caught
once the bound exceeds the claim. With :math:`q = 1` and one step the score is exactly the
Gaussian mechanism with sensitivity :math:`C`, and the audit is tight up to the number of
trials (Nasr et al. 2023).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from companion._random import torch_generator
from companion._validation import (
    check_accountant_name,
    check_delta,
    check_int,
    check_nonnegative,
    check_positive,
    check_positive_int,
    check_probability,
)
from companion.accounting import PLDAccountant, RDPAccountant
from companion.audit.bounds import ThresholdAudit, check_confidence, threshold_audit
from companion.dpsgd import add_gaussian_noise, poisson_sample
from companion.per_example import clip_factors

__all__ = ["GradientCanaryAudit", "NoisyStep", "audit_dpsgd", "dpsgd_noisy_sum"]

#: One noisy step under audit: ``step(gradients, *, noise_multiplier, max_grad_norm, sample_rate,
#: generator)`` takes the per-example gradients of the whole data set, shape ``(n, d)``, and
#: returns the released vector of shape ``(d,)``.
NoisyStep = Callable[..., torch.Tensor]


def dpsgd_noisy_sum(
    gradients: torch.Tensor,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    sample_rate: float,
    generator: torch.Generator,
) -> torch.Tensor:
    r"""One DP-SGD step on per-example gradients: sample, clip, sum, add noise.

    .. math::

        \tilde g = \sum_{i \in B} g_i \min\Bigl(1, \frac{C}{\lVert g_i \rVert + 10^{-6}}\Bigr)
        + \mathcal N(0, \sigma^2 C^2 I), \qquad i \in B \text{ with probability } q,

    built from :func:`companion.dpsgd.poisson_sample`, :func:`companion.per_example.clip_factors`
    and :func:`companion.dpsgd.add_gaussian_noise` (Abadi et al. 2016, Algorithm 1, before the
    division by the expected batch size, which does not change an audit). The default mechanism of
    :func:`~companion.audit.audit_dpsgd`; write another function with the same signature to audit a
    different implementation.

    Args:
        gradients: per-example gradients of the whole data set, a float tensor of shape
            ``(n, d)``.
        noise_multiplier: :math:`\sigma`, >= 0.
        max_grad_norm: :math:`C`, > 0.
        sample_rate: :math:`q`, in (0, 1].
        generator: the :class:`torch.Generator` for sampling and noise (its seed is a secret).

    Returns:
        The noisy sum, shape ``(d,)``.

    Raises:
        ValueError: if a privacy parameter is out of range.

    Example:
        >>> import torch
        >>> g = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
        >>> dpsgd_noisy_sum(g, noise_multiplier=0.0, max_grad_norm=1.0, sample_rate=1.0,
        ...                 generator=torch.Generator().manual_seed(0))
        tensor([0.9000, 1.2000])
    """
    mask = poisson_sample(gradients.shape[0], sample_rate=sample_rate, generator=generator)
    batch = gradients[mask]
    factors = clip_factors(batch.norm(dim=1), max_grad_norm=max_grad_norm)
    sums = {"sum": (factors[:, None] * batch).sum(dim=0)}
    add_gaussian_noise(sums, std=noise_multiplier * max_grad_norm, generator=generator)
    return sums["sum"]


@dataclass(frozen=True)
class GradientCanaryAudit:
    """The result of :func:`~companion.audit.audit_dpsgd`: the bound, the claim and everything
    assumed.

    Attributes:
        epsilon: the empirical lower bound on epsilon (from ``threshold_audit``).
        claimed_epsilon: what the accountant (``accountant``, RDP by default) claims for ``steps``
            steps at this ``noise_multiplier``, ``sample_rate`` and ``delta``.
        threshold_audit: counts, threshold and how it was chosen (a
            :class:`companion.audit.ThresholdAudit`).
        noise_multiplier, max_grad_norm, sample_rate, steps: the claimed mechanism.
        trials: trials per world (with and without the canary); half chose the threshold.
        canary_norm, canary_coordinate: the Dirac canary.
        delta, confidence: of the bound.
        mechanism: a description of the step audited and of the score.
        scores_with, scores_without: the score of every trial, in order.
    """

    epsilon: float
    claimed_epsilon: float
    threshold_audit: ThresholdAudit
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    trials: int
    canary_norm: float
    canary_coordinate: int
    delta: float
    confidence: float
    mechanism: str
    scores_with: np.ndarray = field(repr=False, compare=False)
    scores_without: np.ndarray = field(repr=False, compare=False)


def _check_gradients(gradients: object) -> torch.Tensor:
    if isinstance(gradients, np.ndarray):
        gradients = torch.from_numpy(gradients)
    if not isinstance(gradients, torch.Tensor):
        raise TypeError(
            f"gradients must be a torch.Tensor or numpy array of shape (n, d), "
            f"got {type(gradients).__name__}."
        )
    if gradients.ndim != 2 or 0 in gradients.shape:
        raise ValueError(
            f"gradients must have shape (n, d) with n, d >= 1, got {tuple(gradients.shape)}."
        )
    if not gradients.is_floating_point():
        raise TypeError(f"gradients must be floating point, got dtype {gradients.dtype}.")
    if not bool(torch.isfinite(gradients).all()):
        raise ValueError("gradients must be finite (no NaN or inf).")
    return gradients


def check_step(step: object, name: str = "step") -> NoisyStep:
    """Check that the mechanism under audit (a step or an aggregation round) is callable.

    Shared by :func:`~companion.audit.audit_dpsgd` and :func:`companion.audit.audit_dp_fedavg`.

    Args:
        step: the object to check.
        name: the argument's name, for the message.

    Returns:
        ``step`` unchanged.

    Raises:
        TypeError: if ``step`` is not callable.

    Example:
        >>> check_step(dpsgd_noisy_sum) is dpsgd_noisy_sum
        True
    """
    if not callable(step):
        raise TypeError(f"{name} must be a callable, got {type(step).__name__}.")
    return step


def check_release(output: object, d: int, name: str) -> torch.Tensor:
    """Check what a mechanism under audit released: a finite tensor of shape ``(d,)``.

    Args:
        output: what the step returned.
        d: the dimension of the gradients (or updates).
        name: how to call the step in the message.

    Returns:
        ``output`` unchanged.

    Raises:
        ValueError: if ``output`` is not a tensor of shape ``(d,)`` or has NaN or inf entries.

    Example:
        >>> import torch
        >>> check_release(torch.zeros(3), 3, "step").shape
        torch.Size([3])
    """
    if not isinstance(output, torch.Tensor) or tuple(output.shape) != (d,):
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ValueError(f"{name} must return a tensor of shape ({d},), got {shape}.")
    if not bool(torch.isfinite(output).all()):
        raise ValueError(f"{name} returned a tensor with NaN or inf entries.")
    return output


def claimed_epsilon(
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """The epsilon an accountant claims for ``steps`` steps.

    Each step is the Poisson-subsampled Gaussian mechanism with these parameters; the audits
    compare their lower bounds with this claim. :class:`companion.accounting.RDPAccountant`
    (Mironov, Talwar and Zhang 2019) is an upper bound that is loose by a few percent or more;
    :class:`companion.accounting.PLDAccountant` is close to the exact epsilon, so a bug that
    raises the true epsilon a little above what is claimed is nearer to showing against it.

    Args:
        noise_multiplier: >= 0.
        sample_rate: in (0, 1].
        steps: >= 1.
        delta: in (0, 1).
        accountant: ``"rdp"`` (the default) or ``"pld"``.

    Returns:
        Epsilon at ``delta``.

    Raises:
        ValueError: if an argument is out of range.

    Example:
        >>> [round(claimed_epsilon(noise_multiplier=1.0, sample_rate=1.0, steps=1, delta=1e-5,
        ...                        accountant=name), 2) for name in ("rdp", "pld")]
        [4.73, 4.38]
    """
    kind = {"rdp": RDPAccountant, "pld": PLDAccountant}[check_accountant_name(accountant)]
    claim = kind()
    claim.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
    return claim.get_epsilon(delta)


def audit_dpsgd(
    gradients: torch.Tensor,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    sample_rate: float,
    delta: float,
    trials: int = 1000,
    steps: int = 1,
    canary_norm: float | None = None,
    canary_coordinate: int | None = None,
    confidence: float = 0.95,
    step: NoisyStep = dpsgd_noisy_sum,
    seed: int | None = None,
    accountant: str = "rdp",
) -> GradientCanaryAudit:
    r"""Empirical lower bound on the epsilon of DP-SGD steps, from a Dirac gradient canary.

    Runs ``trials`` independent trials on the data set :math:`D` (the rows of ``gradients``) and
    ``trials`` on :math:`D' = D \cup \{c\, e_j\}`; each trial applies ``step`` ``steps`` times and
    scores :math:`s = \sum_t \tilde g_t[j]`. The first half of the trials of each world chooses a
    threshold, the second half gives a Clopper-Pearson lower bound
    (:func:`companion.audit.threshold_audit`; Jagielski, Ullman and Oprea 2020). With
    probability at least ``confidence`` a mechanism that really is
    :math:`(\varepsilon, \delta)`-DP gives a bound below :math:`\varepsilon`; a bound above the
    accountant's claim means the implementation does not do what the accountant assumes (Nasr et
    al. 2021, "Adversary Instantiation", IEEE S&P; Nasr et al. 2023, "Tight Auditing of
    Differentially Private Machine Learning", USENIX Security). What the audit cannot show: that
    a mechanism *is* private; and it cannot certify more than about
    :math:`\log(\text{trials} / (2 \log(2 / (1 - \text{confidence}))))` whatever the mechanism.

    Args:
        gradients: per-example gradients of the data set, shape ``(n, d)`` (for instance of
            :func:`companion.models.logistic_regression` on the digits, flattened).
        noise_multiplier, max_grad_norm, sample_rate: the claimed :math:`\sigma`, :math:`C`,
            :math:`q`, passed to ``step`` and to the accountant.
        delta: the delta of the claim, in (0, 1).
        trials: trials per world, >= 4 (half choose the threshold).
        steps: steps per trial, >= 1 (their scores are summed: the composition of ``steps``
            steps, compared with the accountant's epsilon for ``steps`` steps). With
            :math:`q < 1` the sum is a weak test (the canary is in a random subset of the steps):
            for :math:`q = 0.1`, :math:`\sigma = 1`, 10 steps, 500 trials, noise divided by 4
            gave 1.14 against a claim of 3.44 here, so that bug went unseen.
        canary_norm: :math:`c`, > 0; by default :math:`10 C`, so that a step that skips clipping
            shows. A correct step clips it to :math:`C` anyway.
        canary_coordinate: :math:`j`; by default the coordinate with the smallest sum of
            squared gradients (the first such one). DP protects every example against an
            adversary who knows all the others, so choosing :math:`j` from the data is allowed.
        confidence: of the bound, in (0, 1).
        step: the mechanism under audit, a ``NoisyStep``; by default
            :func:`~companion.audit.dpsgd_noisy_sum`.
        seed: seed of the audit's sampling and noise (the step's ``generator``); ``None`` for
            fresh entropy. Fix it to reproduce an audit.
        accountant: the accountant of the claim, ``"rdp"`` (the default) or ``"pld"``
            (:class:`companion.accounting.PLDAccountant`), which is tighter: close to the exact
            epsilon, where RDP's upper bound is a few percent or more above it.

    Returns:
        A :class:`GradientCanaryAudit`.

    Raises:
        TypeError: if ``gradients`` is not a floating tensor or array, or ``step`` not callable.
        ValueError: if an argument is out of range, or ``step`` returns something that is not a
            finite tensor of shape ``(d,)``.

    Example:
        >>> import torch
        >>> g = torch.randn(50, 20, generator=torch.Generator().manual_seed(0))
        >>> audit = audit_dpsgd(g, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=1.0,
        ...                     delta=1e-5, trials=200, seed=0)
        >>> round(audit.epsilon, 2), round(audit.claimed_epsilon, 2)
        (0.24, 4.73)
    """
    gradients = _check_gradients(gradients)
    sigma = check_nonnegative("noise_multiplier", noise_multiplier)
    clip = check_positive("max_grad_norm", max_grad_norm)
    q = check_probability("sample_rate", sample_rate, allow_zero=False)
    delta = check_delta(delta)
    trials = check_int("trials", trials, minimum=4)
    steps = check_positive_int("steps", steps)
    confidence = check_confidence(confidence)
    step = check_step(step)
    accountant = check_accountant_name(accountant)
    n, d = gradients.shape
    norm = 10.0 * clip if canary_norm is None else check_positive("canary_norm", canary_norm)
    if canary_coordinate is None:
        j = int(torch.argmin((gradients.double() ** 2).sum(dim=0)))
    else:
        j = check_int("canary_coordinate", canary_coordinate, minimum=0)
        if j >= d:
            raise ValueError(f"canary_coordinate must be < d = {d}, got {j}.")
    canary = torch.zeros(1, d, dtype=gradients.dtype, device=gradients.device)
    canary[0, j] = norm
    generator = torch_generator(seed, device=gradients.device)
    name = getattr(step, "__qualname__", type(step).__name__)
    scores = np.empty((2, trials))
    for world, data in enumerate((gradients, torch.cat([gradients, canary]))):
        for trial in range(trials):
            total = 0.0
            for _ in range(steps):
                out = step(
                    data,
                    noise_multiplier=sigma,
                    max_grad_norm=clip,
                    sample_rate=q,
                    generator=generator,
                )
                total += float(check_release(out, d, f"step {name}")[j])
            scores[world, trial] = total
    audit = threshold_audit(scores[1], scores[0], delta=delta, confidence=confidence)
    mechanism = (
        f"{name}: {steps} step(s) on {n} per-example gradients of dimension {d} "
        f"(claimed sigma={sigma}, C={clip}, q={q}); neighbour: one more row, a Dirac canary of "
        f"norm {norm} at coordinate {j}, Poisson-sampled like every row; score: the sum over "
        "steps of coordinate j of the released vector"
    )
    return GradientCanaryAudit(
        epsilon=audit.epsilon,
        claimed_epsilon=claimed_epsilon(
            noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta, accountant=accountant
        ),
        threshold_audit=audit,
        noise_multiplier=sigma,
        max_grad_norm=clip,
        sample_rate=q,
        steps=steps,
        trials=trials,
        canary_norm=norm,
        canary_coordinate=j,
        delta=delta,
        confidence=confidence,
        mechanism=mechanism,
        scores_with=scores[1],
        scores_without=scores[0],
    )
