"""Tests of companion.composition against the theorems' formulas and their known properties."""

from __future__ import annotations

import math
import warnings

import pytest

from companion.composition import advanced_composition, basic_composition, group_privacy


def test_basic_composition_adds_epsilons_and_deltas():
    assert basic_composition(epsilon=0.5, delta=1e-6, k=10) == pytest.approx((5.0, 1e-5))
    assert basic_composition(epsilon=0.5, k=3) == pytest.approx((1.5, 0.0))


def test_advanced_composition_formula():
    """Dwork and Roth (2014), Theorem 3.20, by hand for eps = 0.1, k = 100, delta' = 1e-5."""
    total, delta = advanced_composition(epsilon=0.1, delta=1e-7, k=100, delta_prime=1e-5)
    by_hand = math.sqrt(200 * math.log(1e5)) * 0.1 + 100 * 0.1 * (math.exp(0.1) - 1)
    assert total == pytest.approx(by_hand)
    assert delta == pytest.approx(100 * 1e-7 + 1e-5)


def test_advanced_composition_grows_like_square_root_of_k():
    """For small epsilon the first term dominates: quadrupling k roughly doubles the total."""
    small, _ = advanced_composition(epsilon=1e-3, k=1_000, delta_prime=1e-6)
    large, _ = advanced_composition(epsilon=1e-3, k=4_000, delta_prime=1e-6)
    assert large / small == pytest.approx(2.0, rel=0.01)
    basic_large, _ = basic_composition(epsilon=1e-3, k=4_000)
    assert large < basic_large


def test_advanced_composition_loses_to_basic_for_few_mechanisms():
    basic, _ = basic_composition(epsilon=1.0, k=5)
    advanced, _ = advanced_composition(epsilon=1.0, k=5, delta_prime=1e-5)
    assert advanced > basic


def test_group_privacy():
    assert group_privacy(epsilon=0.5, group_size=3) == pytest.approx((1.5, 0.0))
    eps, delta = group_privacy(epsilon=0.5, delta=1e-6, group_size=3)
    assert eps == pytest.approx(1.5)
    assert delta == pytest.approx(3 * math.exp(1.0) * 1e-6)
    assert group_privacy(epsilon=0.5, delta=1e-6, group_size=1) == pytest.approx((0.5, 1e-6))


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: basic_composition(epsilon=0.0, k=2), ValueError, "epsilon must be > 0"),
        (
            lambda: basic_composition(epsilon=1.0, delta=1.0, k=2),
            ValueError,
            r"delta must lie in \[0, 1\)",
        ),
        (lambda: basic_composition(epsilon=1.0, k=0), ValueError, "k must be >= 1"),
        (lambda: basic_composition(epsilon=1.0, k=2.0), TypeError, "k must be an integer"),
        (
            lambda: advanced_composition(epsilon=1.0, k=2, delta_prime=0.0),
            ValueError,
            r"delta_prime must lie in the open interval \(0, 1\), got 0.0. The bound grows like "
            r"sqrt\(log\(1 / delta_prime\)\): at 0 it is infinite.$",
        ),
        (
            lambda: advanced_composition(epsilon=1.0, k=2, delta_prime=1.0),
            ValueError,
            r"delta_prime must lie in the open interval \(0, 1\), got 1.0.$",  # no reason given
        ),
        (
            lambda: advanced_composition(epsilon=float("nan"), k=2, delta_prime=1e-5),
            ValueError,
            "NaN",
        ),
        (lambda: group_privacy(epsilon=1.0, group_size=0), ValueError, "group_size"),
        (lambda: group_privacy(epsilon=1.0, delta=-0.1, group_size=2), ValueError, "delta"),
    ],
)
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize(
    ("call", "total_delta"),
    [
        (lambda: basic_composition(epsilon=0.5, delta=0.2, k=10), 2.0),
        (lambda: advanced_composition(epsilon=0.1, delta=0.1, k=100, delta_prime=1e-5), 10.00001),
        (lambda: group_privacy(epsilon=1.0, delta=0.5, group_size=3), 3 * math.e**2 * 0.5),
    ],
)
def test_a_total_delta_of_1_or_more_is_warned_about(call, total_delta):
    """helper-104's trial: returned without a word, though such a bound guarantees nothing."""
    with pytest.warns(UserWarning, match="1 or more: .* guarantees nothing"):
        _, delta = call()
    assert delta == pytest.approx(total_delta)


def test_a_total_delta_below_1_gets_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert basic_composition(epsilon=0.5, delta=0.09, k=10)[1] == pytest.approx(0.9)
