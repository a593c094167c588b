r"""The ServerApp: FedAvg and DP-FedAvg of :mod:`companion.federated` on Flower's Grid.

The server's loop is :func:`run_server`, written with the Message API and the public pieces
of :mod:`companion.federated`, so that it reads like the in-process loops:

1. wait until the ``K`` clients' SuperNodes have joined (:func:`connect_clients`; a clear
   ``TimeoutError`` after ``join_timeout`` seconds instead of waiting forever) and ask each
   for its partition id, so that client ``k`` is the node holding part ``k``;
2. every round: sample clients with :func:`companion.flower.task.sample_clients` (Poisson
   sampling for DP-FedAvg), send each the global weights and its shuffle seed, collect the
   updates that arrive within ``round_timeout`` seconds, and apply
   :func:`companion.federated.fedavg_aggregate` or
   :func:`companion.federated.dp_fedavg_aggregate`;
3. for DP-FedAvg, one step of :class:`companion.accounting.RDPAccountant` per round.

**Faults.** A client that raises sends an error reply; a node that does not reply within
``round_timeout`` (killed, disconnected) is treated as gone and not asked again (Flower itself
notices a dead node only after about a minute of missed heartbeats); an update that does not
fit the model or is not finite (local training that diverged) is refused. Either way the round
goes on with the updates that arrived. For DP-FedAvg this is what the analysis allows: a sampled
client whose update is missing contributes zero, which the clipping bound covers; the
denominator stays the public :math:`qK` fixed before training, and the accountant takes one
step :math:`(\sigma, q)` for each round whose aggregate was released, the sampling that
actually happened (clients are drawn with probability :math:`q`, whether or not they answer).
The records say which clients were sampled, replied and failed; like ``dp_fedavg``'s
``"clients"``, who was sampled is outside the guarantee and must not be published. The run
stops in a round in which every client asked raised (as a setting or a data file that does not
fit the run makes them all do). Under Poisson sampling that can be a single client, so a stop,
and its message, which names a client and its error, are outside the guarantee too.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from companion._random import torch_generator
from companion._torch import add_to_model, evaluate_model, trainable_named, warn_if_delta_large
from companion.accounting import RDPAccountant
from companion.federated import dp_fedavg_aggregate, fedavg_aggregate
from companion.flower.records import save_round, write_json
from companion.flower.task import (
    FederatedSetup,
    build_model,
    held_out_data,
    sample_clients,
    shuffle_seed,
)

__all__ = ["app", "connect_clients", "main", "run_server", "warn_about_setup"]

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Read the setup from the run config, train, and write the records to ``output_dir``.

    With ``algorithm="both"``, FedAvg and then DP-FedAvg, each from the initial model, with
    the records of each in ``output_dir/<algorithm>``.
    """
    torch.set_num_threads(1)
    setup = FederatedSetup.from_run_config(context.run_config)
    try:
        nodes = connect_clients(grid, setup)
        for algorithm in setup.algorithms:
            run_server(grid, setup.replace(algorithm=algorithm), nodes=nodes)
    except Exception as error:
        write_json(setup, "error.json", {"error": f"{type(error).__name__}: {error}"})
        raise
    write_json(setup, "done.json", {"algorithms": list(setup.algorithms)})


