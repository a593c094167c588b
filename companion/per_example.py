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
  output. A table of per-layer rules (:data:`LAYER_RULES`, one small function per layer type, the
  pattern of Opacus's ``register_grad_sampler``) turns them into each example's squared gradient
  norm and, once the clipping factors :math:`f_i` are known, into the clipped sum, without a
  second backward pass ("book-keeping", Bu, Wang, Zha and Karypis 2023, "Differentially Private
  Optimization on Large Model at Small Cost", ICML). For a linear layer the per-example weight
  gradient is :math:`b_i^\top a_i` (rows of :math:`a_i, b_i` are positions of a sequence or
  an image), whose squared norm is either computed from the materialised product or, without
  it, from Gram matrices, :math:`\langle a_i a_i^\top, b_i b_i^\top \rangle` (the "ghost norm",
  Goodfellow 2015; Li, Tramèr, Liang and Hashimoto 2022), whichever costs fewer multiplications;
  the clipped sum is then one matrix product :math:`(f \odot b)^\top a`.

The rules cover ``Linear`` (also on sequences), ``Conv1d`` and ``Conv2d`` (groups, dilation,
strides and every padding mode), ``Embedding``, ``LayerNorm`` and ``GroupNorm``, anywhere in a
module tree: custom :class:`torch.nn.Module` subclasses are fine. ``method="auto"`` (the default)
uses the rules where they apply and computes the gradients of the remaining trainable parameters
(those held directly by layers without a rule, or by a layer called twice in one forward pass)
with ``vmap``, for those parameters only, and says which once.

.. note::

    Both methods assume that the forward pass treats examples independently: example :math:`i`'s
    output depends on example :math:`i`'s input alone. Batch normalisation breaks this, and
    :func:`check_dp_compatible` refuses it, but a hand-written forward that mixes examples (a
    batch mean, attention across the batch) cannot be detected, and then neither the gradients
    nor the DP guarantee hold. A callable loss must be the *mean over examples* of a per-example
    loss (as :class:`torch.nn.CrossEntropyLoss` and :class:`torch.nn.MSELoss` with their default
    ``reduction="mean"`` are); a weighted mean is not.

See the DP-SGD chapter, :ref:`sec-dpsgd-per-example`, for the derivation with pictures.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from companion import _torch
from companion._torch import LossFn, LossName, check_model, trainable_named
from companion._validation import check_positive

__all__ = [
    "LAYER_RULES",
    "ClippedSum",
    "PerExampleClipper",
    "check_dp_compatible",
    "clip_and_sum",
    "clip_factors",
    "clipped_gradient_sum",
    "per_example_gradients",
]

LossLike = LossName | LossFn
Method = Literal["auto", "vmap", "layerwise"]
_METHODS = ("auto", "vmap", "layerwise")
_CLIP_EPS = 1e-6  # as in Opacus: factor = min(1, C / (norm + 1e-6))


class ClippedSum(NamedTuple):
    """The clipped per-example gradient sum of a batch and the norms before clipping."""

    sums: dict[str, torch.Tensor]
    """Parameter name -> summed clipped gradient, of the parameter's shape."""
    norms: torch.Tensor
    """Each example's gradient norm before clipping, shape ``(B,)``."""


# --- checks -------------------------------------------------------------------------------------


def check_dp_compatible(model: nn.Module) -> None:
    """Raise if ``model`` cannot be trained with DP-SGD, naming every offending layer at once.

    DP-SGD needs each example's gradient to depend on that example alone. Batch normalisation
    breaks this (it normalises by statistics of the whole batch, and its running statistics are
    un-noised averages of the training data), as do instance normalisation with
    ``track_running_stats=True`` (its running statistics average over the batch) and an
    ``Embedding`` with ``scale_grad_by_freq=True`` (it scales gradients by word counts over the
    batch). Replace normalisation with :class:`torch.nn.GroupNorm` or
    :class:`torch.nn.LayerNorm`. Layers written by hand that mix examples cannot be detected.

    Args:
        model: the model to check.

    Raises:
        TypeError: if ``model`` is not a :class:`torch.nn.Module`.
        ValueError: listing every layer above, or if the model has no trainable parameter.

    Example:
        >>> from torch import nn
        >>> check_dp_compatible(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU(),
        ...                                   nn.Linear(3, 2), nn.BatchNorm1d(2)))
        Traceback (most recent call last):
        ...
        ValueError: model cannot be trained with DP-SGD: layer '1' is a BatchNorm1d; layer '4' is a BatchNorm1d. ...
    """
    model = check_model(model)
    problems = []
    for name, module in model.named_modules():
        where = f"layer {name!r}" if name else "the model"
        kind = type(module).__name__
        if isinstance(module, _BatchNorm):
            problems.append(f"{where} is a {kind}")
        elif isinstance(module, _InstanceNorm) and module.track_running_stats:
            problems.append(f"{where} is a {kind} with track_running_stats=True")
        elif isinstance(module, nn.Embedding) and module.scale_grad_by_freq:
            problems.append(f"{where} is an Embedding with scale_grad_by_freq=True")
    if problems:
        raise ValueError(
            f"model cannot be trained with DP-SGD: {'; '.join(problems)}. These layers mix the "
            "examples of a batch (batch normalisation normalises by batch statistics and its "
            "running statistics average the training data), so per-example gradients and the "
            "DP-SGD guarantee do not hold. Replace batch or instance normalisation with "
            "torch.nn.GroupNorm or torch.nn.LayerNorm (or track_running_stats=False), and use "
            "scale_grad_by_freq=False."
        )
    trainable_named(model)


def _check_method(method: object) -> str:
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}.")
    return str(method)


def _resolve_loss(loss: object) -> tuple[LossFn, LossFn]:
    """``(mean loss, summed loss)``; a callable's summed form is its mean times the batch size."""
    if isinstance(loss, str):
        name = _torch.check_loss(loss)
        return _torch.loss_fn(name, "mean"), _torch.loss_fn(name, "sum")
    if callable(loss):
        return loss, lambda outputs, targets: loss(outputs, targets) * outputs.shape[0]
    raise TypeError(
        "loss must be 'cross_entropy', 'bce' or a callable (outputs, targets) -> mean loss over "
        f"the examples, got {type(loss).__name__}."
    )


def _check_batch(x: object, y: object) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError("x and y must be torch tensors (see companion.training.to_tensors).")
    if x.ndim == 0 or y.ndim == 0 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"x and y must hold the same number of examples along their first dimension, got "
            f"shapes {tuple(x.shape)} and {tuple(y.shape)}."
        )


