"""A second device on a machine without a GPU, for tests: tensors labelled "meta" that hold CPU
values.

Inside ``with shadow_device() as copies:``, ``t.to(SHADOW)``, ``model.to(SHADOW)``,
``torch.zeros(..., device=SHADOW)`` and ``torch.Generator(device=SHADOW)`` give tensors (instances
of :class:`Shadow`) and generators that report device ``meta`` but compute on the CPU, so every
code path that reads values (``.item()``, ``bool``, boolean masks, ``nonzero``, ``.tolist()``)
runs, with the same CPU kernels and random streams as a plain CPU run: a CPU run is an exact
oracle for the values. Read a shadow tensor's values with :func:`values`; using one outside the
context raises.

What it emulates of CUDA:

- an op that mixes the two devices raises "Expected all tensors to be on the same device", except
  where CUDA allows it: a 0-dim CPU tensor in any op, CPU indices in indexing, and copies
  (``.to``, ``copy_``), which cross devices;
- drawing random numbers on one device with a generator of the other raises;
- ``.numpy()`` of a shadow tensor raises (call ``.cpu()`` first, as on CUDA);
- ``copies`` counts the host-to-device (``"h2d"``) and device-to-host (``"d2h"``) copies, keyed
  by the line of ``companion`` that made them, so a test can check that a loop copies nothing
  per step.

What it does not emulate:

- the device is ``meta``, not ``cuda``, so branches on ``device.type == "cuda"`` (in companion:
  ``without_autocast``) take their non-CUDA side, and branches on ``device.type == "cpu"`` their
  GPU side;
- real kernels: CUDA's rounding, TF32, non-determinism, memory, streams and speed;
- CUDA generators: a shadow generator is a CPU generator, so it draws CPU's stream, not CUDA's;
- host syncs (``.item()``, ``bool``, ``nonzero``, ``.tolist()``) are not counted, nor are the
  small copies CUDA makes implicitly for a CPU index tensor or a Python list used as an index
  (``torch.tensor(data, device=SHADOW)`` is counted, as a copy);
- ``torch.vmap`` through ``GroupNorm`` fails on shadow tensors (a limit of the harness).

It relies on private torch APIs: ``torch.Tensor._make_wrapper_subclass``,
``torch.utils._python_dispatch.TorchDispatchMode``, ``torch.utils._pytree`` (``tree_flatten``,
``tree_map``), the ``overloadpacket`` of the ``torch._ops.OpOverload`` a dispatch mode receives,
and a Python subclass of ``torch._C.Generator`` put in place of ``torch.Generator`` while the
context is open (a generator made outside the context then fails ``isinstance(g,
torch.Generator)`` inside it); the harness's own tests also read the mode stacks
(``torch.overrides._get_current_function_mode_stack``,
``torch.utils._python_dispatch._get_current_dispatch_mode_stack``). It also relies on how torch
2.13 builds a list index and ``torch.tensor(data, device=...)`` (in C++, past the dispatch mode;
see ``_Function``). A torch upgrade may break it. Then ``tests/test_shadow_device.py``'s
``test_harness_*`` tests show which part broke: fix the harness, or, until it is fixed, skip the
module with a reason, ``pytestmark = pytest.mark.skip(reason="tests/_shadow_device.py: <what
broke> with torch <version>")`` at the top of tests/test_shadow_device.py; never mark it xfail
or let it pass silently. A failure that says "harness leak" means torch made a real meta tensor
(one without values) somewhere the harness does not see: find that path and route it like the
list index.

Why "meta" and not "cuda": a tensor that reports cuda makes a CPU build of torch abort the process
(no CUDA device guard is linked); meta has a no-op guard, so autograd and vmap run.
"""

from __future__ import annotations

import contextlib
import traceback
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

import companion

if TYPE_CHECKING:
    from torch._ops import OpOverload

SHADOW = torch.device("meta")
CPU = torch.device("cpu")
_PACKAGE = str(Path(companion.__file__).parent) + "/"
_REAL_GENERATOR = torch._C.Generator
# aten ops whose second argument is a list of indices, which CUDA accepts on the CPU too
_INDEX_OPS = {"index", "index_put", "index_put_", "_index_put_impl_"}


class Shadow(torch.Tensor):
    """A tensor that reports device ``meta`` and holds its values in a CPU tensor."""

    _cpu_values: torch.Tensor

    @staticmethod
    def __new__(cls, values: torch.Tensor) -> Shadow:
        shadow = torch.Tensor._make_wrapper_subclass(
            cls,
            values.shape,
            strides=values.stride(),
            storage_offset=values.storage_offset(),
            dtype=values.dtype,
            layout=values.layout,
            device=SHADOW,
        )
        shadow._cpu_values = values
        return shadow

    def __repr__(self) -> str:  # type: ignore[override]
        return f"Shadow({self._cpu_values!r})"

    @classmethod
    def __torch_dispatch__(
        cls, func: OpOverload, types: Any, args: Any = (), kwargs: Any = None
    ) -> Any:
        raise RuntimeError("a shadow tensor was used outside shadow_device()")


def values(t: torch.Tensor) -> torch.Tensor:
    """The CPU values of a shadow tensor (no copy is counted); any other tensor as it is."""
    return t._cpu_values if isinstance(t, Shadow) else t


class ShadowGenerator(_REAL_GENERATOR):
    """``torch.Generator`` inside the context: a CPU generator that reports ``meta`` when made
    with ``device=SHADOW``."""

    def __new__(cls, device: torch.device | str = "cpu") -> ShadowGenerator:
        generator = super().__new__(cls)
        generator._on_shadow = torch.device(device).type == SHADOW.type
        return generator

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return SHADOW if self._on_shadow else CPU


