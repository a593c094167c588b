r"""The likelihood-ratio attack (LiRA) of Carlini et al. 2022: membership inference per example.

The loss-threshold attack compares every example's loss with one threshold, yet some examples are
fitted well by every model (an easy digit) and some by none (an odd one): a single threshold
mistakes the first kind of non-member for a member and misses the second kind of member. Carlini,
Chien, Nasr, Song, Terzis and Tramèr 2022 ("Membership Inference Attacks From First Principles",
IEEE S&P) calibrate per example instead. For an example :math:`(x, y)` and the model's
logit-scaled confidence :math:`\phi` in it (:func:`~companion.attacks.logit_confidence`), they
compare two distributions over the randomness of training: :math:`\tilde Q_{\text{in}}(x, y)`, of
:math:`\phi` under models trained on random data sets that include the example, and
:math:`\tilde Q_{\text{out}}(x, y)`, under models trained without it. Both are estimated with
*shadow models* that the attacker trains itself, the same way as the target, on random halves of
a population of examples (:func:`shadow_confidences`), and both are fitted by Gaussians, which
suits :math:`\phi` far better than the raw confidence or the loss. With
:math:`\phi_{\text{obs}}` the target model's confidence, :func:`lira_scores` returns the log
likelihood ratio of the two Gaussians at :math:`\phi_{\text{obs}}` (online) or the log of the
OUT Gaussian's probability of a confidence at most :math:`\phi_{\text{obs}}` (offline), with
means and variances fitted per example (higher means "member"). The likelihood ratio is the most
powerful test of the two hypotheses for one example by the Neyman-Pearson lemma (under the
Gaussian fits); the offline score is the paper's one-sided test
against the OUT distribution alone, which needs no shadow model trained on the targets. With few
shadow models a per-example variance is poorly estimated, and Carlini et al. then use one
*global* variance for all examples (``global_variance=True``, the default here): the pooled
within-example variance of the IN (and, apart, of the OUT) confidences.

:func:`lira_attack` runs all of it against a model and returns a
:class:`~companion.attacks.MembershipAttackResult`: its ``tpr_at(0.001)`` and
``tpr_at(0.01)`` are the TPR at 0.1% and 1% FPR, and its ``plot()`` draws the log-log ROC curve.

Differences from the paper's code: one query per example (no augmented copies); the sample mean
and the unbiased sample variance (the code takes the median as the mean, and its global variance
is the spread of all confidences around their overall mean, not within examples); the offline
test is one-sided, as in the paper, not two-sided as in the code. As there, each example is in
exactly half of the shadow models.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy.special import log_ndtr
from torch import nn

from companion._progress import progress_bar
from companion._random import as_generator, check_optional_seed
from companion._torch import (
    ArrayLike,
    LossName,
    check_data,
    check_loss,
    check_model,
    check_pair,
)
from companion._validation import check_flag, check_int
from companion.attacks.membership import logit_confidence
from companion.attacks.roc import MembershipAttackResult

__all__ = ["lira_attack", "lira_scores", "shadow_confidences"]

#: ``train_fn(x, y, *, seed)``: build a fresh model, train it on the tensors ``(x, y)`` and return
#: it; ``seed`` (an int) is for its initial weights and any other randomness of training.
TrainFn = Callable[..., nn.Module]


def _check_num_shadow(num_shadow: object) -> int:
    num_shadow = check_int("num_shadow", num_shadow, minimum=4)
    if num_shadow % 2:
        raise ValueError(
            f"num_shadow must be even (each example is in exactly half of the shadow models), "
            f"got {num_shadow}."
        )
    return num_shadow


def _check_train_fn(train_fn: object) -> TrainFn:
    if not callable(train_fn):
        raise TypeError(
            "train_fn must be a function train_fn(x, y, *, seed) that returns a trained "
            f"torch.nn.Module, got {type(train_fn).__name__}."
        )
    return train_fn


def shadow_confidences(
    x: ArrayLike,
    y: ArrayLike,
    *,
    train_fn: TrainFn,
    num_shadow: int = 16,
    loss: LossName = "cross_entropy",
    seed: int | None = 0,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    r"""Train shadow models on random halves of a population and score every example with each.

    Each example is put in exactly ``num_shadow / 2`` of the shadow models' training sets, a
    random half of them drawn independently per example (so every example has as many IN as
    OUT models, and each shadow trains on about half the population). Shadow model :math:`s` is
    ``train_fn(x[in_s], y[in_s], seed=seed_s)``, and its logit-scaled confidence
    :func:`~companion.attacks.logit_confidence` is taken on every example of the population.

    The shadow models stand for the attacker's knowledge of how the target was trained, so
    ``train_fn`` should train as the target was trained (architecture, epochs, learning rate,
    DP-SGD and its noise if used) on as many examples. The randomness here is the attacker's
    own and public; ``seed`` defaults to 0 so that runs repeat (``None``: fresh entropy). When
    the target's members were chosen by coin flips for a one-run audit
    (:func:`companion.audit.one_run_audit`), draw those coins from another stream than the
    halves here (another seed): the audit needs the guesses to depend on the coins only through
    the target model.

    Args:
        x: the population's inputs, shape ``(N, n_features)`` (tensor or numpy array).
        y: its labels, shape ``(N,)``.
        train_fn: ``train_fn(x, y, *, seed)``: builds a new model, trains it on the tensors
            ``(x, y)`` and returns it; ``seed`` is an int for its weights and training.
        num_shadow: the number of shadow models, even and >= 4.
        loss: ``"cross_entropy"`` or ``"bce"``, as the models are trained.
        seed: seed of the halves and of the seeds given to ``train_fn``; ``None`` for fresh
            entropy.
        progress: show a tqdm progress bar over the shadow models.

    Returns:
        ``(shadow_phi, shadow_in)``: the confidences, float64 of shape ``(num_shadow, N)``, and
        which example was in which shadow model's training set, bool of the same shape.

    Raises:
        TypeError: if an argument has the wrong type, or ``train_fn`` does not return a module.
        ValueError: if the data are invalid, ``num_shadow`` is odd or below 4, the population
            is so small that a shadow model gets no example, or a model returns probabilities.

    Example:
        >>> from companion import data, models, training
        >>> digits = data.load_digits()
        >>> def train_fn(x, y, *, seed):
        ...     model = models.logistic_regression(seed=seed)
        ...     training.train(model, x, y, epochs=5, batch_size=20, lr=1.0, seed=seed)
        ...     return model
        >>> phi, shadow_in = shadow_confidences(digits.x_train[:40], digits.y_train[:40],
        ...                                     train_fn=train_fn, num_shadow=4)
        >>> phi.shape, shadow_in.sum(axis=0).tolist() == [2] * 40
        ((4, 40), True)
    """
    loss = check_loss(loss)
    x, y = check_data(x, y, loss=loss)
    train_fn = _check_train_fn(train_fn)
    num_shadow = _check_num_shadow(num_shadow)
    rng = as_generator(check_optional_seed(seed))
    n = x.shape[0]
    shadow_in = rng.random((num_shadow, n)).argsort(axis=0) < num_shadow // 2
    seeds = rng.integers(0, 2**31 - 1, size=num_shadow)
    if not shadow_in.any(axis=1).all():
        raise ValueError(
            f"a population of {n} examples is too small: a shadow model got no training "
            "example. Use more examples (or another seed)."
        )
    shadow_phi = np.empty((num_shadow, n))
    for s in progress_bar(range(num_shadow), progress=progress, desc="shadow models", unit="model"):
        keep = torch.from_numpy(shadow_in[s])
        model = train_fn(x[keep], y[keep], seed=int(seeds[s]))
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"train_fn must return the trained torch.nn.Module, got {type(model).__name__}."
            )
        try:
            shadow_phi[s] = logit_confidence(model, x, y, loss=loss)
        except ValueError as error:
            raise ValueError(
                f"the shadow model train_fn returned does not fit x and y: {error}"
            ) from None
    return shadow_phi, shadow_in


def _array(name: str, value: object, ndim: int, *, real: bool = True) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if not isinstance(value, np.ndarray):
        raise TypeError(
            f"{name} must be a numpy array or a torch.Tensor, got {type(value).__name__}."
        )
    real_dtype = np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer)
    if real and (value.dtype == bool or not real_dtype):
        raise TypeError(f"{name} must hold real numbers, got dtype {value.dtype}.")
    if value.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {value.shape}.")
    if value.size == 0:
        raise ValueError(f"{name} must not be empty.")
    return value


def _fit(phi: np.ndarray, mask: np.ndarray, global_variance: bool, side: str) -> tuple:
    """Per-example means and variances of the entries of ``phi`` where ``mask`` holds."""
    counts = mask.sum(axis=0)
    if (counts == 0).any():
        raise ValueError(
            f"every example needs at least one {side} shadow model; example "
            f"{int(np.argmin(counts))} has none."
        )
    means = np.where(mask, phi, 0.0).sum(axis=0) / counts
    squares = np.where(mask, (phi - means) ** 2, 0.0).sum(axis=0)
    if global_variance:
        dof = int((counts - 1).sum())
        if dof < 1:
            raise ValueError(
                f"a global variance needs two {side} confidences of one example at least."
            )
        variances = np.full(phi.shape[1], squares.sum() / dof)
    else:
        if (counts < 2).any():
            raise ValueError(
                f"a per-example variance needs at least two {side} shadow models per example; "
                f"example {int(np.argmin(counts))} has {int(counts.min())}. Use more shadow "
                "models or global_variance=True."
            )
        variances = squares / (counts - 1)
    if not (variances > 0).all():
        raise ValueError(
            f"the {side} confidences of an example do not vary over the shadow models, so no "
            "Gaussian can be fitted; are the shadow models identical?"
        )
    return means, variances


def _log_normal_pdf(value: np.ndarray, mean: np.ndarray, variance: np.ndarray) -> np.ndarray:
    return -0.5 * (np.log(2 * np.pi * variance) + (value - mean) ** 2 / variance)


def lira_scores(
    target_phi: np.ndarray,
    shadow_phi: np.ndarray,
    shadow_in: np.ndarray,
    *,
    online: bool = True,
    global_variance: bool = True,
) -> np.ndarray:
    r"""LiRA's score of every example from given confidences (Carlini et al. 2022).

    With :math:`\phi_{\text{obs}}` the target model's confidence in an example,

    .. math::
        :label: attacks-lira

        \text{online:}\quad \log \frac{\mathcal N(\phi_{\text{obs}};\, \mu_{\text{in}},
        \sigma_{\text{in}}^2)}{\mathcal N(\phi_{\text{obs}};\, \mu_{\text{out}},
        \sigma_{\text{out}}^2)},
        \qquad
        \text{offline:}\quad \log \Pr[Z \le \phi_{\text{obs}}] = \log \Phi\Bigl(
        \frac{\phi_{\text{obs}} - \mu_{\text{out}}}{\sigma_{\text{out}}}\Bigr),
        \quad Z \sim \mathcal N(\mu_{\text{out}}, \sigma_{\text{out}}^2).

    For example :math:`i`, the IN confidences are ``shadow_phi[s, i]`` with ``shadow_in[s, i]``
    and the OUT ones the others. Each set is fitted by a Gaussian: the sample mean, and either the
    unbiased sample variance (``global_variance=False``, at least two per example) or the pooled
    within-example variance :math:`\sum_i \sum_s (\phi_{si} - \mu_i)^2 / \sum_i (n_i - 1)`
    (``global_variance=True``), separately for IN and OUT.

    ``online=True`` returns the log likelihood ratio; where **no** shadow model was trained on
    any of the examples (``shadow_in`` all false) there is no IN distribution to fit, and the
    online test is the offline one, whose score is returned. A mask with IN models for some
    examples but none for others is refused, since the two kinds of score are not on one scale.

    Args:
        target_phi: the target model's confidence in each example, shape ``(N,)``.
        shadow_phi: the shadow models' confidences, shape ``(num_shadow, N)``.
        shadow_in: bool, shape ``(num_shadow, N)``: which example trained which shadow model.
        online: the likelihood ratio of IN and OUT (``True``) or the one-sided OUT test.
        global_variance: one variance for all examples (IN and OUT apart) instead of one each.

    Returns:
        The scores, float64 of shape ``(N,)``; higher means "member".

    Raises:
        TypeError: if an argument has the wrong type.
        ValueError: if the shapes disagree, a value is not finite, an example has too few IN or
            OUT confidences for the chosen fit, or the confidences do not vary.

    Example:
        >>> shadow_phi = np.array([[4.0, 1.0], [6.0, 3.0], [1.0, 5.0], [3.0, 7.0]])
        >>> shadow_in = np.array([[True, False], [True, False], [False, True], [False, True]])
        >>> # example 0: IN 4, 6 (mean 5), OUT 1, 3 (mean 2); pooled variances 2 (IN), 2 (OUT)
        >>> # example 1: IN 5, 7 (mean 6), OUT 1, 3 (mean 2). Scores (d_out^2 - d_in^2) / (2 * 2):
        >>> lira_scores(np.array([5.0, 4.0]), shadow_phi, shadow_in)  # (9 - 0) / 4, (4 - 4) / 4
        array([2.25, 0.  ])
    """
    target = _array("target_phi", target_phi, 1).astype(np.float64)
    phi = _array("shadow_phi", shadow_phi, 2).astype(np.float64)
    mask = _array("shadow_in", shadow_in, 2, real=False)
    if mask.dtype != bool:
        raise TypeError(f"shadow_in must be a bool array, got dtype {mask.dtype}.")
    if phi.shape[1] != target.size or mask.shape != phi.shape:
        raise ValueError(
            "shadow_phi and shadow_in must have shape (num_shadow, N) with N = target_phi's "
            f"{target.size} examples, got {phi.shape} and {mask.shape}."
        )
    if not (np.isfinite(target).all() and np.isfinite(phi).all()):
        raise ValueError("target_phi and shadow_phi must not contain NaN or infinite values.")
    online = check_flag("online", online)
    global_variance = check_flag("global_variance", global_variance)
    if online and not mask.any():
        online = False  # no IN model for any example: the online test is the offline test
    if online and not mask.any(axis=0).all():
        raise ValueError(
            "shadow_in gives IN shadow models for some examples and none for others; the "
            "online and offline scores are not on one scale. Give every example IN models, or "
            "use online=False."
        )
    mu_out, var_out = _fit(phi, ~mask, global_variance, "OUT")
    if not online:
        return log_ndtr((target - mu_out) / np.sqrt(var_out))
    mu_in, var_in = _fit(phi, mask, global_variance, "IN")
    return _log_normal_pdf(target, mu_in, var_in) - _log_normal_pdf(target, mu_out, var_out)


def lira_attack(
    model: nn.Module,
    members: tuple[ArrayLike, ArrayLike],
    nonmembers: tuple[ArrayLike, ArrayLike],
    *,
    train_fn: TrainFn,
    num_shadow: int = 16,
    online: bool = True,
    global_variance: bool = True,
    loss: LossName = "cross_entropy",
    seed: int | None = 0,
    progress: bool = False,
) -> MembershipAttackResult:
    r"""The likelihood-ratio membership attack (LiRA) of Carlini et al. 2022 against ``model``.

    The population is ``members`` followed by ``nonmembers``; the target model is assumed to
    have been trained on the members, about half of it, with ``train_fn``'s procedure. Shadow
    models are trained on random halves of the population (:func:`shadow_confidences`), every
    example is scored by :func:`lira_scores` from the target's confidence
    (:func:`~companion.attacks.logit_confidence`) and the shadows', and the scores give the ROC
    curve. Called with the same ``model``, ``members`` and ``nonmembers``, it is directly
    comparable with :func:`~companion.attacks.loss_threshold_attack`.

    Cost: ``num_shadow`` trainings. Carlini et al. train up to 256 shadow models; with 16 and the
    global variance the attack already finds members with confidence that the loss attack
    misses (``tests/test_lira.py`` measures it). The offline variant here uses the OUT half of
    the same shadows; to train shadows without the targets at all, use the pieces.

    Args:
        model: the attacked classifier, returning logits.
        members: ``(x, y)``, the examples the model was trained on (numpy arrays or tensors).
        nonmembers: ``(x, y)``, examples of the same distribution that were not.
        train_fn: ``train_fn(x, y, *, seed)``: builds a new model, trains it on the tensors
            ``(x, y)`` as the target was trained, and returns it.
        num_shadow: the number of shadow models, even and >= 4.
        online: the online (likelihood ratio) or the offline (one-sided) variant.
        global_variance: one variance for all examples, for few shadow models (< 64).
        loss: ``"cross_entropy"`` or ``"bce"``, as the models are trained.
        seed: seed of the shadow models' halves and seeds (the attacker's public randomness);
            ``None`` for fresh entropy.
        progress: show a tqdm progress bar over the shadow models.

    Returns:
        The :class:`~companion.attacks.MembershipAttackResult` of the LiRA scores.

    Raises:
        TypeError: if an argument has the wrong type.
        ValueError: if the data are invalid or do not fit the model, ``num_shadow`` is odd or
            below 4, or a model returns probabilities instead of logits.

    Example:
        >>> from companion import data, models, training
        >>> digits = data.load_digits()
        >>> def train_fn(x, y, *, seed):
        ...     model = models.logistic_regression(seed=seed)
        ...     training.train(model, x, y, epochs=30, batch_size=30, lr=1.0, seed=seed)
        ...     return model
        >>> members = digits.x_train[:60], digits.y_train[:60]
        >>> nonmembers = digits.x_test[:60], digits.y_test[:60]
        >>> target = train_fn(*members, seed=100)
        >>> result = lira_attack(target, members, nonmembers, train_fn=train_fn, num_shadow=4)
        >>> result.member_scores.shape, bool(result.auc > 0.5)
        ((60,), True)
    """
    model = check_model(model)
    loss = check_loss(loss)
    xm, ym = check_pair("members", members, loss=loss)
    xn, yn = check_pair("nonmembers", nonmembers, loss=loss)
    if xm.shape[1:] != xn.shape[1:]:
        raise ValueError(
            f"members x and nonmembers x must have the same shape per example, got "
            f"{tuple(xm.shape[1:])} and {tuple(xn.shape[1:])}."
        )
    _check_num_shadow(num_shadow)
    check_flag("online", online)
    check_flag("global_variance", global_variance)
    x, y = torch.cat([xm, xn]), torch.cat([ym, yn])
    target_phi = logit_confidence(model, x, y, loss=loss)
    shadow_phi, shadow_in = shadow_confidences(
        x, y, train_fn=train_fn, num_shadow=num_shadow, loss=loss, seed=seed, progress=progress
    )
    scores = lira_scores(
        target_phi, shadow_phi, shadow_in, online=online, global_variance=global_variance
    )
    return MembershipAttackResult.from_scores(scores[: xm.shape[0]], scores[xm.shape[0] :])
