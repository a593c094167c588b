r"""Per-example gradients of torch's recurrent layers (``RNN``, ``GRU``, ``LSTM``), step by step.

Part of :mod:`companion.per_example`; import from there.

torch runs a recurrent layer as one fused operation, into which neither hooks nor ``vmap`` see.
While the engine's hooks keep a call (:class:`~companion.per_example.layout.Capture`), the layer's
``forward`` is replaced, on the instance, by the same recurrence unrolled over the time steps
(:func:`unrolled`, the equations of torch's documentation). Every parameter of the layer is then a
weight or a bias of one of three matrix products, each a
:class:`~companion.per_example.composite.Part`:

.. math::

    z^{ih}_t = W_{ih} x_t + b_{ih}, \qquad z^{hh}_t = W_{hh} h_{t-1} + b_{hh}, \qquad
    h_t = W_{hr} m_t \text{ (an LSTM with proj\_size, } m_t = o_t \odot \tanh c_t),

one per layer and direction. Each is a ``Linear`` on a sequence: example :math:`i`'s weight gradient
is :math:`\sum_t (\partial L / \partial z_{i,t})^\top a_{i,t}` with :math:`a` the product's input
(:math:`x`, :math:`h_{t-1}` or :math:`m`) and its bias gradient :math:`\sum_t \partial L / \partial
z_{i,t}`, so the ``Linear`` rule (the ghost norm or the materialised gradient) computes it from the
inputs and output gradients of all steps at once. (Opacus's ``DPLSTM`` rewrites the layer with a
linear layer called at every step.) Each parameter is read once in the unrolled graph, so a layer
called twice or a weight read outside it is found as for any layer. A packed batch of sequences is
unrolled padded, each example keeping its state past its end (where its products' output gradients
are 0); a sequence without a batch dimension, as a batch of one. A subclass of these layers is
left to ``vmap`` over the model, which runs every layer whose ``forward`` is torch's own unrolled
too (:func:`unrolled_layers`): ``vmap`` cannot batch torch's fused RNN and GRU.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from companion._validation import warn
from companion.per_example.composite import KINDS, Kept, Kind

__all__: list[str] = []

#: The layers whose parts the rules take, by exact type (a subclass may compute something else).
RECURRENT = (nn.RNN, nn.GRU, nn.LSTM)


@contextlib.contextmanager
def unrolled_layers(model: nn.Module) -> Iterator[None]:
    """Within the block, every recurrent layer of ``model`` whose forward is torch's own (a
    parametrised one too) runs unrolled (:func:`unrolled`), which ``vmap`` can batch: torch's
    fused layers it cannot (RNN and GRU in PyTorch 2.x). A packed sequence still fails."""
    layers = [
        m
        for m in model.modules()
        if type(m).forward in {kind.forward for kind in RECURRENT} and "forward" not in vars(m)
    ]
    for layer in layers:
        layer.forward = functools.partial(_unrolled_or_own, layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def _unrolled_or_own(layer: nn.Module, *args: object, **kwargs: object) -> object:
    named = dict(zip(("input", "hx"), args, strict=False)) | kwargs  # also a subclass's call
    done = unrolled(layer, named.get("input"), named.get("hx"))
    return type(layer).forward(layer, *args, **kwargs) if done is None else done[0]


def _suffixes(layer: nn.Module) -> list[str]:
    """The suffixes of the parameter names of each layer and direction: ``_l0``, ``_l0_reverse``."""
    directions = ["", "_reverse"] if layer.bidirectional else [""]
    return [f"_l{k}{d}" for k in range(layer.num_layers) for d in directions]


def _products(layer: nn.Module) -> list[tuple[str, str | None]]:
    """The (weight, bias) names of the layer's matrix products: ``_ih`` and ``_hh`` per layer and
    direction, and an LSTM's projection ``_hr`` (no bias)."""
    found = []
    for s in _suffixes(layer):
        for kind in ("ih", "hh"):
            found.append((f"weight_{kind}{s}", f"bias_{kind}{s}" if layer.bias else None))
        if getattr(layer, "proj_size", 0):
            found.append((f"weight_hr{s}", None))
    return found


