"""Where the ServerApps leave their records: JSON and weight files in the run's output folder.

A ServerApp runs in a process of its own, started by the SuperLink; it hands its results back
through files in ``setup.output_dir`` (nothing is written if that is empty):
``<algorithm>/history.json`` (one record per round, rewritten after every round),
``<algorithm>/weights-<round>.pt`` (the global model's trainable parameters after the round),
and at the end ``done.json`` or ``error.json``. Each file is written under a temporary name and
renamed, so a reader never sees half of one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from companion._torch import trainable_named
from companion.flower.task import FederatedSetup

__all__ = ["save_round", "write_json"]


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
