"""How many DP-SGD steps a number of epochs is: one rule for training and for calibration."""

from __future__ import annotations

from companion._validation import check_fraction, check_positive_int

__all__ = ["steps_for_epochs"]


def steps_for_epochs(*, epochs: int, sample_rate: float) -> int:
    r"""The number of steps :func:`companion.dpsgd.train_dpsgd` takes in ``epochs`` epochs.

    An epoch is :math:`\mathrm{round}(1/q)` steps (at least one; Python's ``round``, halves to
    even: q = 0.4 gives 2), so that each example is used about once per epoch on average; a run
    of ``epochs`` epochs is ``epochs`` times that. Calibrate the
    noise for this number of steps (``get_noise_multiplier(..., steps=...)``), or the run will
    spend a little more or less than the target.

    Args:
        epochs: the number of epochs, >= 1.
        sample_rate: the Poisson sampling rate :math:`q`, in (0, 1].

    Returns:
        The number of steps, >= 1.

    Raises:
        TypeError: if ``epochs`` is not an integer.
        ValueError: if ``epochs < 1``, ``sample_rate`` is outside (0, 1] or below 2**-64, or
            the run would be more than 2**64 steps.

    Example:
        >>> steps_for_epochs(epochs=3, sample_rate=256 / 60000)
        702
    """
    epochs = check_positive_int("epochs", epochs)
    sample_rate = check_fraction("sample_rate", sample_rate)
    if sample_rate < 2.0**-64:  # 1/q would overflow a float for a subnormal q
        raise ValueError(
            f"sample_rate={sample_rate:g} is too small: an epoch would be 1/sample_rate steps, "
            "more than 2**64."
        )
    steps = epochs * max(1, round(1 / sample_rate))
    if steps > 2**64:
        raise ValueError(
            f"epochs at sample_rate={sample_rate:g} would be more than 2**64 steps: lower epochs."
        )
    return steps
