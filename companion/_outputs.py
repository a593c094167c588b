"""Checks of a model's outputs against the loss and the labels (private, shared).

The training loops, the per-example gradients and the attacks run the model on a few examples
first, so that a model that does not fit its data or loss gets a message naming the mistake
rather than a torch error inside the loop.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from companion._torch import LossFn, OutOfMemoryError, eval_mode
from companion._validation import warn

__all__ = ["batch_outputs", "check_outputs", "looks_like_probabilities", "run_model"]

# A softmax row sums to 1 up to rounding, about n_classes * 2**-24 in float32; logits that are all
# non-negative and sum to 1 within this tolerance for every example do not occur in practice.
_SUM_TOLERANCE = 1e-4


def model_error(x: torch.Tensor, error: Exception) -> ValueError:
    """The error to raise when the model cannot be applied to the inputs ``x``."""
    return ValueError(
        f"model cannot be applied to the inputs (one example has shape {tuple(x.shape[1:])} and "
        f"dtype {x.dtype}): {error}. Check that the inputs' shape and dtype match the model's "
        "first layer (numpy arrays given as x become float32, a Dataset's items keep their "
        "dtype; give token ids as an int64 tensor), that they are on the model's device, and "
        "that token ids are below the Embedding's num_embeddings."
    )


def run_model(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's outputs on ``x``, in evaluation mode without gradients; a model that cannot
    be applied to ``x`` or does not return a tensor gets a message that says so."""
    try:
        with eval_mode(model), torch.no_grad():
            outputs = model(x)
    except OutOfMemoryError:
        raise
    except (RuntimeError, TypeError, IndexError) as error:
        raise model_error(x, error) from None
    if not isinstance(outputs, torch.Tensor):
        raise TypeError(f"model must return a tensor of outputs, got {type(outputs).__name__}.")
    return outputs


def batch_outputs(outputs: object, batch: int) -> torch.Tensor:
    """``outputs``, checked to be a tensor with one row per example of a ``batch``: checked at
    every batch, since a ``.squeeze()`` keeps the rows of a batch of many but not of one."""
    if not isinstance(outputs, torch.Tensor):
        raise TypeError(f"model must return a tensor of outputs, got {type(outputs).__name__}.")
    if outputs.dim() == 0 or outputs.shape[0] != batch:
        raise ValueError(
            f"model returned outputs of shape {tuple(outputs.shape)} for a batch of {batch} "
            "example(s): they must have one row per example along dimension 0. A .squeeze() "
            "removes it from a batch of one, which Poisson sampling draws and vmap gives the "
            "model for each example: use .squeeze(-1)."
        )
    return outputs


def looks_like_probabilities(outputs: torch.Tensor) -> bool:
    """Whether every row of ``(N, n_classes)`` outputs is non-negative and sums to 1, as a
    softmax's rows do (to a few roundings of a low-precision dtype's, if more)."""
    tolerance = _SUM_TOLERANCE
    if outputs.is_floating_point():
        tolerance = max(tolerance, outputs.shape[1] * torch.finfo(outputs.dtype).eps)
    sums = outputs.double().sum(dim=1)
    return bool((outputs >= 0).all() and ((sums - 1).abs() <= tolerance).all())


