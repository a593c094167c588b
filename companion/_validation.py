"""Argument checks shared by the public functions of :mod:`companion`.

Every check raises :class:`ValueError` (a value out of range) or :class:`TypeError` (a value of the
wrong kind) with a sentence that names the parameter, says what was wrong and what is allowed.
Nothing is clipped or coerced silently. A public function lists the errors of the checks it
calls in its own ``Raises:`` section; the messages are a contract (the notebooks show them), so
change none without updating the book. :func:`warn` issues a warning that points at the
user's own line.

Example:
    >>> check_positive("epsilon", 0.5)
    0.5
    >>> check_positive("epsilon", 0)
    Traceback (most recent call last):
    ...
    ValueError: epsilon must be > 0, got 0.0.
    >>> check_positive("epsilon", "1")
    Traceback (most recent call last):
    ...
    TypeError: epsilon must be a real number, got str.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Iterable, Sequence
from numbers import Integral, Real

import numpy as np


def check_real(name: str, value: object) -> float:
    """Return ``value`` as a float if it is a finite real number (not a bool), else raise.

    Raises:
        TypeError: if ``value`` is not a real number, or is a bool.
        ValueError: if ``value`` is NaN or infinite.
    """
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type_name(value)}.")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must be a number, got NaN.")
    if math.isinf(value):
        raise ValueError(f"{name} must be finite, got {value}.")
    return value


def check_positive(name: str, value: object) -> float:
    """A finite real number > 0.

    Raises:
        TypeError: as :func:`check_real`.
        ValueError: if ``value`` is NaN, infinite or <= 0.
    """
    value = check_real(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}.")
    return value


def check_nonnegative(name: str, value: object) -> float:
    """A finite real number >= 0.

    Raises:
        TypeError: as :func:`check_real`.
        ValueError: if ``value`` is NaN, infinite or < 0.
    """
    value = check_real(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}.")
    return value


def check_fraction(name: str, value: object) -> float:
    """A finite real number in (0, 1], such as a sampling rate or a share of clients.

    Raises:
        TypeError: as :func:`check_real`.
        ValueError: if ``value`` is NaN or not in (0, 1].
    """
    value = check_positive(name, value)
    if value > 1:
        raise ValueError(f"{name} must lie in (0, 1], got {value}.")
    return value


def check_seed(value: object, name: str = "seed") -> int:
    """An integer seed in [0, 2**64) (not a bool): what a :class:`torch.Generator` takes.

    Raises:
        TypeError: if ``value`` is not an integer, or is a bool.
        ValueError: if ``value`` < 0 or ``value`` >= 2**64.
    """
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an integer, got {type_name(value)}.")
    if not 0 <= value < 2**64:
        raise ValueError(f"{name} must be >= 0 and below 2**64, got {value}.")
    return int(value)


def type_name(value: object) -> str:
    """The name of ``value``'s type for a message: a builtin's bare name (``int``), any other
    type's with its module (``numpy.bool``, ``torch.Tensor``), so that numpy's ``bool`` is not
    taken for Python's."""
    kind = type(value)
    if kind.__module__ == "builtins":
        return kind.__qualname__
    return f"{kind.__module__}.{kind.__qualname__}"


def with_article(word: str) -> str:
    """``word`` after "a", or "an" where it is read with a vowel first.

    An acronym (two capitals first) is read letter by letter, so "an" goes before A, E, F, H, I,
    L, M, N, O, R, S and X; otherwise "an" goes before a vowel, except a "u" read as "you" or an
    "o" read as "w" (in the names below), and before ``ndarray``.

    Example:
        >>> [with_article(w) for w in ("int", "tuple", "LSTM", "GRU", "ndarray", "UserDict")]
        ['an int', 'a tuple', 'an LSTM', 'a GRU', 'an ndarray', 'a UserDict']
    """
    if word[:2].isupper():
        vowel = word[0] in "AEFHILMNORSX"
    elif word.lower().startswith(("use", "usu", "uint", "ufunc", "unique", "one")):
        vowel = False
    else:
        vowel = word[:1].lower() in "aeiou" or word.startswith("nd")
    return f"an {word}" if vowel else f"a {word}"


def check_flag(name: str, value: object) -> bool:
    """True or False (not 0, 1 or a string, which would be read by truth value); numpy's bools
    (``np.True_``, what comparing numpy numbers gives) are returned as Python bools.

    Raises:
        TypeError: if ``value`` is neither a Python nor a numpy bool.

    Example:
        >>> check_flag("progress", np.True_)
        True
        >>> check_flag("progress", np.int64(1))
        Traceback (most recent call last):
        ...
        TypeError: progress must be True or False, got numpy.int64.
    """
    if isinstance(value, np.bool_):
        return bool(value)
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type_name(value)}.")
    return value


