"""The torch layer shared by the training loops of :mod:`companion` (private).

Loss names, data and model checks, trainable parameters, evaluation and the per-epoch (or
per-round) records that every training function uses: :mod:`companion.training`,
:mod:`companion.dpsgd`, :mod:`companion.federated` and :mod:`companion.attacks`. Like
:mod:`companion._validation`, :mod:`companion._random`, :mod:`companion._outputs` (the checks of
a model's outputs), :mod:`companion._labels` (the checks of labels) and :mod:`companion._progress`
(progress bars), this is one of the private modules other modules may import from.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from companion._labels import check_labels, label_shape_error

__all__ = [
    "EVAL_BATCH",
    "ArrayLike",
    "LossFn",
    "LossName",
    "OutOfMemoryError",
    "check_data",
    "check_loss",
    "check_loss_or_callable",
    "check_model",
    "check_optional_test",
    "epoch_record",
    "evaluate_model",
    "loss_fn",
    "model_device",
    "refuse_meta_data",
    "to_tensors",
    "trainable",
    "trainable_named",
    "warn_if_delta_large",
]

#: The losses known by name: softmax cross-entropy on one logit per class, and binary
#: cross-entropy on one logit.
LossName = Literal["cross_entropy", "bce"]
LOSSES = ("cross_entropy", "bce")
#: A loss as a callable: ``(outputs, targets)`` to the mean loss of the batch.
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: Examples per forward pass when a model is evaluated on a data set, so that it fits in memory.
EVAL_BATCH = 1024

ArrayLike = np.ndarray | torch.Tensor

#: torch's out-of-memory error, which torch before 2.4 has only as ``torch.cuda.OutOfMemoryError``.
OutOfMemoryError = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


# --- losses -------------------------------------------------------------------------------------


def check_loss(loss: object) -> str:
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}.")
    return str(loss)


def check_loss_or_callable(loss: object) -> str | LossFn:
    """A loss name, or a callable ``(outputs, targets) -> mean loss`` (regression, say)."""
    if isinstance(loss, type):  # nn.MSELoss, whose call would build a loss, not compute one
        raise TypeError(
            f"loss is the class {loss.__name__}; pass an instance, {loss.__name__}(), or a name."
        )
    if (isinstance(loss, str) and loss in LOSSES) or callable(loss):
        return loss
    got = repr(loss) if isinstance(loss, str) else type(loss).__name__
    raise (ValueError if isinstance(loss, str) else TypeError)(
        f"loss must be one of {LOSSES} or a callable (outputs, targets) -> mean loss, such as "
        f"torch.nn.MSELoss() for regression; got {got}."
    )


def _bce_logits(outputs: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
    """Binary cross-entropy on logits; outputs of shape (N, 1) are matched to targets (N,)."""
    if outputs.ndim == targets.ndim + 1 and outputs.shape[-1] == 1:
        outputs = outputs.squeeze(-1)
    return F.binary_cross_entropy_with_logits(
        outputs, targets.to(outputs.dtype), reduction=reduction
    )


def loss_fn(loss: str | LossFn, reduction: str = "mean") -> LossFn:
    """The loss ``(outputs, targets) -> tensor`` named ``loss`` with the given reduction.

    A callable is returned as it is (it gives the mean; other reductions need a name).
    """
    if callable(loss):
        if reduction != "mean":
            raise ValueError(f"a callable loss gives the mean only, not reduction={reduction!r}.")
        return loss
    if loss == "cross_entropy":
        return lambda outputs, targets: F.cross_entropy(outputs, targets, reduction=reduction)
    return lambda outputs, targets: _bce_logits(outputs, targets, reduction)


def _correct(outputs: torch.Tensor, targets: torch.Tensor, loss: str) -> torch.Tensor:
    """Boolean tensor: which predictions are right (argmax, or logit > 0 for ``bce``)."""
    if loss == "cross_entropy":
        return outputs.argmax(dim=-1) == targets
    return (outputs.reshape(targets.shape) > 0) == (targets > 0.5)


# --- data and models ----------------------------------------------------------------------------


def to_tensors(x: ArrayLike, y: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn numpy inputs and labels into the tensors the models take.

    Inputs become float32; integer labels become int64 and float labels float32. Tensors are
    passed through unchanged.

    Args:
        x: inputs, shape ``(N, n_features)``.
        y: labels, shape ``(N,)``.

    Returns:
        ``(x, y)`` as tensors.

    Raises:
        TypeError: if ``x`` or ``y`` is neither a tensor nor a numeric numpy array.

    Example:
        >>> import numpy as np
        >>> x, y = to_tensors(np.zeros((2, 3)), np.array([0, 1]))
        >>> x.dtype, y.dtype
        (torch.float32, torch.int64)
    """
    return _to_tensors(x, y, ("x", "y"))


