"""Time one training step: non-private SGD, companion's DP-SGD and Opacus 1.6, side by side.

For each model of ``benchmarks/models.py`` (logistic regression 784-10, MLP 784-512-512-10,
Opacus's MNIST CNN as an ``nn.Sequential`` and as a custom ``nn.Module``, a CIFAR-sized CNN with
GroupNorm, an Embedding + LayerNorm text classifier, and, beyond issue 9's list, an Embedding +
GRU text classifier), one step on a batch of 256 is timed for:

- ``non-private``: ``zero_grad``, mean cross-entropy, ``backward``, ``torch.optim.SGD.step``;
- ``companion auto``: what :func:`companion.dpsgd.train_dpsgd` does per step with an optimizer:
  :func:`companion.dpsgd.noisy_clipped_gradient` with a
  :class:`companion.per_example.PerExampleClipper` built once (``method="auto"``), the result
  written into ``.grad``, ``SGD.step``;
- ``companion vmap``: the same with ``method="vmap"`` (torch.func per-example gradients);
- ``opacus hooks``: ``PrivacyEngine().make_private(...)`` in its default ``"hooks"`` mode
  (``GradSampleModule`` + ``DPOptimizer``): ``zero_grad``, loss, ``backward``, ``step``;
- ``opacus ghost``: ``make_private(..., grad_sample_mode="ghost")``, using the *criterion it
  returns* (a ``DPLossFastGradientClipping``: its ``backward`` runs the two backward passes of
  ghost clipping; with the plain criterion clipping would be silently skipped).
- ``noise draw``: not a training step but a floor under every DP step: drawing the model's
  Gaussian noise (:func:`companion.dpsgd.gaussian_noise`, one normal per trainable parameter,
  as every DP-SGD library must each step). A DP step is no faster than a non-private one plus
  this draw, so ``1 + noise draw / non-private`` bounds the ratio any implementation on this
  machine can reach with PyTorch's generator; the targets table shows it.
- ``hand-written``: on the two linear models only, the least a DP-SGD step for a stack of
  ``Linear`` and ``ReLU`` layers does, written out for that stack alone: one forward pass, the
  gradients of the summed loss with respect to the layer outputs, each example's squared norm
  sum over layers of ``|b|^2 (|a|^2 + 1)`` (output gradient, input), the noise, one matrix
  product per layer into it, ``SGD.step``. Another floor, with the arithmetic every DP step
  needs: what a general library's bookkeeping (hooks, checks, the layer table) costs on top
  shows as the gap between it and ``companion auto``.

Every DP step uses noise multiplier 1, clipping norm 1 and the expected batch size 256, with the
noise drawn from a seeded ``torch.Generator`` (no secure RNG for either library). Before timing,
a check runs each DP method once from the same weights with noise 0 and clipping norm 0.1 and
compares the gradients they hand to the optimizer (they must agree; a negative control shows the
unclipped gradient does not), so no method is timed while skipping its clipping.

The methods are interleaved: each repetition times one step of each, in a rotating order, so
drifts of the machine affect all alike. The table reports the minimum and the median over the
repetitions and their ratios to the non-private step (min / min and median / median), the peak
memory of each method measured in separate processes (``benchmarks/dpsgd_memory.py``), and
whether the targets of issue 9 are met.

Run with ``.venv/bin/python benchmarks/dpsgd_step.py`` (``--quick`` for a smoke run,
``--device cuda`` on a GPU, ``--no-memory`` to skip the memory processes, ``--help`` for more).
On a CPU, page faults make the timings of every method vary from run to run; glibc's
``MALLOC_*`` variables steady them (``benchmarks/README.md``), and the report's header says
which were set.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from companion import dpsgd, per_example

try:  # run as a script from the repository root: benchmarks/ is sys.path[0]
    from dpsgd_memory import SHORT, WHAT, fmt_mib, measure_all
    from models import LINEAR, MODELS, build_model, make_batch, torch_names
except ImportError:  # imported as benchmarks.dpsgd_step
    from benchmarks.dpsgd_memory import SHORT, WHAT, fmt_mib, measure_all
    from benchmarks.models import LINEAR, MODELS, build_model, make_batch, torch_names

BATCH = 256
LR = 0.05
NOISE = 1.0
CLIP = 1.0
METHODS = (
    "non-private",
    "companion auto",
    "companion vmap",
    "opacus hooks",
    "opacus ghost",
    "noise draw",
    "hand-written",
)
OPACUS = ("opacus hooks", "opacus ghost")
NOT_DP = ("non-private", "noise draw")  # references, not DP steps: neither clips
LINEAR_ONLY = ("hand-written",)  # methods for the two linear models only
REFERENCES = ("noise draw", "hand-written")  # floors for the ratios: timed, memory not measured


class Step(NamedTuple):
    """One method's training step on a fixed batch, and the parameters it trains."""

    run: Callable[[], None]
    params: dict[str, nn.Parameter]  # name in the plain model -> parameter (holds .grad after)


