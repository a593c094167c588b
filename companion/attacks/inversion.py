r"""Gradient inversion: reconstruct a client's training inputs from the gradient it shares.

- :func:`model_gradient`: the gradient of the mean loss of a batch with respect to every
  trainable parameter, which is exactly what one client shares in FedSGD.
- :func:`invert_gradient`: reconstruct the inputs behind such a gradient by *gradient matching*
  (Deep Leakage from Gradients, Zhu, Liu and Han 2019, NeurIPS; the cosine refinement of Geiping,
  Bauermeister, Dröge and Moeller 2020, "Inverting Gradients - How Easy Is It to Break Privacy in
  Federated Learning?", NeurIPS), with the label of a single example recovered analytically
  (iDLG, Zhao, Mopuri and Bilen 2020).

How close a reconstruction comes is measured by :func:`companion.attacks.reconstruction_similarity`.
Why a fully connected first layer gives the input away, and what clipping and noise do against the
attack, is in :mod:`companion.attacks`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Integral
from typing import Literal

import numpy as np
import torch
from torch import nn

from companion._outputs import check_outputs
from companion._progress import progress_bar
from companion._random import torch_generator
from companion._torch import (
    ArrayLike,
    LossName,
    check_data,
    check_loss,
    check_model,
    eval_mode,
    loss_fn,
    model_device,
    trainable_named,
)
from companion._validation import check_nonnegative, check_positive, check_positive_int, check_real

__all__ = ["InversionResult", "invert_gradient", "model_gradient"]

Distance = Literal["cosine", "l2"]
_DISTANCES = ("cosine", "l2")
_COSINE_EPS = 1e-12  # guards the cosine against a zero gradient


# --- the shared gradient ------------------------------------------------------------------------


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

    Raises:
        TypeError: if ``model`` is not a module or the data have the wrong types.
        ValueError: if ``loss`` is unknown, the data are invalid, or no parameter trains.

    Example:
        >>> from companion import data, models
        >>> digits = data.load_digits()
        >>> sorted(model_gradient(models.mlp(seed=0), digits.x_train[:1], digits.y_train[:1]))
        ['0.bias', '0.weight', '2.bias', '2.weight']
    """
    model = check_model(model)
    loss = check_loss(loss)
    x, y = check_data(x, y, loss=loss, device=model_device(model))
    check_outputs(model, x, y, loss=loss)
    params = trainable_named(model)
    value = loss_fn(loss)(model(x), y)
    grads = torch.autograd.grad(value, [p for _, p in params])
    return {name: g.detach() for (name, _), g in zip(params, grads, strict=True)}


# --- the attack ---


@dataclass(frozen=True)
class InversionResult:
    """The outcome of :func:`invert_gradient`.

    Attributes:
        x: the reconstructed inputs, shape ``(batch_size, n_features)``.
        y: the labels used (given or recovered), shape ``(batch_size,)``, int64.
        losses: the gradient-matching loss (including any total-variation term) of the dummy
            inputs after each optimisation step, ``steps`` values.

    Example:
        >>> result = InversionResult(x=torch.zeros(1, 64), y=torch.tensor([3]), losses=[0.5])
        >>> result.y.tolist(), result.losses
        ([3], [0.5])
    """

    x: torch.Tensor
    y: torch.Tensor
    losses: list[float]


def _check_gradient(
    gradient: object, params: list[tuple[str, nn.Parameter]]
) -> dict[str, torch.Tensor]:
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
                f"gradient[{name!r}] must have the parameter's shape {tuple(p.shape)}, got "
                f"{tuple(g.shape)}."
            )
        if not torch.isfinite(g).all():
            raise ValueError(f"gradient[{name!r}] must not contain NaN or infinite values.")
        checked[name] = g.detach().to(dtype=p.dtype, device=p.device)
    return checked


def _input_features(model: nn.Module, image_shape: tuple[int, int] | None) -> int:
    """The number of input features of ``model``: the pixels of ``image_shape`` if given, else
    read from its first registered layer.

    A first :class:`torch.nn.Linear` gives ``in_features``; a first :class:`torch.nn.Unflatten`
    of dimension 1 (as in :func:`companion.models.small_cnn`) gives the product of its sizes.
    Registration order need not be the order of the forward pass; the caller checks the number
    with a forward pass.
    """
    if image_shape is not None:
        return math.prod(image_shape)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            return module.in_features
        if isinstance(module, nn.Unflatten) and module.dim == 1:
            return math.prod(module.unflattened_size)
        if len(list(module.children())) == 0:  # some other leaf layer comes first
            break
    raise ValueError(
        "cannot tell the number of input features of this model (its first layer is neither "
        "Linear nor Unflatten); pass image_shape."
    )


