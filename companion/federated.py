r"""Federated learning: client data, local training, the FedAvg and DP-FedAvg aggregation rules
and the training loops (FedSGD, FedAvg, FedProx, DP-FedAvg).

In federated learning the training data stay with :math:`K` *clients*; a *server* holds the
model and, round after round, sends it to some clients, lets each train on its own data, and
combines the *updates* they send back. This module simulates that in one process: the clients
are a list of ``(x, y)`` tensor pairs (:func:`client_datasets` builds it from a partition in
:mod:`companion.data`). Each round of each loop has the same four steps, and the server's step
is a public pure function that a real federated engine can call as well
(:mod:`companion.flower` does):

1. the server samples clients;
2. each sampled client runs :func:`local_update` and returns :math:`\Delta_k = w_k - w_t`;
3. the server aggregates the updates: :func:`fedavg_aggregate` or :func:`dp_fedavg_aggregate`;
4. the server applies the aggregate to the global weights.

The loops: :func:`fedavg` is FederatedAveraging (McMahan, Moore, Ramage, Hampson and Agüera y
Arcas 2017, "Communication-Efficient Learning of Deep Networks from Decentralized Data",
AISTATS), with FedSGD (one full-batch step per client) as a special case and FedProx (Li, Sahu,
Zaheer, Sanjabi, Talwalkar and Smith 2020, "Federated Optimization in Heterogeneous Networks",
MLSys) for ``mu > 0``; :func:`dp_fedavg` is DP-FedAvg (McMahan, Ramage, Talwar and Zhang 2018,
"Learning Differentially Private Recurrent Language Models", ICLR), differentially private with
respect to whole clients: DP-SGD (:mod:`companion.dpsgd`) with clients in place of examples and
updates in place of gradients, with the same accountant. Each docstring gives the math; the
federated-learning chapter derives it.

The secure-aggregation toy lives in :mod:`companion.secure_aggregation`; its names
(:data:`MODULUS`, :func:`pairwise_seeds`, :func:`mask_update`, :func:`secure_sum`) are
re-exported here.

.. warning::

    Teaching code: every client runs in one process, and :func:`dp_fedavg` draws
    floating-point noise from torch's pseudo-random generator (see its docstring); use a
    maintained framework for real deployments.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from companion._random import check_optional_seed, derive_seed, torch_generator
from companion._torch import (
    ArrayLike,
    LossName,
    add_to_model,
    check_data,
    check_loss,
    check_model,
    check_optional_test,
    evaluate_model,
    loss_fn,
    progress_loop,
    to_tensors,
    trainable_named,
    warn_if_delta_large,
)
from companion._validation import (
    check_delta,
    check_fraction,
    check_nonnegative,
    check_positive,
    check_positive_int,
)
from companion.accounting import RDPAccountant
from companion.dpsgd import add_gaussian_noise
from companion.per_example import clip_factors
from companion.secure_aggregation import MODULUS, mask_update, pairwise_seeds, secure_sum

__all__ = [
    "MODULUS",
    "client_datasets",
    "dp_fedavg",
    "dp_fedavg_aggregate",
    "fedavg",
    "fedavg_aggregate",
    "local_update",
    "mask_update",
    "pairwise_seeds",
    "secure_sum",
]

Client = tuple[torch.Tensor, torch.Tensor]
"""One client's data set: inputs of shape ``(n_k, n_features)`` and labels of shape ``(n_k,)``."""

Update = Mapping[str, torch.Tensor]
"""A client's update: parameter name -> new weights minus the global weights."""


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
    if isinstance(parts, (str, bytes)) or not isinstance(parts, Sequence):
        raise TypeError(f"parts must be a list of index arrays, got {type(parts).__name__}.")
    if len(parts) == 0:
        raise ValueError("parts must hold at least one client's indices, got an empty list.")
    clients: list[Client] = []
    for k, part in enumerate(parts):
        index = np.asarray(part.cpu() if isinstance(part, torch.Tensor) else part)
        if index.ndim != 1:
            raise ValueError(
                f"parts[{k}] must be a one-dimensional index array, got shape {index.shape}."
            )
        if index.size == 0:
            raise ValueError(f"parts[{k}] is empty; every client must hold at least one example.")
        if index.dtype == bool or not np.issubdtype(index.dtype, np.integer):
            raise TypeError(f"parts[{k}] must hold integer indices, got dtype {index.dtype}.")
        if index.min() < 0 or index.max() >= n:
            raise ValueError(
                f"parts[{k}] holds indices out of range: they must lie in [0, {n}), got "
                f"{int(index.min())} .. {int(index.max())}."
            )
        rows = torch.from_numpy(index.astype(np.int64))
        clients.append((x[rows], y[rows]))
    return clients


