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
(``MODULUS``, ``pairwise_seeds``, ``mask_update``, ``secure_sum``) are
re-exported here.

.. warning::

    Teaching code: every client runs in one process, and :func:`dp_fedavg` draws
    floating-point noise from torch's pseudo-random generator (see its docstring); use a
    maintained framework for real deployments.
"""

from companion.federated.aggregation import dp_fedavg_aggregate, fedavg_aggregate
from companion.federated.clients import Client, Update, client_datasets, local_update  # noqa: F401
from companion.federated.loops import dp_fedavg, fedavg

# The secure-aggregation toy moved to companion.secure_aggregation; importing it from here works.
from companion.secure_aggregation import MODULUS, mask_update, pairwise_seeds, secure_sum  # noqa: F401

__all__ = [
    "client_datasets",
    "dp_fedavg",
    "dp_fedavg_aggregate",
    "fedavg",
    "fedavg_aggregate",
    "local_update",
]
