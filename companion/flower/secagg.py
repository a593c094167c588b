r"""DP-FedAvg with SecAgg+: the server learns only the sum of the clipped updates, then adds noise.

In :mod:`companion.flower.server_app` the server receives every update in the clear, clips it
and adds the noise (central DP with a trusted server). Here the clients clip their own update
to L2 norm :math:`S` and hand it to Flower's SecAgg+ protocol (Bell, Bonawitz, Gascón,
Lepoint and Raykova 2020, "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead",
ACM CCS; in Flower 1.42 only the legacy workflow has it: ``SecAggPlusWorkflow`` on the server,
``secaggplus_mod`` on the clients). Each client quantizes its update, adds pairwise masks that
cancel in the sum (:mod:`companion.secure_aggregation` shows the idea in miniature) and a
private mask whose seed it secret-shares, so the server can unmask the sum, and only the sum,
even if some clients drop out. The server then adds :math:`\mathcal N(0, \sigma^2 S^2 I)` and
divides by the fixed :math:`qK`, as :func:`companion.federated.dp_fedavg_aggregate` does. Each
client clips to :func:`~companion.flower.quantization.clipping_norm`, :math:`S` less what the
quantizer's rounding can add, so the update summed has norm at most :math:`S` and the
accountant is unchanged (:mod:`companion.flower.quantization` gives the ranges). A client whose
update is not finite (local training that diverged) sends zero
(:func:`~companion.flower.quantization.clip_update`).

**Against whom.** The server learns only the sum if it follows the protocol (honest but
curious). Flower relays the clients' public keys without authenticating them, so a server that
deviates can sit between two clients; and Flower 1.42 derives each mask from a 32-bit seed
(NumPy's ``RandomState``), which is not cryptographic. This app demonstrates the protocol's
flow; it is not a hardened deployment.

**Rounds with fewer than two clients.** Poisson sampling can draw one client or none, and
SecAgg+ needs two (with one, the sum is the update: no protocol can hide it). Such a round is
still a round of DP-FedAvg, released like any other: with no client the sum is zero; a lone
client is asked for its clipped update unmasked (the action ``train.alone``, without
``secaggplus_mod``), which is exactly what the sum would have told the server; if it raises or
does not reply, it contributes zero, like a client that drops out of a SecAgg+ round. Neither
skipping the round nor stopping the run would do: whether a round has fewer than two clients
depends on who takes part, so a skipped round or a stop would release something the
accountant does not cover (and skipping one would double the sensitivity of the next). The
run stops only when SecAgg+ cannot unmask a round because too many sampled clients dropped
out or raised (in a round of two, one is too many); whether it does can depend on one client,
so a stop is outside the guarantee. With ``record_received`` the ServerApp also writes what
it received and each round's sum before the noise, so that a test can check which replies
held an update in the clear; these files, like the records' ``"sampled"``,
``"contributors"`` and ``"aggregation"``, are outside the guarantee. Flower's SecAgg+ workflow
logs each round's number of sampled clients and failures at level INFO; the ServerApp raises
Flower's log level to WARNING while it runs, since ``flwr log`` shows the log to whoever
submitted the run.

**What the clients learn.** The lone client learns that it is alone. In a SecAgg+ round every
sampled client receives the others' public keys under their node ids, so it learns who else
was sampled: a client that knows a node's id can tell in which of its own rounds that node
took part, and against it the amplification by sampling that the accountant credits does not
hold.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import (
    Code,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.logger import LOGGER_NAME
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid, ServerApp

from companion._random import torch_generator
from companion._torch import add_to_model, evaluate_model, trainable_named
from companion.accounting import RDPAccountant
from companion.dpsgd import add_gaussian_noise
from companion.federated import local_update
from companion.flower import client_app as plain_client
from companion.flower.partitions import node_data, node_partition
from companion.flower.quantization import (
    MAX_CLIENTS,
    QUANTIZATION_RANGE,
    clip_update,
    clipping_norm,
)
from companion.flower.records import RecordingGrid, save_round, what_the_server_saw, write_json
from companion.flower.server_app import connect_clients, warn_about_setup
from companion.flower.task import (
    FederatedSetup,
    build_model,
    held_out_data,
    sample_clients,
    shuffle_seed,
)

__all__ = [
    "client_app",
    "main",
    "run_secagg_server",
    "secagg_workflow",
    "server_app",
    "train",
]

# --- the client --------------------------------------------------------------------------------

client_app = ClientApp()
client_app.query()(plain_client.query)


@client_app.train(mods=[secaggplus_mod])
def train(message: Message, context: Context) -> Message:
    """Local training, then clip the update to
    :func:`~companion.flower.quantization.clipping_norm` (zero if it is not finite);
    ``secaggplus_mod`` quantizes and masks what this returns (registered a second time as the
    action ``alone``, unmasked, for a round in which this client is the only one sampled)."""
    torch.set_num_threads(1)
    setup = FederatedSetup.from_run_config(context.run_config)
    partition = node_partition(context.node_config, setup)  # checks the part against the run
    fitins = compat.recorddict_to_fitins(message.content, keep_input=True)
    config = fitins.config
    plain_client.raise_injected_failure(setup, partition, int(config["round"]))
    model = build_model(setup)
    names = [name for name, _ in trainable_named(model)]
    arrays = parameters_to_ndarrays(fitins.parameters)
    model.load_state_dict({n: torch.from_numpy(a) for n, a in zip(names, arrays, strict=True)})
    x, y = node_data(context.node_config, setup)
    seed = int(config["shuffle-seed"])
    update = local_update(
        model, x, y, epochs=int(config["epochs"]), batch_size=int(config["batch-size"]) or None,
        lr=float(config["lr"]), seed=None if seed == -1 else seed,
    )  # fmt: skip
    dimension = sum(value.numel() for value in update.values())
    clipped = clip_update(update, max_update_norm=clipping_norm(setup.max_update_norm, dimension))
    fitres = FitRes(
        Status(Code.OK, ""), ndarrays_to_parameters([v.numpy() for v in clipped.values()]), 1, {}
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=message)


client_app.train("alone")(train)


# --- the server --------------------------------------------------------------------------------


def _fit_ins(setup: FederatedSetup, parameters: Parameters, round_: int, client: int) -> FitIns:
    """The instruction to train, in the legacy format that SecAgg+ wraps."""
    config: dict[str, Scalar] = {
        "round": round_, "shuffle-seed": shuffle_seed(setup, round_, client),
        "epochs": setup.local_epochs, "batch-size": setup.batch_size, "lr": setup.lr,
    }  # fmt: skip
    return FitIns(parameters, config)


class _PoissonStrategy(Strategy):
    """The legacy strategy the SecAgg+ workflow calls: our sampling in, the secure sum out."""

    def __init__(self, grid: Grid, setup: FederatedSetup, nodes: dict[int, int]) -> None:
        self.grid, self.setup, self.nodes = grid, setup, nodes
        self.sampled: list[int] = []
        self.secure_sum: list[np.ndarray] | None = None
        self.contributors = 0

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        # self.sampled is set by run_secagg_server before the workflow runs
        self.secure_sum = None
        run_id = self.grid.run.run_id
        return [
            (GridClientProxy(self.nodes[k], self.grid, run_id),
             _fit_ins(self.setup, parameters, server_round, k))
            for k in self.sampled
        ]  # fmt: skip

    def aggregate_fit(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: Any
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        # SecAgg+ hands every result the same parameters: the unmasked average (weights 1).
        self.contributors = len(results)
        average = parameters_to_ndarrays(results[0][1].parameters)
        self.secure_sum = [a * self.contributors for a in average]
        return None, {}

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return []

    def aggregate_evaluate(
        self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]], failures: Any
    ) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        return None


@contextlib.contextmanager
def _flower_quiet() -> Iterator[None]:
    """Flower's log level raised to WARNING for the duration (see the module docstring)."""
    logger = logging.getLogger(LOGGER_NAME)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def secagg_workflow(setup: FederatedSetup) -> SecAggPlusWorkflow:
    """Flower's SecAgg+ workflow with the ranges stated in the module docstring.

    Every sampled client shares its secrets with all others (``num_shares=1.0``), two thirds
    of them (at least 2) can reconstruct a dropped client's masks, weights are 1, the
    quantizer covers :math:`[-S, S]` with :math:`2^{22}` levels, the ring is
    :math:`\\mathbb Z_{2^{32}}`, and each stage waits at most ``round_timeout`` seconds.

    Example:
        >>> workflow = secagg_workflow(FederatedSetup(max_update_norm=2.0))
        >>> workflow.clipping_range, workflow.quantization_range, workflow.max_weight
        (2.0, 4194304, 1.0)
    """
    return SecAggPlusWorkflow(
        num_shares=1.0, reconstruction_threshold=2 / 3, max_weight=1.0,
        clipping_range=setup.max_update_norm, quantization_range=QUANTIZATION_RANGE,
        modulus_range=2**32, timeout=setup.round_timeout,
    )  # fmt: skip


