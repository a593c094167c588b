"""Peak memory of one training step per model and method, each in its own process.

For every model of ``benchmarks/models.py`` and every method of ``benchmarks/dpsgd_step.py``
(non-private SGD, companion auto and vmap, Opacus hooks and ghost), a fresh Python process
imports everything, builds the model, the batch of 256 and the method's step, and then runs a
few steps. What it reports, in MiB:

- the *peak memory held by tensors, added by the steps*: on CUDA,
  ``torch.cuda.max_memory_allocated()`` during the steps minus ``torch.cuda.memory_allocated()``
  before them (after ``reset_peak_memory_stats``); on CPU, where torch's allocator keeps no such
  counter, the same quantity from the allocation and free events that ``torch.profiler`` records
  with ``profile_memory=True`` (their running sum, in time order, at its highest). It counts
  what torch allocates (activations, per-example gradients, Gram matrices, noise, ``.grad``,
  optimizer state) and nothing else;
- on CPU also, in another fresh process, the *peak resident set size added by the steps*: the
  process's peak RSS counter (``VmHWM``) is reset just before the steps (``echo 5 >
  /proc/self/clear_refs``, Linux), and the result is ``VmHWM`` after the steps minus ``VmRSS``
  before them. It excludes the interpreter, the model and the data, and adds to the tensors what
  the allocator and the libraries keep: heap pages glibc has not returned, the buffers a BLAS
  routine allocates on its first call (about 0.4 MiB for the products of the logistic
  regression, counted or not depending on where glibc places them). It excludes the libraries'
  code: every page of the files mapped into the process (torch's and Opacus's shared libraries)
  is made resident before the reset (``madvise(MADV_POPULATE_READ)``, Linux 5.14), or the first
  call of each torch operation would count the code it pages in (on logistic regression, 11.7 of
  the 12.5 MiB that companion's steps added, 10.5 of Opacus ghost's 10.7). Where the reset is not
  available the absolute peak (``ru_maxrss``) is reported instead, and where the pages cannot be
  made resident the libraries' code is counted; the header says which.

Run ``.venv/bin/python benchmarks/dpsgd_memory.py [--quick] [--device cuda]``; the timing
script ``dpsgd_step.py`` runs the same measurement and prints it next to the time ratios.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
MIB = 1024 * 1024
MADV_POPULATE_READ = 22  # linux/mman.h, Linux 5.14


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def _map_library_pages() -> bool:
    """Make every page of the files mapped into this process resident (``MADV_POPULATE_READ``),
    so that code a step runs for the first time adds nothing to the resident set."""
    try:
        with open("/proc/self/maps") as maps:
            lines = maps.read().splitlines()
    except OSError:  # not Linux
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    done = True
    for line in lines:  # address range, permissions, offset, device, inode, path
        fields = line.split()
        if len(fields) < 6 or "r" not in fields[1] or not fields[5].startswith("/"):
            continue
        if fields[5].startswith("/dev/"):
            continue
        start, end = (int(address, 16) for address in fields[0].split("-"))
        done &= libc.madvise(start, end - start, MADV_POPULATE_READ) == 0
    return done


def _tensor_peak(run: Callable[[], None], steps: int) -> int:
    """The highest number of bytes held by CPU tensors during ``steps`` calls of ``run``, above
    what they held before, from the allocations and frees the profiler records.

    The profiler records no free of a block allocated before it started, so such a block freed
    and replaced during the steps is counted twice: the measure is for steps from a fresh start
    (the first step of a fresh process, as here, frees nothing allocated before it). Nor does
    it see allocations on other Python threads; none of the methods makes any, and each gives
    the same peak with 1 and 2 torch threads."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        for _ in range(steps):
            run()
    events = [e for e in profiler.profiler.kineto_results.events() if e.name() == "[memory]"]
    held = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        held += event.nbytes()  # negative for a free
        peak = max(peak, held)
    return peak


