"""The per-layer rules: each example's squared gradient norm and the clipped sum, per layer type.

Part of :mod:`companion.per_example`; import from there. A rule takes a layer, its input ``a`` and
the gradient ``b`` of the summed loss with respect to its output (both with the batch first) and
returns, for each trainable parameter of the layer, the examples' squared gradient norms and a
function from the clipping factors to the clipped sum.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# --- the per-layer rules ------------------------------------------------------------------------

#: What a rule returns for one parameter: its name within the layer ("weight", "bias"), each
#: example's squared gradient norm (shape (B,)), and a function from the clipping factors (B,) to
#: the clipped sum of its per-example gradients.
RuleOutput = list[tuple[str, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]]
Rule = Callable[[nn.Module, torch.Tensor, torch.Tensor], RuleOutput]

#: Layer type -> rule ``(layer, input a, output gradient b) -> [(parameter, squares, summer)]``.
LAYER_RULES: dict[type[nn.Module], Rule] = {}


def _rule(*kinds: type[nn.Module]) -> Callable[[Rule], Rule]:
    def register(rule: Rule) -> Rule:
        for kind in kinds:
            LAYER_RULES[kind] = rule
        return rule

    return register


def _wants(layer: nn.Module, name: str) -> bool:
    p = getattr(layer, name, None)
    return isinstance(p, nn.Parameter) and p.requires_grad


def _matmul_rule(layer: nn.Module, a: torch.Tensor, b: torch.Tensor, groups: int = 1) -> RuleOutput:
    """Weight and bias of a layer whose example-``i`` weight gradient is :math:`b_i^\\top a_i`.

    ``a`` has shape (B, L, I) and ``b`` (B, L, O): L positions, I inputs and O outputs per group
    times ``groups``. The weight gradient is reshaped to the weight's shape.
    """
    out: RuleOutput = []
    batch, length = a.shape[0], a.shape[1]
    shape = layer.weight.shape
    if _wants(layer, "weight"):
        if groups == 1 and length == 1:
            a2, b2 = a[:, 0], b[:, 0]
            squares = a2.square().sum(1) * b2.square().sum(1)
            out.append(
                ("weight", squares, lambda f: torch.mm((b2 * f[:, None]).t(), a2).view(shape))
            )
        else:
            ag = a.reshape(batch, length, groups, -1).transpose(1, 2)  # (B, g, L, I/g)
            bg = b.reshape(batch, length, groups, -1).transpose(1, 2)  # (B, g, L, O/g)
            i_size, o_size = ag.shape[-1], bg.shape[-1]
            if length * (i_size + o_size) < i_size * o_size:  # ghost norm is cheaper
                gram_a = ag @ ag.transpose(-1, -2)
                gram_b = bg @ bg.transpose(-1, -2)
                squares = (gram_a * gram_b).sum(dim=(1, 2, 3))

                def summer(
                    f: torch.Tensor, ag: torch.Tensor = ag, bg: torch.Tensor = bg
                ) -> torch.Tensor:
                    return torch.einsum("bglo,bgli->goi", bg * f[:, None, None, None], ag).reshape(
                        shape
                    )

            else:
                grads = bg.transpose(-1, -2) @ ag  # (B, g, O/g, I/g)
                squares = grads.square().sum(dim=(1, 2, 3))

                def summer(f: torch.Tensor, grads: torch.Tensor = grads) -> torch.Tensor:
                    return torch.tensordot(f, grads, dims=1).reshape(shape)

            out.append(("weight", squares, summer))
    if _wants(layer, "bias"):
        bias_grads = b.sum(dim=1)  # (B, O)
        out.append(("bias", bias_grads.square().sum(1), lambda f: torch.mv(bias_grads.t(), f)))
    return out


@_rule(nn.Linear)
def _linear(layer: nn.Module, a: torch.Tensor, b: torch.Tensor) -> RuleOutput:
    return _matmul_rule(
        layer, a.reshape(a.shape[0], -1, a.shape[-1]), b.reshape(b.shape[0], -1, b.shape[-1])
    )


def _explicit_padding(conv: nn.Module, dims: int) -> list[int]:
    """F.pad's argument (last dimension first) for the padding the convolution applies."""
    if conv.padding == "same":
        pads = []
        for d, k in zip(conv.dilation, conv.kernel_size, strict=True):
            total = d * (k - 1)
            pads.append((total // 2, total - total // 2))
    elif conv.padding == "valid":
        pads = [(0, 0)] * dims
    else:
        pads = [(p, p) for p in conv.padding]
    return [side for pair in reversed(pads) for side in pair]


def _patches(a: torch.Tensor, conv: nn.Module, dims: int) -> torch.Tensor:
    """The patches a convolution sees: shape ``(B, L, C_in * prod(kernel))``, L positions."""
    pad = _explicit_padding(conv, dims)
    if any(pad):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        a = F.pad(a, pad, mode=mode)
    for axis, (k, s, d) in enumerate(
        zip(conv.kernel_size, conv.stride, conv.dilation, strict=True)
    ):
        a = a.unfold(2 + axis, d * (k - 1) + 1, s)
        if d > 1:
            a = a[..., ::d]
    # a: (B, C, *positions, *kernel), a view; one strided copy into rows of patches.
    batch, channels = a.shape[:2]
    positions = a.shape[2 : 2 + dims]
    order = [0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims)]
    return a.permute(order).reshape(batch, math.prod(positions), -1)


@_rule(nn.Conv1d, nn.Conv2d)
def _conv(layer: nn.Module, a: torch.Tensor, b: torch.Tensor) -> RuleOutput:
    dims = a.ndim - 2
    patches = _patches(a, layer, dims)
    outputs = b.reshape(b.shape[0], b.shape[1], -1).transpose(1, 2)  # (B, L, C_out)
    return _matmul_rule(layer, patches, outputs, groups=layer.groups)


@_rule(nn.Embedding)
def _embedding(layer: nn.Module, a: torch.Tensor, b: torch.Tensor) -> RuleOutput:
    if not _wants(layer, "weight"):
        return []
    batch = a.shape[0]
    index = a.reshape(batch, -1)
    rows = b.reshape(batch, index.shape[1], -1)
    if layer.padding_idx is not None:  # torch gives the padding row no gradient
        rows = rows * (index != layer.padding_idx).unsqueeze(-1)
    # Example i's gradient has row v = sum of rows[i, t] over positions t with index v, so its
    # squared norm is sum over pairs (t, s) with equal indices of <rows[i, t], rows[i, s]>.
    same = (index.unsqueeze(2) == index.unsqueeze(1)).to(rows.dtype)
    squares = (same * (rows @ rows.transpose(1, 2))).sum(dim=(1, 2))

    def summer(f: torch.Tensor) -> torch.Tensor:
        weighted = (rows * f[:, None, None]).reshape(-1, rows.shape[-1])
        return torch.zeros_like(layer.weight).index_add_(0, index.reshape(-1), weighted)

    return [("weight", squares, summer)]


def _affine_rule(
    layer: nn.Module, normalised: torch.Tensor, b: torch.Tensor, reduce: tuple[int, ...]
) -> RuleOutput:
    """Per-channel scale and shift: materialised per-example gradients (they are small)."""
    out: RuleOutput = []
    grads = {}
    if _wants(layer, "weight"):
        grads["weight"] = (normalised * b).sum(dim=reduce) if reduce else normalised * b
    if _wants(layer, "bias"):
        grads["bias"] = b.sum(dim=reduce) if reduce else b
    for name, g in grads.items():
        flat = g.reshape(g.shape[0], -1)
        shape = getattr(layer, name).shape
        out.append(
            (name, flat.square().sum(1), lambda f, flat=flat, shape=shape: (f @ flat).view(shape))
        )
    return out


@_rule(nn.LayerNorm)
def _layer_norm(layer: nn.Module, a: torch.Tensor, b: torch.Tensor) -> RuleOutput:
    normalised = F.layer_norm(a, layer.normalized_shape, eps=layer.eps)
    k = len(layer.normalized_shape)
    batch = a.shape[0]
    flat = (batch, -1, *a.shape[a.ndim - k :])
    return _affine_rule(layer, normalised.reshape(flat), b.reshape(flat), (1,))


@_rule(nn.GroupNorm)
def _group_norm(layer: nn.Module, a: torch.Tensor, b: torch.Tensor) -> RuleOutput:
    normalised = F.group_norm(a, layer.num_groups, eps=layer.eps)
    return _affine_rule(layer, normalised, b, tuple(range(2, a.ndim)))
