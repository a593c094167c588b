"""The shape of the package: every module reachable from ``import companion``, no module using
another's private names (except those of the shared private layers, ``SHARED_PRIVATE``), and
modules of a readable size.

The modules are found on disk, not listed here, so a new module is checked without editing
this file.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "companion"
# The private shared layers: the only private modules another module may import from.
SHARED_PRIVATE = frozenset(
    {
        "companion._validation",
        "companion._random",
        "companion._torch",
        "companion._outputs",
        "companion._progress",
        "companion._labels",
        "companion._runs",
    }
)
MAX_LINES = 450


def _module_name(path: Path) -> str:
    """``companion/accounting/rdp.py`` -> ``companion.accounting.rdp`` (``__init__`` dropped)."""
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


SOURCES = sorted(PACKAGE_DIR.rglob("*.py"))
MODULES = {_module_name(path): path for path in SOURCES}
# Public modules below the package: no part of the dotted name starts with "_".
PUBLIC = sorted(
    name[len("companion.") :]
    for name in MODULES
    if name != "companion" and not any(part.startswith("_") for part in name.split("."))
)


def _is_private(name: str) -> bool:
    """A leading underscore, but not a dunder (``__version__`` is public)."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


# --------------------------------------------------------------------------------------------
# import companion; companion.<module>
# --------------------------------------------------------------------------------------------

# Runs in a fresh interpreter: in this one, other tests have imported the submodules already,
# which sets them as attributes of the package whether or not companion/__init__.py does.
# Before each access it forgets every submodule, so each is reached from `import companion`
# alone and not thanks to a module imported before it.
_PROBE = textwrap.dedent(
    """
    import json, sys
    import companion
    report = {"torch_imported": "torch" in sys.modules, "failures": {}}
    for dotted in json.loads(sys.argv[1]):
        for loaded in [m for m in sys.modules if m.startswith("companion.")]:
            del sys.modules[loaded]
        for attribute, value in list(vars(companion).items()):
            if type(value) is type(sys) and value.__name__.startswith("companion."):
                delattr(companion, attribute)
        obj = companion
        try:
            for part in dotted.split("."):
                obj = getattr(obj, part)
        except Exception as error:
            report["failures"][dotted] = f"{type(error).__name__}: {error}"
            continue
        if getattr(obj, "__name__", None) != "companion." + dotted:
            report["failures"][dotted] = f"companion.{dotted} is {obj!r}, not the module"
    try:
        companion.no_such_module
    except AttributeError:
        report["unknown"] = "AttributeError"
    except Exception as error:
        report["unknown"] = type(error).__name__
    else:
        report["unknown"] = "no error"
    report["dir"] = dir(companion)
    print(json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def probe() -> dict:
    """What a fresh ``import companion`` offers (see ``_PROBE``)."""
    completed = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(PUBLIC)],
        cwd=PACKAGE_DIR.parent,
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.splitlines()[-1])


def test_the_package_has_public_modules() -> None:
    """Negative control of the discovery: it finds the modules, and leaves private ones out."""
    assert {"dpsgd", "federated", "attacks", "accounting", "mechanisms"} <= set(PUBLIC)
    assert "accounting.rdp" in PUBLIC
    assert not any(part.startswith("_") for name in PUBLIC for part in name.split("."))
    assert "companion._torch" in MODULES


def test_every_module_is_an_attribute_of_the_package(probe: dict) -> None:
    """``import companion`` then ``companion.dpsgd``, ``companion.accounting.rdp``, ... work."""
    assert probe["failures"] == {}


def test_import_companion_is_lazy(probe: dict) -> None:
    """``import companion`` imports no submodule, so it does not pay for torch (PEP 562)."""
    assert not probe["torch_imported"]


def test_unknown_attributes_raise_attribute_error(probe: dict) -> None:
    """``hasattr(companion, "x")`` and ``getattr(companion, "x", None)`` need AttributeError."""
    assert probe["unknown"] == "AttributeError"


def test_dir_lists_the_modules(probe: dict) -> None:
    """``dir(companion)`` (tab completion) shows the top-level modules before their import."""
    top_level = {name.split(".")[0] for name in PUBLIC}
    assert top_level <= set(probe["dir"])


# --------------------------------------------------------------------------------------------
# No module uses another module's private names
# --------------------------------------------------------------------------------------------


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module an ``from ... import`` statement in ``module`` imports from."""
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def private_imports(module: str, path: Path, source: str | None = None) -> list[str]:
    """Every private name of another companion module that ``module`` imports or uses.

    Caught: ``from companion.x import _f``; ``from companion import _x`` and ``import
    companion._x`` (a private module); ``x._f`` where ``x`` was imported as a companion module.
    Allowed: anything from the shared private layers ``SHARED_PRIVATE``.
    """
    tree = ast.parse(source if source is not None else path.read_text(encoding="utf-8"))
    is_package = path.name == "__init__.py"
    found = []
    module_aliases: dict[str, str] = {}  # local name -> companion module it is bound to

    def check(target: str, name: str, line: int) -> None:
        full = f"{target}.{name}"
        if target == module or target in SHARED_PRIVATE or full in SHARED_PRIVATE:
            return
        if _is_private(name):
            found.append(f"{path.name}:{line}: {full}")

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = _resolve(module, is_package, node)
            if target != "companion" and not target.startswith("companion."):
                continue
            for alias in node.names:
                check(target, alias.name, node.lineno)
                if f"{target}.{alias.name}" in MODULES:
                    module_aliases[alias.asname or alias.name] = f"{target}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("companion."):
                    parent, _, last = alias.name.rpartition(".")
                    check(parent, last, node.lineno)
                    if alias.asname:
                        module_aliases[alias.asname] = alias.name
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in module_aliases
        ):
            check(module_aliases[node.value.id], node.attr, node.lineno)
    return found


