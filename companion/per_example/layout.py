"""Whether a hooked layer's rows are the batch's examples, as the layer rules assume.

Part of :mod:`companion.per_example`; import from there.

A rule reads row :math:`i` of a layer's input and output as example :math:`i`'s. That fails for a
batch flattened to ``(B*T, F)`` or a sequence laid out ``(T, B, F)`` (rows are positions), and
for a forward pass that reorders the batch around the layer (``x.flip(0)``, a sort by length)
and puts it back: the model still treats examples independently, but the rule would give one
example's gradient part of another's, and one example could then move the clipped sum by more
than :math:`C`. :func:`probe_rows` finds such layers once per clipper; every batch's shapes are
checked too (:func:`one_row_per_example`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from companion._outputs import run_model
from companion._validation import warn

__all__: list[str] = []


class LayerPlan(NamedTuple):
    """Which layers the rules handle and which parameters fall back to vmap."""

    hooked: list[tuple[str, nn.Module]]  # layers with a rule and trainable parameters
    fallback: list[str]  # trainable parameters computed with vmap
    reasons: list[str]  # why, per layer, for messages


class Capture:
    """Forward hooks that keep each hooked layer's input and output.

    They run before any forward hook of the user's (``prepend``), so that they keep what the
    layer itself computed, not an output a user's hook changed."""

    def __init__(self, layers: list[tuple[str, nn.Module]], copy: bool) -> None:
        self.seen: dict[nn.Module, tuple[torch.Tensor, torch.Tensor, int, int]] = {}
        self.copy = copy
        self.handles = [
            m.register_forward_hook(self._keep, with_kwargs=True, prepend=True) for _, m in layers
        ]

    def _keep(
        self,
        module: nn.Module,
        args: tuple[torch.Tensor, ...],
        kwargs: dict[str, torch.Tensor],
        output: torch.Tensor,
    ) -> torch.Tensor | None:
        a = args[0] if args else kwargs["input"]  # every layer with a rule names it `input`
        a = a.clone() if self.copy else a
        self.seen[module] = (a, output, a._version, output._version)
        # A copy shields the kept output from in-place changes made further on (ReLU(inplace)).
        return output.clone() if self.copy else None

    def changed(self) -> bool:
        return any(a._version != va or o._version != vo for a, o, va, vo in self.seen.values())

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def one_row_per_example(a: torch.Tensor, b: torch.Tensor, batch: int) -> bool:
    """Whether a layer's input ``a`` and output ``b`` have ``batch`` rows, one per example, as the
    rules assume (a flattened batch ``(B*T, F)`` or a sequence ``(T, B, F)`` has not)."""
    return a.dim() > 0 and b.dim() > 0 and a.shape[0] == b.shape[0] == batch


def probe_rows(model: nn.Module, plan: LayerPlan, x: torch.Tensor, warned: set[str]) -> LayerPlan:
    """``plan`` with the hooked layers whose rows are not the examples moved to vmap, with a
    warning naming them.

    Three examples of the batch ``x`` (the first, middle and last; repeated if ``x`` has fewer)
    run together, in this order and reversed, and each of them runs alone, as two copies (one
    copy would fail ``.squeeze()``). A layer keeps its rule if it gives three rows, and two for
    the copies, and row ``r`` of the three is the row of example ``r``'s copies. A layout of
    positions ``(T, B, F)`` cannot pass for both ``B = 2`` and ``B = 3``; a batch reordered or
    mixed around the layer cannot give each example its own row (if the three differ), and a
    sort cannot leave both orders as they are. The model runs in evaluation mode without
    gradients, so that dropout is off."""
    picks = [0, x.shape[0] // 2, x.shape[0] - 1]
    alone = {i: _rows(model, plan, x[[i, i]]) for i in dict.fromkeys(picks)}
    together = [_rows(model, plan, x[order]) for order in (picks, picks[::-1])]
    examples = picks + picks[::-1]  # whose row each row of the two runs together is

    def has_rows(module: nn.Module, runs: list[Rows], size: int) -> bool:
        return all(module in seen and one_row_per_example(*seen[module], size) for seen in runs)

    def own_rows(module: nn.Module) -> bool:
        if not (has_rows(module, list(alone.values()), 2) and has_rows(module, together, 3)):
            return False
        for k in (0, 1):  # the input, the output
            rows = [seen[module][k] for seen in together]
            own = torch.stack([alone[i][module][k][0] for i in examples])
            if rows[0].shape != rows[1].shape or not _are_own(torch.cat(rows), own, examples):
                return False
        return True

    moved = [(name, m) for name, m in plan.hooked if m in together[0] and not own_rows(m)]
    if not moved:
        return plan
    names = [repr(name) for name, _ in moved]
    warned.update(names)
    warn(
        f"layer {', '.join(names)} is called on an input whose rows are not the batch's "
        "examples (a flattened batch, a sequence laid out (T, B, F), or a batch reordered "
        "around it): its per-example gradients are computed with vmap, which is slower; the "
        "result is the same."
    )
    fallback = plan.fallback + [
        f"{name}.{n}" if name else n
        for name, module in moved
        for n, p in module.named_parameters(recurse=False)
        if p.requires_grad
    ]
    return LayerPlan([layer for layer in plan.hooked if layer not in moved], fallback, plan.reasons)


#: Each hooked layer's input and output in one run of the model.
Rows = dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]


def _rows(model: nn.Module, plan: LayerPlan, x: torch.Tensor) -> Rows:
    """Each hooked layer's input and output (its last call) when the model runs on ``x``."""
    capture = Capture(plan.hooked, copy=True)
    try:
        run_model(model, x)
    finally:
        capture.remove()
    return {module: (a, b) for module, (a, b, _, _) in capture.seen.items()}


def _are_own(rows: torch.Tensor, own: torch.Tensor, examples: list[int]) -> bool:
    """Whether each of ``rows`` is the row ``own`` of the same index, which belongs to example
    ``examples[r]``, up to rounding: within the square root of the dtype's epsilon (relative to
    the row's largest entry), or ten times closer to it than the rows of the other examples are
    (two batch sizes may round differently, the more so with TF32 or with a float32 layer before
    a float64 one)."""
    if rows.shape != own.shape:
        return False
    if own.numel() == 0 or not own.is_floating_point():
        return bool(torch.equal(rows, own))
    flat = own.flatten(1)
    distance = (rows.flatten(1) - flat).abs().amax(dim=1)
    tolerance = torch.finfo(own.dtype).eps ** 0.5 * flat.abs().amax(dim=1)
    gaps = (flat[:, None] - flat[None]).abs().amax(dim=2)  # between the examples' own rows
    ids = torch.tensor(examples, device=own.device)
    gaps = gaps.masked_fill(ids[:, None] == ids[None], math.inf).amin(dim=1)
    separation = gaps.masked_fill(gaps == math.inf, 0.0)  # no other example: the tolerance
    return bool((distance <= torch.maximum(tolerance, 0.1 * separation)).all())