def connect_clients(grid: Grid, setup: FederatedSetup) -> dict[int, int]:
    """Wait for the clients' SuperNodes; return ``{partition id: node id}``.

    Polls ``grid.get_node_ids()`` until ``num_clients`` nodes have joined, then sends each a
    ``query`` message; the ClientApp answers with its node config's ``partition-id``.

    Args:
        grid: the ServerApp's Grid.
        setup: the run (``num_clients``, ``join_timeout``, ``round_timeout``).

    Returns:
        The node id of each client, so that client ``k`` is the node holding part ``k``.

    Raises:
        TimeoutError: if fewer than ``num_clients`` nodes joined within ``join_timeout``
            seconds, or a node did not say which part it holds within ``round_timeout``.
        ValueError: if a node refused the run (its error, for example a part of another
            number of parts), or the nodes' partition ids are not ``0 .. num_clients - 1``,
            each once.

    Example:
        >>> nodes = connect_clients(grid, FederatedSetup(num_clients=3))  # doctest: +SKIP
        >>> sorted(nodes)  # doctest: +SKIP
        [0, 1, 2]
    """
    deadline = time.monotonic() + setup.join_timeout
    while len(nodes := sorted(grid.get_node_ids())) < setup.num_clients:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"only {len(nodes)} of {setup.num_clients} SuperNodes joined within "
                f"{setup.join_timeout:g} s; start one flower-supernode per part, with "
                "--node-config 'partition-id=<k> num-partitions=<K>'."
            )
        time.sleep(0.5)
    queries = [Message(RecordDict(), dst_node_id=node, message_type="query") for node in nodes]
    replies = list(grid.send_and_receive(queries, timeout=setup.round_timeout))
    refused = [r.error.reason for r in replies if r.has_error()]
    if refused:  # a node that does not fit the run (its part, its data) says why
        raise ValueError(f"{len(refused)} of {len(nodes)} SuperNodes refused the run: {refused[0]}")
    answered = {r.metadata.src_node_id: r for r in replies}
    if len(answered) < len(nodes):
        raise TimeoutError(
            f"{len(nodes) - len(answered)} of {len(nodes)} SuperNodes did not say which part "
            f"they hold within {setup.round_timeout:g} s."
        )
    partitions = {
        node: int(reply.content["node"]["partition-id"]) for node, reply in answered.items()
    }
    if sorted(partitions.values()) != list(range(setup.num_clients)):
        raise ValueError(
            f"the SuperNodes hold parts {sorted(partitions.values())}; the run needs each of "
            f"0 .. {setup.num_clients - 1} exactly once."
        )
    return {partition: node for node, partition in partitions.items()}


def _train_message(
    setup: FederatedSetup, arrays: ArrayRecord, round_: int, client: int, node: int
) -> Message:
    """The instruction to train: the weights, and the local-training arguments of the loops."""
    fedavg = setup.algorithm == "fedavg"
    config = ConfigRecord({
        "round": round_, "shuffle-seed": shuffle_seed(setup, round_, client),
        "epochs": setup.local_epochs, "batch-size": setup.batch_size, "lr": setup.lr,
        "mu": setup.mu if fedavg else 0.0,  # dp_fedavg trains without the proximal term
        "send-num-examples": fedavg,  # DP-FedAvg must not weight by private data sizes
    })  # fmt: skip
    content = RecordDict({"arrays": arrays, "config": config})
    return Message(content, dst_node_id=node, message_type="train", group_id=str(round_))


