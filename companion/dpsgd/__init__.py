r"""Differentially private stochastic gradient descent (DP-SGD).

DP-SGD (Abadi, Chu, Goodfellow, McMahan, Mironov, Talwar and Zhang 2016, "Deep Learning with
Differential Privacy", ACM CCS 2016, Algorithm 1; building on Song, Chaudhuri and Sarwate 2013
and Bassily, Smith and Thakurta 2014) changes one step of SGD in three ways.

1. **Poisson sampling.** Each of the :math:`N` training examples joins the batch :math:`B`
   independently with probability :math:`q` (``sample_rate``), so the batch size is random,
   :math:`|B| \sim \mathrm{Binomial}(N, q)`, and may even be zero (:func:`poisson_sample`).
2. **Per-example clipping.** Every example's gradient :math:`g_i = \nabla_\theta
   \ell(\theta; x_i, y_i)` is computed separately
   (:func:`~companion.per_example.per_example_gradients`) and scaled to L2 norm at most
   :math:`C` (``max_grad_norm``), the norm taken over *all* parameters at once:

   .. math::
       :label: dpsgd-clip

       \bar g_i = g_i \cdot \min\Bigl(1, \frac{C}{\lVert g_i \rVert_2 + 10^{-6}}\Bigr)

   (the factor Opacus uses; the :math:`10^{-6}` guards against division by zero and keeps
   :math:`\lVert \bar g_i \rVert_2 < C` up to rounding). Where the norm is measured on the
   vector that is added, rounding can take it above :math:`C` by a relative amount of order the
   unit roundoff :math:`u` of the parameters' dtype: :math:`6 \cdot 10^{-8}` in float32, but
   :math:`5 \cdot 10^{-4}` in float16 and :math:`4 \cdot 10^{-3}` in bfloat16, where a clipped
   gradient can be 0.4% longer than :math:`C` (the noise then covers a sensitivity that much
   above :math:`C`, as would a noise multiplier that much smaller). On the ghost-norm path of
   :mod:`companion.per_example` (a ``Linear`` on sequences, a wide convolution) the norm comes
   from Gram matrices, summed in float64 (float32 on Apple's ``mps``, which has no float64), and
   an example whose norm is below 1/100 of its bound :math:`\sum_s \lVert a_s \rVert \lVert b_s
   \rVert` (:math:`a_s` the layer's input and :math:`b_s` its output gradient at each of
   :math:`L` positions), where the Gram matrices' rounding could hide its true norm, is measured
   again on its gradient, materialised in float64 (as when its positions are duplicates read as
   a difference); that vector is the one added. For the other examples the vector added, a
   different product computed in float32 or wider, can exceed :math:`C` by a relative amount of
   order :math:`100 L u` (float32's :math:`u`), far less in practice. ``method="vmap"`` measures
   every norm on the vector it adds.
3. **Gaussian noise.** The clipped gradients are summed and Gaussian noise with standard deviation
   :math:`\sigma C` is added to every coordinate (``noise_multiplier`` is :math:`\sigma`):

   .. math::
       :label: dpsgd-noise

       \tilde g = \frac{1}{qN}\Bigl(\sum_{i \in B} \bar g_i + \mathcal N(0, \sigma^2 C^2 I)\Bigr),
       \qquad \theta \leftarrow \theta - \eta\, \tilde g .

Why these choices:

- *Sensitivity.* Under add/remove neighbouring (one data set has one more example), the clipped
  sum :math:`\sum_{i \in B} \bar g_i` changes by exactly one term, whose norm is at most
  :math:`C`: its L2 sensitivity is :math:`C`, whatever the model and the data, for a forward
  pass that treats the examples of a batch independently (see :mod:`companion.per_example`,
  whose checks of that catch mistakes but prove nothing; a forward pass that mixes examples in
  training mode, by batch statistics or a batch mean that gradients flow through, is refused
  where the check of the first batches sees it, for floating-point inputs, and only there; one
  that mixes them only through a detached statistic may not be detected (the check of the
  outputs sees it only where it changes the first examples' outputs in evaluation mode) and
  voids the guarantee, as a buffer written from the data does where the check of the first
  examples misses it). Noise of standard deviation
  :math:`\sigma C` therefore makes each step a Gaussian mechanism with noise multiplier
  :math:`\sigma` (noise std divided by sensitivity).
- *Normalisation by a constant.* The sum is divided by ``expected_batch_size``, a number fixed
  before seeing the data, not by the realised :math:`|B|`: the realised size depends on whether
  a given person's example was drawn, so dividing by it would change the sensitivity analysis.
  Its default in :func:`train_dpsgd`, :math:`qN`, depends on the data-set size :math:`N`, which
  differs between neighbours under add/remove: using it treats :math:`N` as public, as Opacus
  does. (An empty batch is no special case: the step still adds the noise and divides.)
- *Poisson sampling is what the accountant assumes.* The privacy amplification by subsampling
  that :class:`companion.accounting.RDPAccountant` computes (Mironov, Talwar and Zhang 2019,
  "Rényi Differential Privacy of the Sampled Gaussian Mechanism") is for the Poisson-subsampled
  Gaussian mechanism. Shuffling the data into fixed-size batches, as a
  :class:`torch.utils.data.DataLoader` does, is a different mechanism, and using the Poisson
  accountant for it can understate epsilon considerably (Chua et al. 2024, "How Private are
  DP-SGD Implementations?"). :func:`train_dpsgd` samples as the accountant assumes.

What is protected is the sequence of noisy gradients, hence the model weights (by
post-processing). Quantities computed from the raw data outside the mechanism, such as the
training accuracy that :func:`train_dpsgd` records for the reader, are not covered.

The clipped sum is computed by :mod:`companion.per_example` (per-layer rules with hooks on any
module tree; ``vmap`` for layers without a rule, for layers a batch shows to be called more
than once or to share a parameter, and for layers whose input does not hold one row per
example). The step's phases are public, so the code the book prints is the code that runs:
:func:`poisson_sample`, :func:`add_gaussian_noise`, :func:`noisy_clipped_gradient` (the heart of
a step), :func:`set_private_gradients` (its result written into ``.grad``: write your own loop
with any :class:`torch.optim.Optimizer`), :func:`dp_sgd_step` and the loop :func:`train_dpsgd`.

See the DP-SGD chapter, :ref:`sec-dpsgd-algorithm`, for the derivation and runs.

.. warning::

    This is a teaching implementation. Its noise comes from torch's pseudo-random generator,
    which is not a cryptographically secure source, and it is floating-point Gaussian noise,
    whose low-order bits can leak information (Mironov 2012, "On Significance of the Least
    Significant Bits for Differential Privacy"). For real deployments use Opacus
    (https://opacus.ai), which has a secure random mode, validates models more thoroughly and is
    maintained for production. The keyword names here follow Opacus where Opacus has the idea
    (``noise_multiplier``, ``max_grad_norm``, ``sample_rate``, ``target_epsilon``, ``epochs``).
    The differences, for a port in either direction:

    - ``delta`` is both the delta that epsilon is reported at and Opacus's ``target_delta``.
    - ``accountant`` is an accountant object, not a name. The name that
      :func:`companion.accounting.get_noise_multiplier` takes is ``"rdp"`` or ``"pld"``; use
      ``"pld"`` where Opacus has ``"prv"`` (both discretise privacy-loss distributions;
      :mod:`companion.accounting.pld` says how they differ).
      Its ``orders`` are Opacus's ``alphas``.
    - ``seed`` seeds the run's generator, which draws both the batches and the noise. Opacus's
      ``noise_generator`` covers the noise only: without ``secure_mode`` its Poisson sampler
      draws from the data loader's own ``generator``, which is torch's global generator unless
      the loader was given one.
    - ``method`` (``"auto"``, ``"vmap"``, ``"layerwise"``) plays the role of Opacus's
      ``grad_sample_mode`` (``"hooks"``, ``"functorch"``, ``"ghost"``, ...).
    - ``expected_batch_size`` defaults to ``sample_rate * N``. Opacus divides by
      ``int(N * (1 / k))``, where ``k`` is the number of batches of its private loader: that is
      ``int(N * q)``, except in an epoch one step short (below), where ``k = n - 1`` for ``n``
      batches (``N = 5942`` in 93 batches of 64: 64, not ``int(5942 / 93) = 63``).
    - ``epochs`` means ``epochs * round(1/q)`` steps. Opacus's loader takes ``int(1/q)`` steps an
      epoch, and ``make_private_with_epsilon`` plans for ``int(epochs / q)``; in floating point
      either can fall one step short (``int(1 / (1 / 93))`` is 92, ``int(3 / (1 / 75))`` is 224),
      so Opacus may plan for another number of steps than its loader takes.

    Opacus options with no counterpart here, and what to do instead:

    - per-layer or adaptive clipping (``clipping="per_layer"``, ``"adaptive"``): clipping here
      is flat, one norm over all parameters at once;
    - ``loss_reduction="sum"``: a callable ``loss`` must return the mean over the examples; a
      loss that sums is refused;
    - ``poisson_sampling=False``: sampling is always Poisson, because the accountant assumes it;
    - ``BatchMemoryManager``: the whole Poisson batch is processed at once. Lower
      ``sample_rate``, or split a large batch yourself: add up
      :func:`~companion.per_example.clipped_gradient_sum` over its parts, add the noise once
      (:func:`add_gaussian_noise`, standard deviation :math:`\sigma C`) and divide by
      ``expected_batch_size``. (:func:`set_private_gradients` adds fresh noise at every call,
      so it cannot be called on the parts.)
    - ``secure_mode``: none; the noise is not cryptographically secure (see above).
"""

from companion.dpsgd.loop import train_dpsgd
from companion.dpsgd.step import (
    add_gaussian_noise,
    dp_sgd_step,
    gaussian_noise,
    noisy_clipped_gradient,
    poisson_sample,
    set_private_gradients,
)

# The clipping functions moved to companion.per_example; importing them from here still works.
from companion.per_example import (  # noqa: F401
    ClippedSum,
    check_dp_compatible,
    clip_and_sum,
    clip_factors,
    clipped_gradient_sum,
    per_example_gradients,
)

__all__ = [
    "add_gaussian_noise",
    "dp_sgd_step",
    "gaussian_noise",
    "noisy_clipped_gradient",
    "poisson_sample",
    "set_private_gradients",
    "train_dpsgd",
]