def _check_couple(name: str, value: object, parts: str, check: Callable) -> tuple | None:
    """``None``, or a pair whose two entries pass ``check(name[i], entry)``."""
    if value is None:
        return None
    if not isinstance(value, Sequence) or len(value) != 2:
        raise TypeError(f"{name} must be a pair {parts} or None, got {value!r}.")
    return check(f"{name}[0]", value[0]), check(f"{name}[1]", value[1])


def _check_label(label: object, batch_size: int) -> torch.Tensor | None:
    if label is None:
        return None
    if isinstance(label, Integral) and not isinstance(label, bool):
        labels = torch.tensor([int(label)])
    elif isinstance(label, torch.Tensor | np.ndarray | list | tuple):
        labels = torch.as_tensor(label)
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"label must hold integer class labels, got dtype {labels.dtype}.")
        labels = labels.to(torch.long).reshape(-1) if labels.ndim == 0 else labels.to(torch.long)
    else:
        raise TypeError(
            "label must be an int, a sequence of ints, a tensor or None, got "
            f"{type(label).__name__}."
        )
    if labels.shape != (batch_size,):
        raise ValueError(
            f"label must have shape (batch_size,) = ({batch_size},) (an int for batch_size=1), "
            f"got shape {tuple(labels.shape)}."
        )
    if (labels < 0).any():
        raise ValueError("label must hold class labels >= 0.")
    return labels


def _last_bias_gradient(model: nn.Module, gradient: dict[str, torch.Tensor]) -> torch.Tensor:
    """The gradient of the trainable bias of the model's last registered Linear layer."""
    bias_name = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            bias = module.bias
            trainable = bias is not None and bias.requires_grad
            bias_name = (f"{name}.bias" if name else "bias") if trainable else None
    if bias_name is None or bias_name not in gradient:
        raise ValueError("cannot recover the label without a bias in the last Linear: pass label.")
    return gradient[bias_name]


def _recover_label(bias: torch.Tensor) -> torch.Tensor:
    r"""iDLG: the true class of a single example from the last layer's bias gradient ``bias``.

    For cross-entropy, :math:`\partial \ell / \partial b = \mathrm{softmax}(z) - e_y`: every
    entry is positive except the one of the true class, which is :math:`p_y - 1 < 0`. Warns if
    ``bias`` looks like a batch's gradient instead.
    """
    negative = int((bias < 0).sum())
    # softmax - e_y sums to 0 with one negative entry; a batch mean sums to 0 with one per
    # class present; noise breaks the sum (a noised gradient is not taken for a batch).
    if negative > 1 and abs(float(bias.sum())) <= 1e-3 * float(bias.abs().sum()):
        warnings.warn(
            f"the last layer's bias gradient sums to zero and has {negative} negative "
            f"entries, where one example's has one: it is the gradient of a batch of at "
            f"least {negative} examples. Pass batch_size and label, or the reconstruction is "
            "a blend.",
            UserWarning,
            stacklevel=3,
        )
    return bias.argmin().reshape(1)


