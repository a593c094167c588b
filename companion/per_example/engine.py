"""The layerwise engine: hooks on the layers of any module tree, the rules, a vmap fallback.

Part of :mod:`companion.per_example`; import from there.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge

from companion._forward import check_buffers_unwritten, parameters_unwritten, refuse_inference
from companion._outputs import batch_outputs
from companion._torch import LossFn, trainable_named
from companion._validation import check_positive, warn
from companion.per_example.checks import INPUT_UNREAD, check_dp_compatible, refuse_gradient_hooks
from companion.per_example.gradients import (
    ClippedSum,
    LossLike,
    Method,
    add_clipped,
    check_batch,
    check_method,
    materialised,
    resolve_loss,
    vmap_gradients,
    without_autocast,
)
from companion.per_example.graph import above_others, autograd_graph, refuse_reentrant_checkpoint
from companion.per_example.layout import (
    RowsRead,
    batch_dim,
    check_input_unchanged,
    forward_with_capture,
    global_forward_hooks,
    rows_cross,
)
from companion.per_example.plan import (
    LAYOUT_CHANGED,
    NOT_REPEATED,
    ODD_CALL,
    READ_ELSEWHERE,
    ROWS_ARE_NOT_EXAMPLES,
    UNREAD,
    LayerPlan,
    check_unchanged,
    checked,
    layer_names,
    move_to_vmap,
    plan_layers,
    warn_moved,
)
from companion.per_example.rules import LAYER_RULES, RuleOutput, vmap_over_call

__all__ = ["PerExampleClipper", "clipped_gradient_sum"]

# --- the layerwise engine -----------------------------------------------------------------------


def layerwise_add_clipped(
    model: nn.Module,
    plan: LayerPlan,
    mean_loss: LossFn,
    sum_loss: LossFn,
    x: torch.Tensor,
    y: torch.Tensor,
    max_grad_norm: float,
    into: dict[str, torch.Tensor],
    scale: float,
) -> tuple[torch.Tensor, LayerPlan]:
    """Add ``scale`` times the clipped sum of the batch into ``into`` with the rules; the norms,
    and the plan for the next batches: with the hooked layers this batch showed the rules do not
    apply to moved to vmap (named in a warning), and with copies if the model needed them."""
    # The vmap pass of the parameters known to fall back runs first: before the hooked pass's
    # tensors exist, not while they are all alive.
    version = x._version  # each pass over the model must read the batch as it was
    grads = vmap_gradients(model, mean_loss, x, y, plan.fallback) if plan.fallback else {}
    if grads:
        check_input_unchanged(x, version)
    capture, outputs = forward_with_capture(model, plan.hooked, x, copy=plan.copies)
    if not plan.copies and capture.changed():
        # A layer's input or output was changed in place (ReLU(inplace=True)): again, with
        # copies, for this batch and the next ones. The first pass's graph is freed first.
        capture = outputs = None
        plan = plan._replace(copies=True)
        check_input_unchanged(x, version)
        capture, outputs = forward_with_capture(model, plan.hooked, x, copy=True)
    loss = sum_loss(batch_outputs(outputs, x.shape[0]), y)
    reads, nodes = autograd_graph(loss)
    refuse_reentrant_checkpoint(nodes)
    active, misread, misrowed, odd = [], [], [], []
    along: dict[nn.Module, int] = {}  # the dimension of each active layer's examples
    small: set[nn.Module] = set()  # active layers whose per-example gradients are small
    for name, module in plan.hooked:
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        # The hook keeps a layer's last call; the rule applies if it reads every parameter once
        # and the call's input and output hold one example of the batch each along a dimension
        # (0, or 1 for a sequence laid out (T, B, F)) that the plan or the shapes settle.
        seen = capture.seen.get(module)
        read_once = (
            seen is not None and seen[1].grad_fn in nodes and all(reads[id(p)] == 1 for p in own)
        )
        if module in capture.odd:
            odd.append((name, module))
        elif read_once and (dim := batch_dim(plan, module, *seen[:2], x.shape[0])) is not None:
            active.append((name, module))  # each parameter read once in the graph: by this call
            along[module] = dim
            # Per-example gradients that take no more room than the input and output (a
            # LayerNorm's, not a convolution's): materialised, they free more than they take.
            if sum(p.numel() for p in own) * x.shape[0] <= seen[0].numel() + seen[1].numel():
                small.add(module)
        elif read_once:
            misrowed.append((name, module))
        elif any(reads[id(p)] for p in own):  # read by several calls or outside the call
            misread.append((name, module))
        # else no parameter of the layer reaches the loss, and its gradients are 0
    # The outputs' places in the graph, not the outputs: an output no later operation saves
    # (a Linear's, read by a ReLU) is then freed, not held through the backward pass.
    edges = {m: get_gradient_edge(capture.seen[m][1]) for _, m in active}
    inputs = {m: capture.seen[m][0] for _, m in active}  # what the rules read besides
    # and, for a layer without a rule, the output vmap over its call must give again
    kept = {m: capture.seen[m][1].detach() for _, m in active if type(m) not in LAYER_RULES}
    capture = outputs = seen = None  # every other reference to the outputs (seen: the loop's)
    found: dict[nn.Module, RuleOutput | None] = {}  # None: vmap over the call did not apply

    def apply_rule(module: nn.Module, b: torch.Tensor) -> None:
        # a and b are released once the rule returns, unless its entries keep them
        with torch.no_grad():
            a = inputs.pop(module).detach()
            if along[module] == 1:  # the rules take the examples along dimension 0
                a, b = a.transpose(0, 1), b.transpose(0, 1)
            versions = a._version, b._version
            if type(module) in LAYER_RULES:
                found[module] = LAYER_RULES[type(module)](module, a, b)
            else:
                found[module] = vmap_over_call(module, a, b, kept.pop(module))
            if (a._version, b._version) != versions:  # the backward pass may still read them
                raise ValueError(
                    f"the rule for {type(module).__name__} changed its input or output gradient "
                    "in place; a rule must leave them as they are (work on a copy)."
                )

    # A layer above another hooked layer reads its output gradient in a hook on its node, as the
    # backward pass reaches it, after any hook on the output tensor (autograd.grad skips those of
    # an edge whose node it still runs). A small layer's rule runs there, freeing its input and
    # output gradient early; the others' run after the pass, as do the lowest layers' (asked of
    # autograd.grad), once the pass's saved tensors are freed (in the pass, the per-example
    # gradients of the MNIST CNN's second convolution raised its peak from 20.4 to 28.4 MiB).
    later: dict[nn.Module, torch.Tensor] = {}  # output gradients for the rules after the pass

    def on_reaching(module: nn.Module) -> Callable[[tuple[torch.Tensor | None, ...]], None]:
        def hook(grad_outputs: tuple[torch.Tensor | None, ...]) -> None:
            if (b := grad_outputs[edges[module].output_nr]) is None:
                return
            if type(module) in LAYER_RULES and module in small:
                apply_rule(module, b)
            else:
                later[module] = b

        return hook

    above = above_others(loss, edges)
    asked = [m for _, m in active if m not in above]  # empty only if no layer is active
    handles = [edges[m].node.register_prehook(on_reaching(m)) for m in above]
    try:
        targets = [edges[m] for m in asked]
        asked_grads = torch.autograd.grad(loss, targets, allow_unused=True) if asked else ()
    finally:
        for handle in handles:
            handle.remove()
    later.update((m, b) for m, b in zip(asked, asked_grads, strict=True) if b is not None)
    asked_grads = ()  # each gradient is released once its rule has run, in the layers' order
    for _, module in active:
        if (b := later.pop(module, None)) is not None:
            apply_rule(module, b)
    b = None
    # A compiled model's graph holds the outputs the hooks keep, but gives them no gradient.
    hidden = [(name, m) for name, m in active if m not in found]
    not_repeated = [(name, m) for name, m in active if m in found and found[m] is None]
    warn_moved(misread, READ_ELSEWHERE)
    warn_moved(misrowed, ROWS_ARE_NOT_EXAMPLES)
    warn_moved(hidden, "has an output whose gradient autograd does not give (torch.compile)")
    warn_moved(odd, ODD_CALL)
    warn_moved(not_repeated, NOT_REPEATED)
    moved = misread + misrowed + hidden + odd + not_repeated
    entries = [
        (f"{name}.{p}" if name else p, sq, add_to)
        for name, module in active
        for p, sq, add_to in found.get(module) or []
    ]
    plan = move_to_vmap(plan, moved)
    if late := [name for name in plan.fallback if name not in grads]:
        check_input_unchanged(x, version)
        grads.update(vmap_gradients(model, mean_loss, x, y, late))
    with torch.no_grad():
        entries.extend(materialised(name, g) for name, g in grads.items())
        if not entries:  # the forward pass reached no trainable layer: every gradient is 0
            return x.new_zeros(x.shape[0], dtype=model_dtype(model)), plan
        return add_clipped(entries, max_grad_norm, into, scale), plan


def model_dtype(model: nn.Module) -> torch.dtype:
    return next(p for p in model.parameters() if p.requires_grad).dtype


#: How many batches (of two examples or more) each clipper checks with :func:`rows_cross`: the
#: layout of a layer seldom depends on the data, but a sort by length can leave a batch as it is.
#: A check counts only if every row it checked has been seen read (:class:`RowsRead`).
_CHECKED_BATCHES = 3


class PerExampleClipper:
    """The clipped gradient sum of :func:`clipped_gradient_sum`, planned once for many batches.

    Checks the model, the loss and the method and plans which layers use which rule once; each
    call then computes one batch's :class:`ClippedSum`. The DP-SGD loop builds one per run.

    Args:
        model: the model; its parameters are read, not changed (a buffer may be: each call runs
            forward passes, which advance ``spectral_norm``'s power iteration). Once its
            trainable parameters change (a layer added, frozen, pruned, given new ones), the clipper
            refuses a batch: build a new one.
        loss: ``"cross_entropy"``, ``"bce"`` or a callable returning the mean loss over examples.
        method: ``"auto"``, ``"vmap"`` or ``"layerwise"`` (see :func:`clipped_gradient_sum`).

    Attributes:
        trainable: parameter name -> trainable parameter, as when the clipper was built.

    Raises:
        TypeError: if an argument is of the wrong kind.
        ValueError: if the model has no trainable parameter, has a layer that
            :func:`check_dp_compatible` refuses, or ``method="layerwise"`` does not apply.

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
        check_dp_compatible(model)  # a model that mixes examples has no per-example gradients
        self.model = model
        self.mean_loss, self.sum_loss = resolve_loss(loss)
        self.method = check_method(method)
        self.trainable = dict(trainable_named(self.model))
        self.plan = None if self.method == "vmap" else plan_layers(self.model)
        self._warned_hooks = False  # whether a global forward hook has been warned about
        self._checks = RowsRead(_CHECKED_BATCHES)  # of batches of >= 2 examples
        if self.plan is not None and self.plan.fallback:
            reasons = "; ".join(self.plan.reasons)
            if self.method == "layerwise":
                raise ValueError(
                    f"method='layerwise' does not apply: {reasons}. Use method='auto' "
                    "(vmap for those layers only) or method='vmap'."
                )
            warn(
                f"{reasons}: their per-example gradients are computed with vmap, which is "
                "slower than the per-layer rules; the result is the same."
            )
        hooked = self.plan.hooked if self.plan is not None else []
        if own := [(n, m) for n, m in hooked if type(m) not in LAYER_RULES]:
            warn(
                f"{layer_names(own, kinds=True)} has no rule: vmap over its own call computes its "
                "per-example gradients, which is slower than a rule; the result is the same."
            )

    def __call__(self, x: torch.Tensor, y: torch.Tensor, *, max_grad_norm: float) -> ClippedSum:
        """The clipped sum and norms of the batch ``(x, y)`` (checked by the caller)."""
        check_unchanged(self.model, self.trainable)  # before zeros_like reads the parameters
        sums = {name: torch.zeros_like(p) for name, p in self.trainable.items()}
        return ClippedSum(sums, self.add_clipped_sum(x, y, max_grad_norm=max_grad_norm, into=sums))

    def add_clipped_sum(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        max_grad_norm: float,
        into: dict[str, torch.Tensor],
        scale: float = 1.0,
    ) -> torch.Tensor:
        """Add ``scale`` times the clipped sum of the batch ``(x, y)`` into ``into``, in place.

        What DP-SGD uses (:func:`companion.dpsgd.noisy_clipped_gradient`): ``into`` holds the
        noise and ``scale`` is :math:`1/m`, so that clipping, noising and dividing by the expected
        batch size take no pass over the parameters besides the one that adds the sum.

        Args:
            x, y: the batch (checked by the caller; it may be empty).
            max_grad_norm: the clipping norm :math:`C`, > 0.
            into: parameter name -> tensor of the parameter's shape, dtype and device, for
                every trainable parameter; changed in place.
            scale: the factor applied to every clipped gradient.

        Returns:
            The per-example gradient norms before clipping, shape ``(B,)``.

        Raises:
            TypeError: if the batch is not two tensors.
            ValueError: if the model's trainable parameters changed since the clipper was
                built or a lazy layer's are not made yet, ``into`` lacks one or holds a tensor
                unlike it (shape, dtype, device), an example's gradient is not finite (then
                nothing is added), the model runs layers in a reentrant checkpoint, the rules'
                checks see its forward pass mix the first examples, its first passes write a
                parameter's values or a buffer from the data, it changes its input in place
                where another pass follows, or the batch was made in inference mode.
            RuntimeError: inside ``torch.inference_mode()`` (under ``torch.no_grad()`` the
                clipper turns gradients on for its own passes).

        Example:
            >>> import torch
            >>> from companion import models
            >>> model = models.logistic_regression()
            >>> into = {name: torch.ones_like(p) for name, p in model.named_parameters()}
            >>> norms = PerExampleClipper(model, loss="cross_entropy").add_clipped_sum(
            ...     torch.ones(3, 64), torch.tensor([0, 1, 2]), max_grad_norm=1.0, into=into,
            ...     scale=0.0)
            >>> bool((into["0.weight"] == 1).all()), norms.shape  # scale 0 adds nothing
            (True, torch.Size([3]))
        """
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TypeError(
                f"the batch must be two torch tensors, got {type(x).__name__} and "
                f"{type(y).__name__}."
            )
        refuse_inference(("x", "y"), (x, y))
        check_unchanged(self.model, self.trainable)
        if missing := [name for name in self.trainable if name not in into]:
            raise ValueError(f"into lacks the trainable parameter(s) {missing}.")
        if unlike := [name for name, p in self.trainable.items() if not _alike(into[name], p)]:
            raise ValueError(
                f"into must hold tensors of the parameters' shapes, dtypes and devices; those of "
                f"{unlike} are not."
            )
        refuse_gradient_hooks(self.trainable.items())  # at every batch, as a hook may be new
        if x.shape[0] == 0:
            return x.new_zeros(0, dtype=model_dtype(self.model))
        if self._checks.left > 0:  # before the batch's passes
            check_buffers_unwritten(self.model, x)
        plan = self.plan
        if plan is not None and global_forward_hooks():  # checked at every batch: no rules
            plan = None
            if not self._warned_hooks:
                self._warned_hooks = True
                warn(
                    "a global forward hook is registered (register_module_forward_hook): it may "
                    "change the outputs the per-layer rules read, so while it is, every "
                    "per-example gradient is computed with vmap, which is slower; the result is "
                    "the same."
                )
        # Under a caller's torch.no_grad() too, where the rules would see no graph; the forward
        # passes of the first batches (every batch under vmap) must not write the parameters.
        unwritten = parameters_unwritten(self.model, check=self._checks.left > 0)
        with torch.enable_grad(), unwritten, without_autocast(x.device):
            if plan is None:
                grads = vmap_gradients(self.model, self.mean_loss, x, y, list(self.trainable))
                with torch.no_grad():
                    entries = [materialised(name, g) for name, g in grads.items()]
                    return add_clipped(entries, max_grad_norm, into, scale)
            if self._checks.left > 0 and x.shape[0] >= 2:  # one example: nothing to mix
                check = rows_cross(self.model, plan, self.sum_loss, x[:8], y[:8])
                warn_moved(check.wrong, ROWS_ARE_NOT_EXAMPLES)
                self.plan, changed = checked(plan, check.wrong, check.dims)
                warn_moved(changed, LAYOUT_CHANGED)
                # only a batch that passed counts: one that raised is checked again
                unread, input_unread = self._checks.add(check, list(self.trainable.values()))
                warn_moved(unread, UNREAD)
                if input_unread:
                    warn(INPUT_UNREAD)
                self.plan = plan = move_to_vmap(self.plan, unread)
            norms, self.plan = layerwise_add_clipped(
                self.model, plan, self.mean_loss, self.sum_loss, x, y, max_grad_norm, into, scale
            )
        return norms


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
    rules (those of ``LAYER_RULES``, and ``vmap`` over the call of a layer without one that holds
    no other layer), and raises ``ValueError`` naming every trainable layer no rule applies to.
    ``method="auto"`` uses the rules where they apply and ``vmap`` for the other layers'
    parameters only, with a warning naming them. A layer that a batch shows to be called more
    than once, to have a parameter read outside its call (tied weights), to take rows that are
    not the examples or to take or return more than one tensor falls back to ``vmap`` under
    both methods, with a warning (seen in the batch; see :mod:`companion.per_example`).

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
        ValueError: if an argument is out of range or ``method="layerwise"`` does not apply,
            and as :meth:`PerExampleClipper.add_clipped_sum` raises.
        RuntimeError: inside ``torch.inference_mode()``.

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
    x, y = check_batch(model, loss, x, y)
    max_grad_norm = check_positive("max_grad_norm", max_grad_norm)
    result = clipper(x, y, max_grad_norm=max_grad_norm)
    return result if return_norms else result.sums


def _alike(tensor: object, parameter: torch.Tensor) -> bool:
    """Whether ``tensor`` is a tensor of ``parameter``'s shape, dtype and device."""
    return (
        isinstance(tensor, torch.Tensor)
        and tensor.shape == parameter.shape
        and tensor.dtype == parameter.dtype
        and tensor.device == parameter.device
    )
