"""Per-example gradients with :mod:`torch.func`, clipping, and the checks of their arguments.

Part of :mod:`companion.per_example`; import from there.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from companion import _torch
from companion._forward import check_buffers_unwritten, parameters_unwritten, refuse_inference
from companion._labels import check_labels
from companion._outputs import batch_outputs, check_outputs, model_error
from companion._torch import LossFn, LossName, check_model, several_inputs, trainable_named
from companion._validation import check_positive
from companion.per_example.checks import refuse_gradient_hooks

__all__ = [
    "ClippedSum",
    "LossLike",
    "Method",
    "clip_and_sum",
    "clip_factors",
    "per_example_gradients",
]

LossLike = LossName | LossFn
Method = Literal["auto", "vmap", "layerwise"]
_METHODS = ("auto", "vmap", "layerwise")
_CLIP_EPS = 1e-6  # as in Opacus: factor = min(1, C / (norm + 1e-6))


class ClippedSum(NamedTuple):
    """The clipped per-example gradient sum of a batch and the norms before clipping.

    Args:
        sums: parameter name -> summed clipped gradient, of the parameter's shape.
        norms: each example's gradient norm before clipping, shape ``(B,)``.
    """

    sums: dict[str, torch.Tensor]
    norms: torch.Tensor


# --- argument checks ------------------------------------------------------------------------------


def check_method(method: object) -> str:
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}.")
    return str(method)


def resolve_loss(loss: object) -> tuple[LossFn, LossFn]:
    """``(mean loss, summed loss)``; a callable's summed form is its mean times the batch size, on
    a copy of the outputs: they may be a layer's kept output, which a ``clamp_`` would change."""
    loss = _torch.check_loss_or_callable(loss)
    if isinstance(loss, str):
        return _torch.loss_fn(loss, "mean"), _torch.loss_fn(loss, "sum")
    return loss, lambda outputs, targets: loss(outputs.clone(), targets) * outputs.shape[0]