def _kind(t: torch.Tensor) -> str:
    return t.device.type  # "meta" for a Shadow, which reports it


def _site() -> str:
    """``file:line`` of the innermost frame of the package (where a copy was asked for)."""
    for frame, line in traceback.walk_stack(None):
        if frame.f_code.co_filename.startswith(_PACKAGE):
            return f"{frame.f_code.co_filename.removeprefix(_PACKAGE)}:{line}"
    return "outside companion"


def _same_device(func: OpOverload, args: tuple, tensors: list[torch.Tensor]) -> str | None:
    """The device type of an op's result, after CUDA's check that its tensors share a device."""
    if func.overloadpacket.__name__ in _INDEX_OPS:
        indices = [i for i in tree_flatten(args[1])[0] if isinstance(i, torch.Tensor)]
        if any(_kind(i) not in ("cpu", _kind(args[0])) for i in indices):
            raise RuntimeError(
                "indices should be either on cpu or on the same device as the indexed tensor "
                f"({_kind(args[0])})"
            )
        tensors = [t for t in tensors if not any(t is i for i in indices)]
    kinds = {_kind(t) for t in tensors if not (_kind(t) == "cpu" and t.dim() == 0)}
    if len(kinds) > 1:
        raise RuntimeError(
            "Expected all tensors to be on the same device, but found at least two devices, "
            f"{sorted(kinds)}! ({func})"
        )
    return kinds.pop() if kinds else None


class _Dispatch(TorchDispatchMode):
    """Below autograd: checks the devices of each op, counts copies, computes on CPU values."""

    def __init__(self, copies: Counter[tuple[str, str]]) -> None:
        super().__init__()
        self.copies = copies

    def __torch_dispatch__(
        self, func: OpOverload, types: Any, args: Any = (), kwargs: Any = None
    ) -> Any:
        kwargs = dict(kwargs or {})
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if any(_kind(t) == SHADOW.type and not isinstance(t, Shadow) for t in tensors):
            raise AssertionError(f"harness leak: a real meta tensor (no values) reached {func}")
        kind = None if kwargs.get("device") is None else torch.device(kwargs["device"]).type
        if kind == SHADOW.type:
            kwargs["device"] = CPU
        name = func.overloadpacket.__name__
        if name in ("_to_copy", "copy_"):  # the ops that may cross devices
            source = args[1] if name == "copy_" else args[0]
            if name == "copy_":  # into args[0]
                kind = _kind(args[0])
            elif kind is None:  # .to(dtype): on the same device
                kind = _kind(source)
            if _kind(source) != kind:
                self.copies["d2h" if kind == "cpu" else "h2d", _site()] += 1
        elif kind is None:
            kind = _same_device(func, args, tensors)
        out = func(*tree_map(values, args), **tree_map(values, kwargs))
        if name.endswith("_") and args and isinstance(args[0], torch.Tensor):
            return args[0]  # in place: the wrapper whose values changed
        if kind != SHADOW.type:
            return out
        return tree_map(lambda t: Shadow(t) if isinstance(t, torch.Tensor) else t, out)


class _Function(TorchFunctionMode):
    """Above autograd: the generator's device, and the Python-level paths the dispatch mode does
    not see (list indices, ``torch.tensor(data, device=...)``, ``.numpy()``, ``.tolist()``)."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        generator = kwargs.get("generator")
        if generator is None:
            generator = next((a for a in args if isinstance(a, _REAL_GENERATOR)), None)
        if generator is not None:
            device = kwargs.get("device")
            if device is None:  # a random op on a tensor, or a factory on the CPU
                device = next((t.device for t in args if isinstance(t, torch.Tensor)), CPU)
            if torch.device(device).type != generator.device.type:
                raise RuntimeError(
                    f"Expected a '{torch.device(device).type}' device type for generator but found "
                    f"'{generator.device.type}' ({name})"
                )
        shadow = bool(args) and isinstance(args[0], Shadow)
        if name in ("__getitem__", "__setitem__") and shadow:
            # torch turns a list index into a tensor on the indexed tensor's device in C++, out of
            # sight of the dispatch mode: on meta it would hold no values. A CPU tensor is allowed
            args = (args[0], _list_to_tensor(args[1]), *args[2:])
        if name in ("tensor", "as_tensor") and args and not isinstance(args[0], torch.Tensor):
            device = kwargs.get("device")
            if device is not None and torch.device(device).type == SHADOW.type:
                # built on the device in C++ too: build it on the CPU and copy it (counted)
                return func(*args, **{**kwargs, "device": CPU}).to(SHADOW)
        if name == "numpy" and shadow:
            raise TypeError("can't convert a shadow (GPU-like) tensor to numpy; use .cpu() first.")
        if name == "tolist" and shadow:
            return values(args[0]).tolist()
        return func(*args, **kwargs)


def _list_to_tensor(index: object) -> object:
    if isinstance(index, tuple):
        return tuple(_list_to_tensor(i) for i in index)
    return torch.tensor(index) if isinstance(index, list) else index


@contextlib.contextmanager
def shadow_device() -> Iterator[Counter[tuple[str, str]]]:
    """Open the shadow device; yields the copies made inside, ``{(direction, site): count}``.

    ``torch.Generator`` is replaced for the whole process while the context is open, and put
    back (and both modes closed) when it ends, also when it ends by an exception.
    """
    copies: Counter[tuple[str, str]] = Counter()
    saved = torch.Generator
    torch.Generator = ShadowGenerator  # type: ignore[misc]
    try:
        with _Function(), _Dispatch(copies):
            yield copies
    finally:
        torch.Generator = saved  # type: ignore[misc]
