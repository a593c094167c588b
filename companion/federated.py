r"""Federated learning: clients, FedSGD, FedAvg, FedProx, DP-FedAvg and a secure-aggregation toy.

In federated learning the training data stay with :math:`K` *clients* (phones, hospitals); a
*server* holds the model and, round after round, sends it to some clients, lets each train on its
own data, and combines the *updates* they send back. This module simulates that on one machine:
the clients are a list of ``(x, y)`` tensor pairs (:func:`client_datasets` builds it from a
partition in :mod:`companion.data`), and everything runs in one process from seeds.

**FederatedAveraging** (McMahan, Moore, Ramage, Hampson and Agüera y Arcas 2017,
"Communication-Efficient Learning of Deep Networks from Decentralized Data", AISTATS,
Algorithm 1; :func:`fedavg`). In round :math:`t` the server picks a set :math:`S_t` of
:math:`m = \max(1, \mathrm{round}(CK))` clients uniformly at random without replacement
(``client_fraction`` is :math:`C`). Each picked client :math:`k`, holding :math:`n_k` examples,
starts from the global weights :math:`w_t`, runs ``local_epochs`` (:math:`E`) epochs of
minibatch SGD with batches of ``batch_size`` (:math:`B`) on its own data, and returns its update
:math:`\Delta_k = w_k - w_t` (:func:`local_update`). The server averages the updates weighted by
data size:

.. math::

    w_{t+1} = w_t + \sum_{k \in S_t} \frac{n_k}{n_{S_t}} \Delta_k, \qquad
    n_{S_t} = \sum_{k \in S_t} n_k .

**FedSGD** is the special case :math:`E = 1`, :math:`B = \infty` (``batch_size=None``): each
client takes one full-batch gradient step, :math:`\Delta_k = -\eta \nabla L_k(w_t)`, and since
:math:`\sum_k (n_k / n) \nabla L_k` is the gradient of the mean loss over the union of the
clients' data, one round with every client is exactly one step of full-batch gradient descent on
the pooled data. More local work per round (larger :math:`E`, smaller :math:`B`) trades
computation on the clients for fewer rounds of communication, the point of the paper.

**FedProx** (Li, Sahu, Zaheer, Sanjabi, Talwalkar and Smith 2020, "Federated Optimization in
Heterogeneous Networks", MLSys; ``mu`` :math:`> 0`) adds a proximal term to each client's loss,

.. math::

    \min_w \; L_k(w) + \frac{\mu}{2} \lVert w - w_t \rVert_2^2 ,

which keeps the local weights near the global ones when the clients' data differ (non-IID
partitions) and local training would otherwise drift towards each client's own optimum.

**DP-FedAvg** (McMahan, Ramage, Talwar and Zhang 2018, "Learning Differentially Private Recurrent
Language Models", ICLR; :func:`dp_fedavg`) makes the sequence of global models
differentially private with respect to whole clients (*user-level* privacy): every client joins
a round independently with probability :math:`q`, each update is clipped to L2 norm :math:`S`,
and the server adds Gaussian noise to the sum before dividing by the expected number of clients
:math:`qK`:

.. math::

    w_{t+1} = w_t + \eta_s \, \frac{1}{qK} \Bigl( \sum_{k \in S_t} \Delta_k
    \min\Bigl(1, \frac{S}{\lVert \Delta_k \rVert_2 + 10^{-6}}\Bigr)
    + \mathcal N(0, \sigma^2 S^2 I) \Bigr).

This is DP-SGD (:mod:`companion.dpsgd`) with clients in place of examples and updates in place of
gradients, and the same accountant (:class:`companion.accounting.RDPAccountant`) applies.

**Secure aggregation** (Bonawitz et al. 2017, "Practical Secure Aggregation for
Privacy-Preserving Machine Learning", ACM CCS; :func:`secure_sum`), here in miniature: clients
hide their model updates under random masks that cancel in the sum, so the server learns the sum
of the updates and nothing else about any single one.

Every pair of clients :math:`i < j` shares a random seed :math:`s_{ij}` (in the real protocol
they agree on it by a Diffie-Hellman key exchange, so the server never sees it). Client
:math:`i` encodes its update :math:`x_i` as integers modulo :math:`R` and sends

.. math::

    y_i = x_i + \sum_{j > i} \mathrm{PRG}(s_{ij}) - \sum_{j < i} \mathrm{PRG}(s_{ji}) \pmod R .

Each pairwise mask is added by one client and subtracted by the other, so
:math:`\sum_i y_i = \sum_i x_i \pmod R` exactly, while each :math:`y_i` alone is uniformly
distributed: it says nothing about :math:`x_i`. Integer arithmetic modulo :math:`R = 2^{32}`
makes the cancellation exact; with floating-point masks it would only be approximate. Updates
are encoded in fixed point with ``scale`` steps per unit.

If a client drops out after the masks were set up, its masks no longer cancel. The real protocol
secret-shares every seed so that the surviving clients can help the server remove the dropped
client's masks; here the survivors simply reveal the seeds they shared with it
(:func:`secure_sum` with ``dropped``).

What secure aggregation does not do: the server still learns the exact sum, which can reveal a
lot when few clients take part, and nothing stops the server from learning each update when
only one client survives. It is not differential privacy; the two are combined in practice.

.. warning::

    Teaching code. The secure-aggregation toy uses numpy's generator, which is not a
    cryptographic PRG, creates the seeds in one place instead of by key agreement, and has no
    authentication or secret sharing. The training loops simulate all clients in one process,
    and :func:`dp_fedavg` draws floating-point noise from torch's pseudo-random generator (see
    its docstring); use a maintained framework for real deployments.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from companion._random import RNGLike, as_generator
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
from companion._random import torch_generator
from companion._torch import (
    progress_loop,
    ArrayLike,
    LossName,
    check_data,
    check_loss,
    check_model,
    check_optional_test,
    evaluate_model,
    loss_fn,
    to_tensors,
    trainable,
)

__all__ = [
    "MODULUS",
    "client_datasets",
    "dp_fedavg",
    "fedavg",
    "local_update",
    "mask_update",
    "pairwise_seeds",
    "secure_sum",
]

MODULUS = 2**32
"""Size :math:`R` of the ring of integers in which updates are masked and summed."""

Seeds = Mapping[tuple[int, int], int]


def pairwise_seeds(num_clients: int, *, rng: RNGLike = None) -> dict[tuple[int, int], int]:
    """One random seed for every pair of clients ``(i, j)`` with ``i < j``."""
    num_clients = check_positive_int("num_clients", num_clients)
    generator = as_generator(rng)
    return {
        (i, j): int(generator.integers(0, 2**63))
        for i in range(num_clients)
        for j in range(i + 1, num_clients)
    }


def _prg(seed: int, dim: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, MODULUS, size=dim, dtype=np.int64)


def _pair_mask(client: int, pair: tuple[int, int], dim: int, seeds: Seeds) -> np.ndarray:
    """The part of ``client``'s mask that comes from ``pair``: +PRG for the lower index, -PRG for the higher."""
    sign = 1 if client == pair[0] else -1
    return sign * _prg(seeds[pair], dim)


