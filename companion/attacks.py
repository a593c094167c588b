r"""Attacks that show why model updates and models leak.

Two attacks, one against a trained model and one against the updates of federated learning.

**Membership inference** asks, given a trained model and an example, whether the example was
in the training set:

- :func:`loss_threshold_attack`: the loss-threshold attack of Yeom, Giacomelli, Fredrikson and
  Jha 2018 ("Privacy Risk in Machine Learning: Analyzing the Connection to Overfitting", IEEE
  CSF): a model fits its training examples better than unseen ones, so an example with a low
  loss is guessed to be a member.
- :class:`MembershipAttackResult`: the attack's scores and ROC curve, with the area under it,
  the true-positive rate at a small false-positive rate and the membership advantage.

**Gradient inversion**: a server (or anyone who sees the traffic) that receives one client's
gradient can often reconstruct the client's training inputs from it.

- :func:`model_gradient`: the gradient of the mean loss of a batch with respect to every
  trainable parameter, which is exactly what one client shares in FedSGD.
- :func:`invert_gradient`: reconstruct the inputs behind such a gradient by *gradient matching*
  (Deep Leakage from Gradients, Zhu, Liu and Han 2019, NeurIPS; the cosine refinement of Geiping,
  Bauermeister, Dröge and Moeller 2020, "Inverting Gradients - How Easy Is It to Break Privacy in
  Federated Learning?", NeurIPS), with the label of a single example recovered analytically
  (iDLG, Zhao, Mopuri and Bilen 2020).
- :func:`reconstruction_similarity`: how close a reconstruction is to the original image
  (Pearson correlation of the pixels).

.. rubric:: Membership inference as a hypothesis test

The attacker sees an example :math:`z` and tests :math:`H_0`: ":math:`z` was not in the training
set" against :math:`H_1`: "it was", by comparing a score :math:`s(z)` (here minus the loss) with
a threshold :math:`\tau`. Every threshold gives a false-positive rate
:math:`\mathrm{FPR}(\tau) = \Pr[s(z) \ge \tau \mid H_0]` and a true-positive rate
:math:`\mathrm{TPR}(\tau) = \Pr[s(z) \ge \tau \mid H_1]`; sweeping :math:`\tau` traces the ROC
curve. Differential privacy bounds that curve directly: if training is
:math:`(\varepsilon, \delta)`-DP, adding or removing :math:`z` changes the probability of any
event about the model by at most a factor :math:`e^\varepsilon` and an additive :math:`\delta`, so
every test satisfies

.. math::
    :label: attacks-dp-roc

    \mathrm{TPR} \le e^{\varepsilon}\, \mathrm{FPR} + \delta

(Wasserman and Zhou 2010; Kairouz, Oh and Viswanath 2015, "The Composition Theorem for
Differential Privacy", ICML). Summaries of the curve: the area under it (0.5 for guessing), the TPR at a small
FPR such as 1% (the measure Carlini et al. 2022 argue for: an attack that is sure about a few
people matters more than one that is right 55% of the time about everyone), and the advantage
:math:`\max_\tau \mathrm{TPR} - \mathrm{FPR}` (Yeom et al. 2018), at most
:math:`e^\varepsilon - 1` for :math:`(\varepsilon, 0)`-DP training.

.. rubric:: Why a fully connected first layer gives the input away

Let the first layer be :math:`z = W x + b` and let :math:`\ell` be the loss of a *single*
example. By the chain rule :math:`\partial \ell / \partial W = \delta\, x^\top` and
:math:`\partial \ell / \partial b = \delta` with :math:`\delta = \partial \ell / \partial z`.
So for every row :math:`i` with :math:`\delta_i \ne 0`,

.. math::
    :label: attacks-phong

    x = \frac{(\nabla_W \ell)_{i,:}}{(\nabla_b \ell)_i}

exactly, with no optimisation at all (Phong, Aono, Hayashi, Wang and Moriai 2017/2018,
"Privacy-Preserving Deep Learning via Additively Homomorphic Encryption"). The gradient of such
a layer *is* the input, scaled; this is why even the simple optimisation attack below
reconstructs digits almost perfectly from the gradient of a multilayer perceptron. For a batch
of several examples the rows are sums :math:`\sum_j \delta_{j,i} x_j^\top` and the inputs mix,
which makes the attack harder but not impossible.

.. rubric:: Defences against gradient inversion

Clipping the update to norm :math:`C` and adding Gaussian noise of standard deviation
:math:`\sigma C` per coordinate, as DP-SGD and DP-FedAvg do, drowns the signal: at
:math:`\sigma = 1` the reconstruction from the gradient of one digit is no more similar to that
digit than to any other (``tests/test_attacks.py`` measures this).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral
from typing import Literal

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from sklearn.metrics import auc as _trapezoid_auc
from sklearn.metrics import roc_curve

from companion._validation import check_nonnegative, check_positive, check_positive_int, check_real
from companion._random import torch_generator
from companion._torch import (
    ArrayLike,
    LossName,
    check_data,
    check_loss,
    check_model,
    loss_fn,
)

__all__ = [
    "InversionResult",
    "MembershipAttackResult",
    "invert_gradient",
    "loss_threshold_attack",
    "model_gradient",
    "reconstruction_similarity",
]

Distance = Literal["cosine", "l2"]
_DISTANCES = ("cosine", "l2")
_COSINE_EPS = 1e-12  # guards the cosine against a zero gradient


# --- the shared gradient ------------------------------------------------------------------------


def _trainable_named(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters (none has requires_grad=True).")
    return params


def model_gradient(
    model: nn.Module, x: ArrayLike, y: ArrayLike, *, loss: LossName = "cross_entropy"
) -> dict[str, torch.Tensor]:
    r"""The gradient of the batch's mean loss with respect to every trainable parameter.

    .. math:: g = \nabla_\theta \frac{1}{B} \sum_{i=1}^{B} \ell(\theta; x_i, y_i)

    This is what one client sends to the server in one round of FedSGD (McMahan et al. 2017),
    and what :func:`invert_gradient` attacks. It is computed with :func:`torch.autograd.grad`,
    so the model's ``.grad`` attributes and its parameters are left as they were.

    Args:
        model: the model; its parameters are read, not changed.
        x: inputs, shape ``(B, n_features)`` (tensor or numpy array).
        y: labels, shape ``(B,)``: integer classes, or 0/1 for ``loss="bce"``.
        loss: ``"cross_entropy"`` or ``"bce"`` (see :mod:`companion.training`).

    Returns:
        A dict from parameter name (as in ``model.named_parameters()``, trainable parameters
        only) to a detached tensor of the parameter's shape.

    Example:
        >>> from companion import data, models
        >>> digits = data.load_digits()
        >>> g = model_gradient(models.mlp(seed=0), digits.x_train[:1], digits.y_train[:1])
        >>> sorted(g)
        ['0.bias', '0.weight', '2.bias', '2.weight']
    """
    model = check_model(model)
    loss = check_loss(loss)
    x, y = check_data(x, y, loss=loss)
    params = _trainable_named(model)
    value = loss_fn(loss)(model(x), y)
    grads = torch.autograd.grad(value, [p for _, p in params])
    return {name: g.detach() for (name, _), g in zip(params, grads, strict=True)}


# --- the attack ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class InversionResult:
    """The outcome of :func:`invert_gradient`.

    Attributes:
        x: the reconstructed inputs, shape ``(batch_size, n_features)``.
        y: the labels used (given or recovered), shape ``(batch_size,)``, int64.
        losses: the gradient-matching loss (including any total-variation term) of the dummy
            inputs after each optimisation step, ``steps`` values.
    """

    x: torch.Tensor
    y: torch.Tensor
    losses: list[float]


def _check_gradient(gradient: object, params: list[tuple[str, nn.Parameter]]) -> dict[str, torch.Tensor]:
    """The observed gradient must have exactly the trainable parameters' names and shapes."""
    if not isinstance(gradient, dict):
        raise TypeError(
            f"gradient must be a dict name -> tensor (as returned by model_gradient), got "
            f"{type(gradient).__name__}."
        )
    names = [name for name, _ in params]
    if set(gradient) != set(names):
        missing = sorted(set(names) - set(gradient))
        extra = sorted(set(gradient) - set(names), key=str)
        raise ValueError(
            "gradient must have one entry per trainable parameter of the model; "
            f"missing {missing}, unexpected {extra}."
        )
    checked = {}
    for name, p in params:
        g = gradient[name]
        if not isinstance(g, torch.Tensor):
            raise TypeError(f"gradient[{name!r}] must be a torch.Tensor, got {type(g).__name__}.")
        if g.shape != p.shape:
            raise ValueError(
                f"gradient[{name!r}] must have the parameter's shape {tuple(p.shape)}, got {tuple(g.shape)}."
            )
        if not torch.isfinite(g).all():
            raise ValueError(f"gradient[{name!r}] must not contain NaN or infinite values.")
        checked[name] = g.detach().to(dtype=p.dtype, device=p.device)
    return checked


