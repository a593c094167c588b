"""Tests of companion.data."""

from __future__ import annotations

import numpy as np
import pytest

from companion.data import load_digits, make_patients


def test_digits_split_is_a_stratified_partition():
    digits = load_digits(test_fraction=0.25, seed=0)
    n_train, n_test = digits.y_train.size, digits.y_test.size
    assert n_train + n_test == 1797
    assert digits.x_train.shape == (n_train, 64) and digits.x_test.shape == (n_test, 64)
    assert digits.x_train.dtype == np.float32 and digits.y_train.dtype == np.int64
    assert 0.0 <= digits.x_train.min() and digits.x_train.max() <= 1.0
    # stratified: every class keeps its share of the test set to within one image
    all_counts = np.bincount(np.concatenate([digits.y_train, digits.y_test]))
    assert np.all(np.abs(np.bincount(digits.y_test) - 0.25 * all_counts) <= 1)
    # no image is in both sets (the raw digits hold no exact duplicates across a split here)
    train_rows = {row.tobytes() for row in digits.x_train}
    assert not any(row.tobytes() in train_rows for row in digits.x_test)


def test_digits_split_is_reproducible_and_depends_on_the_seed():
    a, b, c = load_digits(seed=1), load_digits(seed=1), load_digits(seed=2)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    np.testing.assert_array_equal(a.x_test, b.x_test)
    assert not np.array_equal(a.x_test, c.x_test)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.5, float("nan")])
def test_digits_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits(test_fraction=fraction)


def test_patients_are_reproducible_and_plausible():
    people = make_patients(5000, rng=3)
    again = make_patients(5000, rng=3)
    assert len(people) == 5000
    np.testing.assert_array_equal(people.income, again.income)
    assert people.age.min() >= 18 and people.age.max() <= 90
    assert set(np.unique(people.zip_code)) <= set(range(10))
    assert people.has_condition.dtype == bool
    # prevalence rises with age, as documented: 5% at 18 to 30% at 90, 17.5% on average
    old, young = people.has_condition[people.age >= 70].mean(), people.has_condition[people.age < 30].mean()
    assert old > young
    assert abs(people.has_condition.mean() - 0.175) < 5 * np.sqrt(0.175 * 0.825 / 5000)


@pytest.mark.parametrize(("n", "error"), [(0, ValueError), (-3, ValueError), (2.5, TypeError)])
def test_patients_reject_bad_size(n, error):
    with pytest.raises(error, match="n must"):
        make_patients(n)
