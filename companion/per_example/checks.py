"""The checks DP-SGD needs of a model: layers that mix examples, and a forward pass that does.

Part of :mod:`companion.per_example`; import from there.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from companion._forward import generator_states, set_generator_states
from companion._outputs import run_model
from companion._torch import check_model, trainable_named
from companion._validation import with_article

__all__ = ["check_dp_compatible", "check_examples_independent"]


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
    :func:`check_examples_independent`. A gradient hook on a trainable parameter
    (``Tensor.register_hook``) is refused too: the per-example gradients would skip it.

    Args:
        model: the model to check.

    Raises:
        TypeError: if ``model`` is not a :class:`torch.nn.Module`, or is the module that
            ``torch.compile(model)`` or ``torch.jit.script`` returns. A model or submodule
            compiled in place (``Module.compile()``) is accepted: the hooks see its layers'
            calls, and a layer whose outputs' gradient a compiled graph hides is computed with
            ``vmap`` instead, with a warning.
        ValueError: listing every layer above, or if a trainable parameter has a gradient hook
            or the model has none.

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
    problems, fixes = [], {}  # fixes: a dict, to keep their order without repeats
    for name, module in model.named_modules():
        if refusal := _refusal(module):
            problems.append(f"layer {name!r} {refusal[0]}" if name else f"the model {refusal[0]}")
            fixes[refusal[1]] = None
    if problems:
        raise ValueError(
            f"model cannot be trained with DP-SGD: {'; '.join(problems)}. {' '.join(fixes)}"
        )
    refuse_gradient_hooks(model.named_parameters())
    trainable_named(model)


_NORMALISATION = (
    "Batch normalisation normalises each example by the batch's statistics, so an example's "
    "gradient depends on the others (and its running statistics average the training data "
    "without noise): use torch.nn.GroupNorm or torch.nn.LayerNorm. For a frozen pretrained "
    "backbone with batch normalisation, compute its features once and train on them."
)
_RUNNING_STATISTICS = (
    "Instance normalisation with track_running_stats=True averages the statistics of the "
    "training batches, without noise, and normalises by that average in evaluation: use "
    "track_running_stats=False."
)
_BY_FREQUENCY = (
    "scale_grad_by_freq scales each token's gradient by its count in the whole batch, so an "
    "example's gradient depends on the others: use scale_grad_by_freq=False."
)
_MAX_NORM = (
    "max_norm renormalises the rows of the tokens an example reads, in place during the forward "
    "pass: a change of the weights by the data, without noise. Use max_norm=None."
)


def _refusal(module: nn.Module) -> tuple[str, str] | None:
    """Why DP-SGD refuses ``module`` and what to do instead; None if it does not."""
    kind = with_article(type(module).__name__)
    if isinstance(module, _BatchNorm):
        return f"is {kind}", _NORMALISATION
    if isinstance(module, _InstanceNorm) and module.track_running_stats:
        return f"is {kind} with track_running_stats=True", _RUNNING_STATISTICS
    if isinstance(module, nn.Embedding | nn.EmbeddingBag):
        if module.scale_grad_by_freq:
            return f"is {kind} with scale_grad_by_freq=True", _BY_FREQUENCY
        if module.max_norm is not None:
            return f"is {kind} with max_norm", _MAX_NORM
    return None


def refuse_gradient_hooks(named: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Raise if a trainable parameter of the ``named`` ones (as ``model.named_parameters()``
    gives them) has a gradient hook, which DP-SGD would skip: it computes each example's
    gradient of each parameter and clips it, and sets ``.grad`` itself, so neither a hook on the
    parameter's gradient (``Tensor.register_hook``) nor one after its accumulation
    (``register_post_accumulate_grad_hook``) would run."""
    hooked = [
        name
        for name, p in named
        if p.requires_grad and (p._backward_hooks or p._post_accumulate_grad_hooks)
    ]
    if hooked:
        raise ValueError(
            f"model's parameter(s) {hooked} have gradient hooks (Tensor.register_hook or "
            "register_post_accumulate_grad_hook), which DP-SGD would skip without a word: it "
            "computes and clips each example's gradient and sets .grad itself, and the hooks "
            "see neither. Remove them (handle.remove()). To train part of a weight, multiply "
            "the weight by a mask in forward; to freeze a whole parameter, call "
            "requires_grad_(False) on it."
        )


