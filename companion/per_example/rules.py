"""The per-layer rules: each example's squared gradient norm and the clipped sum, per layer type.

Part of :mod:`companion.per_example`; import from there. A rule takes a layer, its input ``a`` and
the gradient ``b`` of the summed loss with respect to its output (both with the batch first) and
returns, for each trainable parameter of the layer, the examples' squared gradient norms and a
function that adds the sum of the per-example gradients weighted by the clipping factors into a
tensor of the parameter's shape (in place: the caller passes zeros, or the noise of a DP step).
A rule must leave ``a`` and ``b`` as they are: it may run during the backward pass, which still
reads them (the engine refuses a rule that changes them in place).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vjp, vmap

from companion._torch import OutOfMemoryError
from companion.per_example.ghost import ghost_weight
from companion.per_example.gradients import (
    Entry,
    add_weighted,
    example_chunks,
    materialised,
    squared_norms,
)

__all__ = ["LAYER_RULES"]

# --- the per-layer rules ------------------------------------------------------------------------

#: What a rule returns: one :data:`~companion.per_example.gradients.Entry` per trainable
#: parameter, named within the layer ("weight", "bias").
RuleOutput = list[Entry]
Rule = Callable[[nn.Module, torch.Tensor, torch.Tensor], RuleOutput]

#: Layer type -> rule ``(layer, input a, output gradient b) -> [(parameter, squares, add_to)]``.
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


def _bias(layer: nn.Module, b: torch.Tensor) -> RuleOutput:
    """The bias of a layer whose output gradient ``b`` is (B, L, O): summed over positions."""
    if not _wants(layer, "bias"):
        return []
    return [materialised("bias", b.sum(dim=1))]


def _matmul_rule(layer: nn.Module, a: torch.Tensor, b: torch.Tensor, groups: int = 1) -> RuleOutput:
    """Weight and bias of a layer whose example-``i`` weight gradient is :math:`b_i^\\top a_i`.

    ``a`` has shape (B, L, I) and ``b`` (B, L, O): L positions, I inputs and O outputs per group
    times ``groups``. The weight gradient is reshaped to the weight's shape.
    """
    if groups == 1 and a.shape[1] == 1:
        return _one_position(layer, a[:, 0], b[:, 0])
    out: RuleOutput = []
    if _wants(layer, "weight"):
        batch, length, shape = a.shape[0], a.shape[1], layer.weight.shape
        ag = a.reshape(batch, length, groups, -1).transpose(1, 2)  # (B, g, L, I/g)
        bg = b.reshape(batch, length, groups, -1).transpose(1, 2)  # (B, g, L, O/g)
        i_size, o_size = ag.shape[-1], bg.shape[-1]
        # Whichever takes fewer multiplications: the Gram matrices, L^2 (I + O) an example, or
        # the materialised gradient, L I O. The Gram matrices are float64, which made the ghost
        # norm up to twice as slow near the switch on a 2-core CPU (128 against 64 ms at
        # L (I + O) / (I O) = 2/3), but it keeps no I O per example: memory decides there.
        if length * (i_size + o_size) < i_size * o_size:
            out.append(ghost_weight(ag, bg, shape))
        else:
            grads = bg.transpose(-1, -2) @ ag  # (B, g, O/g, I/g)
            out.append(materialised("weight", grads))
    return out + _bias(layer, b)


def _one_position(layer: nn.Module, a: torch.Tensor, b: torch.Tensor) -> RuleOutput:
    """:func:`_matmul_rule` at one position, ``a`` (B, I) and ``b`` (B, O): a Linear on vectors.

    Example i's weight gradient :math:`b_i a_i^\\top` has squared norm
    :math:`\\lVert a_i \\rVert^2 \\lVert b_i \\rVert^2` and its bias gradient is :math:`b_i`, so the
    norms of ``b`` serve both; the clipped sums are one matrix product each.
    """
    b_squares = squared_norms(b)
    out: RuleOutput = []
    if _wants(layer, "weight"):
        flat = (b.shape[1], a.shape[1])  # a convolution's weight has more dimensions

        def add_weight(f: torch.Tensor, total: torch.Tensor) -> None:
            if total.is_contiguous():  # in place, with no product to allocate
                total.view(flat).addmm_((b * f[:, None]).t(), a)
            else:  # a channels_last convolution's weight, which cannot be viewed as (O, I)
                total.add_(((b * f[:, None]).t() @ a).view(total.shape))

        out.append(("weight", squared_norms(a) * b_squares, add_weight))
    if _wants(layer, "bias"):
        out.append(("bias", b_squares, lambda f, total: total.addmv_(b.t(), f)))
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


def _pad(a: torch.Tensor, conv: nn.Module, dims: int) -> torch.Tensor:
    """The input as the convolution sees it after its padding (any padding mode)."""
    pad = _explicit_padding(conv, dims)
    if not any(pad):
        return a
    return F.pad(a, pad, mode="constant" if conv.padding_mode == "zeros" else conv.padding_mode)


def _patches(a: torch.Tensor, conv: nn.Module, dims: int) -> torch.Tensor:
    """The patches of a padded input: shape ``(B, L, C_in * prod(kernel))``, L positions."""
    for axis, (k, s, d) in enumerate(
        zip(conv.kernel_size, conv.stride, conv.dilation, strict=True)
    ):
        a = a.unfold(2 + axis, d * (k - 1) + 1, s)
        if d > 1:
            a = a[..., ::d]
    # a: (B, C, *positions, *kernel), a view; one strided copy into rows of patches.
    batch = a.shape[0]
    positions = a.shape[2 : 2 + dims]
    order = [0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims)]
    return a.permute(order).reshape(batch, math.prod(positions), -1)


_CONV_CHUNK = 64
_GHOST_MEMORY_RATIO = 4


def _per_example_conv_weight(layer: nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Each example's weight gradient, shape (B, *weight.shape), from the padded input ``a``."""
    batch, dims = a.shape[0], a.ndim - 2
    # The weight argument gives only the shape; a contiguous one (not torch.nn.grad's expanded
    # one) makes oneDNN return the gradient without a reordering copy, a third of the time.
    return torch.ops.aten.convolution_backward(
        b.reshape(1, -1, *b.shape[2:]),
        a.reshape(1, -1, *a.shape[2:]),
        b.new_empty(batch * layer.out_channels, *layer.weight.shape[1:]),
        None,
        layer.stride,
        [0] * dims,
        layer.dilation,
        False,
        [0] * dims,
        batch * layer.groups,
        (False, True, False),
    )[1].view(batch, *layer.weight.shape)


