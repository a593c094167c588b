"""Data sets used by the chapters, all available offline.

- :func:`load_digits`: the 8x8 handwritten digits that ship with scikit-learn (1,797 images, 10
  classes), split into training and test sets.
- :func:`make_patients`: a synthetic table of patients generated from a seed, for counting and
  sum queries and for attacks on "anonymised" aggregates. No real person is in it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn import datasets

from companion._validation import RNGLike, as_generator, check_positive_int, check_real

__all__ = ["Digits", "Patients", "load_digits", "make_patients"]


@dataclass(frozen=True)
class Digits:
    """Training and test splits of the digits data.

    Attributes:
        x_train, x_test: float32 arrays of shape (n, 64), pixel intensities scaled to [0, 1].
        y_train, y_test: int64 arrays of shape (n,), labels 0-9.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits(*, test_fraction: float = 0.25, seed: int = 0) -> Digits:
    """Load scikit-learn's bundled digits and split them at random, stratified by label.

    Args:
        test_fraction: share of the 1,797 images held out for testing, in (0, 1).
        seed: seed of the shuffle, so every reader gets the same split.
    """
    test_fraction = check_real("test_fraction", test_fraction)
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}.")
    rng = as_generator(seed)
    bunch = datasets.load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    test_index = []
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        test_index.append(members[: round(test_fraction * members.size)])
    is_test = np.zeros(y.size, dtype=bool)
    is_test[np.concatenate(test_index)] = True
    return Digits(x_train=x[~is_test], y_train=y[~is_test], x_test=x[is_test], y_test=y[is_test])


@dataclass(frozen=True)
class Patients:
    """A synthetic patient table; one entry per person in each array.

    Attributes:
        age: int64 ages in years, 18-90.
        zip_code: int64 codes of 10 neighbourhoods, 0-9.
        income: float64 yearly incomes in thousands, heavy-tailed (log-normal).
        has_condition: bool, whether the person has a sensitive medical condition; its
            prevalence rises with age.
    """

    age: np.ndarray
    zip_code: np.ndarray
    income: np.ndarray
    has_condition: np.ndarray

    def __len__(self) -> int:
        return int(self.age.size)


def make_patients(n: int = 1000, *, rng: RNGLike = 0) -> Patients:
    """Generate ``n`` synthetic patients from a seed.

    Args:
        n: number of people, >= 1.
        rng: a ``numpy.random.Generator`` or an int seed (default 0, so the table is the same for
            every reader).
    """
    n = check_positive_int("n", n)
    generator = as_generator(rng)
    age = generator.integers(18, 91, size=n)
    zip_code = generator.integers(0, 10, size=n)
    income = np.round(generator.lognormal(mean=np.log(45.0), sigma=0.6, size=n), 1)
    prevalence = 0.05 + 0.25 * (age - 18) / 72
    has_condition = generator.random(n) < prevalence
    return Patients(age=age, zip_code=zip_code, income=income, has_condition=has_condition)