def check_examples_independent(model: nn.Module, x: torch.Tensor) -> None:
    """Raise if the model's output for an example changes with the other examples of its batch.

    Clipping bounds each example's influence on the gradient only if the forward pass treats the
    examples of a batch independently. :func:`check_dp_compatible` refuses the layers known to
    mix them; a forward pass written by hand can mix them too (normalising by the batch's mean,
    comparing examples). This runs the model in evaluation mode on the first examples (up to 4),
    together and one at a time, and compares the outputs. It catches mistakes and proves
    nothing: a model that mixes examples in training mode only, or by less than the tolerance,
    passes, and so does a model that draws from a global generator in evaluation mode (Monte
    Carlo dropout) or whose outputs change when it runs again, which cannot be compared, and a
    batch of one example. The global generators (torch's, Python's, numpy's) are left as they
    were. Outputs padded to the batch's longest sequence are compared over the example's own
    length. :func:`companion.dpsgd.train_dpsgd` runs it before training, and a
    :class:`~companion.per_example.PerExampleClipper` on the batches whose layout it checks.

    Args:
        model: the model.
        x: a batch of inputs the model accepts, on its device.

    Raises:
        TypeError: if the model does not return a tensor.
        ValueError: if the model cannot be applied to ``x`` or to a batch of one example, its
            outputs on the batch are NaN, or they differ from the same examples' outputs alone
            (in shape, in an infinite output, or by more than 1% of the largest finite output
            of the batch; 8 roundings, for dtypes with fewer bits).

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
    states = generator_states(x.device)
    try:
        # The model gets copies, which an in-place operation may change: the batch is the
        # caller's.
        first = run_model(model, x[:n].clone())
        if torch.isnan(first).any():
            raise ValueError("the model's outputs on the first examples are NaN.")
        if _drew(states, x.device) or not torch.equal(run_model(model, x[:n].clone()), first):
            return  # random in evaluation mode: nothing to compare with
        alone = [_alone(model, x[i : i + 1].clone()) for i in range(n)]
    finally:
        set_generator_states(states, x.device)
    pairs = [_comparable(row, one) for row, one in zip(first.double(), alone, strict=True)]
    finite = first[first.isfinite()].double()
    eps = torch.finfo(first.dtype).eps if first.is_floating_point() else 0.0
    tolerance = max(1e-2, 8 * eps) * float(finite.abs().max()) if finite.numel() else 0.0
    if any(pair is None or not _close(*pair, tolerance) for pair in pairs):
        raise ValueError(
            "the model's output for an example depends on the other examples of its batch: on "
            f"the first {n} examples, the outputs of one forward pass differ from those of each "
            "example run alone. DP-SGD bounds each example's influence only if the forward pass "
            "treats the examples independently: remove statistics taken over the batch (a mean "
            "or a normalisation over dim 0) and anything that compares examples."
            + time_first_hint(model)
        )


def time_first_hint(model: nn.Module) -> str:
    """For an error about mixing: the layers built with ``batch_first=False`` (recurrent and
    attention layers), which mix the examples of a batch given with the batch first."""
    names = [name for name, m in model.named_modules() if getattr(m, "batch_first", None) is False]
    if not names:
        return ""
    return (
        f" Layer(s) {[name or 'the model' for name in names][:3]} have batch_first=False: they "
        "take inputs of shape (T, B, ...), time first, and mix the examples of a batch given "
        "as (B, T, ...). Build them with batch_first=True, or transpose their input."
    )


def _alone(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's outputs on a batch of one example, as float64; a failure says so."""
    try:
        return run_model(model, x).double()
    except ValueError as error:
        raise ValueError(
            f"the model fails on a batch of one example, which Poisson sampling draws: {error}"
        ) from None


def _comparable(row: torch.Tensor, alone: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """An example's outputs in the batch and alone, flattened to one shape: as they are when they
    have as many elements (a squeeze may take a batch of one's first dimension), cropped to
    their common size when only their lengths differ (outputs padded to the batch's longest
    sequence); None if neither."""
    if alone.numel() == row.numel():
        return row.reshape(-1), alone.reshape(-1)
    if alone.dim() != row.dim() + 1 or alone.shape[0] != 1:
        return None
    crop = tuple(slice(0, min(p, q)) for p, q in zip(row.shape, alone.shape[1:], strict=True))
    return row[crop].reshape(-1), alone[0][crop].reshape(-1)


def _close(a: torch.Tensor, b: torch.Tensor, tolerance: float) -> bool:
    """Equal where infinite (a masked logit), within ``tolerance`` where finite."""
    finite = a.isfinite() & b.isfinite()
    return bool(torch.equal(a[~finite], b[~finite]) and ((a - b)[finite].abs() <= tolerance).all())


def _drew(states: tuple, device: torch.device) -> bool:
    """Whether a global generator moved since ``states``."""

    def as_values(snapshot: tuple) -> tuple:  # what == compares
        cpu, cuda, python, (name, keys, *rest) = snapshot
        cuda = None if cuda is None else cuda.cpu().numpy().tobytes()
        return cpu.numpy().tobytes(), cuda, python, name, keys.tobytes(), *rest

    return as_values(states) != as_values(generator_states(device))


def mixes_examples(model: nn.Module) -> str:
    """The error of :func:`~companion.per_example.layout.rows_cross` for a forward pass that
    mixes examples."""
    return (
        "the model's forward pass mixes the examples of a batch (in its current mode): the loss "
        "of one example reads other examples' inputs, as batch statistics or a batch mean do. "
        "DP-SGD's clipping bounds each example's contribution only if its loss depends on that "
        "example alone. Use per-example normalisation (GroupNorm, LayerNorm) in place of batch "
        "statistics." + time_first_hint(model)
    )


#: The warning of a clipper whose checks of :func:`~companion.per_example.layout.rows_cross`
#: never saw every example's input read.
INPUT_UNREAD = (
    "in every batch checked, the input at some place of the batch had a gradient of 0, so whether "
    "the model's forward pass mixes the examples of a batch was not fully checked: make sure it "
    "does not (batch statistics, a batch mean), or DP-SGD's guarantee does not hold."
)
