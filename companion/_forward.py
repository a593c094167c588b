"""What a pass over private data needs of its context and its model (private).

Like :mod:`companion._torch`, one of the private modules other modules may import from. Three
refusals: computing gradients where autograd is off (``torch.inference_mode()``, or tensors made
there), and a forward pass that writes to the model's parameters or a buffer from the data, which
would put the data it reads into the model with no noise. Also the states of the global
generators, which the checks' passes leave as they were.
"""

from __future__ import annotations

import contextlib
import copy
import random
import warnings
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from companion._torch import OutOfMemoryError, eval_mode
from companion._validation import warn

__all__ = [
    "check_buffers_unwritten",
    "generator_states",
    "parameters_unwritten",
    "refuse_inference",
    "set_generator_states",
]


def refuse_inference(names: tuple[str, ...] = (), tensors: tuple[torch.Tensor, ...] = ()) -> None:
    """Refuse to compute gradients inside ``torch.inference_mode()``, which turns autograd off
    (``torch.enable_grad()`` cannot turn it on there), or of ``tensors`` made there."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "per-example gradients need autograd, which torch.inference_mode() turns off: call "
            "this outside the inference_mode block."
        )
    for name, t in zip(names, tensors, strict=True):
        if t.is_inference():
            raise ValueError(
                f"{name} is an inference tensor (made under torch.inference_mode()), which "
                f"autograd cannot use: pass {name}.clone(), made outside inference mode."
            )


@contextlib.contextmanager
def parameters_unwritten(model: nn.Module, *, check: bool = True) -> Iterator[None]:
    """Refuse a block of passes over private data that changes the values of a parameter of
    ``model``: a layer that sets its weights from the data it reads (as Glow's ActNorm does on
    its first batch) puts that data into the weights with no noise, which no epsilon covers.

    Values, not version counters, are compared, so that a write through ``.data`` (the way most
    ActNorm code initialises itself) is seen, and a move to new storage that keeps the values
    (an RNN's ``flatten_parameters`` on a GPU) is not taken for a write. With no copy of the
    parameters: a parameter that keeps its storage is compared by its sum and its norm (the same
    arithmetic on the same memory gives the same result), one moved to new storage with its old
    storage, kept alive by the block. Costing two passes over the parameters and a wait for the
    device, it checks the first passes over a model, where a layer initialises itself (with
    ``check=False`` the block runs unchecked): a forward pass that writes only later is not seen.
    A lazy layer's parameters (``nn.LazyLinear``), which its first call creates from the input's
    shape alone, are left out."""
    named = model.named_parameters() if check else ()
    params = [(n, p) for n, p in named if not nn.parameter.is_lazy(p)]
    before = [(p.detach(), _fingerprint(p)) for _, p in params]
    yield
    written = [n for (n, p), old in zip(params, before, strict=True) if _written(p.detach(), *old)]
    if written:
        raise ValueError(
            f"a pass over the model changed the values of its parameter(s) {written[:5]}. Values "
            "written from the data it reads (as by a layer that initialises itself from its "
            "first batch) reach the weights with no noise, which no epsilon covers, so this is "
            "refused; those parameters may now hold values computed from the data: rebuild the "
            "model. Initialise such a layer on public data, and apply a constraint (a clamp) "
            "after the optimizer's step, outside the forward pass."
        )


def _fingerprint(p: torch.Tensor) -> torch.Tensor:
    p = p.detach()
    if not (p.is_floating_point() or p.is_complex()):
        p = p.double()  # an integer parameter (vector_norm takes none): rare and small
    return torch.stack([p.sum(), torch.linalg.vector_norm(p)])


def _written(p: torch.Tensor, old: torch.Tensor, fingerprint: torch.Tensor) -> bool:
    if p.data_ptr() != old.data_ptr() or p.shape != old.shape:  # new storage: compare values
        return not _same(p, old)
    return not _same(_fingerprint(p), fingerprint)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shapes and values, NaN where the other has NaN."""
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def check_buffers_unwritten(model: nn.Module, x: torch.Tensor) -> None:
    """Raise if a forward pass of ``model`` writes a buffer from the data it reads.

    A statistic of the data kept in a buffer (a running mean or variance updated in ``forward``,
    or one fitted on the first call) is released with the model with no noise. Spectral
    normalisation's vectors, a cache, a schedule or a count of calls do not depend on the data.
    So a model with buffers is copied (its parameters shared, under
    :func:`parameters_unwritten`; its buffers and other state as they are before any pass over
    the data) and the copies run once each, on batches of two: the first example twice, the
    first and the second, the first twice again (a cache sized by the batch compares equal; a
    mean and a spread differ), with the global generators in the same state, in the model's own
    mode (with gradients on) and in evaluation mode (where :func:`~companion.dpsgd.train_dpsgd`
    evaluates it on the training data). A buffer that the two runs on the first example leave
    equal and the other run leaves different was written from the data (one that differs
    between runs on the same data, as a timestamp or a count kept outside the model, is not).

    The entry points call this first, before their other checks, which report a model that
    cannot take the data (here such a run is skipped). A model whose buffers are not made yet
    (a lazy layer that has not run) is checked at a later call; one that ``copy.deepcopy``
    cannot copy (it holds a lock or an open file) is skipped with a warning. It catches
    mistakes and proves nothing: a statistic that the examples share (a running minimum and
    maximum of images that all span [0, 1]), one written only after the first passes, and one
    that a forward hook writes into the model itself are not seen; a layer that writes a
    parameter (refused) has written the copies' first batch into the model. The copies run the
    model's forward hooks; their warnings are not shown; the global generators are left as
    they were.
    """
    lazy = any(nn.parameter.is_lazy(b) for b in model.buffers())
    if x.shape[0] < 2 or lazy or not any(m._buffers for m in model.modules()):
        return
    evaluations = (False, True) if any(m.training for m in model.modules()) else (True,)
    batches = (x[[0, 0]], x[[0, 1]], x[[0, 0]])
    states = generator_states(x.device)
    written: list[str] = []
    try:
        if (copies := _copies(model, 3 * len(evaluations))) is None:
            return
        with warnings.catch_warnings(), parameters_unwritten(model):
            warnings.simplefilter("ignore")
            for evaluation in evaluations:
                runs = [_buffers_after(copies.pop(), b, evaluation, states) for b in batches]
                if any(run is None for run in runs):
                    continue  # the other checks report a model that cannot take the data
                first, other, again = runs
                written += [
                    name
                    for name in first
                    if name not in written
                    and _same_buffer(first[name], again.get(name))
                    and not _same_buffer(first[name], other.get(name))
                ]
    finally:
        set_generator_states(states, x.device)
    if written:
        raise ValueError(
            f"a forward pass of the model writes its buffer(s) {written[:5]} from the data: their "
            "values after a pass over some examples differ from those after a pass over others. "
            "A statistic of the data kept in a buffer (as BatchNorm's running statistics) is "
            "released with the model with no noise, which no epsilon covers, so this is refused. "
            "Compute such statistics on public data, outside the forward pass; a buffer that does "
            "not depend on the data (a cache, a count of calls) is accepted."
        )


def _copies(model: nn.Module, n: int) -> list[nn.Module] | None:
    """``n`` copies of ``model``, all made before any runs (one run must not change another's
    start), that share its parameters and the tensors it computed from them with autograd (the
    old ``weight_norm``'s weight, which ``copy.deepcopy`` refuses); None, with a warning, if it
    cannot be copied or its copies share its buffers (a ``__deepcopy__`` returning itself)."""
    shared = {id(p): p for p in model.parameters() if not nn.parameter.is_lazy(p)}
    for module in model.modules():
        computed = (v for v in vars(module).values() if isinstance(v, torch.Tensor) and v.grad_fn)
        shared.update((id(v), v) for v in computed)
    try:
        copies = [copy.deepcopy(model, dict(shared)) for _ in range(n)]
        reason = "its copies share its buffers"
        own = {id(b) for b in model.buffers()}
        if not any(id(b) in own for c in copies for b in c.buffers()):
            return copies
    except Exception as error:  # a lock, an open file
        reason = f"{type(error).__name__}: {error}"
    warn(
        f"the model cannot be copied ({reason}), so whether its forward pass writes a buffer "
        "from the data was not checked: make sure it does not (a running mean kept by hand), or "
        "DP-SGD's guarantee does not hold."
    )
    return None


def _buffers_after(
    probe: nn.Module, x: torch.Tensor, evaluation: bool, states: tuple
) -> dict[str, torch.Tensor | None] | None:
    """The buffers by name (None for one set to None) of ``probe`` after a pass over ``x`` from
    the generator ``states``, in evaluation mode or in its own with gradients on; None if it
    cannot be applied to ``x``."""
    set_generator_states(states, x.device)
    try:
        with eval_mode(probe) if evaluation else contextlib.nullcontext():
            with torch.set_grad_enabled(not evaluation):
                probe(x.clone())
    except OutOfMemoryError:
        raise
    except Exception:
        return None
    return {
        f"{name}.{key}" if name else key: value
        for name, m in probe.named_modules()
        for key, value in m._buffers.items()
    }


def _same_buffer(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    if a.is_meta or b.is_meta:  # no values to compare
        return a.shape == b.shape
    a, b = (t.detach() if t.layout == torch.strided else t.detach().to_dense() for t in (a, b))
    return _same(a, b)


def generator_states(device: torch.device) -> tuple:
    """The states of the global generators a forward pass may draw from: torch's (on the CPU, and
    on ``device`` if it is a CUDA device), Python's and numpy's."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda, random.getstate(), np.random.get_state()


def set_generator_states(states: tuple, device: torch.device) -> None:
    cpu, cuda, python, numpy_state = states
    torch.set_rng_state(cpu)
    random.setstate(python)
    np.random.set_state(numpy_state)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)