@_rule(nn.Conv1d, nn.Conv2d)
def _conv(layer: nn.Module, a: torch.Tensor, b: torch.Tensor) -> RuleOutput:
    dims = a.ndim - 2
    a = _pad(a, layer, dims)
    batch, positions = a.shape[0], b[0, 0].numel()
    outputs = b.reshape(batch, b.shape[1], -1).transpose(1, 2)  # (B, L, C_out)
    i_size = layer.weight[0].numel()  # inputs of one output channel: C_in / groups * kernel
    o_size = layer.out_channels // layer.groups
    if not _wants(layer, "weight"):
        return _bias(layer, outputs)
    # The ghost norm needs the patch matrix (positions x inputs per example), whose strided copy
    # cost more on CPU than materialising (MNIST CNN's second convolution: 4.0 ms against 2.2 ms
    # a step). So it is used only where the per-example gradients would take several times its
    # memory: deep layers with many channels and few positions.
    if i_size * o_size > _GHOST_MEMORY_RATIO * positions * (i_size + o_size):
        return _matmul_rule(layer, _patches(a, layer, dims), outputs, groups=layer.groups)
    # Materialised: every example's weight gradient from a convolution backward with the examples
    # folded into the groups, so no patch matrix is built, in chunks of 64 examples. On CPU,
    # oneDNN is several times slower per example with hundreds of groups than with tens (35 ms
    # against 6 ms for 256 examples of a 64-to-64 3x3 convolution on 8x8 maps); 32 made the MNIST
    # CNN's step 5% slower and the CIFAR CNN's no faster. On a GPU, cuDNN's workspace grows with
    # the groups: the whole batch of 256 took the MNIST CNN's step to 25 MiB more than chunks of
    # 64 on an H200 (3 steps from a fresh start: 111 MiB of tensors, 26 more than a non-private
    # step, against Opacus ghost's 99), though it was faster (2.5 against 3.0 ms a step; the
    # CIFAR CNN 4.5 against 5.5 ms; Opacus's fastest mode took 3.5 and 5.8 ms).
    # The chunks are kept apart: one tensor of all of them is often too large for the allocator
    # to reuse, and writing a fresh one cost more than computing it (page faults).
    parts = [slice(start, start + _CONV_CHUNK) for start in range(0, batch, _CONV_CHUNK)]
    chunks = [_per_example_conv_weight(layer, a[part], b[part]) for part in parts]
    squares = torch.cat([squared_norms(g) for g in chunks])

    def add_to(f: torch.Tensor, total: torch.Tensor) -> None:
        for g, f_chunk in zip(chunks, f.split(_CONV_CHUNK), strict=True):
            add_weighted(total, f_chunk, g)

    return [("weight", squares, add_to), *_bias(layer, outputs)]


