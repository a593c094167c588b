"""Time a PLD epsilon query: companion's PLDAccountant against dp_accounting's, with RDP alongside.

For each setting of the grid (sample rate q, noise multiplier sigma, steps; delta 1e-5) one run
of the script measures, side by side:

- ``ours``: :class:`companion.accounting.PLDAccountant` at its defaults (discretisation
  ``h = 1e-4``): a fresh accountant given the steps, then ``get_epsilon`` (one-step PLDs, the FFT
  composition and the search), and a second ``get_epsilon`` on the cached composition;
- ``dp_accounting``: ``dp_accounting.pld.PLDAccountant`` (same ``h``, the same connect-the-dots
  discretisation), ``compose(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), steps)`` then
  ``get_epsilon``;
- ``rdp``: :class:`companion.accounting.RDPAccountant`, the upper bound both improve on.

Each time is the median over ``--repeats`` fresh runs (the methods interleaved, so drifts of the
machine affect all alike), with the BLAS/OpenMP pools limited to 2 threads (the FFTs of both
libraries are single-threaded). The table shows the three epsilons, ours minus dp_accounting's,
and the times with their ratio. Run with ``.venv/bin/python benchmarks/pld_accounting.py
[--repeats N] [--quick]``.
"""

from __future__ import annotations

import os

THREADS = 2
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, str(THREADS))

import argparse  # noqa: E402  (after the thread limits, which must precede numpy's import)
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import dp_accounting  # noqa: E402
from dp_accounting.pld import pld_privacy_accountant  # noqa: E402

from companion.accounting import PLDAccountant, RDPAccountant  # noqa: E402

DELTA = 1e-5
GRID = [
    (q, sigma, steps)
    for q in (0.004, 0.01, 0.1)
    for sigma in (0.8, 1.1, 4.0)
    for steps in (1_000, 15_000)
] + [(256 / 60000, 1.1, round(60 * 60000 / 256)), (0.01, 4.0, 10_000)]  # DESIGN.md's quotes
QUICK = [(0.01, 1.1, 15_000), (0.1, 0.8, 15_000), (256 / 60000, 1.1, 14_062)]


def ours(q: float, sigma: float, steps: int) -> tuple[float, float, float]:
    """(epsilon, seconds for the first query, seconds for a second query)."""
    accountant = PLDAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=sigma, sample_rate=q)
    start = time.perf_counter()
    epsilon = accountant.get_epsilon(DELTA)
    first = time.perf_counter() - start
    start = time.perf_counter()
    accountant.get_epsilon(DELTA / 10)
    return epsilon, first, time.perf_counter() - start


def reference(q: float, sigma: float, steps: int) -> tuple[float, float]:
    """(epsilon, seconds) for dp_accounting's PLD accountant, composition included."""
    start = time.perf_counter()
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    accountant.compose(event, steps)
    epsilon = accountant.get_epsilon(DELTA)
    return epsilon, time.perf_counter() - start


def rdp(q: float, sigma: float, steps: int) -> tuple[float, float]:
    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=sigma, sample_rate=q)
    start = time.perf_counter()
    epsilon = accountant.get_epsilon(DELTA)
    return epsilon, time.perf_counter() - start


def measure(setting: tuple[float, float, int], repeats: int) -> dict[str, float]:
    runs: dict[str, list[float]] = {"ours": [], "cached": [], "dp": [], "rdp": []}
    eps: dict[str, float] = {}
    methods: list[tuple[str, Callable[[], None]]] = []

    def run_ours() -> None:
        eps["ours"], first, cached = ours(*setting)
        runs["ours"].append(first)
        runs["cached"].append(cached)

    def run_dp() -> None:
        eps["dp"], seconds = reference(*setting)
        runs["dp"].append(seconds)

    def run_rdp() -> None:
        eps["rdp"], seconds = rdp(*setting)
        runs["rdp"].append(seconds)

    methods = [("ours", run_ours), ("dp", run_dp), ("rdp", run_rdp)]
    for repeat in range(repeats):
        for _, run in methods[repeat % 3 :] + methods[: repeat % 3]:  # rotate the order
            run()
    return {
        **{f"eps_{k}": v for k, v in eps.items()},
        **{k: statistics.median(v) for k, v in runs.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="only three settings")
    args = parser.parse_args()
    header = (
        f"{'q':>8} {'sigma':>5} {'steps':>6} | {'eps ours':>9} {'eps dp_acc':>10} {'diff':>8} "
        f"{'eps RDP':>9} | {'ours s':>7} {'cached s':>8} {'dp_acc s':>8} {'dp/ours':>7}"
    )
    print(f"delta = {DELTA}, h = 1e-4, {THREADS} threads, median of {args.repeats} runs")
    print(header)
    print("-" * len(header))
    for q, sigma, steps in QUICK if args.quick else GRID:
        r = measure((q, sigma, steps), args.repeats)
        print(
            f"{q:>8.5g} {sigma:>5.2g} {steps:>6} | {r['eps_ours']:>9.4f} {r['eps_dp']:>10.4f} "
            f"{r['eps_ours'] - r['eps_dp']:>8.1e} {r['eps_rdp']:>9.4f} | {r['ours']:>7.3f} "
            f"{r['cached']:>8.3f} {r['dp']:>8.3f} {r['dp'] / r['ours']:>7.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
