"""Companion code for the open textbook *Privacy in Machine Learning*.

One module per idea, named after what it holds (each is imported on first use, so
``import companion`` then ``companion.dpsgd`` works):

- :mod:`companion.data`: the data sets the chapters use, splits, partitions among clients;
- :mod:`companion.mechanisms`, :mod:`companion.composition`: randomized response, the Laplace,
  Gaussian and exponential mechanisms, counting and sum queries; composition and group privacy;
- :mod:`companion.models`, :mod:`companion.training`: small models and plain training loops;
- :mod:`companion.accounting`: privacy accountants of the Poisson-subsampled Gaussian and the
  calibration of the noise multiplier;
- :mod:`companion.per_example`: per-example gradients and clipping (a table of per-layer rules);
- :mod:`companion.dpsgd`: Poisson sampling, noise, the DP-SGD step and training loop;
- :mod:`companion.federated`, :mod:`companion.secure_aggregation`: FedAvg, FedProx, DP-FedAvg and
  a pairwise-masking secure-aggregation toy;
- :mod:`companion.flower`: the same federated training as Flower apps (optional extra);
- :mod:`companion.attacks`: membership inference and gradient inversion;
- :mod:`companion.audit`: empirical lower bounds on epsilon.

Randomness follows one convention (see :mod:`companion._random`): noise and private sampling
use fresh entropy unless a seed or generator is passed, and a seed used for noise is a secret.
Functions that take a model and data run on the model's device: data given as numpy arrays or
CPU tensors is moved there (the model's parameters must all be on one device).

The code is written to teach: it is tested and its guarantees are stated exactly, but its noise
samplers are not hardened for production use. Use OpenDP, Opacus or Flower for real data.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the modules load on first use
    from companion import (
        accounting,
        attacks,
        audit,
        composition,
        data,
        dpsgd,
        federated,
        flower,
        mechanisms,
        models,
        per_example,
        secure_aggregation,
        training,
    )

__version__ = "0.2.0"

# The public modules, imported on first access (PEP 562), so `import companion` stays cheap
# (no torch) and `companion.dpsgd` works without `import companion.dpsgd`.
__all__ = [
    "accounting",
    "attacks",
    "audit",
    "composition",
    "data",
    "dpsgd",
    "federated",
    "flower",
    "mechanisms",
    "models",
    "per_example",
    "secure_aggregation",
    "training",
]
_SUBMODULES = frozenset(__all__)


def __getattr__(name: str) -> object:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_SUBMODULES})
