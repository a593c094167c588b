"""Checks of a model's outputs against the loss and the labels (private, shared).

The training loops, the per-example gradients and the attacks run the model on a few examples
first, so that a model that does not fit its data or loss gets a message naming the mistake
rather than a torch error inside the loop.
"""

from __future__ import annotations

import math
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
    """Run the model on a few examples (:func:`_probe_indices`: up to 8, or 16 for targets that
    are not class labels): it must accept ``x`` and its output must fit the loss and the labels
    (every label of ``y`` below the number of outputs for cross-entropy); a callable loss must
    give the mean of the examples' losses and read nothing else that has a gradient
    (:func:`_check_mean_loss`, which says what the check can miss). Outputs that look like
    probabilities with cross-entropy get a warning."""
    index = _probe_indices(y)
    n = len(index)
    outputs = run_model(model, x[index])
    if outputs.ndim == 0 or outputs.shape[0] != n:
        raise ValueError(
            f"model must return one row of outputs per example: {n} examples gave outputs of "
            f"shape {tuple(outputs.shape)}."
        )
    if callable(loss):
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


def _probe_indices(y: torch.Tensor, first: int = 4, spread: int = 16) -> torch.Tensor:
    """The examples :func:`check_outputs` runs the model on: the first ``first``, then

    * for integer labels of shape ``(N,)``, the first example of up to ``first`` other labels: a
      loss that weights classes or ignores a label is a plain mean on examples that share one
      label (data sorted by class), so the check needs several labels;
    * for other targets (one label per token, float or boolean targets), examples evenly spaced
      over the rest, up to ``spread`` in all: a mean over the tokens of a padded batch is a plain
      mean over examples of one length, and the first examples of a batch often share theirs.
    """
    n = len(y)
    index = torch.arange(min(first, n), device=y.device)
    if n <= first:
        return index
    if y.ndim == 1 and not (y.is_floating_point() or y.is_complex() or y.dtype == torch.bool):
        values, inverse = torch.unique(y, return_inverse=True)
        positions = torch.arange(n, device=y.device)
        firsts = torch.full_like(values, n, dtype=torch.long)
        firsts = firsts.scatter_reduce(0, inverse, positions, "amin")  # each label's first example
        others = firsts[firsts >= first].sort().values[:first]
        return torch.cat([index, others])
    rest = torch.linspace(first, n - 1, min(spread - first, n - first), device=y.device)
    return torch.cat([index, rest.round().long().unique()])


