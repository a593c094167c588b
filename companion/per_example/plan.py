"""Which layers of a model the rules take, and which parameters fall back to vmap.

Part of :mod:`companion.per_example`; import from there. The plan is made once, from the module
tree (:func:`plan_layers`); the batches may then move hooked layers to vmap (:func:`move_to_vmap`)
or show along which dimension a layer holds the examples (``LayerPlan.dims``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from types import MappingProxyType
from typing import NamedTuple

from torch import nn

from companion._torch import trainable_named
from companion._validation import warn
from companion.per_example.composite import (
    Part,
    computed_weights,
    is_composite,
    own_parameters,
    parameter_names,
    parts,
)
from companion.per_example.rules import LAYER_RULES

__all__: list[str] = []


class LayerPlan(NamedTuple):
    """Which layers the rules handle and which parameters fall back to vmap."""

    hooked: list[tuple[str, nn.Module]]  # layers with a rule and trainable parameters
    fallback: list[str]  # trainable parameters computed with vmap
    reasons: list[str]  # why, per layer, for messages
    copies: bool = False  # whether the model changes a hooked layer's input or output in place
    #: hooked layer -> the dimension of its input and output that holds the examples (0, or 1
    #: for a sequence laid out (T, B, F)), as the checked batches settled it
    #: (:func:`~companion.per_example.layout.rows_cross`); a layer no check settled is absent
    dims: Mapping[nn.Module, int] = MappingProxyType({})


def plan_layers(model: nn.Module) -> LayerPlan:
    """Hook every layer with a rule whose trainable parameters are its own; vmap the rest.

    A layer falls back to vmap over the model if it holds other layers and parameters of its own
    (a subclass of MultiheadAttention, with the ``out_proj`` whose parameters it reads itself),
    if it has no rule and hooks of its own (:func:`_why_no_rule`), if it holds a trainable
    parameter its rule does not compute (``weight_norm``'s ``weight_g``), if its ``forward`` is
    replaced on the instance, if it (or an ``out_proj`` it reads) appears twice in the module
    tree, or if one of its parameters is shared with another layer (tied weights): a rule sees
    one call of one layer, while the gradient of a shared parameter sums over all of them.
    (Reads that only the forward pass shows are found for each batch, by :func:`autograd_graph`.)"""
    canonical = {id(p): name for name, p in model.named_parameters()}
    module_uses: Counter[int] = Counter()
    param_owners: Counter[int] = Counter()
    for _, module in model.named_modules(remove_duplicate=False):
        module_uses[id(module)] += 1
        if module_uses[id(module)] == 1:
            param_owners.update(id(p) for p in module.parameters(recurse=False))
    hooked, fallback, reasons = [], [], []
    read_uncalled: set[nn.Module] = set()  # sublayers whose parent reads their parameters
    for name, module in model.named_modules():
        if module in read_uncalled:
            continue
        read = _read_sublayers(module)
        read_uncalled.update(read)
        own = [p for m in [module, *read] for p in m.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        why = _why_no_rule(module)
        once = [module_uses[id(m)] == 1 for m in [module, *read]]
        alone = all(once) and all(param_owners[id(p)] == 1 for p in own)
        if why is None and alone:  # a layer of parts: its products, each a layer of the plan
            hooked.extend((name, m) for m in (parts(module) if is_composite(module) else [module]))
            continue
        fallback.extend(canonical[id(p)] for p in own if canonical[id(p)] not in fallback)
        where = f"layer {name!r}" if name else "the model"
        reasons.append(f"{where} {why or 'shares its parameters'}")
    return LayerPlan(hooked, fallback, reasons)


def _read_sublayers(module: nn.Module) -> list[nn.Module]:
    """The sublayers whose parameters ``module`` reads without calling them (MultiheadAttention's
    ``out_proj``), which no hook sees: they go where the module's own parameters go."""
    return [module.out_proj] if isinstance(module, nn.MultiheadAttention) else []


def _why_no_rule(module: nn.Module) -> str | None:
    """Why no rule computes the layer's gradients (None if one does): parameters that the rules
    do not handle, or a call that may not be the layer's own maths. A layer of a type without a
    rule (PReLU, your own) takes vmap over its own call (:func:`vmap_over_call`) if it holds no
    other layer and no hooks, which that call would run again. (A forward hook is fine on a layer
    with a rule: the hooks that keep its output run first.)"""
    kind = type(module).__name__
    ruled = parameter_names(module) if is_composite(module) else {"weight", "bias"}
    if is_composite(module) and (computed := computed_weights(module)):
        return f"({kind}) computes {computed} (weight_norm), which no rule does"
    if type(module) not in LAYER_RULES and not is_composite(module):
        if read := _read_sublayers(module):
            inside = {id(p) for m in [module, *read] for p in m.parameters(recurse=False)}
            names = [n for n, p in module.named_parameters() if p.requires_grad and id(p) in inside]
            return f"({kind}) reads parameters {names} itself, which no rule computes"
        if next(module.children(), None) is not None:  # a container with parameters of its own
            names = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
            return f"({kind}) holds parameters {names} itself, which no rule computes"
        hooks = (module._forward_pre_hooks, module._forward_hooks, module._backward_hooks)
        if any(hooks) or module._backward_pre_hooks:
            return f"({kind}) has no rule and hooks of its own"
    elif extra := [
        n for n, p in module.named_parameters(recurse=False) if p.requires_grad and n not in ruled
    ]:  # e.g. weight_g and weight_v of torch.nn.utils.weight_norm
        return f"({kind}) has parameters {extra}, which its rule does not compute"
    elif isinstance(module, nn.EmbeddingBag) and module.mode == "max":
        return f"({kind}) has mode='max', which its rule does not compute"
    if "forward" in vars(module):
        # replaced on the instance (by a wrapper): the call may not compute the rule's maths
        return f"({kind}) has its forward replaced"
    return None


def check_unchanged(model: nn.Module, trainable: dict[str, nn.Parameter]) -> None:
    """Refuse a ``model`` whose trainable parameters are no longer ``trainable``, those planned
    for: a layer replaced, frozen, unfrozen, pruned or parametrized since; or not made yet."""
    if lazy := [name for name, p in trainable.items() if nn.parameter.is_lazy(p)]:
        raise ValueError(
            f"the model's parameter(s) {lazy[:5]} are not made yet: a lazy layer (nn.LazyLinear) "
            "makes them at its first call. Call the model once on a batch of inputs (under "
            "torch.no_grad()) before the clipper's first batch; train_dpsgd and "
            "set_private_gradients do it themselves."
        )
    now = dict(trainable_named(model))
    if now.keys() != trainable.keys() or any(p is not trainable[n] for n, p in now.items()):
        raise ValueError(
            "the model's trainable parameters are no longer those the clipper was built for "
            f"({sorted(now.keys() ^ trainable.keys()) or 'a parameter replaced'}): a layer "
            "replaced, frozen or unfrozen, pruned or parametrized since. Build a new "
            "PerExampleClipper for the model as it is now."
        )


def move_to_vmap(plan: LayerPlan, layers: list[tuple[str, nn.Module]]) -> LayerPlan:
    """``plan`` with the hooked ``layers`` moved to vmap."""
    fallback = plan.fallback + [
        f"{name}.{n}" if name else n
        for name, module in layers
        for n, p in own_parameters(module)
        if p.requires_grad
    ]
    hooked = [layer for layer in plan.hooked if layer not in layers]
    return plan._replace(hooked=hooked, fallback=fallback)


def checked(
    plan: LayerPlan, wrong: list[tuple[str, nn.Module]], found: dict[nn.Module, list[int]]
) -> tuple[LayerPlan, list[tuple[str, nn.Module]]]:
    """``plan`` after a batch's check of its rows
    (:func:`~companion.per_example.layout.rows_cross`), and the layers whose layout changed.

    The ``wrong`` layers move to vmap. A layer for which the check left one dimension (in
    ``found``) is settled on it, unless an earlier check settled it on the other: a layout that
    changes from batch to batch, which a later batch's shapes cannot tell apart where B = T,
    so the layer moves to vmap too, and is returned. A layer the check left both dimensions
    for (they gave the same sums on this batch) stays as it was."""
    dims, changed = dict(plan.dims), []
    for name, layer in plan.hooked:
        left = found.get(layer, [])
        if len(left) == 1 and dims.setdefault(layer, left[0]) != left[0]:
            changed.append((name, layer))
    return move_to_vmap(plan._replace(dims=dims), wrong + changed), changed


#: Why a layer without a rule falls back when vmap over its call fails, for :func:`warn_moved`.
NOT_REPEATED = (
    "gives another output when its call is repeated (a random draw, state set outside the call, "
    "a hook added since the clipper was built, an input the call changes in place), or vmap "
    "fails on it"
)

#: Why a layer falls back when the graph shows its parameters read by more than its call (or a
#: layer without a rule reading one twice: the graph does not tell where), for :func:`warn_moved`.
READ_ELSEWHERE = (
    "is called more than once, or has a parameter read more than once in its call or outside it"
)

#: Why a layer :class:`Capture` put in ``odd`` falls back, for :func:`warn_moved`.
ODD_CALL = (
    "takes or returns more than one tensor, has its forward replaced, is called with tensors "
    "swapped in for its parameters (torch.func.functional_call), or makes a call its rule does "
    "not take"
)

#: Why a layer falls back when no check of its rows saw every row read (a zero gradient), for
#: :func:`warn_moved`.
UNREAD = (
    "has an output row that no batch checked showed read (its gradient was 0 in each), so which "
    "example's loss reads it is not known"
)

#: Why a layer falls back when its rows are not the examples, for :func:`warn_moved`.
ROWS_ARE_NOT_EXAMPLES = (
    "is called on an input whose rows are not the batch's examples (a flattened batch, a sequence "
    "laid out (T, B, F) into a layer of a type that takes the batch first only, a batch reordered "
    "around it, or a layout the checked batches did not show)"
)

#: Why a layer falls back when the checked batches showed it on two layouts, for
#: :func:`warn_moved`.
LAYOUT_CHANGED = (
    "holds the batch's examples along dimension 0 in some batches and along dimension 1 in "
    "others, which the shapes of a batch with as many examples as positions cannot tell apart"
)


def warn_moved(layers: list[tuple[str, nn.Module]], why: str) -> None:
    """Name the hooked ``layers`` that move to vmap, and why."""
    if layers:
        warn(
            f"{layer_names(layers)} {why}: its per-example gradients are computed with vmap from "
            "now on, which is slower; the result is the same."
        )


def layer_names(layers: list[tuple[str, nn.Module]], *, kinds: bool = False) -> str:
    """``layer 'a', 'b'`` for messages, with each layer's type if ``kinds``; ``the model`` for the
    one layer named '' (a model that is itself a layer with no sublayers)."""
    # a layer's parts are named once, by the layer's name and type
    named = {name: m.layer if isinstance(m, Part) else m for name, m in layers}
    kind = {name: f" ({type(m).__name__})" if kinds else "" for name, m in named.items()}
    if list(named) == [""]:
        return f"the model{kind['']}"
    return "layer " + ", ".join(f"{name!r}{kind[name]}" for name in named)