def quiet() -> None:
    """Silence the warnings every run would print (Opacus's hooks and RNG, companion's vmap)."""
    warnings.filterwarnings("ignore", message=".*[Ff]ull backward hook.*")
    warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
    warnings.filterwarnings("ignore", message=".*computed with vmap.*")
    warnings.filterwarnings("ignore", module="opacus")


def synchronizer(device: str) -> Callable[[], None]:
    if device.startswith("cuda"):
        return torch.cuda.synchronize
    return lambda: None


def build_step(
    method: str,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    noise_multiplier: float = NOISE,
    max_grad_norm: float = CLIP,
    seed: int = 0,
) -> Step:
    """The training step of ``method`` on ``model`` (which it may wrap or hook) and ``(x, y)``."""
    params = dict(model.named_parameters())
    device = x.device
    if method == "non-private":
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        criterion = nn.CrossEntropyLoss()

        def run() -> None:
            optimizer.zero_grad(set_to_none=True)
            criterion(model(x), y).backward()
            optimizer.step()

        return Step(run, params)
    if method.startswith("companion"):
        clipper = per_example.PerExampleClipper(
            model, loss="cross_entropy", method=method.split()[1]
        )
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        generator = torch.Generator(device=device).manual_seed(seed)
        trainable = [(n, p) for n, p in params.items() if p.requires_grad]

        def run() -> None:  # the body of train_dpsgd's loop, with an optimizer
            optimizer.zero_grad(set_to_none=True)  # the loop frees the last step's gradient
            sums, _ = dpsgd.noisy_clipped_gradient(
                clipper, x, y, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                expected_batch_size=float(BATCH), generator=generator,
            )  # fmt: skip
            for name, p in trainable:
                p.grad = sums[name]
            optimizer.step()

        return Step(run, params)
    if method in OPACUS:
        from opacus import PrivacyEngine

        mode = method.split()[1]
        loader = DataLoader(TensorDataset(x.cpu(), y.cpu()), batch_size=x.shape[0])
        engine = PrivacyEngine()  # secure_mode=False: seeded torch noise, as companion's
        made = engine.make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=LR),
            criterion=nn.CrossEntropyLoss(),
            data_loader=loader,  # one batch of BATCH: sample rate 1, expected batch size BATCH
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            noise_generator=torch.Generator(device=device).manual_seed(seed),
            grad_sample_mode=mode,
            batch_first=getattr(model, "batch_first", True),  # False: every layer's is (T, B, ...)
        )
        if mode == "ghost":
            private, optimizer, criterion, _ = made  # criterion: DPLossFastGradientClipping
        else:
            private, optimizer, _ = made
            criterion = nn.CrossEntropyLoss()
        if optimizer.expected_batch_size != BATCH:
            raise RuntimeError(f"Opacus normalises by {optimizer.expected_batch_size}, not {BATCH}")

        def run() -> None:
            optimizer.zero_grad(set_to_none=True)
            criterion(private(x), y).backward()
            optimizer.step()

        return Step(run, params)
    if method == "noise draw":
        generator = torch.Generator(device=device).manual_seed(seed)
        trainable = {n: p for n, p in params.items() if p.requires_grad}

        def run() -> None:
            dpsgd.gaussian_noise(
                trainable, std=noise_multiplier * max_grad_norm, generator=generator
            )

        return Step(run, params)
    if method == "hand-written":
        return _hand_written_step(model, x, y, noise_multiplier, max_grad_norm, seed)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def _hand_written_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    noise_multiplier: float,
    max_grad_norm: float,
    seed: int,
) -> Step:
    """DP-SGD for an ``nn.Sequential`` of ``Linear`` and ``ReLU`` layers, written out by hand."""
    if not all(isinstance(layer, nn.Linear | nn.ReLU) for layer in model):
        raise ValueError("the hand-written step is for stacks of Linear and ReLU layers")
    params = dict(model.named_parameters())
    linears = [layer for layer in model if isinstance(layer, nn.Linear)]
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    generator = torch.Generator(device=x.device).manual_seed(seed)
    total = sum(p.numel() for p in params.values())

    def run() -> None:
        optimizer.zero_grad(set_to_none=True)
        inputs, outputs, h = [], [], x
        for layer in model:
            if isinstance(layer, nn.Linear):
                inputs.append(h)
                outputs.append(h := layer(h))
            else:
                h = layer(h)
        loss = nn.functional.cross_entropy(h, y, reduction="sum")
        output_grads = torch.autograd.grad(loss, outputs)
        with torch.no_grad():
            norm = torch.linalg.vector_norm  # faster than square().sum() on CPU
            squares = sum(
                norm(b, dim=1).square() * (norm(a, dim=1).square() + 1)
                for a, b in zip(inputs, output_grads, strict=True)
            )
            factors = (max_grad_norm / (squares.sqrt() + 1e-6)).clamp(max=1.0) / BATCH
            noise = torch.empty(total, device=x.device).normal_(
                0.0, noise_multiplier * max_grad_norm / BATCH, generator=generator
            )
            start = 0
            for layer, a, b in zip(linears, inputs, output_grads, strict=True):
                weighted = b * factors[:, None]
                for p in (layer.weight, layer.bias):
                    p.grad = noise[start : start + p.numel()].view(p.shape)
                    start += p.numel()
                layer.weight.grad.addmm_(weighted.t(), a)
                layer.bias.grad.addmv_(b.t(), factors)
        optimizer.step()

    return Step(run, params)


