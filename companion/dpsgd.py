r"""Differentially private stochastic gradient descent (DP-SGD).

DP-SGD (Abadi, Chu, Goodfellow, McMahan, Mironov, Talwar and Zhang 2016, "Deep Learning with
Differential Privacy", ACM CCS 2016, Algorithm 1; building on Song, Chaudhuri and Sarwate 2013
and Bassily, Smith and Thakurta 2014) changes one step of SGD in three ways.

1. **Poisson sampling.** Each of the :math:`N` training examples joins the batch :math:`B`
   independently with probability :math:`q` (``sample_rate``), so the batch size is random,
   :math:`|B| \sim \mathrm{Binomial}(N, q)`, and may even be zero (:func:`poisson_sample`).
2. **Per-example clipping.** Every example's gradient :math:`g_i = \nabla_\theta
   \ell(\theta; x_i, y_i)` is computed separately (:func:`per_example_gradients`) and scaled to
   L2 norm at most :math:`C` (``max_grad_norm``), the norm taken over *all* parameters at once:

   .. math::
       :label: dpsgd-clip

       \bar g_i = g_i \cdot \min\Bigl(1, \frac{C}{\lVert g_i \rVert_2 + 10^{-6}}\Bigr)

   (the factor Opacus uses; the :math:`10^{-6}` guards against division by zero and keeps
   :math:`\lVert \bar g_i \rVert_2 < C`).
3. **Gaussian noise.** The clipped gradients are summed and Gaussian noise with standard deviation
   :math:`\sigma C` is added to every coordinate (``noise_multiplier`` is :math:`\sigma`):

   .. math::
       :label: dpsgd-noise

       \tilde g = \frac{1}{qN}\Bigl(\sum_{i \in B} \bar g_i + \mathcal N(0, \sigma^2 C^2 I)\Bigr),
       \qquad \theta \leftarrow \theta - \eta\, \tilde g .

Why these choices:

- *Sensitivity.* Under add/remove neighbouring (one data set has one more example), the clipped
  sum :math:`\sum_{i \in B} \bar g_i` changes by exactly one term, whose norm is at most
  :math:`C`: its L2 sensitivity is :math:`C`, whatever the model and the data. Noise of standard
  deviation :math:`\sigma C` therefore makes each step a Gaussian mechanism with noise
  multiplier :math:`\sigma` (noise std divided by sensitivity).
- *Normalisation by the expected batch size.* The sum is divided by :math:`qN`, a public
  constant, not by the realised :math:`|B|`: the realised size depends on whether a given
  person's example was drawn, so dividing by it would change the sensitivity analysis. (An
  empty batch is no special case: the step still adds the noise and divides by :math:`qN`.)
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

Two ways of computing the clipped sum, with identical results (the tests check it):

- ``method="vmap"``: per-example gradients with :mod:`torch.func` (``functional_call``,
  ``grad``, ``vmap``), then :func:`clip_and_sum`. Works for any model whose forward pass treats
  examples independently.
- ``method="layerwise"``: one forward and one backward pass capture each layer's input
  :math:`a_i` and the gradient :math:`b_i` of the summed loss with respect to its output; the
  per-example gradient of a linear layer is the outer product :math:`b_i a_i^\top`, so its
  squared norm is :math:`\lVert b_i \rVert^2 \lVert a_i \rVert^2` and the clipped sum is the
  single matrix product :math:`\sum_i f_i b_i a_i^\top = (f \odot b)^\top a` ("ghost" norms,
  Goodfellow 2015, "Efficient Per-Example Gradient Computations"; Li, Tramèr, Liang and
  Hashimoto 2022). Convolutions are unfolded into the same form (the "hooks" method of Opacus,
  Yousefpour et al. 2021). Supported for :class:`torch.nn.Sequential` models of ``Linear``,
  ``Conv2d`` and parameter-free layers (every model in :mod:`companion.models`); ``"auto"``
  takes it when it applies and falls back to ``"vmap"`` otherwise.

.. warning::

    This is a teaching implementation. Its noise comes from torch's pseudo-random generator,
    which is not a cryptographically secure source, and it is floating-point Gaussian noise,
    whose low-order bits can leak information (Mironov 2012, "On Significance of the Least
    Significant Bits for Differential Privacy"). For real deployments use Opacus
    (https://opacus.ai), which has a secure random mode, validates models more thoroughly and is
    maintained for production; the keyword names here follow Opacus.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from companion._validation import (
    check_delta,
    check_fraction,
    check_nonnegative,
    check_positive,
    check_positive_int,
)
from companion.accounting import RDPAccountant
from companion.per_example import clip_factors
from companion._random import torch_generator
from companion import _torch
from companion._torch import (
    progress_loop,
    ArrayLike,
    LossName,
    check_data,
    check_loss,
    check_model,
    check_optional_test,
    epoch_record,
    loss_fn,
    trainable,
)

__all__ = [
    "check_dp_compatible",
    "clip_and_sum",
    "clipped_gradient_sum",
    "dp_sgd_step",
    "per_example_gradients",
    "add_gaussian_noise",
    "poisson_sample",
    "train_dpsgd",
]

LossLike = LossName | Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Method = Literal["auto", "vmap", "layerwise"]
_METHODS = ("auto", "vmap", "layerwise")



# --- validation ---------------------------------------------------------------------------------


def check_dp_compatible(model: nn.Module) -> None:
    """Raise if ``model`` cannot be trained with DP-SGD as implemented here.

    DP-SGD needs each example's gradient to depend on that example alone. Batch normalisation
    breaks this (it normalises by statistics of the whole batch, and its running statistics are
    un-noised averages of the training data), as does instance normalisation with
    ``track_running_stats=True`` (its running statistics average over the batch). Replace them
    with :class:`torch.nn.GroupNorm` or :class:`torch.nn.LayerNorm`.

    Layers written by hand that mix examples (for instance subtracting a batch mean) cannot be
    detected by inspecting the modules; the ``"vmap"`` method still computes true per-example
    gradients for them, but their forward pass no longer matches the analysis.

    Raises:
        TypeError: if ``model`` is not a :class:`torch.nn.Module`.
        ValueError: if it contains a batch-normalisation layer, an instance-normalisation layer
            tracking running statistics, or no trainable parameter.
    """
    model = check_model(model)
    for name, module in model.named_modules():
        where = f"layer {name!r}" if name else "the model"
        if isinstance(module, _BatchNorm):
            raise ValueError(
                f"{where} is a {type(module).__name__}: batch normalisation mixes the examples "
                "of a batch, so per-example gradients and the DP-SGD guarantee do not hold. "
                "Replace it with torch.nn.GroupNorm or torch.nn.LayerNorm."
            )
        if isinstance(module, _InstanceNorm) and module.track_running_stats:
            raise ValueError(
                f"{where} is a {type(module).__name__} with track_running_stats=True: its running "
                "statistics average over the batch. Use track_running_stats=False or GroupNorm."
            )
    trainable(model)


def _check_noise_multiplier(noise_multiplier: object) -> float:
    return check_nonnegative("noise_multiplier", noise_multiplier)


def _check_generator(generator: object) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator (e.g. torch.Generator().manual_seed(0)), got "
            f"{type(generator).__name__}."
        )
    return generator


def _check_method(method: object) -> str:
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}.")
    return str(method)


def _resolve_loss(
    loss_fn: object,
) -> tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None]:
    """``(mean loss, summed loss or None)``; the summed form is known only for named losses."""
    if isinstance(loss_fn, str):
        name = check_loss(loss_fn)
        return _torch.loss_fn(name, "mean"), _torch.loss_fn(name, "sum")
    if callable(loss_fn):
        return loss_fn, None
    raise TypeError(
        "loss_fn must be 'cross_entropy', 'bce' or a callable (outputs, targets) -> mean loss, "
        f"got {type(loss_fn).__name__}."
    )


# --- per-example gradients with torch.func ------------------------------------------------------


def per_example_gradients(
    model: nn.Module, loss_fn: LossLike, x: torch.Tensor, y: torch.Tensor
) -> dict[str, torch.Tensor]:
    r"""The gradient of each example's loss, for every trainable parameter, with :mod:`torch.func`.

    For a batch of :math:`B` examples this returns :math:`g_i = \nabla_\theta
    \ell(\theta; x_i, y_i)` for :math:`i = 1, \dots, B`, computed by vectorising (``vmap``) the
    gradient (``grad``) of the loss of a *single* example, evaluated through
    ``functional_call(model, params, x_i[None])``. Because each example goes through the model
    as a batch of one, the result is a true per-example gradient whatever the model does.

    Args:
        model: the model; its parameters are read, not changed.
        loss_fn: ``"cross_entropy"``, ``"bce"``, or a callable ``(outputs, targets)`` returning
            the *mean* loss of a batch (such as ``torch.nn.CrossEntropyLoss()``); it is applied
            to batches of one example.
        x: inputs, shape ``(B, ...)``; ``B`` may be 0.
        y: targets, shape ``(B, ...)``.

    Returns:
        A dict from parameter name (as in ``model.named_parameters()``, trainable parameters
        only) to a tensor of shape ``(B, *param.shape)``.
    """
    model = check_model(model)
    mean_loss, _ = _resolve_loss(loss_fn)
    _check_batch(x, y)
    return _vmap_gradients(model, mean_loss, x, y)


def _vmap_gradients(
    model: nn.Module,
    mean_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
) -> dict[str, torch.Tensor]:
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    if x.shape[0] == 0:
        return {name: p.new_zeros((0, *p.shape)) for name, p in params.items()}
    frozen = {name: p.detach() for name, p in model.named_parameters() if not p.requires_grad}
    frozen.update(model.named_buffers())

    def example_loss(params: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        outputs = functional_call(model, (params, frozen), (xi.unsqueeze(0),))
        return mean_loss(outputs, yi.unsqueeze(0))

    return vmap(grad(example_loss), in_dims=(None, 0, 0), randomness="different")(params, x, y)


def _check_batch(x: object, y: object) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError("x and y must be torch tensors (see companion.training.to_tensors).")
    if x.ndim == 0 or y.ndim == 0 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"x and y must hold the same number of examples along their first dimension, got "
            f"shapes {tuple(x.shape)} and {tuple(y.shape)}."
        )


# --- clipping -----------------------------------------------------------------------------------




def clip_and_sum(
    per_example_grads: dict[str, torch.Tensor],
    *,
    max_grad_norm: float,
    return_norms: bool = False,
) -> dict[str, torch.Tensor] | tuple[dict[str, torch.Tensor], torch.Tensor]:
    r"""Clip every example's gradient to norm at most ``max_grad_norm`` and sum over the batch.

    The norm of example :math:`i` is taken over all parameters together,
    :math:`\lVert g_i \rVert_2 = \bigl(\sum_{p} \lVert g_i^{(p)} \rVert_2^2\bigr)^{1/2}`, and
    the result is :math:`\sum_i g_i \min(1, C / (\lVert g_i \rVert_2 + 10^{-6}))`, whose L2
    sensitivity under adding or removing one example is at most :math:`C`.

    Args:
        per_example_grads: dict name -> tensor of shape ``(B, *param.shape)``, as returned by
            :func:`per_example_gradients`.
        max_grad_norm: the clipping norm :math:`C`, > 0.
        return_norms: also return the per-example norms *before* clipping.

    Returns:
        A dict name -> summed clipped gradient of shape ``param.shape``; with ``return_norms``,
        the pair ``(sums, norms)`` where ``norms`` has shape ``(B,)``.
    """
    max_grad_norm = check_positive("max_grad_norm", max_grad_norm)
    if not isinstance(per_example_grads, dict) or not per_example_grads:
        raise TypeError("per_example_grads must be a non-empty dict of name -> tensor (B, ...).")
    grads = list(per_example_grads.values())
    batch = grads[0].shape[0] if grads[0].ndim else -1
    if any(not isinstance(g, torch.Tensor) or g.ndim == 0 or g.shape[0] != batch for g in grads):
        raise ValueError("every per-example gradient must be a tensor with the same batch size first.")
    norms = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g.reshape(batch, math.prod(g.shape[1:])), dim=1) for g in grads]), dim=0
    )
    factors = clip_factors(norms, max_grad_norm=max_grad_norm)
    sums = {name: torch.tensordot(factors, g, dims=1) for name, g in per_example_grads.items()}
    return (sums, norms) if return_norms else sums


# --- the layerwise (ghost-norm) path ------------------------------------------------------------

# Parameter-free layers that act on each example separately and deterministically.
_PER_EXAMPLE_LAYERS = (
    nn.Identity, nn.Flatten, nn.Unflatten,
    nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Softplus,
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
)  # fmt: skip


def _layerwise_plan(model: nn.Module) -> list[tuple[str, nn.Module]] | str:
    """The ``Linear``/``Conv2d`` layers of ``model`` if the layerwise path applies, else why not."""
    layers: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()
    for name, module in model.named_modules(remove_duplicate=False):
        kind = type(module)
        if id(module) in seen and kind is not nn.Sequential:
            return f"layer {name!r} is used more than once"
        seen.add(id(module))
        if kind is nn.Sequential:
            continue
        if kind is nn.Linear:
            layers.append((name, module))
        elif kind is nn.Conv2d:
            if module.groups != 1 or module.padding_mode != "zeros" or module.padding == "same":
                return f"Conv2d {name!r} has groups, a non-zero padding mode or padding='same'"
            layers.append((name, module))
        elif kind in _PER_EXAMPLE_LAYERS:
            if getattr(module, "inplace", False):
                return f"layer {name!r} works in place"
        else:
            return f"layer {name!r} ({kind.__name__}) is not supported by the layerwise method"
    planned = [id(p) for _, m in layers for p in m.parameters()]
    if len(planned) != len(set(planned)):
        return "some parameters are shared between layers"
    if any(id(p) not in set(planned) for p in model.parameters()):
        return "some parameters do not belong to a Linear or Conv2d layer"
    return layers


def _unfold(a: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """The patches a ``Conv2d`` sees: shape ``(B, L, C_in * kh * kw)``, L output positions."""
    padding = (0, 0) if conv.padding == "valid" else conv.padding
    if conv.dilation != (1, 1):
        return F.unfold(a, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride).transpose(1, 2)
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, padding
    if ph or pw:
        a = F.pad(a, (pw, pw, ph, ph))
    patches = a.unfold(2, kh, sh).unfold(3, kw, sw)  # (B, C, H', W', kh, kw), a view
    batch, channels, rows, cols = patches.shape[:4]
    # One strided copy; torch's im2col loops over the examples and is several times slower.
    return patches.permute(0, 2, 3, 1, 4, 5).reshape(batch, rows * cols, channels * kh * kw)


def _layerwise_clipped_sum(
    model: nn.Module,
    layers: list[tuple[str, nn.Module]],
    sum_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    max_grad_norm: float,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    r"""Clipped per-example gradient sum and per-example norms from one forward/backward pass.

    For a layer with input :math:`a_i` and output gradient :math:`b_i` of example :math:`i`, the
    weight gradient is :math:`b_i^\top a_i` where, for a ``Linear`` layer on (B, in) inputs,
    :math:`a_i` and :math:`b_i` are rows, and for a convolution (or a ``Linear`` layer on
    sequences) they are matrices with one row per output position :math:`t = 1..L` (unfolded
    patches). Its squared norm is computed either from the materialised per-example gradient,
    or without it from Gram matrices (the "ghost norm"):
    :math:`\lVert b_i^\top a_i \rVert_F^2 = \langle a_i a_i^\top, b_i b_i^\top \rangle`,
    whichever takes fewer multiplications. The clipped sum :math:`\sum_i f_i b_i^\top a_i` is
    one matrix product over all rows of the batch.
    """
    captured: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        captured[module] = (inputs[0], output)

    handles = [module.register_forward_hook(keep) for _, module in layers]
    try:
        outputs = model(x)
    finally:
        for handle in handles:
            handle.remove()
    active = [(name, m) for name, m in layers if m in captured and captured[m][1].requires_grad]
    output_grads = torch.autograd.grad(
        sum_loss(outputs, y), [captured[m][1] for _, m in active], allow_unused=True
    )
    batch = x.shape[0]
    with torch.no_grad():
        squares: list[torch.Tensor] = []
        # (parameter name, how to form its clipped sum from the clipping factors f)
        summers: list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = []
        for (name, module), b in zip(active, output_grads, strict=True):
            prefix = f"{name}." if name else ""
            a = captured[module][0].detach()
            if b is None:
                b = torch.zeros_like(captured[module][1])
            wants_weight = module.weight.requires_grad
            wants_bias = module.bias is not None and module.bias.requires_grad
            if isinstance(module, nn.Linear) and a.ndim == 2:
                b_squares = b.square().sum(dim=1)
                if wants_weight:
                    squares.append(b_squares * a.square().sum(dim=1))
                    summers.append((prefix + "weight", lambda f, a=a, b=b: torch.mm((b * f[:, None]).t(), a)))
                if wants_bias:
                    squares.append(b_squares)
                    summers.append((prefix + "bias", lambda f, b=b: torch.mv(b.t(), f)))
                continue
            if isinstance(module, nn.Linear):  # (B, ..., in): one row per position
                a = a.reshape(batch, -1, a.shape[-1])
                b = b.reshape(batch, -1, b.shape[-1])
            else:
                a = _unfold(a, module)
                b = b.flatten(2).transpose(1, 2)
            positions, fan_in, fan_out = a.shape[1], a.shape[2], b.shape[2]
            if wants_weight:
                shape = module.weight.shape
                if positions * (fan_in + fan_out) < fan_in * fan_out:  # ghost norm is cheaper
                    gram_a = torch.bmm(a, a.transpose(1, 2))
                    gram_b = torch.bmm(b, b.transpose(1, 2))
                    squares.append((gram_a * gram_b).flatten(1).sum(dim=1))
                    summers.append((
                        prefix + "weight",
                        lambda f, a=a, b=b, shape=shape: torch.mm(
                            (b * f[:, None, None]).reshape(-1, b.shape[2]).t(), a.reshape(-1, a.shape[2])
                        ).reshape(shape),
                    ))  # fmt: skip
                else:
                    per_example = torch.bmm(b.transpose(1, 2), a).reshape(batch, -1)
                    squares.append(torch.linalg.vector_norm(per_example, dim=1).square())
                    summers.append((
                        prefix + "weight",
                        lambda f, g=per_example, shape=shape: torch.mv(g.t(), f).reshape(shape),
                    ))  # fmt: skip
            if wants_bias:
                per_example_bias = b.sum(dim=1)
                squares.append(per_example_bias.square().sum(dim=1))
                summers.append((prefix + "bias", lambda f, g=per_example_bias: torch.mv(g.t(), f)))
        norms = torch.stack(squares).sum(dim=0).sqrt_() if squares else x.new_zeros(batch)
        factors = clip_factors(norms, max_grad_norm=max_grad_norm)
        sums = {key: summer(factors) for key, summer in summers}
    for name, p in model.named_parameters():  # layers the forward pass did not reach
        if p.requires_grad and name not in sums:
            sums[name] = torch.zeros_like(p)
    return sums, norms


def clipped_gradient_sum(
    model: nn.Module,
    loss_fn: LossLike,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    max_grad_norm: float,
    method: Method = "auto",
    return_norms: bool = False,
) -> dict[str, torch.Tensor] | tuple[dict[str, torch.Tensor], torch.Tensor]:
    r"""The sum of the clipped per-example gradients of a batch, by either method.

    ``method="vmap"`` is :func:`per_example_gradients` followed by :func:`clip_and_sum`.
    ``method="layerwise"`` gets the same numbers from one forward and one backward pass (see the
    module docstring); it needs a named loss (``"cross_entropy"`` or ``"bce"``, whose summed form
    is known) and a :class:`torch.nn.Sequential` of ``Linear``, ``Conv2d`` and parameter-free
    layers, and raises ``ValueError`` otherwise. ``method="auto"`` uses ``"layerwise"`` where it
    applies and ``"vmap"`` elsewhere.

    Args:
        model: the model; its parameters are read, not changed.
        loss_fn: ``"cross_entropy"``, ``"bce"`` or a callable returning the mean loss of a batch.
        x, y: a batch of inputs and targets (the batch may be empty).
        max_grad_norm: the clipping norm :math:`C`, > 0.
        method: ``"auto"``, ``"vmap"`` or ``"layerwise"``.
        return_norms: also return the per-example gradient norms before clipping.

    Returns:
        Like :func:`clip_and_sum`: dict name -> summed clipped gradient (trainable parameters),
        and with ``return_norms`` the per-example norms as well.
    """
    model = check_model(model)
    mean_loss, sum_loss = _resolve_loss(loss_fn)
    _check_batch(x, y)
    max_grad_norm = check_positive("max_grad_norm", max_grad_norm)
    method = _check_method(method)
    sums, norms = _clipped_sum(model, mean_loss, sum_loss, x, y, max_grad_norm, _plan(model, sum_loss, method))
    return (sums, norms) if return_norms else sums


def _plan(
    model: nn.Module, sum_loss: Callable[..., torch.Tensor] | None, method: str
) -> list[tuple[str, nn.Module]] | None:
    """The layerwise plan if that method is to be used, None for vmap; raise if impossible."""
    if method == "vmap":
        return None
    reason = "loss_fn is a callable (use 'cross_entropy' or 'bce')" if sum_loss is None else None
    plan = _layerwise_plan(model) if reason is None else reason
    if isinstance(plan, str):
        if method == "layerwise":
            raise ValueError(f"method='layerwise' does not apply: {plan}; use method='vmap'.")
        return None
    return plan


def _clipped_sum(
    model: nn.Module,
    mean_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    sum_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
    x: torch.Tensor,
    y: torch.Tensor,
    max_grad_norm: float,
    plan: list[tuple[str, nn.Module]] | None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    if x.shape[0] == 0:
        sums = {name: torch.zeros_like(p) for name, p in model.named_parameters() if p.requires_grad}
        return sums, x.new_zeros(0)
    if plan is not None:
        assert sum_loss is not None
        return _layerwise_clipped_sum(model, plan, sum_loss, x, y, max_grad_norm)
    grads = _vmap_gradients(model, mean_loss, x, y)
    sums, norms = clip_and_sum(grads, max_grad_norm=max_grad_norm, return_norms=True)
    return sums, norms


# --- sampling and the DP-SGD step ---------------------------------------------------------------


def poisson_sample(n: int, *, sample_rate: float, generator: torch.Generator) -> torch.Tensor:
    r"""A Poisson-sampled batch: each of ``n`` examples is included independently with prob. q.

    Returns a boolean mask of shape ``(n,)``; select the batch from in-memory tensors with
    ``x[mask]``, ``y[mask]``. The batch size is :math:`\mathrm{Binomial}(n, q)`: random, with
    mean :math:`qn`, and possibly 0 (an empty batch is a valid DP-SGD step: it releases only
    noise). Masking tensors in memory is much cheaper than a ``DataLoader`` for small models.

    Args:
        n: number of examples, >= 1.
        sample_rate: inclusion probability :math:`q`, in (0, 1]; ``q = 1`` takes everyone.
        generator: a :class:`torch.Generator`; the draw is reproducible from its seed.
    """
    n = check_positive_int("n", n)
    sample_rate = check_fraction("sample_rate", sample_rate)
    generator = _check_generator(generator)
    return _poisson_mask(n, sample_rate, generator)


def _poisson_mask(n: int, sample_rate: float, generator: torch.Generator) -> torch.Tensor:
    # torch.rand is uniform on [0, 1), so q = 1 includes every example.
    return torch.rand(n, generator=generator, device=generator.device) < sample_rate


def dp_sgd_step(
    model: nn.Module,
    x_batch: torch.Tensor,
    y_batch: torch.Tensor,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: float,
    lr: float,
    generator: torch.Generator,
    loss_fn: LossLike = "cross_entropy",
    method: Method = "auto",
) -> torch.Tensor:
    r"""One DP-SGD step on a (Poisson-sampled) batch; updates ``model`` in place.

    Computes the clipped per-example gradient sum (:func:`clipped_gradient_sum`), adds
    :math:`\mathcal N(0, \sigma^2 C^2)` noise to each coordinate, divides by
    ``expected_batch_size`` (:math:`qN`, not the realised batch size) and takes an SGD step
    :math:`\theta \leftarrow \theta - \eta \tilde g`, eq. :eq:`dpsgd-noise`. An empty batch is
    allowed: the step then moves the parameters by noise alone. The noise for all trainable
    parameters is one draw of a standard normal vector from ``generator`` (in the order of
    ``model.named_parameters()``), scaled by :math:`\sigma C`; with :math:`\sigma = 0` nothing
    is drawn.

    Args:
        model: the model to update; must pass :func:`check_dp_compatible`.
        x_batch, y_batch: the batch (tensors; the batch may be empty).
        noise_multiplier: :math:`\sigma`, >= 0 (0 gives no privacy; for tests).
        max_grad_norm: the clipping norm :math:`C`, > 0.
        expected_batch_size: :math:`qN`, > 0.
        lr: learning rate :math:`\eta`, > 0.
        generator: the :class:`torch.Generator` the noise is drawn from.
        loss_fn: ``"cross_entropy"``, ``"bce"`` or a callable returning a batch's mean loss.
        method: how per-example gradients are handled: ``"auto"``, ``"vmap"`` or
            ``"layerwise"`` (see :func:`clipped_gradient_sum`).

    Returns:
        The per-example gradient norms before clipping, shape ``(B,)``.
    """
    check_dp_compatible(model)
    mean_loss, sum_loss = _resolve_loss(loss_fn)
    _check_batch(x_batch, y_batch)
    noise_multiplier = _check_noise_multiplier(noise_multiplier)
    max_grad_norm = check_positive("max_grad_norm", max_grad_norm)
    expected_batch_size = check_positive("expected_batch_size", expected_batch_size)
    lr = check_positive("lr", lr)
    generator = _check_generator(generator)
    plan = _plan(model, sum_loss, _check_method(method))
    return _dp_sgd_step(
        model, x_batch, y_batch, mean_loss, sum_loss, plan,
        noise_multiplier, max_grad_norm, expected_batch_size, lr, generator,
    )  # fmt: skip


def _dp_sgd_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    mean_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    sum_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
    plan: list[tuple[str, nn.Module]] | None,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: float,
    lr: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """The step without argument checks (the loop checks once)."""
    sums, norms = _clipped_sum(model, mean_loss, sum_loss, x, y, max_grad_norm, plan)
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    with torch.no_grad():
        if noise_multiplier > 0:
            _add_noise(sums, noise_multiplier * max_grad_norm, generator)
        step = -lr / expected_batch_size
        for name, p in params:
            p.add_(sums[name], alpha=step)
    return norms


def add_gaussian_noise(
    sums: dict[str, torch.Tensor], *, std: float, generator: torch.Generator
) -> None:
    r"""Add :math:`\mathcal N(0, \text{std}^2)` to every coordinate of ``sums``, in place.

    The noise for all entries is one draw of a standard normal vector from ``generator``, in the
    order of the dict, so a run is reproducible from the generator's seed (which must then stay
    secret: whoever knows it can subtract the noise). DP-SGD noises the clipped gradient sum this
    way and DP-FedAvg (:func:`companion.federated.dp_fedavg`) the sum of clipped client updates.

    Args:
        sums: dict name -> tensor, changed in place; all on one device, one floating dtype.
        std: the noise standard deviation, >= 0 (for DP-SGD :math:`\sigma C`).
        generator: the :class:`torch.Generator` the noise is drawn from.

    Raises:
        TypeError: if ``generator`` is not a :class:`torch.Generator` or ``sums`` not a dict of
            tensors.
        ValueError: if ``std`` is negative or not finite.

    Example:
        >>> import torch
        >>> sums = {"w": torch.zeros(2, 2), "b": torch.zeros(2)}
        >>> add_gaussian_noise(sums, std=1.0, generator=torch.Generator().manual_seed(0))
        >>> sums["w"].shape, bool(sums["b"].abs().sum() > 0)
        (torch.Size([2, 2]), True)
    """
    std = check_nonnegative("std", std)
    generator = _check_generator(generator)
    if not isinstance(sums, dict) or not all(isinstance(v, torch.Tensor) for v in sums.values()):
        raise TypeError("sums must be a dict of name -> torch.Tensor.")
    _add_noise(sums, std, generator)


def _add_noise(sums: dict[str, torch.Tensor], std: float, generator: torch.Generator) -> None:
    if std == 0 or not sums:
        return
    first = next(iter(sums.values()))
    total = sum(t.numel() for t in sums.values())
    noise = torch.randn(total, generator=generator, device=generator.device, dtype=first.dtype)
    noise = noise.to(first.device)
    start = 0
    for value in sums.values():
        size = value.numel()
        value.add_(noise[start : start + size].view_as(value), alpha=std)
        start += size


# --- the training loop --------------------------------------------------------------------------


def train_dpsgd(
    model: nn.Module,
    x: ArrayLike,
    y: ArrayLike,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    sample_rate: float,
    epochs: int,
    lr: float,
    delta: float,
    x_test: ArrayLike | None = None,
    y_test: ArrayLike | None = None,
    seed: int = 0,
    loss: LossName = "cross_entropy",
    method: Method = "auto",
    progress: bool = True,
) -> list[dict[str, Any]]:
    r"""Train ``model`` in place with DP-SGD and account for the privacy spent.

    Every epoch takes :math:`\mathrm{round}(1/q)` steps; each step draws a Poisson batch
    (:func:`poisson_sample`) from one :class:`torch.Generator` seeded with ``seed``, calls
    :func:`dp_sgd_step` with expected batch size :math:`qN`, and records one step of the
    sampled Gaussian mechanism in a :class:`companion.accounting.RDPAccountant`. After each
    epoch the accountant converts the Rényi-DP spent so far into epsilon at ``delta``.

    Choose ``delta`` well below :math:`1/N`: a mechanism that publishes one random example in
    full is :math:`(0, 1/N)`-DP, so :math:`\delta \ge 1/N` permits that (a ``UserWarning``
    says so).

    Args:
        model: the model to train; must pass :func:`check_dp_compatible`.
        x: training inputs, shape ``(N, n_features)`` (tensor or numpy array).
        y: training labels, shape ``(N,)``.
        noise_multiplier: :math:`\sigma`, >= 0 (0 means no privacy: epsilon is infinite).
        max_grad_norm: the clipping norm :math:`C`, > 0.
        sample_rate: :math:`q`, in (0, 1].
        epochs: number of epochs, >= 1.
        lr: learning rate, > 0.
        delta: the delta at which epsilon is reported, in (0, 1).
        x_test, y_test: optional held-out data, evaluated after every epoch.
        seed: seed of the sampling and noise generator (the initial weights come from the
            model's own seed).
        loss: ``"cross_entropy"`` or ``"bce"``.
        method: ``"auto"``, ``"vmap"`` or ``"layerwise"`` (see :func:`clipped_gradient_sum`).
        progress: show a tqdm progress bar over the epochs.

    Returns:
        One dict per epoch, with keys ``"epoch"``, ``"steps"`` (DP steps so far),
        ``"epsilon"`` (spent so far, at ``delta``), ``"delta"``, ``"clipped_fraction"`` (the
        share of per-example gradients of the epoch whose norm exceeded :math:`C`),
        ``"train_loss"`` and ``"train_accuracy"`` on the whole training set, and
        ``"test_loss"`` and ``"test_accuracy"`` if test data were given. Only the model is
        protected by the guarantee: the recorded training-set statistics are computed from
        the raw data and are for the reader's monitoring only.

    Example:
        >>> from companion import data, models
        >>> digits = data.load_digits()
        >>> history = train_dpsgd(models.mlp(), digits.x_train, digits.y_train,
        ...     noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=256 / 1347, epochs=5,
        ...     lr=1.0, delta=1e-5, progress=False)  # doctest: +SKIP
        >>> history[-1]["epsilon"]  # doctest: +SKIP
        7.88...
    """
    check_dp_compatible(model)
    loss = check_loss(loss)
    x, y = check_data(x, y, loss=loss)
    test_data = check_optional_test(x_test, y_test, loss=loss)
    noise_multiplier = _check_noise_multiplier(noise_multiplier)
    max_grad_norm = check_positive("max_grad_norm", max_grad_norm)
    sample_rate = check_fraction("sample_rate", sample_rate)
    epochs = check_positive_int("epochs", epochs)
    lr = check_positive("lr", lr)
    delta = check_delta(delta)
    generator = torch_generator(seed)
    method = _check_method(method)
    n = x.shape[0]
    if delta >= 1 / n:
        warnings.warn(
            f"delta={delta} is not below 1/n = {1 / n:.3g}; a delta this large allows releasing "
            "an example in the clear. Choose delta well below 1/n.",
            UserWarning,
            stacklevel=2,
        )
    mean_loss, sum_loss = _resolve_loss(loss)
    plan = _plan(model, sum_loss, method)
    steps_per_epoch = max(1, round(1 / sample_rate))
    expected_batch_size = sample_rate * n
    accountant = RDPAccountant()

    history: list[dict[str, Any]] = []
    model.train()
    for epoch in progress_loop(
        epochs, history=history, desc="DP-SGD", unit="epoch", progress=progress
    ):
        clipped = torch.zeros((), dtype=torch.long)
        seen = 0
        for _ in range(steps_per_epoch):
            mask = _poisson_mask(n, sample_rate, generator)
            norms = _dp_sgd_step(
                model, x[mask], y[mask], mean_loss, sum_loss, plan,
                noise_multiplier, max_grad_norm, expected_batch_size, lr, generator,
            )  # fmt: skip
            accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
            clipped += (norms > max_grad_norm).sum()
            seen += norms.shape[0]
        record = {"epoch": epoch, "steps": epoch * steps_per_epoch}
        record["epsilon"] = accountant.get_epsilon(delta)
        record["delta"] = delta
        record["clipped_fraction"] = float(clipped) / seen if seen else 0.0
        record.update(epoch_record(model, epoch, (x, y), test_data, loss))
        history.append(record)
    return history