def _check_mean_loss(loss: LossFn, outputs: torch.Tensor, targets: torch.Tensor) -> None:
    r"""A callable loss must return one number, the mean of its values on each example alone,
    and read nothing but its arguments.

    The per-example clipping of DP-SGD assumes it: a loss that sums, or weights the examples
    unequally, or broadcasts outputs of shape (N, 1) against targets of shape (N,) (mixing every
    output with every target), would give other gradients than the examples' own, and the
    clipping would no longer bound one example's effect; a loss that reads a model parameter
    (an L2 penalty) would have that term's gradient dropped. Both without an error, so both
    are checked on the probed examples (:func:`_probe_indices`):

    * the loss of the outputs detached from the model must not require a gradient (it reads
      another tensor that does: a parameter);
    * its value must be the mean :math:`\frac1n\sum_i \ell(o_i, t_i)` of its values on each
      example alone;
    * its gradient with respect to each example's outputs must be :math:`\frac1n` times that
      of the example's loss alone. This catches a weighted mean even where the examples' losses
      happen to be equal (a mean over the tokens of a padded batch weights example :math:`i` by
      its token count :math:`T_i`, giving :math:`n T_i / \sum_j T_j` times the mean's gradient).

    What it can still miss: a weighting that is uniform on the probed examples, at most 16 of
    them (padding, class weights or ignored labels only on examples outside the probe, or a
    padded batch whose probed examples happen to share one length; a Dataset is checked on its
    first 256 examples only, set_private_gradients checks each batch it is given); a loss that
    reads tensors outside its arguments that do not require a gradient (a batch statistic kept
    in a global, a counter, random numbers); and a loss that mixes examples only on inputs
    other than the probed ones (a branch on the batch's size, say).
    """
    shapes = f"outputs of shape {tuple(outputs.shape)} and targets of shape {tuple(targets.shape)}"
    n, targets = len(outputs), targets.detach()
    leaf = outputs.detach()
    differentiable = leaf.is_floating_point() or leaf.is_complex()
    try:
        with warnings.catch_warnings(), torch.enable_grad():
            # torch's broadcast warning, once a call: the run has it
            warnings.filterwarnings("ignore", "Using a target size", UserWarning)
            detached = loss(leaf.clone(), targets)  # each call on a copy: a loss may change it
            leaf.requires_grad_(differentiable)
            value = loss(leaf.clone(), targets)
            singles = [loss(leaf[i : i + 1].clone(), targets[i : i + 1]) for i in range(n)]
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
    if isinstance(detached, torch.Tensor) and detached.requires_grad:
        raise ValueError(
            "loss must read only its arguments (outputs, targets): on outputs detached from the "
            "model its value still requires a gradient, so it reads another tensor that does, "
            "such as a model parameter (an L2 penalty on a weight). The per-example gradients "
            "flow through the outputs only and would drop that term's gradient silently. Give a "
            "weight penalty as the optimizer's weight_decay (torch.optim.SGD(..., "
            "weight_decay=...)): it reads no data, so it costs no privacy."
        )
    total = value.detach().reshape(()).double()
    mean = torch.stack([v.detach().reshape(()).double() for v in singles]).mean()
    # A few roundings of the loss's dtype apart: bfloat16 has 8 significant bits.
    eps = torch.finfo(value.dtype if value.is_floating_point() else torch.float64).eps
    rtol = max(1e-4, 8 * eps)
    hint = (
        "Check that the outputs' shape matches the targets' (a mismatch broadcasts every output "
        "against every target), and that the loss is a plain mean over the examples: not a sum "
        "(reduction='sum'), nor a weighted mean (class weights, ignore_index, or a mean over the "
        "tokens of a padded batch: average each example's tokens first, as in "
        "(F.cross_entropy(o, t, reduction='none').sum(1) / (t != -100).sum(1)).mean())."
    )
    if not torch.isclose(total, mean, rtol=rtol, atol=1e-7):
        raise ValueError(
            f"loss must return the mean over the examples of each one's loss: on {shapes} it "
            f"returned {float(total):.6g}, while the mean of its values on each example alone is "
            f"{float(mean):.6g}. {hint}"
        )
    with torch.enable_grad():
        mismatch = _gradient_mismatch(value, singles, leaf)
    # the gradients are rounded in the outputs' dtype too (float16: 11 significant bits)
    rtol = max(rtol, 8 * torch.finfo(leaf.dtype).eps) if leaf.is_floating_point() else rtol
    if mismatch is not None and mismatch[0] > rtol:
        raise ValueError(
            f"loss must be the mean over the examples of each one's loss: on {shapes}, its "
            f"gradient with respect to one example's outputs is {mismatch[1]:.4g} times a mean's "
            f"(the gradient of that example's loss alone, divided by the {n} examples; the two "
            f"differ by {mismatch[0]:.3g} of the larger), so the loss weights the examples "
            f"unequally or mixes them. {hint}"
        )


def _gradient_mismatch(
    value: torch.Tensor, singles: list[torch.Tensor], leaf: torch.Tensor
) -> tuple[float, float] | None:
    """How far ``n`` times the gradient of ``value`` (the loss of ``n`` examples) with respect to
    each example's outputs (a row of ``leaf``) is from the gradient of that example's loss alone
    (``singles``): the largest norm of the difference over the examples, relative to the largest
    gradient's norm, and for that example the ratio of the two gradients' norms. None when the
    loss is not differentiable in the outputs or all gradients are zero or not finite."""
    own = [s.reshape(()) for s in singles if s.requires_grad]
    if not value.requires_grad or not own:
        return None
    try:
        batch = torch.autograd.grad(value.reshape(()), leaf, allow_unused=True)[0]
        alone = torch.autograd.grad(torch.stack(own).sum(), leaf, allow_unused=True)[0]
    except RuntimeError as error:
        raise ValueError(f"the loss cannot be differentiated in the outputs: {error}") from None
    if batch is None or alone is None:
        return None
    n = len(leaf)
    batch, alone = batch.double().reshape(n, -1) * n, alone.double().reshape(n, -1)
    norms_batch, norms_alone = batch.norm(dim=1), alone.norm(dim=1)
    scale = torch.maximum(norms_batch, norms_alone).max()
    if not torch.isfinite(scale) or scale == 0:
        return None
    differences = (batch - alone).norm(dim=1) / scale
    worst = int(differences.argmax())
    ratio = float(norms_batch[worst] / norms_alone[worst]) if norms_alone[worst] > 0 else math.inf
    return float(differences[worst]), ratio
