r"""Membership inference from a model's outputs: the per-example signals and the loss attack.

- :func:`logit_confidence`: each example's logit-scaled confidence in its true label,
  :math:`\phi = \log\bigl(p / (1 - p)\bigr)`, the signal of :func:`companion.attacks.lira_attack`.
- :func:`loss_threshold_attack`: the attack of Yeom, Giacomelli, Fredrikson and Jha 2018.

Both signals are computed from the model's **logits**. A model whose outputs are probabilities
(one that ends in a softmax or a sigmoid) would be scored wrongly without any visible sign, so the
functions here refuse it with a ``ValueError`` (see :func:`logit_confidence`). Attacks return a
:class:`~companion.attacks.MembershipAttackResult` (``companion.attacks.roc``); the
hypothesis-test view of membership inference and the DP bound on the ROC curve are in
:mod:`companion.attacks`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from companion._outputs import looks_like_probabilities, run_model
from companion._torch import (
    EVAL_BATCH,
    ArrayLike,
    LossName,
    check_data,
    check_loss,
    check_model,
    check_pair,
    eval_mode,
    loss_fn,
    model_device,
)
from companion._validation import warn
from companion.attacks.roc import MembershipAttackResult

__all__ = ["logit_confidence", "loss_threshold_attack"]


# --- per-example signals ------------------------------------------------------------------------


def _last_layer(model: nn.Module) -> nn.Module:
    """The last layer of a (nested) :class:`torch.nn.Sequential`, else the model itself."""
    while isinstance(model, nn.Sequential) and len(model) > 0:
        model = model[-1]
    return model


def _warn_if_unit_interval(outputs: list[torch.Tensor], name: str) -> None:
    """Warn when 8 or more examples' outputs, over all of ``outputs``, lie in [0, 1].

    A warning, not an error: logits can all lie in [0, 1] (weak positive predictions), the less
    likely the more examples there are; with fewer than 8 it stays silent.
    """
    if sum(out.shape[0] for out in outputs) < 8:
        return
    if all(((out >= 0) & (out <= 1)).all() for out in outputs):
        warn(
            f"the model's outputs on {name} all lie in [0, 1], as probabilities do; if the "
            "model applies a sigmoid, the attack reads probabilities as logits and its losses "
            "and confidences are wrong (squashed into an interval of width 1). Remove the "
            "sigmoid: the loss applies the softmax or sigmoid itself."
        )


def _logits(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, loss: str, name: str
) -> torch.Tensor:
    """The model's outputs on ``x`` in float64, checked to be logits that fit the labels.

    Runs in evaluation mode without gradients.
    """
    last = _last_layer(model)
    if isinstance(last, nn.Softmax | nn.Sigmoid):
        raise ValueError(
            f"model ends in {type(last).__name__}, so it returns probabilities, but the attack "
            "needs logits (the scores before the softmax or sigmoid): a probability read as a "
            "logit gives wrong losses and confidences (squashed into an interval of width about "
            "1). Drop the last layer (the loss applies the softmax or sigmoid itself), or end "
            "in LogSoftmax, whose outputs give "
            "the same losses as logits."
        )
    outputs = torch.cat([run_model(model, part) for part in x.split(EVAL_BATCH)])
    if loss == "cross_entropy":
        if outputs.ndim != 2 or outputs.shape[0] != x.shape[0] or outputs.shape[1] < 2:
            raise ValueError(
                "for loss='cross_entropy' the model must return logits of shape (N, n_classes) "
                f"with n_classes >= 2, got {tuple(outputs.shape)} for {name}."
            )
        if int(y.max()) >= outputs.shape[1]:
            raise ValueError(
                f"labels must be below the model's {outputs.shape[1]} outputs for "
                f"loss='cross_entropy', got a label {int(y.max())} in the labels of {name}."
            )
        if looks_like_probabilities(outputs):
            raise ValueError(
                f"the model's outputs on {name} look like probabilities (every row is "
                "non-negative and sums to 1), but the attack needs logits (the scores before "
                "the softmax): a probability read as a logit gives wrong losses and confidences. "
                "Remove the final softmax, or return log-probabilities (log_softmax), "
                "which give the same losses as logits."
            )
    elif outputs.reshape(-1).shape[0] != x.shape[0]:
        raise ValueError(
            f"for loss='bce' the model must return one logit per example, got "
            f"{tuple(outputs.shape)} for {name}."
        )
    # float64: a confident prediction's loss, log(1 + sum_k exp(-margin_k)), underflows to 0 in
    # float32 once the margins exceed about 17, which would tie the examples the attack is
    # surest of.
    return outputs.double()


def _per_example_losses(
    outputs: torch.Tensor, y: torch.Tensor, *, loss: str, name: str
) -> np.ndarray:
    """Each example's loss in float64, from the outputs of :func:`_logits`."""
    values = loss_fn(loss, reduction="none")(outputs, y).reshape(-1).cpu().numpy()
    if not np.isfinite(values).all():
        raise ValueError(f"the model's loss on {name} is NaN or infinite for some examples.")
    return values


