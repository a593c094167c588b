r"""Layers whose weights the rules take as several matrix products, each a :class:`Part`.

Part of :mod:`companion.per_example`; import from there.

Some of torch's layers hold their weights as raw parameters and use them inside one fused call,
into which hooks do not see: the recurrent layers (:mod:`~companion.per_example.recurrent`) and
``MultiheadAttention`` (:mod:`~companion.per_example.attention`). While the engine's hooks keep a
call (:class:`~companion.per_example.layout.Capture`), such a layer's ``forward`` is replaced, on
the instance, by the same maths written with one matrix product :math:`z = W a + b` per weight,
which keeps each product's input :math:`a` and output :math:`z` (batch first, (B, T, size)). Each
product is a :class:`Part`: a ``Linear`` on a sequence for the rules, whose example-:math:`i`
weight gradient is :math:`\sum_t (\partial L / \partial z_{i,t})^\top a_{i,t}`. The modules of
those layers register them in :data:`KINDS`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from companion.per_example.rules import LAYER_RULES, RuleOutput

__all__: list[str] = []

#: What a layer's replaced call keeps of each product: its input ``a`` and output ``z``, by the
#: name of its weight.
Kept = dict[str, tuple[torch.Tensor, torch.Tensor]]


class Kind(NamedTuple):
    """How the rules take a layer type as products."""

    #: (weight, bias) names of each product of a layer (bias None: none); [] if the rules do not
    #: take this layer (a configuration its ``call`` does not compute).
    products: Callable[[nn.Module], list[tuple[str, str | None]]]
    #: The layer's output on the arguments of a call, by name, with each product's input and
    #: output; None for a call it does not compute (torch's own then runs). With ``copy``, an
    #: output that is a product's ``z`` is returned as a copy, which the model may change in place.
    call: Callable[[nn.Module, dict[str, object], bool], tuple[object, Kept] | None]


#: Layer type (exact: a subclass may compute something else) -> how the rules take it.
KINDS: dict[type[nn.Module], Kind] = {}


def products(layer: nn.Module) -> list[tuple[str, str | None]]:
    """The (weight, bias) names of ``layer``'s products (:attr:`Kind.products`); [] if none."""
    kind = KINDS.get(type(layer))
    return kind.products(layer) if kind is not None else []


def is_composite(layer: nn.Module) -> bool:
    """Whether the rules take ``layer`` as products (:data:`KINDS`)."""
    return bool(products(layer))


class Part(nn.Module):
    """One matrix product :math:`z = W a + b` of a layer, as the engine's layer. ``weight`` and
    ``bias`` are the layer's own parameters, named there ``names`` (``weight_ih_l0``,
    ``out_proj.weight``)."""

    def __init__(self, layer: nn.Module, weight: str, bias: str | None) -> None:
        super().__init__()
        object.__setattr__(self, "layer", layer)  # not a submodule: the part is not in the tree
        self.names = (weight, bias)
        self.weight = layer.get_parameter(weight)
        self.bias = layer.get_parameter(bias) if bias is not None else None


def own_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The module's own parameters by name: a :class:`Part`'s by its layer's names."""
    if isinstance(module, Part):
        pairs = zip(module.names, (module.weight, module.bias), strict=True)
        return [(n, p) for n, p in pairs if n is not None]
    return list(module.named_parameters(recurse=False))


def holds_own(module: nn.Module, own: list[tuple[str, nn.Parameter]]) -> bool:
    """Whether ``module`` (a :class:`Part`'s layer for a part) holds each parameter of ``own``
    (:func:`own_parameters`) under its name now, not a tensor swapped in for a call, as
    ``torch.func.functional_call`` does: a rule takes the call as made with the parameters."""
    layer = module.layer if isinstance(module, Part) else module
    for name, p in own:
        owner, *path = layer, *name.split(".")
        for step in path:
            owner = getattr(owner, step, None)
        if owner is not p:
            return False
    return True


def _part(part: nn.Module, a: torch.Tensor, b: torch.Tensor) -> RuleOutput:
    """The Linear rule, on all the positions of a sequence (``a`` (B, T, in), ``b`` (B, T, out)),
    under the layer's names of the parameters."""
    found = LAYER_RULES[nn.Linear](part, a, b)
    return [(part.names[0] if n == "weight" else part.names[1], sq, add) for n, sq, add in found]


LAYER_RULES[Part] = _part


def parts(layer: nn.Module) -> list[Part]:
    """The products of ``layer`` that hold a trainable parameter."""
    found = [Part(layer, weight, bias) for weight, bias in products(layer)]
    return [part for part in found if any(p.requires_grad for p in part.parameters())]


def parameter_names(layer: nn.Module) -> set[str]:
    """The names of the parameters the parts compute."""
    return {name for pair in products(layer) for name in pair if name is not None}


def computed_weights(layer: nn.Module) -> list[str]:
    """The names of :func:`parameter_names` that are not parameters of the layer: tensors
    computed from others (``torch.nn.utils.weight_norm``), which no part computes."""
    return sorted(parameter_names(layer) - dict(layer.named_parameters()).keys())


def call(
    layer: nn.Module, args: tuple[object, ...], kwargs: dict[str, object], *, copy: bool = False
) -> tuple[object, Kept] | None:
    """The layer's :attr:`Kind.call` on the arguments of a call of its ``forward``; None for
    arguments its forward does not take (torch's own then says why), or under saved-tensor
    hooks (:func:`torch.utils.checkpoint.checkpoint`, whose backward pass would run torch's own
    forward again, not this one)."""
    try:
        bound = inspect.signature(type(layer).forward).bind(layer, *args, **kwargs)
        with torch.autograd.graph.disable_saved_tensors_hooks("companion"):
            pass  # it raises if saved-tensor hooks are active
    except (TypeError, RuntimeError):
        return None
    bound.apply_defaults()
    named = dict(list(bound.arguments.items())[1:])  # without self
    return KINDS[type(layer)].call(layer, named, copy)
