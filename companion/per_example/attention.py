r"""Per-example gradients of torch's ``MultiheadAttention``: its two projections as products.

Part of :mod:`companion.per_example`; import from there.

``MultiheadAttention`` holds its input projection as raw parameters (``in_proj_weight``,
``in_proj_bias``) and reads its ``out_proj``'s parameters without calling it, all inside one call
of ``F.multi_head_attention_forward``, into which hooks do not see. While the engine's hooks keep
a call, its ``forward`` is replaced, on the instance, by the same maths (:func:`attend`, as in
torch's documentation and Vaswani et al. 2017), written with two matrix products, each a
:class:`~companion.per_example.composite.Part`:

.. math::

    z^{in} = W_{in} a + b_{in}, \qquad
    \text{head}_j = \operatorname{softmax}\big(Q_j K_j^\top / \sqrt{d} + M\big) V_j, \qquad
    z^{out} = W_{out} [\text{head}_1, \dots, \text{head}_h] + b_{out},

with :math:`M` the masks (:math:`-\infty` where a bool mask is true). The input projection's
:math:`a` is the query, key and value inputs that are distinct tensors, concatenated along the
sequence (self-attention: the one input); :math:`Q`, :math:`K` and :math:`V` are the rows and
columns of :math:`z^{in}` that belong to their input and their third of :math:`W_{in}`. The output
gradient of :math:`z^{in}` is then zero outside those blocks, so example :math:`i`'s weight
gradient :math:`\sum_t (\partial L / \partial z^{in}_{i,t})^\top a_{i,t}` has each third of
:math:`W_{in}` computed from its own input, as torch's projections do. (With distinct inputs the
product computes all three thirds for each; self-attention computes what torch computes.)

A layer with ``add_bias_kv``, ``add_zero_attn`` or key and value sizes other than ``embed_dim``,
and a subclass, fall back to ``vmap`` over the model; so does a call without a batch dimension, or
with a mask torch's layer refuses (neither bool nor floating point, or of another shape).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from companion.per_example.composite import KINDS, Kept, Kind

__all__: list[str] = []


def _products(layer: nn.Module) -> list[tuple[str, str | None]]:
    """The input and output projections, if :func:`attend` computes the layer's maths."""
    same = layer.kdim == layer.embed_dim and layer.vdim == layer.embed_dim
    if not same or layer.bias_k is not None or layer.add_zero_attn:
        return []
    bias = layer.in_proj_bias is not None  # bias=False: neither projection has one
    return [
        ("in_proj_weight", "in_proj_bias" if bias else None),
        ("out_proj.weight", "out_proj.bias" if bias else None),
    ]


def _call(layer: nn.Module, named: dict[str, object], copy: bool) -> tuple[object, Kept] | None:
    return attend(layer, copy=copy, **named)


KINDS[nn.MultiheadAttention] = Kind(_products, _call)


def attend(
    layer: nn.Module,
    query: object,
    key: object,
    value: object,
    key_padding_mask: object = None,
    need_weights: bool = True,
    attn_mask: object = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
    *,
    copy: bool = False,
) -> tuple[object, Kept] | None:
    """The layer's output ``(attention output, weights or None)`` on a call, as torch returns it,
    and each projection's input and output by weight name; None for a call this does not compute
    (inputs without a batch dimension or of other sizes, masks torch's layer refuses).
    ``is_causal`` is a hint that ``attn_mask`` is causal, taken as torch's layer takes it: it
    needs the mask, and uses the hint alone where it can (no padding mask, no weights). With
    ``copy``, the output is a copy, not the output projection's own tensor."""
    inputs = (query, key, value)
    if not all(isinstance(t, torch.Tensor) and t.dim() == 3 and not t.is_nested for t in inputs):
        return None
    views: dict[int, torch.Tensor] = {}  # each distinct input, batch first: the query first
    for t in inputs:
        views.setdefault(id(t), t if layer.batch_first else t.transpose(0, 1))
    q, k, v = (views[id(t)] for t in inputs)
    distinct = list(views.values())
    batch, length, embed = q.shape
    if (
        {q.shape[0], k.shape[0], v.shape[0]} != {batch}
        or {q.shape[2], k.shape[2], v.shape[2]} != {layer.embed_dim}
        or k.shape[1] != v.shape[1]
    ):
        return None
    source = k.shape[1]
    shapes = [(length, source), (batch * layer.num_heads, length, source)], [(batch, source)]
    masks = attn_mask, key_padding_mask
    if not all(m is None or _takes(m, s) for m, s in zip(masks, shapes, strict=True)):
        return None
    if is_causal and attn_mask is None:  # torch's layer needs the mask too, and says so
        return None
    # As torch's layer: the hint alone, without the mask, where nothing is merged into it
    causal = is_causal and key_padding_mask is None and not need_weights
    mask = None  # what is added to the scores, (B, heads, T, S) or broadcast to it
    if attn_mask is not None and not causal:
        mask = _additive(attn_mask, q.dtype)
        mask = mask.view(batch, layer.num_heads, length, source) if mask.dim() == 3 else mask
    if key_padding_mask is not None:
        padding = _additive(key_padding_mask, q.dtype).view(batch, 1, 1, source)
        mask = padding if mask is None else mask + padding
    a = torch.cat(distinct, dim=1) if len(distinct) > 1 else q  # (B, T + ..., E)
    z_in = F.linear(a, layer.in_proj_weight, layer.in_proj_bias)
    rows = dict(zip(views, z_in.split([t.shape[1] for t in distinct], dim=1), strict=True))
    q, k, v = (rows[id(t)][..., j * embed : (j + 1) * embed] for j, t in enumerate(inputs))
    heads, weights = _heads(layer, q, k, v, mask, causal, need_weights, average_attn_weights)
    z_out = F.linear(heads, layer.out_proj.weight, layer.out_proj.bias)
    # torch's (T, B, E) output is contiguous
    output = z_out if layer.batch_first else z_out.transpose(0, 1).contiguous()
    output = output.clone() if copy else output
    kept = {"in_proj_weight": (a.detach(), z_in), "out_proj.weight": (heads.detach(), z_out)}
    return (output, weights), kept


def _takes(mask: object, shapes: list[tuple[int, ...]]) -> bool:
    """Whether torch's layer takes ``mask``: a bool or floating tensor of one of ``shapes``."""
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) not in shapes:
        return False
    return mask.dtype == torch.bool or mask.is_floating_point()


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``mask`` as a tensor of ``dtype`` to add to the scores: -inf where a bool one is True."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask, float("-inf")
        )
    return mask.to(dtype)


def _heads(
    layer: nn.Module,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool,
    need_weights: bool,
    average: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The heads' outputs side by side (B, T, E) from ``q`` (B, T, E), ``k`` and ``v`` (B, S, E),
    and the attention weights (after dropout, as torch's layer returns them) if ``need_weights``:
    averaged over the heads if ``average``. ``causal``: the mask is SDPA's causal one."""
    q, k, v = (t.unflatten(-1, (layer.num_heads, -1)).transpose(1, 2) for t in (q, k, v))
    dropout = layer.dropout if layer.training else 0.0
    if need_weights:
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        weights = (scores if mask is None else scores + mask).softmax(dim=-1)
        if dropout > 0.0:
            weights = F.dropout(weights, dropout)
        out = weights @ v
        weights = weights.mean(dim=1) if average else weights
    else:
        out = F.scaled_dot_product_attention(q, k, v, mask, dropout, is_causal=causal)
        weights = None
    return out.transpose(1, 2).flatten(2), weights
