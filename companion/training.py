r"""Plain, reusable training and evaluation loops (no privacy).

:func:`train` is minibatch stochastic gradient descent: each epoch shuffles the training set with
a seeded :class:`torch.Generator`, cuts it into batches of ``batch_size`` (the last one may be
smaller) and, for each batch :math:`B`, updates the parameters by

.. math:: \theta \leftarrow \theta - \eta \, \nabla_\theta \frac{1}{|B|} \sum_{i \in B} \ell(\theta; x_i, y_i).

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

from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from companion._validation import check_positive, check_positive_int, check_seed

__all__ = ["LossName", "evaluate", "to_tensors", "train"]

LossName = Literal["cross_entropy", "bce"]
_LOSSES = ("cross_entropy", "bce")

ArrayLike = np.ndarray | torch.Tensor


# --- losses -------------------------------------------------------------------------------------


def _check_loss(loss: object) -> str:
    if loss not in _LOSSES:
        raise ValueError(f"loss must be one of {_LOSSES}, got {loss!r}.")
    return str(loss)


def _bce_logits(outputs: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
    """Binary cross-entropy on logits; outputs of shape (N, 1) are matched to targets (N,)."""
    if outputs.ndim == targets.ndim + 1 and outputs.shape[-1] == 1:
        outputs = outputs.squeeze(-1)
    return F.binary_cross_entropy_with_logits(outputs, targets.to(outputs.dtype), reduction=reduction)


def _loss_fn(loss: str, reduction: str = "mean") -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss ``(outputs, targets) -> tensor`` named ``loss`` with the given reduction."""
    if loss == "cross_entropy":
        return lambda outputs, targets: F.cross_entropy(outputs, targets, reduction=reduction)
    return lambda outputs, targets: _bce_logits(outputs, targets, reduction)


def _correct(outputs: torch.Tensor, targets: torch.Tensor, loss: str) -> torch.Tensor:
    """Boolean tensor: which predictions are right (argmax, or logit > 0 for ``bce``)."""
    if loss == "cross_entropy":
        return outputs.argmax(dim=-1) == targets
    return (outputs.reshape(targets.shape) > 0) == (targets > 0.5)


# --- data ---------------------------------------------------------------------------------------


def to_tensors(x: ArrayLike, y: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn numpy inputs and labels into the tensors the models take.

    Inputs become float32; integer labels become int64 and float labels float32. Tensors are
    passed through unchanged.

    Args:
        x: inputs, shape ``(N, n_features)``.
        y: labels, shape ``(N,)``.

    Returns:
        ``(x, y)`` as tensors.
    """
    if isinstance(x, np.ndarray):
        if not np.issubdtype(x.dtype, np.number) or x.dtype == bool:
            raise TypeError(f"x must be a numeric array, got dtype {x.dtype}.")
        x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if isinstance(y, np.ndarray):
        if np.issubdtype(y.dtype, np.integer) or y.dtype == bool:
            y = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
        elif np.issubdtype(y.dtype, np.floating):
            y = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))
        else:
            raise TypeError(f"y must be an integer or float array, got dtype {y.dtype}.")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor or a numpy array, got {type(x).__name__}.")
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y must be a torch.Tensor or a numpy array, got {type(y).__name__}.")
    return x, y


def _check_data(
    x: ArrayLike, y: ArrayLike, *, loss: str, names: tuple[str, str] = ("x", "y")
) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert and validate a data set: matching lengths, finite float inputs, valid labels."""
    name_x, name_y = names
    try:
        x, y = to_tensors(x, y)
    except TypeError as error:  # to_tensors names its arguments x and y: use the caller's names
        message = str(error)
        for old, new in (("x ", name_x), ("y ", name_y)):
            if message.startswith(old):
                message = f"{new} {message[len(old):]}"
        raise TypeError(message) from None
    if not x.is_floating_point():
        raise TypeError(f"{name_x} must hold floating-point inputs, got dtype {x.dtype}.")
    if x.ndim < 2:
        raise ValueError(f"{name_x} must have shape (N, n_features), got shape {tuple(x.shape)}.")
    if y.ndim != 1:
        raise ValueError(f"{name_y} must have shape (N,), got shape {tuple(y.shape)}.")
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"{name_x} and {name_y} must have the same number of examples, got {x.shape[0]} and "
            f"{y.shape[0]}."
        )
    if x.shape[0] == 0:
        raise ValueError(f"{name_x} must hold at least one example.")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name_x} must not contain NaN or infinite values.")
    if loss == "cross_entropy":
        if y.is_floating_point() or y.dtype == torch.bool:
            raise TypeError(f"{name_y} must hold integer class labels for loss='cross_entropy', got dtype {y.dtype}.")
        if (y < 0).any():
            raise ValueError(f"{name_y} must hold class labels >= 0.")
    elif not ((y == 0) | (y == 1)).all():
        raise ValueError(f"{name_y} must hold labels 0 or 1 for loss='bce'.")
    return x, y