def _check_clients(clients: object, *, loss: str) -> list[Client]:
    """Validate every client's data set once; return them as tensors."""
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
        checked.append(check_data(client[0], client[1], loss=loss, names=names))
    return checked


def _check_batch_size(batch_size: object) -> int | None:
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
            not positive, ``mu`` is negative, ``seed`` is negative or the model has no
            trainable parameter.

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
    x, y = check_data(x, y, loss=loss)
    epochs = check_positive_int("epochs", epochs)
    batch_size = _check_batch_size(batch_size)
    lr = check_positive("lr", lr)
    mu = check_nonnegative("mu", mu)
    generator = torch_generator(seed)
    return _local_update(model, x, y, epochs, batch_size, lr, mu, loss, generator)


def _local_update(
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


def _client_updates(
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
        updates.append(_local_update(model, *data[k], *args, generator))
    return updates


# --- aggregation rules (the server's step) ------------------------------------------------------


def _check_updates(updates: object, *, allow_empty: bool) -> list[Update]:
    """A list of updates with one set of names and shapes, floating point and finite."""
    if isinstance(updates, (str, bytes, Mapping)) or not isinstance(updates, Sequence):
        raise TypeError(
            "updates must be a list of dicts name -> tensor (one per client, as returned by "
            f"local_update), got {type(updates).__name__}."
        )
    if not updates and not allow_empty:
        raise ValueError("updates must hold at least one client's update, got an empty list.")
    first: Update | None = None
    for k, update in enumerate(updates):
        if not isinstance(update, Mapping) or not update:
            raise TypeError(
                f"updates[{k}] must be a non-empty dict name -> tensor, got "
                f"{type(update).__name__}."
            )
        for name, value in update.items():
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                raise TypeError(f"updates[{k}][{name!r}] must be a floating-point tensor.")
            if not torch.isfinite(value).all():
                raise ValueError(
                    f"updates[{k}][{name!r}] holds NaN or inf: local training diverged; lower lr."
                )
        if first is None:
            first = update
        elif list(update) != list(first) or any(
            update[name].shape != first[name].shape for name in first
        ):
            raise ValueError(
                f"updates[{k}] must have the parameter names and shapes of updates[0]."
            )
    return list(updates)


def fedavg_aggregate(
    updates: Sequence[Update], num_examples: Sequence[int]
) -> dict[str, torch.Tensor]:
    r"""FedAvg's aggregation rule: the mean of the updates weighted by the clients' data sizes.

    .. math:: \bar\Delta = \sum_{k \in S} \frac{n_k}{\sum_{j \in S} n_j} \Delta_k

    (McMahan et al. 2017, Algorithm 1). Weighting by :math:`n_k` makes the average of the
    clients' mean gradients the mean gradient over all their examples; an unweighted mean would
    overweight small clients. A pure function: the inputs are not changed.

    Args:
        updates: one dict name -> tensor per client (see :func:`local_update`), all with the
            same names and shapes.
        num_examples: :math:`n_k`, the number of examples of each client, integers >= 1.

    Returns:
        A new dict name -> tensor, the weighted mean, in the order of ``updates[0]``.

    Raises:
        TypeError: if ``updates`` is not a list of dicts of floating-point tensors or a count
            is not an integer.
        ValueError: if ``updates`` is empty, its length differs from ``num_examples``, the names
            or shapes differ between clients, an update is not finite, or a count is < 1.

    Example:
        >>> import torch
        >>> updates = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 4.0])}]
        >>> fedavg_aggregate(updates, [3, 1])
        {'w': tensor([0.7500, 1.0000])}
    """
    updates = _check_updates(updates, allow_empty=False)
    if isinstance(num_examples, (str, bytes)) or not isinstance(num_examples, Sequence):
        raise TypeError(
            f"num_examples must be a list of integers, got {type(num_examples).__name__}."
        )
    if len(num_examples) != len(updates):
        raise ValueError(
            f"num_examples must hold one count per update: got {len(num_examples)} counts for "
            f"{len(updates)} updates."
        )
    counts = [check_positive_int(f"num_examples[{k}]", n) for k, n in enumerate(num_examples)]
    total = sum(counts)
    average: dict[str, torch.Tensor] = {}
    for update, count in zip(updates, counts, strict=True):
        weight = count / total
        for name, value in update.items():
            if name in average:
                average[name].add_(value, alpha=weight)
            else:
                average[name] = value * weight
    return average


def dp_fedavg_aggregate(
    updates: Sequence[Update],
    *,
    max_update_norm: float,
    noise_multiplier: float,
    expected_clients: float,
    generator: torch.Generator,
    parameter_shapes: Mapping[str, torch.Size] | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    r"""DP-FedAvg's aggregation rule: clip each update, sum, add Gaussian noise, divide by qK.

    McMahan, Ramage, Talwar and Zhang (2018), "Learning Differentially Private Recurrent
    Language Models", ICLR, with equal client weights and the fixed-denominator estimator:

    .. math::

        \tilde\Delta = \frac{1}{qK} \Bigl( \sum_{k \in S} \Delta_k
        \min\Bigl(1, \frac{S}{\lVert \Delta_k \rVert_2 + 10^{-6}}\Bigr)
        + \mathcal N(0, \sigma^2 S^2 I) \Bigr).

    The norm :math:`\lVert \Delta_k \rVert_2` is taken over all parameters of the update
    together, with the factor of :func:`companion.per_example.clip_factors`; the noise is
    :func:`companion.dpsgd.add_gaussian_noise` with std :math:`\sigma S`, one draw over all
    parameters in the order of ``parameter_shapes`` (or of ``updates[0]``). The denominator
    ``expected_clients`` :math:`= qK` must be fixed before seeing the data, never the realised
    number of clients, which depends on the sample and would leak it. Then the noisy sum has L2
    sensitivity :math:`S` with respect to adding or removing one client, and one call is one
    step of the (Poisson-subsampled, if the clients were so sampled) Gaussian mechanism with
    noise multiplier :math:`\sigma`. With no client the result is pure noise
    :math:`\mathcal N(0, \sigma^2 S^2 I) / qK`: a round in which nobody was sampled must look
    like any other, so the names and shapes come from ``parameter_shapes``.

    Args:
        updates: one dict name -> tensor per sampled client (see :func:`local_update`), all
            with the same names and shapes; may be empty if ``parameter_shapes`` is given.
        max_update_norm: the clipping norm :math:`S`, > 0.
        noise_multiplier: :math:`\sigma`, >= 0 (0 adds no noise: no privacy).
        expected_clients: :math:`qK`, the expected number of sampled clients, > 0; public.
        generator: the :class:`torch.Generator` the noise is drawn from; seed it from fresh
            entropy (``g = torch.Generator(); g.seed()``). A seed used for noise is a secret:
            whoever knows it can regenerate the noise and subtract it.
        parameter_shapes: name -> shape of every parameter, in the order the noise is drawn;
            required when ``updates`` is empty, else checked against the updates.
        dtype: floating dtype of the result when ``updates`` is empty (default: torch's
            default dtype); with updates, theirs.

    Returns:
        A new dict name -> tensor, the noisy average update :math:`\tilde\Delta`.

    Raises:
        TypeError: if the updates are not dicts of floating-point tensors or ``generator`` is
            not a :class:`torch.Generator`.
        ValueError: if ``max_update_norm`` or ``expected_clients`` is not > 0,
            ``noise_multiplier`` is negative, an update is not finite, the names or shapes
            disagree, or ``updates`` is empty and ``parameter_shapes`` not given.

    Example:
        >>> import torch
        >>> updates = [{"w": torch.tensor([3.0, 4.0])}, {"w": torch.tensor([0.1, 0.0])}]
        >>> aggregate = dp_fedavg_aggregate(updates, max_update_norm=1.0,
        ...     noise_multiplier=0.0, expected_clients=2.0, generator=torch.Generator())
        >>> aggregate["w"]  # (0.6, 0.8) clipped from (3, 4), plus (0.1, 0), over qK = 2
        tensor([0.3500, 0.4000])
        >>> noise_only = dp_fedavg_aggregate([], max_update_norm=1.0, noise_multiplier=1.0,
        ...     expected_clients=2.0, generator=torch.Generator().manual_seed(0),
        ...     parameter_shapes={"w": torch.Size([2])})
        >>> noise_only["w"].shape
        torch.Size([2])
    """
    max_update_norm = check_positive("max_update_norm", max_update_norm)
    noise_multiplier = check_nonnegative("noise_multiplier", noise_multiplier)
    expected_clients = check_positive("expected_clients", expected_clients)
    updates = _check_updates(updates, allow_empty=True)
    if parameter_shapes is not None:
        if not isinstance(parameter_shapes, Mapping) or not parameter_shapes:
            raise TypeError("parameter_shapes must be a non-empty dict name -> torch.Size.")
        shapes = {name: torch.Size(shape) for name, shape in parameter_shapes.items()}
        first_shapes = {n: v.shape for n, v in updates[0].items()} if updates else shapes
        if first_shapes != shapes:
            raise ValueError(
                "parameter_shapes must match the names and shapes of the updates, got "
                f"{dict(shapes)} and {dict(first_shapes)}."
            )
    elif updates:
        shapes = {name: value.shape for name, value in updates[0].items()}
    else:
        raise ValueError(
            "with no update (no client sampled) the result is pure noise: pass parameter_shapes "
            "so that its names and shapes are known."
        )
    if updates:
        total = {name: torch.zeros_like(updates[0][name]) for name in shapes}
    else:
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}.")
        total = {name: torch.zeros(shape, dtype=dtype) for name, shape in shapes.items()}
    for update in updates:
        norms = torch.stack([torch.linalg.vector_norm(value) for value in update.values()])
        factor = float(clip_factors(torch.linalg.vector_norm(norms), max_grad_norm=max_update_norm))
        for name, value in update.items():
            total[name].add_(value, alpha=factor)
    add_gaussian_noise(total, std=noise_multiplier * max_update_norm, generator=generator)
    return {name: value.div_(expected_clients) for name, value in total.items()}


# --- the training loops -------------------------------------------------------------------------


def _test_record(
    model: nn.Module, test_data: tuple[torch.Tensor, torch.Tensor] | None, loss: str
) -> dict[str, float]:
    if test_data is None:
        return {}
    scores = evaluate_model(model, *test_data, loss=loss)
    return {"test_loss": scores["loss"], "test_accuracy": scores["accuracy"]}


def fedavg(
    model: nn.Module,
    clients: Sequence[tuple[ArrayLike, ArrayLike]],
    *,
    rounds: int,
    client_fraction: float,
    local_epochs: int,
    batch_size: int | None,
    lr: float,
    mu: float = 0.0,
    loss: LossName = "cross_entropy",
    x_test: ArrayLike | None = None,
    y_test: ArrayLike | None = None,
    seed: int | None = 0,
    progress: bool = True,
) -> list[dict[str, Any]]:
    r"""Train ``model`` in place with FederatedAveraging (FedSGD, FedAvg or FedProx).

    Algorithm 1 of McMahan et al. (2017), "Communication-Efficient Learning of Deep Networks
    from Decentralized Data", AISTATS. In each round the server draws
    :math:`m = \max(1, \mathrm{round}(CK))` of the :math:`K` clients uniformly without
    replacement (Python's ``round``, halves to even), each runs :func:`local_update` from the
    current global weights :math:`w`, and the server adds :func:`fedavg_aggregate` of the
    updates, :math:`w \leftarrow w + \sum_{k \in S} (n_k / \sum_{j \in S} n_j) \Delta_k`.
    ``local_epochs=1, batch_size=None`` is FedSGD (one full-batch gradient step per client; with
    ``client_fraction=1`` a round is one step of gradient descent on the pooled data);
    ``mu > 0`` is FedProx (Li et al. 2020). The selection uses a
    :func:`numpy.random.default_rng` seeded with ``seed``; client ``k``'s shuffling in round
    ``t`` is seeded from ``numpy.random.SeedSequence((seed, t, k))``, so a run is reproducible
    and a client's local training does not depend on which other clients were picked. Nothing
    here is private, so the randomness is public and defaults to seed 0.

    Args:
        model: the global model; its trainable parameters are updated in place.
        clients: one ``(x_k, y_k)`` pair per client (see :func:`client_datasets`), each with at
            least one example.
        rounds: communication rounds, >= 1.
        client_fraction: :math:`C`, the share of clients picked per round, in (0, 1].
        local_epochs: :math:`E`, >= 1.
        batch_size: :math:`B`, >= 1, or None for each client's full batch.
        lr: the clients' learning rate, > 0.
        mu: FedProx coefficient, >= 0 (0 is FedAvg).
        loss: ``"cross_entropy"`` or ``"bce"``.
        x_test, y_test: optional held-out data, evaluated after every round.
        seed: seed of the client selection and the local shuffling, or None for fresh entropy.
        progress: show a tqdm progress bar over the rounds.

    Returns:
        One dict per round, with keys ``"round"`` (1, 2, ...), ``"clients"`` (the sorted
        indices of the clients picked), and ``"test_loss"`` and ``"test_accuracy"`` of the
        global model after the round if test data were given.

    Raises:
        TypeError: if ``model`` is not a module, ``clients`` not a list of ``(x, y)`` pairs, or
            an integer argument not an integer.
        ValueError: if a client's data are empty or do not fit the loss, or a number is out of
            the range given above.

    Example:
        >>> from companion import data, models
        >>> digits = data.load_digits()
        >>> parts = data.partition_iid(60, num_clients=6)
        >>> clients = client_datasets(digits.x_train[:60], digits.y_train[:60], parts)
        >>> history = fedavg(models.logistic_regression(), clients, rounds=3,
        ...     client_fraction=0.5, local_epochs=2, batch_size=5, lr=0.1,
        ...     x_test=digits.x_test[:100], y_test=digits.y_test[:100], progress=False)
        >>> [record["clients"] for record in history]
        [[3, 4, 5], [0, 4, 5], [2, 3, 4]]
        >>> [record["test_accuracy"] for record in history]
        [0.22, 0.31, 0.45]
    """
    model = check_model(model)
    trainable_named(model)
    loss = check_loss(loss)
    data = _check_clients(clients, loss=loss)
    rounds = check_positive_int("rounds", rounds)
    client_fraction = check_fraction("client_fraction", client_fraction)
    local_epochs = check_positive_int("local_epochs", local_epochs)
    batch_size = _check_batch_size(batch_size)
    lr = check_positive("lr", lr)
    mu = check_nonnegative("mu", mu)
    test_data = check_optional_test(x_test, y_test, loss=loss)
    seed = check_optional_seed(seed)
    rng = np.random.default_rng(seed)
    num_clients = len(data)
    per_round = max(1, round(client_fraction * num_clients))

    history: list[dict[str, Any]] = []
    name = "FedProx" if mu > 0 else "FedAvg"
    for round_ in progress_loop(
        rounds, history=history, desc=name, unit="round", progress=progress
    ):
        picked = sorted(int(k) for k in rng.choice(num_clients, size=per_round, replace=False))
        updates = _client_updates(
            model, data, picked, seed, round_, local_epochs, batch_size, lr, mu, loss
        )
        add_to_model(model, fedavg_aggregate(updates, [data[k][0].shape[0] for k in picked]))
        record: dict[str, Any] = {"round": round_, "clients": picked}
        record.update(_test_record(model, test_data, loss))
        history.append(record)
    return history


def dp_fedavg(
    model: nn.Module,
    clients: Sequence[tuple[ArrayLike, ArrayLike]],
    *,
    rounds: int,
    sample_rate: float,
    noise_multiplier: float,
    max_update_norm: float,
    local_epochs: int,
    batch_size: int | None,
    lr: float,
    delta: float,
    server_lr: float = 1.0,
    loss: LossName = "cross_entropy",
    x_test: ArrayLike | None = None,
    y_test: ArrayLike | None = None,
    seed: int | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    r"""Train ``model`` in place with DP-FedAvg, differentially private for each client's data set.

    McMahan, Ramage, Talwar and Zhang (2018), "Learning Differentially Private Recurrent
    Language Models", ICLR. In each round:

    1. every one of the :math:`K` clients joins independently with probability :math:`q`
       (``sample_rate``; Poisson sampling, so the number of clients is
       :math:`\mathrm{Binomial}(K, q)` and may be 0);
    2. each client that joins runs :func:`local_update` (plain SGD, no proximal term);
    3. the server computes :func:`dp_fedavg_aggregate` of the updates with clipping norm
       :math:`S` (``max_update_norm``), noise multiplier :math:`\sigma` and the fixed
       denominator :math:`qK`, and adds it times :math:`\eta_s` (``server_lr``):

       .. math::

           w \leftarrow w + \eta_s \, \frac{1}{qK} \Bigl( \sum_{k \in S_t} \bar\Delta_k
           + \mathcal N(0, \sigma^2 S^2 I) \Bigr).

    Every client weighs the same (unlike :func:`fedavg`, whose weights :math:`n_k` would depend
    on private data), so the noisy sum has L2 sensitivity :math:`S` and each round is one step of
    the Poisson-subsampled Gaussian mechanism. An :class:`companion.accounting.RDPAccountant`
    records one step ``(noise_multiplier, sample_rate)`` per round and reports epsilon at
    ``delta``.

    **What is protected.** The neighbouring relation is adding or removing one client's whole
    data set (user-level differential privacy), not one example. The guarantee covers the
    sequence of global models (and anything computed from them). The number of clients
    :math:`K`, and with it the denominator :math:`qK`, is treated as public (fixed before
    training); to keep it out of the data, call :func:`dp_fedavg_aggregate` with a
    denominator chosen in advance. The records' ``"clients"`` (who was sampled) and test scores
    are outside the guarantee: releasing who was sampled would cancel the amplification by
    sampling the accountant credits. The server sees the individual updates in the clear: it is
    trusted to clip and add the noise (central DP); secure aggregation
    (:mod:`companion.secure_aggregation`) with noise added by the clients removes that trust in
    deployed systems. Choose ``delta`` well below :math:`1/K` (a ``UserWarning`` says so).

    **Randomness.** With ``seed=None`` (the default) the client sampling, the noise and the
    local shuffling come from fresh entropy, so two runs never share noise. A ``seed`` makes a
    run reproducible (the sampling from :func:`numpy.random.default_rng`, the noise from a
    :class:`torch.Generator`, client ``k``'s shuffling in round ``t`` from
    ``numpy.random.SeedSequence((seed, t, k))``), and it is then a secret: whoever knows it can
    regenerate the noise and subtract it. Pass one for notebooks and tests, never when
    releasing a model.

    .. warning::

        A teaching implementation: the noise is floating-point Gaussian noise from torch's
        pseudo-random generator, not a cryptographically secure source, and its low-order bits
        can leak (Mironov 2012). For real deployments use a maintained library: Opacus
        (https://opacus.ai), TensorFlow Federated (https://www.tensorflow.org/federated) or
        Flower (https://flower.ai).

    Args:
        model: the global model; its trainable parameters are updated in place.
        clients: one ``(x_k, y_k)`` pair per client (see :func:`client_datasets`), each with at
            least one example.
        rounds: communication rounds, >= 1 (one accountant step each).
        sample_rate: :math:`q`, each client's probability of joining a round, in (0, 1].
        noise_multiplier: :math:`\sigma`, >= 0 (0 means no privacy: epsilon is infinite).
        max_update_norm: the clipping norm :math:`S` of a client's update, > 0.
        local_epochs: :math:`E`, >= 1.
        batch_size: :math:`B`, >= 1, or None for each client's full batch.
        lr: the clients' learning rate, > 0.
        delta: the delta at which epsilon is reported, in (0, 1).
        server_lr: :math:`\eta_s`, > 0; the noisy average update is multiplied by it.
        loss: ``"cross_entropy"`` or ``"bce"``.
        x_test, y_test: optional held-out data, evaluated after every round.
        seed: None for fresh entropy (default), or a secret int seed for a reproducible run.
        progress: show a tqdm progress bar over the rounds.

    Returns:
        One dict per round, with keys ``"round"`` (1, 2, ...), ``"clients"`` (the sorted
        indices of the clients that joined), ``"epsilon"`` (spent so far, at ``delta``),
        ``"delta"``, and ``"test_loss"`` and ``"test_accuracy"`` if test data were given.

    Raises:
        TypeError: if ``model`` is not a module, ``clients`` not a list of ``(x, y)`` pairs, or
            an integer argument not an integer.
        ValueError: if a client's data are empty or do not fit the loss, or a number is out of
            the range given above.

    Example:
        >>> from companion import data, models
        >>> digits = data.load_digits()
        >>> parts = data.partition_iid(60, num_clients=20)
        >>> clients = client_datasets(digits.x_train[:60], digits.y_train[:60], parts)
        >>> history = dp_fedavg(models.logistic_regression(), clients, rounds=3,
        ...     sample_rate=0.25, noise_multiplier=1.0, max_update_norm=1.0, local_epochs=1,
        ...     batch_size=None, lr=0.5, delta=1e-3, seed=0, progress=False)
        >>> [len(record["clients"]) for record in history]  # Binomial(20, 0.25) each
        [5, 3, 7]
        >>> [round(record["epsilon"], 2) for record in history]
        [1.92, 2.45, 2.84]
    """
    model = check_model(model)
    params = trainable_named(model)
    loss = check_loss(loss)
    data = _check_clients(clients, loss=loss)
    rounds = check_positive_int("rounds", rounds)
    sample_rate = check_fraction("sample_rate", sample_rate)
    noise_multiplier = check_nonnegative("noise_multiplier", noise_multiplier)
    max_update_norm = check_positive("max_update_norm", max_update_norm)
    local_epochs = check_positive_int("local_epochs", local_epochs)
    batch_size = _check_batch_size(batch_size)
    lr = check_positive("lr", lr)
    delta = check_delta(delta)
    server_lr = check_positive("server_lr", server_lr)
    test_data = check_optional_test(x_test, y_test, loss=loss)
    seed = check_optional_seed(seed)
    noise_generator = torch_generator(seed)
    rng = np.random.default_rng(seed)
    num_clients = len(data)
    warn_if_delta_large(delta, num_clients, unit="client", symbol="K")
    expected_clients = sample_rate * num_clients
    shapes = {name: p.shape for name, p in params}
    accountant = RDPAccountant()

    history: list[dict[str, Any]] = []
    for round_ in progress_loop(
        rounds, history=history, desc="DP-FedAvg", unit="round", progress=progress
    ):
        picked = [int(k) for k in np.flatnonzero(rng.random(num_clients) < sample_rate)]
        updates = _client_updates(
            model, data, picked, seed, round_, local_epochs, batch_size, lr, 0.0, loss
        )
        aggregate = dp_fedavg_aggregate(
            updates,
            max_update_norm=max_update_norm,
            noise_multiplier=noise_multiplier,
            expected_clients=expected_clients,
            generator=noise_generator,
            parameter_shapes=shapes,
            dtype=params[0][1].dtype,
        )
        add_to_model(model, aggregate, server_lr)
        accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
        record: dict[str, Any] = {
            "round": round_,
            "clients": picked,
            "epsilon": accountant.get_epsilon(delta),
            "delta": delta,
        }
        record.update(_test_record(model, test_data, loss))
        history.append(record)
    return history