def test_no_module_imports_a_private_name_of_another() -> None:
    problems = [p for name, path in MODULES.items() for p in private_imports(name, path)]
    assert problems == [], "private names used across modules:\n" + "\n".join(problems)


def test_the_private_import_check_catches_what_it_should() -> None:
    """Negative controls: each forbidden form is caught, each allowed form is not."""
    here = PACKAGE_DIR / "federated.py"

    def found(source: str) -> list[str]:
        return private_imports("companion.federated", here, source)

    assert found("from companion.dpsgd import _noise") != []
    assert found("from .dpsgd import _noise") != []
    assert found("from companion import _secret") != []
    assert found("import companion._secret") != []
    assert found("from companion import dpsgd\ndpsgd._noise(1)") != []
    assert found("import companion.dpsgd as d\nd._noise(1)") != []
    assert found("from companion.dpsgd import add_gaussian_noise") == []
    assert found("from companion._torch import trainable\nfrom companion import _validation") == []
    assert found("from companion._random import derive_seed") == []
    assert found("from companion import __version__") == []
    assert found("from numpy.random import _pickle") == []
    assert found("def _own(): ...\n_own()") == []
    nested = private_imports(
        "companion.accounting.calibration",
        PACKAGE_DIR / "accounting" / "calibration.py",
        "from .rdp import _log_a\nfrom .. import _validation",
    )
    assert nested == ["calibration.py:1: companion.accounting.rdp._log_a"]


# --------------------------------------------------------------------------------------------
# Module size
# --------------------------------------------------------------------------------------------


def test_no_module_is_over_450_lines() -> None:
    """One idea per module: none over 450 lines (docstrings included)."""
    sizes = {
        name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in MODULES.items()
    }
    too_long = {name: lines for name, lines in sizes.items() if lines > MAX_LINES}
    assert too_long == {}


# --------------------------------------------------------------------------------------------
# Packaging
# --------------------------------------------------------------------------------------------


def test_every_subpackage_is_in_the_distribution() -> None:
    """A non-editable install (a wheel) holds every package under companion/.

    ``[tool.setuptools] packages = [...]`` lists packages one by one and silently leaves out a
    subpackage it does not name (companion/accounting/ was missing from the wheel); package
    discovery with ``[tool.setuptools.packages.find]`` does not.
    """
    import tomllib

    config = tomllib.loads((PACKAGE_DIR.parent / "pyproject.toml").read_text(encoding="utf-8"))
    packages = config["tool"]["setuptools"].get("packages")
    if not isinstance(packages, list):
        pytest.skip("packages are discovered by setuptools ([tool.setuptools.packages.find])")
    on_disk = sorted(_module_name(path) for path in PACKAGE_DIR.rglob("__init__.py"))
    assert sorted(set(on_disk) - set(packages)) == []


def test_the_package_is_typed() -> None:
    """PEP 561: the py.typed marker tells type checkers to use the package's annotations."""
    assert (PACKAGE_DIR / "py.typed").is_file()


def test_warn_points_at_the_first_caller_outside_the_package() -> None:
    """A warning raised two calls deep inside companion names the line that called into it."""
    from companion._validation import warn

    namespace = {"__name__": "companion.probe", "warn": warn}
    exec("def inner():\n    warn('deep')\n\ndef outer():\n    inner()\n", namespace)
    with pytest.warns(UserWarning, match="deep") as caught:
        namespace["outer"]()
    assert caught[0].filename == __file__
