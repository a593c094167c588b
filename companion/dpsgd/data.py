"""The data of a :func:`~companion.dpsgd.train_dpsgd` run: tensors, arrays or a Dataset, checked
and read in Poisson batches.

Part of :mod:`companion.dpsgd`; used by its training loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

from companion._forward import check_buffers_unwritten, parameters_unwritten
from companion._labels import class_labels, first_bad_label
from companion._outputs import (
    LABEL_CHUNK_ELEMENTS,
    check_label_weights,
    check_outputs,
    run_model,
)
from companion._torch import EVAL_BATCH, SEVERAL_INPUTS, LossFn, check_data
from companion._validation import with_article
from companion.per_example import check_examples_independent

__all__: list[str] = []  # RunData serves train_dpsgd; it is not part of the public API


class RunData:
    """The training or test data of a run, as in-memory tensors or a
    :class:`torch.utils.data.Dataset`.

    Tensors are checked whole once. A Dataset is checked as it is read: every batch (also those
    of the evaluation after each epoch) must hold ``(input, target)`` pairs that pass
    :func:`~companion._torch.check_data`, with labels below the model's number of outputs; a
    callable loss must weight a class label first read there as it weights the others
    (:func:`~companion._outputs.check_label_weights`: an ``ignore_index`` on a label first met
    after the first 256 examples is refused too). ``names`` are the arguments' names, for the
    messages.
    """

    def __init__(
        self,
        x: object,
        y: object,
        loss: str | LossFn,
        device: torch.device,
        names: tuple[str, str] = ("x", "y"),
    ) -> None:
        self.device, self.loss, self.names = device, loss, names
        self.classes: int | None = None  # the model's outputs, for cross-entropy on a Dataset
        # For a callable loss on class labels read from a Dataset: a few examples' outputs and
        # the labels for which the loss's weight was checked.
        self.probe: torch.Tensor | None = None
        self.labels: set[int] = set()
        if isinstance(x, DataLoader):
            raise TypeError(
                f"{names[0]} is a DataLoader: pass its Dataset ({names[0]}.dataset); train_dpsgd "
                "batches it itself (training data by Poisson sampling, as its accounting assumes)."
            )
        if isinstance(x, Dataset):
            if y is not None:
                raise ValueError(
                    f"give {names[1]} only with tensor or array inputs, not with a Dataset."
                )
            self.dataset: Dataset | None = x
            self.n = _dataset_length(x, names[0])
            if self.n == 0:
                raise ValueError(f"the Dataset {names[0]} must hold at least one example.")
            self.x, self.y = None, None
        else:
            if x is None or y is None:
                raise ValueError(
                    f"give {names[0]} and {names[1]} together, or {names[0]} alone as a "
                    "torch.utils.data.Dataset."
                )
            self.dataset = None
            self.x, self.y = check_data(x, y, loss=loss, names=names, device=device)
            self.n = self.x.shape[0]

    def check(self, model: nn.Module) -> None:
        """The model's output fits the loss and the labels: all of them for tensors, those of the
        first 256 examples of a Dataset (whose later batches are checked as they are read); and
        it treats the first examples independently."""
        if self.dataset is None:
            x, y = self.x, self.y
        else:
            x, y = self._read(range(min(self.n, 256)))
            x, y = x.to(self.device), y.to(self.device)
        check_buffers_unwritten(model, x)  # before any pass over the data
        with parameters_unwritten(model):
            try:
                check_outputs(model, x, y, loss=self.loss)
            except (TypeError, ValueError) as error:
                if self.names == ("x", "y"):
                    raise
                data = self.names[0] if self.dataset is not None else " and ".join(self.names)
                raise type(error)(f"on {data}: {error}") from None
            check_examples_independent(model, x)
            if self.dataset is not None and self.loss == "cross_entropy":
                self.classes = run_model(model, x[:1]).shape[1]
            if self.dataset is not None and callable(self.loss) and class_labels(y):
                self.probe, self.labels = run_model(model, x[:8]), set(y.unique().tolist())

    def _read(self, index: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Checked tensors ``(x, y)`` of the Dataset's ``(input, target)`` items at ``index``, on
        the CPU; a bad item is named by its index in the Dataset."""
        assert self.dataset is not None
        items = [self.dataset[i] for i in index]
        name = self.names[0]
        for i, item in zip(index, items, strict=True):
            if not isinstance(item, tuple | list) or len(item) != 2:
                got = with_article(type(item).__name__)
                got += f" of length {len(item)}" if isinstance(item, tuple | list) else ""
                raise ValueError(
                    f"a Dataset given as {name} must return (input, target) pairs; one of its "
                    f"items is {got} (its item at index {i})."
                )
        try:
            x, y = default_collate(items)
        except (RuntimeError, TypeError) as error:
            raise ValueError(_stack_error(name, index, items, error)) from None
        if not isinstance(x, torch.Tensor):  # ((x1, x2), y): the inputs collate to a list
            raise ValueError(
                f"a Dataset given as {name} must return one input tensor per item; its item at "
                f"index {index[0]} returns {with_article(type(items[0][0]).__name__)} as input. "
                + SEVERAL_INPUTS
            )
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.ndim > 0:
            finite = torch.isfinite(x.reshape(len(x), -1)).all(dim=1)
            if not finite.all():
                i = index[int((~finite).nonzero()[0])]
                raise ValueError(
                    f"the inputs of the Dataset {name} must not contain NaN or infinite values; "
                    f"its item at index {i} does."
                )
        names = (f"the inputs of the Dataset {name}", f"the targets of the Dataset {name}")
        bad = _bad_label(self.loss, items, y)
        if bad is not None:
            raise ValueError(
                f"{names[1]} must hold {bad[1]}; its item at index {index[bad[0]]} has {bad[2]}."
            )
        x, y = check_data(x, y, loss=self.loss, names=names)
        self._check_new_labels(y, index)
        if self.classes is not None and int(y.max()) >= self.classes:
            j = int((y >= self.classes).nonzero()[0])
            raise ValueError(
                f"labels must be below the model's {self.classes} outputs for "
                f"loss='cross_entropy', got a label {int(y[j])} in the Dataset {name}, at index "
                f"{index[j]}."
            )
        return x, y

    def _check_new_labels(self, y: torch.Tensor, index: Sequence[int]) -> None:
        """For a callable loss on class labels: the labels of ``y`` not read before must be
        weighted as one read before is (:func:`~companion._outputs.check_label_weights` with the
        probed outputs, on as many new labels at a time as one chunk of the check holds; in a
        refused group, each is checked alone to name the one refused)."""
        if self.probe is None or not class_labels(y):
            return
        new = [label for label in y.unique().tolist() if label not in self.labels]
        size = max(1, LABEL_CHUNK_ELEMENTS // max(1, self.probe[0].numel()) - 1)
        for start in range(0, len(new), size):
            group = new[start : start + size]
            if (error := self._refusal(group)) is None:
                self.labels.update(group)
                continue
            label, error = next(
                ((label, e) for label in group if (e := self._refusal([label])) is not None),
                (group[0], error),  # refused only together: name the first
            )
            j = int((y == label).nonzero()[0])
            raise ValueError(
                f"{error} (Checked on the label {label}, first read from the Dataset "
                f"{self.names[0]} at its index {index[j]}.)"
            )

    def _refusal(self, labels: list[int]) -> ValueError | None:
        """The error of the label check on ``labels`` and a label read before; None if none."""
        assert self.probe is not None
        try:
            check_label_weights(self.loss, self.probe, torch.tensor([min(self.labels), *labels]))
        except ValueError as error:
            return error
        return None

    def batch(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.dataset is None:
            index = torch.nonzero(mask.to(self.device)).squeeze(1)  # one sync on a GPU, not two
            return self.x[index], self.y[index]
        index = torch.nonzero(mask).squeeze(1).tolist()
        x, y = self._read(index or [0])
        if not index:  # an empty batch, shaped as the first example's
            x, y = x[:0], y[:0]
        return x.to(self.device), y.to(self.device)

    def evaluation(self) -> tuple[torch.Tensor, torch.Tensor] | DataLoader:
        """The data as :func:`~companion._torch.epoch_record` evaluates it: the tensors, or the
        Dataset in batches."""
        if self.dataset is None:
            return self.x, self.y
        # batches of indices, read (and checked) by _read, which names a bad item's index
        return DataLoader(range(self.n), batch_size=EVAL_BATCH, collate_fn=self._read)


def _dataset_length(dataset: Dataset, name: str) -> int:
    """The number of examples of a map-style ``dataset`` given as argument ``name``."""
    kind = type(dataset).__name__
    if isinstance(dataset, IterableDataset):
        raise TypeError(
            f"{name} is an IterableDataset ({kind}), which yields examples in its own order and "
            "has no length: Poisson sampling draws each example independently by its index, so "
            "train_dpsgd needs a map-style torch.utils.data.Dataset with __len__ and "
            "__getitem__ (a TensorDataset, say)."
        )
    try:
        return len(dataset)
    except TypeError:
        raise TypeError(
            f"{name} is a Dataset ({kind}) without __len__: Poisson sampling draws each example "
            "independently by its index, so train_dpsgd needs a map-style "
            "torch.utils.data.Dataset with __len__ and __getitem__."
        ) from None


def _bad_label(loss: object, items: list[Any], y: object) -> tuple[int, str, str] | None:
    """For labels ``y`` of shape (N,) stacked from a Dataset's ``items``: the place of the first
    that the named ``loss`` refuses, what it needs and what the item has; None if none is."""
    if loss not in ("cross_entropy", "bce") or not isinstance(y, torch.Tensor) or y.ndim != 1:
        return None
    if y.is_complex():
        return None  # check_labels names the dtype
    if loss == "cross_entropy" and y.is_floating_point():  # stacked with a float among integers
        floats = [j for j, item in enumerate(items) if _is_float(item[1])]
        if len(floats) == len(items):
            return None  # all floats: check_labels names the dtype
        j = floats[0]
        return j, "integer class labels for loss='cross_entropy'", f"a float, {float(y[j])}"
    if (bad := first_bad_label(y, loss=loss)) is None:
        return None
    j, need, value = bad
    return j, need, f"the label {value}"


def _is_float(value: object) -> bool:
    """Whether a target read from a Dataset is a float (a number, an array or a tensor)."""
    if isinstance(value, torch.Tensor):
        return value.is_floating_point()
    if isinstance(value, np.ndarray | np.floating):
        return bool(np.issubdtype(value.dtype, np.floating))
    return isinstance(value, float)


def _shape(value: object) -> tuple[int, ...] | None:
    """The shape of a tensor, array or number as default_collate stacks it; None otherwise."""
    if isinstance(value, torch.Tensor | np.ndarray):
        return tuple(value.shape)
    return () if isinstance(value, int | float | np.number) else None


def _stack_error(name: str, index: Sequence[int], items: list[Any], error: Exception) -> str:
    """The message for Dataset ``items`` (at ``index``) that default_collate cannot stack: the
    first item whose input or target has another shape or kind than the first item's."""
    first = [(_shape(part), type(part)) for part in items[0]]
    for i, item in zip(index, items, strict=True):
        for part, what, (shape, kind) in zip(item, ("input", "target"), first, strict=True):
            if _shape(part) != shape or (shape is None and type(part) is not kind):
                got = f"shape {_shape(part)}" if _shape(part) is not None else type(part).__name__
                want = f"shape {shape}" if shape is not None else kind.__name__
                return (
                    f"the Dataset {name}'s items cannot be stacked into a batch: the {what} of "
                    f"its item at index {i} has {got}, where that of the item at index "
                    f"{index[0]} has {want}. "
                    "Every item's input must have one shape, and every target (pad sequences "
                    "of tokens to one length)."
                )
    return f"the Dataset {name}'s items cannot be stacked into a batch: {error}"