def _call(layer: nn.Module, named: dict[str, object], copy: bool) -> tuple[object, Kept] | None:
    return unrolled(layer, named["input"], named["hx"])  # no output is a product's


for _kind in RECURRENT:
    KINDS[_kind] = Kind(_products, _call)


#: The warning for a packed batch built with ``enforce_sorted=True``: sorted before the layer.
SORTED_PACK = (
    "a recurrent layer gets a packed batch built with enforce_sorted=True, so its sequences "
    "reach it sorted by length. If the model sorts its batch to pack it (and unsorts after), "
    "the per-layer rules read row i of the layer as example i's, and the checks of the first "
    "batches see the reordering only where it moves their first examples (not where they are "
    "of equal lengths): one example's gradient could then be clipped as another's. Pack with "
    "enforce_sorted=False and do not sort: torch sorts inside the layer, which the rules follow."
)


def unrolled(layer: nn.Module, x: torch.Tensor, hx: object) -> tuple[object, Kept] | None:
    """The layer's output on ``x`` (with initial state ``hx``) as torch returns it, computed step
    by step, and each product's input and output, by weight name; None if the call is not one
    this unrolls (neither a tensor of a batch or one sequence nor a packed batch, which torch's
    layer refuses too). The inputs are kept without a copy: the unrolled graph saves them for its
    backward pass, which raises if the model changes one in place after the call (torch's fused
    layer may let it)."""
    lstm = layer.mode == "LSTM"
    if isinstance(x, torch.Tensor) and x.dim() == 2:  # one sequence: a batch of one, then not
        batch_dim = 0 if layer.batch_first else 1
        if hx is not None:
            hx = tuple(h.unsqueeze(1) for h in hx) if lstm else hx.unsqueeze(1)
        (output, state), kept = unrolled(layer, x.unsqueeze(batch_dim), hx)
        state = tuple(h.squeeze(1) for h in state) if lstm else state.squeeze(1)
        return (output.squeeze(batch_dim), state), kept
    valid = None
    if isinstance(x, PackedSequence):  # padded, in the batch's order, as torch gives hx and h_n
        seq, lengths = pad_packed_sequence(x, batch_first=True)
        valid = (torch.arange(seq.shape[1]) < lengths[:, None]).to(seq.device)  # (B, T)
        if x.sorted_indices is None and bool((lengths != lengths[0]).any()):
            warn(SORTED_PACK)  # sorted, as a model that sorts its batch would give it
    elif isinstance(x, torch.Tensor) and x.dim() == 3:
        seq = x if layer.batch_first else x.transpose(0, 1)  # (B, T, features)
    else:
        return None
    batch, suffixes = seq.shape[0], _suffixes(layer)
    out_size = getattr(layer, "proj_size", 0) or layer.hidden_size
    if hx is None:
        h0 = seq.new_zeros(len(suffixes), batch, out_size)
        c0 = seq.new_zeros(len(suffixes), batch, layer.hidden_size) if lstm else None
    else:
        h0, c0 = hx if lstm else (hx, None)
    kept: Kept = {}
    inputs, finals, cells = seq, [], []
    directions = 2 if layer.bidirectional else 1
    for k in range(layer.num_layers):
        if k > 0 and layer.dropout and layer.training:
            inputs = F.dropout(inputs, layer.dropout, training=True)
        outputs = []
        for d in range(directions):
            index = k * directions + d
            c = c0[index] if lstm else None
            out, h, c = _direction(
                layer, suffixes[index], inputs, valid, h0[index], c, d == 1, kept
            )
            outputs.append(out)
            finals.append(h)
            cells.append(c)
        inputs = torch.cat(outputs, dim=2) if directions == 2 else outputs[0]
    if valid is not None:
        output = _packed_like(x, inputs, lengths)
    else:
        output = inputs if layer.batch_first else inputs.transpose(0, 1).contiguous()
    h_n = torch.stack(finals)
    return (output, (h_n, torch.stack(cells)) if lstm else h_n), kept


