r"""What the Flower apps share with the in-process loops: the setup, the data, the model, a round.

Nothing here imports Flower, so the in-process reference (:func:`run_in_process`) runs without
the optional extra. The Flower apps (:mod:`companion.flower.client_app`,
:mod:`companion.flower.server_app`) read one :class:`FederatedSetup` from their run config and
call the same functions as :func:`companion.federated.fedavg` and
:func:`companion.federated.dp_fedavg`, in the same order, so that with the same seeds they
produce the same global model round by round:

* client ``k`` holds part ``k`` of a partition of the digits' training split
  (:func:`client_data`, the partitions of :mod:`companion.data`);
* the server samples the clients (:func:`sample_clients`: uniformly without replacement for
  FedAvg, Poisson for DP-FedAvg), sends each its shuffle seed (:func:`shuffle_seed`), and
  combines the updates with :func:`companion.federated.fedavg_aggregate` or
  :func:`companion.federated.dp_fedavg_aggregate`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from companion import federated, models
from companion._random import derive_seed
from companion._torch import trainable_named
from companion._validation import (
    check_delta,
    check_fraction,
    check_nonnegative,
    check_positive,
    check_positive_int,
    with_article,
)
from companion.federated.clients import check_mu

__all__ = [
    "ALGORITHMS",
    "FederatedSetup",
    "all_clients",
    "build_model",
    "client_data",
    "run_in_process",
    "sample_clients",
    "held_out_data",
    "shuffle_seed",
]

ALGORITHMS = ("fedavg", "dp-fedavg", "both")
_MODELS = {"logistic_regression": models.logistic_regression, "mlp": models.mlp}
_PARTITIONS = ("iid", "shards", "dirichlet")


@dataclasses.dataclass(frozen=True)
class FederatedSetup:
    """One federated training run, as Flower's run config carries it (keys with hyphens).

    The fields are the arguments of :func:`companion.federated.fedavg` (``algorithm="fedavg"``,
    ``sample_rate`` is then the client fraction :math:`C`) and
    :func:`companion.federated.dp_fedavg` (``"dp-fedavg"``), plus the data and the model;
    ``"both"`` runs FedAvg, then DP-FedAvg from the same initial model, in one Flower run.
    ``partition`` is ``"iid"``, ``"shards"`` or ``"dirichlet"`` (label skew of concentration
    ``dirichlet_alpha``, :func:`companion.data.partition_dirichlet`).
    ``batch_size=0`` means the full batch; ``seed=-1`` means fresh entropy (``seed=None``).
    Flower sends the whole run config to every SuperNode, so a ``seed`` other than -1 is known
    to every client, which can then rebuild the server's noise: a seeded run is for tests and
    demonstrations, and its noise protects nothing against the clients.
    Everything else configures the Flower run: ``join_timeout`` (seconds to wait for the
    clients' SuperNodes), ``round_timeout`` (seconds to wait for replies in a round; a client
    that has not answered by then has dropped out), ``evaluate_clients`` (ask every client to
    evaluate the final model on its own data; the replies, each client's number of examples,
    accuracy and loss, come in the clear and are outside any DP guarantee), ``output_dir``
    (where the ServerApp writes its records; empty: nowhere), ``record_received`` (the SecAgg+
    app also writes each round's un-noised secure sum and what its server received, for
    tests: whoever reads those files gets no DP guarantee), and the fault injection used by
    the tests: the client holding part ``fail_partition`` raises in round ``fail_round``
    (``-1``: never).

    The defaults are the app's (``companion/flower/app/pyproject.toml``): DP-FedAvg with 3
    clients, 3 rounds, ``q = 0.67``, ``sigma = 0.5``, ``S = 1``, 5 local epochs of batches of
    32 at learning rate 0.1, and noise from fresh entropy. With 3 clients user-level privacy
    is weak (epsilon near 20 after 3 rounds at ``delta = 1e-5``); the setup shows the
    mechanics, the chapter shows what many clients buy.

    Raises:
        ValueError: if a name (algorithm, model, partition) is unknown or a number is out of
            range (``delta`` in (0, 1), ``sample_rate`` in (0, 1], counts >= 1,
            ``noise_multiplier`` >= 0, norms, rates, ``dirichlet_alpha`` and timeouts > 0,
            ``fail_partition`` a part or -1); :meth:`from_run_config` also if a value has the
            wrong type (a string for a flag, a fraction for a count).

    Example:
        >>> setup = FederatedSetup.from_run_config({"noise-multiplier": 1.0, "seed": 0})
        >>> setup.noise_multiplier, setup.algorithms, setup.batch_size_or_none
        (1.0, ('dp-fedavg',), 32)
    """

    algorithm: str = "dp-fedavg"
    num_clients: int = 3
    rounds: int = 3
    sample_rate: float = 0.67
    noise_multiplier: float = 0.5
    max_update_norm: float = 1.0
    local_epochs: int = 5
    batch_size: int = 32
    lr: float = 0.1
    mu: float = 0.0
    server_lr: float = 1.0
    delta: float = 1e-5
    seed: int = -1
    model: str = "logistic_regression"
    model_seed: int = 0
    partition: str = "iid"
    dirichlet_alpha: float = 0.5
    data_seed: int = 0
    join_timeout: float = 60.0
    round_timeout: float = 120.0
    evaluate_clients: bool = True
    output_dir: str = ""
    record_received: bool = False
    fail_partition: int = -1
    fail_round: int = -1

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}.")
        if self.model not in _MODELS:
            raise ValueError(f"model must be one of {tuple(_MODELS)}, got {self.model!r}.")
        if self.partition not in _PARTITIONS:
            raise ValueError(f"partition must be one of {_PARTITIONS}, got {self.partition!r}.")
        check_positive_int("num_clients", self.num_clients)
        check_positive_int("rounds", self.rounds)
        check_positive_int("local_epochs", self.local_epochs)
        check_fraction("sample_rate", self.sample_rate)
        check_delta(self.delta)
        check_nonnegative("noise_multiplier", self.noise_multiplier)
        for name in ("max_update_norm", "lr", "server_lr", "dirichlet_alpha", "join_timeout",
                     "round_timeout"):  # fmt: skip
            check_positive(name, getattr(self, name))
        if not -1 <= self.fail_partition < self.num_clients or self.fail_round < -1:
            raise ValueError(
                f"fail_partition must be -1 (none) or a part 0 .. {self.num_clients - 1}, and "
                f"fail_round >= -1; got {self.fail_partition} and {self.fail_round}."
            )
        check_mu(self.mu, lr=self.lr)  # at the start, not as every client's error in every round
        if self.seed < -1 or self.batch_size < 0:
            raise ValueError("seed must be >= -1 (-1: fresh entropy) and batch_size >= 0.")

    @property
    def algorithms(self) -> tuple[str, ...]:
        """The algorithms this run trains with, in order."""
        return ("fedavg", "dp-fedavg") if self.algorithm == "both" else (self.algorithm,)

    @property
    def seed_or_none(self) -> int | None:
        """``seed``, or None (fresh entropy) for -1."""
        return None if self.seed == -1 else self.seed

    @property
    def batch_size_or_none(self) -> int | None:
        """``batch_size``, or None (the full batch) for 0."""
        return None if self.batch_size == 0 else self.batch_size

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> FederatedSetup:
        """Read the fields from a Flower run config (``"noise-multiplier"`` etc.).

        Unknown keys raise ValueError (a typo must not silently fall back to a default);
        missing keys take the defaults; values are converted to the fields' types.
        """
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in config.items():
            name = key.replace("-", "_")
            if name not in fields:
                raise ValueError(f"unknown run-config key {key!r}; known: {sorted(fields)}.")
            kind = type(fields[name].default)
            if (kind is bool and not isinstance(value, bool)) or (
                kind is int and isinstance(value, float) and not value.is_integer()
            ):  # bool("false") is True, int(2.7) is 2
                raise ValueError(f"run-config key {key!r} must be {with_article(kind.__name__)}, "
                                 f"got {value!r}.")  # fmt: skip
            values[name] = kind(value)
        return cls(**values)

    def to_run_config(self) -> dict[str, Any]:
        """The fields as a Flower run config (keys with hyphens)."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)}

    def replace(self, **changes: Any) -> FederatedSetup:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def build_model(setup: FederatedSetup) -> nn.Module:
    """The global model at round 0: ``companion.models.<model>(seed=model_seed)``.

    Args:
        setup: the run; its ``model`` and ``model_seed`` are used.

    Returns:
        A new model (:func:`companion.models.logistic_regression` or
        :func:`companion.models.mlp`), the same weights for the same ``model_seed``.

    Example:
        >>> [name for name, _ in build_model(FederatedSetup()).named_parameters()]
        ['0.weight', '0.bias']
    """
    return _MODELS[setup.model](seed=setup.model_seed)