def _confidences(z: torch.Tensor, y: torch.Tensor, *, loss: str, name: str) -> np.ndarray:
    """Each example's logit-scaled confidence in float64, from the outputs of :func:`_logits`."""
    if loss == "cross_entropy":
        rows = torch.arange(z.shape[0], device=z.device)
        true = z[rows, y]
        others = z.clone()
        others[rows, y] = -torch.inf
        phi = true - torch.logsumexp(others, dim=1)
    else:  # one logit z of class 1: phi = z for label 1, -z for label 0
        phi = torch.where(y.reshape(-1) > 0.5, z.reshape(-1), -z.reshape(-1))
    values = phi.cpu().numpy()
    if not np.isfinite(values).all():
        raise ValueError(f"the model's confidence on {name} is NaN or infinite for some examples.")
    return values


def logit_confidence(
    model: nn.Module, x: ArrayLike, y: ArrayLike, *, loss: LossName = "cross_entropy"
) -> np.ndarray:
    r"""Each example's logit-scaled confidence in its true label, :math:`\log(p_y / (1 - p_y))`.

    Carlini et al. 2022 (Section IV.B) score a model's confidence :math:`p_y =
    \mathrm{softmax}(z)_y` in the true label :math:`y` through the logit function, because
    over models trained with and without an example, :math:`p_y` piles up near 1 while

    .. math::
        :label: attacks-logit-confidence

        \phi(x, y) = \log \frac{p_y}{1 - p_y} = z_y - \log \sum_{k \ne y} e^{z_k}

    is close to Gaussian, which is what :func:`companion.attacks.lira_scores` fits. The right
    side is computed from the logits :math:`z` in float64; unlike :math:`p_y` it never rounds
    to 1, so confident predictions stay distinct. For ``loss="bce"`` (one logit :math:`z` for
    class 1) it is :math:`z` for label 1 and :math:`-z` for label 0. It is the negative loss
    minus :math:`\log(1 - p_y)`: both rank one model's examples alike, but :math:`\phi` stays
    informative where the loss is already 0 to machine precision.

    **Logits, not probabilities.** A model that returns probabilities (ending in a softmax or a
    sigmoid) would give a silently wrong :math:`\phi`, so it is refused: a
    :class:`torch.nn.Sequential` whose last layer is :class:`torch.nn.Softmax` or
    :class:`torch.nn.Sigmoid`, and, for ``loss="cross_entropy"``, outputs whose rows are all
    non-negative and sum to 1. Log-probabilities (a final ``LogSoftmax``) are fine: they are
    logits shifted by a constant per example, and :math:`\phi` does not change. A sigmoid
    applied inside a hand-written ``forward`` with ``loss="bce"`` cannot be told for sure from
    logits that happen to lie in [0, 1], so outputs of 8 or more examples all in [0, 1] give a
    ``UserWarning``, not an error.

    The model is evaluated without gradients in evaluation mode and given back its mode; its
    parameters are not changed.

    Args:
        model: a classifier returning logits.
        x: inputs, shape ``(N, n_features)`` (tensor or numpy array).
        y: labels, shape ``(N,)``: integer classes, or 0/1 for ``loss="bce"``.
        loss: ``"cross_entropy"`` (one logit per class, at least two) or ``"bce"`` (one logit).

    Returns:
        :math:`\phi` of every example, a float64 array of shape ``(N,)``.

    Raises:
        TypeError: if ``model`` is not a module or the data have the wrong types.
        ValueError: if ``loss`` is unknown, the data are invalid, the labels do not fit the
            model, or the model returns probabilities instead of logits.

    Example:
        >>> from torch import nn
        >>> model = nn.Linear(2, 3, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.eye(3, 2))
        >>> # logits (2, 0, 0): phi = 2 - log(e^0 + e^0) = 2 - log 2
        >>> logit_confidence(model, np.array([[2.0, 0.0]]), np.array([0]))
        array([1.30685282])
        >>> logit_confidence(nn.Sequential(model, nn.Softmax(dim=1)), np.array([[2.0, 0.0]]),
        ...                  np.array([0]))
        Traceback (most recent call last):
        ...
        ValueError: model ends in Softmax, so it returns probabilities, but the attack needs ...
    """
    model = check_model(model)
    loss = check_loss(loss)
    x, y = check_data(x, y, loss=loss, device=model_device(model))
    with eval_mode(model), torch.no_grad():
        z = _logits(model, x, y, loss=loss, name="x")
    _warn_if_unit_interval([z], "x")
    return _confidences(z, y, loss=loss, name="x")


