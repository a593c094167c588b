"""Client data on disk: the part of the data each SuperNode holds, and how it finds it.

A deployed client reads its own files; here :func:`save_partition` writes each client's part of
the digits once and a SuperNode started with ``data-path=<file>`` in its node config reads it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from companion.flower.task import FederatedSetup, client_data

__all__ = ["load_partition", "node_data", "node_partition", "save_partition"]


def save_partition(setup: FederatedSetup, partition_id: int, path: str) -> None:
    """Write client ``partition_id``'s data to ``path`` (``.npz``), with what it was cut from.

    A SuperNode given ``data-path=<path>`` in its node config reads its data from there (as a
    real client reads its own files) instead of rebuilding the partition from the data set
    (which would also load scikit-learn in every ClientApp process).

    Args:
        setup: the run; ``num_clients``, ``partition`` and ``data_seed`` are stored too.
        partition_id: the client.
        path: the file to write.

    Example:
        >>> import os, tempfile
        >>> from companion.flower.task import FederatedSetup
        >>> path = os.path.join(tempfile.mkdtemp(), "part-0.npz")
        >>> save_partition(FederatedSetup(), 0, path)
        >>> tuple(load_partition(FederatedSetup(), 0, path)[0].shape)
        (449, 64)
    """
    x, y = client_data(setup, partition_id)
    np.savez(path, x=x.numpy(), y=y.numpy(), partition_id=partition_id, **_data_key(setup))


def load_partition(
    setup: FederatedSetup, partition_id: int, path: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read what :func:`save_partition` wrote (see its example).

    Returns:
        ``(x, y)`` as :func:`~companion.flower.task.client_data` returns them.

    Raises:
        ValueError: if the file holds another part, or a part cut for another setup.
    """
    with np.load(path) as saved:
        key = {name: saved[name].item() if name in saved else None for name in _data_key(setup)}
        if key != _data_key(setup) or int(saved["partition_id"]) != partition_id:
            raise ValueError(
                f"{path} holds part {int(saved['partition_id'])} of {key}; this run needs part "
                f"{partition_id} of {_data_key(setup)}."
            )
        return torch.from_numpy(saved["x"]), torch.from_numpy(saved["y"])


def _data_key(setup: FederatedSetup) -> dict[str, Any]:
    return {"num_clients": setup.num_clients, "partition": setup.partition,
            "dirichlet_alpha": setup.dirichlet_alpha, "data_seed": setup.data_seed}  # fmt: skip


def node_partition(node_config: Mapping[str, Any], setup: FederatedSetup) -> int:
    """The part a SuperNode holds, from its node config, checked against the run.

    Args:
        node_config: the SuperNode's node config (``Context.node_config``).
        setup: the run.

    Raises:
        ValueError: if the node config has no ``partition-id``, or announces another
            ``num-partitions`` than the run's ``num_clients``.

    Example:
        >>> from companion.flower.task import FederatedSetup
        >>> node_partition({"partition-id": 2, "num-partitions": 3}, FederatedSetup())
        2
    """
    if "partition-id" not in node_config:
        raise ValueError(
            "this SuperNode has no partition-id: start it with --node-config "
            "'partition-id=<k> num-partitions=<K>'."
        )
    num = int(node_config.get("num-partitions", setup.num_clients))
    if num != setup.num_clients:
        raise ValueError(f"this SuperNode is one of {num} parts, the run has {setup.num_clients}.")
    return int(node_config["partition-id"])


def node_data(
    node_config: Mapping[str, Any], setup: FederatedSetup
) -> tuple[torch.Tensor, torch.Tensor]:
    """A SuperNode's data: read from its ``data-path`` file if it has one, else cut anew.

    Raises:
        ValueError: as :func:`node_partition` and :func:`load_partition`.

    Example:
        >>> from companion.flower.task import FederatedSetup
        >>> x, y = node_data({"partition-id": 1, "num-partitions": 3}, FederatedSetup())
        >>> len(y)
        449
    """
    partition = node_partition(node_config, setup)
    if "data-path" in node_config:
        return load_partition(setup, partition, str(node_config["data-path"]))
    return client_data(setup, partition)
