"""Run the Flower app on this machine: a SuperLink and SuperNodes on 127.0.0.1, or the simulation.

:class:`LocalFederation` starts ``flower-superlink`` and one ``flower-supernode`` per client,
each with its own port and its own part of the data (``--node-config "partition-id=<k>
num-partitions=<K>"``), or a SuperLink in simulation mode whose simulation engine plays the
clients (``simulation=True``). :meth:`LocalFederation.run` submits the app with ``flwr run``
and waits for the run to finish. Flower's CLI exits with 0 even when a run fails, so the run's
status is read back (``flwr ls --run-id``) and anything but ``finished:completed`` raises
:class:`FlowerRunError` with the reason.

Everything stays offline and quiet: telemetry and the update check are off
(``FLWR_TELEMETRY_ENABLED=0``, ``FLWR_DISABLE_UPDATE_CHECK=1``), runtime dependency installation
is off (the SuperLink is started with ``--disable-runtime-dependency-installation``; the
SuperNodes leave it off by default), every address is 127.0.0.1, and Flower's home directory
(``FLWR_HOME``: CLI configuration, installed app bundles; and ``RAY_TMPDIR`` for the
simulation engine) is a folder of this federation, not ``~/.flwr`` or ``/tmp/ray``. Each process
writes its log to that folder.

The commands, for a reader who wants to type them (K = 3, ports of their choice)::

    flower-superlink --insecure --host 127.0.0.1 --port 9093 \\
        --disable-runtime-dependency-installation
    flower-supernode --insecure --superlink 127.0.0.1:9093 --port 9100 \\
        --node-config "partition-id=0 num-partitions=3"        # and 1, 2 on ports 9101, 9102
    flwr run companion/flower/app local --run-config "seed=0 rounds=3"

with a connection ``[superlink.local] address = "127.0.0.1:9093"``, ``insecure = true`` in
``$FLWR_HOME/config.toml``. A real deployment adds TLS (``--ssl-certfile`` and friends instead
of ``--insecure``) and SuperNode authentication (``--enable-supernode-auth``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import torch

from companion.flower.partitions import save_partition
from companion.flower.task import FederatedSetup

__all__ = ["APP_DIR", "FlowerRunError", "LocalFederation", "RunResult", "flower_environment"]

APP_DIR = Path(__file__).resolve().parent / "app"
"""The Flower App folder (its ``pyproject.toml`` names the ServerApp and the ClientApp)."""

_CONNECTION = "companion"


class FlowerRunError(RuntimeError):
    """A Flower run that did not finish with status ``finished:completed``."""


@dataclasses.dataclass
class RunResult:
    """What a finished run left: its id and status, and for each algorithm (``"fedavg"``,
    ``"dp-fedavg"``) the records of its rounds and the global weights after each round."""

    run_id: int
    status: str
    histories: dict[str, list[dict[str, Any]]]
    weights: dict[str, list[dict[str, torch.Tensor]]]
    output_dir: Path


def flower_environment(home: Path) -> dict[str, str]:
    """The environment of every Flower process: offline, quiet, Flower's home in ``home``.

    Example:
        >>> env = flower_environment(Path("/tmp/flwr-home"))
        >>> env["FLWR_HOME"], env["FLWR_TELEMETRY_ENABLED"], env["FLWR_DISABLE_UPDATE_CHECK"]
        ('/tmp/flwr-home', '0', '1')
    """
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)  # Flower starts flower-superexec and friends
    env.update(
        PATH=bin_dir + os.pathsep + env.get("PATH", ""),
        FLWR_HOME=str(home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
        RAY_TMPDIR=str(home / "ray"),  # the simulation engine's session files, not /tmp/ray
    )
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalFederation:
    """A SuperLink and ``num_nodes`` SuperNodes on 127.0.0.1 (or a simulation), as processes.

    Use it as a context manager: the processes are stopped (and their children, the
    ClientApp and ServerApp processes, with them) when the block ends, however it ends.

    Args:
        num_nodes: SuperNodes to start, one per part of the data (``partition-id`` 0, 1, ...).
        data_setup: how the data are cut (``num_clients`` must be ``num_nodes``): each node
            gets its part as a file (``data-path`` in its node config), written here with
            :func:`companion.flower.partitions.save_partition`.
        simulation: start the SuperLink in simulation mode and no SuperNode; the runs then
            use Flower's simulation engine with ``num_nodes`` virtual nodes.
        home: Flower's home folder and the logs (default: a new temporary folder).
        startup_timeout: seconds to wait for the SuperLink to answer.

    Raises:
        ValueError: if ``data_setup.num_clients`` is not ``num_nodes``.
        FlowerRunError: (on start) if the SuperLink does not answer in time.

    Example:
        >>> with LocalFederation(3) as federation:  # doctest: +SKIP
        ...     result = federation.run(FederatedSetup(seed=0))
        >>> [r["test_accuracy"] for r in result.histories["dp-fedavg"]]  # doctest: +SKIP
        [0.36666666666666664, 0.37555555555555553, 0.4666666666666667]
    """

    def __init__(
        self,
        num_nodes: int,
        *,
        data_setup: FederatedSetup | None = None,
        simulation: bool = False,
        home: Path | None = None,
        startup_timeout: float = 60.0,
    ) -> None:
        self.num_nodes = num_nodes
        self.data_setup = data_setup or FederatedSetup(num_clients=num_nodes)
        if self.data_setup.num_clients != num_nodes:
            raise ValueError("data_setup.num_clients must equal num_nodes.")
        self.simulation = simulation
        self._tmp = None if home else tempfile.TemporaryDirectory(prefix="companion-flower-")
        self.home = Path(home) if home else Path(self._tmp.name)
        self.startup_timeout = startup_timeout
        self.port = _free_port()
        self.env = flower_environment(self.home)
        self.superlink: subprocess.Popen[bytes] | None = None
        self.nodes: dict[int, subprocess.Popen[bytes]] = {}
        self._runs = 0

    # --- processes ------------------------------------------------------------------------------

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.home / f"{name}.log", "ab")  # noqa: SIM115 (closed with the process)
        process = subprocess.Popen(
            command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()  # the child holds its own descriptor
        return process

    def start(self) -> LocalFederation:
        """Start the SuperLink, wait until it answers, then start the SuperNodes."""
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{_CONNECTION}"\n\n[superlink.{_CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        command = ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port",
                   str(self.port), "--disable-runtime-dependency-installation"]  # fmt: skip
        if self.simulation:
            command.append("--simulation")
        self.superlink = self._spawn("superlink", command)
        deadline = time.monotonic() + self.startup_timeout
        while not self._healthy():
            if self.superlink.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise FlowerRunError(
                    f"flower-superlink did not start; see {self.home / 'superlink.log'}:\n"
                    + self.log("superlink")[-2000:]
                )
            time.sleep(0.3)
        if not self.simulation:
            (self.home / "data").mkdir(exist_ok=True)
            for k in range(self.num_nodes):
                save_partition(self.data_setup, k, str(self.home / "data" / f"part-{k}.npz"))
                self.start_node(k)
        return self

    def start_node(self, partition: int) -> None:
        """Start the SuperNode that holds part ``partition``, on a port of its own."""
        data = self.home / "data" / f"part-{partition}.npz"
        self.nodes[partition] = self._spawn(f"supernode-{partition}", [
            "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}",
            "--port", str(_free_port()), "--node-config",
            f'partition-id={partition} num-partitions={self.num_nodes} data-path="{data}"',
        ])  # fmt: skip

    def kill_node(self, partition: int) -> None:
        """Kill the SuperNode of part ``partition`` and its ClientApp processes (SIGKILL)."""
        process = self.nodes.pop(partition)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        """Stop every process this federation started (SIGTERM, then SIGKILL after 10 s)."""
        processes = list(self.nodes.values()) + ([self.superlink] if self.superlink else [])
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.nodes.clear()
        self.superlink = None

    def __enter__(self) -> LocalFederation:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def log(self, name: str) -> str:
        """The log of a process: ``"superlink"`` or ``"supernode-<k>"``."""
        path = self.home / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # --- runs -----------------------------------------------------------------------------------

    def _flwr(self, *args: str, timeout: float = 120) -> dict[str, Any]:
        """Run the ``flwr`` CLI with ``--format json``; return its parsed output."""
        try:
            completed = subprocess.run(
                ["flwr", *args, "--format", "json"], env=self.env, capture_output=True,
                text=True, timeout=timeout, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired as error:
            message = f"flwr {' '.join(args)} did not answer in {timeout:g} s"
            raise FlowerRunError(message) from error
        start = completed.stdout.find("{")
        try:
            result = json.loads(completed.stdout[start:]) if start >= 0 else {}
        except json.JSONDecodeError:
            result = {}
        if not result.get("success"):
            raise FlowerRunError(
                f"flwr {' '.join(args)} failed: {result.get('error-message', '')}\n"
                f"{completed.stdout}\n{completed.stderr}"
            )
        return result

    def status(self, run_id: int) -> tuple[str, str]:
        """The run's status (``"running"``, ``"finished:completed"``, ...) and its details."""
        runs = self._flwr("ls", _CONNECTION, "--run-id", str(run_id))["runs"]
        return runs[0]["status"], runs[0].get("status-details", "")

    def submit(self, setup: FederatedSetup, *, app_dir: Path = APP_DIR) -> tuple[int, Path]:
        """Start a run of the app with ``setup``; return its id and its output folder.

        ``setup.output_dir`` is replaced by a new folder of this federation.
        """
        self._runs += 1
        output = self.home / f"run-{self._runs}"
        output.mkdir(parents=True, exist_ok=True)
        setup = setup.replace(output_dir=str(output))
        overrides = output / "run-config.toml"
        lines = (f"{key} = {_toml(value)}\n" for key, value in setup.to_run_config().items())
        overrides.write_text("".join(lines))
        args = ["run", str(app_dir), _CONNECTION, "--run-config", str(overrides)]
        if self.simulation:
            args += ["--federation-config", f"num-supernodes={self.num_nodes} "
                     "client-resources-num-cpus=1 init-args-num-cpus=2"]  # fmt: skip
        return int(self._flwr(*args)["run-id"]), output

    def wait(self, run_id: int, output: Path, *, timeout: float = 600) -> RunResult:
        """Wait for the run to finish; raise :class:`FlowerRunError` unless it completed.

        The run's status is asked every 15 s, and as soon as the ServerApp has written its
        final record (``done.json`` or ``error.json``).
        """
        deadline = time.monotonic() + timeout
        last_check = 0.0
        while True:
            finished_writing = (output / "done.json").exists() or (output / "error.json").exists()
            if finished_writing or time.monotonic() - last_check > 15:
                status, details = self.status(run_id)
                last_check = time.monotonic()
                if status.startswith("finished"):
                    break
            if time.monotonic() > deadline:
                self._flwr("stop", str(run_id), _CONNECTION)
                raise FlowerRunError(f"run {run_id} did not finish within {timeout:g} s.")
            time.sleep(0.5)
        error = output / "error.json"
        if status != "finished:completed" or error.exists():
            reason = json.loads(error.read_text())["error"] if error.exists() else details
            raise FlowerRunError(f"run {run_id} ended with status {status}: {reason}")
        histories: dict[str, list[dict[str, Any]]] = {}
        weights: dict[str, list[dict[str, torch.Tensor]]] = {}
        for algorithm in json.loads((output / "done.json").read_text())["algorithms"]:
            folder = output / algorithm
            histories[algorithm] = json.loads((folder / "history.json").read_text())
            weights[algorithm] = [
                torch.load(folder / f"weights-{record['round']}.pt", weights_only=True)
                for record in histories[algorithm]
            ]
        return RunResult(run_id, status, histories, weights, output)

    def run(
        self, setup: FederatedSetup, *, app_dir: Path = APP_DIR, timeout: float = 600
    ) -> RunResult:
        """Submit a run and wait for it (see :meth:`submit` and :meth:`wait`)."""
        run_id, output = self.submit(setup, app_dir=app_dir)
        return self.wait(run_id, output, timeout=timeout)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)
