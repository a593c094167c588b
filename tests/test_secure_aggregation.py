"""Tests of the secure-aggregation toy, companion.secure_aggregation (re-exported by federated)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from companion import federated, secure_aggregation
from companion.secure_aggregation import MODULUS, mask_update, pairwise_seeds, secure_sum

SCALE = 2.0**16


def test_the_old_import_path_still_works():
    """companion.federated re-exports the toy (the book and older code import it from there)."""
    for name in ("MODULUS", "mask_update", "pairwise_seeds", "secure_sum"):
        assert getattr(federated, name) is getattr(secure_aggregation, name)
        assert name in secure_aggregation.__all__


def _updates(num_clients, dim=50, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(0, 1, dim) for _ in range(num_clients)]


def test_masks_cancel_exactly_in_the_sum():
    """The decoded sum equals the sum of the fixed-point encoded updates exactly (integers), so
    it is within n / (2 scale) of the float sum."""
    updates = _updates(5)
    total, received = secure_sum(updates, scale=SCALE, rng=1)
    encoded_sum = np.sum([np.round(u * SCALE) for u in updates], axis=0)
    np.testing.assert_array_equal(total * SCALE, encoded_sum)
    assert np.abs(total - np.sum(updates, axis=0)).max() <= 5 / (2 * SCALE)
    assert len(received) == 5


def test_masked_updates_look_uniform_and_unrelated_to_the_update():
    """With another client present, a masked update is uniform on [0, 2^32): a KS test against
    the uniform distribution does not reject at the 1e-3 level, and the masked values are
    uncorrelated with the true ones (|r| < 5 / sqrt(dim))."""
    dim = 20_000
    updates = _updates(3, dim=dim)
    _, received = secure_sum(updates, scale=SCALE, rng=2)
    masked = received[0]
    assert stats.kstest(masked / MODULUS, "uniform").pvalue > 1e-3
    assert abs(np.corrcoef(masked, updates[0])[0, 1]) < 5 / np.sqrt(dim)


def test_a_lone_client_is_not_hidden():
    """Negative control: with a single client there are no pairs, so no mask."""
    update = np.array([0.5, -1.0])
    seeds = pairwise_seeds(1, rng=0)
    sent = mask_update(update, client=0, seeds=seeds, num_clients=1, scale=SCALE)
    np.testing.assert_array_equal(sent, np.round(update * SCALE).astype(np.int64) % MODULUS)


def test_dropped_clients_masks_are_removed_with_the_survivors_help():
    updates = _updates(6)
    total, received = secure_sum(updates, dropped=[1, 4], scale=SCALE, rng=3)
    survivors_sum = np.sum([u for i, u in enumerate(updates) if i not in (1, 4)], axis=0)
    assert len(received) == 4
    assert np.abs(total - survivors_sum).max() <= 4 / (2 * SCALE)


def test_without_recovery_a_dropout_ruins_the_sum():
    """Negative control: summing the survivors' masked updates without removing the dropped
    client's masks gives values spread over the whole ring, nowhere near the true sum."""
    updates = _updates(4)
    _, received = secure_sum(updates, dropped=[2], scale=SCALE, rng=4)
    naive = np.sum(received, axis=0) % MODULUS
    naive = np.where(naive >= MODULUS // 2, naive - MODULUS, naive) / SCALE
    assert np.abs(naive - np.sum([updates[i] for i in (0, 1, 3)], axis=0)).mean() > 1000


def test_seeds_reproduce():
    assert pairwise_seeds(4, rng=7) == pairwise_seeds(4, rng=7)
    assert len(pairwise_seeds(4, rng=7)) == 6


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: secure_sum([]), ValueError, ">= 1"),
        (lambda: secure_sum([np.zeros(2), np.zeros(3)]), ValueError, "common length"),
        (lambda: secure_sum([np.zeros(2)], dropped=[0]), ValueError, "survive"),
        (lambda: secure_sum([np.zeros(2)], dropped=[5]), ValueError, "dropped"),
        (lambda: secure_sum([np.array([np.nan, 1.0])]), ValueError, "finite"),
        (lambda: secure_sum([np.array([1e6])], scale=2.0**16), ValueError, "too large"),
        (lambda: secure_sum([np.zeros(2)], scale=0.0), ValueError, "scale"),
        (lambda: mask_update(np.zeros(2), client=3, seeds={}, num_clients=2), ValueError, "client"),
        (lambda: mask_update([0.0], client=0, seeds={}, num_clients=1), TypeError, "numpy array"),
        # helper-104's trial: client 2 is in no pair of 2 clients' seeds, and went out unmasked;
        # seeds of 3 clients for 2 left a mask with no partner in the sum
        (
            lambda: mask_update(
                np.zeros(2), client=2, seeds=pairwise_seeds(2, rng=0), num_clients=3
            ),
            ValueError,
            "a seed for each pair of client 2 with the other clients",
        ),
        (
            lambda: mask_update(
                np.zeros(2), client=0, seeds=pairwise_seeds(3, rng=0), num_clients=2
            ),
            ValueError,
            r"only pairs \(i, j\) with 0 <= i < j < num_clients=2",
        ),
        (
            lambda: mask_update(
                np.zeros(2), client=1.0, seeds=pairwise_seeds(2, rng=0), num_clients=2
            ),
            TypeError,
            "client must be an integer",
        ),
        (lambda: secure_sum([np.zeros(2)] * 3, dropped=2), TypeError, "dropped must be a sequence"),
        # a list of tensors got the ValueError of unequal lengths; complex updates were cast to
        # real with numpy's warning only; strings got numpy's isfinite error
        (lambda: secure_sum([torch.zeros(2)] * 2), TypeError, r"pass t\.numpy\(\)"),
        (lambda: secure_sum([np.array([1j, 2])] * 2), TypeError, "real numbers, got dtype complex"),
        (lambda: secure_sum([np.array(["a", "b"])] * 2), TypeError, "real numbers, got dtype <U1"),
    ],
)
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()