def _read_update(reply: Message, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """The update in a reply, in the order of ``shapes``; ValueError if it does not fit or is
    not finite (the client's local training diverged)."""
    received = reply.content["update"].to_torch_state_dict()
    if {name: value.shape for name, value in received.items()} != shapes:
        raise ValueError("the update's parameter names or shapes differ from the model's")
    if not all(torch.isfinite(value).all() for value in received.values()):
        raise ValueError("the update is not finite (the client's local training diverged)")
    return {name: received[name] for name in shapes}


def run_server(
    grid: Grid,
    setup: FederatedSetup,
    *,
    nodes: dict[int, int] | None = None,
    on_round: Callable[[dict[str, Any], torch.nn.Module], None] | None = None,
) -> list[dict[str, Any]]:
    """Train with FedAvg or DP-FedAvg over the SuperNodes of ``grid``; one record per round.

    With the same setup and seed, the global model after each round equals the one of
    :func:`companion.federated.fedavg` / :func:`companion.federated.dp_fedavg` (the same
    sampling, shuffle seeds, aggregation functions and noise stream, in the same order).

    Args:
        grid: Flower's Grid, given to the ServerApp's main function.
        setup: the run, with ``algorithm`` ``"fedavg"`` or ``"dp-fedavg"``; ``seed=-1``
            draws sampling and noise from fresh entropy. Another seed determines the noise,
            and every SuperNode receives it in the run config: it warns that such a run
            protects nothing against the clients
            (:class:`~companion.flower.task.FederatedSetup`).
        nodes: ``{partition id: node id}`` from :func:`connect_clients` (default: connect).
        on_round: called after each round with the record and the global model.

    Returns:
        A list with one dict per round, holding ``"round"``, ``"sampled"`` (client indices),
        ``"replied"``,
        ``"failed"`` (client index -> reason), ``"test_accuracy"`` and ``"test_loss"`` of the
        global model on the digits' test split, for DP-FedAvg ``"epsilon"`` and ``"delta"``;
        the last record has ``"client_evaluation"`` if ``evaluate_clients`` is set. The
        records and the weights after each round are written to ``output_dir/<algorithm>``
        if ``output_dir`` is set.

    Raises:
        TimeoutError, ValueError: from :func:`connect_clients`.
        RuntimeError: if every client asked in a round raised an error (not a dropout: a
            setting or data that no client can train with), before the round releases
            anything, as :func:`companion.federated.dp_fedavg` raises the client's error.

    Example:
        In the ServerApp's main function (:func:`main`), with the Grid Flower passes in; a
        test drives it through :class:`companion.flower.deploy.LocalFederation`:

        >>> history = run_server(grid, FederatedSetup(seed=0))  # doctest: +SKIP
        >>> [record["replied"] for record in history]  # doctest: +SKIP
        [[0, 1, 2], [0], [0, 2]]
    """
    if setup.algorithm not in ("fedavg", "dp-fedavg"):
        raise ValueError(f'run_server runs "fedavg" or "dp-fedavg", got {setup.algorithm!r}.')
    if setup.algorithm == "dp-fedavg":
        warn_about_setup(setup)
    nodes = connect_clients(grid, setup) if nodes is None else nodes
    model = build_model(setup)
    params = trainable_named(model)
    shapes = {name: p.shape for name, p in params}
    seed = setup.seed_or_none
    rng = np.random.default_rng(seed)
    noise = torch_generator(seed)
    accountant = RDPAccountant()
    x_test, y_test = held_out_data()
    gone: dict[int, str] = {}
    history: list[dict[str, Any]] = []
    for round_ in range(1, setup.rounds + 1):
        sampled = sample_clients(setup, rng)
        failed = {k: gone[k] for k in sampled if k in gone}
        asked = [k for k in sampled if k not in gone]
        arrays = ArrayRecord(model.state_dict())
        messages = [_train_message(setup, arrays, round_, k, nodes[k]) for k in asked]
        replies = {
            reply.metadata.src_node_id: reply
            for reply in grid.send_and_receive(messages, timeout=setup.round_timeout)
        }
        updates, counts, replied = [], [], []
        for k in asked:  # in client order, as the in-process loops sum
            reply = replies.get(nodes[k])
            if reply is None:
                failed[k] = gone[k] = f"no reply within {setup.round_timeout:g} s in round {round_}"
            elif reply.has_error():
                failed[k] = f"error: {reply.error.reason}"
            else:
                try:
                    updates.append(_read_update(reply, shapes))
                except (KeyError, ValueError) as error:
                    failed[k] = f"bad update: {error}"
                    continue
                if setup.algorithm == "fedavg":
                    counts.append(int(reply.content["metrics"]["num-examples"]))
                replied.append(k)
        raised = [k for k in asked if failed.get(k, "").startswith("error: ")]
        if asked and len(raised) == len(asked):
            raise RuntimeError(
                f"every client asked in round {round_} raised an error, as a setting or a data "
                f"file that does not fit the run makes them all do: client {asked[0]}: "
                f"{failed[asked[0]]}. Nothing of this round is released."
            )
        record: dict[str, Any] = {
            "round": round_, "sampled": sampled, "replied": replied,
            "failed": {str(k): v for k, v in sorted(failed.items())},
        }  # fmt: skip
        if setup.algorithm == "fedavg":
            if updates:
                add_to_model(model, fedavg_aggregate(updates, counts))
        else:
            aggregate = dp_fedavg_aggregate(
                updates, max_update_norm=setup.max_update_norm,
                noise_multiplier=setup.noise_multiplier,
                expected_clients=setup.sample_rate * setup.num_clients, generator=noise,
                parameter_shapes=shapes, dtype=params[0][1].dtype,
            )  # fmt: skip
            add_to_model(model, aggregate, setup.server_lr)
            accountant.step(noise_multiplier=setup.noise_multiplier, sample_rate=setup.sample_rate)
            record.update(epsilon=accountant.get_epsilon(setup.delta), delta=setup.delta)
        scores = evaluate_model(model, x_test, y_test, loss="cross_entropy")
        record.update(test_accuracy=scores["accuracy"], test_loss=scores["loss"])
        if round_ == setup.rounds and setup.evaluate_clients:
            record["client_evaluation"] = _evaluate_clients(grid, setup, model, nodes, gone)
        history.append(record)
        save_round(setup, history, model)
        print(_summary(setup, record), flush=True)
        if on_round is not None:
            on_round(record, model)
    return history


def _evaluate_clients(
    grid: Grid, setup: FederatedSetup, model: torch.nn.Module, nodes: dict[int, int],
    gone: dict[int, str],
) -> dict[str, dict[str, float]]:  # fmt: skip
    """Every reachable client's accuracy and loss of the final model on its own part."""
    arrays = ArrayRecord(model.state_dict())
    live = [k for k in sorted(nodes) if k not in gone]
    messages = [
        Message(RecordDict({"arrays": arrays}), dst_node_id=nodes[k], message_type="evaluate")
        for k in live
    ]
    replies = {
        r.metadata.src_node_id: r
        for r in grid.send_and_receive(messages, timeout=setup.round_timeout)
        if not r.has_error()
    }
    return {str(k): dict(replies[nodes[k]].content["metrics"]) for k in live if nodes[k] in replies}


def warn_about_setup(setup: FederatedSetup) -> None:
    """Warn where a DP-FedAvg run's setup weakens what its epsilon says: ``delta >= 1/K``, or a
    seed, which every SuperNode receives in the run config (so every client can rebuild the
    server's noise). :func:`run_server` and the SecAgg+ app call it.

    Args:
        setup: the run.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     warn_about_setup(FederatedSetup(seed=0))
        >>> "every client can rebuild the server's noise" in str(caught[0].message)
        True
    """
    warn_if_delta_large(setup.delta, setup.num_clients, unit="client", symbol="K")
    if setup.seed != -1:
        warnings.warn(
            f"seed={setup.seed}: every SuperNode receives the run config, seed included, so "
            "every client can rebuild the server's noise; the run's privacy holds only against "
            "those who see the models but not the run config. Use seed=-1 (fresh entropy).",
            stacklevel=3,
        )


def _summary(setup: FederatedSetup, record: dict[str, Any]) -> str:
    """The log line of a round: what the run releases. Which clients were sampled, replied or
    failed stays in the server's records (``output_dir``): the guarantee does not cover it,
    and ``flwr log`` shows the log to whoever submitted the run."""
    epsilon = f", epsilon {record['epsilon']:.3f}" if "epsilon" in record else ""
    accuracy = record["test_accuracy"]
    return f"{setup.algorithm} round {record['round']}: test accuracy {accuracy:.4f}{epsilon}"
