r"""Small models for the 8x8 digits and for two-input toy problems.

Every model is a plain :class:`torch.nn.Sequential` built from a seed, and every model takes the
same tensors: a float batch of shape ``(N, n_features)``. The convolutional network reshapes its
flat input of 64 pixels to ``(N, 1, 8, 8)`` itself, so a training loop never needs to know which
model it trains.

- :func:`logistic_regression`: one linear layer; softmax regression over ``n_classes`` outputs.
- :func:`mlp`: one hidden ReLU layer, 64-128-10 by default.
- :func:`small_cnn`: two 3x3 convolutions with ReLU and 2x2 max-pooling, then a linear layer
  (8x8 -> 4x4 -> 2x2, so the last layer sees :math:`32 \cdot 2 \cdot 2 = 128` features).
- :func:`binary_mlp`: two inputs, ten hidden ReLU units and **one** output logit, for binary
  problems trained with :class:`torch.nn.BCEWithLogitsLoss` (the sigmoid lives in the loss).

Models are initialised with PyTorch's default initialisation, drawn inside
:func:`torch.random.fork_rng` from ``seed``: the same seed gives the same weights, and building a
model leaves the global random state exactly as it was.

.. rubric:: Why there is no batch normalisation

Batch normalisation (Ioffe and Szegedy 2015) normalises each feature by the mean and variance of
*the batch*, so the output for one example depends on every other example in the batch. Two
things follow. The gradient of one example's loss is no longer a function of that example alone,
so the "per-example gradient" that DP-SGD clips is not defined, and clipping it no longer bounds
how much one person can change the summed gradient: the sensitivity argument of DP-SGD (Abadi et
al. 2016) breaks. And the running statistics that batch normalisation keeps for evaluation are
averages over the raw training data, released with the model without any noise. Opacus refuses
such models for the same reason and suggests :class:`torch.nn.GroupNorm`, which normalises within
one example. :func:`companion.per_example.check_dp_compatible` rejects them here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from companion._validation import check_positive_int, check_seed

__all__ = ["binary_mlp", "logistic_regression", "mlp", "small_cnn"]


def _seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """Run ``build`` with the CPU generator seeded by ``seed``, then restore the global state.

    Only the CPU generator: ``torch.manual_seed`` would also reseed every GPU's generator, which
    ``fork_rng(devices=[])`` does not restore.
    """
    seed = check_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return build()


def logistic_regression(*, n_features: int = 64, n_classes: int = 10, seed: int = 0) -> nn.Module:
    r"""Multinomial logistic regression: one linear layer producing ``n_classes`` logits.

    The model is :math:`x \mapsto W x + b`; with the softmax inside the cross-entropy loss this is
    softmax regression. Its loss is convex in :math:`(W, b)`. See the chapter's section
    :ref:`sec-dpsgd-opacus`.

    Args:
        n_features: number of inputs (64 for the digits), >= 1.
        n_classes: number of classes, >= 2.
        seed: seed of the initial weights, an int >= 0 (public randomness, default 0).

    Returns:
        ``nn.Sequential(nn.Linear(n_features, n_classes))``.

    Raises:
        TypeError: if an argument is not an integer.
        ValueError: if ``n_features < 1``, ``n_classes < 2`` or ``seed`` is negative.

    Example:
        >>> model = logistic_regression()
        >>> model(torch.zeros(4, 64)).shape, sum(p.numel() for p in model.parameters())
        (torch.Size([4, 10]), 650)
    """
    n_features = check_positive_int("n_features", n_features)
    n_classes = _check_classes(n_classes)
    return _seeded(seed, lambda: nn.Sequential(nn.Linear(n_features, n_classes)))


def mlp(
    *, n_features: int = 64, hidden: int = 128, n_classes: int = 10, seed: int = 0
) -> nn.Module:
    r"""A multilayer perceptron with one hidden ReLU layer (64-128-10 by default).

    See the chapter's section :ref:`sec-dpsgd-digits`.

    Args:
        n_features: number of inputs (64 for the digits), >= 1.
        hidden: width of the hidden layer, >= 1.
        n_classes: number of classes (output logits), >= 2.
        seed: seed of the initial weights, an int >= 0 (public randomness, default 0).

    Returns:
        ``Linear(n_features, hidden) -> ReLU -> Linear(hidden, n_classes)``.

    Raises:
        TypeError: if an argument is not an integer.
        ValueError: if ``n_features`` or ``hidden`` is < 1, ``n_classes < 2`` or ``seed`` is
            negative.

    Example:
        >>> model = mlp(seed=1)
        >>> model(torch.zeros(4, 64)).shape, sum(p.numel() for p in model.parameters())
        (torch.Size([4, 10]), 9610)
        >>> torch.equal(model[0].weight, mlp(seed=1)[0].weight)  # same seed, same weights
        True
    """
    n_features = check_positive_int("n_features", n_features)
    hidden = check_positive_int("hidden", hidden)
    n_classes = _check_classes(n_classes)
    return _seeded(
        seed,
        lambda: nn.Sequential(
            nn.Linear(n_features, hidden), nn.ReLU(), nn.Linear(hidden, n_classes)
        ),
    )


def small_cnn(*, n_classes: int = 10, seed: int = 0) -> nn.Module:
    r"""A small convolutional network for the 8x8 digits; it takes flat inputs of shape (N, 64).

    Layers: reshape to ``(N, 1, 8, 8)``; 3x3 convolution 1 -> 16 channels (padding 1), ReLU,
    2x2 max-pooling (8x8 -> 4x4); 3x3 convolution 16 -> 32 (padding 1), ReLU, 2x2 max-pooling
    (4x4 -> 2x2); flatten to 128 features; linear layer to ``n_classes`` logits. 6,090
    parameters with 10 classes, no normalisation layers. See the chapter's section
    :ref:`sec-dpsgd-opacus`.

    Args:
        n_classes: number of classes (output logits), >= 2.
        seed: seed of the initial weights, an int >= 0 (public randomness, default 0).

    Returns:
        The network, an ``nn.Sequential``; outputs have shape ``(N, n_classes)``.

    Raises:
        TypeError: if an argument is not an integer.
        ValueError: if ``n_classes < 2`` or ``seed`` is negative.

    Example:
        >>> model = small_cnn()
        >>> model(torch.zeros(4, 64)).shape, sum(p.numel() for p in model.parameters())
        (torch.Size([4, 10]), 6090)
    """
    n_classes = _check_classes(n_classes)
    return _seeded(
        seed,
        lambda: nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 2 * 2, n_classes),
        ),
    )


def binary_mlp(*, n_features: int = 2, hidden: int = 10, seed: int = 0) -> nn.Module:
    r"""A binary classifier: one hidden ReLU layer and a single output logit.

    The output is the logit :math:`z`; the predicted probability of class 1 is
    :math:`\sigma(z) = 1 / (1 + e^{-z})` and the prediction is :math:`z > 0`. Train it with
    :class:`torch.nn.BCEWithLogitsLoss` (``loss="bce"`` in :mod:`companion.training`), which
    applies the sigmoid inside the loss in a numerically stable way; do not put a sigmoid layer
    in the model as well.

    This is the corrected version of a listing in the source document, which used Keras
    ``Dense(10, activation="relu") -> Dense(1, activation="sigmoid")``: the same network, with
    the sigmoid moved into the loss.

    See the chapter's section :ref:`sec-dpsgd-listing`.

    Args:
        n_features: number of inputs (2 for the two-moons data), >= 1.
        hidden: width of the hidden layer, >= 1.
        seed: seed of the initial weights, an int >= 0 (public randomness, default 0).

    Returns:
        ``Linear(n_features, hidden) -> ReLU -> Linear(hidden, 1)``; outputs have shape (N, 1).

    Raises:
        TypeError: if an argument is not an integer.
        ValueError: if ``n_features`` or ``hidden`` is < 1, or ``seed`` is negative.

    Example:
        >>> model = binary_mlp()
        >>> model(torch.zeros(4, 2)).shape, sum(p.numel() for p in model.parameters())
        (torch.Size([4, 1]), 41)
    """
    n_features = check_positive_int("n_features", n_features)
    hidden = check_positive_int("hidden", hidden)
    return _seeded(
        seed,
        lambda: nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(), nn.Linear(hidden, 1)),
    )


def _check_classes(n_classes: object) -> int:
    n_classes = check_positive_int("n_classes", n_classes)
    if n_classes < 2:
        raise ValueError(
            f"n_classes must be >= 2, got {n_classes}; for a binary problem with one logit use "
            "binary_mlp."
        )
    return n_classes