def _input_features(model: nn.Module, image_shape: tuple[int, int] | None) -> int:
    """The number of input features of ``model``, read from its first layer.

    A first :class:`torch.nn.Linear` gives ``in_features``; a first :class:`torch.nn.Unflatten`
    of dimension 1 (as in :func:`companion.models.small_cnn`) gives the product of its sizes.
    Otherwise ``image_shape`` is used, and without it the number cannot be known.
    """
    for module in model.modules():
        if isinstance(module, nn.Linear):
            return module.in_features
        if isinstance(module, nn.Unflatten) and module.dim == 1:
            return math.prod(module.unflattened_size)
        if len(list(module.children())) == 0:  # some other leaf layer comes first
            break
    if image_shape is not None:
        return math.prod(image_shape)
    raise ValueError(
        "cannot tell the number of input features of this model (its first layer is neither "
        "Linear nor Unflatten); pass image_shape."
    )


def _check_image_shape(image_shape: object) -> tuple[int, int] | None:
    if image_shape is None:
        return None
    if not isinstance(image_shape, Sequence) or len(image_shape) != 2:
        raise TypeError(f"image_shape must be a pair (height, width) or None, got {image_shape!r}.")
    return (check_positive_int("image_shape[0]", image_shape[0]), check_positive_int("image_shape[1]", image_shape[1]))


