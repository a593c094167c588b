"""Whether a hooked layer's rows are the batch's examples, as the layer rules assume.

Part of :mod:`companion.per_example`; import from there.

A rule reads row :math:`i` of a layer's input and output as example :math:`i`'s. A layer that
computes every position alike (``Linear``, ``Embedding``, ``LayerNorm``) may also hold the
examples along dimension 1, a sequence laid out ``(T, B, F)``: the rule then takes the input and
output with those two dimensions swapped. Rows are not examples for a batch flattened to
``(B*T, F)``, nor for a forward pass that reorders the batch around the layer (``x.flip(0)``, a
sort by length) and puts it back: the model still treats examples independently, but the rule
would give one example's gradient part of another's, and one example could then move the
clipped sum by more than :math:`C`. Every batch's shapes are checked (:func:`batch_dim`), and
the autograd graph of a few examples of the first batches shows which rows each example's loss
reads (:func:`rows_cross`), and whether it reads other examples' inputs: a forward pass that
mixes examples, which no per-example gradient can serve, is refused (as is one whose outputs on
the first examples change when they are run alone, which autograd does not always show). The
hooks that keep each layer's call (:class:`Capture`) and the warnings naming the layers that move
to vmap live here too.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
from torch import nn

from companion._outputs import batch_outputs, model_error
from companion._torch import LossFn, OutOfMemoryError
from companion._validation import warn
from companion.per_example.checks import check_examples_independent, mixes_examples
from companion.per_example.composite import Part, call, holds_own, own_parameters
from companion.per_example.graph import autograd_graph, refuse_reentrant_checkpoint
from companion.per_example.plan import LayerPlan

__all__: list[str] = []


class Capture:
    """Forward hooks that keep each hooked layer's input and output.

    They run before any forward hook of the user's (``prepend``), so that they keep what the
    layer itself computed, not an output a user's hook changed. Copies shield what they keep from
    in-place changes made further on (``ReLU(inplace=True)``): the inputs are copied if
    ``copy_inputs``, and the outputs if ``copy_outputs`` (the layer then passes on the copy).
    A call of one tensor to one tensor is kept in ``seen``; a layer called otherwise (more
    inputs, a tuple out) is put in ``odd``: no rule can repeat that call. A layer of parts (a
    recurrent layer, a MultiheadAttention: :mod:`~companion.per_example.composite`) runs its
    products, whose inputs and outputs are kept in ``seen``, or its parts are put in ``odd`` for
    a call those do not compute (an input torch's layer refuses, one under a checkpoint). A layer
    whose ``forward`` was replaced on the instance, or that is called with tensors swapped in for
    its parameters (``torch.func.functional_call``), is put in ``odd`` too: its call may not
    compute the rule's maths with the parameters the rule credits."""

    def __init__(
        self, layers: list[tuple[str, nn.Module]], *, copy_inputs: bool, copy_outputs: bool
    ) -> None:
        self.seen: dict[nn.Module, tuple[torch.Tensor, torch.Tensor, int, int]] = {}
        self.odd: set[nn.Module] = set()
        self.copy_inputs, self.copy_outputs = copy_inputs, copy_outputs
        self.handles, composite = [], {}
        self.own = {m: own_parameters(m) for _, m in layers}
        for _, m in layers:
            if "forward" in vars(m.layer if isinstance(m, Part) else m):  # replaced since planned
                self.odd.add(m)
            elif isinstance(m, Part):  # kept by its layer's replaced forward, below
                composite.setdefault(m.layer, []).append(m)
            else:
                self.handles.append(
                    m.register_forward_hook(self._keep, with_kwargs=True, prepend=True)
                )
        # The forward of a layer of parts is replaced, on the instance and until remove(), by its
        # products (a hook could replace its output only after torch's fused call).
        self.composite = list(composite)
        for layer, parts in composite.items():
            layer.forward = functools.partial(self._composite_forward, layer, parts)

    def _keep(
        self,
        module: nn.Module,
        args: tuple[torch.Tensor, ...],
        kwargs: dict[str, torch.Tensor],
        output: torch.Tensor,
    ) -> torch.Tensor | None:
        a = args[0] if args else next(iter(kwargs.values()), None)  # one input: by place or name
        one_to_one = isinstance(a, torch.Tensor) and isinstance(output, torch.Tensor)
        if (
            not one_to_one
            or len(args) + len(kwargs) != 1
            or not holds_own(module, self.own[module])
        ):
            self.odd.add(module)
            return None
        a = a.clone() if self.copy_inputs else a.detach()  # no copy; its shape stays as it was
        self.seen[module] = (a, output, a._version, output._version)
        return output.clone() if self.copy_outputs else None

    def _composite_forward(
        self, layer: nn.Module, parts: list[Part], *args: object, **kwargs: object
    ) -> object:
        """The forward of a layer of parts (:mod:`~companion.per_example.composite`), keeping
        their inputs and outputs; torch's own for a call it does not compute (its parts are then
        ``odd``)."""
        swapped = not all(holds_own(part, self.own[part]) for part in parts)
        if swapped or (done := call(layer, args, kwargs, copy=self.copy_outputs)) is None:
            self.odd.update(parts)
            return type(layer).forward(layer, *args, **kwargs)
        output, kept = done
        for part in parts:
            a, z = kept[part.names[0]]
            self.seen[part] = (a, z, a._version, z._version)
        return output

    def changed(self) -> bool:
        return any(a._version != va or o._version != vo for a, o, va, vo in self.seen.values())

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        for layer in self.composite:
            del layer.forward


def forward_with_capture(
    model: nn.Module, layers: list[tuple[str, nn.Module]], x: torch.Tensor, *, copy: bool
) -> tuple[Capture, object]:
    """What the hooks kept of the ``layers``' calls, and the model's outputs on ``x``."""
    capture = Capture(layers, copy_inputs=copy, copy_outputs=copy)
    try:
        return capture, model(x)
    except IndexError as error:  # a batch the model cannot take: token ids out of range
        raise model_error(x, error) from error
    finally:
        capture.remove()


def global_forward_hooks() -> bool:
    """Whether a global forward hook is registered (``register_module_forward_hook``): it runs
    before the hooks that keep a layer's output, and may change that output."""
    return bool(getattr(nn.modules.module, "_global_forward_hooks", None))


def check_input_unchanged(x: torch.Tensor, version: int) -> None:
    """Refuse a batch ``x`` changed in place (its ``_version`` is no longer ``version``) by a
    pass over the model that another pass follows: the second would read the changed input."""
    if x._version != version:
        raise ValueError(
            "the model changes its input in place in its forward pass, and this batch needs "
            "another pass over the model, which would read the changed input: change a copy "
            "(x = x.clone()) in the forward pass, or use method='vmap'."
        )


def example_dims(layer: nn.Module, a: torch.Tensor, b: torch.Tensor, batch: int) -> list[int]:
    """The dimensions along which ``layer``'s input ``a`` and output ``b`` may hold the ``batch``
    examples, one each, as its rule can take them: 0, and 1 for a ``Linear``, ``Embedding`` or
    ``LayerNorm`` whose dimension 1 is a position's (a sequence laid out ``(T, B, F)``, as torch's
    transformer layers take it by default). A flattened batch ``(B*T, F)`` has none."""
    dims = [d for d in (0, 1) if a.dim() > d and b.dim() > d and a.shape[d] == b.shape[d] == batch]
    return [d for d in dims if d == 0 or d < _positions(layer, a)]


def batch_dim(
    plan: LayerPlan, layer: nn.Module, a: torch.Tensor, b: torch.Tensor, batch: int
) -> int | None:
    """The dimension of ``layer``'s input ``a`` and output ``b`` that holds the ``batch``
    examples: the one the checked batches settled for the layer (``plan.dims``), if this batch's
    shapes fit it; for a layer no check settled, the one dimension the shapes fit (either, for
    one example: it cannot be mixed with another). None where the shapes fit neither, or both
    without a check having settled which (B = T): the layer then moves to vmap."""
    fit = example_dims(layer, a, b, batch)
    if layer in plan.dims:
        return plan.dims[layer] if plan.dims[layer] in fit else None
    return fit[0] if len(fit) == 1 or (fit and batch == 1) else None


def _positions(layer: nn.Module, a: torch.Tensor) -> int:
    """How many leading dimensions of the input ``a`` the ``layer``'s rule takes as positions,
    each computed alike (a layer of another type: the batch's only)."""
    if type(layer) is nn.Linear:
        return a.dim() - 1  # all but the features
    if type(layer) is nn.Embedding:
        return a.dim()  # every token
    if type(layer) is nn.LayerNorm:
        return a.dim() - len(layer.normalized_shape)
    return 1


class RowCheck(NamedTuple):
    """What :func:`rows_cross` found."""

    wrong: list[tuple[str, nn.Module]]  # layers whose rows are not the examples
    dims: dict[nn.Module, list[int]]  # each other layer's dimensions whose rows passed
    #: for each layer reached, along each dimension that passed, the rows some loss read
    read: dict[tuple[str, nn.Module], dict[int, set[int]]]
    input_read: set[int] | None  # the examples whose input some loss read; None: not reached
    rows: int  # how many examples were checked


class RowsRead:
    """The checks of a clipper's batches (:func:`rows_cross`): which rows of each layer's output
    and of the input some check saw read (a nonzero gradient), and how many checks are left.

    A check sees no read of a row whose gradient is 0 (a head initialised to 0, an example the
    loss does not reach), and so passes it whatever reads it. For a reordering the same in every
    batch, a row seen read by its own example is in place, so what the checks saw adds up. A
    check counts only when every row it checked has been seen read, in it or before. Once
    ``LIMIT`` checks have run with the parameters changed since the one before (not micro-batches
    before a step), :meth:`add` gives the layers with a row never seen read, to move to vmap,
    and whether the input had one (its mixing was then not fully checked), and checks stop."""

    LIMIT = 12

    def __init__(self, checks: int) -> None:
        self.left, self.spent, self.version = checks, 0, -1
        self.seen: dict[tuple[nn.Module, int], set[int]] = {}
        self.input_seen: set[int] = set()

    def add(
        self, check: RowCheck, parameters: list[nn.Parameter]
    ) -> tuple[list[tuple[str, nn.Module]], bool]:
        every, unread = set(range(check.rows)), []
        for (name, layer), by_dim in check.read.items():
            for d, rows in by_dim.items():
                self.seen.setdefault((layer, d), set()).update(rows)
            if any(not every <= self.seen[layer, d] for d in by_dim):
                unread.append((name, layer))
        self.input_seen |= check.input_read or set()
        input_unread = check.input_read is not None and not every <= self.input_seen
        if not unread and not input_unread:
            self.left -= 1
            return [], False
        if (version := sum(p._version for p in parameters)) != self.version:
            self.version, self.spent = version, self.spent + 1
        if self.spent < self.LIMIT:
            return [], False
        self.left = 0
        return unread, input_unread


def rows_cross(
    model: nn.Module, plan: LayerPlan, sum_loss: LossFn, x: torch.Tensor, y: torch.Tensor
) -> RowCheck:
    r"""The hooked layers whose rows, in a forward pass on the few examples ``x``, are not one per
    example or reach the loss of other examples than their own; and for each other layer called,
    the dimensions that may hold its examples (:func:`example_dims`) whose rows passed.

    A rule is right for a layer if row :math:`p` of its output reaches only example :math:`p`'s
    loss: then the gradient of the summed loss at row :math:`p` is example :math:`p`'s alone. For
    a set :math:`S` of examples, the gradient of :math:`\sum_{j \in S} \ell_j` with respect to
    a layer's output must then be exactly 0 outside :math:`S`. Each example's loss reads its own
    row of the model's outputs only, so that gradient is the outputs' backward with the summed
    loss's gradient kept on :math:`S`, each example's weighted by a random factor in
    :math:`[1, 2)` (from a generator of its own, seeded 0) so that reads of one row by several
    examples cannot cancel. The sets are those of the bits of an example's index,
    :math:`S_k = \{i : \text{bit } k \text{ of } i \text{ is } 1\}` for
    :math:`k < \lceil \log_2 n \rceil`, and their complements: two examples :math:`j \ne p`
    differ in some bit, so one of these sets holds :math:`j` and not :math:`p`, and the loss of
    :math:`j` reading row :math:`p` is seen, whatever the pair (a flip, a roll, a sort, a swap, a
    ``(T, B, F)`` layout, row 0 broadcast to every example). (A layer whose examples may lie
    along dimension 0 or 1 has its rows checked along each.) One backward pass per set, to the
    layers' outputs and the input together: :math:`2 \lceil \log_2 n \rceil` passes through one
    graph (through a new one each, from a new forward pass, where a compiled part of the model
    allows one backward pass through its graph: inductor's donated buffers). Exact
    zeros: no tolerance, and neither identical examples nor the model's random draws matter. The
    forward pass runs in the model's mode (layers used in training only are seen), and draws
    nothing from the global generators (``fork_rng``). The caller passes the first few examples
    of a batch: a reordering that leaves them in place (a roll by more than their number, a
    reordering chosen by the batch's size or data) is not seen.

    Backward passes to the input show whether the model mixes examples, where the input is
    floating-point: if the loss of :math:`S` reads an element of the input outside :math:`S`
    (a finite, nonzero gradient: an infinite derivative, as of a square root at 0, gives NaN
    outside and is no read), some example's loss depends on another's data (batch statistics, a
    batch mean) and no per-example gradient is the example's own. That raises. (A layer's
    output read by several examples may hold no data, as a position table: only the layer
    moves to ``vmap``.) Autograd does not show mixing for integer inputs (token ids), nor
    through a ``detach``, a buffer or a trip through numpy (a forward pass that cannot take an
    input requiring a gradient gets a warning), nor a forward pass that branches on the batch's
    size or values. So each check then runs
    :func:`~companion.per_example.check_examples_independent` (the first 4 examples in
    evaluation mode, together and one at a time, drawing nothing from the global generators),
    which raises if their outputs differ: it catches such mistakes where evaluation mode shows
    them, and proves nothing.

    A row whose gradient is 0 (a head initialised to 0) shows no read, so the check passes it
    whatever reads it; ``read`` and ``input_read`` say which rows were seen read
    (:class:`RowsRead` adds them up over the batches).

    Raises:
        ValueError: if the forward pass mixes examples (or the outputs of the first examples
            differ when they are run alone), or runs a reentrant checkpoint.
        TypeError: if the model does not return a tensor.
    """
    check = _reads(model, plan, sum_loss, x, y)
    check_examples_independent(model, x)  # what autograd does not show (see above)
    return check


def _reads(
    model: nn.Module, plan: LayerPlan, sum_loss: LossFn, x: torch.Tensor, y: torch.Tensor
) -> RowCheck:
    """What :func:`rows_cross` finds from the autograd graph."""
    kept, outputs, leaf = _traced(model, plan.hooked, x)
    seen = [(name, m) for name, m in plan.hooked if m in kept]
    dims = {m: example_dims(m, *kept[m][:2], len(x)) for _, m in seen}  # narrowed below
    right = [(n, m) for n, m in seen if dims[m] and kept[m][1].requires_grad]
    rows = torch.arange(len(x), device=x.device)
    # The rows that a backward pass read (a nonzero gradient), per layer reached and dimension.
    hit = {m: {d: rows < 0 for d in dims[m]} for _, m in right}
    input_hit, reached, input_reached = rows < 0, set(), False

    def found() -> RowCheck:
        read = {
            (n, m): {d: set(hit[m][d].nonzero().flatten().tolist()) for d in dims[m]}
            for n, m in right
            if m in reached and dims[m]
        }
        input_read = set(input_hit.nonzero().flatten().tolist()) if input_reached else None
        wrong = [(n, m) for n, m in seen if not dims[m]]
        return RowCheck(wrong, {m: d for m, d in dims.items() if d}, read, input_read, len(x))

    if not outputs.requires_grad or not (right or leaf is not None):
        return found()
    loss = sum_loss(outputs, y)
    refuse_reentrant_checkpoint(autograd_graph(loss)[1])
    (gradient,) = torch.autograd.grad(loss, outputs)
    if not math.isfinite(float(gradient.sum())):  # rare: a NaN or inf entry, or an overflow
        # Zero the non-finite entries (their examples' gradients are refused later); an
        # overflowing sum of finite entries changes nothing. Only this rare path pays for the ops.
        gradient = gradient.where(gradient.isfinite(), 0.0)

    # The input's gradient, then the layers' outputs'.
    targets = ([leaf] if leaf is not None else []) + [kept[m][1] for _, m in right]
    retain = True  # one graph for every backward pass, while that works

    def read_by(subset: torch.Tensor) -> list[torch.Tensor | None]:
        """The gradients at the targets of the loss of the examples ``subset`` (a mask of
        rows): nonzero where that loss reads them."""
        nonlocal outputs, targets, retain
        weighted = gradient * (subset * weights).reshape(-1, *[1] * (gradient.dim() - 1))
        if retain:
            try:
                return list(
                    torch.autograd.grad(
                        outputs, targets, weighted, retain_graph=True, allow_unused=True
                    )
                )
            except OutOfMemoryError:
                raise
            except RuntimeError:
                # A compiled part of the model may allow one backward pass through its graph
                # (inductor's donated buffers): from now on, a new forward pass for each. A
                # genuine error comes again.
                retain = False
        again, outputs, leaf_again = _traced(model, plan.hooked, x)
        if any(m not in again for _, m in right) or (leaf is None) != (leaf_again is None):
            raise ValueError(NOT_REPEATABLE)
        targets = ([leaf_again] if leaf is not None else []) + [again[m][1] for _, m in right]
        return list(torch.autograd.grad(outputs, targets, weighted, allow_unused=True))

    # Few distinct operations: the first call of each pages in a few hundred KiB of torch's code.
    weights = 1 + torch.rand(
        len(x), generator=torch.Generator(x.device).manual_seed(0), device=x.device
    ).to(gradient.dtype)
    for bit in range((len(x) - 1).bit_length()):  # every pair of rows differs in one of the bits
        inside = (rows >> bit) % 2 == 1
        # The set and its complement: each must not read the other's rows.
        for subset in (inside, ~inside):
            reads = read_by(subset)
            input_read = reads.pop(0) if leaf is not None else None  # the input's gradient
            for (_, m), read in zip(right, reads, strict=True):
                if read is not None:  # along each dimension that may hold the examples
                    reached.add(m)
                    dims[m] = [d for d in dims[m] if not read.movedim(d, 0)[~subset].ne(0).any()]
                    for d in dims[m]:
                        hit[m][d] |= read.movedim(d, 0).reshape(len(x), -1).ne(0).any(1)
            if input_read is not None:  # a read is finite and nonzero: 0 * inf gives NaN
                # Comparisons, which make masks only (isfinite copies the gradient's values).
                read = input_read.ne(0)
                read &= input_read.eq(input_read)
                read &= input_read.ne(math.inf)
                read &= input_read.ne(-math.inf)
                input_hit |= read.reshape(len(x), -1).any(1)
                input_reached = True
                if bool(read.index_fill_(0, rows[subset], False).any()):  # a read outside the set
                    raise ValueError(mixes_examples(model))
    return found()


def _traced(
    model: nn.Module, hooked: list[tuple[str, nn.Module]], x: torch.Tensor
) -> tuple[dict[nn.Module, tuple[torch.Tensor, ...]], torch.Tensor, torch.Tensor | None]:
    """A forward pass on ``x`` that draws nothing from the global generators (``fork_rng``): what
    the ``hooked`` layers' hooks kept (their outputs copied; the inputs, for their shapes), the
    model's outputs, and the input leaf of :func:`_forward_with_input_leaf`."""
    capture = Capture(hooked, copy_inputs=False, copy_outputs=True)
    try:
        with torch.random.fork_rng(devices=_cuda_index(x.device)):
            outputs, leaf = _forward_with_input_leaf(model, x)
    except IndexError as error:  # token ids out of range
        raise model_error(x, error) from error
    finally:
        capture.remove()
    return capture.seen, batch_outputs(outputs, len(x)), leaf


def _forward_with_input_leaf(
    model: nn.Module, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's outputs on ``x``, and ``x`` as a leaf whose gradient autograd gives: None if
    ``x`` is not floating-point, or if the forward pass fails on an input that requires a
    gradient (it calls ``.numpy()`` or ``requires_grad_(False)`` on it): then it runs again on
    ``x``, and a warning says that mixing was not checked. The model gets a copy of ``x``, which
    an in-place operation may change: the batch is the caller's, and the step reads it next."""
    if x.is_floating_point():
        leaf = x.detach().requires_grad_()
        try:
            return model(leaf.clone()), leaf
        except OutOfMemoryError:
            raise
        except RuntimeError as error:
            outputs = model(x.clone())  # a genuine error comes again
            warn(
                f"the model's forward pass fails on an input that requires a gradient ({error}), "
                "so whether it mixes the examples of a batch is not checked: make sure it does "
                "not (batch statistics, a batch mean), or DP-SGD's guarantee does not hold."
            )
            return outputs, None
    return model(x.clone()), None


#: The error of :func:`rows_cross` for a forward pass it cannot repeat where it must.
NOT_REPEATABLE = (
    "a compiled part of the model allows one backward pass through its graph, so checking "
    "which examples each layer's rows belong to takes a forward pass for each backward pass, "
    "and the model's forward pass calls other layers when it runs again on the same examples "
    "(a layer skipped at random, with Python's random): use method='vmap'."
)


def _cuda_index(device: torch.device) -> list[int]:
    """The CUDA generators :func:`torch.random.fork_rng` must save besides the CPU's."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]
