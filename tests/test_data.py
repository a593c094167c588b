"""Tests of companion.data."""

from __future__ import annotations

import numpy as np
import pytest

from companion.data import (
    label_distribution,
    load_digits,
    make_moons,
    make_patients,
    partition_dirichlet,
    partition_iid,
    partition_shards,
)


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
    old, young = (
        people.has_condition[people.age >= 70].mean(),
        people.has_condition[people.age < 30].mean(),
    )
    assert old > young
    assert abs(people.has_condition.mean() - 0.175) < 5 * np.sqrt(0.175 * 0.825 / 5000)


@pytest.mark.parametrize(("n", "error"), [(0, ValueError), (-3, ValueError), (2.5, TypeError)])
def test_patients_reject_bad_size(n, error):
    with pytest.raises(error, match="n must"):
        make_patients(n)


# --- partitions among clients -------------------------------------------------------------------

LABELS = load_digits(seed=0).y_train


def _assert_exact_cover(parts, n):
    everything = np.concatenate(parts)
    assert everything.size == n
    np.testing.assert_array_equal(np.sort(everything), np.arange(n))


@pytest.mark.parametrize(
    "split",
    [
        lambda rng: partition_iid(LABELS.size, num_clients=7, rng=rng),
        lambda rng: partition_shards(LABELS, num_clients=10, rng=rng),
        lambda rng: partition_dirichlet(LABELS, num_clients=10, alpha=0.3, rng=rng),
    ],
    ids=["iid", "shards", "dirichlet"],
)
def test_partitions_cover_every_example_once_and_reproduce_from_the_seed(split):
    parts = split(5)
    _assert_exact_cover(parts, LABELS.size)
    for a, b in zip(parts, split(5), strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(parts, split(6), strict=True))


def test_iid_parts_have_equal_sizes():
    sizes = [p.size for p in partition_iid(103, num_clients=10, rng=0)]
    assert max(sizes) - min(sizes) <= 1


def test_shards_give_each_client_few_classes():
    """Two shards per client: at most two classes, plus one more where a shard straddles a
    class boundary."""
    parts = partition_shards(LABELS, num_clients=20, shards_per_client=2, rng=0)
    classes_per_client = (label_distribution(LABELS, parts) > 0).sum(axis=1)
    assert classes_per_client.max() <= 4
    assert np.median(classes_per_client) <= 3


def _mean_total_variation(parts):
    """Average total-variation distance between each client's label mix and the global mix."""
    counts = label_distribution(LABELS, parts)
    local = counts / counts.sum(axis=1, keepdims=True)
    overall = np.bincount(LABELS) / LABELS.size
    return float(np.mean(0.5 * np.abs(local - overall).sum(axis=1)))


def test_dirichlet_skew_grows_as_alpha_shrinks():
    """Measured by the mean total-variation distance from the global label mix, averaged over
    five seeds: strictly decreasing in alpha, near IID levels at alpha = 100."""
    alphas = [0.05, 0.3, 1.0, 100.0]
    skew = [
        np.mean(
            [
                _mean_total_variation(partition_dirichlet(LABELS, num_clients=10, alpha=a, rng=s))
                for s in range(5)
            ]
        )
        for a in alphas
    ]
    assert all(x > y for x, y in zip(skew, skew[1:], strict=False))
    iid = np.mean(
        [_mean_total_variation(partition_iid(LABELS.size, num_clients=10, rng=s)) for s in range(5)]
    )
    assert skew[-1] < 2 * iid + 0.02
    assert skew[0] > 0.6


def test_dirichlet_respects_min_size_or_says_why():
    parts = partition_dirichlet(LABELS, num_clients=30, alpha=0.1, min_size=5, rng=0)
    assert min(p.size for p in parts) >= 5
    with pytest.raises(ValueError, match="attempts"):
        partition_dirichlet(LABELS, num_clients=300, alpha=0.01, min_size=4, max_attempts=3, rng=0)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: partition_iid(10, num_clients=0), ValueError, "num_clients must be >= 1"),
        (lambda: partition_iid(10, num_clients=11), ValueError, "at most the number of examples"),
        (lambda: partition_shards(LABELS.astype(float), num_clients=2), TypeError, "integers"),
        (lambda: partition_shards([0, 1], num_clients=2), TypeError, "numpy array"),
        (
            lambda: partition_shards(LABELS[:10], num_clients=6, shards_per_client=2),
            ValueError,
            "must not exceed",
        ),
        (
            lambda: partition_dirichlet(LABELS, num_clients=5, alpha=0.0),
            ValueError,
            "alpha must be > 0",
        ),
        (lambda: partition_dirichlet(LABELS, num_clients=5, alpha=float("nan")), ValueError, "NaN"),
        (
            lambda: partition_dirichlet(np.array([], dtype=int), num_clients=1, alpha=1.0),
            ValueError,
            "empty",
        ),
    ],
)
def test_partition_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_moons_are_a_reproducible_balanced_binary_task():
    moons = make_moons(400, noise=0.2, seed=3)
    assert moons.x_train.shape == (300, 2) and moons.x_test.shape == (100, 2)
    assert set(np.unique(moons.y_train)) == {0, 1}
    assert moons.y_test.mean() == 0.5  # stratified: 50 of each class held out
    np.testing.assert_array_equal(moons.x_test, make_moons(400, noise=0.2, seed=3).x_test)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"n": 0}, ValueError, "n must be >= 1"),
        ({"noise": -0.1}, ValueError, "noise"),
        ({"test_fraction": 1.5}, ValueError, "test_fraction"),
        ({"seed": -1}, ValueError, "seed must be >= 0"),
        ({"seed": 2**32}, ValueError, r"seed must be at most 2\*\*32 - 1"),
        ({"seed": 1.5}, TypeError, "seed must be an integer"),
    ],
)
def test_moons_bad_input(kwargs, error, message):
    with pytest.raises(error, match=message):
        make_moons(**kwargs)


@pytest.mark.parametrize(
    ("parts", "error", "message"),
    [
        (
            [np.array([0, 1]), np.array([2, len(LABELS)])],
            ValueError,
            r"parts\[1\] holds indices out",
        ),
        ([np.array([0, 1]), np.array([], dtype=int)], ValueError, r"parts\[1\] is empty"),
        ([np.array([0.0, 1.0])], TypeError, r"parts\[0\] must hold integer indices"),
        ("0123", TypeError, "parts must be a list of index arrays"),
    ],
)
def test_label_distribution_names_a_bad_part(parts, error, message):
    """The same checks as client_datasets: a bad index array gets a message naming it, not
    numpy's IndexError."""
    with pytest.raises(error, match=message):
        label_distribution(LABELS, parts)