def _digits() -> Any:
    """The digits split of :func:`companion.data.load_digits` (imported here: it loads
    scikit-learn, which a ClientApp reading its part from a file does not need)."""
    from companion import data

    return data.load_digits()


def _parts(setup: FederatedSetup, labels: np.ndarray) -> list[np.ndarray]:
    from companion import data

    if setup.partition == "iid":
        return data.partition_iid(len(labels), num_clients=setup.num_clients, rng=setup.data_seed)
    if setup.partition == "shards":
        return data.partition_shards(labels, num_clients=setup.num_clients, rng=setup.data_seed)
    return data.partition_dirichlet(
        labels, num_clients=setup.num_clients, alpha=setup.dirichlet_alpha, rng=setup.data_seed
    )


def client_data(setup: FederatedSetup, partition_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Client ``partition_id``'s training data: its part of the digits' training split.

    The split is :func:`companion.data.load_digits` (seed 0), cut among ``num_clients``
    clients by ``partition`` (:func:`companion.data.partition_iid`, ``partition_shards`` or
    ``partition_dirichlet``) with ``rng=data_seed``, as :func:`run_in_process` cuts it.

    Args:
        setup: the run.
        partition_id: the client, ``0 <= partition_id < num_clients``.

    Returns:
        ``(x, y)``: float32 inputs of shape ``(n_k, 64)`` and int64 labels.

    Raises:
        ValueError: if ``partition_id`` is not in ``[0, num_clients)``.

    Example:
        >>> x, y = client_data(FederatedSetup(num_clients=3), 0)
        >>> tuple(x.shape), tuple(y.shape)
        ((449, 64), (449,))
    """
    if not 0 <= partition_id < setup.num_clients:
        raise ValueError(
            f"partition_id must lie in [0, {setup.num_clients}), got {partition_id}: start one "
            "SuperNode per part, with --node-config 'partition-id=<k> num-partitions=<K>'."
        )
    digits = _digits()
    parts = _parts(setup, digits.y_train)
    return federated.client_datasets(digits.x_train, digits.y_train, [parts[partition_id]])[0]


def all_clients(setup: FederatedSetup) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every client's data, in the order of the partition (for the in-process run).

    Example:
        >>> [len(y) for _, y in all_clients(FederatedSetup(num_clients=3))]
        [449, 449, 449]
    """
    digits = _digits()
    return federated.client_datasets(digits.x_train, digits.y_train, _parts(setup, digits.y_train))


def held_out_data() -> tuple[torch.Tensor, torch.Tensor]:
    """The digits' test split, on which the server evaluates the global model.

    Example:
        >>> x, y = held_out_data()
        >>> tuple(x.shape)
        (450, 64)
    """
    digits = _digits()
    return federated.client_datasets(digits.x_test, digits.y_test, [np.arange(len(digits.y_test))])[
        0
    ]


def sample_clients(setup: FederatedSetup, rng: np.random.Generator) -> list[int]:
    """The clients of one round, drawn exactly as the in-process loops draw them.

    FedAvg: ``max(1, round(C K))`` of the ``K`` clients uniformly without replacement, sorted
    (``rng.choice``, as :func:`companion.federated.fedavg`); DP-FedAvg: every client
    independently with probability ``q`` (Poisson sampling, ``rng.random(K) < q``, as
    :func:`companion.federated.dp_fedavg`). Called once per round with the same ``rng``, it
    gives the same clients as the in-process loop seeded alike.

    Args:
        setup: the run (``algorithm`` ``"fedavg"`` or ``"dp-fedavg"``, ``sample_rate``,
            ``num_clients``).
        rng: the server's generator, ``numpy.random.default_rng(seed)``.

    Returns:
        The sorted client indices of the round (possibly none for DP-FedAvg).

    Example:
        >>> import numpy as np
        >>> sample_clients(FederatedSetup(algorithm="fedavg"), np.random.default_rng(0))
        [1, 2]
    """
    k = setup.num_clients
    if setup.algorithm == "fedavg":
        size = max(1, round(setup.sample_rate * k))
        return sorted(int(i) for i in rng.choice(k, size=size, replace=False))
    return [int(i) for i in np.flatnonzero(rng.random(k) < setup.sample_rate)]


def shuffle_seed(setup: FederatedSetup, round_: int, client: int) -> int:
    """Client ``client``'s shuffle seed in round ``round_`` (-1: fresh entropy).

    The seed of the in-process loops' stream ``(seed, round, client)``
    (``numpy.random.SeedSequence``); a derived value, so the server can send it without
    sending ``seed`` itself (which also seeds the noise; but the run config, which every
    SuperNode receives, holds it: see :class:`FederatedSetup`).

    Args:
        setup: the run; with ``seed=-1`` every stream is fresh entropy.
        round_: the round, >= 1.
        client: the client index.

    Returns:
        An integer seed >= 0, or -1 for fresh entropy.

    Example:
        >>> shuffle_seed(FederatedSetup(seed=0), 1, 2), shuffle_seed(FederatedSetup(), 1, 2)
        (3884055042, -1)
    """
    seed = derive_seed(setup.seed_or_none, round_, client)
    return -1 if seed is None else seed


def run_in_process(setup: FederatedSetup) -> list[dict[str, Any]]:
    """The same training with :mod:`companion.federated`, one record per round.

    ``setup.algorithm`` must be ``"fedavg"`` or ``"dp-fedavg"`` (run ``"both"`` as two setups).

    Each record holds ``"round"``, ``"clients"``, ``"test_accuracy"``, ``"test_loss"``, for
    DP-FedAvg ``"epsilon"`` and ``"delta"``, and ``"weights"``: the global model's trainable
    parameters after the round (a dict name -> tensor). A run of ``t`` rounds reproduces the
    first ``t`` rounds of a longer one (the streams are drawn round by round), so the weights
    of round ``t`` come from a run of ``t`` rounds.

    Args:
        setup: the run, with a ``seed`` (a run from fresh entropy cannot be repeated).

    Returns:
        A list with one record per round, as above.

    Raises:
        ValueError: if ``seed`` is -1 or ``algorithm`` is ``"both"``.

    Example:
        >>> history = run_in_process(FederatedSetup(seed=0, rounds=2, local_epochs=1))
        >>> [record["clients"] for record in history]
        [[0, 1, 2], [0]]
    """
    if setup.seed_or_none is None:
        raise ValueError("run_in_process needs a seed (a run from fresh entropy has no twin).")
    if setup.algorithm == "both":
        raise ValueError('run_in_process runs one algorithm: "fedavg" or "dp-fedavg".')
    clients = all_clients(setup)
    x_test, y_test = held_out_data()
    common: dict[str, Any] = dict(
        local_epochs=setup.local_epochs, batch_size=setup.batch_size_or_none, lr=setup.lr,
        x_test=x_test, y_test=y_test, seed=setup.seed, progress=False,
    )  # fmt: skip
    history: list[dict[str, Any]] = []
    for rounds in range(1, setup.rounds + 1):
        model = build_model(setup)
        if setup.algorithm == "fedavg":
            records = federated.fedavg(
                model, clients, rounds=rounds, client_fraction=setup.sample_rate, mu=setup.mu,
                **common,
            )  # fmt: skip
        else:
            records = federated.dp_fedavg(
                model, clients, rounds=rounds, sample_rate=setup.sample_rate,
                noise_multiplier=setup.noise_multiplier, max_update_norm=setup.max_update_norm,
                delta=setup.delta, server_lr=setup.server_lr, **common,
            )  # fmt: skip
        record = dict(records[-1])
        record["weights"] = {name: p.detach().clone() for name, p in trainable_named(model)}
        history.append(record)
    return history