def applicable(model_name: str, methods: list[str]) -> list[str]:
    """``methods`` without those for the linear models only, unless ``model_name`` is one."""
    return [m for m in methods if model_name in LINEAR or m not in LINEAR_ONLY]


# --- the check that every DP method clips -------------------------------------------------------


def check_agreement(model_name: str, methods: list[str], device: str) -> str:
    """Run each DP method once with noise 0 and C = 0.1 from the same weights; compare ``.grad``.

    Returns a line for the report, which starts with ``CHECK FAILED`` if a method's gradient
    differs from companion's auto (relative L2 difference above 1e-4; float32 round-off on sums
    of 256 terms is about 1e-6) or if the unclipped mean gradient (the negative control) does not
    differ from it. A failure is reported, not raised, so that a long (GPU) run still ends with
    its table. TF32 is switched off during the check (on CUDA, cuDNN convolutions default to it
    and would differ by about 1e-3 between methods).
    """
    x, y = make_batch(model_name, BATCH, device=device)
    clip = 0.1
    grads: dict[str, torch.Tensor] = {}
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        dp = [m for m in applicable(model_name, methods) if m != "non-private"]
        for method in ["non-private", *dp]:
            model = build_model(model_name, device=device, opacus=method in OPACUS)
            step = build_step(method, model, x, y, noise_multiplier=0.0, max_grad_norm=clip)
            step.run()
            # by name: Opacus's DPGRU holds nn.GRU's parameters in another order
            found = torch_names({n: p.grad for n, p in step.params.items() if p.requires_grad})
            flat = [found[name].flatten() for name in sorted(found)]
            grads[method] = torch.cat(flat).detach().double()
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    reference = grads["companion auto"] if "companion auto" in grads else grads[methods[-1]]
    scale = float(reference.norm())

    def rel(method: str) -> float:
        return float((grads[method] - reference).norm()) / scale

    control = rel("non-private")
    others = {m: rel(m) for m in grads if m != "non-private"}
    worst = max(others.values())
    if worst > 1e-4 or control < 1e-2:
        differences = ", ".join(f"{m} {d:.1e}" for m, d in others.items())
        return (
            f"CHECK FAILED {model_name}: relative differences from companion auto: "
            f"{differences}; unclipped control {control:.2g}. A method does not clip as claimed."
        )
    return (
        f"{model_name}: DP methods agree to {worst:.1e} (relative); the unclipped control "
        f"differs by {control:.2f}"
    )


