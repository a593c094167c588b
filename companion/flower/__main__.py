"""``python -m companion.flower`` (``make flower``): DP-FedAvg on a loopback deployment, checked.

Starts a SuperLink and three SuperNodes on 127.0.0.1 (each its own port and its own part of the
digits), runs 3 rounds of DP-FedAvg with the ServerApp and ClientApp of this package, runs the
same training in process with :func:`companion.federated.dp_fedavg`, prints accuracy and epsilon
per round side by side, stops every process, and exits with status 1 if the run failed (its
status, not ``flwr``'s exit code, which is 0 even then) or a round's global model differs from
the in-process one by more than 1e-6. ``--simulation`` adds a run on Flower's simulation engine;
``--record FILE`` writes the table as JSON (``companion/flower/recorded_run.json`` was written so).

The seed is fixed (``--seed``, default 0) so that the three runs can be compared: a seed used for
noise is a secret, which is fine for a demonstration and never for a released model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from companion.flower.deploy import FlowerRunError, LocalFederation
from companion.flower.task import FederatedSetup, run_in_process

TOLERANCE = 1e-6  # the runs agree to the last bit here; float32 rounding elsewhere stays below


def demo_setup(*, rounds: int = 3, seed: int = 0) -> FederatedSetup:
    """The demonstration: DP-FedAvg, 3 clients (one per SuperNode), the app's defaults.

    Example:
        >>> setup = demo_setup()
        >>> setup.algorithm, setup.rounds, setup.noise_multiplier, setup.sample_rate
        ('dp-fedavg', 3, 0.5, 0.67)
    """
    return FederatedSetup(algorithm="dp-fedavg", num_clients=3, rounds=rounds, seed=seed,
                          evaluate_clients=True, round_timeout=300.0)  # fmt: skip


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[name] - b[name]).abs().max()) for name in a)


def compare(setup: FederatedSetup, *, simulation: bool) -> dict[str, Any]:
    """Run in process, on a deployment (and in simulation); the per-round table as a dict.

    Raises:
        FlowerRunError: if a Flower run does not finish with ``finished:completed``.

    Example:
        >>> report = compare(demo_setup(), simulation=False)  # doctest: +SKIP
        >>> report["rounds"][0]["deployment"]["max_weight_difference"]  # doctest: +SKIP
        0.0
    """
    ways: dict[str, list[dict[str, Any]]] = {}
    weights: dict[str, list[dict[str, torch.Tensor]]] = {}
    reference = run_in_process(setup)
    ways["in_process"] = reference
    weights["in_process"] = [record["weights"] for record in reference]
    for way, kwargs in [("deployment", {}), ("simulation", {"simulation": True})]:
        if way == "simulation" and not simulation:
            continue
        started = time.monotonic()
        with LocalFederation(setup.num_clients, data_setup=setup, **kwargs) as federation:
            result = federation.run(setup)
        print(f"{way}: run {result.run_id} {result.status} in {time.monotonic() - started:.0f} s")
        ways[way] = result.histories[setup.algorithm]
        weights[way] = result.weights[setup.algorithm]
    table: list[dict[str, Any]] = []
    for t in range(setup.rounds):
        row: dict[str, Any] = {"round": t + 1}
        for way, history in ways.items():
            row[way] = {
                "test_accuracy": history[t]["test_accuracy"],
                "epsilon": history[t]["epsilon"],
                "clients": history[t].get("replied", history[t].get("clients")),
                "max_weight_difference": _max_difference(weights[way][t], weights["in_process"][t]),
            }
        table.append(row)
    final = ways["deployment"][-1].get("client_evaluation", {})
    run_config = {k: v for k, v in setup.to_run_config().items() if k != "output-dir"}
    return {"setup": run_config, "rounds": table, "deployment_client_evaluation": final}


def _print_table(report: dict[str, Any]) -> None:
    first = report["rounds"][0]
    ways = [way for way in ("in_process", "simulation", "deployment") if way in first]
    print("round  " + "  ".join(f"{way:>26}" for way in ways))
    header = f"{'accuracy':>8} {'epsilon':>9} {'|dw|':>7}"
    print("       " + "  ".join(f"{header:>26}" for _ in ways))
    for row in report["rounds"]:
        cells = [
            f"{row[w]['test_accuracy']:8.4f} {row[w]['epsilon']:9.3f} "
            f"{row[w]['max_weight_difference']:7.1e}"
            for w in ways
        ]
        print(f"{row['round']:>5}  " + "  ".join(f"{cell:>26}" for cell in cells))


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m companion.flower",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--simulation", action="store_true", help="also run the simulation")
    parser.add_argument("--record", type=Path, help="write the per-round table to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    setup = demo_setup(rounds=args.rounds, seed=args.seed)
    try:
        report = compare(setup, simulation=args.simulation)
    except (FlowerRunError, TimeoutError) as error:
        print(f"FAILED: {error}", file=sys.stderr)
        return 1
    _print_table(report)
    print(
        f"epsilon: user-level (one client's data) at delta = {setup.delta:g}, RDP accountant, for "
        "the released models, with the server trusted to add the noise; with a seed, every "
        "client can rebuild that noise, so this run shows the mechanics only."
    )
    worst = max(
        cell["max_weight_difference"]
        for row in report["rounds"] for way, cell in row.items() if way != "round"
    )  # fmt: skip
    if args.record:
        args.record.write_text(json.dumps(report, indent=1) + "\n")
    if worst > TOLERANCE:
        print(f"FAILED: a round's model differs from the in-process one by {worst:.2e}",
              file=sys.stderr)  # fmt: skip
        return 1
    print(f"OK: every round's global model equals the in-process one (|dw| <= {worst:.1e}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
