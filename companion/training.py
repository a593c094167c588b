r"""Plain, reusable training and evaluation loops (no privacy).

:func:`train` is minibatch stochastic gradient descent: each epoch shuffles the training set with
a seeded :class:`torch.Generator`, cuts it into batches of ``batch_size`` (the last one may be
smaller) and, for each batch :math:`B`, updates the parameters by

.. math::

    \theta \leftarrow \theta - \eta \, \nabla_\theta \frac{1}{|B|}
    \sum_{i \in B} \ell(\theta; x_i, y_i).

With ``max_grad_norm`` set, the *batch* gradient is rescaled to norm at most :math:`C` before
the update (:func:`torch.nn.utils.clip_grad_norm_`). That is ordinary gradient clipping, a tool
for stable training (Pascanu, Mikolov and Bengio 2013): it gives no privacy at all, because one
example can still move the clipped batch gradient arbitrarily far in direction. DP-SGD clips each
*example's* gradient instead; see :mod:`companion.dpsgd`.

:func:`evaluate` reports accuracy and mean loss. Both loops take the same tensors as every model
in :mod:`companion.models`: inputs of shape ``(N, n_features)`` and labels of shape ``(N,)``,
integer classes for ``loss="cross_entropy"`` and 0/1 for ``loss="bce"`` (one output logit,
:class:`torch.nn.BCEWithLogitsLoss`). numpy arrays are accepted and converted with
:func:`to_tensors`. The federated-learning chapter reuses :func:`train` for the clients' local
updates.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from companion._outputs import check_outputs
from companion._progress import progress_loop
from companion._random import torch_generator
from companion._runs import check_test
from companion._torch import (
    ArrayLike,
    LossName,
    check_data,
    check_loss,
    check_model,
    epoch_record,
    evaluate_model,
    loss_fn,
    model_device,
    to_tensors,
    trainable,
)
from companion._validation import check_positive, check_positive_int, check_seed

__all__ = ["LossName", "evaluate", "to_tensors", "train"]


def evaluate(
    model: nn.Module, x: ArrayLike, y: ArrayLike, *, loss: LossName = "cross_entropy"
) -> dict[str, float]:
    """Accuracy and mean loss of ``model`` on ``(x, y)``, without gradients.

    The model is put in evaluation mode for the pass and returned to its previous mode. The loss
    is the mean over the examples of the cross-entropy (or binary cross-entropy on the logit);
    the accuracy is the share of examples whose prediction is the label. See the chapter's
    section :ref:`sec-dpsgd-digits`.

    Args:
        model: a classifier returning logits.
        x: inputs, shape ``(N, n_features)`` (tensor or numpy array).
        y: labels, shape ``(N,)``: integer classes, or 0/1 for ``loss="bce"``.
        loss: ``"cross_entropy"`` (one logit per class) or ``"bce"`` (one logit; prediction
            is ``logit > 0``).

    Returns:
        ``{"accuracy": float, "loss": float}``.

    Raises:
        TypeError: if ``model`` is not a ``torch.nn.Module``, ``x`` or ``y`` is not a tensor or
            numeric numpy array, ``x`` is boolean or complex, or the labels of
            ``loss="cross_entropy"`` are not integers.
        ValueError: if ``loss`` is unknown, the shapes or lengths of ``x`` and ``y`` do not
            fit, there are no examples, ``x`` holds NaN or infinite values, the model cannot
            be applied to ``x``, or a label is negative, not below the number of outputs (or
            not 0/1 for ``loss="bce"``).

    Example:
        >>> from companion import data, models
        >>> digits = data.load_digits()
        >>> scores = evaluate(models.mlp(seed=0), digits.x_test[:64], digits.y_test[:64])
        >>> sorted(scores), round(scores["loss"], 2)  # untrained: near log(10) = 2.30
        (['accuracy', 'loss'], 2.32)
    """
    model = check_model(model)
    loss = check_loss(loss)
    x, y = check_data(x, y, loss=loss, device=model_device(model))
    check_outputs(model, x, y, loss=loss)
    return evaluate_model(model, x, y, loss=loss)


# --- training -----------------------------------------------------------------------------------


def train(
    model: nn.Module,
    x: ArrayLike,
    y: ArrayLike,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int = 0,
    max_grad_norm: float | None = None,
    loss: LossName = "cross_entropy",
    record_grad_norms: bool = False,
    x_test: ArrayLike | None = None,
    y_test: ArrayLike | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    r"""Train ``model`` in place with minibatch SGD; return one record per epoch.

    Each epoch draws a fresh permutation of the ``N`` examples from a :class:`torch.Generator`
    seeded with ``seed`` and takes :math:`\lceil N / \text{batch\_size} \rceil` steps of plain SGD
    on the mean loss of each batch (no momentum, no weight decay).

    ``max_grad_norm`` turns on ordinary clipping of the batch gradient with
    :func:`torch.nn.utils.clip_grad_norm_`: if the norm :math:`g` of the whole batch gradient
    exceeds :math:`C`, the gradient is multiplied by :math:`C / (g + 10^{-6})`. This stabilises
    training against rare huge gradients; it is **not** differential privacy (see
    :mod:`companion.dpsgd` for per-example clipping). See the chapter's section
    :ref:`sec-dpsgd-clipping`.

    Args:
        model: the model to train; its parameters are updated in place.
        x: training inputs, shape ``(N, n_features)`` (tensor or numpy array).
        y: training labels, shape ``(N,)``.
        epochs: number of passes over the data, >= 1.
        batch_size: examples per step, >= 1.
        lr: learning rate, > 0.
        seed: seed of the shuffling generator.
        max_grad_norm: clip the batch gradient to this L2 norm (> 0); None for no clipping.
        loss: ``"cross_entropy"`` or ``"bce"`` (binary, one output logit).
        record_grad_norms: record the L2 norm of every step's batch gradient *before*
            clipping, in the epoch record's ``"grad_norms"``.
        x_test, y_test: optional held-out data, evaluated after every epoch.
        progress: show a tqdm progress bar over the epochs.

    Returns:
        One dict per epoch, with keys ``"epoch"`` (1, 2, ...), ``"train_loss"`` and
        ``"train_accuracy"`` (the whole training set, evaluated after the epoch),
        ``"test_loss"`` and ``"test_accuracy"`` if test data were given, and ``"grad_norms"``
        (a list of floats, one per step) if ``record_grad_norms``.

    Raises:
        TypeError: if ``model`` is not a ``torch.nn.Module``, the data are not tensors or
            numeric numpy arrays of the right dtypes, ``epochs``, ``batch_size`` or ``seed`` is
            not an integer, or ``lr`` or ``max_grad_norm`` is not a real number.
        ValueError: if ``loss`` is unknown, the data's shapes, lengths or values are invalid,
            the model cannot be applied to the inputs or its outputs do not fit the loss and
            labels, only one of ``x_test`` and ``y_test`` is given, ``epochs`` or
            ``batch_size`` is < 1, ``lr`` or ``max_grad_norm`` is not finite and > 0, ``seed``
            is negative, or the model has no trainable parameters.

    Example:
        >>> from companion import data, models
        >>> digits = data.load_digits()
        >>> model = models.logistic_regression(seed=0)
        >>> history = train(model, digits.x_train[:64], digits.y_train[:64], epochs=3,
        ...                 batch_size=16, lr=0.5, x_test=digits.x_test[:64],
        ...                 y_test=digits.y_test[:64], record_grad_norms=True)
        >>> [(r["epoch"], r["train_accuracy"], r["test_accuracy"]) for r in history]
        [(1, 0.4375, 0.40625), (2, 0.71875, 0.5), (3, 0.890625, 0.75)]
        >>> sorted(history[0]), len(history[0]["grad_norms"])  # 64 / 16 = 4 steps an epoch
        (['epoch', 'grad_norms', 'test_accuracy', 'test_loss', 'train_accuracy', 'train_loss'], 4)
    """
    model = check_model(model)
    loss = check_loss(loss)
    device = model_device(model)
    x, y = check_data(x, y, loss=loss, device=device)
    check_outputs(model, x, y, loss=loss)
    test_data = check_test(model, x_test, y_test, loss=loss, device=device)
    epochs = check_positive_int("epochs", epochs)
    batch_size = check_positive_int("batch_size", batch_size)
    _refuse_batches_of_one(model, x.shape[0], batch_size)
    lr = check_positive("lr", lr)
    if max_grad_norm is not None:
        max_grad_norm = check_positive("max_grad_norm", max_grad_norm)
    generator = torch_generator(check_seed(seed))
    params = trainable(model)
    mean_loss = loss_fn(loss)
    n = x.shape[0]

    history: list[dict[str, Any]] = []
    model.train()
    for epoch in progress_loop(
        epochs, history=history, desc="SGD", unit="epoch", progress=progress
    ):
        norms: list[float] = []
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            index = order[start : start + batch_size]
            for p in params:
                p.grad = None
            mean_loss(model(x[index]), y[index]).backward()
            if max_grad_norm is not None:
                norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            elif record_grad_norms:
                norm = torch.linalg.vector_norm(
                    torch.stack(
                        [torch.linalg.vector_norm(p.grad) for p in params if p.grad is not None]
                    )
                )
            if record_grad_norms:
                norms.append(float(norm))
            with torch.no_grad():
                for p in params:
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-lr)
        for p in params:
            p.grad = None
        record = epoch_record(model, epoch, (x, y), test_data, loss)
        if record_grad_norms:
            record["grad_norms"] = norms
        history.append(record)
    return history


def _refuse_batches_of_one(model: nn.Module, n: int, batch_size: int) -> None:
    """Refuse a last batch of one example for a model with batch normalisation in training mode,
    which cannot normalise one example (torch's error would not name ``batch_size``)."""
    norms = [name for name, m in model.named_modules() if isinstance(m, _BatchNorm) and m.training]
    if norms and n % batch_size == 1:
        raise ValueError(
            f"x has {n} examples and batch_size={batch_size}, so the last batch of each epoch "
            f"holds one example, which batch normalisation (layer {norms[0]!r}) cannot normalise "
            "in training mode: choose a batch_size that leaves no batch of one."
        )
