"""companion's FedAvg and DP-FedAvg on Flower 1.42, a federated-learning engine (``[flower]``).

The same training as :mod:`companion.federated`, run three ways that give the same global model
round by round (with the same seeds, to the last bit; with SecAgg+ to the quantisation error):

1. in one process: :func:`companion.federated.fedavg` / :func:`companion.federated.dp_fedavg`
   (:func:`companion.flower.task.run_in_process`);
2. Flower's simulation engine, which plays the clients in one machine
   (:class:`companion.flower.deploy.LocalFederation` with ``simulation=True``);
3. a deployment on 127.0.0.1: a SuperLink and one SuperNode process per client, each with its
   own port and its own part of the data (:class:`~companion.flower.deploy.LocalFederation`;
   ``make flower`` runs it, ``python -m companion.flower`` is the same command).

The modules, one idea each:

- :mod:`companion.flower.task`: the run's setup (Flower's run config), the data, the model, the
  sampling and the seeds, shared by the apps and the in-process reference (no Flower import);
- :mod:`companion.flower.client_app`: the ClientApp (Message API: ``train``, ``evaluate``,
  ``query``) around :func:`companion.federated.local_update`;
- :mod:`companion.flower.server_app`: the ServerApp: Poisson sampling,
  :func:`companion.federated.fedavg_aggregate` / :func:`~companion.federated.dp_fedavg_aggregate`,
  :class:`companion.accounting.RDPAccountant`, dropped clients;
- :mod:`companion.flower.secagg`: DP-FedAvg with Flower's SecAgg+ (legacy workflow);
- :mod:`companion.flower.quantization`: the clipping that SecAgg+'s quantization needs;
- :mod:`companion.flower.partitions`: each client's part of the data on disk;
- :mod:`companion.flower.records`: the files in which a ServerApp leaves its results, and what
  its server received;
- :mod:`companion.flower.deploy`: start and stop the processes, submit runs, check their status.

The Flower App folders ``companion/flower/app`` and ``companion/flower/secagg_app`` hold only a
``pyproject.toml`` naming the apps; ``flwr run`` sends that file, and the SuperLink and
SuperNodes import the code from the installed package. Importing this package does not import
Flower; its modules other than ``task`` and ``quantization`` need the extra.
"""

from __future__ import annotations

import importlib

# The modules, imported on first access (PEP 562), so that importing the package needs no Flower.
_SUBMODULES = frozenset(
    {
        "client_app",
        "deploy",
        "partitions",
        "quantization",
        "records",
        "secagg",
        "server_app",
        "task",
    }
)


def __getattr__(name: str) -> object:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_SUBMODULES})