def _sum_without_secagg(
    grid: Grid, setup: FederatedSetup, nodes: dict[int, int], sampled: list[int],
    weights: list[np.ndarray], round_: int,
) -> tuple[list[np.ndarray], int]:  # fmt: skip
    """The sum of a round with fewer than two sampled clients and how many it holds: zero, or
    the lone client's clipped update, asked for in the clear (see the module docstring)."""
    total = [np.zeros_like(w) for w in weights]
    if not sampled:
        return total, 0
    (client,) = sampled
    fitins = _fit_ins(setup, ndarrays_to_parameters(weights), round_, client)
    content = compat.fitins_to_recorddict(fitins, keep_input=True)
    message = Message(
        content, dst_node_id=nodes[client], message_type="train.alone", group_id=str(round_)
    )
    replies = list(grid.send_and_receive([message], timeout=setup.round_timeout))
    if not replies or replies[0].has_error():  # a dropout, as in a SecAgg+ round
        return total, 0
    update = parameters_to_ndarrays(
        compat.recorddict_to_fitres(replies[0].content, keep_input=True).parameters
    )
    if [a.shape for a in update] != [w.shape for w in weights]:
        raise ValueError(f"the update of round {round_} does not fit the model's parameters")
    return update, 1


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """The SecAgg+ ServerApp's main function: DP-FedAvg for ``rounds`` rounds (the run
    config's ``algorithm`` is ignored); records as the plain ServerApp writes them, plus, with
    ``record_received``, per round ``secure-sum-<t>.pt`` (the unmasked sum, before the noise)
    and ``received-<t>.npz`` (what the replies held)."""
    torch.set_num_threads(1)
    setup = FederatedSetup.from_run_config(context.run_config).replace(algorithm="dp-fedavg")
    try:
        history = run_secagg_server(grid, context, setup)
    except Exception as error:
        write_json(setup, "error.json", {"error": f"{type(error).__name__}: {error}"})
        raise
    write_json(setup, "done.json", {"algorithms": ["dp-fedavg"], "rounds": len(history)})