def check_batch(
    model: nn.Module, loss: LossLike, x: object, y: object, names: tuple[str, str] = ("x", "y")
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tensors with one example per row, which the model accepts with outputs that fit the loss
    and the labels (checked on a few examples by :func:`companion._outputs.check_outputs`, so
    that a bad label or loss gets a message naming it); class labels are returned as int64."""
    name_x, name_y = names
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(
            f"{name_x} and {name_y} must be torch tensors (see companion.training.to_tensors)."
            + several_inputs(x)
        )
    if x.ndim == 0 or y.ndim == 0 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"{name_x} and {name_y} must hold the same number of examples along their first "
            f"dimension, got shapes {tuple(x.shape)} and {tuple(y.shape)}."
        )
    if y.device != x.device:
        raise ValueError(
            f"{name_x} and {name_y} must be on one device (the model's), got {x.device} and "
            f"{y.device}."
        )
    _torch.refuse_meta_data(names, (x, y))
    refuse_inference(names, (x, y))
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise ValueError(f"{name_x} must not contain NaN or infinite values.")
    y = check_labels(y, loss=loss, name=name_y)  # converted for a named loss only
    if x.shape[0] > 0:
        check_buffers_unwritten(model, x)  # before any pass over the data
        with parameters_unwritten(model):
            check_outputs(model, x, y, loss=loss)
    return x, y


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
        ValueError: if ``x`` and ``y`` hold different numbers of examples, the loss is unknown,
            or a trainable parameter has a gradient hook, which these gradients would skip.

    Example:
        >>> import torch
        >>> from companion import models
        >>> grads = per_example_gradients(models.logistic_regression(), "cross_entropy",
        ...                               torch.zeros(3, 64), torch.tensor([0, 1, 2]))
        >>> {name: tuple(g.shape) for name, g in grads.items()}
        {'0.weight': (3, 10, 64), '0.bias': (3, 10)}
    """
    model = check_model(model)
    refuse_gradient_hooks(model.named_parameters())
    mean_loss, _ = resolve_loss(loss)
    x, y = check_batch(model, loss, x, y)
    names = [name for name, _ in trainable_named(model)]
    return vmap_gradients(model, mean_loss, x, y, names)


def without_autocast(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """A block with :class:`torch.autocast` switched off on ``device`` (nothing if it is off):
    under autocast a layer's output gradient is bfloat16 or float16 while its parameters are
    not, so the per-example computations would mix dtypes, and lose precision."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def vmap_gradients(
    model: nn.Module, mean_loss: LossFn, x: torch.Tensor, y: torch.Tensor, names: list[str]
) -> dict[str, torch.Tensor]:
    """Per-example gradients of the parameters ``names``; all others are held fixed."""
    wanted = set(names)
    params = {name: p.detach() for name, p in model.named_parameters() if name in wanted}
    if x.shape[0] == 0:
        return {name: p.new_zeros((0, *p.shape)) for name, p in params.items()}
    frozen = {name: p.detach() for name, p in model.named_parameters() if name not in wanted}
    frozen.update(model.named_buffers())

    def example_loss(
        params: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor
    ) -> torch.Tensor:
        outputs = functional_call(model, (params, frozen), (xi.unsqueeze(0),))
        return mean_loss(batch_outputs(outputs, 1), yi.unsqueeze(0))

    # functional_call swaps tensors into the model and back; for a module that appears twice in
    # the tree (nn.Sequential(layer, layer)) torch 2.13 swaps back the wrong ones and leaves
    # traced tensors in the model, so each module's own tensors are restored here.
    saved = [(m, dict(m._parameters), dict(m._buffers)) for m in model.modules()]
    batched = vmap(grad(example_loss), in_dims=(None, 0, 0), randomness="different")
    from companion.per_example.recurrent import unrolled_layers  # which imports this module

    try:
        with unrolled_layers(model):  # vmap cannot batch torch's fused recurrent layers
            return batched(params, x, y)
    except _torch.OutOfMemoryError:
        raise
    except IndexError as error:  # token ids out of range
        raise model_error(x, error) from error
    except RuntimeError as error:
        layers = sorted({name.rpartition(".")[0] or name for name in params})
        shown = ", ".join(layers[:6]) + (", ..." if len(layers) > 6 else "")
        raise ValueError(
            f"torch.func.vmap cannot compute the per-example gradients of layer(s) {shown}: "
            f"{error}. Some operations fail under vmap: a packed sequence (method='auto' "
            "unrolls a recurrent layer called once on it), nn.GRUCell and the like without an "
            "initial state or with one made by torch.zeros (make it with x.new_zeros(...)), a "
            "forward pass that reads a tensor's value (.item()) or changes one in place."
        ) from None
    finally:
        for module, parameters, buffers in saved:
            module._parameters.update(parameters)
            module._buffers.update(buffers)


# --- clipping -----------------------------------------------------------------------------------


def clip_factors(norms: torch.Tensor, *, max_grad_norm: float) -> torch.Tensor:
    r"""The factors :math:`\min(1, C / (\lVert g_i \rVert + 10^{-6}))` that clip each norm to C.

    Args:
        norms: per-example (or per-client) L2 norms, any shape.
        max_grad_norm: the clipping norm :math:`C`, > 0.

    Returns:
        A tensor of the shape of ``norms``; ``factor * norm <= C`` everywhere, up to
        floating-point rounding.

    Raises:
        ValueError: if ``max_grad_norm`` is not a finite number > 0.

    Example:
        >>> import torch
        >>> clip_factors(torch.tensor([0.5, 4.0]), max_grad_norm=1.0)
        tensor([1.0000, 0.2500])
    """
    max_grad_norm = check_positive("max_grad_norm", max_grad_norm)
    return scale_factors(norms, max_grad_norm)


def scale_factors(norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
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
        ValueError: if the tensors disagree on the batch size, ``max_grad_norm`` is not > 0, or
            an example's gradient is not finite.

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
        raise ValueError(
            "every per-example gradient must be a tensor with the same batch size first."
        )
    result = sum_clipped(per_example_grads, max_grad_norm)
    return result if return_norms else result.sums


#: Adds :math:`\sum_i f_i g_i` (clipping factors ``f`` of shape (B,)) into a tensor of the
#: parameter's shape, in place: ``add_to(factors, total)``.
AddTo = Callable[[torch.Tensor, torch.Tensor], object]
#: One parameter's part of a clipped sum: its name, each example's squared gradient norm (shape
#: (B,)) and its :data:`AddTo`. The layer rules return these, and so do materialised gradients.
Entry = tuple[str, torch.Tensor, AddTo]


def squared_norms(per_example: torch.Tensor) -> torch.Tensor:
    """Each example's squared L2 norm (``per_example`` is (B,) for a scalar parameter), in
    :func:`norm_dtype`; ``vector_norm`` is much faster than ``square().sum()``."""
    rows = per_example.flatten(1) if per_example.dim() > 1 else per_example[:, None]
    return torch.linalg.vector_norm(rows, dim=1, dtype=norm_dtype(rows.dtype)).square()


def norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of squared norms: float32 for 16-bit floats (float16's squares overflow past a
    norm of 256), else ``dtype``."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


#: The rules compute what they derive per example (a normalised input, a float64 copy) in chunks
#: of examples of at most this many elements. A fresh tensor above the allocator's reuse limit (32
#: MB with glibc) is mapped anew on every call, and its page faults cost more than the arithmetic:
#: the first GroupNorm of the CIFAR benchmark (256 examples, 32 channels, 32x32) took 14 ms whole,
#: 1.6 ms in chunks of 64. Smaller chunks keep the peak down: the float64 copies of the ghost norm
#: took the transformer benchmark's step to 52.8 MiB of tensors with 2**21, 44.6 with 2**19 (the
#: backward pass's peak), in the same time; 2**18 was slower. On a GPU, whose allocator keeps
#: what it frees and whose step is bound by the launches, the chunks are :data:`GPU_CHUNK_FACTOR`
#: times larger: on an H200 that made the CIFAR benchmark's step 14 to 26% faster and the
#: transformer's 29 to 31% (two runs), with the same peak.
CHUNK_ELEMENTS = 2**19
GPU_CHUNK_FACTOR = 16


def example_chunks(batch: int, per_example: int, device: torch.device) -> list[slice]:
    """Slices of ``range(batch)`` of at most :data:`CHUNK_ELEMENTS` elements each on the CPU
    (:data:`GPU_CHUNK_FACTOR` times more on another ``device``), at ``per_example`` elements an
    example (one example at least)."""
    bound = CHUNK_ELEMENTS * (1 if device.type == "cpu" else GPU_CHUNK_FACTOR)
    step = max(1, bound // max(1, per_example))
    return [slice(start, start + step) for start in range(0, batch, step)]


class Refinable:
    """An :data:`AddTo` whose entry's squared norms are only bounds for some examples
    (``loose``, a bool mask of shape (B,)), as a fast rule may give where rounding would make
    them unreliable. :func:`add_clipped` calls :meth:`refine` when a batch has such examples:
    it measures them exactly and returns the squared norms to use; the sum then adds, for
    each, the vector it measured."""

    loose: torch.Tensor

    def refine(self) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, f: torch.Tensor, total: torch.Tensor) -> None:
        raise NotImplementedError


def materialised(name: str, grads: torch.Tensor) -> Entry:
    """The entry of a parameter whose per-example gradients ``grads`` (B, ...) are at hand."""
    return (name, squared_norms(grads), lambda f, total: add_weighted(total, f, grads))


def sum_clipped(grads: dict[str, torch.Tensor], max_grad_norm: float) -> ClippedSum:
    sums = {name: g.new_zeros(g.shape[1:]) for name, g in grads.items()}
    entries = [materialised(name, g) for name, g in grads.items()]
    return ClippedSum(sums, add_clipped(entries, max_grad_norm, sums, 1.0))


def add_clipped(
    entries: list[Entry], max_grad_norm: float, into: dict[str, torch.Tensor], scale: float
) -> torch.Tensor:
    """Add ``scale`` times the clipped sum of the (non-empty) ``entries`` into ``into``; the norms.

    An example's norm is taken over every entry together, as eq. :eq:`per-example-clipped-sum`
    asks; an entry's bounds (:class:`Refinable`) are refined first. A norm that is not finite is
    refused, before anything is added."""
    squares = _total(entries)
    refinable = [add_to for _, _, add_to in entries if isinstance(add_to, Refinable)]
    # One sum and one sync (cheaper than isfinite().all()) to look for an example whose gradient
    # is not finite (clipping it would give nan, which the sum would spread), and for bounds.
    # The counts of bounds in the dtype of the squares: float32 counts exactly to 2**24, and mps
    # has no float64.
    checks = [squares.sum(), *(add_to.loose.sum().to(squares.dtype) for add_to in refinable)]
    total, *loose = torch.stack(checks).tolist() if refinable else [checks[0].item()]
    if any(loose):
        entries = [
            (name, add_to.refine() if isinstance(add_to, Refinable) else sq, add_to)
            for name, sq, add_to in entries
        ]
        squares = _total(entries)
        total = float(squares.sum())
    norms = squares.sqrt()
    if not math.isfinite(total) and (
        bad := torch.nonzero(~torch.isfinite(squares)).flatten().tolist()
    ):
        raise ValueError(
            f"the gradient of example(s) {bad[:5]} of the batch is not finite, so clipping "
            "cannot bound it. An input or a weight may be too large for the model's dtype (in "
            "training, a learning rate too large makes the weights grow until they are), or "
            "the loss may have no gradient there (a square root at 0, as in a distance at an "
            "exact prediction)."
        )
    factors = scale_factors(norms, max_grad_norm) * scale
    for name, _, add_to in entries:
        add_to(factors.to(into[name].dtype), into[name])  # the same dtype unless params mix
    return norms


def _total(entries: list[Entry]) -> torch.Tensor:
    """The entries' squared norms summed (a new tensor: the first is an entry's own)."""
    squares = entries[0][1]
    for _, sq, _ in entries[1:]:
        squares = squares + sq
    return squares


def add_weighted(out: torch.Tensor, factors: torch.Tensor, grads: torch.Tensor) -> None:
    """``out += sum_i factors[i] * grads[i]``, in place; ``grads`` has the batch first."""
    out.add_(torch.tensordot(factors, grads, dims=1).view(out.shape))