def _check_bounds(bounds: object) -> tuple[float, float] | None:
    if bounds is None:
        return None
    if not isinstance(bounds, Sequence) or len(bounds) != 2:
        raise TypeError(f"bounds must be a pair (low, high) or None, got {bounds!r}.")
    low, high = check_real("bounds[0]", bounds[0]), check_real("bounds[1]", bounds[1])
    if not low < high:
        raise ValueError(f"bounds must satisfy low < high, got {bounds!r}.")
    return low, high


def _check_label(label: object, batch_size: int) -> torch.Tensor | None:
    if label is None:
        return None
    if isinstance(label, Integral) and not isinstance(label, bool):
        labels = torch.tensor([int(label)])
    elif isinstance(label, (torch.Tensor, np.ndarray, list, tuple)):
        labels = torch.as_tensor(label)
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"label must hold integer class labels, got dtype {labels.dtype}.")
        labels = labels.to(torch.long).reshape(-1) if labels.ndim == 0 else labels.to(torch.long)
    else:
        raise TypeError(f"label must be an int, a sequence of ints, a tensor or None, got {type(label).__name__}.")
    if labels.shape != (batch_size,):
        raise ValueError(
            f"label must have shape (batch_size,) = ({batch_size},) (an int for batch_size=1), "
            f"got shape {tuple(labels.shape)}."
        )
    if (labels < 0).any():
        raise ValueError("label must hold class labels >= 0.")
    return labels


def _recover_label(model: nn.Module, gradient: dict[str, torch.Tensor]) -> torch.Tensor:
    r"""iDLG: the true class of a single example from the last layer's bias gradient.

    For cross-entropy, :math:`\partial \ell / \partial b = \mathrm{softmax}(z) - e_y`: every
    entry is positive except the one of the true class, which is :math:`p_y - 1 < 0`.
    """
    bias_name = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            bias = module.bias
            bias_name = f"{name}.bias" if bias is not None and bias.requires_grad else None
    if bias_name is None or bias_name not in gradient:
        raise ValueError(
            "cannot recover the label: the model's last Linear layer has no trainable bias; "
            "pass label."
        )
    return gradient[bias_name].argmin().reshape(1)