def _sort(keys: torch.Tensor, *, bound: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``keys.sort(stable=True)`` for integer keys in ``[0, bound)``: sorted keys, positions.

    On a CPU numpy sorts values alone several times faster than torch sorts with their positions
    (the 16,384 keys of the text benchmark: 120 against 310 us), so each position is packed into
    the low digits of its key and the packed values are sorted.
    """
    n = keys.numel()
    if keys.device.type != "cpu" or n == 0 or bound > torch.iinfo(torch.int64).max // n:
        return keys.sort(stable=True)
    packed = np.sort((keys * n + torch.arange(n)).numpy())
    return torch.from_numpy(packed // n), torch.from_numpy(packed % n)


@_rule(nn.Embedding)
def _embedding(layer: nn.Module, a: torch.Tensor, b: torch.Tensor) -> RuleOutput:
    if not _wants(layer, "weight"):
        return []
    batch = a.shape[0]
    vocabulary, width = layer.weight.shape
    tokens = a.reshape(-1)
    rows = b.reshape(-1, width)  # the output gradient at each position
    if layer.padding_idx is not None:  # torch gives the padding row no gradient
        rows = rows * (tokens != layer.padding_idx).unsqueeze(1)
    # Example i's gradient has row v = the sum of its output gradients at the positions holding
    # token v. Sorting the positions' (example, token) keys brings each pair's positions together.
    example = torch.arange(batch, device=a.device).repeat_interleave(a[0].numel())
    sorted_keys, order = _sort(tokens + vocabulary * example, bound=vocabulary * batch)
    repeats = sorted_keys[1:] == sorted_keys[:-1]  # positions holding the pair of the one before
    # On a GPU, every pair's rows are summed, with no count read back (each read waits for the
    # device): a row per position is allocated for the sums, and those past the last pair stay
    # zero, each under the key sorted to its place (adding zero to that example's norm and that
    # token's row; one key for all would make their atomic additions wait on one another).
    on_cpu = a.device.type == "cpu"
    if not on_cpu or 2 * int(repeats.sum()) > tokens.numel():
        # Most positions repeat a pair (a small vocabulary): sum the rows of every pair; the norms
        # and the total then take one summed row per pair in place of one row per position.
        if on_cpu:
            pairs, segment = torch.unique_consecutive(sorted_keys, return_inverse=True)
        else:
            segment = torch.zeros_like(sorted_keys)  # the pair of each sorted key
            segment[1:] = (~repeats).cumsum(0)
            pairs = sorted_keys.scatter(0, segment, sorted_keys)
        segment = torch.empty_like(segment).scatter_(0, order, segment)  # in position order
        summed = rows.new_zeros(pairs.shape[0], width).index_add_(0, segment, rows)
        pair_squares = squared_norms(summed)
        squares = pair_squares.new_zeros(batch).index_add_(0, pairs // vocabulary, pair_squares)
        single_mask = None
    else:
        # Few repeats: the squared norms of single positions, plus those of the row sums of the
        # pairs held at several positions.
        repeated = torch.zeros_like(order, dtype=torch.bool)
        repeated[1:] |= repeats
        repeated[:-1] |= repeats
        positions = order[repeated]
        single_mask = torch.ones_like(tokens, dtype=rows.dtype).index_fill_(0, positions, 0.0)
        squares = (squared_norms(rows) * single_mask).view(batch, -1).sum(dim=1)
        pairs, segment = torch.unique_consecutive(sorted_keys[repeated], return_inverse=True)
        summed = rows.new_zeros(pairs.shape[0], width).index_add_(0, segment, rows[positions])
        squares.index_add_(0, pairs // vocabulary, squared_norms(summed))

    # The total adds the rows as they were measured: single positions, and the pairs' sums. (Were
    # a pair's rows added one by one, rounding could take a pair whose rows cancel, and with it
    # its example, far past the norm measured.)
    def add_to(f: torch.Tensor, total: torch.Tensor) -> None:
        if single_mask is not None:
            total.index_add_(0, tokens, rows * (f[example] * single_mask)[:, None])
        total.index_add_(0, pairs % vocabulary, summed * f[pairs // vocabulary, None])

    return [("weight", squares, add_to)]


@_rule(nn.EmbeddingBag)
def _embedding_bag(layer: nn.Module, a: torch.Tensor, b: torch.Tensor) -> RuleOutput:
    """An EmbeddingBag on one bag per example (``a`` is (B, T); mode ``'max'`` goes to vmap) is an
    Embedding whose output gradient at each position of bag :math:`i` is :math:`b_i` (``'sum'``)
    or :math:`b_i / n_i` (``'mean'``, over the bag's :math:`n_i` tokens other than padding)."""
    weights = torch.ones_like(a, dtype=b.dtype)
    if layer.padding_idx is not None:  # the bag leaves padding out (its mean too)
        weights = weights.masked_fill(a == layer.padding_idx, 0.0)
    if layer.mode == "mean":
        weights = weights / weights.sum(dim=1, keepdim=True).clamp(min=1.0)
    return _embedding(layer, a, b[:, None, :] * weights[:, :, None])


@_rule(nn.LayerNorm)
def _layer_norm(layer: nn.Module, a: torch.Tensor, b: torch.Tensor) -> RuleOutput:
    # Per-example scale and shift gradients: sums over positions of (normalised input) * b and of
    # b, materialised (they are small). The normalised input is recomputed and multiplied in place.
    batch, shape = a.shape[0], layer.normalized_shape
    b = b.reshape(batch, -1, *shape)  # (B, positions, *normalized_shape)
    out = []
    if _wants(layer, "weight"):

        def chunk_grads(part: slice) -> torch.Tensor:
            normalised = F.layer_norm(a[part], shape, eps=layer.eps).reshape(b[part].shape)
            return normalised.mul_(b[part]).sum(dim=1)

        parts = example_chunks(batch, b[0].numel(), a.device)
        grads = torch.cat([chunk_grads(part) for part in parts])
        out.append(materialised("weight", grads))
    if _wants(layer, "bias"):
        out.append(materialised("bias", b.sum(dim=1)))
    return out


@_rule(nn.GroupNorm)
def _group_norm(layer: nn.Module, a: torch.Tensor, b: torch.Tensor) -> RuleOutput:
    # As for LayerNorm, with sums over each channel's positions.
    batch, channels = a.shape[:2]
    b = b.reshape(batch, channels, -1)
    out = []
    if _wants(layer, "weight"):

        def chunk_grads(part: slice) -> torch.Tensor:
            normalised = F.group_norm(a[part], layer.num_groups, eps=layer.eps)
            return normalised.reshape(b[part].shape).mul_(b[part]).sum(dim=2)

        parts = example_chunks(batch, b[0].numel(), a.device)
        grads = torch.cat([chunk_grads(part) for part in parts])
        out.append(materialised("weight", grads))
    if _wants(layer, "bias"):
        out.append(materialised("bias", b.sum(dim=2)))
    return out


def vmap_over_call(
    layer: nn.Module, a: torch.Tensor, b: torch.Tensor, output: torch.Tensor
) -> list[Entry] | None:
    r"""The rule of a layer without one: each example's gradients of the layer's own parameters,
    those of :math:`\langle \text{layer}(a_i), b_i \rangle`, by vmap over the layer's call alone,
    not over the whole model. The call is repeated from the input ``a`` the hooks kept, so it must
    give again the ``output`` they kept (to rounding: :math:`\sqrt{\epsilon}` of its largest
    finite entry; an infinite entry exactly). None if it does not (a random draw, state set from
    outside the call, a hook added since the plan, an input the call changed in place) or if vmap
    fails on it: the caller then takes vmap over the whole model, which assumes neither."""
    params = {n: p.detach() for n, p in layer.named_parameters(recurse=False) if p.requires_grad}

    def example(ai: torch.Tensor, bi: torch.Tensor) -> tuple[torch.Tensor, dict]:
        again, pull = vjp(lambda p: functional_call(layer, p, (ai.unsqueeze(0),)), params)
        return again.squeeze(0), pull(bi.unsqueeze(0))[0]

    try:
        again, grads = vmap(example, randomness="error")(a, b)
    except OutOfMemoryError:
        raise
    except Exception:  # vmap over the model says why, if it fails too
        return None
    if again.shape != output.shape:
        return None
    if output.numel():  # in place where it can be: an output's copies would set the step's peak
        largest = float(output.abs().nan_to_num_(nan=0.0, posinf=0.0).max())  # finite entries'
        same = again == output  # an infinite entry (-inf from a mask) must come back exactly
        same |= again.sub_(output).abs_() <= torch.finfo(output.dtype).eps ** 0.5 * largest
        if not bool(same.all()):
            return None
    return [materialised(n, g) for n, g in grads.items()]