# --- timing -------------------------------------------------------------------------------------


def time_model(
    model_name: str, methods: list[str], device: str, repeats: int, warmup: int
) -> dict[str, list[float]]:
    """Step times in seconds of each method on ``model_name``, interleaved in rotating order."""
    x, y = make_batch(model_name, BATCH, device=device)
    methods = applicable(model_name, methods)
    steps = {
        m: build_step(m, build_model(model_name, device=device, opacus=m in OPACUS), x, y).run
        for m in methods
    }
    sync = synchronizer(device)
    for run in steps.values():
        for _ in range(warmup):
            run()
    sync()
    return interleaved(steps, repeats, sync)


def interleaved(
    runs: dict[str, Callable[[], object]], repeats: int, sync: Callable[[], None] = lambda: None
) -> dict[str, list[float]]:
    """Seconds per call of each of ``runs``, ``repeats`` times each, in rotating order: drifts of
    the machine affect all alike."""
    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            runs[name]()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


# --- report -------------------------------------------------------------------------------------


def fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 10 else f"{ms:.1f}" if ms < 1000 else f"{ms:.0f}"


def report(
    times: dict[str, dict[str, list[float]]],
    memory: dict[str, dict[str, dict[str, float]]],
    measures: list[str],
) -> str:
    """The markdown tables: times, ratios and memory per model and method; the targets.

    ``memory`` and ``measures`` are what :func:`dpsgd_memory.measure_all` returns (empty if
    memory was not measured)."""
    lines = [
        "| model | method | min ms | median ms | x non-private (min) | x non-private (median) |"
        + "".join(f" {WHAT[what]} |" for what in measures),
        "|---|---|--:|--:|--:|--:|" + "--:|" * len(measures),
    ]
    verdicts = [
        "| model | companion vs non-private (target) | floors: 1 + noise draw; hand-written "
        "| fastest Opacus | companion faster? | peak MiB vs Opacus ghost | <= ghost? |",
        "|---|---|---|---|---|---|---|",
    ]
    for model_name, row in times.items():
        base_min = min(row["non-private"])
        base_med = statistics.median(row["non-private"])
        mem = memory.get(model_name, {})
        for method, t in row.items():
            cells = [fmt_mib(mem[method][w]) if w in mem.get(method, {}) else "" for w in measures]
            lines.append(
                f"| {MODELS[model_name].label} | {method} | {fmt_ms(min(t))} "
                f"| {fmt_ms(statistics.median(t))} | {min(t) / base_min:.2f} "
                f"| {statistics.median(t) / base_med:.2f} |" + "".join(f" {c} |" for c in cells)
            )
        if "companion auto" not in row:
            continue
        ours = row["companion auto"]
        ratio_min = min(ours) / base_min
        ratio_med = statistics.median(ours) / base_med
        target = 1.3 if model_name in LINEAR else 1.5
        met = yes_no(ratio_min <= target, ratio_med <= target)
        speed = f"{ratio_min:.2f}x / {ratio_med:.2f}x (<= {target}x): {met}"
        floor = "not run"
        if "noise draw" in row:
            floor_min = 1 + min(row["noise draw"]) / base_min
            floor_med = 1 + statistics.median(row["noise draw"]) / base_med
            floor = f"{floor_min:.2f}x / {floor_med:.2f}x"
        if "hand-written" in row:
            written_min = min(row["hand-written"]) / base_min
            written_med = statistics.median(row["hand-written"]) / base_med
            floor += f"; {written_min:.2f}x / {written_med:.2f}x"
        opacus = [m for m in OPACUS if m in row]
        if opacus:
            fastest = min(opacus, key=lambda m: min(row[m]))
            fastest_med = min(statistics.median(row[m]) for m in opacus)
            faster = yes_no(min(ours) < min(row[fastest]), statistics.median(ours) < fastest_med)
            fastest_text = f"{fastest} {min(row[fastest]) / base_min:.2f}x"
        else:
            faster, fastest_text = "n/a", "not run"
        ours, ghost = mem.get("companion auto", {}), mem.get("opacus ghost", {})
        compared = [w for w in measures if w in ours and w in ghost]
        mem_text = "; ".join(
            f"{SHORT[w]} {fmt_mib(ours[w])} vs {fmt_mib(ghost[w])}" for w in compared
        )
        mem_met = "; ".join(
            f"{SHORT[w]} "
            + ("yes" if ours[w] <= ghost[w] else f"no (+{fmt_mib(ours[w] - ghost[w])})")
            for w in compared
        )
        verdicts.append(
            f"| {MODELS[model_name].label} | {speed} | {floor} | {fastest_text} | {faster} "
            f"| {mem_text or 'not measured'} | {mem_met or 'n/a'} |"
        )
    note = (
        "Targets (issue 9): companion auto at most 1.3x a non-private step on the two linear "
        "models and 1.5x on the others, faster than the fastest Opacus mode, peak memory no "
        "higher than Opacus ghost's, read on the peak of the tensors (the quantity the CUDA "
        "measure takes: what each method allocates; the RSS adds what the allocators keep). "
        "'yes' = met by the minimum and the median, 'min only' / "
        "'median only' = met by one of them. The tensors' peak is the same in repeated runs; "
        "the peak RSS varies by about 0.4 MiB on the linear models (with where MKL's matrix "
        "product places the buffer it allocates on its first call), by 2 MiB on the MLP and the "
        "text model and by 10% on the CNNs. The first floor is what a step would cost if "
        "everything but the noise were free; a target below it cannot be met on this machine. "
        "The second (linear models) is a DP step written by hand for that model alone: the "
        "arithmetic every DP step needs, without a library's generality."
    )
    return "\n".join([*lines, "", note, "", *verdicts])


