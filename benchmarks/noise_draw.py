"""Time the Gaussian noise of a DP-SGD step with the samplers at hand, next to a non-private step.

Every DP-SGD step adds one Gaussian draw per trainable parameter, whatever the library. On a
CPU, for a model with many parameters and a cheap forward pass, that draw alone takes a large
part of a non-private step: ``1 + draw / non-private`` bounds from below the ratio any DP step
can reach. This script asks whether another sampler would lower that bound. For each model of
``benchmarks/models.py`` it times, interleaved in rotating order:

- ``non-private``: the non-private step of ``dpsgd_step.py``;
- ``torch normal_``: ``Tensor.normal_`` with one ``torch.Generator``, as
  :func:`companion.dpsgd.gaussian_noise` and Opacus draw their noise (one thread: the
  generator's state is advanced serially);
- ``torch uniform_``: ``Tensor.uniform_`` on the same generator, the Mersenne Twister's share of
  ``normal_`` (which transforms such uniforms, Box-Muller, vectorised);
- ``torch normal_, 2 threads``: two generators, each drawing half in its own thread (alone on
  the machine; inside a step, OpenMP's threads spin on the cores it needs: ``step.py``);
- ``numpy ziggurat``: ``numpy.random.Generator.standard_normal(dtype=float32)``, PCG64 and
  SFC64 bit generators.

Each draws the model's number of trainable parameters in float32 into a buffer allocated once.
The report gives min and median ms and the floor ``1 + draw / non-private`` by the minimum.

Run with ``.venv/bin/python benchmarks/noise_draw.py`` (``--models``, ``--repeats``,
``--threads``).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

try:  # run as a script from the repository root: benchmarks/ is sys.path[0]
    from dpsgd_step import BATCH, build_step, interleaved
    from models import MODELS, build_model, make_batch
except ImportError:  # imported as benchmarks.noise_draw
    from benchmarks.dpsgd_step import BATCH, build_step, interleaved
    from benchmarks.models import MODELS, build_model, make_batch


def samplers(n: int, pool: ThreadPoolExecutor) -> dict[str, Callable[[], object]]:
    """Each sampler as a function that draws ``n`` float32 standard normals (seeded)."""
    out = torch.empty(n)
    first, second = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    half = n // 2

    def two_threads() -> None:
        other = pool.submit(out[half:].normal_, generator=second)
        out[:half].normal_(generator=first)
        other.result()

    array = out.numpy()  # shares the buffer
    pcg, sfc = np.random.Generator(np.random.PCG64(0)), np.random.Generator(np.random.SFC64(0))
    return {
        "torch normal_": lambda: out.normal_(generator=first),
        "torch uniform_": lambda: out.uniform_(generator=first),
        "torch normal_, 2 threads": two_threads,
        "numpy ziggurat, PCG64": lambda: pcg.standard_normal(out=array, dtype=np.float32),
        "numpy ziggurat, SFC64": lambda: sfc.standard_normal(out=array, dtype=np.float32),
    }


def time_model(name: str, repeats: int, pool: ThreadPoolExecutor) -> dict[str, list[float]]:
    """Seconds per call of the non-private step and of each sampler, interleaved."""
    model = build_model(name)
    x, y = make_batch(name, BATCH)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    runs = {"non-private": build_step("non-private", model, x, y).run, **samplers(n, pool)}
    for run in runs.values():  # warm-up
        run()
    return interleaved(runs, repeats)


def report(name: str, times: dict[str, list[float]]) -> str:
    base = min(times["non-private"])
    lines = []
    for method, t in times.items():
        floor = "" if method == "non-private" else f"{1 + min(t) / base:.2f}x"
        lines.append(
            f"| {MODELS[name].label} | {method} | {min(t) * 1e3:.3f} "
            f"| {statistics.median(t) * 1e3:.3f} | {floor} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="logreg,mlp,text-emb", help="comma-separated subset")
    parser.add_argument("--repeats", type=int, default=40, help="timed repetitions (40)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with ThreadPoolExecutor(1) as pool:
        for name in args.models.split(","):
            rows.append(report(name, time_model(name, args.repeats, pool)))
    print(
        f"Gaussian draws of each model's trainable parameter count, float32, {args.threads} "
        f"threads, torch {torch.__version__}, numpy {np.__version__}; {args.repeats} interleaved "
        "repetitions.\n"
    )
    print("| model | method | min ms | median ms | floor: 1 + draw / non-private (min) |")
    print("|---|---|--:|--:|--:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