#: The hint for a model with several inputs, given them as a tuple, list or dict.
SEVERAL_INPUTS = (
    "For several inputs, concatenate them into one row and split it in forward (the FAQ: 'My "
    "model takes several inputs')."
)


def several_inputs(x: object) -> str:
    """For an error about ``x``: :data:`SEVERAL_INPUTS` if it is a tuple, list or dict of tensors
    or arrays (with a word for a list of examples), else ''."""
    values = x.values() if isinstance(x, dict) else x if isinstance(x, tuple | list) else ()
    if not values or not all(isinstance(v, torch.Tensor | np.ndarray) for v in values):
        return ""
    examples = "" if isinstance(x, dict) else " (For a list of examples, torch.stack it.)"
    return f" {SEVERAL_INPUTS}{examples}"


def _to_tensors(x: object, y: object, names: tuple[str, str]) -> tuple[torch.Tensor, torch.Tensor]:
    name_x, name_y = names
    if isinstance(x, np.ndarray):
        if not np.issubdtype(x.dtype, np.number) or x.dtype == bool:
            raise TypeError(f"{name_x} must be a numeric array, got dtype {x.dtype}.")
        x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if isinstance(y, np.ndarray):
        if np.issubdtype(y.dtype, np.integer) or y.dtype == bool:
            y = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
        elif np.issubdtype(y.dtype, np.floating):
            y = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))
        else:
            raise TypeError(f"{name_y} must be an integer or float array, got dtype {y.dtype}.")
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"{name_x} must be a torch.Tensor or a numpy array, got {type(x).__name__}."
            + several_inputs(x)
        )
    if not isinstance(y, torch.Tensor):
        raise TypeError(
            f"{name_y} must be a torch.Tensor or a numpy array, got {type(y).__name__}."
        )
    return x, y


