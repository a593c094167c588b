"""Argument checks shared by the public functions of :mod:`companion`.

Every check raises :class:`ValueError` (a value out of range) or :class:`TypeError` (a value of the
wrong kind) with a sentence that names the parameter, says what was wrong and what is allowed.
Nothing is clipped or coerced silently.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import numpy as np

RNGLike = np.random.Generator | int | None


def check_real(name: str, value: object) -> float:
    """Return ``value`` as a float if it is a finite real number (not a bool), else raise."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}.")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must be a number, got NaN.")
    if math.isinf(value):
        raise ValueError(f"{name} must be finite, got {value}.")
    return value


def check_positive(name: str, value: object) -> float:
    """A finite real number > 0."""
    value = check_real(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}.")
    return value


def check_nonnegative(name: str, value: object) -> float:
    """A finite real number >= 0."""
    value = check_real(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}.")
    return value


def check_fraction(name: str, value: object) -> float:
    """A finite real number in (0, 1], such as a sampling rate or a share of clients."""
    value = check_positive(name, value)
    if value > 1:
        raise ValueError(f"{name} must lie in (0, 1], got {value}.")
    return value


def check_seed(value: object, name: str = "seed") -> int:
    """An integer seed >= 0 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}.")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}.")
    return int(value)


def check_epsilon(value: object, name: str = "epsilon") -> float:
    """A privacy parameter epsilon: a finite real number > 0."""
    return check_positive(name, value)


def check_delta(value: object, name: str = "delta", *, allow_zero: bool = False) -> float:
    """A privacy parameter delta: a real number in (0, 1), or in [0, 1) with ``allow_zero``."""
    value = check_real(name, value)
    if allow_zero and value == 0:
        return value
    if not 0 < value < 1:
        interval = "[0, 1)" if allow_zero else "the open interval (0, 1)"
        raise ValueError(f"{name} must lie in {interval}, got {value}.")
    return value


def check_positive_int(name: str, value: object) -> int:
    """An integer >= 1 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}.")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}.")
    return int(value)


def check_values(name: str, value: object) -> float | np.ndarray:
    """A real number or a numeric numpy array with no NaN; returned as float or float array."""
    if isinstance(value, np.ndarray):
        if value.dtype == bool or not np.issubdtype(value.dtype, np.number):
            raise TypeError(f"{name} must be a numeric array, got dtype {value.dtype}.")
        if np.issubdtype(value.dtype, np.complexfloating):
            raise TypeError(f"{name} must be real, got dtype {value.dtype}.")
        if value.size == 0:
            raise ValueError(f"{name} must not be empty.")
        array = value.astype(float)
        if np.isnan(array).any():
            raise ValueError(f"{name} must not contain NaN.")
        return array
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(
            f"{name} must be a real number or a numpy array, got {type(value).__name__}."
        )
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must be a number, got NaN.")
    return value


def check_vector(name: str, value: object) -> np.ndarray:
    """A non-empty one-dimensional numeric numpy array with no NaN."""
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name} must be a one-dimensional numpy array, got {type(value).__name__}.")
    if value.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {value.shape}.")
    array = check_values(name, value)
    assert isinstance(array, np.ndarray)
    return array


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