def yes_no(by_min: bool, by_median: bool) -> str:
    if by_min and by_median:
        return "yes"
    if by_min or by_median:
        return "min only" if by_min else "median only"
    return "no"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions: a smoke run")
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions (40)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per method (5)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (2)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory processes")
    parser.add_argument("--no-check", action="store_true", help="skip the clipping check")
    args = parser.parse_args()
    if args.repeats is None:
        args.repeats = 3 if args.quick else 40
    if args.warmup is None:
        args.warmup = 1 if args.quick else 5
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--repeats and --threads must be >= 1 and --warmup >= 0")
    args.models = args.models.split(",")
    args.methods = args.methods.split(",")
    for name in args.models:
        if name not in MODELS:
            parser.error(f"unknown model {name!r}; choose from {list(MODELS)}")
    for name in args.methods:
        if name not in METHODS:
            parser.error(f"unknown method {name!r}; choose from {list(METHODS)}")
    if "non-private" not in args.methods:
        args.methods.insert(0, "non-private")
    return args


def header(args: argparse.Namespace) -> str:
    import opacus

    where = args.device
    if args.device.startswith("cuda"):
        where = f"{args.device} ({torch.cuda.get_device_name()})"
    tuning = sorted(f"{k}={v}" for k, v in os.environ.items() if k.startswith("MALLOC_"))
    malloc = f"glibc malloc tuned for the timings ({', '.join(tuning)}; memory measured without)"
    return (
        f"One training step, batch {BATCH}, {args.threads} threads, {where}, torch "
        f"{torch.__version__}, Opacus {opacus.__version__}; {args.repeats} interleaved "
        f"repetitions after {args.warmup} warm-up steps per method; "
        f"{malloc if tuning else 'glibc malloc defaults'}."
    )


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    quiet()
    checks = []
    dp = [m for m in args.methods if m not in NOT_DP]
    if not args.no_check and dp:
        for model_name in args.models:
            checks.append(check_agreement(model_name, dp, args.device))
            print(checks[-1], flush=True)
    times = {}
    for model_name in args.models:
        times[model_name] = time_model(
            model_name, args.methods, args.device, args.repeats, args.warmup
        )
        print(f"timed {model_name}", flush=True)
    memory, measures = {}, []
    if not args.no_memory:
        methods = {
            name: [m for m in applicable(name, args.methods) if m not in REFERENCES]
            for name in args.models
        }
        memory, measures = measure_all(
            methods, device=args.device, threads=args.threads, steps=2 if args.quick else 3
        )
    print()
    print(header(args))
    print()
    print(report(times, memory, measures))
    if checks:
        print("\nClipping check (noise 0, C = 0.1, same weights; the gradients stepped with):")
        print("\n".join(f"- {line}" for line in checks))


if __name__ == "__main__":
    main()
