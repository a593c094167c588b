"""The ClientApp: one client of :mod:`companion.federated`, behind Flower's Message API.

Each SuperNode holds one part of the data, named by its node config
(``--node-config "partition-id=<k> num-partitions=<K>"``; the simulation engine sets the same
keys; with ``data-path=<file>`` the part is read from that file, see
:func:`companion.flower.partitions.save_partition`). Flower starts this app for every message the
node receives:

* ``train``: load the global weights from the message, run
  :func:`companion.federated.local_update` on the node's part with the instructions the server
  sent (epochs, batch size, learning rate, FedProx's ``mu``, the shuffle seed), and reply with
  the update. If the server asks for it (FedAvg) the reply also carries ``num-examples``, the
  weight of the update; DP-FedAvg does not ask, since it must not weight by private data sizes.
* ``evaluate``: accuracy and loss of the received weights on the node's part.
* ``query``: the node's partition id, so that the server can order the nodes as
  :mod:`companion.federated` orders its clients.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from companion._torch import evaluate_model
from companion.federated import local_update
from companion.flower.partitions import node_data, node_partition
from companion.flower.task import FederatedSetup, build_model

__all__ = ["app", "evaluate", "query", "raise_injected_failure", "train"]

app = ClientApp()


def _model(message: Message, setup: FederatedSetup) -> torch.nn.Module:
    """The global model sent with ``message``."""
    model = build_model(setup)
    model.load_state_dict(message.content["arrays"].to_torch_state_dict())
    return model


@app.query()
def query(message: Message, context: Context) -> Message:
    """Reply with this node's partition id (``node.partition-id`` in a ConfigRecord).

    Raises:
        ValueError: if the node has no ``partition-id``, is cut for another number of clients
            (:func:`companion.flower.partitions.node_partition`) or holds a data file cut for
            another setup (:func:`companion.flower.partitions.load_partition`); Flower then
            sends the server an error reply, and the run stops with its message.
    """
    setup = FederatedSetup.from_run_config(context.run_config)
    partition = node_partition(context.node_config, setup)
    node_data(context.node_config, setup)  # a part cut for another setup fails here, not later
    content = RecordDict({"node": ConfigRecord({"partition-id": partition})})
    return Message(content, reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    """Local training from the received weights; reply with the change of the weights.

    Args:
        message: ``arrays`` (the global weights, an ArrayRecord) and ``config`` (``round``,
            ``shuffle-seed``, ``epochs``, ``batch-size`` (0: full batch), ``lr``, ``mu``,
            ``send-num-examples``), as :func:`companion.flower.server_app.run_server` sends.
        context: the node's context; its node config names the part, its run config the
            data setup and the fault injection.

    Returns:
        A reply with ``update`` (an ArrayRecord of new minus received weights) and, if asked
        for, ``metrics.num-examples``.

    Raises:
        RuntimeError: the injected failure (``fail_partition`` in ``fail_round``).
        ValueError: as :func:`query`, or if the arguments are invalid
            (:func:`companion.federated.local_update`).

    Example:
        Flower calls it; tests/test_flower.py runs it in a simulation and a deployment.

        >>> reply = train(message, context)  # doctest: +SKIP
    """
    torch.set_num_threads(1)
    setup = FederatedSetup.from_run_config(context.run_config)
    partition = node_partition(context.node_config, setup)
    config = message.content["config"]
    raise_injected_failure(setup, partition, int(config["round"]))
    x, y = node_data(context.node_config, setup)
    batch_size, seed = int(config["batch-size"]), int(config["shuffle-seed"])
    update = local_update(
        _model(message, setup), x, y, epochs=int(config["epochs"]),
        batch_size=batch_size or None, lr=float(config["lr"]), mu=float(config["mu"]),
        seed=None if seed == -1 else seed,
    )  # fmt: skip
    content = RecordDict({"update": ArrayRecord(update)})
    if config["send-num-examples"]:
        content["metrics"] = MetricRecord({"num-examples": int(x.shape[0])})
    return Message(content, reply_to=message)


def raise_injected_failure(setup: FederatedSetup, partition: int, round_: int) -> None:
    """The tests' fault injection: raise if this client is ``fail_partition`` and the round is
    ``fail_round``."""
    if partition == setup.fail_partition and round_ == setup.fail_round:
        raise RuntimeError(f"injected failure: client {partition} in round {round_}")


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Accuracy and mean loss of the received weights on this node's part.

    The reply (``metrics``: ``accuracy``, ``loss``, ``num-examples``) is computed on the
    client's private data and sent in the clear: it is outside any DP guarantee of the
    training, like the test scores of :func:`companion.federated.dp_fedavg`.

    Raises:
        ValueError: as :func:`query`.
    """
    torch.set_num_threads(1)
    setup = FederatedSetup.from_run_config(context.run_config)
    x, y = node_data(context.node_config, setup)
    scores = evaluate_model(_model(message, setup), x, y, loss="cross_entropy")
    metrics = MetricRecord({**scores, "num-examples": int(x.shape[0])})
    return Message(RecordDict({"metrics": metrics}), reply_to=message)