def check_data(
    x: ArrayLike,
    y: ArrayLike,
    *,
    loss: str | LossFn,
    names: tuple[str, str] = ("x", "y"),
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert and validate a data set: matching lengths, finite inputs, valid labels.

    Inputs are floats, or integer tensors passed on unchanged (token ids for an ``Embedding``;
    numpy arrays are converted to float32, see :func:`to_tensors`). Labels are checked for a
    named loss only; with a callable loss the targets may have any shape ``(N, ...)`` and dtype.
    The checked tensors are moved to ``device`` when it is given (the model's, as a rule).
    """
    x, y = _check_data(x, y, loss=loss, names=names)
    return (x, y) if device is None else (x.to(device), y.to(device))


def _check_data(
    x: ArrayLike, y: ArrayLike, *, loss: str | LossFn, names: tuple[str, str]
) -> tuple[torch.Tensor, torch.Tensor]:
    name_x, name_y = names
    x, y = _to_tensors(x, y, names)
    refuse_meta_data(names, (x, y))
    if x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{name_x} must hold real or integer inputs, got dtype {x.dtype}.")
    if x.ndim < 2:
        raise ValueError(f"{name_x} must have shape (N, n_features), got shape {tuple(x.shape)}.")
    if y.ndim == 0:
        raise ValueError(
            f"{name_y} must have shape (N, ...), one target per example, got shape ()."
        )
    if not callable(loss) and y.ndim != 1:
        raise label_shape_error(y, loss=loss, name=name_y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"{name_x} and {name_y} must have the same number of examples, got {x.shape[0]} and "
            f"{y.shape[0]}."
        )
    if x.shape[0] == 0:
        raise ValueError(f"{name_x} must hold at least one example.")
    if not _all_finite(x):
        raise ValueError(f"{name_x} must not contain NaN or infinite values.")
    return x, check_labels(y, loss=loss, name=name_y)


#: How many elements :func:`_all_finite` tests at a time.
_FINITE_CHUNK = 2**20


def _all_finite(x: torch.Tensor) -> bool:
    """Whether every entry of ``x`` (examples along the first dimension) is finite, tested in
    chunks of examples: ``isfinite`` on a whole data set at once makes temporaries about twice
    its size (about 300 MiB for MNIST's 60000 inputs)."""
    rows = max(1, _FINITE_CHUNK // max(1, x[0].numel()))
    return all(bool(torch.isfinite(x[i : i + rows]).all()) for i in range(0, len(x), rows))


def check_pair(
    name: str, pair: object, *, loss: str | LossFn, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A data set given as one argument ``name``: an ``(x, y)`` tuple or list that passes
    :func:`check_data` (moved to ``device`` when one is given)."""
    if not isinstance(pair, tuple | list) or len(pair) != 2:
        raise TypeError(
            f"{name} must be a pair (x, y) of inputs and labels, got {type(pair).__name__}."
        )
    names = (f"{name} x", f"{name} y")
    return check_data(pair[0], pair[1], loss=loss, names=names, device=device)


def check_optional_test(
    x_test: ArrayLike | None,
    y_test: ArrayLike | None,
    *,
    loss: str | LossFn,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Held-out data given as a pair, or neither (moved to ``device`` when it is given)."""
    if (x_test is None) != (y_test is None):
        raise ValueError("x_test and y_test must be given together (or both left out).")
    if x_test is None:
        return None
    assert y_test is not None
    return check_data(x_test, y_test, loss=loss, names=("x_test", "y_test"), device=device)


def check_model(model: object) -> nn.Module:
    """``model``, if it is a :class:`torch.nn.Module` whose tensors hold values."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    _refuse_meta(model)
    return model


def _refuse_meta(model: nn.Module) -> None:
    """Refuse a model with a parameter or buffer on the meta device, which holds no values (a
    tensor subclass on "meta" that computes, as the tests' shadow device, passes)."""
    tensors = [*model.parameters(), *model.buffers()]
    if any(t.is_meta and type(t.data) in (torch.Tensor, nn.Parameter) for t in tensors):
        raise ValueError(
            "model has parameters or buffers on the meta device, which hold no values: call "
            "model.to_empty(device=...) and then initialise the weights (load a state_dict, or "
            "call each layer's reset_parameters()) before training."
        )


def refuse_meta_data(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> None:
    """Refuse data on the meta device, which holds no values (a tensor subclass on "meta" that
    computes, as the tests' shadow device, passes)."""
    for name, t in zip(names, tensors, strict=True):
        if t.is_meta and type(t) is torch.Tensor:
            raise ValueError(
                f"{name} is on the meta device, which holds no values: create the data on the "
                "CPU (or on the model's device)."
            )


def loss_rounding(
    loss: LossFn, outputs: torch.Tensor, targets: torch.Tensor, value: torch.Tensor
) -> torch.finfo:
    """The rounding of a loss's arithmetic, for the tolerances of its checks: that of its
    ``value``'s dtype, unless the outputs' dtype is coarser and the loss computes in it (then its
    value on one example moves when the outputs come in the value's dtype, as for
    ``F.cross_entropy(o, t).double()`` on float32 outputs; not for ``F.cross_entropy(o.float(),
    t)`` on bfloat16 ones, which is as exact as float32)."""
    fine = torch.finfo(value.dtype if value.is_floating_point() else torch.float64)
    if not outputs.is_floating_point() or torch.finfo(outputs.dtype).eps <= fine.eps:
        return fine
    one, target = outputs[:1].detach(), targets[:1]
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            same = torch.equal(loss(one.clone(), target), loss(one.to(value.dtype), target))
    except Exception:  # a loss that takes only the outputs' dtype computes in it
        same = False
    return fine if same else torch.finfo(outputs.dtype)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's parameters (the CPU for a model without parameters)."""
    _refuse_meta(model)
    devices = {p.device for p in model.parameters()}
    if len(devices) > 1:
        raise ValueError(
            f"model's parameters must all be on one device, got {sorted(map(str, devices))}."
        )
    return devices.pop() if devices else torch.device("cpu")


def trainable_named(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` for every parameter with ``requires_grad``; raise if there is none."""
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters (none has requires_grad=True).")
    return params


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """The parameters with ``requires_grad``; raise if there is none."""
    return [p for _, p in trainable_named(model)]


def add_to_model(model: nn.Module, delta: Mapping[str, torch.Tensor], scale: float = 1.0) -> None:
    """``theta <- theta + scale * delta`` for every parameter named in ``delta``, in place."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in delta:
                p.add_(delta[name], alpha=scale)


# --- evaluation and records ---------------------------------------------------------------------


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in evaluation mode for a block and give each of its modules back its own
    previous mode (a submodule a user put in evaluation mode stays there), through its
    ``train()``, which a module may override to set more than its mode."""
    modes = [(module, module.training) for module in model.modules()]  # parents first
    if any(training for _, training in modes):
        model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            if module.training != training:  # a parent's train() also set its children
                module.train(training)


def evaluate_model(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, loss: str | LossFn
) -> dict[str, float]:
    """Mean loss (and accuracy, for a named loss) on checked tensors, in evaluation mode."""
    return _scores(model, zip(x.split(EVAL_BATCH), y.split(EVAL_BATCH), strict=True), loss)


def _scores(model: nn.Module, batches: Iterable[Any], loss: str | LossFn) -> dict[str, float]:
    """Mean loss and accuracy over batches ``(x, y)`` moved to the model's device."""
    device = model_device(model)
    total, loss_sum, correct = 0, 0.0, 0.0
    with eval_mode(model), torch.no_grad():
        for x, y in batches:
            # A copy, even on the device: a model that changes its input in place would change
            # the caller's data.
            x, y = x.to(device, copy=True), y.to(device)
            outputs = model(x)
            loss_sum += float(loss_fn(loss)(outputs, y)) * x.shape[0]
            if not callable(loss):
                correct += float(_correct(outputs, y, loss).double().sum())
            total += x.shape[0]
    scores = {"loss": loss_sum / total}
    if not callable(loss):
        scores = {"accuracy": correct / total, **scores}
    return scores


def epoch_record(
    model: nn.Module,
    epoch: int,
    train_data: tuple[torch.Tensor, torch.Tensor] | Iterable[Any],
    test_data: tuple[torch.Tensor, torch.Tensor] | Iterable[Any] | None,
    loss: str | LossFn,
) -> dict[str, Any]:
    """Loss and accuracy on the training set and the test set (tensors or batches of tensors)
    after an epoch."""
    record: dict[str, Any] = {"epoch": epoch}
    for prefix, data in (("train", train_data), ("test", test_data)):
        if data is not None:
            if isinstance(data, tuple):
                scores = evaluate_model(model, *data, loss=loss)
            else:
                scores = _scores(model, data, loss)
            if not math.isfinite(scores["loss"]):
                warnings.warn(
                    f"the {prefix} loss is {scores['loss']}: training diverged. Lower the learning "
                    "rate, or scale the inputs (features of order 1 train best).",
                    UserWarning,
                    stacklevel=3,
                )
            record[f"{prefix}_loss"] = scores["loss"]
            if "accuracy" in scores:
                record[f"{prefix}_accuracy"] = scores["accuracy"]
    return record


def warn_if_delta_large(delta: float, n: int, *, unit: str = "example", symbol: str = "n") -> None:
    """Warn if ``delta >= 1/n``: such a delta allows releasing one ``unit``'s data in the clear."""
    if delta >= 1 / n:
        warnings.warn(
            f"delta={delta} is not below 1/{symbol} = {1 / n:.3g} ({symbol} = {n} {unit}s); a "
            f"delta this large allows releasing one {unit}'s data in the clear. Choose delta well "
            f"below 1/{symbol}.",
            UserWarning,
            stacklevel=3,
        )