# --- the loss-threshold attack ------------------------------------------------------------------


def loss_threshold_attack(
    model: nn.Module,
    members: tuple[ArrayLike, ArrayLike],
    nonmembers: tuple[ArrayLike, ArrayLike],
    *,
    loss: LossName = "cross_entropy",
) -> MembershipAttackResult:
    r"""The loss-threshold membership-inference attack of Yeom et al. 2018.

    A model is trained to make its loss small *on its training set*; unless it generalises
    perfectly, its loss on the training examples (members) is smaller than on unseen examples
    (non-members) from the same distribution. Yeom, Giacomelli, Fredrikson and Jha 2018
    ("Privacy Risk in Machine Learning: Analyzing the Connection to Overfitting", IEEE CSF)
    therefore guess "member" when the loss is below a threshold. Here every example gets the
    score

    .. math::
        :label: attacks-loss-score

        s(x, y) = -\ell(\theta; x, y)

    and the threshold is swept over all values, which gives the whole ROC curve
    (:class:`MembershipAttackResult`); the attacker needs only the model's outputs and the true
    labels. The attack's advantage is tied to overfitting: for a loss bounded by :math:`B`, a
    randomised version of it has advantage exactly the generalisation gap (expected test loss
    minus expected training loss) divided by :math:`B` (Yeom et al. 2018, Theorem 2). Its
    weakness is a single threshold for all examples: an unusual non-member may have a high loss
    anyway and an easy one a low loss, so at small false-positive rates it does far worse than
    attacks that calibrate per example (:func:`companion.attacks.lira_attack`, Carlini et al.
    2022).

    The losses are computed without gradients with the model in evaluation mode, which is
    restored afterwards, and in float64 (from the model's logits) so that very confident
    predictions do not all tie at a loss of 0. The model's parameters are not changed. A model
    that returns probabilities instead of logits is refused or warned about (see
    :func:`logit_confidence`; the warning counts the members and non-members together):
    the cross-entropy of probabilities read as logits lies between 1.46 and 2.46 for ten
    classes whatever the model, so the reported losses would be meaningless.

    Args:
        model: the attacked classifier, returning logits.
        members: ``(x, y)``, examples that were in the training set; numpy arrays or tensors,
            inputs of shape ``(N, n_features)`` and labels of shape ``(N,)``.
        nonmembers: ``(x, y)``, examples from the same distribution that were not.
        loss: ``"cross_entropy"`` (integer class labels) or ``"bce"`` (one logit, labels 0/1),
            the loss the model was trained with.

    Returns:
        The :class:`MembershipAttackResult`, with scores :math:`-\ell` (higher means "member").

    Raises:
        TypeError: if ``model`` is not a :class:`torch.nn.Module`, ``members`` or
            ``nonmembers`` is not an ``(x, y)`` pair, or the data have the wrong types.
        ValueError: if ``loss`` is unknown, a set is empty or its ``x`` and ``y`` differ in
            length, the inputs are not finite, the labels do not fit the model, or the model
            returns probabilities instead of logits.

    Example:
        >>> from companion import data, models, training
        >>> digits = data.load_digits()
        >>> x, y = digits.x_train[:100], digits.y_train[:100]
        >>> model = models.logistic_regression(seed=0)
        >>> _ = training.train(model, x, y, epochs=100, batch_size=100, lr=1.0)
        >>> result = loss_threshold_attack(model, (x, y), (digits.x_test[:100],
        ...                                                digits.y_test[:100]))
        >>> result.member_scores.shape, bool(result.auc > 0.5)
        ((100,), True)
    """
    model = check_model(model)
    loss = check_loss(loss)
    device = model_device(model)
    member_data = check_pair("members", members, loss=loss, device=device)
    nonmember_data = check_pair("nonmembers", nonmembers, loss=loss, device=device)
    with eval_mode(model), torch.no_grad():
        member_out = _logits(model, *member_data, loss=loss, name="members")
        nonmember_out = _logits(model, *nonmember_data, loss=loss, name="nonmembers")
    _warn_if_unit_interval([member_out, nonmember_out], "the members and non-members")
    member_losses = _per_example_losses(member_out, member_data[1], loss=loss, name="members")
    nonmember_losses = _per_example_losses(
        nonmember_out, nonmember_data[1], loss=loss, name="nonmembers"
    )
    return MembershipAttackResult.from_scores(-member_losses, -nonmember_losses)
