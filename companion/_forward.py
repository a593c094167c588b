"""What a pass over private data needs of its context and its model (private).

Like :mod:`companion._torch`, one of the private modules other modules may import from. Two
refusals: computing gradients where autograd is off (``torch.inference_mode()``, or tensors made
there), and a forward pass that writes to the model's parameters, which would put the data it
reads into the weights with no noise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["parameters_unwritten", "refuse_inference", "same_values"]


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
    return torch.stack([p.sum(), torch.linalg.vector_norm(p)])


def _written(p: torch.Tensor, old: torch.Tensor, fingerprint: torch.Tensor) -> bool:
    if p.data_ptr() != old.data_ptr() or p.shape != old.shape:  # new storage: compare values
        return not same_values(p, old)
    return not same_values(_fingerprint(p), fingerprint)


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shapes and values, NaN where the other has NaN."""
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())
