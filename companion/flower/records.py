"""Where the ServerApps leave their records: JSON and weight files in the run's output folder.

A ServerApp runs in a process of its own, started by the SuperLink; it hands its results back
through files in ``setup.output_dir`` (nothing is written if that is empty):
``<algorithm>/history.json`` (one record per round, rewritten after every round),
``<algorithm>/weights-<round>.pt`` (the global model's trainable parameters after the round),
and at the end ``done.json`` or ``error.json``. Each file is written under a temporary name and
renamed, so a reader never sees half of one. :class:`RecordingGrid` and
:func:`what_the_server_saw` keep and summarise the replies a server received, so that a test
can check what it saw (:mod:`companion.flower.secagg` saves them per round with
``record_received``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Message
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import Key as SecAggKey
from flwr.serverapp import Grid

from companion._torch import trainable_named
from companion.flower.task import FederatedSetup

__all__ = ["RecordingGrid", "save_round", "what_the_server_saw", "write_json"]


def write_json(setup: FederatedSetup, name: str, payload: Any) -> None:
    """Write ``payload`` as JSON to ``output_dir/name`` (nothing if ``output_dir`` is empty).

    Example:
        >>> import tempfile
        >>> setup = FederatedSetup(output_dir=tempfile.mkdtemp())
        >>> write_json(setup, "done.json", {"rounds": 3})
        >>> json.loads((Path(setup.output_dir) / "done.json").read_text())
        {'rounds': 3}
    """
    if not setup.output_dir:
        return
    path = Path(setup.output_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(payload, indent=1))
    os.replace(temporary, path)


def save_round(
    setup: FederatedSetup, history: list[dict[str, Any]], model: torch.nn.Module
) -> Path | None:
    """Save the weights after the newest round and the records so far; return the folder.

    Example:
        >>> import tempfile
        >>> from companion.flower.task import build_model
        >>> setup = FederatedSetup(output_dir=tempfile.mkdtemp())
        >>> folder = save_round(setup, [{"round": 1}], build_model(setup))
        >>> sorted(path.name for path in folder.iterdir())
        ['history.json', 'weights-1.pt']
    """
    if not setup.output_dir:
        return None
    folder = Path(setup.output_dir) / setup.algorithm
    folder.mkdir(parents=True, exist_ok=True)
    weights = {name: p.detach().clone() for name, p in trainable_named(model)}
    torch.save(weights, folder / f"weights-{history[-1]['round']}.pt")
    write_json(setup, f"{setup.algorithm}/history.json", history)
    return folder


class RecordingGrid(Grid):
    """A Grid that keeps every reply the server receives (to show what the server sees)."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.received: list[Message] = []

    def set_run(self, run: Any) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Any:
        return self._grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self._grid.pull_messages(message_ids))
        self.received.extend(replies)
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self.received.extend(replies)
        return replies


def what_the_server_saw(replies: list[Message]) -> dict[str, Any]:
    """All replies of a round: how many arrays their ArrayRecords held, and the masked
    vectors (one per client that sent one, flattened: the weight factor, then the update)."""
    arrays, masked = 0, []
    for reply in replies:
        if reply.has_error():
            continue
        arrays += sum(len(record) for record in reply.content.array_records.values())
        for record in reply.content.config_records.values():
            if SecAggKey.MASKED_PARAMETERS in record:
                parts = [bytes_to_ndarray(b) for b in record[SecAggKey.MASKED_PARAMETERS]]
                masked.append(np.concatenate([part.ravel() for part in parts]))
    masked_vectors = np.stack(masked) if masked else np.empty((0, 0), dtype=np.int64)
    return {"replies": len(replies), "array_count": arrays, "masked": masked_vectors}
