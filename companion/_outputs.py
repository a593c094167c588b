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

from companion._labels import TOKEN_MEAN, class_labels, integer_targets
from companion._torch import LossFn, OutOfMemoryError, eval_mode, loss_rounding
from companion._validation import warn, with_article

__all__ = [
    "LABEL_CHUNK_ELEMENTS",
    "batch_outputs",
    "check_label_weights",
    "check_outputs",
    "looks_like_probabilities",
    "run_model",
]

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
    except (RuntimeError, TypeError, ValueError, IndexError) as error:
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
    (:func:`_check_mean_loss`, which says what the check can miss), and for class labels of
    shape ``(N,)`` weight every label of ``y`` alike (:func:`check_label_weights`). Outputs that
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
        _check_mean_loss(loss, outputs, y[index], index=index)
        if class_labels(y):
            check_label_weights(loss, outputs, y)
        return
    if loss == "cross_entropy":
        if outputs.ndim != 2:
            raise ValueError(
                f"loss='cross_entropy' needs model outputs of shape (N, n_classes), got "
                f"{tuple(outputs[:1].shape)} for one example."
            )
        if int(y.max()) >= outputs.shape[1]:
            position = int(torch.nonzero(y >= outputs.shape[1])[0, 0])
            raise ValueError(
                f"labels must be below the model's {outputs.shape[1]} outputs for "
                f"loss='cross_entropy', got a label {int(y[position])} at position {position}."
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
      label (data sorted by class), so the check needs several labels (and
      :func:`check_label_weights` pairs every label with the probed outputs);
    * for other targets (one label per token, float or boolean targets), examples evenly spaced
      over the rest, up to ``spread`` in all: a mean over the tokens of a padded batch is a plain
      mean over examples of one length, and the first examples of a batch often share theirs.
      For integer targets of more dimensions the spread ones make room for the examples with the
      fewest and the most occurrences of each of the few most frequent target values
      (:func:`_extreme_rows`): with padding, the longest and the shortest examples, even when a
      few long ones among many short ones would fall between the evenly spaced examples.
    """
    n = len(y)
    index = torch.arange(min(first, n), device=y.device)
    if n <= first:
        return index
    if class_labels(y):
        values, inverse = torch.unique(y, return_inverse=True)
        positions = torch.arange(n, device=y.device)
        firsts = torch.full_like(values, n, dtype=torch.long)
        firsts = firsts.scatter_reduce(0, inverse, positions, "amin")  # each label's first example
        others = firsts[firsts >= first].sort().values[:first]
        return torch.cat([index, others])
    if y.ndim > 1 and integer_targets(y):
        index = torch.cat([index, _extreme_rows(y)]).unique()
    count = min(max(spread - len(index), 0), n - first)
    rest = torch.linspace(first, n - 1, count, device=y.device)
    return torch.cat([index, rest.round().long()]).unique()


def _extreme_rows(y: torch.Tensor, values: int = 3, sample: int = 1024) -> torch.Tensor:
    """For each of the ``values`` most frequent values of integer targets ``y`` (counted on up to
    ``sample`` evenly spaced examples; the padding value, as a rule, comes first), the examples
    that hold it the fewest and the most times."""
    rows = y.reshape(len(y), -1)
    seen = torch.linspace(0, len(y) - 1, min(len(y), sample), device=y.device).round().long()
    found, counts = rows[seen].unique(return_counts=True)
    extremes = [torch.arange(0, device=y.device)]
    for value in found[counts.argsort(descending=True)[:values]]:
        count = (rows == value).sum(1)
        extremes.append(torch.stack([count.argmin(), count.argmax()]))
    return torch.cat(extremes)


def _call(loss: LossFn, outputs: torch.Tensor, targets: torch.Tensor, shapes: str) -> torch.Tensor:
    """``loss(outputs, targets)``, checked to be a tensor holding one number (as a scalar)."""
    try:
        with warnings.catch_warnings():  # outputs (N, 3) against targets (N, 1), say
            warnings.filterwarnings("error", "Using a target size", UserWarning)
            value = loss(outputs, targets)
    except UserWarning as warning:  # torch's losses broadcast with this warning only
        raise ValueError(
            f"loss broadcasts the outputs against the targets: on {shapes}, torch warns "
            f"'{warning}' Give the targets the outputs' shape."
        ) from None
    except (RuntimeError, TypeError, ValueError, IndexError) as error:
        raise ValueError(f"loss cannot be applied to {shapes}: {error}") from None
    if not (isinstance(value, torch.Tensor) and value.numel() == 1):
        kind = with_article(type(value).__name__)
        got = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else kind
        raise ValueError(
            f"loss must return the mean loss over the examples as a tensor holding one number; on "
            f"{shapes} it returned {got}. Use reduction='mean' (the default of torch's losses)."
        )
    return value.reshape(())


def _gradient(value: torch.Tensor, wrt: torch.Tensor) -> torch.Tensor | None:
    """The gradient of ``value`` with respect to ``wrt``; None where it has none."""
    if not value.requires_grad:
        return None
    try:
        return torch.autograd.grad(value, wrt, allow_unused=True)[0]
    except RuntimeError as error:
        raise ValueError(f"the loss cannot be differentiated in the outputs: {error}") from None


def _norms(batch: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """The norms of two gradients of one example's outputs and of their difference, in float64
    without a float64 copy of more than that example's gradient."""
    dtype = torch.complex128 if batch.is_complex() else torch.float64
    difference = batch.to(dtype) - own
    return torch.stack(
        [torch.linalg.vector_norm(t, dtype=dtype).real for t in (batch, own, difference)]
    )


def _check_mean_loss(
    loss: LossFn, outputs: torch.Tensor, targets: torch.Tensor, *, index: torch.Tensor | None = None
) -> None:
    r"""A callable loss must return one number, the mean of its values on each example alone,
    and read nothing but its arguments.

    The per-example clipping of DP-SGD assumes it: a loss that sums, weights the examples
    unequally or broadcasts outputs against targets (which :func:`_call` refuses as torch warns
    of it) would give other gradients, and the clipping would no longer bound one example's
    effect; a loss that reads a model parameter (an L2 penalty) would have that term's gradient
    dropped. Both without an error, so both are checked on the probed examples
    (:func:`_probe_indices`; ``index``, their places in the data, names one in the messages):

    * the loss of the outputs detached from the model must not require a gradient (it reads
      another tensor that does: a parameter, or a tensor made with ``requires_grad=True``);
    * its values must be finite, and the batch's must be the mean
      :math:`\frac1n\sum_i \ell(o_i, t_i)` of its values on each example alone;
    * the gradient of :math:`n` times it (the sum the engine differentiates; a mean's gradient
      underflows in float16) with respect to each example's outputs must be that of the
      example's loss alone. This catches a weighted mean even where the examples' losses
      happen to be equal (a mean over the tokens of a padded batch weights example :math:`i` by
      its token count :math:`T_i`, giving :math:`n T_i / \sum_j T_j` times the mean's gradient).

    What it can still miss: a weighting that is uniform on the probed examples, at most 16 of
    them (weights carried in float targets, or padding when the probed examples share one
    length although the extremes of the most frequent values' counts are probed; for labels of
    shape (N,), class weights and ignored labels are checked on every label, a Dataset's as
    they are read, by :func:`check_label_weights`); a weighting of gradients so small that
    float16 holds them to its subnormal spacing (:func:`_gradient_mismatch`); a loss that reads
    tensors outside its arguments that do not require a gradient (a batch statistic kept in a
    global, a counter, random numbers); and a loss that mixes examples only on inputs other than
    the probed ones (a branch on the batch's size, say).
    """
    shapes = f"outputs of shape {tuple(outputs.shape)} and targets of shape {tuple(targets.shape)}"
    n, targets = len(outputs), targets.detach()
    leaf = outputs.detach()
    differentiable = leaf.is_floating_point() or leaf.is_complex()
    norms = []  # per example: n x the batch's gradient, the example's own, their difference
    with torch.enable_grad():
        # each call on a copy: a loss may change its outputs in place
        if _call(loss, leaf.clone(), targets, shapes).requires_grad:
            raise ValueError(
                "loss must read only its arguments (outputs, targets): on outputs detached from "
                "the model its value still requires a gradient, so it reads another tensor that "
                "requires a gradient (a model parameter, or a tensor made with "
                "requires_grad=True). The per-example gradients flow through the outputs only "
                "and would drop that term's gradient silently. Give a weight penalty as the "
                "optimizer's weight_decay (torch.optim.SGD(..., weight_decay=...)): it reads no "
                "data, so it costs no privacy; start a sum from 0, not from a tensor made with "
                "requires_grad=True."
            )
        leaf.requires_grad_(differentiable)
        value = _call(loss, leaf.clone(), targets, shapes)
        batch = _gradient(value * n, leaf)  # frees the batch's graph before the examples'
        total, singles = value.detach().double(), []
        for i in range(n):
            row = leaf[i : i + 1].detach().requires_grad_(differentiable)
            single = _call(loss, row.clone(), targets[i : i + 1], shapes)
            own = _gradient(single, row)
            if batch is not None and own is not None:
                norms.append(_norms(batch[i], own[0]))
            singles.append(single.detach().double())
    del batch
    values = torch.stack(singles)
    if not (torch.isfinite(total) and torch.isfinite(values).all()):
        _not_finite(total, values, index, shapes)
    mean = values.mean()
    # A few roundings of the loss's arithmetic apart (bfloat16 has 8 significant bits); below
    # the dtype's smallest normal number (tiny) values are held to an absolute tiny * eps only,
    # and a few operations on them can be off by up to tiny.
    finfo = loss_rounding(loss, leaf, targets, value)
    rtol = max(1e-4, 8 * finfo.eps)
    hint = (
        "Check that the outputs' shape matches the targets' (a mismatch broadcasts every output "
        "against every target), and that the loss is a plain mean over the examples: not a sum "
        "(reduction='sum'), nor a weighted mean (class weights, ignore_index, or a mean over the "
        f"tokens of a padded batch: average each example's tokens first, as in {TOKEN_MEAN})."
    )
    if not torch.isclose(total, mean, rtol=rtol, atol=max(1e-7, finfo.tiny)):
        raise ValueError(
            f"loss must return the mean over the examples of each one's loss: on {shapes} it "
            f"returned {float(total):.6g}, while the mean of its values on each example alone is "
            f"{float(mean):.6g}. {hint}"
        )
    # the gradients are rounded in the outputs' dtype too (float16: 11 significant bits)
    rtol = max(rtol, 8 * torch.finfo(leaf.dtype).eps) if leaf.is_floating_point() else rtol
    mismatch = _gradient_mismatch(torch.stack(norms), leaf, rtol) if norms else None
    if mismatch is not None:
        raise ValueError(
            f"loss must be the mean over the examples of each one's loss: on {shapes}, its "
            f"gradient with respect to one example's outputs is {mismatch[1]:.4g} times a mean's "
            f"(the gradient of that example's loss alone, divided by the {n} examples; the two "
            f"differ by {mismatch[0]:.3g} of the larger), so the loss weights the examples "
            f"unequally or mixes them. {hint}"
        )


def _not_finite(
    total: torch.Tensor, values: torch.Tensor, index: torch.Tensor | None, shapes: str
) -> None:
    """The error for a loss not finite on the batch (``total``) or an example alone (``values``)."""
    if torch.isfinite(values).all():  # the batch alone: an overflow, or examples mixed
        raise ValueError(
            f"loss must be finite: on {shapes} it returned {float(total):.6g}, although it is "
            "finite on each example alone. A sum that overflows (in float16, say) or a loss "
            "that mixes the examples (a normalisation by the batch) does this."
        )
    i = int((~torch.isfinite(values)).int().argmax())
    where = f"index {int(index[i])} of the examples given" if index is not None else f"place {i}"
    got = f"returned {float(total):.6g}, and {float(values[i]):.6g} on the example at {where} alone"
    causes = (
        "Seen in practice: an example whose targets are all ignored (an ignore_index, or tokens "
        "that are all padding), whose mean over its tokens is 0/0 (divide by the count clamped "
        f"to at least 1, as in {TOKEN_MEAN}); log-probabilities of -inf (take log_softmax of the "
        "logits, not the log of a softmax); NaN in the outputs or the targets."
    )
    if torch.isfinite(total):  # the batch's loss leaves that example out: a weight of 0
        raise ValueError(
            f"loss must be the mean over the examples of each one's loss: on {shapes} it {got}, "
            "so the batch's loss is a weighted mean that gives that example weight 0, or mixes "
            f"the examples. {causes}"
        )
    raise ValueError(f"loss must be finite: on {shapes} it {got}. {causes}")


def _gradient_mismatch(
    norms: torch.Tensor, leaf: torch.Tensor, rtol: float
) -> tuple[float, float] | None:
    """Whether ``n`` times the gradient of the loss of ``n`` examples with respect to each
    example's outputs (a row of ``leaf``) is further from the gradient of that example's loss
    alone than rounding allows; ``norms`` holds, per example, the norms of the two and of their
    difference. None when within rounding, or all gradients are zero or not finite; otherwise
    the largest difference's norm relative to the largest gradient's norm, and for that example
    the ratio of the two gradients' norms.

    The allowance: ``rtol`` of the largest gradient's norm, and an absolute floor. Below the
    outputs' dtype's smallest normal number (``finfo.tiny``, 6.1e-5 in float16) numbers are
    subnormal: their spacing is a fixed ``tiny * eps`` (6e-8 in float16), not a share of the
    number, so ``rtol`` does not cover their rounding (the softmax of a confident model has
    probabilities near e**-14 = 8e-7). Allowing each element of either gradient 8 such spacings
    (as ``rtol`` allows 8 roundings of a normal number) bounds the difference of two gradients
    of ``m`` elements by ``2 * 8 * sqrt(m) * tiny * eps`` in norm: the floor (nothing in float32).
    A weighting of gradients that are all within it is not seen.
    """
    norms_batch, norms_alone, differences = norms.unbind(1)
    scale = torch.maximum(norms_batch, norms_alone).max()
    if not torch.isfinite(scale) or scale == 0:
        return None
    finfo = torch.finfo(leaf.dtype) if leaf.is_floating_point() else None
    floor = 16 * math.sqrt(leaf[0].numel()) * finfo.tiny * finfo.eps if finfo else 0.0
    worst = int(differences.argmax())
    if differences[worst] <= rtol * scale + floor:
        return None
    ratio = float(norms_batch[worst] / norms_alone[worst]) if norms_alone[worst] > 0 else math.inf
    return float(differences[worst] / scale), ratio


#: Output elements :func:`check_label_weights` checks in one chunk, and in all (500 labels of
#: 32000 classes took 26 ms a check, a step 490 ms; 136 ms with 2**22 and 2**24).
LABEL_CHUNK_ELEMENTS, _TOTAL_ELEMENTS = 2**20, 2**22


def check_label_weights(loss: LossFn, outputs: torch.Tensor, y: torch.Tensor) -> None:
    r"""A callable loss on class labels ``y`` of shape ``(N,)`` must weight every label alike:
    :func:`_check_mean_loss` sees the probed labels only, and class weights or an ignored label
    on a rare class the probe missed passed (one example moved the clipped sum by 2.5 to 3.9 C).

    The check pairs every distinct label of ``y`` with the probed ``outputs``, reused in turn,
    in a batch of :math:`K` examples, and splits it in two by each bit :math:`b` of an example's
    place (:math:`S_b`, the places with bit :math:`b` set, and the rest). A plain mean gives
    :math:`L(A \cup B) = (|A| L(A) + |B| L(B)) / (|A| + |B|)` exactly (up to rounding); a mean
    weighted by :math:`w` gives :math:`(W_A L(A) + W_B L(B)) / (W_A + W_B)`, with :math:`W_A` the
    weights' sum on :math:`A`, which differs when the parts' average weights
    :math:`W_A / |A|` and :math:`W_B / |B|` differ (and their losses do). A part of ignored labels
    alone gives no finite loss. That is :math:`1 + 2 \lceil \log_2 K \rceil` calls of the loss.
    Many labels (or large outputs) are split in chunks of 2**20 to 2**21 output elements, each
    with the rarest and the most frequent labels dealt in turn, and at most 2**22 elements in
    all, the rarest labels first (the others are not checked). What it misses: weights within a
    few roundings (in 16 bits, up to about 2 on one label of 20), and any weighting when the
    loss is infinite on one of the pairings (a masked logit)."""
    labels, counts = torch.unique(y, return_counts=True)
    size = max(2, LABEL_CHUNK_ELEMENTS // (row := max(1, outputs[0].numel())))  # labels a chunk
    labels = labels[counts.argsort(stable=True)][: max(size, _TOTAL_ELEMENTS // row)]
    chunks = max(1, len(labels) // size)
    with torch.no_grad():
        for c in range(chunks if len(labels) > 1 else 0):
            _check_parts(loss, outputs, labels[c::chunks].to(outputs.device))


def _check_parts(loss: LossFn, outputs: torch.Tensor, labels: torch.Tensor) -> None:
    """:func:`check_label_weights` on one chunk of ``labels``, each paired with a row of
    ``outputs`` in turn (each call on a new copy of the rows: a loss may change them)."""
    k = len(labels)
    rows = torch.arange(k, device=outputs.device) % len(outputs)
    shapes = f"a batch of {k} examples, the probed outputs with each label of y once"

    def mean_on(part: torch.Tensor) -> float:  # part: a mask, or places
        return float(_call(loss, outputs[rows[part]], labels[part], shapes))

    value = _call(loss, outputs[rows], labels, shapes)
    whole = float(value)
    finfo = loss_rounding(loss, outputs[rows], labels, value)
    # Both sides average the same per-example values: a few roundings of the largest of them (16
    # examples alone; a critic's o * t on centred targets cancels in the means) apart: 8 in 16
    # bits, 64 in float32 (1e-4 missed a weight of 2 on one of 1000 labels), 1e-12 in float64.
    rtol = 8 * finfo.eps if finfo.bits == 16 else max(64 * finfo.eps, 1e-12)
    if not math.isfinite(whole):
        return  # a loss infinite on some pairing (a masked logit): nothing to compare
    spaced = torch.linspace(0, k - 1, min(k, 16), device=outputs.device).round().long()
    size = max(abs(mean_on(spaced[i : i + 1])) for i in range(len(spaced)))
    for bit in range(math.ceil(math.log2(k))):
        part = (torch.arange(k, device=outputs.device) >> bit) % 2 == 1
        m = int(part.sum())
        left, right = mean_on(part), mean_on(~part)
        combined = (m * left + (k - m) * right) / k
        allowed = rtol * max(abs(whole), abs(left), abs(right), size) + max(1e-7, finfo.tiny)
        if not abs(whole - combined) <= allowed:  # also when a part's loss is not finite
            raise ValueError(
                f"loss must weight every label alike (a plain mean over the examples of each "
                f"one's loss): on {shapes}, it returned {whole:.6g}, not the mean of its values "
                f"on two parts of {m} and {k - m} of them weighted by their sizes "
                f"({combined:.6g}; the parts gave {left:.6g} and {right:.6g}). So it weights "
                "the examples by their labels, as class weights (weight=...) or an ignore_index "
                "do: an example's share of the gradient then depends on the others' labels, and "
                "the clipping no longer bounds it. Weight each example's own loss and take the "
                "plain mean, as in (w[t] * F.cross_entropy(o, t, reduction='none')).mean(), and "
                "leave examples with an ignored label out of the data."
            )