def check_outputs(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, loss: str | LossFn
) -> None:
    """Run the model on a few examples (:func:`_probe_indices`): it must accept ``x`` and its
    output must fit the loss and the labels (every label of ``y`` below the number of outputs for
    cross-entropy); a callable loss must give the mean of the examples' losses. Outputs that
    look like probabilities with cross-entropy get a warning."""
    index = _probe_indices(y)
    n = len(index)
    outputs = run_model(model, x[index])
    if outputs.ndim == 0 or outputs.shape[0] != n:
        raise ValueError(
            f"model must return one row of outputs per example: {n} examples gave outputs of "
            f"shape {tuple(outputs.shape)}."
        )
    if callable(loss):
        with torch.no_grad():
            _check_mean_loss(loss, outputs, y[index])
        return
    if loss == "cross_entropy":
        if outputs.ndim != 2:
            raise ValueError(
                f"loss='cross_entropy' needs model outputs of shape (N, n_classes), got "
                f"{tuple(outputs[:1].shape)} for one example."
            )
        if int(y.max()) >= outputs.shape[1]:
            raise ValueError(
                f"labels must be below the model's {outputs.shape[1]} outputs for "
                f"loss='cross_entropy', got a label {int(y.max())}."
            )
        if looks_like_probabilities(outputs):
            warn(
                "the model's outputs look like probabilities (each row is non-negative and sums "
                "to 1), but loss='cross_entropy' takes logits and applies the softmax itself: a "
                "softmax in forward trains poorly. Remove it, or return log_softmax."
            )
    elif outputs[:1].numel() != 1:
        raise ValueError(
            f"loss='bce' needs one output logit per example, got shape {tuple(outputs[:1].shape)} "
            "for one example."
        )


def _probe_indices(y: torch.Tensor, first: int = 4) -> torch.Tensor:
    """The first ``first`` examples, and for integer labels the first example of up to ``first``
    other labels: a loss that weights classes or ignores a label is a plain mean on examples
    that share one label (data sorted by class), so the check needs several labels."""
    index = torch.arange(min(first, len(y)), device=y.device)
    if y.ndim != 1 or y.is_floating_point() or y.dtype == torch.bool or len(y) <= first:
        return index
    values, inverse = torch.unique(y, return_inverse=True)
    positions = torch.arange(len(y), device=y.device)
    firsts = torch.full_like(values, len(y), dtype=torch.long)
    firsts = firsts.scatter_reduce(0, inverse, positions, "amin")  # each label's first example
    others = firsts[firsts >= first].sort().values[:first]
    return torch.cat([index, others])


def _check_mean_loss(loss: LossFn, outputs: torch.Tensor, targets: torch.Tensor) -> None:
    """A callable loss must return one number, the mean of its values on each example alone.

    The per-example clipping of DP-SGD assumes it: a loss that sums, or that broadcasts outputs
    of shape (N, 1) against targets of shape (N,) (mixing every output with every target), would
    give other gradients than the examples' own, without an error.
    """
    shapes = f"outputs of shape {tuple(outputs.shape)} and targets of shape {tuple(targets.shape)}"
    try:
        with warnings.catch_warnings():  # torch's broadcast warning, once a call: the run has it
            warnings.filterwarnings("ignore", "Using a target size", UserWarning)
            value = loss(outputs, targets)
            singles = [loss(outputs[i : i + 1], targets[i : i + 1]) for i in range(len(outputs))]
    except (RuntimeError, TypeError, ValueError, IndexError) as error:
        raise ValueError(f"loss cannot be applied to {shapes}: {error}") from None
    if not all(isinstance(v, torch.Tensor) and v.numel() == 1 for v in [value, *singles]):
        got = (
            f"a tensor of shape {tuple(value.shape)}"
            if isinstance(value, torch.Tensor)
            else f"a {type(value).__name__}"
        )
        raise ValueError(
            f"loss must return the mean loss over the examples as a tensor holding one number; on "
            f"{shapes} it returned {got}. Use reduction='mean' (the default of torch's losses)."
        )
    mean = torch.stack([v.reshape(()).double() for v in singles]).mean()
    # A few roundings of the loss's dtype apart: bfloat16 has 8 significant bits.
    eps = torch.finfo(value.dtype if value.is_floating_point() else torch.float64).eps
    if not torch.isclose(value.reshape(()).double(), mean, rtol=max(1e-4, 8 * eps), atol=1e-7):
        raise ValueError(
            f"loss must return the mean over the examples of each one's loss: on {shapes} it "
            f"returned {float(value):.6g}, while the mean of its values on each example alone is "
            f"{float(mean):.6g}. Check that the outputs' shape matches the targets' (a mismatch "
            "broadcasts every output against every target), and that the loss is a plain mean "
            "over the examples: not a sum (reduction='sum'), nor a weighted mean (class weights, "
            "ignore_index, or a mean over the tokens of a padded batch)."
        )
