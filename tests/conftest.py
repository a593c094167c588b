"""Shared test set-up: the test markers, and the fixtures and helpers several test files use.

Markers (registered in pyproject.toml, which also passes ``--strict-markers``):

- ``unit``: fast tests of the package and the docstring examples (doctests) of ``companion/``.
  Every test without one of the other markers gets it here, so ``pytest -m unit`` (``make
  unit``) is the fast loop and a new test file needs no marker to join it.
- ``notebooks``: the notebook cells nbval re-executes (added here to every ``*.ipynb`` item).
- ``book``, ``browser``: tests that need the built book (tests/test_book.py marks them).
- ``flower``: tests that run the Flower framework.

Helpers are plain functions (``from conftest import flat``); fixtures are listed below. They are
test oracles, so they never call the private helpers of ``companion`` they would be checking.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import torch
    from torch import nn

    from companion.data import Split

# Markers that take a test out of the fast loop; a test with none of them is a unit test.
NOT_UNIT_MARKERS = ("notebooks", "book", "browser", "flower")


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark nbval's notebook cells ``notebooks`` and every other unmarked test ``unit``."""
    for item in items:
        if item.path.suffix == ".ipynb":
            item.add_marker(pytest.mark.notebooks)
        if not any(item.get_closest_marker(name) for name in NOT_UNIT_MARKERS):
            item.add_marker(pytest.mark.unit)


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Run a test module on one torch thread, and restore the setting afterwards.

    The models in the tests are so small that threads do not help, and when other processes
    keep the two cores busy, two OpenMP threads waiting on each other made 100 Adam steps 50
    times slower (7 s instead of 0.12 s, measured on the 2-core machine); one thread is
    unaffected. Use it for a whole file with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def load_shared_digits() -> Split:
    """``data.load_digits(seed=0)``, loaded once per process.

    For module-level constants (parametrize lists, ``X, Y = ...``) where a fixture cannot be
    used; tests take the ``digits`` fixture. The arrays are shared: never modify them in place.
    """
    from companion import data

    return data.load_digits(seed=0)


@pytest.fixture(scope="session")
def digits() -> Split:
    """The digits split every test file uses: ``data.load_digits(seed=0)``, loaded once.

    Shared by all tests: never modify its arrays in place (copy them, or go through ``tensors``,
    which copies).
    """
    return load_shared_digits()


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def tensors(
    split: Split, start: int = 0, stop: int | None = None, *, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training examples ``start:stop`` of a split as new tensors (features, labels).

    The features are float64 unless ``dtype`` says otherwise (the exact identities of the tests
    are checked in float64); the labels keep the split's int64.
    """
    import torch

    x = torch.tensor(split.x_train[start:stop], dtype=dtype or torch.float64)
    y = torch.tensor(split.y_train[start:stop])
    return x, y


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters that train (``requires_grad``), with their names, in registration order."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def flat(model: nn.Module) -> torch.Tensor:
    """The trainable parameters of ``model``, detached and concatenated into one vector.

    Equals ``torch.cat([p.reshape(-1) for p in model.parameters()])`` when every parameter
    trains; a frozen parameter is left out.
    """
    import torch

    return torch.cat([p.detach().reshape(-1) for _, p in trainable(model)])


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter of ``model`` (trainable or not), by name."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def state_tensors(model: nn.Module) -> list[torch.Tensor]:
    """A copy of every tensor of ``model.state_dict()`` (parameters and buffers), in order."""
    return [t.detach().clone() for t in model.state_dict().values()]


def norm(tensors_by_name: Mapping[str, torch.Tensor] | Iterable[torch.Tensor]) -> float:
    """The Euclidean norm of several tensors taken as one vector (a dict's values, or a list)."""
    values = tensors_by_name.values() if isinstance(tensors_by_name, Mapping) else tensors_by_name
    return math.sqrt(sum(float((t.double() ** 2).sum()) for t in values))


def max_diff(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """The largest absolute difference between two dicts of tensors with the same keys."""
    assert a.keys() == b.keys(), f"different keys: {sorted(a)} and {sorted(b)}"
    return max(float((a[k] - b[k]).abs().max()) for k in a)