def _encode(update: np.ndarray, scale: float, num_clients: int) -> np.ndarray:
    if not isinstance(update, np.ndarray) or update.ndim != 1:
        raise TypeError("update must be a one-dimensional numpy array.")
    if not np.isfinite(update).all():
        raise ValueError("update must be finite (no NaN or inf).")
    fixed = np.round(update * scale)
    if np.abs(fixed).max(initial=0) * num_clients >= MODULUS // 2:
        raise ValueError(
            f"update too large for exact aggregation: |update| * scale * num_clients must stay "
            f"below 2^31; lower scale (now {scale})."
        )
    return fixed.astype(np.int64) % MODULUS


def mask_update(
    update: np.ndarray, *, client: int, seeds: Seeds, num_clients: int, scale: float = 2.0**16
) -> np.ndarray:
    """What ``client`` sends: its update in fixed point plus its pairwise masks, modulo 2^32.

    Args:
        update: the client's model update, a one-dimensional float array.
        client: this client's index, 0 <= client < num_clients.
        seeds: the pairwise seeds from :func:`pairwise_seeds`.
        num_clients: the number of clients that set up masks together.
        scale: fixed-point steps per unit; the sum is exact up to rounding to 1/scale.
    """
    num_clients = check_positive_int("num_clients", num_clients)
    if not 0 <= client < num_clients:
        raise ValueError(f"client must lie in [0, {num_clients}), got {client}.")
    scale = check_positive("scale", scale)
    masked = _encode(update, scale, num_clients)
    for pair in seeds:
        if client in pair:
            masked = (masked + _pair_mask(client, pair, update.size, seeds)) % MODULUS
    return masked


