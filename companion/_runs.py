"""What the training loops share: their accountant, and the check of their test data (private).

:func:`companion.dpsgd.train_dpsgd` and :func:`companion.federated.dp_fedavg` account for a run
in an accountant, their own or one passed in to continue an earlier run: they check it
(:func:`check_accountant`), seed the run so that a continued run never replays an earlier one
(:func:`run_seed`), try the planned run on a copy (:func:`continued`), and say on an error what
the steps recorded before it spent (:func:`note_spent`). They check their test data before
training (:func:`check_test`). Like :mod:`companion._torch`, one of the private modules other
modules may import from.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from companion._outputs import check_outputs
from companion._random import check_optional_seed, derive_seed
from companion._torch import ArrayLike, LossFn, check_optional_test
from companion.accounting import PLDAccountant, RDPAccountant

__all__ = ["Accountant", "check_accountant", "check_test", "continued", "note_spent", "run_seed"]

Accountant = RDPAccountant | PLDAccountant


def check_accountant(accountant: object) -> Accountant:
    """``accountant`` to continue, or a new :class:`~companion.accounting.RDPAccountant` for
    ``None``."""
    if accountant is None:
        return RDPAccountant()
    if not isinstance(accountant, Accountant):
        kind = accountant if isinstance(accountant, type) else type(accountant)
        name = kind.__qualname__  # with its module if another library's (Opacus's accountants)
        if kind.__module__.partition(".")[0] not in ("builtins", "companion"):
            name = f"{kind.__module__}.{name}"
        got = f"the class {name}; pass an instance" if kind is accountant else name
        raise TypeError(
            "accountant must be a companion.accounting.RDPAccountant or PLDAccountant (to "
            f"continue an earlier run, pass the one it used); got {got}."
        )
    return accountant


def run_seed(seed: object, accountant: Accountant) -> int | None:
    """The seed of this run's randomness: ``seed`` itself for a new accountant, and a seed derived
    from it and the steps the accountant already holds for a continued one, so that continuing a
    run with the same seed never replays an earlier call's samples and noise (their difference
    would then be noise-free)."""
    seed = check_optional_seed(seed)
    return seed if len(accountant) == 0 else derive_seed(seed, len(accountant))


def continued(
    accountant: Accountant, *, noise_multiplier: float, sample_rate: float, steps: int
) -> Accountant:
    """A copy of ``accountant`` with ``steps`` more steps; ``accountant`` is left as it is."""
    trial = copy.deepcopy(accountant)
    trial.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
    return trial


def note_spent(
    error: BaseException, accountant: Accountant, taken: int, delta: float, *, run: str
) -> None:
    """Say on ``error`` what the ``taken`` noisy steps (or rounds) that ``run`` recorded in
    ``accountant`` before ``error`` stopped it have spent, with the steps it held before."""
    if taken == 0:
        return
    try:
        epsilon = f"{accountant.get_epsilon(delta):.4g}"
    except ValueError:  # PLD: a grid too small to follow the run
        epsilon = "not computable by this accountant"
    error.add_note(
        f"{run} stopped after recording {taken} noisy step(s) (at most that many changed the "
        f"model); with them the accountant's total is epsilon = {epsilon} at delta = {delta}."
    )


def check_test(
    model: nn.Module,
    x_test: ArrayLike | None,
    y_test: ArrayLike | None,
    *,
    loss: str | LossFn,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The test data of a run, or None, checked before training: a model that does not fit them
    is refused now, not after a round or an epoch has changed it (and charged an accountant)."""
    test_data = check_optional_test(x_test, y_test, loss=loss, device=device)
    if test_data is not None:
        try:
            check_outputs(model, *test_data, loss=loss)
        except ValueError as error:
            raise ValueError(f"x_test and y_test: {error}") from None
    return test_data
