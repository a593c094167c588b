"""Every public function and class of ``companion`` documents itself the same way.

A Google-style docstring with the sections the API page and the reader rely on:

- ``Args:`` when the function (or the class's constructor) takes arguments; a dataclass may list
  its fields under ``Attributes:`` instead;
- ``Returns:`` (or ``Yields:`` for a generator) unless the return annotation is ``None``; classes
  are exempt;
- ``Raises:`` for every public function that takes arguments, and for every class whose
  constructor does (dataclasses, which do not validate, are exempt);
- ``Example:`` with at least one ``>>>`` line and no ``+SKIP``, so the example is run as a doctest
  by the test command and shows true output. Records (dataclasses, named tuples) and methods are
  exempt: the example of the function that returns the record, or of the class, shows them.

The public names are found, not listed: every module under ``companion/`` whose dotted name has no
part starting with ``_``, except :mod:`companion.flower` (an optional extra); in each, the names in
``__all__`` (or, without ``__all__``, the names defined there without a leading underscore) that
are functions or classes. A name re-exported by several modules is checked once, under the module
that defines it. Public methods of public classes (no leading underscore, not properties) are
checked by a separate test with the same rules but the example.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "companion"
SKIPPED = ("companion.flower",)
SECTION = re.compile(r"^\s*(Args|Arguments|Attributes|Returns|Yields|Raises|Examples?):\s*$", re.M)


def _public_modules() -> list[str]:
    """Dotted names of the public modules, found on disk (nothing is imported to find them)."""
    names = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        name = ".".join(parts)
        if any(part.startswith("_") for part in parts[1:]):
            continue
        if any(name == skipped or name.startswith(skipped + ".") for skipped in SKIPPED):
            continue
        names.append(name)
    return names


def _public_objects() -> dict[str, object]:
    """``{"module.qualname": object}`` for every public function and class, once each."""
    found: dict[int, tuple[str, object]] = {}
    for module_name in _public_modules():
        module = importlib.import_module(module_name)
        names = getattr(module, "__all__", None)
        if names is None:
            names = [name for name in vars(module) if not name.startswith("_")]
        for name in names:
            obj = getattr(module, name)
            if not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue  # constants, type aliases, submodules
            if names is not getattr(module, "__all__", None) and obj.__module__ != module_name:
                continue  # without __all__, only what the module defines
            found.setdefault(id(obj), (f"{obj.__module__}.{obj.__qualname__}", obj))
    return dict(sorted(found.values(), key=lambda item: item[0]))


def _public_methods(objects: dict[str, object]) -> dict[str, Callable]:
    methods: dict[str, Callable] = {}
    for qualified, obj in objects.items():
        if not inspect.isclass(obj):
            continue
        for name, member in vars(obj).items():
            if name.startswith("_") or isinstance(member, property):
                continue
            if isinstance(member, (staticmethod, classmethod)):
                member = member.__func__
            if inspect.isfunction(member):
                methods[f"{qualified}.{name}"] = member
    return methods


OBJECTS = _public_objects()
METHODS = _public_methods(OBJECTS)


def _parameters(obj: Callable) -> list[str]:
    """Names of the arguments a caller passes (``self`` and ``cls`` left out)."""
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):  # a builtin without a signature
        return []
    return [name for name in signature.parameters if name not in ("self", "cls")]


def _returns_none(function: Callable) -> bool:
    annotation = inspect.signature(function).return_annotation
    return annotation in (None, "None", type(None))


def _sections(doc: str) -> set[str]:
    return {match.group(1) for match in SECTION.finditer(doc)}


def _missing(obj: object, *, method: bool = False) -> list[str]:
    """The rules of the module docstring that ``obj``'s docstring breaks.

    Records (dataclasses and named tuples, which functions return) and methods need no example
    of their own: the example of the function that returns the record, or of the class, shows
    them in use.
    """
    doc = inspect.getdoc(obj) or ""
    if inspect.isclass(obj) and obj.__doc__ is None:
        doc = ""  # inspect.getdoc would inherit a base class's docstring
    if not doc:
        return ["a docstring"]
    sections = _sections(doc)
    missing = []
    is_class = inspect.isclass(obj)
    takes_arguments = bool(_parameters(obj))
    is_dataclass = is_class and (
        dataclasses.is_dataclass(obj) or (issubclass(obj, tuple) and hasattr(obj, "_fields"))
    )
    if takes_arguments and not sections & {"Args", "Arguments"}:
        if not (is_dataclass and "Attributes" in sections):
            missing.append("Args:")
    if not is_class and not _returns_none(obj) and not sections & {"Returns", "Yields"}:
        missing.append("Yields:" if inspect.isgeneratorfunction(obj) else "Returns:")
    if takes_arguments and not is_dataclass and "Raises" not in sections:
        missing.append("Raises:")
    needs_example = not (is_dataclass or method)
    if needs_example and (not sections & {"Example", "Examples"} or ">>>" not in doc):
        missing.append("Example: with a >>> line")
    if "+SKIP" in doc:
        missing.append("an example that runs (no +SKIP)")
    return missing


def _check(name: str, obj: object, *, method: bool = False) -> None:
    missing = _missing(obj, method=method)
    assert not missing, f"{name}: the docstring lacks {', '.join(missing)}"


def test_the_walk_finds_the_public_api() -> None:
    """The walk reaches every kind of module, skips private ones and the flower extra."""
    assert "companion.mechanisms.laplace.laplace_mechanism" in OBJECTS
    assert "companion.accounting.rdp_accountant.RDPAccountant" in OBJECTS
    assert "companion.accounting.rdp_accountant.RDPAccountant.get_epsilon" in METHODS
    assert "companion.flower" not in _public_modules()
    assert not any(name.startswith("companion.flower") for name in OBJECTS)
    assert not any(module.split(".")[-1].startswith("_") for module in _public_modules())
    assert "companion._validation.check_real" not in OBJECTS  # private, not re-exported
    assert len(OBJECTS) > 50


def test_the_rules_catch_what_they_should() -> None:
    """Negative controls: each rule fails on a docstring that breaks it, and a complete one
    passes."""

    def complete(x: int) -> int:
        """Double.

        Args:
            x: a number.

        Returns:
            Twice ``x``.

        Raises:
            TypeError: never.

        Example:
            >>> complete(2)
            4
        """
        return 2 * x

    def bare(x: int) -> int:
        """Double ``x``.

        Example:
            >>> bare(2)  # doctest: +SKIP
            4
        """
        return 2 * x

    def no_arguments() -> None:
        """Nothing.

        Example:
            >>> no_arguments()
        """

    def generator(n: int) -> Iterator[int]:
        """Count.

        Args:
            n: how far.

        Raises:
            ValueError: never.

        Example:
            >>> list(generator(2))
            [0, 1]
        """
        yield from range(n)

    @dataclasses.dataclass
    class Record:
        """A pair.

        Attributes:
            a: one.

        Example:
            >>> Record(a=1).a
            1
        """

        a: int

    class Undocumented:
        def __init__(self, x: int) -> None:
            self.x = x

    assert _missing(complete) == []
    assert _missing(no_arguments) == []
    assert _missing(Record) == []
    assert _missing(bare) == ["Args:", "Returns:", "Raises:", "an example that runs (no +SKIP)"]
    assert _missing(generator) == ["Yields:"]
    assert _missing(Undocumented) == ["a docstring"]


@pytest.mark.parametrize("name", sorted(OBJECTS))
def test_public_function_or_class_has_the_sections(name: str) -> None:
    _check(name, OBJECTS[name])


@pytest.mark.parametrize("name", sorted(METHODS))
def test_public_method_has_the_sections(name: str) -> None:
    _check(name, METHODS[name], method=True)