def check_probability(name: str, value: object, *, allow_zero: bool) -> float:
    """A real number in [0, 1] (``allow_zero``) or in (0, 1].

    Raises:
        TypeError: as :func:`check_real`.
        ValueError: if ``value`` is NaN or outside the interval.
    """
    value = check_real(name, value)
    low_ok = value >= 0 if allow_zero else value > 0
    if not (low_ok and value <= 1):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"{name} must lie in {interval}, got {value}.")
    return value


def check_int(name: str, value: object, *, minimum: int) -> int:
    """An integer (not a bool) >= ``minimum``.

    Raises:
        TypeError: if ``value`` is not an integer, or is a bool.
        ValueError: if ``value < minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an integer, got {type_name(value)}.")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}.")
    return int(value)


def _real_sequence(name: str, value: object) -> tuple[list[float], bool]:
    """A real number or a non-empty 1-D sequence of them, with no NaN; ``(values, is_scalar)``."""
    if isinstance(value, Real) and not isinstance(value, bool):
        values, scalar = [value], True
    elif isinstance(value, (str, bytes)) or not isinstance(value, (Iterable, np.ndarray)):
        raise TypeError(
            f"{name} must be a real number or a sequence of real numbers, got {type_name(value)}."
        )
    else:
        if isinstance(value, np.ndarray) and value.ndim != 1:
            raise ValueError(f"{name} must be one-dimensional, got shape {value.shape}.")
        values, scalar = list(value), False
        if not values:
            raise ValueError(f"{name} must not be empty.")
    for item in values:
        if isinstance(item, bool) or not isinstance(item, Real):
            raise TypeError(f"{name} must hold real numbers, got {type_name(item)}.")
        if math.isnan(item):
            raise ValueError(f"{name} must not contain NaN.")
    return [float(item) for item in values], scalar


def check_orders(orders: object, name: str = "orders") -> tuple[np.ndarray, bool]:
    """RDP orders: a real number or a non-empty 1-D sequence of them, each > 1 or +inf.

    Returns the orders as a float array and whether a scalar was given.

    Raises:
        TypeError: if ``orders`` is not a real number or a sequence of them.
        ValueError: if ``orders`` is empty, not one-dimensional, or holds NaN or an order <= 1.
    """
    values, scalar = _real_sequence(name, orders)
    for value in values:
        if not value > 1:
            raise ValueError(f"every order in {name} must be > 1 (or inf), got {value}.")
    return np.array(values, dtype=float), scalar


def check_rdp(rdp: object) -> np.ndarray:
    """RDP values: a real number or a non-empty 1-D sequence of them, each >= 0 or +inf.

    Raises:
        TypeError: if ``rdp`` is not a real number or a sequence of them.
        ValueError: if ``rdp`` is empty, not one-dimensional, or holds NaN or a negative value.
    """
    values, _ = _real_sequence("rdp", rdp)
    for value in values:
        if value < 0:
            raise ValueError(f"rdp values are Renyi divergences and must be >= 0, got {value}.")
    return np.array(values, dtype=float)


def check_epsilon(value: object, name: str = "epsilon") -> float:
    """A privacy parameter epsilon: a finite real number > 0.

    Raises:
        TypeError: as :func:`check_real`.
        ValueError: if ``value`` is NaN, infinite or <= 0.
    """
    return check_positive(name, value)


# Why delta = 0 is refused where it is: every caller without allow_zero adds Gaussian noise.
GAUSSIAN_NEEDS_DELTA = (
    "Gaussian noise is not (epsilon, 0)-DP for any finite epsilon, so this needs delta > 0; "
    "pass a small one, such as 1e-5, well below 1/n for n people."
)


def check_delta(
    value: object, name: str = "delta", *, allow_zero: bool = False, why_not_zero: str = ""
) -> float:
    """A privacy parameter delta: a real number in (0, 1), or in [0, 1) with ``allow_zero``.

    Without ``allow_zero`` a zero is refused with ``why_not_zero`` appended, by default
    :data:`GAUSSIAN_NEEDS_DELTA`.

    Raises:
        TypeError: as :func:`check_real`.
        ValueError: if ``value`` is NaN or outside the interval.
    """
    value = check_real(name, value)
    if allow_zero and value == 0:
        return value
    if not 0 < value < 1:
        interval = "[0, 1)" if allow_zero else "the open interval (0, 1)"
        why = f" {why_not_zero or GAUSSIAN_NEEDS_DELTA}" if value == 0 else ""
        raise ValueError(f"{name} must lie in {interval}, got {value}.{why}")
    return value


def check_accountant_name(accountant: object) -> str:
    """``"rdp"`` or ``"pld"``, the accountants named by a string; hints for near misses.

    Raises:
        TypeError: if ``accountant`` is not a string.
        ValueError: if it is another string (for ``"PLD"`` and ``"prv"`` the message says which
            name to use).
    """
    if not isinstance(accountant, str):
        raise TypeError(f"accountant must be a string, got {type_name(accountant)}.")
    if accountant not in ("rdp", "pld"):
        hint = ""
        if accountant.lower() in ("rdp", "pld"):
            hint = f" The names are lower case: accountant={accountant.lower()!r}."
        elif accountant.lower() == "prv":
            hint = (
                " Opacus's PRV accountant and the PLD accountant both discretise the privacy-loss"
                ' distribution: use accountant="pld".'
            )
        raise ValueError(f'accountant must be "rdp" or "pld", got {accountant!r}.{hint}')
    return accountant


def check_positive_int(name: str, value: object) -> int:
    """An integer >= 1 (not a bool).

    Raises:
        TypeError: if ``value`` is not an integer, or is a bool.
        ValueError: if ``value < 1``.
    """
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an integer, got {type_name(value)}.")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}.")
    return int(value)


def check_values(name: str, value: object) -> float | np.ndarray:
    """A real number or a numeric numpy array with no NaN; returned as float or float array.

    Raises:
        TypeError: if ``value`` is neither a real number nor a real numeric array (bool and
            complex arrays are refused).
        ValueError: if the array is empty, or ``value`` holds NaN.
    """
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
        raise TypeError(f"{name} must be a real number or a numpy array, got {type_name(value)}.")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must be a number, got NaN.")
    return value


def check_finite_values(name: str, value: object) -> float | np.ndarray:
    """As :func:`check_values`, and every entry finite: a true answer to release with noise.

    Raises:
        TypeError: as :func:`check_values`.
        ValueError: as :func:`check_values`, or if ``value`` holds an infinite entry.
    """
    value = check_values(name, value)
    if not np.isfinite(value).all():
        raise ValueError(f"{name} must be finite: noise added to an infinite answer hides nothing.")
    return value


def check_vector(name: str, value: object) -> np.ndarray:
    """A non-empty one-dimensional numeric numpy array with no NaN.

    Raises:
        TypeError: if ``value`` is not a numpy array, or not a real numeric array.
        ValueError: if ``value`` is not one-dimensional, is empty or holds NaN.
    """
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name} must be a one-dimensional numpy array, got {type_name(value)}.")
    if value.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {value.shape}.")
    array = check_values(name, value)
    assert isinstance(array, np.ndarray)
    return array


def check_index_parts(parts: object, n: int) -> list[np.ndarray]:
    """Validate one integer index array per client, each non-empty with indices in ``[0, n)``.

    Tensors are accepted too (moved to numpy). Returns the arrays as numpy arrays.
    """
    if isinstance(parts, (str, bytes)) or not isinstance(parts, Sequence):
        raise TypeError(f"parts must be a list of index arrays, got {type_name(parts)}.")
    if len(parts) == 0:
        raise ValueError("parts must hold at least one client's indices, got an empty list.")
    checked = []
    for k, part in enumerate(parts):
        index = np.asarray(part.cpu() if hasattr(part, "cpu") else part)
        if index.ndim != 1:
            raise ValueError(
                f"parts[{k}] must be a one-dimensional index array, got shape {index.shape}."
            )
        if index.size == 0:
            raise ValueError(f"parts[{k}] is empty; every client must hold at least one example.")
        if index.dtype == bool or not np.issubdtype(index.dtype, np.integer):
            raise TypeError(f"parts[{k}] must hold integer indices, got dtype {index.dtype}.")
        if index.min() < 0 or index.max() >= n:
            raise ValueError(
                f"parts[{k}] holds indices out of range: they must lie in [0, {n}), got "
                f"{int(index.min())} .. {int(index.max())}."
            )
        checked.append(index)
    return checked


def warn(message: str) -> None:
    """Issue a :class:`UserWarning` attributed to the first caller outside :mod:`companion` (and
    :mod:`torch`, which calls the package back from a layer's call: the user's line calls it).

    A fixed ``stacklevel`` would point into the package whenever one public function reaches the
    warning through another (LiRA through the membership attack's helpers).
    """
    level, frame = 2, sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] in (
        "companion",
        "torch",
    ):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, UserWarning, stacklevel=level)
