"""The package's one randomness convention, and the helpers that apply it.

Three keywords, by the kind of code:

- ``rng``: numpy code (mechanisms, data partitions, secure aggregation). A
  :class:`numpy.random.Generator`, an integer seed, or ``None`` for fresh entropy from the OS.
- ``seed``: the torch loops (training, DP-SGD, federated learning, attacks). An integer, or
  ``None`` for fresh entropy.
- ``generator``: the lowest-level torch steps, which take a :class:`torch.Generator` so that a
  caller's loop can draw from one stream: in :mod:`companion.dpsgd`,
  :func:`~companion.dpsgd.poisson_sample`, :func:`~companion.dpsgd.gaussian_noise`,
  :func:`~companion.dpsgd.add_gaussian_noise`, :func:`~companion.dpsgd.noisy_clipped_gradient`,
  :func:`~companion.dpsgd.set_private_gradients` and :func:`~companion.dpsgd.dp_sgd_step`;
  :func:`companion.federated.dp_fedavg_aggregate`; and, in :mod:`companion.audit`,
  :func:`~companion.audit.dpsgd_noisy_sum` and :func:`~companion.audit.dp_fedavg_noisy_mean`.

Defaults follow what the randomness protects. Where it is **noise or private sampling**
(mechanisms, DP-SGD, DP-FedAvg) the default is ``None``, fresh entropy: two runs with default
arguments on neighbouring data sets must not reuse the same noise, or their difference would be
noise-free. Where it is **public** (a data set's split, a model's initial weights, the shuffling of
non-private training) the default is ``0``, so every reader sees the same numbers.

A seed used for noise is a secret: whoever knows it can regenerate the noise and subtract it.
Pass one to reproduce a run in a notebook or a test, never when releasing a result. Neither
numpy's nor torch's generators are cryptographic, and torch's CPU generator keeps only 32 bits of
its seed, so fresh entropy picks one of :math:`2^{32}` noise streams there: the guarantees of this
package assume ideal randomness (as Opacus does outside its ``secure_mode``) and do not hold
against an adversary who could search the seeds. A release that must resist that needs a
cryptographic source of noise (OpenDP, Opacus's ``secure_mode``).
"""

from __future__ import annotations

from numbers import Integral

import numpy as np
import torch

from companion._validation import check_seed, warn

__all__ = [
    "RNGLike",
    "as_generator",
    "check_generator",
    "check_optional_seed",
    "derive_seed",
    "torch_generator",
    "warn_if_unseeded",
]

#: What an ``rng`` argument may be: a numpy Generator, an integer seed, or None (fresh entropy).
RNGLike = np.random.Generator | int | None


def as_generator(rng: RNGLike) -> np.random.Generator:
    """Turn ``rng`` (a Generator, an int seed or None for fresh entropy) into a Generator."""
    if rng is None or isinstance(rng, np.random.Generator):
        return np.random.default_rng(rng)
    if isinstance(rng, bool) or not isinstance(rng, Integral):
        raise TypeError(
            f"rng must be a numpy.random.Generator, an int seed or None, got {type(rng).__name__}."
        )
    if rng < 0:
        raise ValueError(f"rng seed must be >= 0, got {rng}.")
    return np.random.default_rng(int(rng))


def check_optional_seed(seed: object, name: str = "seed") -> int | None:
    """``None`` (fresh entropy) or an integer seed >= 0."""
    return None if seed is None else check_seed(seed, name)


def torch_generator(seed: object, *, device: torch.device | str = "cpu") -> torch.Generator:
    """A :class:`torch.Generator` on ``device``, seeded with ``seed`` (None: fresh entropy)."""
    generator = torch.Generator(device=device)
    seed = check_optional_seed(seed)
    if seed is None:
        generator.seed()  # a non-deterministic seed from the OS
    else:
        generator.manual_seed(seed)
    return generator


def derive_seed(seed: int | None, *keys: int) -> int | None:
    """An independent seed for the stream named by ``keys`` (a round, a client, ...).

    Built with :class:`numpy.random.SeedSequence`, so streams for different keys do not overlap.
    ``None`` stays ``None`` (fresh entropy for every stream).
    """
    if seed is None:
        return None
    if any(isinstance(k, bool) or not isinstance(k, Integral) or k < 0 for k in keys):
        raise ValueError(f"stream keys must be integers >= 0, got {keys}.")
    return int(np.random.SeedSequence((seed, *keys)).generate_state(1)[0])


def check_generator(generator: object) -> torch.Generator:
    """``generator``, if it is a :class:`torch.Generator`."""
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            "generator must be a torch.Generator (seed one from the OS with its .seed() method), "
            f"got {type(generator).__name__}."
        )
    return generator


#: The seed of a :class:`torch.Generator` that nobody seeded.
_UNSEEDED = torch.Generator().initial_seed()


def warn_if_unseeded(generator: torch.Generator) -> None:
    """Warn, before a draw, if ``generator`` was never seeded: its draws are every run's."""
    if generator.initial_seed() == _UNSEEDED:
        warn(
            "generator has torch's default seed (it was never seeded), so every run that makes "
            "one the same way draws the same noise and samples: call its .seed() method for "
            "fresh entropy from the OS, or .manual_seed() with a secret seed."
        )
