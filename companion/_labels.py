"""Checks of the labels a named loss takes (private, shared).

A named loss (``"cross_entropy"``, ``"bce"``) takes one label per example, a tensor of shape
``(N,)``. :func:`check_labels` checks them (:func:`first_bad_label` finds a value the loss
refuses), and :func:`label_shape_error` says how to fix the shapes seen in practice: a
trailing dimension of one, one-hot, multi-hot or soft labels, one label per token, and the
targets of a Dataset's items. Used by :mod:`companion._torch` (the data checks) and
:mod:`companion.per_example`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from companion._torch import LossFn

__all__ = [
    "TOKEN_MEAN",
    "check_labels",
    "class_labels",
    "first_bad_label",
    "integer_targets",
    "label_shape_error",
]

#: A plain mean over the examples of each one's mean over its tokens (-100: ignored), for labels
#: of shape (N, T) and outputs of shape (N, n_classes, T): the hint of the loss and label checks.
TOKEN_MEAN = (
    "lambda o, t: (F.cross_entropy(o, t, reduction='none').sum(1) / "
    "(t != -100).sum(1).clamp(min=1)).mean()"
)


def integer_targets(y: torch.Tensor) -> bool:
    """Whether ``y`` holds integers (class labels, token ids), not floats or flags."""
    return not (y.is_floating_point() or y.is_complex() or y.dtype == torch.bool)


def class_labels(y: torch.Tensor) -> bool:
    """Whether ``y`` holds integer class labels of shape (N,)."""
    return y.ndim == 1 and integer_targets(y)


#: Where a callable loss is taken: the label errors are shared with functions that take a named
#: loss only (companion.training, federated, attacks).
_TAKEN_BY = " (companion.dpsgd and companion.per_example take one)"


def _from_dataset(name: str) -> bool:
    """Whether the labels ``name`` were read from a Dataset (by :mod:`companion.dpsgd`)."""
    return "the Dataset" in name


def label_shape_error(y: torch.Tensor, *, loss: str, name: str = "y") -> ValueError:
    """The error for labels ``y`` that are not of shape ``(N,)`` with a named ``loss``, with the
    fix for the shape and the values seen: a dimension of size 1 is removed; a row holding one 1
    and zeros elsewhere (one-hot) becomes its class index; other 0/1 rows (multi-label), and any
    labels for ``loss='bce'``, get ``BCEWithLogitsLoss``; integer labels of more dimensions (one
    per token) get the per-example token mean; float rows get soft-label or regression losses.
    Targets read from a Dataset (``name`` says so, as in "the targets of the Dataset x") are
    fixed in the Dataset's ``__getitem__``, which returns one example's target.

    Example:
        >>> print(label_shape_error(torch.eye(3)[[0, 2]], loss="cross_entropy"))
        y must have shape (N,), one label per example, for loss='cross_entropy'; got shape (2, 3).
        Each row is one-hot: give the class indices, y.argmax(1) (or keep the rows, as float
        targets of a callable loss, torch.nn.CrossEntropyLoss()).
    """
    shape, integer = tuple(y.shape), not (y.is_floating_point() or y.is_complex())
    dataset = _from_dataset(name)
    code = name if name.isidentifier() else "y"
    binary = y.numel() > 0 and bool(((y == 0) | (y == 1)).all())
    one_hot = binary and y.ndim == 2 and bool((y.sum(1) == 1).all())
    if y.ndim == 2 and shape[1] == 1:
        fix = (
            "Return each target with shape () from the Dataset's __getitem__ (a Python int, or "
            "a tensor such as torch.tensor(3)), not shape (1,)."
            if dataset
            else f"Remove the dimension of size 1: {code}.squeeze(1)."
        )
    elif loss == "bce":
        fix = (
            "For several 0/1 labels per example (multi-label, or one per token) give a callable "
            f"loss{_TAKEN_BY}, torch.nn.BCEWithLogitsLoss(), with float targets of the outputs' "
            "shape."
        )
    elif one_hot:
        fix = (
            "Each target is one-hot: return its class index, target.argmax(), of shape (), from "
            "the Dataset's __getitem__."
            if dataset
            else f"Each row is one-hot: give the class indices, {code}.argmax(1) (or keep the "
            "rows, as float targets of a callable loss, torch.nn.CrossEntropyLoss())."
        )
    elif binary and y.ndim == 2:
        fix = (
            "Rows hold several 1s (multi-label), and loss='cross_entropy' takes one class per "
            f"example: give a callable loss{_TAKEN_BY}, torch.nn.BCEWithLogitsLoss(), with float "
            "targets of the outputs' shape."
        )
    elif integer:
        fix = (
            f"For one label per token (or position) give a callable loss{_TAKEN_BY} that "
            "returns the mean "
            "over the examples of each one's mean over its tokens, such as "
            f"{TOKEN_MEAN}, with outputs of shape (N, n_classes, T) (torch.nn.CrossEntropyLoss() "
            "is that mean only when no token is ignored)."
        )
        if shape[-1] == 1:
            fix = f"Remove the last dimension of size 1 ({code}.squeeze(-1)). {fix}"
    else:
        fix = (
            f"For soft labels (rows of class probabilities) give a callable loss{_TAKEN_BY}, "
            "torch.nn.CrossEntropyLoss(), with float targets of shape (N, n_classes); for "
            "real-valued targets (regression) give one such as torch.nn.MSELoss()."
        )
    return ValueError(
        f"{name} must have shape (N,), one label per example, for loss={loss!r}; got shape "
        f"{shape}. {fix}"
    )


def check_labels(y: torch.Tensor, *, loss: str | LossFn, name: str = "y") -> torch.Tensor:
    """Labels that fit a named loss (one per example, shape ``(N,)``: int64 class labels >= 0 for
    cross-entropy, 0 or 1 for binary cross-entropy); the targets of a callable loss are returned
    as they are.

    Args:
        y: the labels, a tensor.
        loss: the loss's name, or a callable loss (whose targets are not checked).
        name: the argument's name, for the messages.

    Returns:
        ``y``, as int64 for cross-entropy.

    Raises:
        ValueError: if labels for a named loss are not of shape ``(N,)`` (:func:`label_shape_error`
            says how to fix the common shapes), are negative for cross-entropy, or are not 0 or 1
            for binary cross-entropy.
        TypeError: if labels for cross-entropy are not integers, or labels for binary
            cross-entropy are complex.

    Example:
        >>> check_labels(torch.tensor([[0], [2]]), loss="cross_entropy")
        Traceback (most recent call last):
        ...
        ValueError: y must have shape (N,), one label per example, for loss='cross_entropy'; got
        shape (2, 1). Remove the dimension of size 1: y.squeeze(1).
    """
    if callable(loss):
        return y
    if y.ndim != 1:
        raise label_shape_error(y, loss=loss, name=name)
    if loss == "cross_entropy":
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            fix = (
                "return them as integers from the Dataset's __getitem__"
                if _from_dataset(name)
                else f"convert them with {name if name.isidentifier() else 'y'}.long()"
            )
            hint = (
                f" Class labels: {fix}. Regression targets: give a callable loss{_TAKEN_BY}, "
                "such as torch.nn.MSELoss()."
                if y.is_floating_point()
                else ""
            )
            raise TypeError(
                f"{name} must hold integer class labels for loss='cross_entropy', got dtype "
                f"{y.dtype}.{hint}"
            )
    elif y.is_complex():
        raise TypeError(f"{name} must hold real labels 0 or 1 for loss='bce', got dtype {y.dtype}.")
    if (bad := first_bad_label(y, loss=loss)) is not None:
        position, need, value = bad
        raise ValueError(f"{name} must hold {need}; got {value} at position {position}.")
    return y.long() if loss == "cross_entropy" else y  # torch's cross-entropy takes int64 only


def first_bad_label(y: torch.Tensor, *, loss: str) -> tuple[int, str, str] | None:
    """For real labels ``y`` of shape ``(N,)`` and a named ``loss``: the position of the first
    label whose value the loss refuses (negative for cross-entropy, not 0 or 1 for binary
    cross-entropy), what the loss needs, and the label as text; None if every value fits. The
    dtype is not checked.

    Example:
        >>> first_bad_label(torch.tensor([0.0, 1.0, 0.3, 1.0]), loss="bce")
        (2, "labels 0 or 1 for loss='bce'", '0.3')
    """
    if loss == "cross_entropy":
        bad, need = y < 0, "class labels >= 0 for loss='cross_entropy'"
    else:
        bad, need = ~((y == 0) | (y == 1)), "labels 0 or 1 for loss='bce'"
    if not bad.any():
        return None
    position = int(bad.nonzero()[0])
    value = y[position].item()
    return position, need, f"{value:.6g}" if isinstance(value, float) else str(value)