# --- per-example gradients with torch.func ------------------------------------------------------


def per_example_gradients(
    model: nn.Module, loss: LossLike, x: torch.Tensor, y: torch.Tensor
) -> dict[str, torch.Tensor]:
    r"""The gradient of each example's loss, for every trainable parameter, with :mod:`torch.func`.

    For a batch of :math:`B` examples this returns :math:`g_i = \nabla_\theta \ell(\theta; x_i,
    y_i)`, computed by vectorising (``vmap``) the gradient (``grad``) of the loss of a *single*
    example, evaluated through ``functional_call(model, params, x_i[None])``.

    Args:
        model: the model; its parameters are read, not changed.
        loss: ``"cross_entropy"``, ``"bce"``, or a callable ``(outputs, targets)`` returning the
            *mean* loss of a batch (such as ``torch.nn.CrossEntropyLoss()``); it is applied to
            batches of one example.
        x: inputs, shape ``(B, ...)``; ``B`` may be 0.
        y: targets, shape ``(B, ...)``.

    Returns:
        A dict from parameter name (as in ``model.named_parameters()``, trainable parameters
        only) to a tensor of shape ``(B, *param.shape)``.

    Raises:
        TypeError: if ``model`` is not a module, ``x`` or ``y`` not a tensor, ``loss`` neither a
            known name nor a callable.
        ValueError: if ``x`` and ``y`` hold different numbers of examples or the loss is unknown.

    Example:
        >>> import torch
        >>> from companion import models
        >>> grads = per_example_gradients(models.logistic_regression(), "cross_entropy",
        ...                               torch.zeros(3, 64), torch.tensor([0, 1, 2]))
        >>> {name: tuple(g.shape) for name, g in grads.items()}
        {'0.weight': (3, 10, 64), '0.bias': (3, 10)}
    """
    model = check_model(model)
    mean_loss, _ = _resolve_loss(loss)
    _check_batch(x, y)
    names = [name for name, _ in trainable_named(model)]
    return _vmap_gradients(model, mean_loss, x, y, names)


