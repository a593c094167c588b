"""Client data and local training: the clients' side of federated learning.

Part of :mod:`companion.federated`; import from there.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from companion._outputs import check_outputs
from companion._random import derive_seed, torch_generator
from companion._torch import (
    ArrayLike,
    LossName,
    check_data,
    check_loss,
    check_model,
    loss_fn,
    model_device,
    to_tensors,
    trainable_named,
)
from companion._validation import (
    check_index_parts,
    check_nonnegative,
    check_positive,
    check_positive_int,
)

__all__ = ["Client", "Update", "client_datasets", "local_update"]

Client = tuple[torch.Tensor, torch.Tensor]
"""One client's data set, as inputs of shape ``(n_k, n_features)`` and labels ``(n_k,)``."""

Update = Mapping[str, torch.Tensor]
"""A client's update, as a map from parameter name -> new weights minus the global weights."""


# --- clients ------------------------------------------------------------------------------------


def client_datasets(x: ArrayLike, y: ArrayLike, parts: Sequence[Any]) -> list[Client]:
    """Split a data set among clients by lists of indices.

    Args:
        x: inputs, shape ``(N, n_features)`` (tensor or numpy array, converted with
            :func:`companion.training.to_tensors`).
        y: labels, shape ``(N,)``.
        parts: one array of integer indices into ``0 .. N-1`` per client, as returned by
            :func:`companion.data.partition_iid`, :func:`~companion.data.partition_shards` or
            :func:`~companion.data.partition_dirichlet`. Parts need not be disjoint; each must
            be non-empty.

    Returns:
        One ``(x_k, y_k)`` pair of tensors per part, in the order of ``parts`` (copies, not
        views of ``x`` and ``y``).

    Raises:
        TypeError: if ``x`` or ``y`` is not a tensor or numeric array, ``parts`` is not a list,
            or a part holds non-integer indices.
        ValueError: if the shapes do not fit, ``parts`` is empty, or a part is empty, not
            one-dimensional or holds an index outside ``[0, N)``.

    Example:
        >>> from companion import data
        >>> digits = data.load_digits()
        >>> parts = data.partition_iid(len(digits.y_train), num_clients=10)
        >>> clients = client_datasets(digits.x_train, digits.y_train, parts)
        >>> len(clients), tuple(clients[0][0].shape)
        (10, (135, 64))
    """
    x, y = to_tensors(x, y)
    if x.ndim < 2 or y.ndim != 1:
        raise ValueError(
            f"x must have shape (N, n_features) and y shape (N,), got {tuple(x.shape)} and "
            f"{tuple(y.shape)}."
        )
    n = x.shape[0]
    if y.shape[0] != n:
        raise ValueError(
            f"x and y must have the same number of examples, got {n} and {y.shape[0]}."
        )
    clients: list[Client] = []
    for index in check_index_parts(parts, n):
        rows = torch.from_numpy(index.astype(np.int64))
        clients.append((x[rows], y[rows]))
    return clients


def check_clients(clients: object, *, model: nn.Module, loss: str) -> list[Client]:
    """Validate every client's data set once, and the model's outputs on it; return them as
    tensors on the model's device."""
    device = model_device(model)
    if isinstance(clients, (str, bytes)) or not isinstance(clients, Sequence):
        raise TypeError(
            "clients must be a list of (x, y) pairs (see client_datasets), got "
            f"{type(clients).__name__}."
        )
    if len(clients) == 0:
        raise ValueError("clients must hold at least one client, got an empty list.")
    checked: list[Client] = []
    for k, client in enumerate(clients):
        if not isinstance(client, Sequence) or len(client) != 2:
            raise TypeError(f"clients[{k}] must be an (x, y) pair, got {type(client).__name__}.")
        names = (f"clients[{k}] x", f"clients[{k}] y")
        x, y = check_data(client[0], client[1], loss=loss, names=names, device=device)
        try:
            check_outputs(model, x, y, loss=loss)
        except ValueError as error:
            raise ValueError(f"clients[{k}]: {error}") from None
        checked.append((x, y))
    return checked


def warn_if_running_statistics(model: nn.Module) -> None:
    """Warn that layers with running statistics (BatchNorm) keep their initial ones.

    Only trainable parameters are averaged: the global model's running means and variances are
    never updated, and evaluation normalises with them (0 and 1 for a new BatchNorm layer).
    """
    layers = [
        name or "the model"
        for name, module in model.named_modules()
        if getattr(module, "track_running_stats", False)
    ]
    if layers:
        warnings.warn(
            f"layer(s) {layers} keep running statistics (as BatchNorm does), which federated "
            "averaging does not aggregate: the global model keeps their initial values, and "
            "evaluating it normalises with them. Use GroupNorm or LayerNorm instead.",
            UserWarning,
            stacklevel=3,
        )


def check_batch_size(batch_size: object) -> int | None:
    return None if batch_size is None else check_positive_int("batch_size", batch_size)


# --- local training -----------------------------------------------------------------------------