def run_secagg_server(grid: Grid, context: Context, setup: FederatedSetup) -> list[dict[str, Any]]:
    """The rounds of DP-FedAvg with SecAgg+ (see the module docstring).

    Args:
        grid: the ServerApp's Grid.
        context: the ServerApp's Context (the legacy workflow keeps its state there).
        setup: the run; ``seed=-1`` for fresh entropy (another seed is known to every client:
            see :class:`~companion.flower.task.FederatedSetup`; it warns).

    Returns:
        A list with one record per round, holding ``"round"``, ``"sampled"``, ``"contributors"``
        (clients whose update entered the sum), ``"aggregation"`` (``"SecAgg+"``, or for a
        round with fewer than two clients ``"in the clear"`` or ``"none"``), ``"epsilon"``,
        ``"delta"``, ``"test_accuracy"``, ``"test_loss"``, ``"quantization_step"``.

    Raises:
        RuntimeError: if SecAgg+ could not unmask a round (too many sampled clients dropped
            out or raised).
        TimeoutError, ValueError: from :func:`companion.flower.server_app.connect_clients`.
        ValueError: if the setup has more than
            :data:`~companion.flower.quantization.MAX_CLIENTS` clients, or a lone client's
            update does not fit the model.

    Example:
        >>> run_secagg_server(grid, context, FederatedSetup(seed=0))  # doctest: +SKIP
    """
    if setup.num_clients > MAX_CLIENTS:
        raise ValueError(
            f"num_clients={setup.num_clients} is too many for SecAgg+ with {QUANTIZATION_RANGE} "
            f"quantization levels: a round's sum would wrap around 2**32 from 1024 clients on. "
            f"Use at most {MAX_CLIENTS}."
        )
    warn_about_setup(setup)
    nodes = connect_clients(grid, setup)
    recording = RecordingGrid(grid)
    strategy = _PoissonStrategy(recording, setup, nodes)
    legacy = LegacyContext(context, ServerConfig(num_rounds=setup.rounds), strategy)
    workflow = secagg_workflow(setup)
    model = build_model(setup)
    params = trainable_named(model)
    noise = torch_generator(setup.seed_or_none)
    accountant = RDPAccountant()
    x_test, y_test = held_out_data()
    rng = np.random.default_rng(setup.seed_or_none)
    history: list[dict[str, Any]] = []
    for round_ in range(1, setup.rounds + 1):
        strategy.sampled = sample_clients(setup, rng)
        weights = [p.detach().numpy() for _, p in params]
        recording.received.clear()
        if len(strategy.sampled) >= 2:
            legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
                {Key.CURRENT_ROUND: round_}
            )
            legacy.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord(weights)
            with _flower_quiet():  # its INFO lines give the round's size and failures
                workflow(recording, legacy)
            if strategy.secure_sum is None:
                raise RuntimeError(
                    f"SecAgg+ could not unmask round {round_}: too many of its clients dropped "
                    "out or raised. Stopping: nothing of this round is released."
                )
            summed, contributors = strategy.secure_sum, strategy.contributors
            aggregation = "SecAgg+"
        else:
            summed, contributors = _sum_without_secagg(
                recording, setup, nodes, strategy.sampled, weights, round_
            )
            aggregation = "in the clear" if strategy.sampled else "none"
        total = {
            name: torch.from_numpy(np.asarray(a, dtype=np.float32)).reshape(p.shape)
            for (name, p), a in zip(params, summed, strict=True)
        }
        secure_sum = {name: value.clone() for name, value in total.items()}
        add_gaussian_noise(total, std=setup.noise_multiplier * setup.max_update_norm,
                           generator=noise)  # fmt: skip
        expected = setup.sample_rate * setup.num_clients
        add_to_model(model, {k: v / expected for k, v in total.items()}, setup.server_lr)
        accountant.step(noise_multiplier=setup.noise_multiplier, sample_rate=setup.sample_rate)
        scores = evaluate_model(model, x_test, y_test, loss="cross_entropy")
        record = {
            "round": round_, "sampled": strategy.sampled, "contributors": contributors,
            "aggregation": aggregation,
            "epsilon": accountant.get_epsilon(setup.delta), "delta": setup.delta,
            "test_accuracy": scores["accuracy"], "test_loss": scores["loss"],
            "quantization_step": 2 * setup.max_update_norm / QUANTIZATION_RANGE,
        }  # fmt: skip
        history.append(record)
        save_round(setup, history, model)
        if setup.output_dir and setup.record_received:
            seen = what_the_server_saw(recording.received)
            folder = Path(setup.output_dir) / setup.algorithm
            torch.save(secure_sum, folder / f"secure-sum-{round_}.pt")
            np.savez(folder / f"received-{round_}.npz", **seen)
        print(
            f"secagg round {round_}: test accuracy {record['test_accuracy']:.4f}, epsilon "
            f"{record['epsilon']:.3f}",
            flush=True,
        )
    return history