def _vmap_gradients(
    model: nn.Module, mean_loss: LossFn, x: torch.Tensor, y: torch.Tensor, names: list[str]
) -> dict[str, torch.Tensor]:
    """Per-example gradients of the parameters ``names``; all others are held fixed."""
    wanted = set(names)
    params = {name: p.detach() for name, p in model.named_parameters() if name in wanted}
    if x.shape[0] == 0:
        return {name: p.new_zeros((0, *p.shape)) for name, p in params.items()}
    frozen = {name: p.detach() for name, p in model.named_parameters() if name not in wanted}
    frozen.update(model.named_buffers())

    def example_loss(params: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        outputs = functional_call(model, (params, frozen), (xi.unsqueeze(0),))
        return mean_loss(outputs, yi.unsqueeze(0))

    return vmap(grad(example_loss), in_dims=(None, 0, 0), randomness="different")(params, x, y)


# --- clipping -----------------------------------------------------------------------------------


def clip_factors(norms: torch.Tensor, *, max_grad_norm: float) -> torch.Tensor:
    r"""The factors :math:`\min(1, C / (\lVert g_i \rVert + 10^{-6}))` that clip each norm to C.

    Args:
        norms: per-example (or per-client) L2 norms, any shape.
        max_grad_norm: the clipping norm :math:`C`, > 0.

    Returns:
        A tensor of the shape of ``norms``; ``factor * norm <= C`` everywhere.

    Raises:
        ValueError: if ``max_grad_norm`` is not a finite number > 0.

    Example:
        >>> import torch
        >>> clip_factors(torch.tensor([0.5, 4.0]), max_grad_norm=1.0)
        tensor([1.0000, 0.2500])
    """
    max_grad_norm = check_positive("max_grad_norm", max_grad_norm)
    return _factors(norms, max_grad_norm)


def _factors(norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    return (max_grad_norm / (norms + _CLIP_EPS)).clamp(max=1.0)


def clip_and_sum(
    per_example_grads: dict[str, torch.Tensor], *, max_grad_norm: float, return_norms: bool = False
) -> dict[str, torch.Tensor] | ClippedSum:
    r"""Clip every example's gradient to norm at most ``max_grad_norm`` and sum over the batch.

    The norm of example :math:`i` is taken over all parameters together,
    :math:`\lVert g_i \rVert_2 = \bigl(\sum_{p} \lVert g_i^{(p)} \rVert_2^2\bigr)^{1/2}`, and the
    result is eq. :eq:`per-example-clipped-sum`, whose L2 sensitivity under adding or removing one
    example is at most :math:`C`.

    Args:
        per_example_grads: dict name -> tensor of shape ``(B, *param.shape)``, as returned by
            :func:`per_example_gradients`.
        max_grad_norm: the clipping norm :math:`C`, > 0.
        return_norms: return a :class:`ClippedSum` with the per-example norms before clipping.

    Returns:
        A dict name -> summed clipped gradient of shape ``param.shape``; with ``return_norms``,
        the pair ``ClippedSum(sums, norms)`` where ``norms`` has shape ``(B,)``.

    Raises:
        TypeError: if ``per_example_grads`` is not a non-empty dict of tensors.
        ValueError: if the tensors disagree on the batch size or ``max_grad_norm`` is not > 0.

    Example:
        >>> import torch
        >>> sums = clip_and_sum({"w": torch.tensor([[3.0, 4.0], [0.3, 0.4]])}, max_grad_norm=1.0)
        >>> sums["w"]
        tensor([0.9000, 1.2000])
    """
    max_grad_norm = check_positive("max_grad_norm", max_grad_norm)
    if not isinstance(per_example_grads, dict) or not per_example_grads:
        raise TypeError("per_example_grads must be a non-empty dict of name -> tensor (B, ...).")
    grads = list(per_example_grads.values())
    batch = grads[0].shape[0] if isinstance(grads[0], torch.Tensor) and grads[0].ndim else -1
    if any(not isinstance(g, torch.Tensor) or g.ndim == 0 or g.shape[0] != batch for g in grads):
        raise ValueError("every per-example gradient must be a tensor with the same batch size first.")
    result = _clip_and_sum(per_example_grads, max_grad_norm)
    return result if return_norms else result.sums


def _clip_and_sum(grads: dict[str, torch.Tensor], max_grad_norm: float) -> ClippedSum:
    squares = sum(g.flatten(start_dim=1).square().sum(dim=1) for g in grads.values())
    norms = squares.sqrt()
    factors = _factors(norms, max_grad_norm)
    return ClippedSum({name: torch.tensordot(factors, g, dims=1) for name, g in grads.items()}, norms)


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
            out.append(("weight", squares, lambda f: torch.mm((b2 * f[:, None]).t(), a2).view(shape)))
        else:
            ag = a.reshape(batch, length, groups, -1).transpose(1, 2)  # (B, g, L, I/g)
            bg = b.reshape(batch, length, groups, -1).transpose(1, 2)  # (B, g, L, O/g)
            i_size, o_size = ag.shape[-1], bg.shape[-1]
            if length * (i_size + o_size) < i_size * o_size:  # ghost norm is cheaper
                gram_a = ag @ ag.transpose(-1, -2)
                gram_b = bg @ bg.transpose(-1, -2)
                squares = (gram_a * gram_b).sum(dim=(1, 2, 3))

                def summer(f: torch.Tensor, ag: torch.Tensor = ag, bg: torch.Tensor = bg) -> torch.Tensor:
                    return torch.einsum("bglo,bgli->goi", bg * f[:, None, None, None], ag).reshape(shape)

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
    return _matmul_rule(layer, a.reshape(a.shape[0], -1, a.shape[-1]), b.reshape(b.shape[0], -1, b.shape[-1]))


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
    for axis, (k, s, d) in enumerate(zip(conv.kernel_size, conv.stride, conv.dilation, strict=True)):
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


def _affine_rule(layer: nn.Module, normalised: torch.Tensor, b: torch.Tensor, reduce: tuple[int, ...]) -> RuleOutput:
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
        out.append((name, flat.square().sum(1), lambda f, flat=flat, shape=shape: (f @ flat).view(shape)))
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


# --- the layerwise engine -----------------------------------------------------------------------


class _Plan(NamedTuple):
    hooked: list[tuple[str, nn.Module]]  # layers with a rule and trainable parameters
    fallback: list[str]  # trainable parameters computed with vmap
    reasons: list[str]  # why, per layer, for messages


def _plan(model: nn.Module) -> _Plan:
    owner: dict[int, tuple[str, nn.Module]] = {}
    uses: dict[int, int] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        uses[id(module)] = uses.get(id(module), 0) + 1
        owner.setdefault(id(module), (name, module))
    hooked, fallback, reasons = [], [], []
    seen_params: set[int] = set()
    for name, module in model.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        prefix = f"{name}." if name else ""
        shared = any(id(p) in seen_params for _, p in own)
        seen_params.update(id(p) for _, p in own)
        kind = type(module)
        supported = kind in LAYER_RULES and _rule_applies(module)
        if supported and uses[id(module)] == 1 and not shared:
            hooked.append((name, module))
            continue
        fallback.extend(prefix + n for n, _ in own)
        why = "is used more than once" if supported else f"({kind.__name__}) has no rule"
        reasons.append(f"{name or 'the model'!r} {why}")
    return _Plan(hooked, fallback, reasons)


def _rule_applies(module: nn.Module) -> bool:
    """Options that a rule does not handle: they send the layer to the vmap fallback."""
    if isinstance(module, nn.Embedding):
        return module.max_norm is None and not module.scale_grad_by_freq
    if isinstance(module, nn.Conv1d | nn.Conv2d):
        return isinstance(module.padding, str) or all(isinstance(p, int) for p in module.padding)
    return True


class _Capture:
    """Forward hooks that keep each hooked layer's input and output."""

    def __init__(self, layers: list[tuple[str, nn.Module]], copy: bool) -> None:
        self.seen: dict[nn.Module, tuple[torch.Tensor, torch.Tensor, int, int]] = {}
        self.twice: set[nn.Module] = set()
        self.copy = copy
        self.handles = [m.register_forward_hook(self._keep) for _, m in layers]

    def _keep(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor | None:
        if module in self.seen:
            self.twice.add(module)
        a = inputs[0].clone() if self.copy else inputs[0]
        self.seen[module] = (a, output, a._version, output._version)
        # A copy shields the kept output from in-place changes made further on (ReLU(inplace)).
        return output.clone() if self.copy else None

    def changed(self) -> bool:
        return any(a._version != va or o._version != vo for a, o, va, vo in self.seen.values())

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _layerwise(
    model: nn.Module, plan: _Plan, mean_loss: LossFn, sum_loss: LossFn, x: torch.Tensor, y: torch.Tensor,
    max_grad_norm: float,
) -> ClippedSum:  # fmt: skip
    for copy in (False, True):
        capture = _Capture(plan.hooked, copy)
        try:
            outputs = model(x)
        finally:
            capture.remove()
        if copy or not capture.changed():
            break  # else a layer's input or output was changed in place: again, with copies
    twice = {id(m) for m in capture.twice}
    active = [(n, m) for n, m in plan.hooked if m in capture.seen and id(m) not in twice]
    fallback = list(plan.fallback)
    for name, module in plan.hooked:
        if id(module) in twice:  # a layer called twice: its gradient is a sum over the calls
            prefix = f"{name}." if name else ""
            fallback.extend(prefix + n for n, p in module.named_parameters(recurse=False) if p.requires_grad)
    targets = [capture.seen[m][1] for _, m in active]
    output_grads = torch.autograd.grad(sum_loss(outputs, y), targets, allow_unused=True) if targets else []
    entries: list[tuple[str, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]] = []
    with torch.no_grad():
        for (name, module), b in zip(active, output_grads, strict=True):
            a = capture.seen[module][0].detach()
            b = torch.zeros_like(capture.seen[module][1]) if b is None else b
            prefix = f"{name}." if name else ""
            entries.extend((prefix + p, sq, s) for p, sq, s in LAYER_RULES[type(module)](module, a, b))
    grads = _vmap_gradients(model, mean_loss, x, y, fallback) if fallback else {}
    with torch.no_grad():
        squares = x.new_zeros(x.shape[0], dtype=_dtype(model))
        for _, sq, _ in entries:
            squares = squares + sq
        for g in grads.values():
            squares = squares + g.flatten(start_dim=1).square().sum(1)
        norms = squares.sqrt()
        factors = _factors(norms, max_grad_norm)
        sums = {name: summer(factors) for name, _, summer in entries}
        sums.update({name: torch.tensordot(factors, g, dims=1) for name, g in grads.items()})
    return ClippedSum({n: sums.get(n, torch.zeros_like(p)) for n, p in trainable_named(model)}, norms)


def _dtype(model: nn.Module) -> torch.dtype:
    return next(p for p in model.parameters() if p.requires_grad).dtype


class PerExampleClipper:
    """The clipped gradient sum of :func:`clipped_gradient_sum`, planned once for many batches.

    Checks the model, the loss and the method and plans which layers use which rule once; each
    call then computes one batch's :class:`ClippedSum`. The DP-SGD loop builds one per run.

    Args:
        model: the model; its parameters are read, not changed. Build a new clipper if you add
            or freeze layers.
        loss: ``"cross_entropy"``, ``"bce"`` or a callable returning the mean loss over examples.
        method: ``"auto"``, ``"vmap"`` or ``"layerwise"`` (see :func:`clipped_gradient_sum`).

    Raises:
        TypeError: if an argument is of the wrong kind.
        ValueError: if the model has no trainable parameter or ``method="layerwise"`` does not
            apply.

    Example:
        >>> import torch
        >>> from companion import models
        >>> clipper = PerExampleClipper(models.logistic_regression(), loss="cross_entropy")
        >>> result = clipper(torch.ones(3, 64), torch.tensor([0, 1, 2]), max_grad_norm=1.0)
        >>> [round(float(n), 2) for n in result.norms]  # before clipping
        [8.26, 8.05, 8.13]
        >>> total = torch.cat([s.flatten() for s in result.sums.values()])
        >>> round(float(torch.linalg.vector_norm(total)), 2)  # three terms of norm 1 each
        1.77
    """

    def __init__(self, model: nn.Module, *, loss: LossLike, method: Method = "auto") -> None:
        self.model = check_model(model)
        self.mean_loss, self.sum_loss = _resolve_loss(loss)
        self.method = _check_method(method)
        trainable_named(self.model)
        self.plan = None if self.method == "vmap" else _plan(self.model)
        if self.plan is not None and self.plan.fallback:
            reasons = "; ".join(self.plan.reasons)
            if self.method == "layerwise":
                raise ValueError(
                    f"method='layerwise' does not apply: layer {reasons}. Use method='auto' "
                    "(vmap for those layers only) or method='vmap'."
                )
            warnings.warn(
                f"per-example gradients of layer {reasons} are computed with vmap, which is slower "
                "than the per-layer rules; the result is the same.",
                UserWarning,
                stacklevel=3,
            )

    def __call__(self, x: torch.Tensor, y: torch.Tensor, *, max_grad_norm: float) -> ClippedSum:
        """The clipped sum and norms of the batch ``(x, y)`` (checked by the caller)."""
        if x.shape[0] == 0:
            sums = {name: torch.zeros_like(p) for name, p in trainable_named(self.model)}
            return ClippedSum(sums, x.new_zeros(0, dtype=_dtype(self.model)))
        if self.plan is None:
            names = [name for name, _ in trainable_named(self.model)]
            return _clip_and_sum(_vmap_gradients(self.model, self.mean_loss, x, y, names), max_grad_norm)
        return _layerwise(self.model, self.plan, self.mean_loss, self.sum_loss, x, y, max_grad_norm)


def clipped_gradient_sum(
    model: nn.Module,
    loss: LossLike,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    max_grad_norm: float,
    method: Method = "auto",
    return_norms: bool = False,
) -> dict[str, torch.Tensor] | ClippedSum:
    r"""The sum of the clipped per-example gradients of a batch, eq. :eq:`per-example-clipped-sum`.

    ``method="vmap"`` is :func:`per_example_gradients` followed by :func:`clip_and_sum`.
    ``method="layerwise"`` gets the same numbers from one forward and one backward pass with the
    rules of :data:`LAYER_RULES`, and raises ``ValueError`` naming every trainable layer without
    a rule. ``method="auto"`` uses the rules where they apply and ``vmap`` for the other layers'
    parameters only, with a warning naming them.

    Args:
        model: the model; its parameters are read, not changed.
        loss: ``"cross_entropy"``, ``"bce"`` or a callable returning the mean loss over the
            examples of a batch.
        x, y: a batch of inputs and targets (the batch may be empty).
        max_grad_norm: the clipping norm :math:`C`, > 0.
        method: ``"auto"``, ``"vmap"`` or ``"layerwise"``.
        return_norms: return a :class:`ClippedSum` with the norms before clipping as well.

    Returns:
        Like :func:`clip_and_sum`: dict name -> summed clipped gradient (trainable parameters),
        or with ``return_norms`` a :class:`ClippedSum`.

    Raises:
        TypeError: if an argument is of the wrong kind.
        ValueError: if an argument is out of range, or ``method="layerwise"`` does not apply.

    Example:
        >>> import torch
        >>> from companion import models
        >>> x, y = torch.randn(8, 64, generator=torch.Generator().manual_seed(0)), torch.arange(8)
        >>> sums, norms = clipped_gradient_sum(models.mlp(), "cross_entropy", x, y,
        ...                                    max_grad_norm=0.1, return_norms=True)
        >>> norms.shape, bool(torch.linalg.vector_norm(torch.cat([s.flatten() for s in
        ...     sums.values()])) <= 8 * 0.1)
        (torch.Size([8]), True)
    """
    clipper = PerExampleClipper(model, loss=loss, method=method)
    _check_batch(x, y)
    max_grad_norm = check_positive("max_grad_norm", max_grad_norm)
    result = clipper(x, y, max_grad_norm=max_grad_norm)
    return result if return_norms else result.sums