def secure_sum(
    updates: Sequence[np.ndarray],
    *,
    dropped: Sequence[int] = (),
    scale: float = 2.0**16,
    rng: RNGLike = None,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Simulate one round of secure aggregation and return what the server computes and sees.

    Every client masks its update (:func:`mask_update`); the clients in ``dropped`` fail before
    sending. The survivors reveal the seeds they shared with dropped clients, and the server
    removes those masks, so the result is the sum of the surviving clients' updates.

    Args:
        updates: one one-dimensional float array per client, all of the same length.
        dropped: indices of clients whose masked update never arrives.
        scale: fixed-point steps per unit.
        rng: seeds the pairwise masks.

    Returns:
        ``(total, received)``: the decoded sum of the surviving updates, and the masked updates
        the server received (one per survivor), which is all the server sees of any client.
    """
    num_clients = len(updates)
    check_positive_int("number of updates", num_clients)
    dims = {u.size if isinstance(u, np.ndarray) else -1 for u in updates}
    if len(dims) != 1 or -1 in dims:
        raise ValueError("updates must be numpy arrays of one common length.")
    dim = dims.pop()
    dropped_set = set(dropped)
    if not dropped_set <= set(range(num_clients)):
        raise ValueError(f"dropped must hold client indices in [0, {num_clients}).")
    survivors = [c for c in range(num_clients) if c not in dropped_set]
    if not survivors:
        raise ValueError("at least one client must survive.")

    seeds = pairwise_seeds(num_clients, rng=rng)
    received = [
        mask_update(updates[c], client=c, seeds=seeds, num_clients=num_clients, scale=scale)
        for c in survivors
    ]
    total = np.sum(received, axis=0) % MODULUS
    # Masks a survivor shares with a dropped client have no partner in the sum: remove them.
    for client in survivors:
        for pair in seeds:
            if client in pair and (set(pair) & dropped_set):
                total = (total - _pair_mask(client, pair, dim, seeds)) % MODULUS
    signed = np.where(total >= MODULUS // 2, total - MODULUS, total)
    return signed / scale, received


# --- clients ------------------------------------------------------------------------------------

Client = tuple[torch.Tensor, torch.Tensor]
"""One client's data set: inputs of shape ``(n_k, n_features)`` and labels of shape ``(n_k,)``."""


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
            f"x must have shape (N, n_features) and y shape (N,), got {tuple(x.shape)} and {tuple(y.shape)}."
        )
    n = x.shape[0]
    if y.shape[0] != n:
        raise ValueError(f"x and y must have the same number of examples, got {n} and {y.shape[0]}.")
    if isinstance(parts, (str, bytes)) or not isinstance(parts, Sequence):
        raise TypeError(f"parts must be a list of index arrays, got {type(parts).__name__}.")
    if len(parts) == 0:
        raise ValueError("parts must hold at least one client's indices, got an empty list.")
    clients: list[Client] = []
    for k, part in enumerate(parts):
        index = np.asarray(part.cpu() if isinstance(part, torch.Tensor) else part)
        if index.ndim != 1:
            raise ValueError(f"parts[{k}] must be a one-dimensional index array, got shape {index.shape}.")
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
            f"clients must be a list of (x, y) pairs (see client_datasets), got {type(clients).__name__}."
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