def child(
    model_name: str, method: str, device: str, threads: int, steps: int, measure: str
) -> dict:
    """Measure in this process (a fresh one): build, then run ``steps`` under ``measure``,
    ``"tensors"`` or ``"rss"`` (CPU only)."""
    import torch

    sys.path.insert(0, str(HERE))
    from dpsgd_step import BATCH, OPACUS, build_step, quiet
    from models import build_model, make_batch

    torch.set_num_threads(threads)
    quiet()
    x, y = make_batch(model_name, BATCH, device=device)
    model = build_model(model_name, device=device, opacus=method in OPACUS)
    step = build_step(method, model, x, y)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        for _ in range(steps):
            step.run()
        torch.cuda.synchronize()
        return {"mib": (torch.cuda.max_memory_allocated() - before) / MIB, "what": "cuda"}
    if measure == "tensors":
        return {"mib": _tensor_peak(step.run, steps) / MIB, "what": "tensors"}
    libraries_resident = _map_library_pages()
    if _reset_peak_rss():
        before = _status_kib("VmRSS")
        for _ in range(steps):
            step.run()
        what = "rss-delta" if libraries_resident else "rss-delta-with-code"
        return {"mib": (_status_kib("VmHWM") - before) / 1024, "what": what}
    for _ in range(steps):
        step.run()
    return {"mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "what": "ru_maxrss"}


#: What each measure is, in the order the tables show them.
WHAT = {
    "cuda": "peak CUDA tensor memory added by the steps, MiB",
    "tensors": "peak tensor memory added by the steps (profiler), MiB",
    "rss-delta": "peak RSS added by the steps (libraries' code resident before), MiB",
    "rss-delta-with-code": "peak RSS added by the steps, with the code they page in, MiB",
    "ru_maxrss": "peak RSS of the process (ru_maxrss), MiB",
}
SHORT = {
    "cuda": "CUDA tensors",
    "tensors": "tensors",
    "rss-delta": "RSS",
    "rss-delta-with-code": "RSS with code",
    "ru_maxrss": "process RSS",
}


def default_malloc_env() -> dict[str, str]:
    """This process's environment without glibc's ``MALLOC_*`` tuning variables.

    Memory is measured with the allocator a user has: settings that keep freed memory (see
    ``benchmarks/README.md``) steady the timings but add the kept memory to the resident set.
    """
    return {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}


def measure_all(
    methods: dict[str, list[str]], *, device: str, threads: int, steps: int
) -> tuple[dict[str, dict[str, dict[str, float]]], list[str]]:
    """One process per model, method of that model (``methods[model]``) and measure; returns
    ``{model: {method: {what: MiB}}}`` and the measures taken (keys of ``WHAT``), in ``WHAT``'s
    order.

    On CUDA the processes run 8 at a time: each one's allocator counts its own tensors alone. On
    the CPU they run one after another, so that none takes memory or time from another."""
    measures = ["tensors"] if device.startswith("cuda") else ["tensors", "rss"]
    cases = [(n, m, w) for n, of_n in methods.items() for m in of_n for w in measures]

    def measure(case: tuple[str, str, str]) -> subprocess.CompletedProcess:
        model_name, method, measure = case
        command = [
            sys.executable, str(Path(__file__).resolve()), "--child", model_name, method,
            "--device", device, "--threads", str(threads), "--steps", str(steps),
            "--measure", measure,
        ]  # fmt: skip
        return subprocess.run(
            command, capture_output=True, text=True, check=False, env=default_malloc_env()
        )

    workers = 8 if device.startswith("cuda") else 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        finished = list(pool.map(measure, cases))
    results: dict[str, dict[str, dict[str, float]]] = {}
    kinds = set()
    for (model_name, method, measure), done in zip(cases, finished, strict=True):
        if done.returncode != 0:
            print(f"memory {model_name} / {method} / {measure} failed:")
            print(done.stderr[-2000:])
            continue
        result = json.loads(done.stdout.strip().splitlines()[-1])
        results.setdefault(model_name, {}).setdefault(method, {})[result["what"]] = result["mib"]
        kinds.add(result["what"])
    return results, [what for what in WHAT if what in kinds]


def fmt_mib(mib: float) -> str:
    """Two decimals below 10 MiB (the linear models' steps add a fraction of one), else one."""
    return f"{mib:.2f}" if mib < 10 else f"{mib:.1f}"


def main() -> None:
    sys.path.insert(0, str(HERE))
    from dpsgd_step import METHODS, REFERENCES
    from models import MODELS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="2 steps per process (default 3)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--measure", default="tensors", help=argparse.SUPPRESS)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--methods", default=",".join(m for m in METHODS if m not in REFERENCES))
    args = parser.parse_args()
    steps = args.steps or (2 if args.quick else 3)
    if args.child:
        print(json.dumps(child(*args.child, args.device, args.threads, steps, args.measure)))
        return
    models, methods = args.models.split(","), args.methods.split(",")
    results, measures = measure_all(
        dict.fromkeys(models, methods), device=args.device, threads=args.threads, steps=steps
    )
    print(f"\n{steps} steps of batch 256 per process, {args.threads} threads, {args.device}\n")
    for what in measures:
        print(f"{WHAT[what]}:\n")
        print("| model | " + " | ".join(methods) + " |")
        print("|---|" + "--:|" * len(methods))
        for model_name, row in results.items():
            cells = [fmt_mib(row[m][what]) if what in row.get(m, {}) else "failed" for m in methods]
            print(f"| {MODELS[model_name].label} | {' | '.join(cells)} |")
        print()


if __name__ == "__main__":
    main()
