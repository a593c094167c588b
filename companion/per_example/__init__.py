r"""Per-example gradients, clipping and the clipped gradient sum of DP-SGD.

DP-SGD clips every example's gradient :math:`g_i` to L2 norm at most :math:`C`, the norm taken over
all trainable parameters at once, and sums:

.. math::
    :label: per-example-clipped-sum

    \sum_{i \in B} g_i \min\Bigl(1, \frac{C}{\lVert g_i \rVert_2 + 10^{-6}}\Bigr)

(the factor Opacus uses, :func:`clip_factors`). This module computes that sum in two ways, with the
same result (the tests check both against a plain loop over examples):

- ``method="vmap"``: every example's gradient with :mod:`torch.func` (``functional_call``,
  ``grad``, ``vmap``), then :func:`clip_and_sum`. Works for any model whose forward pass treats
  examples independently, at the price of materialising :math:`B` copies of the gradient.
- ``method="layerwise"``: hooks on the layers capture, in one forward and one backward pass, each
  layer's input :math:`a_i` and the gradient :math:`b_i` of the summed loss with respect to its
  output. A table of per-layer rules (``LAYER_RULES``, one small function per layer type, the
  pattern of Opacus's ``register_grad_sampler``) turns them into each example's squared gradient
  norm and, once the clipping factors :math:`f_i` are known, into the clipped sum, without a second
  backward pass ("book-keeping", Bu, Wang, Zha and Karypis 2023, "Differentially Private
  Optimization on Large Model at Small Cost", ICML). The rule of a layer above another, whose
  per-example gradients take no more room than its input and output gradient (a LayerNorm), runs
  as soon as the backward pass reaches the layer's output, so that those are freed before the pass
  ends. For a linear layer the per-example weight gradient is :math:`b_i^\top a_i` (rows of
  :math:`a_i, b_i` are positions of a sequence or an image), whose squared norm is either computed
  from the materialised product or, without it, from Gram matrices,
  :math:`\langle a_i a_i^\top, b_i b_i^\top \rangle` (the "ghost norm", Goodfellow 2015; Li,
  Tramèr, Liang and Hashimoto 2022): for a linear layer whichever costs fewer multiplications,
  for a convolution the materialised gradients (from a convolution backward, without the patch
  matrix the Gram matrices need) unless they would take over four times the memory; the clipped
  sum is then one matrix product :math:`(f \odot b)^\top a`.

The rules cover ``Linear`` (also on sequences), ``Conv1d`` and ``Conv2d`` (groups, dilation, strides
and every padding mode), ``Embedding``, ``EmbeddingBag`` (one bag per example, a ``(B, T)`` input;
modes ``"sum"`` and ``"mean"``), ``LayerNorm`` and ``GroupNorm``, anywhere in a module tree: custom
:class:`torch.nn.Module` subclasses are fine. ``RNN``, ``GRU`` and ``LSTM`` (several layers,
bidirectional, with projections, an initial state, either layout, padded or packed sequences) are
unrolled step by step while the hooks keep their call, which makes each of their weights that of a
``Linear`` on the sequence (``companion/per_example/recurrent.py``); ``vmap`` runs them unrolled
too, as it cannot batch torch's fused ``RNN`` and ``GRU``. Likewise ``MultiheadAttention`` (self- or
cross-attention, masks, either layout; not ``add_bias_kv``, ``add_zero_attn`` or other key and value
sizes) is computed with its input and output projections as two ``Linear`` layers on sequences
(``companion/per_example/attention.py``), so torch's ``TransformerEncoderLayer`` and
``TransformerDecoderLayer`` take the rules throughout, in either layout. A layer of
another type that holds parameters but no other layer and no hooks (``PReLU``, a layer you wrote)
has a rule too: ``vmap`` over its own call, from the input and output gradient the hooks keep, when
that call takes one tensor and returns one. The call is repeated from the kept input, and must give
the kept output again: one that reads more than its input (a random draw, state its parent sets, a
hook added later) or changes its input in place falls back as below, from the batch that shows it.
``method="auto"`` (the default) uses the rules where they apply and computes the gradients of the
remaining trainable parameters (those held by a layer that also holds other layers, with a sublayer
it reads without calling it, such as a ``MultiheadAttention`` subclass's ``out_proj``; those of a
layer whose parameters the loss's autograd graph reads other than once, by the layer's last call: a
layer called twice, a tied output head ``h @ embedding.weight.t()``) with ``vmap`` over the whole
model, for those parameters only, and says which. The rules read a layer's input and output with the
examples along dimension 0, one row each, or for a ``Linear``, ``Embedding`` or ``LayerNorm`` along
dimension 1 as well (a sequence laid out ``(T, B, F)``, as torch's transformer layers take it by
default); a layer called on another layout (a batch flattened to ``(B*T, F)``, a ``(T, B, F)``
sequence into a layer of another type) falls back to ``vmap`` too, and so does a layer called on a
batch reordered around it (``x.flip(0)``, a sort, undone after the layer). Every batch's shapes are
checked, and a clipper's first three batches of two examples or more are checked in their autograd
graph, which also shows along which dimension a layer holds the examples: for each bit of an
example's index, the losses of the examples with that bit set, and of those without it, must reach
no row of a layer's output outside their set (:math:`2 \lceil \log_2 n \rceil` more backward passes
on the first :math:`n \le 8` examples, each example's loss weighted by a random factor so that reads
cannot cancel; exact zeros, so neither rounding, identical examples nor the model's random draws
matter). A row whose gradient is 0 (under a head initialised to 0) shows no read: a batch counts
only once every row it checked has been seen read, in it or an earlier batch, and after 12 checked
batches with the parameters changed in between, a layer with a row never seen read moves to
``vmap`` (and a warning says if an input was never seen read: its mixing is then not fully
checked). A read through weights that are 0 while the checks run (another example's input read
through a head initialised to 0) is not seen. A layer that fails moves to ``vmap`` for the
clipper's life, and so does one that the checks show on both layouts, or whose batch fits both (as
many examples as positions) where no check has settled which dimension holds its examples. A
reordering or layout that depends on the data (a sort by length) or on the batch's size, or a
reordering that leaves the first 8 examples in place (a roll by 8), is found only if a checked
batch shows it: a model that reorders its batch should use ``method="vmap"``, and one that sorts it
to pack it for a recurrent layer (which vmap cannot take) should pack with ``enforce_sorted=False``
instead (a batch packed sorted gets a warning). Random layers such as ``Dropout`` draw other masks
in ``vmap``'s forward pass than in the rules' one, so where a layer takes vmap over the model an
example's gradient may mix two draws; it is still clipped as a whole, which is what the guarantee
needs. Under :class:`torch.autocast` the clipped sum is computed with autocast switched off, in the
parameters' own dtype.

.. note::

    Both methods assume that the forward pass treats examples independently: example :math:`i`'s
    output depends on example :math:`i`'s input alone. Batch normalisation breaks this, and
    :func:`check_dp_compatible` refuses it. A hand-written forward that mixes examples (a batch
    mean, attention across the batch) breaks it too, and then neither the gradients nor the DP
    guarantee hold; the checks of the first batches refuse it where the first 8 examples' losses
    read each other's inputs, and :func:`check_examples_independent`, which they run too (as
    does :func:`companion.dpsgd.train_dpsgd`), where the first 4 examples' outputs change when
    they are run alone in evaluation mode (mixing that autograd does not show: token ids, a
    ``detach``, a branch on the batch's size). Neither proves independence. A callable loss must
    be the *mean over examples* of a per-example loss (as :class:`torch.nn.CrossEntropyLoss` and
    :class:`torch.nn.MSELoss` with their default ``reduction="mean"`` are); a weighted mean is
    not. A gradient hook on a trainable parameter (``Tensor.register_hook``) is
    refused: the per-example gradients would skip it. So is a forward pass that changes a
    parameter's values (a layer that initialises itself from its first batch, as Glow's ActNorm
    does): the data it reads would reach the weights with no noise. It is seen on the first
    batches, where such a layer initialises itself; one that writes only later is not. The
    clipper turns gradients on for its own passes (it works under a caller's
    ``torch.no_grad()``), but nothing can in ``torch.inference_mode()``, which is refused.

See the DP-SGD chapter, :ref:`sec-dpsgd-per-example`, for the derivation with pictures.
"""

# attention and recurrent register the layers they compute as products (composite.KINDS)
from companion.per_example import attention, recurrent  # noqa: F401
from companion.per_example.checks import check_dp_compatible, check_examples_independent
from companion.per_example.engine import PerExampleClipper, clipped_gradient_sum
from companion.per_example.gradients import (
    ClippedSum,
    clip_and_sum,
    clip_factors,
    per_example_gradients,
)
from companion.per_example.rules import LAYER_RULES

__all__ = [
    "LAYER_RULES",
    "ClippedSum",
    "PerExampleClipper",
    "check_dp_compatible",
    "check_examples_independent",
    "clip_and_sum",
    "clip_factors",
    "clipped_gradient_sum",
    "per_example_gradients",
]