def _client_seed(seed: int, round_: int, client: int) -> int:
    """The seed of ``client``'s local shuffling in round ``round_``: independent streams per pair."""
    return int(np.random.SeedSequence((seed, round_, client)).generate_state(1)[0])


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
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    r"""Train a copy of ``model`` on one client's data and return the change of its weights.

    A deep copy of ``model`` (the global model :math:`w_t`) runs ``epochs`` epochs of minibatch
    SGD as :func:`companion.training.train` does: each epoch shuffles the :math:`n_k` examples
    with a :class:`torch.Generator` seeded with ``seed`` and takes a step
    :math:`w \leftarrow w - \eta \nabla F(w)` on the mean loss of each batch of ``batch_size``
    (the last batch may be smaller). With ``mu`` :math:`> 0` the objective is FedProx's (Li et
    al. 2020, "Federated Optimization in Heterogeneous Networks", MLSys, eq. 2),

    .. math:: F(w) = L_k(w) + \frac{\mu}{2} \lVert w - w_t \rVert_2^2 ,

    whose extra gradient :math:`\mu (w - w_t)` is added to each batch gradient. With
    :math:`\eta\mu \le 1` each step shrinks the distance to :math:`w_t` before the loss gradient
    is applied; with :math:`\eta\mu > 2` the proximal term alone makes the iteration diverge,
    so choose ``lr * mu`` at most 1.

    ``mu=0`` with ``batch_size=n_k`` or ``None`` and the same ``seed`` gives the same weights as
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
        seed: seed of the shuffling generator.

    Returns:
        A dict mapping each trainable parameter's name (as in ``model.named_parameters()``) to
        the new weights minus the given weights, a tensor of the parameter's shape.

    Example:
        >>> from companion import data, models
        >>> digits = data.load_digits()
        >>> model = models.logistic_regression()
        >>> update = local_update(model, digits.x_train[:100], digits.y_train[:100],
        ...                       epochs=1, batch_size=10, lr=0.1)
        >>> sorted(update)
        ['0.bias', '0.weight']
    """
    model = check_model(model)
    trainable(model)
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
    params = [(name, p) for name, p in local.named_parameters() if p.requires_grad]
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


def _add_to_model(model: nn.Module, delta: Mapping[str, torch.Tensor], scale: float = 1.0) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in delta:
                p.add_(delta[name], alpha=scale)


# --- FedAvg and FedProx -------------------------------------------------------------------------


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
    seed: int = 0,
    progress: bool = True,
) -> list[dict[str, Any]]:
    r"""Train ``model`` in place with FederatedAveraging (FedSGD, FedAvg or FedProx).

    Algorithm 1 of McMahan et al. (2017), "Communication-Efficient Learning of Deep Networks
    from Decentralized Data", AISTATS. In each round the server draws
    :math:`m = \max(1, \mathrm{round}(CK))` of the :math:`K` clients uniformly without
    replacement (Python's ``round``, halves to even), each runs :func:`local_update` from the
    current global weights :math:`w`, and the server sets

    .. math:: w \leftarrow w + \sum_{k \in S} \frac{n_k}{\sum_{j \in S} n_j} \Delta_k ,

    weighting each update by the client's number of examples. ``local_epochs=1,
    batch_size=None`` is FedSGD (one full-batch gradient step per client; with
    ``client_fraction=1`` a round is one step of gradient descent on the pooled data);
    ``mu > 0`` is FedProx (Li et al. 2020). The selection uses a
    :func:`numpy.random.default_rng` seeded with ``seed``; client ``k``'s shuffling in round
    ``t`` is seeded from ``numpy.random.SeedSequence((seed, t, k))``, so a run is reproducible
    and a client's local training does not depend on which other clients were picked.

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
        seed: seed of the client selection and the local shuffling.
        progress: show a tqdm progress bar over the rounds.

    Returns:
        One dict per round, with keys ``"round"`` (1, 2, ...), ``"clients"`` (the sorted
        indices of the clients picked), and ``"test_loss"`` and ``"test_accuracy"`` of the
        global model after the round if test data were given.

    Example:
        >>> from companion import data, models
        >>> digits = data.load_digits()
        >>> parts = data.partition_iid(len(digits.y_train), num_clients=10)
        >>> clients = client_datasets(digits.x_train, digits.y_train, parts)
        >>> history = fedavg(models.logistic_regression(), clients, rounds=5,
        ...     client_fraction=0.5, local_epochs=2, batch_size=10, lr=0.1,
        ...     x_test=digits.x_test, y_test=digits.y_test, progress=False)
        >>> history[0]["clients"]  # doctest: +SKIP
        [0, 1, 4, 6, 9]
    """
    model = check_model(model)
    trainable(model)
    loss = check_loss(loss)
    data = _check_clients(clients, loss=loss)
    rounds = check_positive_int("rounds", rounds)
    client_fraction = check_fraction("client_fraction", client_fraction)
    local_epochs = check_positive_int("local_epochs", local_epochs)
    batch_size = _check_batch_size(batch_size)
    lr = check_positive("lr", lr)
    mu = check_nonnegative("mu", mu)
    test_data = check_optional_test(x_test, y_test, loss=loss)
    torch_generator(seed)  # validates the seed
    rng = np.random.default_rng(seed)
    num_clients = len(data)
    per_round = max(1, round(client_fraction * num_clients))

    history: list[dict[str, Any]] = []
    name = "FedProx" if mu > 0 else "FedAvg"
    for round_ in progress_loop(
        rounds, history=history, desc=name, unit="round", progress=progress
    ):
        picked = sorted(int(k) for k in rng.choice(num_clients, size=per_round, replace=False))
        total = sum(data[k][0].shape[0] for k in picked)
        average: dict[str, torch.Tensor] = {}
        for k in picked:
            x_k, y_k = data[k]
            generator = torch_generator(_client_seed(seed, round_, k))
            update = _local_update(model, x_k, y_k, local_epochs, batch_size, lr, mu, loss, generator)
            weight = x_k.shape[0] / total
            for key, value in update.items():
                if key in average:
                    average[key].add_(value, alpha=weight)
                else:
                    average[key] = value * weight
        _add_to_model(model, average)
        record: dict[str, Any] = {"round": round_, "clients": picked}
        record.update(_test_record(model, test_data, loss))
        history.append(record)
    return history