def _check_model(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    return model


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters (none has requires_grad=True).")
    return params


def _check_optional_test(
    x_test: ArrayLike | None, y_test: ArrayLike | None, *, loss: str
) -> tuple[torch.Tensor, torch.Tensor] | None:
    if (x_test is None) != (y_test is None):
        raise ValueError("x_test and y_test must be given together (or both left out).")
    if x_test is None:
        return None
    assert y_test is not None
    return _check_data(x_test, y_test, loss=loss, names=("x_test", "y_test"))


def _epoch_record(
    model: nn.Module,
    epoch: int,
    train_data: tuple[torch.Tensor, torch.Tensor],
    test_data: tuple[torch.Tensor, torch.Tensor] | None,
    loss: str,
) -> dict[str, Any]:
    """Loss and accuracy on the training set (and the test set, if given) after an epoch."""
    record: dict[str, Any] = {"epoch": epoch}
    scores = _evaluate(model, *train_data, loss=loss)
    record["train_loss"], record["train_accuracy"] = scores["loss"], scores["accuracy"]
    if test_data is not None:
        scores = _evaluate(model, *test_data, loss=loss)
        record["test_loss"], record["test_accuracy"] = scores["loss"], scores["accuracy"]
    return record


# --- evaluation ---------------------------------------------------------------------------------


def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, loss: str) -> dict[str, float]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            outputs = model(x)
            mean_loss = _loss_fn(loss)(outputs, y)
            accuracy = _correct(outputs, y, loss).double().mean()
    finally:
        model.train(was_training)
    return {"accuracy": float(accuracy), "loss": float(mean_loss)}


def evaluate(model: nn.Module, x: ArrayLike, y: ArrayLike, *, loss: LossName = "cross_entropy") -> dict[str, float]:
    """Accuracy and mean loss of ``model`` on ``(x, y)``, without gradients.

    The model is put in evaluation mode for the pass and returned to its previous mode.

    Args:
        model: a classifier returning logits.
        x: inputs, shape ``(N, n_features)``.
        y: labels, shape ``(N,)``: integer classes, or 0/1 for ``loss="bce"``.
        loss: ``"cross_entropy"`` (one logit per class) or ``"bce"`` (one logit; prediction
            is ``logit > 0``).

    Returns:
        ``{"accuracy": float, "loss": float}``.
    """
    model = _check_model(model)
    loss = _check_loss(loss)
    x, y = _check_data(x, y, loss=loss)
    return _evaluate(model, x, y, loss=loss)


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
    :mod:`companion.dpsgd` for per-example clipping).

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

    Example:
        >>> from companion import data, models
        >>> digits = data.load_digits()
        >>> model = models.mlp(seed=0)
        >>> history = train(model, digits.x_train, digits.y_train, epochs=2, batch_size=64,
        ...                 lr=0.1)  # doctest: +SKIP
        >>> history[-1]["train_accuracy"]  # doctest: +SKIP
        0.7...
    """
    model = _check_model(model)
    loss = _check_loss(loss)
    x, y = _check_data(x, y, loss=loss)
    test_data = _check_optional_test(x_test, y_test, loss=loss)
    epochs = check_positive_int("epochs", epochs)
    batch_size = check_positive_int("batch_size", batch_size)
    lr = check_positive("lr", lr)
    if max_grad_norm is not None:
        max_grad_norm = check_positive("max_grad_norm", max_grad_norm)
    generator = _generator(seed)
    params = _trainable(model)
    loss_fn = _loss_fn(loss)
    n = x.shape[0]

    history: list[dict[str, Any]] = []
    model.train()
    bar = tqdm(range(1, epochs + 1), desc="SGD", unit="epoch", disable=not progress)
    for epoch in bar:
        norms: list[float] = []
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            index = order[start : start + batch_size]
            for p in params:
                p.grad = None
            loss_fn(model(x[index]), y[index]).backward()
            if max_grad_norm is not None:
                norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            elif record_grad_norms:
                norm = torch.linalg.vector_norm(
                    torch.stack([torch.linalg.vector_norm(p.grad) for p in params if p.grad is not None])
                )
            if record_grad_norms:
                norms.append(float(norm))
            with torch.no_grad():
                for p in params:
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-lr)
        for p in params:
            p.grad = None
        record = _epoch_record(model, epoch, (x, y), test_data, loss)
        if record_grad_norms:
            record["grad_norms"] = norms
        history.append(record)
        bar.set_postfix(_postfix(record))
    bar.close()
    return history


def _generator(seed: object) -> torch.Generator:
    """A CPU :class:`torch.Generator` seeded with ``seed`` (an integer >= 0)."""
    return torch.Generator().manual_seed(check_seed(seed))


def _postfix(record: dict[str, Any]) -> dict[str, str]:
    """The numbers of an epoch record shown in a progress bar."""
    keys = ("train_loss", "train_accuracy", "test_accuracy", "epsilon")
    return {key: f"{record[key]:.3g}" for key in keys if key in record}
