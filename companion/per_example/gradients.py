"""Per-example gradients with :mod:`torch.func`, clipping, and the checks DP-SGD needs.

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
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from companion import _torch
from companion._labels import check_labels
from companion._outputs import batch_outputs, check_outputs, model_error, run_model
from companion._torch import LossFn, LossName, check_model, trainable_named
from companion._validation import check_positive

__all__ = [
    "ClippedSum",
    "LossLike",
    "Method",
    "check_dp_compatible",
    "check_examples_independent",
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


# --- checks -------------------------------------------------------------------------------------


def check_dp_compatible(model: nn.Module) -> None:
    """Raise if ``model`` cannot be trained with DP-SGD, naming every offending layer at once.

    DP-SGD needs each example's gradient to depend on that example alone. Batch normalisation
    breaks this (it normalises by statistics of the whole batch, and its running statistics are
    un-noised averages of the training data), as do instance normalisation with
    ``track_running_stats=True`` (its running statistics average over the batch) and an
    ``Embedding`` or ``EmbeddingBag`` with ``scale_grad_by_freq=True`` (it scales gradients by
    word counts over the batch). One with ``max_norm`` rescales, in place during the forward
    pass, the rows of the tokens it reads: a change of the weights by the data, without noise.
    Replace normalisation with :class:`torch.nn.GroupNorm` or :class:`torch.nn.LayerNorm`.
    For a forward pass written by hand that mixes examples, see
    :func:`check_examples_independent`.

    Args:
        model: the model to check.

    Raises:
        TypeError: if ``model`` is not a :class:`torch.nn.Module`, or is compiled.
        ValueError: listing every layer above, or if the model has no trainable parameter.

    Example:
        >>> from torch import nn
        >>> check_dp_compatible(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU(),
        ...                                   nn.Linear(3, 2), nn.BatchNorm1d(2)))
        Traceback (most recent call last):
        ...
        ValueError: model cannot be trained with DP-SGD: layer '1' is a BatchNorm1d; layer '4' ...
    """
    model = check_model(model)
    if isinstance(model, torch.jit.ScriptModule) or hasattr(model, "_orig_mod"):
        raise TypeError(
            f"model is a compiled module ({type(model).__name__}), which hides the layers' own "
            "calls that per-example gradients need: pass the module given to torch.compile "
            "(its ._orig_mod) or torch.jit.script."
        )
    problems = []
    for name, module in model.named_modules():
        where = f"layer {name!r}" if name else "the model"
        kind = type(module).__name__
        if isinstance(module, _BatchNorm):
            problems.append(f"{where} is a {kind}")
        elif isinstance(module, _InstanceNorm) and module.track_running_stats:
            problems.append(f"{where} is a {kind} with track_running_stats=True")
        elif isinstance(module, nn.Embedding | nn.EmbeddingBag) and module.scale_grad_by_freq:
            problems.append(f"{where} is an {kind} with scale_grad_by_freq=True")
        elif isinstance(module, nn.Embedding | nn.EmbeddingBag) and module.max_norm is not None:
            problems.append(f"{where} is an {kind} with max_norm")
    if problems:
        raise ValueError(
            f"model cannot be trained with DP-SGD: {'; '.join(problems)}. These layers mix the "
            "examples of a batch (batch normalisation normalises by batch statistics and its "
            "running statistics average the training data), so per-example gradients and the "
            "DP-SGD guarantee do not hold. Replace batch or instance normalisation with "
            "torch.nn.GroupNorm or torch.nn.LayerNorm (or track_running_stats=False), and use "
            "scale_grad_by_freq=False. An Embedding with max_norm renormalises the rows of the "
            "tokens it reads in place, by the data and without noise: use max_norm=None."
        )
    trainable_named(model)


def check_examples_independent(model: nn.Module, x: torch.Tensor) -> None:
    """Raise if the model's output for an example changes with the other examples of its batch.

    Clipping bounds each example's influence on the gradient only if the forward pass treats the
    examples of a batch independently. :func:`check_dp_compatible` refuses the layers known to
    mix them; a forward pass written by hand can mix them too (normalising by the batch's mean,
    comparing examples). This runs the model in evaluation mode on the first examples (up to 4),
    together and one at a time, and compares the outputs. It catches mistakes and proves
    nothing: a model that mixes examples in training mode only, or by less than the tolerance,
    passes, and so does a model whose outputs are random in evaluation mode (Monte Carlo
    dropout), which cannot be compared, and a batch of one example.
    :func:`companion.dpsgd.train_dpsgd` runs it before training.

    Args:
        model: the model.
        x: a batch of inputs the model accepts, on its device.

    Raises:
        TypeError: if the model does not return a tensor.
        ValueError: if the model cannot be applied to ``x``, its outputs on the batch are NaN
            or infinite, or differ from the same examples' outputs alone (in shape, or by more
            than 1% of the largest output of the batch; 8 roundings, for dtypes with fewer
            bits).

    Example:
        >>> class Centred(nn.Module):  # subtracts the batch's mean: mixes the examples
        ...     def forward(self, x):
        ...         return x - x.mean(dim=0)
        >>> check_examples_independent(Centred(), torch.randn(4, 3))
        Traceback (most recent call last):
        ...
        ValueError: the model's output for an example depends on the other examples of its ...
    """
    n = min(4, x.shape[0])
    if n < 2:
        return
    first = run_model(model, x[:n])
    if not torch.isfinite(first).all():
        raise ValueError("the model's outputs on the first examples are NaN or infinite.")
    if not torch.equal(run_model(model, x[:n]), first):
        return  # random in evaluation mode: nothing to compare with
    eps = torch.finfo(first.dtype).eps if first.is_floating_point() else 0.0
    together = first.double().reshape(-1)
    alone = torch.cat([run_model(model, x[i : i + 1]).double().reshape(-1) for i in range(n)])
    tolerance = max(1e-2, 8 * eps) * float(together.abs().max())
    if alone.shape != together.shape or not float((together - alone).abs().max()) <= tolerance:
        raise ValueError(
            "the model's output for an example depends on the other examples of its batch: on "
            f"the first {n} examples, the outputs of one forward pass differ from those of each "
            "example run alone. DP-SGD bounds each example's influence only if the forward pass "
            "treats the examples independently: remove statistics taken over the batch (a mean "
            "or a normalisation over dim 0) and anything that compares examples."
        )


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
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise ValueError(f"{name_x} must not contain NaN or infinite values.")
    y = check_labels(y, loss=loss, name=name_y)  # converted for a named loss only
    if x.shape[0] > 0:
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
    try:
        return vmap(grad(example_loss), in_dims=(None, 0, 0), randomness="different")(params, x, y)
    except _torch.OutOfMemoryError:
        raise
    except IndexError as error:  # token ids out of range
        raise model_error(x, error) from error
    except RuntimeError as error:
        layers = sorted({name.rpartition(".")[0] or name for name in params})
        shown = ", ".join(layers[:6]) + (", ..." if len(layers) > 6 else "")
        raise ValueError(
            f"torch.func.vmap cannot compute the per-example gradients of layer(s) {shown}: "
            f"{error}. Some layers fail under vmap: in PyTorch 2.x, nn.RNN and nn.GRU, nn.LSTM in "
            "some settings, and packed sequences (method='auto' unrolls these layers, called "
            "once on a batch; a Python loop over nn.RNNCell, nn.GRUCell or nn.LSTMCell works "
            "under vmap; Opacus offers DPLSTM, DPGRU and DPRNN). So does a forward pass that "
            "reads a tensor's value (.item(), if on a tensor) or changes one in place."
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
    asks. A norm that is not finite is refused, before anything is added."""
    squares = entries[0][1]
    for _, sq, _ in entries[1:]:
        squares = squares + sq  # not in place: the first is an entry's own tensor
    norms = squares.sqrt()
    # One sum and one sync (cheaper than isfinite().all()) to look for an example whose gradient
    # is not finite: clipping it would give nan, which the sum would spread.
    if not math.isfinite(float(squares.sum())) and (
        bad := torch.nonzero(~torch.isfinite(squares)).flatten().tolist()
    ):
        raise ValueError(
            f"the gradient of example(s) {bad[:5]} of the batch is not finite, so clipping "
            "cannot bound it. An input or a weight may be too large for the model's dtype, or "
            "the loss may have no gradient there (a square root at 0, as in a distance at an "
            "exact prediction)."
        )
    factors = scale_factors(norms, max_grad_norm) * scale
    for name, _, add_to in entries:
        add_to(factors.to(into[name].dtype), into[name])  # the same dtype unless params mix
    return norms


def add_weighted(out: torch.Tensor, factors: torch.Tensor, grads: torch.Tensor) -> None:
    """``out += sum_i factors[i] * grads[i]``, in place; ``grads`` has the batch first."""
    out.add_(torch.tensordot(factors, grads, dims=1).view(out.shape))