def _packed_like(
    packed: PackedSequence, padded: torch.Tensor, lengths: torch.Tensor
) -> PackedSequence:
    """The padded outputs (B, T, out), in the batch's order, packed as the input ``packed``."""
    if (order := packed.sorted_indices) is not None:  # longest first, as packed
        padded, lengths = padded[order], lengths[order.cpu()]
    data = pack_padded_sequence(padded, lengths, batch_first=True).data
    return PackedSequence(data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)


def _shift(bias: torch.Tensor | None, like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The bias of a product made step by step, expanded to ``shape`` (B, T, out): the gradient
    with respect to it is the product's output gradient at every step, in one tensor. Without a
    trainable bias, a zero that requires a gradient is added (made by a factory, as torch.func's
    transforms allow, not by ``requires_grad_``)."""
    if bias is None or not bias.requires_grad:
        zero = torch.zeros((), dtype=like.dtype, device=like.device, requires_grad=True)
        bias = zero if bias is None else bias.detach() + zero
    return bias.expand(shape)


def _direction(
    layer: nn.Module,
    s: str,
    inputs: torch.Tensor,
    valid: torch.Tensor | None,
    h: torch.Tensor,
    c: torch.Tensor | None,
    reverse: bool,
    kept: Kept,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One layer and direction over the sequence ``inputs`` (B, T, in), from state ``h`` (and the
    LSTM's cell ``c``): its outputs (B, T, out) and final state; each product's ``a`` and ``z``
    go into ``kept``. Each parameter is read once (a transpose, a linear, an expand). ``valid``
    (B, T) marks the steps within each sequence of a packed batch (None: all)."""
    batch, length = inputs.shape[:2]
    weight = getattr(layer, "weight_hh" + s)
    z_ih = F.linear(inputs, getattr(layer, "weight_ih" + s), getattr(layer, "bias_ih" + s, None))
    z_hh = _shift(getattr(layer, "bias_hh" + s, None), h, (batch, length, weight.shape[0]))
    w_hh = weight.t()
    projection = getattr(layer, "weight_hr" + s, None)
    if projection is not None:
        z_hr = _shift(None, h, (batch, length, projection.shape[0]))
        w_hr, m_steps, hr_steps = projection.t(), [None] * length, z_hr.unbind(1)
    ih_steps, hh_steps = z_ih.unbind(1), z_hh.unbind(1)
    previous, states = [None] * length, [None] * length
    for t in reversed(range(length)) if reverse else range(length):
        previous[t] = h
        new_h, new_c = _cell(layer, ih_steps[t], torch.addmm(hh_steps[t], h, w_hh), h, c)
        if projection is not None:
            m_steps[t] = new_h
            new_h = torch.addmm(hr_steps[t], new_h, w_hr)
        if valid is None:
            h, c, states[t] = new_h, new_c, new_h
        else:  # a packed sequence: past an example's end, its state stays and its output is 0
            keep = valid[:, t, None]
            h, states[t] = new_h.where(keep, h), new_h.where(keep, 0.0)
            c = new_c.where(keep, c) if c is not None else None
    kept["weight_ih" + s] = (inputs.detach(), z_ih)
    kept["weight_hh" + s] = (torch.stack(previous, dim=1).detach(), z_hh)
    if projection is not None:
        kept["weight_hr" + s] = (torch.stack(m_steps, dim=1).detach(), z_hr)
    return torch.stack(states, dim=1), h, c


def _cell(
    layer: nn.Module, z_x: torch.Tensor, z_h: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One step from the two products' outputs ``z_x`` and ``z_h`` and the state ``(h, c)``:
    the new state (an LSTM's before its projection), by the equations of torch's documentation."""
    if layer.mode == "LSTM":
        i, f, g, o = (z_x + z_h).chunk(4, dim=1)
        c = f.sigmoid() * c + i.sigmoid() * g.tanh()
        return o.sigmoid() * c.tanh(), c
    if layer.mode == "GRU":
        r_x, u_x, n_x = z_x.chunk(3, dim=1)
        r_h, u_h, n_h = z_h.chunk(3, dim=1)
        u = (u_x + u_h).sigmoid()
        n = (n_x + (r_x + r_h).sigmoid() * n_h).tanh()
        return n + u * (h - n), None  # (1 - u) n + u h
    pre = z_x + z_h
    return pre.tanh() if layer.nonlinearity == "tanh" else pre.relu(), None