def local_update(
    model: nn.Module,
    x: ArrayLike,
    y: ArrayLike,
    *,
    epochs: int,
    batch_size: int | None,
    lr: float,
    mu: float = 0.0,
    loss: LossName = "cross_entropy",
    seed: int | None = 0,
) -> dict[str, torch.Tensor]:
    r"""Train a copy of ``model`` on one client's data and return the change of its weights.

    A deep copy of ``model`` (the global model :math:`w_t`) runs ``epochs`` epochs of minibatch
    SGD as :func:`companion.training.train` does: each epoch shuffles the :math:`n_k` examples
    with a :class:`torch.Generator` seeded with ``seed`` and takes a step
    :math:`w \leftarrow w - \eta \nabla F(w)` on the mean loss of each batch of ``batch_size``
    (the last batch may be smaller). With ``mu`` :math:`> 0` the objective is FedProx's (Li et
    al. 2020, "Federated Optimization in Heterogeneous Networks", MLSys, eq. 2),
    :math:`F(w) = L_k(w) + \frac{\mu}{2} \lVert w - w_t \rVert_2^2`, whose extra gradient
    :math:`\mu (w - w_t)` is added to each batch gradient. With :math:`\eta\mu \le 1` each step
    shrinks the distance to :math:`w_t` before the loss gradient is applied; with
    :math:`\eta\mu > 2` the proximal term alone makes the iteration diverge, so choose
    ``lr * mu`` at most 1. ``mu=0`` with the same ``seed`` gives the same weights as
    :func:`companion.training.train` on the copy.

    Args:
        model: the global model; read, not changed. Only parameters with ``requires_grad``
            are trained (buffers, as of BatchNorm, are not part of the update).
        x: the client's inputs, shape ``(n_k, n_features)`` (tensor or numpy array).
        y: the client's labels, shape ``(n_k,)``.
        epochs: local epochs :math:`E`, >= 1.
        batch_size: local batch size :math:`B`, >= 1, or None for the full batch (one step
            per epoch).
        lr: local learning rate :math:`\eta`, > 0.
        mu: FedProx coefficient :math:`\mu`, >= 0 (0 is plain local SGD).
        loss: ``"cross_entropy"`` or ``"bce"``.
        seed: seed of the shuffling generator (public randomness), or None for fresh entropy.

    Returns:
        A dict mapping each trainable parameter's name (as in ``model.named_parameters()``) to
        the new weights minus the given weights, a tensor of the parameter's shape.

    Raises:
        TypeError: if ``model`` is not a module, the data are not tensors or arrays, or an
            integer argument is not an integer.
        ValueError: if the data do not fit the loss, ``epochs``, ``batch_size`` or ``lr`` is
            not positive, ``mu`` is negative or ``lr * mu`` above 2, ``seed`` is negative or the
            model has no trainable parameter.

    Example:
        >>> from companion import data, models
        >>> digits = data.load_digits()
        >>> model = models.logistic_regression()
        >>> update = local_update(model, digits.x_train[:40], digits.y_train[:40],
        ...                       epochs=1, batch_size=10, lr=0.1)
        >>> {name: tuple(value.shape) for name, value in update.items()}
        {'0.weight': (10, 64), '0.bias': (10,)}
    """
    model = check_model(model)
    trainable_named(model)
    loss = check_loss(loss)
    x, y = check_data(x, y, loss=loss, device=model_device(model))
    check_outputs(model, x, y, loss=loss)
    epochs = check_positive_int("epochs", epochs)
    batch_size = check_batch_size(batch_size)
    lr = check_positive("lr", lr)
    mu = check_mu(mu, lr=lr)
    generator = torch_generator(seed)
    return train_locally(model, x, y, epochs, batch_size, lr, mu, loss, generator)


def check_mu(mu: object, *, lr: float) -> float:
    """FedProx's ``mu``: >= 0, with ``lr * mu`` at most 2 (above, the proximal term alone makes
    local training diverge)."""
    mu = check_nonnegative("mu", mu)
    if lr * mu > 2:
        raise ValueError(
            f"lr * mu must be at most 2, got {lr:g} * {mu:g} = {lr * mu:g}: each local step "
            "multiplies the distance to the global model by 1 - lr * mu, here of size above 1, "
            "so local training diverges. Lower mu or lr (with lr * mu at most 1 every step "
            "shrinks the distance)."
        )
    return mu


def train_locally(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    batch_size: int | None,
    lr: float,
    mu: float,
    loss: str,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """:func:`local_update` without argument checks (the loops check once)."""
    local = copy.deepcopy(model)
    local.train()
    params = trainable_named(local)
    start = {name: p.detach().clone() for name, p in params}
    mean_loss = loss_fn(loss)
    n = x.shape[0]
    step = n if batch_size is None else batch_size
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for first in range(0, n, step):
            index = order[first : first + step]
            for _, p in params:
                p.grad = None
            mean_loss(local(x[index]), y[index]).backward()
            with torch.no_grad():
                for name, p in params:
                    if p.grad is None:  # not reached by the forward pass: the prox term is 0 too
                        continue
                    if mu > 0:
                        p.grad.add_(p - start[name], alpha=mu)
                    p.add_(p.grad, alpha=-lr)
    return {name: (p.detach() - start[name]) for name, p in params}


def client_updates(
    model: nn.Module,
    data: Sequence[Client],
    picked: Sequence[int],
    seed: int | None,
    round_: int,
    *args: Any,
) -> list[dict[str, torch.Tensor]]:
    """The picked clients' local updates; client ``k`` shuffles with the stream (seed, round, k).

    ``args`` are :func:`_local_update`'s ``epochs, batch_size, lr, mu, loss``. The streams come
    from :class:`numpy.random.SeedSequence`, so a client's training does not depend on which
    other clients were picked (and with ``seed=None`` every stream is fresh entropy).
    """
    updates = []
    for k in picked:
        generator = torch_generator(derive_seed(seed, round_, k))
        try:
            update = train_locally(model, *data[k], *args, generator)
        except ValueError as error:  # BatchNorm on a last local batch of one example, say
            raise ValueError(
                f"the local training of clients[{k}] ({len(data[k][0])} examples) failed: {error}"
            ) from error
        if diverged := [name for name, value in update.items() if not value.isfinite().all()]:
            raise ValueError(
                f"the local training of clients[{k}] diverged: its update of {diverged[:3]} holds "
                "NaN or inf; lower lr (or check that client's data)."
            )
        updates.append(update)
    return updates
