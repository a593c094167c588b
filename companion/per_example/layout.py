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


def probe_rows(
    model: nn.Module, plan: LayerPlan, x: torch.Tensor, warned: set[str]
) -> tuple[LayerPlan, bool]:
    """``plan`` with the hooked layers whose rows are not the examples moved to vmap (with a
    warning naming them), and whether the probe could tell three examples of ``x`` apart.

    Three of the batch's first 16 examples (the first, the one farthest from it, and the one
    farthest from both) run together, in this order and reversed, and each runs alone, as two
    copies (one copy would fail ``.squeeze()``). A layer keeps its rule if it gives three rows,
    and two for the copies, and row ``r`` of the three is ten times closer to example ``r``'s
    row among the copies than the other examples' rows are (two batch sizes may round
    differently, the more so with TF32). A layout of positions ``(T, B, F)`` cannot pass for
    both ``B = 2`` and ``B = 3``; a batch reordered or mixed around the layer cannot give each
    example its own row, and a sort cannot leave both orders as they are. A layer whose rows
    change between two runs of the same batch (after a random draw: a VAE's sampling, added
    noise) is judged by its rows' number only. The model runs in evaluation mode without
    gradients, so that dropout is off, and the
    global random generators are left as they were."""
    picks, distinct = _far_apart(x)
    orders = (picks, picks[::-1])
    with torch.random.fork_rng(devices=_cuda_index(x.device)):
        alone = {i: _rows(model, plan, x[[i, i]]) for i in dict.fromkeys(picks)}
        together = [_rows(model, plan, x[order]) for order in orders]
        examples = [i for order in orders for i in order]  # whose each row of `together` is

        def shaped(module: nn.Module) -> bool:
            return all(
                module in seen and one_row_per_example(*seen[module], size)
                for runs, size in ((alone.values(), 2), (together, 3))
                for seen in runs
            )

        def own_rows(module: nn.Module) -> bool:
            return all(
                _are_own(
                    _joined([seen[module][k] for seen in together]),
                    _joined([alone[i][module][k][:1] for i in examples]),
                    examples,
                )
                for k in (0, 1)  # the input, the output
            )

        def repeatable(module: nn.Module, again: list[Rows]) -> bool:
            return all(module in seen for seen in again) and all(
                _are_own(
                    _joined([seen[module][k] for seen in again]),
                    _joined([seen[module][k] for seen in together]),
                    examples,
                )
                for k in (0, 1)
            )

        seen = [(name, m) for name, m in plan.hooked if m in together[0]]
        moved = [(n, m) for n, m in seen if not shaped(m) or not own_rows(m)]
        if moved:  # unless a random draw, which changes the rows of a second run, explains it
            again = [_rows(model, plan, x[order]) for order in orders]
            moved = [(n, m) for n, m in moved if not shaped(m) or repeatable(m, again)]
    if not moved:
        return plan, distinct
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
    hooked = [layer for layer in plan.hooked if layer not in moved]
    return LayerPlan(hooked, fallback, plan.reasons), distinct


def _far_apart(x: torch.Tensor) -> tuple[list[int], bool]:
    """Three of the batch's first 16 examples far apart (the first, the farthest from it, the
    farthest from both), and whether they are three distinct ones. With fewer, the last is the
    second again: ``[a, b, b]`` is no palindrome, so reversing it still shows a reordered batch.
    One row at a time: a batch of large images would take much memory at once."""
    rows = x[:16].reshape(min(x.shape[0], 16), -1)
    gaps = [_distance(row, rows[0]) for row in rows]
    second = max(range(len(rows)), key=gaps.__getitem__)
    gaps = [min(gap, _distance(row, rows[second])) for gap, row in zip(gaps, rows, strict=True)]
    third = max(range(len(rows)), key=gaps.__getitem__)
    distinct = gaps[third] > 0
    return [0, second, third if distinct else second], distinct


def _cuda_index(device: torch.device) -> list[int]:
    """The CUDA generators :func:`torch.random.fork_rng` must save besides the CPU's."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


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


def _joined(rows: list[torch.Tensor]) -> torch.Tensor | None:
    """The rows in one tensor, or None if their shapes differ (a layout that changes with the
    batch)."""
    return torch.cat(rows) if len({r.shape[1:] for r in rows}) == 1 else None


def _are_own(rows: torch.Tensor | None, own: torch.Tensor | None, examples: list[int]) -> bool:
    """Whether each of ``rows`` is the row ``own`` of the same index, which belongs to example
    ``examples[r]``: ten times closer to it than the other examples' rows are, or, where no
    other example differs, within the square root of the dtype's epsilon (relative to the row's
    largest entry)."""
    if rows is None or own is None or rows.shape != own.shape:
        return False
    if own.numel() == 0 or not own.is_floating_point():
        return bool(torch.equal(rows, own))
    flat = own.flatten(1)
    distance = (rows.flatten(1) - flat).abs().amax(dim=1)
    gaps = (flat[:, None] - flat[None]).abs().amax(dim=2)  # between the examples' own rows
    ids = torch.tensor(examples, device=own.device)
    separation = gaps.masked_fill(ids[:, None] == ids[None], math.inf).amin(dim=1)
    tolerance = torch.finfo(own.dtype).eps ** 0.5 * flat.abs().amax(dim=1)
    bound = torch.where((separation > 0) & (separation < math.inf), 0.1 * separation, tolerance)
    return bool((distance <= bound).all())


def _distance(u: torch.Tensor, v: torch.Tensor) -> float:
    return float((u.double() - v.double()).abs().max())
