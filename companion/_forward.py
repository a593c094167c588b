"""What a pass over private data needs of its context and its model (private).

Like :mod:`companion._torch`, one of the private modules other modules may import from. Two
refusals: computing gradients where autograd is off (``torch.inference_mode()``, or tensors made
there), and a forward pass that writes to the model's parameters in place, which would put the
data it reads into the weights with no noise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["parameters_unwritten", "refuse_inference"]


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
def parameters_unwritten(model: nn.Module) -> Iterator[None]:
    """Refuse a block of forward passes over private data that changes a parameter of ``model``
    in place: a layer that sets its weights from the data it reads (as Glow's ActNorm does on its
    first batch) puts that data into the weights with no noise, which no epsilon covers. A lazy
    layer's parameters (``nn.LazyLinear``), which its first call creates from the input's shape
    alone, are not counted."""
    params = [(name, p) for name, p in model.named_parameters() if not nn.parameter.is_lazy(p)]
    versions = [(name, p, p._version) for name, p in params]
    yield
    if written := [name for name, p, version in versions if p._version != version]:
        raise ValueError(
            f"the model's forward pass changed its parameter(s) {written[:5]} in place. Values "
            "written from the data it reads (as by a layer that initialises itself from its "
            "first batch) reach the weights with no noise, which no epsilon covers, so this is "
            "refused; those parameters may now hold values computed from the data: rebuild the "
            "model. Initialise such a layer on public data, and apply a constraint (a clamp) "
            "after the optimizer's step, outside the forward pass."
        )