def _total_variation(images: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of vertically and horizontally neighbouring pixels."""
    return (images[:, 1:, :] - images[:, :-1, :]).abs().mean() + (
        images[:, :, 1:] - images[:, :, :-1]
    ).abs().mean()


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
    For larger batches pass the labels; a batch's gradient attacked as one example's gives a
    blend of its inputs, and the attack warns when it can tell (see Warns).

    Why it works so well on fully connected models: see :mod:`companion.attacks` (the first
    layer's gradient is a scaled copy of the input). The model is not changed: neither its
    parameters nor their ``.grad`` attributes (derivatives are taken with
    :func:`torch.autograd.grad`), nor its train/eval mode.

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
            product is the number of input features. Without it the number is read from the
            first registered layer (a ``Linear`` or ``Unflatten``), which misleads if the layers
            are registered in another order than they run.
        bounds: ``(low, high)`` the inputs are clamped to after each step (``(0, 1)`` for the
            digits), or ``None`` for no clamping.
        seed: seed of the generator that draws the initial dummy inputs (the attacker's own,
            public randomness, hence a fixed default).
        progress: show a tqdm progress bar over the steps.

    Returns:
        An :class:`InversionResult` with the reconstructed inputs, the labels used and the loss
        after each step.

    Raises:
        TypeError: if ``model`` is not a module or an argument has the wrong type.
        ValueError: if the gradient does not match the model's trainable parameters, an
            argument is out of range, the model does not take inputs of the size found (or of
            ``image_shape``), returns one output per example (a ``"bce"`` model), or the label
            has the wrong shape or is missing for ``batch_size > 1``.

    Warns:
        UserWarning: if ``label=None`` and ``batch_size=1`` but the gradient is a batch's (its
            last bias gradient sums to zero with several negative entries).

    Example:
        >>> from companion import data, models
        >>> from companion.attacks import reconstruction_similarity
        >>> digits = data.load_digits()
        >>> model = models.mlp(seed=0)
        >>> g = model_gradient(model, digits.x_train[:1], digits.y_train[:1])
        >>> result = invert_gradient(model, g, steps=30, lr=0.1)
        >>> result.y.tolist() == digits.y_train[:1].tolist()  # the label, recovered exactly
        True
        >>> reconstruction_similarity(digits.x_train[0], result.x[0]) > 0.9
        True
    """
    model = check_model(model)
    params = trainable_named(model)
    target = _check_gradient(gradient, params)
    batch_size = check_positive_int("batch_size", batch_size)
    steps = check_positive_int("steps", steps)
    lr = check_positive("lr", lr)
    if distance not in _DISTANCES:
        raise ValueError(f"distance must be one of {_DISTANCES}, got {distance!r}.")
    tv_weight = check_nonnegative("tv_weight", tv_weight)
    image_shape = _check_couple("image_shape", image_shape, "(height, width)", check_positive_int)
    if tv_weight > 0 and image_shape is None:
        raise ValueError(
            "tv_weight > 0 needs image_shape, the (height, width) of the images, e.g. (8, 8)."
        )
    n_features = _input_features(model, image_shape)
    bounds = _check_couple("bounds", bounds, "(low, high)", check_real)
    if bounds is not None and not bounds[0] < bounds[1]:
        raise ValueError(f"bounds must satisfy low < high, got {bounds!r}.")
    labels = _check_label(label, batch_size)
    generator = torch_generator(seed)
    if labels is None:
        if batch_size > 1:
            raise ValueError(
                "label is required for batch_size > 1: analytic label recovery is implemented for "
                "a single example only. Pass batch_size labels."
            )
        labels = _recover_label(_last_bias_gradient(model, target))

    first = params[0][1]
    low, high = bounds if bounds is not None else (0.0, 1.0)
    start = low + (high - low) * torch.rand(
        batch_size, n_features, generator=generator, dtype=torch.float64
    )
    dummy = start.to(dtype=first.dtype, device=first.device).requires_grad_(True)
    labels = labels.to(first.device)
    try:
        with torch.no_grad(), eval_mode(model):
            n_classes = model(dummy).shape[-1]
    except RuntimeError as error:  # a shape mismatch inside the model
        where = f"the first layer registered takes {n_features} input features"
        if image_shape is not None:
            where = f"image_shape {image_shape} has {n_features} pixels"
        raise ValueError(
            f"{where}, but the model does not accept inputs of that size ({error}). The dummy "
            f"inputs are flat, (batch, {n_features}): a model that takes images needs an "
            "nn.Unflatten(1, (C, H, W)) first. Pass image_shape with as many pixels as the model "
            "takes (layers registered in another order than they run can mislead the guess)."
        ) from None
    if n_classes < 2:
        raise ValueError(
            f"the model returns {n_classes} output per example; invert_gradient attacks models "
            "of class logits trained with cross-entropy, not one-logit ('bce') models."
        )
    if (labels >= n_classes).any():
        raise ValueError(
            f"label must hold classes below the model's {n_classes} outputs, got {labels.tolist()}."
        )

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
            result = 1 - flat @ flat_target / (
                torch.linalg.vector_norm(flat) * target_norm + _COSINE_EPS
            )
        if tv_weight > 0:
            assert image_shape is not None
            result = result + tv_weight * _total_variation(inputs.reshape(-1, *image_shape))
        return result

    optimizer = torch.optim.Adam([dummy], lr=lr)
    losses: list[float] = []
    value = matching_loss(dummy)
    bar = progress_bar(range(steps), progress=progress, desc="gradient inversion", unit="step")
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
