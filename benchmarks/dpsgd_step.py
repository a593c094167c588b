"""Time one training step: non-private SGD, companion's DP-SGD and Opacus 1.6, side by side.

For each model of :mod:`companion.models` (logistic regression 64-10, MLP 64-128-10, the small
CNN), one step on a batch of 256 digits (64 features) is timed with 2 CPU threads for:

- ``non-private``: ``zero_grad``, mean cross-entropy, ``backward``, ``torch.optim.SGD.step``;
- ``companion auto``: :func:`companion.dpsgd.dp_sgd_step` as :func:`train_dpsgd` calls it
  (``method="auto"``, which takes the layerwise ghost-norm path for these models);
- ``companion vmap``: the same step with ``method="vmap"`` (torch.func per-example gradients);
- ``opacus hooks``: Opacus's ``GradSampleModule`` in its default ``"hooks"`` mode with a
  ``DPOptimizer`` (per-example clipping and noise), as ``PrivacyEngine.make_private`` builds them.

Every DP step uses noise multiplier 1 and clipping norm 1 and normalises by the expected batch
size 256. The methods are interleaved: each repetition times one step of each, in a rotating
order, so drifts of the machine affect all alike. The table reports medians and the ratio to the
non-private step. Run with ``.venv/bin/python benchmarks/dpsgd_step.py [--repeats N]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from companion import data, dpsgd, models

BATCH = 256
THREADS = 2


def non_private(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()

    return step


def companion_step(method: str) -> Callable[[nn.Module, torch.Tensor, torch.Tensor], Callable[[], None]]:
    def build(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
        generator = torch.Generator().manual_seed(0)

        def step() -> None:
            dpsgd.dp_sgd_step(
                model, x, y, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=BATCH,
                lr=0.05, generator=generator, loss_fn="cross_entropy", method=method,
            )  # fmt: skip

        return step

    return build


def opacus_hooks(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    private = GradSampleModule(model)  # grad_sample_mode "hooks", Opacus's default
    optimizer = DPOptimizer(
        torch.optim.SGD(private.parameters(), lr=0.05),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=BATCH,
    )
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(private(x), y).backward()
        optimizer.step()

    return step


METHODS = {
    "non-private": non_private,
    "companion auto": companion_step("auto"),
    "companion vmap": companion_step("vmap"),
    "opacus hooks": opacus_hooks,
}
MODELS = {
    "logreg 64-10": models.logistic_regression,
    "MLP 64-128-10": models.mlp,
    "small CNN": models.small_cnn,
}


def measure(repeats: int, warmup: int) -> dict[str, dict[str, float]]:
    digits = data.load_digits()
    x = torch.from_numpy(digits.x_train[:BATCH])
    y = torch.from_numpy(digits.y_train[:BATCH])
    medians: dict[str, dict[str, float]] = {}
    for model_name, build_model in MODELS.items():
        steps = {name: build(build_model(seed=0), x, y) for name, build in METHODS.items()}
        for step in steps.values():
            for _ in range(warmup):
                step()
        times: dict[str, list[float]] = {name: [] for name in steps}
        names = list(steps)
        for repeat in range(repeats):
            shift = repeat % len(names)
            for name in names[shift:] + names[:shift]:
                start = time.perf_counter()
                steps[name]()
                times[name].append(time.perf_counter() - start)
        medians[model_name] = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    warnings.filterwarnings("ignore", message="Full backward hook")  # Opacus on a first layer
    warnings.filterwarnings("ignore", message="Secure RNG")
    medians = measure(args.repeats, args.warmup)
    print(f"One training step, batch {BATCH}, {THREADS} threads, torch {torch.__version__}; "
          f"median of {args.repeats} interleaved repetitions")  # fmt: skip
    print(f"{'model':<15}{'method':<17}{'median ms':>10}{'x non-private':>15}")
    for model_name, row in medians.items():
        base = row["non-private"]
        for name, value in row.items():
            print(f"{model_name:<15}{name:<17}{value:>10.3f}{value / base:>15.2f}")


if __name__ == "__main__":
    main()