def _test_record(
    model: nn.Module, test_data: tuple[torch.Tensor, torch.Tensor] | None, loss: str
) -> dict[str, float]:
    if test_data is None:
        return {}
    scores = evaluate_model(model, *test_data, loss=loss)
    return {"test_loss": scores["loss"], "test_accuracy": scores["accuracy"]}


# --- DP-FedAvg ----------------------------------------------------------------------------------


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
    seed: int = 0,
    progress: bool = True,
) -> list[dict[str, Any]]:
    r"""Train ``model`` in place with DP-FedAvg, differentially private for each client's data set.

    The algorithm of McMahan, Ramage, Talwar and Zhang (2018), "Learning Differentially Private
    Recurrent Language Models", ICLR, with equal client weights and the fixed-denominator
    estimator. In each round:

    1. every one of the :math:`K` clients joins independently with probability :math:`q`
       (``sample_rate``; Poisson sampling, so the number of clients is
       :math:`\mathrm{Binomial}(K, q)` and may be 0);
    2. each client that joins runs :func:`local_update` (plain SGD, no proximal term) and its
       update :math:`\Delta_k` is clipped to L2 norm at most :math:`S` (``max_update_norm``),
       the norm taken over all parameters together:
       :math:`\bar\Delta_k = \Delta_k \min(1, S / (\lVert \Delta_k \rVert_2 + 10^{-6}))`, the
       factor :mod:`companion.dpsgd` uses;
    3. the server adds Gaussian noise and divides by the *expected* number of clients:

       .. math::

           w \leftarrow w + \eta_s \, \frac{1}{qK} \Bigl( \sum_{k \in S_t} \bar\Delta_k
           + \mathcal N(0, \sigma^2 S^2 I) \Bigr),

       with :math:`\eta_s` = ``server_lr`` and :math:`\sigma` = ``noise_multiplier``.

    Every client weighs the same (unlike :func:`fedavg`, whose weights :math:`n_k` would depend
    on private data), and the denominator :math:`qK` is public, so the noisy sum has L2
    sensitivity :math:`S` and each round is one step of the Poisson-subsampled Gaussian
    mechanism. An :class:`companion.accounting.RDPAccountant` records one step
    ``(noise_multiplier, sample_rate)`` per round and reports epsilon at ``delta``.

    **What is protected.** The neighbouring relation is adding or removing one client's whole
    data set (user-level differential privacy), not one example. The guarantee covers what the
    server releases: the sequence of global models (and anything computed from them). The
    clients' raw data are sent nowhere, so there is nothing about them to protect in transit;
    the individual updates, however, are seen by the server in the clear here: the server is
    trusted to clip and add the noise (central DP). Secure aggregation (:func:`secure_sum`)
    with noise added by the clients removes that trust in deployed systems. The test scores
    in the records use held-out data and are not part of the guarantee. Choose ``delta`` well
    below :math:`1/K`: a mechanism that publishes one random client's data in full is
    :math:`(0, 1/K)`-DP (a ``UserWarning`` says so).

    .. warning::

        A teaching implementation: the noise is floating-point Gaussian noise from torch's
        pseudo-random generator, not a cryptographically secure source, and its low-order bits
        can leak (Mironov 2012). For real deployments use a maintained library: Opacus
        (https://opacus.ai) for the DP machinery, TensorFlow Federated
        (https://www.tensorflow.org/federated) or Flower (https://flower.ai) with their
        differential-privacy wrappers for federated training.

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
        seed: seed of the client sampling (a :func:`numpy.random.default_rng`), of the noise
            (a :class:`torch.Generator`) and, with the round and the client index, of each
            client's local shuffling.
        progress: show a tqdm progress bar over the rounds.

    Returns:
        One dict per round, with keys ``"round"`` (1, 2, ...), ``"clients"`` (the sorted
        indices of the clients that joined), ``"epsilon"`` (spent so far, at ``delta``),
        ``"delta"``, and ``"test_loss"`` and ``"test_accuracy"`` if test data were given.

    Example:
        >>> from companion import data, models
        >>> digits = data.load_digits()
        >>> parts = data.partition_iid(len(digits.y_train), num_clients=100)
        >>> clients = client_datasets(digits.x_train, digits.y_train, parts)
        >>> history = dp_fedavg(models.logistic_regression(), clients, rounds=10,
        ...     sample_rate=0.2, noise_multiplier=1.0, max_update_norm=1.0, local_epochs=1,
        ...     batch_size=None, lr=0.5, delta=1e-3, progress=False)
        >>> round(history[-1]["epsilon"], 2)  # doctest: +SKIP
        2.1...
    """
    model = check_model(model)
    trainable(model)
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
    noise_generator = torch_generator(seed)
    rng = np.random.default_rng(seed)
    num_clients = len(data)
    if delta >= 1 / num_clients:
        warnings.warn(
            f"delta={delta} is not below 1/K = {1 / num_clients:.3g} (K = {num_clients} clients); "
            "a delta this large allows releasing a client's data in the clear. Choose delta "
            "well below 1/K.",
            UserWarning,
            stacklevel=2,
        )
    expected_clients = sample_rate * num_clients
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    accountant = RDPAccountant()

    history: list[dict[str, Any]] = []
    for round_ in progress_loop(
        rounds, history=history, desc="DP-FedAvg", unit="round", progress=progress
    ):
        picked = [int(k) for k in np.flatnonzero(rng.random(num_clients) < sample_rate)]
        total = {name: torch.zeros_like(p) for name, p in params}
        for k in picked:
            x_k, y_k = data[k]
            generator = torch_generator(_client_seed(seed, round_, k))
            update = _local_update(model, x_k, y_k, local_epochs, batch_size, lr, 0.0, loss, generator)
            norms = torch.stack([torch.linalg.vector_norm(u) for u in update.values()])
            norm = torch.linalg.vector_norm(norms)
            factor = float(clip_factors(norm, max_grad_norm=max_update_norm))
            for name, value in update.items():
                total[name].add_(value, alpha=factor)
        if noise_multiplier > 0:
            add_gaussian_noise(total, std=noise_multiplier * max_update_norm, generator=noise_generator)
        _add_to_model(model, total, server_lr / expected_clients)
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