def _total_variation(images: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of vertically and horizontally neighbouring pixels."""
    return (images[:, 1:, :] - images[:, :-1, :]).abs().mean() + (images[:, :, 1:] - images[:, :, :-1]).abs().mean()


def invert_gradient(
    model: nn.Module,
    gradient: dict[str, torch.Tensor],
    *,
    batch_size: int = 1,
    label: int | Sequence[int] | torch.Tensor | np.ndarray | None = None,
    steps: int = 300,
    lr: float = 0.1,
    distance: Distance = "cosine",
    tv_weight: float = 0.0,
    image_shape: tuple[int, int] | None = None,
    bounds: tuple[float, float] | None = (0.0, 1.0),
    seed: int = 0,
    progress: bool = False,
) -> InversionResult:
    r"""Reconstruct training inputs from a shared gradient by gradient matching.

    The attacker knows the model :math:`\theta` and the observed gradient :math:`g`
    (:func:`model_gradient` of the client's batch under cross-entropy). It draws dummy inputs
    :math:`\hat x` uniformly at random (in ``bounds``, or in :math:`[0, 1]` without bounds) from
    a :class:`torch.Generator` seeded with ``seed`` and minimises, with Adam at learning rate
    ``lr``, the distance between the gradient they induce and the observed one:

    .. math::

        \hat g(\hat x) = \nabla_\theta \frac{1}{B} \sum_{i=1}^{B} \ell(\theta; \hat x_i, y_i),
        \qquad
        \min_{\hat x}\; D\bigl(\hat g(\hat x), g\bigr) + \lambda_{TV}\, \mathrm{TV}(\hat x).

    - ``distance="l2"``: :math:`D = \lVert \hat g - g \rVert_2^2`, summed over all parameters:
      Deep Leakage from Gradients (DLG; Zhu, Liu and Han 2019, NeurIPS).
    - ``distance="cosine"``: :math:`D = 1 - \langle \hat g, g \rangle / (\lVert \hat g \rVert_2
      \lVert g \rVert_2)`, all parameters flattened into one vector (Geiping, Bauermeister, Dröge
      and Moeller 2020, NeurIPS). It matches the *direction* of the gradient, which carries the
      information about the input, and ignores its magnitude, which mostly reflects how wrong
      the model is; it is also the more robust of the two on trained models.
    - :math:`\mathrm{TV}` is the anisotropic total variation of the images (mean absolute
      difference of neighbouring pixels, both directions), weighted by ``tv_weight``
      (:math:`\lambda_{TV}`); it favours smooth images, a prior that helps on natural images.
      It needs ``image_shape``.

    Differentiating :math:`D` with respect to :math:`\hat x` differentiates through the
    gradient :math:`\hat g`, so :math:`\hat g` is built with ``create_graph=True`` (a
    second-order derivative). After each Adam step the inputs are clamped to ``bounds``.

    **Labels.** The gradient depends on the labels, so the attack needs them. With
    ``label=None`` and ``batch_size=1`` the label is recovered analytically (iDLG; Zhao, Mopuri
    and Bilen 2020): the bias gradient of the last layer is :math:`\mathrm{softmax}(z) - e_y`,
    whose only negative entry is the true class :math:`y`; the attack takes its smallest entry.
    For larger batches pass the labels.

    **Why it works so well on fully connected models.** For one example and a first layer
    :math:`z = Wx + b`, the input is :math:`x = (\nabla_W \ell)_{i,:} / (\nabla_b \ell)_i` for
    any row :math:`i` with a nonzero bias gradient (Phong et al. 2017/2018, "Privacy-Preserving
    Deep Learning via Additively Homomorphic Encryption"): the first layer's gradient is a
    scaled copy of the input, and matching its direction pins the input down.

    The model is not changed: neither its parameters nor their ``.grad`` attributes (all
    derivatives are taken with :func:`torch.autograd.grad`), nor its train/eval mode.

    Args:
        model: the attacked model, returning class logits (cross-entropy loss).
        gradient: the observed gradient, a dict with exactly the names and shapes of the
            model's trainable parameters (as returned by :func:`model_gradient`).
        batch_size: number of inputs to reconstruct, >= 1 (the size of the client's batch).
        label: the labels: an int (``batch_size=1``) or ``batch_size`` integers; ``None``
            recovers the label of a single example (``batch_size=1`` only).
        steps: optimisation steps, >= 1.
        lr: Adam learning rate, > 0.
        distance: ``"cosine"`` (Geiping et al.) or ``"l2"`` (DLG).
        tv_weight: weight of the total-variation prior, >= 0; > 0 needs ``image_shape``.
        image_shape: ``(height, width)`` of the images, e.g. ``(8, 8)`` for the digits; its
            product must equal the model's number of input features.
        bounds: ``(low, high)`` the inputs are clamped to after each step (``(0, 1)`` for the
            digits), or ``None`` for no clamping.
        seed: seed of the generator that draws the initial dummy inputs.
        progress: show a tqdm progress bar over the steps.

    Returns:
        An :class:`InversionResult` with the reconstructed inputs, the labels used and the loss
        after each step.

    Raises:
        TypeError: if ``model`` is not a module or an argument has the wrong type.
        ValueError: if the gradient does not match the model's trainable parameters, an
            argument is out of range, ``image_shape`` does not match the input size, the label
            has the wrong shape or is missing for ``batch_size > 1``.

    Example:
        >>> from companion import data, models
        >>> digits = data.load_digits()
        >>> model = models.mlp(seed=0)
        >>> g = model_gradient(model, digits.x_train[:1], digits.y_train[:1])
        >>> result = invert_gradient(model, g, steps=200, lr=0.1)  # doctest: +SKIP
        >>> reconstruction_similarity(digits.x_train[0], result.x[0]) > 0.9  # doctest: +SKIP
        True
    """
    model = check_model(model)
    params = _trainable_named(model)
    target = _check_gradient(gradient, params)
    batch_size = check_positive_int("batch_size", batch_size)
    steps = check_positive_int("steps", steps)
    lr = check_positive("lr", lr)
    if distance not in _DISTANCES:
        raise ValueError(f"distance must be one of {_DISTANCES}, got {distance!r}.")
    tv_weight = check_nonnegative("tv_weight", tv_weight)
    image_shape = _check_image_shape(image_shape)
    if tv_weight > 0 and image_shape is None:
        raise ValueError("tv_weight > 0 needs image_shape, the (height, width) of the images, e.g. (8, 8).")
    n_features = _input_features(model, image_shape)
    if image_shape is not None and math.prod(image_shape) != n_features:
        raise ValueError(
            f"image_shape {image_shape} has {math.prod(image_shape)} pixels, but the model takes "
            f"{n_features} input features."
        )
    bounds = _check_bounds(bounds)
    labels = _check_label(label, batch_size)
    generator = torch_generator(seed)
    if labels is None:
        if batch_size > 1:
            raise ValueError(
                "label is required for batch_size > 1: analytic label recovery is implemented for "
                "a single example only. Pass batch_size labels."
            )
        labels = _recover_label(model, target)

    first = params[0][1]
    low, high = bounds if bounds is not None else (0.0, 1.0)
    start = low + (high - low) * torch.rand(batch_size, n_features, generator=generator, dtype=torch.float64)
    dummy = start.to(dtype=first.dtype, device=first.device).requires_grad_(True)
    labels = labels.to(first.device)
    with torch.no_grad():
        n_classes = model(dummy).shape[-1]
    if (labels >= n_classes).any():
        raise ValueError(f"label must hold classes below the model's {n_classes} outputs, got {labels.tolist()}.")

    weights = [p for _, p in params]
    flat_target = torch.cat([target[name].reshape(-1) for name, _ in params])
    target_norm = torch.linalg.vector_norm(flat_target)
    mean_loss = loss_fn("cross_entropy")

    def matching_loss(inputs: torch.Tensor) -> torch.Tensor:
        value = mean_loss(model(inputs), labels)
        grads = torch.autograd.grad(value, weights, create_graph=True)
        flat = torch.cat([g.reshape(-1) for g in grads])
        if distance == "l2":
            result = (flat - flat_target).square().sum()
        else:
            result = 1 - flat @ flat_target / (torch.linalg.vector_norm(flat) * target_norm + _COSINE_EPS)
        if tv_weight > 0:
            assert image_shape is not None
            result = result + tv_weight * _total_variation(inputs.reshape(-1, *image_shape))
        return result

    optimizer = torch.optim.Adam([dummy], lr=lr)
    losses: list[float] = []
    value = matching_loss(dummy)
    bar = tqdm(range(steps), desc="gradient inversion", unit="step", disable=not progress)
    for _ in bar:
        (dummy.grad,) = torch.autograd.grad(value, [dummy])
        optimizer.step()
        if bounds is not None:
            with torch.no_grad():
                dummy.clamp_(low, high)
        value = matching_loss(dummy)  # the loss after this step (and the next step's objective)
        losses.append(float(value.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3g}")
    bar.close()
    return InversionResult(x=dummy.detach().clone(), y=labels.detach().clone(), losses=losses)


# --- scoring ------------------------------------------------------------------------------------


def _as_image(name: str, image: object) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{name} must be a torch.Tensor or a numpy array, got {type(image).__name__}.")
    if image.dtype == bool or not np.issubdtype(image.dtype, np.number) or np.iscomplexobj(image):
        raise TypeError(f"{name} must hold real numbers, got dtype {image.dtype}.")
    if not (image.ndim == 1 or (image.ndim == 2 and image.shape[0] == 1)):
        raise ValueError(f"{name} must be one image, of shape (n,) or (1, n), got shape {image.shape}.")
    flat = image.reshape(-1).astype(np.float64)
    if flat.size < 2:
        raise ValueError(f"{name} must have at least two pixels, got {flat.size}.")
    if not np.isfinite(flat).all():
        raise ValueError(f"{name} must not contain NaN or infinite values.")
    return flat


def reconstruction_similarity(original: torch.Tensor | np.ndarray, reconstruction: torch.Tensor | np.ndarray) -> float:
    r"""How similar a reconstruction is to the original image: the Pearson correlation of pixels.

    .. math::

        \rho(x, \hat x) = \frac{\sum_j (x_j - \bar x)(\hat x_j - \bar{\hat x})}
        {\sqrt{\sum_j (x_j - \bar x)^2}\,\sqrt{\sum_j (\hat x_j - \bar{\hat x})^2}} \in [-1, 1].

    Why the correlation: it is unchanged by a brightness shift or a contrast change of either
    image (:math:`\hat x \mapsto a \hat x + c` with :math:`a > 0`), so it scores whether the
    *picture* was recovered, not whether the attack also guessed the exact intensity scale
    (which the cosine gradient distance does not pin down). 1 means a perfect reconstruction up
    to such a change, 0 no linear relation (what unrelated images give on average), -1 the
    negative image.

    Args:
        original: one image, shape ``(n,)`` or ``(1, n)`` (tensor or numpy array).
        reconstruction: its reconstruction, the same number of pixels.

    Returns:
        The correlation, a float in [-1, 1]. A constant image has no variation to correlate,
        so if either image is constant the score is 0.0 (the reconstruction says nothing about
        the picture).
    """
    x = _as_image("original", original)
    x_hat = _as_image("reconstruction", reconstruction)
    if x.shape != x_hat.shape:
        raise ValueError(
            f"original and reconstruction must have the same number of pixels, got {x.size} and {x_hat.size}."
        )
    x = x - x.mean()
    x_hat = x_hat - x_hat.mean()
    denominator = math.sqrt(float(x @ x) * float(x_hat @ x_hat))
    if denominator == 0.0:
        return 0.0
    return float(np.clip(float(x @ x_hat) / denominator, -1.0, 1.0))


# --- membership inference -----------------------------------------------------------------------


def _check_scores(name: str, scores: object) -> np.ndarray:
    """A non-empty one-dimensional array of finite real scores, returned as float64."""
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu().numpy()
    if not isinstance(scores, np.ndarray):
        raise TypeError(f"{name} must be a numpy array or a torch.Tensor, got {type(scores).__name__}.")
    if scores.dtype == bool or not np.issubdtype(scores.dtype, np.number) or np.iscomplexobj(scores):
        raise TypeError(f"{name} must hold real numbers, got dtype {scores.dtype}.")
    if scores.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {scores.shape}.")
    if scores.size == 0:
        raise ValueError(f"{name} must hold at least one score.")
    scores = scores.astype(np.float64)
    if not np.isfinite(scores).all():
        raise ValueError(f"{name} must not contain NaN or infinite values.")
    return scores


@dataclass(frozen=True)
class MembershipAttackResult:
    r"""The outcome of a membership-inference attack: its scores and its ROC curve.

    Members are the positive class, and a *higher* score means "member". For a threshold
    :math:`\tau` the attack guesses "member" when the score is at least :math:`\tau`; then
    :math:`\mathrm{TPR}(\tau)` is the share of members and :math:`\mathrm{FPR}(\tau)` the share
    of non-members guessed "member". Build one with :func:`loss_threshold_attack` or, from any
    scores, with :meth:`from_scores`.

    Attributes:
        member_scores: the attack score of each member, float64.
        nonmember_scores: the attack score of each non-member, float64.
        fpr: false-positive rates of the ROC curve, non-decreasing from 0 to 1
            (:func:`sklearn.metrics.roc_curve` with ``drop_intermediate=False``: one point per
            distinct score, plus the starting point (0, 0)).
        tpr: the matching true-positive rates, non-decreasing from 0 to 1.
        auc: the area under the ROC curve (trapezoidal rule), which equals the Mann-Whitney
            probability :math:`\Pr[s_{\text{member}} > s_{\text{non-member}}] + \tfrac12
            \Pr[s_{\text{member}} = s_{\text{non-member}}]` over independent draws from the two
            sets: 0.5 for an attack that cannot tell them apart, 1 for a perfect one.
    """

    member_scores: np.ndarray
    nonmember_scores: np.ndarray
    fpr: np.ndarray
    tpr: np.ndarray
    auc: float

    @classmethod
    def from_scores(
        cls, member_scores: np.ndarray | torch.Tensor, nonmember_scores: np.ndarray | torch.Tensor
    ) -> MembershipAttackResult:
        """The ROC curve and its area for given scores (higher means "member").

        Args:
            member_scores: one finite score per member, a non-empty 1-D array or tensor.
            nonmember_scores: one finite score per non-member, likewise.

        Returns:
            The :class:`MembershipAttackResult` of these scores.

        Example:
            >>> result = MembershipAttackResult.from_scores(np.array([3.0, 2.0]), np.array([1.0, 2.0]))
            >>> result.auc  # P(member > non-member) + P(tie) / 2 = (3 + 0.5) / 4
            0.875
        """
        members = _check_scores("member_scores", member_scores)
        nonmembers = _check_scores("nonmember_scores", nonmember_scores)
        labels = np.concatenate([np.ones(members.size), np.zeros(nonmembers.size)])
        fpr, tpr, _ = roc_curve(labels, np.concatenate([members, nonmembers]), drop_intermediate=False)
        return cls(
            member_scores=members,
            nonmember_scores=nonmembers,
            fpr=fpr,
            tpr=tpr,
            auc=float(_trapezoid_auc(fpr, tpr)),
        )

    def tpr_at(self, fpr: float) -> float:
        r"""The largest true-positive rate among the thresholds with false-positive rate <= ``fpr``.

        .. math:: \mathrm{TPR}@\alpha = \max\{\mathrm{TPR}(\tau) : \mathrm{FPR}(\tau) \le \alpha\}

        Carlini, Chien, Nasr, Song, Terzis and Tramèr 2022 ("Membership Inference Attacks From
        First Principles", IEEE S&P) argue for this measure at a small :math:`\alpha` (0.1% or
        1%) instead of accuracy or AUC: an attack that identifies a few members with confidence
        is a real privacy breach, while one that is right slightly more often than chance on
        everyone, which is what an AUC of 0.6 may mean, exposes no one. With :math:`m`
        non-members the curve moves in steps of :math:`1/m`, so at most
        :math:`\lfloor \alpha m \rfloor` non-members may score above the threshold; a
        meaningful estimate at 1% needs a few hundred non-members at least.

        Args:
            fpr: the largest admissible false-positive rate :math:`\alpha`, in the open
                interval (0, 1).

        Returns:
            The true-positive rate, in [0, 1].
        """
        alpha = check_real("fpr", fpr)
        if not 0 < alpha < 1:
            raise ValueError(f"fpr must lie in the open interval (0, 1), got {alpha}.")
        return float(self.tpr[self.fpr <= alpha].max())  # the curve starts at (0, 0)

    def advantage(self) -> float:
        r"""The membership advantage :math:`\max_\tau \mathrm{TPR}(\tau) - \mathrm{FPR}(\tau)`.

        Yeom et al. 2018 define the advantage of an attack as :math:`\mathrm{TPR} -
        \mathrm{FPR}`, which is twice its accuracy minus one when members and non-members are
        equally likely; the best threshold gives this maximum (the Kolmogorov-Smirnov distance
        between the two empirical score distributions). It is 0 for guessing and 1 for a perfect
        attack.

        If the training algorithm is :math:`(\varepsilon, 0)`-differentially private, the
        advantage of any attack is at most :math:`e^\varepsilon - 1` (Yeom et al. 2018,
        Theorem 1). More generally :math:`(\varepsilon, \delta)`-DP bounds the whole ROC curve,
        :math:`\mathrm{TPR} \le e^\varepsilon\, \mathrm{FPR} + \delta` at every threshold, hence
        :math:`\mathrm{TPR} - \mathrm{FPR} \le (e^\varepsilon - 1)\,\mathrm{FPR} + \delta`. These
        bounds are on the *probabilities*; the rates measured on finitely many examples scatter
        around them.

        Returns:
            The advantage, in [0, 1].
        """
        return float(np.max(self.tpr - self.fpr))


def _check_pair(name: str, pair: object, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``pair`` must be an ``(x, y)`` tuple or list of a valid data set."""
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise TypeError(f"{name} must be a pair (x, y) of inputs and labels, got {type(pair).__name__}.")
    for part, value in zip(("x", "y"), pair, strict=True):
        if not isinstance(value, (np.ndarray, torch.Tensor)):
            raise TypeError(f"{name} {part} must be a torch.Tensor or a numpy array, got {type(value).__name__}.")
    return check_data(pair[0], pair[1], loss=loss, names=(f"{name} x", f"{name} y"))


def _per_example_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, loss: str, name: str) -> np.ndarray:
    """Each example's loss in float64, without gradients (the caller sets the mode)."""
    outputs = model(x)
    if not isinstance(outputs, torch.Tensor):
        raise TypeError(f"model must return a tensor of logits, got {type(outputs).__name__}.")
    if loss == "cross_entropy":
        if outputs.ndim != 2 or outputs.shape[0] != x.shape[0]:
            raise ValueError(
                f"for loss='cross_entropy' the model must return logits of shape (N, n_classes), got "
                f"{tuple(outputs.shape)} for {name}."
            )
        if int(y.max()) >= outputs.shape[1]:
            raise ValueError(f"{name} y holds a label >= the model's {outputs.shape[1]} classes.")
    elif outputs.reshape(-1).shape[0] != x.shape[0]:
        raise ValueError(f"for loss='bce' the model must return one logit per example, got {tuple(outputs.shape)}.")
    # float64: a confident prediction's loss, log(1 + sum_k exp(-margin_k)), underflows to 0 in
    # float32 once the margins exceed about 17, which would tie the members the attack is surest of.
    values = loss_fn(loss, reduction="none")(outputs.double(), y).reshape(-1).cpu().numpy()
    if not np.isfinite(values).all():
        raise ValueError(f"the model's loss on {name} is NaN or infinite for some examples.")
    return values


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
    minus expected training loss) divided by :math:`B` (Yeom et al. 2018, Theorem 2). Its weakness is a single threshold for all examples: an unusual non-member may
    have a high loss anyway and an easy one a low loss, so at small false-positive rates it
    does far worse than attacks that calibrate per example (Carlini et al. 2022).

    The losses are computed without gradients with the model in evaluation mode, which is
    restored afterwards, and in float64 (from the model's logits) so that very confident
    predictions do not all tie at a loss of 0. The model's parameters are not changed.

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
            length, the inputs are not finite, or the labels do not fit the model.

    Example:
        >>> from companion import data, models, training
        >>> digits = data.load_digits()
        >>> x, y = digits.x_train[:200], digits.y_train[:200]
        >>> model = models.mlp(seed=0)
        >>> _ = training.train(model, x, y, epochs=300, batch_size=32, lr=0.5)  # doctest: +SKIP
        >>> result = loss_threshold_attack(model, (x, y), (digits.x_test[:200], digits.y_test[:200]))
        >>> result.auc  # doctest: +SKIP
        0.6...
    """
    model = check_model(model)
    loss = check_loss(loss)
    member_data = _check_pair("members", members, loss)
    nonmember_data = _check_pair("nonmembers", nonmembers, loss)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            member_losses = _per_example_losses(model, *member_data, loss=loss, name="members")
            nonmember_losses = _per_example_losses(model, *nonmember_data, loss=loss, name="nonmembers")
    finally:
        model.train(was_training)
    return MembershipAttackResult.from_scores(-member_losses, -nonmember_losses)
