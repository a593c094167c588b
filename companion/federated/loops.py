"""The training loops: FedAvg (with FedProx) and DP-FedAvg with Poisson client sampling.

Part of :mod:`companion.federated`; import from there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from companion._progress import progress_loop
from companion._random import check_optional_seed, torch_generator
from companion._runs import check_accountant, check_test, continued, note_spent, run_seed
from companion._torch import (
    ArrayLike,
    LossName,
    add_to_model,
    check_loss,
    check_model,
    evaluate_model,
    model_device,
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
from companion.accounting import PLDAccountant, RDPAccountant
from companion.federated.aggregation import dp_fedavg_aggregate, fedavg_aggregate
from companion.federated.clients import (
    check_batch_size,
    check_clients,
    check_mu,
    client_updates,
    warn_if_running_statistics,
)

__all__ = ["dp_fedavg", "fedavg"]


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
        mu: FedProx coefficient, >= 0 (0 is FedAvg), with ``lr * mu`` at most 2.
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
        >>> from companion.federated import client_datasets
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
    warn_if_running_statistics(model)
    loss = check_loss(loss)
    device = model_device(model)
    data = check_clients(clients, model=model, loss=loss)
    rounds = check_positive_int("rounds", rounds)
    client_fraction = check_fraction("client_fraction", client_fraction)
    local_epochs = check_positive_int("local_epochs", local_epochs)
    batch_size = check_batch_size(batch_size)
    lr = check_positive("lr", lr)
    mu = check_mu(mu, lr=lr)
    test_data = check_test(model, x_test, y_test, loss=loss, device=device)
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
        updates = client_updates(
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
    accountant: RDPAccountant | PLDAccountant | None = None,
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
    the Poisson-subsampled Gaussian mechanism. The accountant records one step
    ``(noise_multiplier, sample_rate)`` per round, before the round's update is applied, and
    reports epsilon at ``delta``.

    **What is protected.** The neighbouring relation is adding or removing one client's whole
    data set (user-level differential privacy), not one example. The guarantee covers the
    sequence of global models (and anything computed from them). The number of clients
    :math:`K`, and with it the denominator :math:`qK`, is treated as public (fixed before
    training); to keep it out of the data, call :func:`dp_fedavg_aggregate` with a
    denominator chosen in advance. The records' ``"clients"`` (who was sampled) and test scores
    are outside the guarantee: releasing who was sampled would cancel the amplification by
    sampling the accountant credits. So is a run that stops with an error on a sampled client
    (local training that diverges to a non-finite update, a bad record): the error reveals that
    the client was sampled, and its message names it; a note on the error gives the epsilon of
    the rounds recorded. The server sees the individual updates in the clear: it is trusted to
    clip and add the noise (central DP); secure aggregation (:mod:`companion.secure_aggregation`)
    with noise added by the clients reduces that trust to a server that follows the protocol,
    with enough honest clients in each round (it does not protect against a server that crafts
    the model: see the chapter). Choose ``delta`` well below :math:`1/K` (a ``UserWarning`` says
    so).

    **Accounting across calls.** To train one model in several calls (after a run that stopped, or
    to train further), pass every call the same ``accountant``, one that only ``dp_fedavg`` calls
    have stepped (a :func:`~companion.dpsgd.train_dpsgd` accountant counts steps that protect one
    example, not one client): each call adds its rounds to it in place, and the reported epsilon
    covers every call together (it is one long run's where the calls' settings agree). Give every
    call the same ``delta`` (an accountant holds none). Without ``accountant``, each call starts a
    new :class:`companion.accounting.RDPAccountant`, whose epsilon covers that call alone.

    **Randomness.** With ``seed=None`` (the default) the client sampling, the noise and the
    local shuffling come from fresh entropy, so two runs do not share noise (but the generators
    are not cryptographic: see :func:`companion.dpsgd.train_dpsgd`). A ``seed`` makes a
    run reproducible (the sampling from :func:`numpy.random.default_rng`, the noise from a
    :class:`torch.Generator`, client ``k``'s shuffling in round ``t`` from
    ``numpy.random.SeedSequence((seed, t, k))``), and it is then a secret: whoever knows it can
    regenerate the noise and subtract it. Pass one for notebooks and tests, never when
    releasing a model. With a continued ``accountant``, the seed of all three is derived from
    ``seed`` and the rounds the accountant already holds, so a second call with the same seed
    does not replay the first one's sampling and noise (the difference of the two calls'
    updates would then be noise-free).

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
        accountant: the :class:`companion.accounting.RDPAccountant` or
            :class:`companion.accounting.PLDAccountant` of earlier ``dp_fedavg`` calls, to
            continue.
        loss: ``"cross_entropy"`` or ``"bce"``.
        x_test, y_test: optional held-out data, evaluated after every round.
        seed: None for fresh entropy (default), or a secret int seed for a reproducible run.
        progress: show a tqdm progress bar over the rounds.

    Returns:
        One dict per round, with keys ``"round"`` (this call's: 1, 2, ...), ``"total_rounds"``
        (the rounds the accountant holds: with a continued accountant, the earlier calls' too),
        ``"clients"`` (the sorted indices of the clients that joined), ``"epsilon"`` (the
        accountant's total, at ``delta``), ``"delta"``, and ``"test_loss"`` and
        ``"test_accuracy"`` if test data were given.

    Raises:
        TypeError: if ``model`` is not a module, ``clients`` not a list of ``(x, y)`` pairs,
            an integer argument not an integer, or ``accountant`` not a companion accountant.
        ValueError: if a client's data are empty or do not fit the loss, a number is out of
            the range given above, or a PLD accountant cannot follow the planned rounds.

    Example:
        >>> from companion import data, models
        >>> from companion.federated import client_datasets
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
    warn_if_running_statistics(model)
    loss = check_loss(loss)
    device = model_device(model)
    data = check_clients(clients, model=model, loss=loss)
    rounds = check_positive_int("rounds", rounds)
    sample_rate = check_fraction("sample_rate", sample_rate)
    noise_multiplier = check_nonnegative("noise_multiplier", noise_multiplier)
    max_update_norm = check_positive("max_update_norm", max_update_norm)
    local_epochs = check_positive_int("local_epochs", local_epochs)
    batch_size = check_batch_size(batch_size)
    lr = check_positive("lr", lr)
    delta = check_delta(delta)
    server_lr = check_positive("server_lr", server_lr)
    test_data = check_test(model, x_test, y_test, loss=loss, device=device)
    accountant = check_accountant(accountant)
    seed = run_seed(seed, accountant)
    noise_generator = torch_generator(seed, device=device)
    rng = np.random.default_rng(seed)
    num_clients = len(data)
    warn_if_delta_large(delta, num_clients, unit="client", symbol="K")
    expected_clients = sample_rate * num_clients
    shapes = {name: p.shape for name, p in params}
    # The planned run's epsilon, so that an accountant that cannot follow it says so now.
    continued(
        accountant, noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=rounds
    ).get_epsilon(delta)

    history: list[dict[str, Any]] = []
    start = len(accountant)
    try:
        for round_ in progress_loop(
            rounds, history=history, desc="DP-FedAvg", unit="round", progress=progress
        ):
            picked = [int(k) for k in np.flatnonzero(rng.random(num_clients) < sample_rate)]
            updates = client_updates(
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
                device=device,
            )
            accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
            add_to_model(model, aggregate, server_lr)  # recorded first: none applied unrecorded
            record: dict[str, Any] = {
                "round": round_,
                "total_rounds": len(accountant),
                "clients": picked,
                "epsilon": accountant.get_epsilon(delta),
                "delta": delta,
            }
            record.update(_test_record(model, test_data, loss))
            history.append(record)
    except BaseException as error:  # KeyboardInterrupt too: say what the rounds taken spent
        note_spent(error, accountant, len(accountant) - start, delta, run="dp_fedavg")
        raise
    return history
