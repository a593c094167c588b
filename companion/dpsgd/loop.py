"""The DP-SGD training loop, :func:`train_dpsgd`, with its accounting and calibration.

Part of :mod:`companion.dpsgd`; import from there.
"""

from __future__ import annotations

import inspect
import math
import warnings
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from companion._forward import parameters_unwritten, refuse_inference
from companion._progress import progress_loop
from companion._random import torch_generator
from companion._runs import Accountant, check_accountant, continued, note_spent, run_seed
from companion._torch import (
    ArrayLike,
    check_loss_or_callable,
    epoch_record,
    model_device,
    trainable_named,
    warn_if_delta_large,
)
from companion._validation import (
    check_delta,
    check_epsilon,
    check_flag,
    check_fraction,
    check_nonnegative,
    check_positive,
    check_positive_int,
    warn,
)
from companion.accounting import (
    PLDAccountant,
    RDPAccountant,
    get_privacy_spent,
    steps_for_epochs,
)
from companion.dpsgd.data import RunData
from companion.dpsgd.step import LossLike, noisy_clipped_gradient, poisson_sample
from companion.per_example import (
    PerExampleClipper,
    check_dp_compatible,
)
from companion.per_example.gradients import Method

__all__ = ["train_dpsgd"]


def _check_optimizer(
    optimizer: object, model: nn.Module, lr: object
) -> torch.optim.Optimizer | None:
    if optimizer is None:
        if lr is None:
            raise ValueError("give lr (plain SGD) or an optimizer built on the model's parameters.")
        return None
    if lr is not None:
        raise ValueError(
            "give lr to the optimizer, not to train_dpsgd, when you pass an optimizer."
        )
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}."
        )
    closure = inspect.signature(optimizer.step).parameters.get("closure")
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise ValueError(
            f"optimizer {type(optimizer).__name__} needs a closure that re-evaluates the loss "
            "at each step, which would read the batch without clipping or noise; use a "
            "first-order optimizer (SGD, Adam, ...), which only sees the noisy gradients."
        )
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [name for name, p in trainable_named(model) if id(p) not in held]
    if missing:
        raise ValueError(
            f"optimizer does not hold the model's trainable parameters {missing}; build it with "
            "torch.optim.SGD(model.parameters(), lr=...) (or another optimizer) on this model."
        )
    if extra := len(held - {id(p) for p in model.parameters()}):
        warn(
            f"optimizer also holds {extra} tensor(s) that are not the model's parameters: "
            "train_dpsgd gives them no gradient, so the optimizer leaves them as they are."
        )
    return optimizer


def _calibrate(
    accountant: Accountant,
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
) -> float:
    """The noise multiplier that brings ``accountant``, continued by ``steps`` steps, to at most
    ``target_epsilon`` and within 1% of it: bisection keeping the upper end, which never exceeds
    the target, until that holds or the bracket is 0.1% wide (where epsilon cannot come close:
    the PLD grid). :func:`companion.accounting.get_noise_multiplier` searches likewise from a
    fresh accountant but stops within 0.01 of the target, so the two may differ slightly.
    """

    def epsilon(sigma: float) -> float:
        trial = continued(accountant, noise_multiplier=sigma, sample_rate=sample_rate, steps=steps)
        try:
            return trial.get_epsilon(delta)
        except ValueError:  # PLD: so little noise that the losses leave the grid, far too much
            return math.inf

    if isinstance(accountant, RDPAccountant) and len(accountant) == 0:  # else the floor is spent
        orders = accountant.orders
        floor, _ = get_privacy_spent(orders=orders, rdp=[0.0] * len(orders), delta=delta)
        if target_epsilon <= floor:
            largest = max((f"{o:g}" for o in orders if math.isfinite(o)), key=float, default="none")
            raise ValueError(
                f"target_epsilon={target_epsilon} cannot be reached: at delta={delta} the RDP "
                f"accountant's orders (the largest finite one: {largest}) bound epsilon below by "
                f"{floor:.4g} even with infinite noise. Raise target_epsilon or delta, add larger "
                "orders, or use a PLDAccountant."
            )
    spent = accountant.get_epsilon(delta)
    if spent >= target_epsilon:
        raise ValueError(
            f"the accountant has already spent epsilon={spent:.4g} at delta={delta}, which is not "
            f"below target_epsilon={target_epsilon}; raise the target or start a new accountant."
        )
    low, high, eps_high = 0.0, 0.5, math.inf
    while eps_high > target_epsilon:
        high *= 2
        if high > 2**20:
            raise ValueError(
                f"target_epsilon={target_epsilon} cannot be reached with {steps} steps at "
                f"sample_rate={sample_rate}: even noise_multiplier={high / 2:.3g} gives epsilon="
                f"{eps_high:.4g} at delta={delta}. Raise target_epsilon or delta, or run fewer "
                "steps."
            )
        eps_high = epsilon(high)
    while target_epsilon - eps_high > 0.01 * target_epsilon and high - low > 1e-3 * high:
        middle = (low + high) / 2
        eps = epsilon(middle)
        if eps <= target_epsilon:
            high, eps_high = middle, eps
        else:
            low = middle
    return high


def train_dpsgd(
    model: nn.Module,
    x: ArrayLike | Dataset,
    y: ArrayLike | None = None,
    *,
    max_grad_norm: float,
    sample_rate: float,
    epochs: int,
    delta: float,
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    lr: float | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    accountant: RDPAccountant | PLDAccountant | None = None,
    expected_batch_size: float | None = None,
    x_test: ArrayLike | Dataset | None = None,
    y_test: ArrayLike | None = None,
    seed: int | None = None,
    loss: LossLike = "cross_entropy",
    method: Method = "auto",
    progress: bool = False,
) -> list[dict[str, Any]]:
    r"""Train ``model`` in place with DP-SGD and account for the privacy spent.

    The run takes :math:`T` = :func:`companion.accounting.steps_for_epochs` steps (``epochs``
    times the integer nearest to :math:`1/q`, halves to even, the rule
    :func:`companion.accounting.get_noise_multiplier` uses for ``epochs=``). Each step draws a
    Poisson batch (:func:`poisson_sample`) and computes the noisy clipped gradient (as
    :func:`set_private_gradients` does); with an ``optimizer`` it goes into ``.grad`` and the
    optimizer steps (the ``.grad`` of every parameter it holds is set to ``None`` before the
    run, so that a frozen parameter's stale gradient is never applied, and that of the model's
    trainable parameters after each step, so that the next gradient is computed without this
    one in memory; an exception raised in the optimizer's step leaves that step's noisy
    gradient in ``.grad``), without one the weights take a plain SGD step with ``lr``. The
    accountant records one step of the Poisson-subsampled Gaussian mechanism before the step is
    applied. After each epoch it converts the privacy spent so far into epsilon at ``delta``.
    The run puts the model in training mode (``model.train()``, which also turns back on a
    submodule put in evaluation mode) and leaves it there.

    *Noise.* Give ``noise_multiplier`` :math:`\sigma`, or ``target_epsilon``: then :math:`\sigma`
    is found by bisection so that the accountant's total epsilon after exactly these :math:`T`
    steps is at or below the target, and within 1% of it where any :math:`\sigma` comes that
    close (a PLD accountant cannot follow very little noise): the target is never exceeded.
    (:func:`companion.accounting.get_noise_multiplier` stops within 0.01 of the target instead,
    as Opacus does, so it may return a slightly different :math:`\sigma`.)

    *Accounting across calls.* Pass the ``accountant`` of an earlier run (or one you built) to
    continue it: this run's steps are added to it in place and the reported epsilon is the total.
    Default: a new :class:`companion.accounting.RDPAccountant`. A run that stops with an
    exception (``KeyboardInterrupt`` too) has recorded every step it applied, and a note on the
    exception gives their epsilon. One accountant must not serve two runs at the same time: each
    would calibrate for, and draw from, the budget as it was when it started. An accountant holds
    no delta: continued at another ``delta``, it reports the whole history's epsilon at the new
    one, so give every call of one model the same ``delta``.

    *What is public.* The normaliser :math:`qN` (``expected_batch_size``) must not depend on
    the private data. By default it is ``sample_rate * len(x)``, which treats the data-set size
    as public (as Opacus does); pass a value fixed in advance to avoid that assumption. Choose
    ``delta`` well below :math:`1/N` (a ``UserWarning`` comes when :math:`\delta \ge 1/N`).
    Only the model is protected: ``clipped_fraction`` and the training loss and accuracy in the
    records are computed from the raw data, for the reader's monitoring only; a choice made from
    them (stopping early, a schedule, or a continued call chosen on ``train_loss``,
    ``train_accuracy`` or ``clipped_fraction``) reads the raw data too and is not covered. The
    guarantee also assumes that every record passes the input checks and has a finite gradient:
    a run that stops with a ``ValueError`` on a bad record (a Dataset's are checked as they are
    drawn) or on a gradient that is not finite reveals that, and its message, outside the
    guarantee. The initial weights and the optimizer's state must not depend on the private
    data. Buffers that a forward pass updates from its input (running statistics) are released
    with the model, without noise: batch normalisation and ``InstanceNorm`` with
    ``track_running_stats=True`` are refused
    (:func:`~companion.per_example.check_dp_compatible`), and so is a model whose buffers, when
    copies of it run on two of its first examples before training, in training and in evaluation
    mode (the mode of the per-epoch evaluation, which runs every training example), differ; a
    layer that keeps such statistics where that check does not see it voids the guarantee.

    *Randomness.* One :class:`torch.Generator`, on the model's device, draws the batches and the
    noise; ``seed=None`` (the default) seeds it from fresh OS entropy, so two runs do not share
    noise. Torch's generators are not cryptographic (on the CPU, a Mersenne Twister that keeps
    32 bits of its seed): the guarantee assumes ideal randomness, as Opacus does outside its
    ``secure_mode``, and does not hold against an adversary who could search the seeds; a
    release that must resist that needs a cryptographic source (OpenDP, Opacus's
    ``secure_mode``). A seed makes a run reproducible on the same kind of device, and must then
    stay secret:
    random layers such as ``Dropout`` draw from torch's global generator (seed it too), a GPU
    draws other numbers than the CPU from the same seed, and some GPU kernels (a convolution's
    weight gradient, ``index_add_``) sum in a varying order unless
    ``torch.use_deterministic_algorithms(True)``. With a continued accountant, the generator's
    seed is derived from ``seed`` and the steps the accountant already holds, so a second call
    with the same seed does not replay the first one's batches and noise. Without
    ``accountant``, every call is a new run: a second call on the same model with the same seed
    draws the first one's batches and noise again (the difference of the two updates is then
    noise-free), and each call's epsilon covers that call alone. To train one model in several
    calls, build an accountant and pass it to every call.

    Args:
        model: the model to train; must pass :func:`~companion.per_example.check_dp_compatible`.
            Everything runs on the device of its parameters.
        x: training inputs, shape ``(N, ...)`` (tensor or numpy array; an integer tensor, such
            as token ids, reaches the model unchanged, while numpy arrays become float32), or a
            :class:`torch.utils.data.Dataset` of ``(input, target)`` pairs (then no ``y``; each
            batch is checked as it is read, as tensor data are before training).
        y: training targets, shape ``(N, ...)``.
        max_grad_norm: the clipping norm :math:`C`, > 0.
        sample_rate: :math:`q`, in (0, 1].
        epochs: number of epochs, >= 1.
        delta: the delta at which epsilon is reported and targeted, in (0, 1).
        noise_multiplier: :math:`\sigma`, >= 0 (0 means no privacy: epsilon is infinite).
        target_epsilon: > 0, instead of ``noise_multiplier``.
        lr: learning rate of plain SGD, > 0 (without ``optimizer``).
        optimizer: any :class:`torch.optim.Optimizer` built on the model's parameters.
        accountant: the :class:`companion.accounting.RDPAccountant` or
            :class:`companion.accounting.PLDAccountant` to continue.
        expected_batch_size: :math:`qN`, > 0; default ``sample_rate * N`` (see above).
        x_test, y_test: optional held-out data, evaluated after every epoch: like ``x`` and
            ``y`` (``x_test`` alone if it is a Dataset).
        seed: seed of the sampling and noise generator, or None for fresh entropy.
        loss: ``"cross_entropy"``, ``"bce"``, or a callable ``(outputs, targets)`` returning the
            mean over the examples of a per-example loss that reads only that example's output
            and target (checked on a few examples; ``torch.nn.MSELoss()`` for regression).
        method: ``"auto"``, ``"vmap"`` or ``"layerwise"`` (see
            :func:`companion.per_example.clipped_gradient_sum`).
        progress: show a tqdm progress bar over the epochs.

    Returns:
        One dict per epoch, with keys ``"epoch"``, ``"steps"`` (this run's DP steps so far),
        ``"total_steps"`` (the steps the accountant holds: with a continued accountant, the
        earlier runs' too), ``"epsilon"`` (the accountant's total, at ``delta``, for
        ``"total_steps"``), ``"delta"``,
        ``"noise_multiplier"``, ``"clipped_fraction"`` (the share of the epoch's per-example
        gradients whose norm exceeded :math:`C`), ``"train_loss"`` (and ``"train_accuracy"``
        for a named loss) on the whole training set, and the same for test data if given.

    Raises:
        TypeError: if an argument is of the wrong kind.
        ValueError: if an argument is out of range, the model has a layer that mixes examples
            (see :func:`~companion.per_example.check_dp_compatible`) or its outputs on the first
            examples change when they are run together rather than one by one (see
            :func:`~companion.per_example.check_examples_independent`, which catches mistakes
            but cannot prove independence), its first passes write a parameter's values, the
            target cannot be reached, or an example's gradient is not finite (the run stops
            there: see *What is public*).
        RuntimeError: inside ``torch.inference_mode()``.

    Example:
        >>> from companion import data, models
        >>> digits = data.load_digits()
        >>> history = train_dpsgd(models.logistic_regression(), digits.x_train, digits.y_train,
        ...     target_epsilon=1.0, max_grad_norm=1.0, sample_rate=0.1, epochs=2, lr=1.0,
        ...     delta=1e-5, seed=0)
        >>> history[-1]["steps"], 0.99 <= history[-1]["epsilon"] <= 1.0
        (20, True)
    """
    check_dp_compatible(model)
    refuse_inference()
    loss = check_loss_or_callable(loss)
    device = model_device(model)
    data = RunData(x, y, loss, device)
    data.check(model)
    test = None
    if x_test is not None or y_test is not None:
        test = RunData(x_test, y_test, loss, device, names=("x_test", "y_test"))
        test.check(model)
    max_grad_norm = check_positive("max_grad_norm", max_grad_norm)
    sample_rate = check_fraction("sample_rate", sample_rate)
    epochs = check_positive_int("epochs", epochs)
    delta = check_delta(delta)
    check_flag("progress", progress)  # before the calibration, which may take seconds
    if (noise_multiplier is None) == (target_epsilon is None):
        raise ValueError("give exactly one of noise_multiplier and target_epsilon.")
    if lr is not None:
        lr = check_positive("lr", lr)
    optimizer = _check_optimizer(optimizer, model, lr)
    accountant = check_accountant(accountant)
    if expected_batch_size is None:
        expected_batch_size = sample_rate * data.n
    expected_batch_size = check_positive("expected_batch_size", expected_batch_size)
    generator = torch_generator(run_seed(seed, accountant), device=device)
    clipper = PerExampleClipper(model, loss=loss, method=method)
    warn_if_delta_large(delta, data.n)
    if sample_rate * data.n < 1:
        warnings.warn(
            f"sample_rate * n = {sample_rate * data.n:.3g} (n = {data.n}): most steps will see no "
            "example and move the model by noise alone. Raise sample_rate to at least 1/n.",
            UserWarning,
            stacklevel=2,
        )
    steps_per_epoch = steps_for_epochs(epochs=1, sample_rate=sample_rate)
    if target_epsilon is not None:
        target_epsilon = check_epsilon(target_epsilon, "target_epsilon")
        noise_multiplier = _calibrate(
            accountant,
            target_epsilon=target_epsilon,
            delta=delta,
            sample_rate=sample_rate,
            steps=epochs * steps_per_epoch,
        )
    else:  # the planned run's epsilon, so that an accountant that cannot follow it says so now
        noise_multiplier = check_nonnegative("noise_multiplier", noise_multiplier)
        continued(
            accountant,
            noise_multiplier=noise_multiplier,
            sample_rate=sample_rate,
            steps=epochs * steps_per_epoch,
        ).get_epsilon(delta)
    params = trainable_named(model)
    if optimizer is not None:  # a frozen parameter's stale .grad would be applied at every step
        optimizer.zero_grad(set_to_none=True)

    train_data, test_data = data.evaluation(), None if test is None else test.evaluation()
    history: list[dict[str, Any]] = []
    model.train()
    start = len(accountant)
    try:
        for epoch in progress_loop(
            epochs, history=history, desc="DP-SGD", unit="epoch", progress=progress
        ):
            clipped, seen = 0, 0
            for _ in range(steps_per_epoch):
                xb, yb = data.batch(
                    poisson_sample(data.n, sample_rate=sample_rate, generator=generator)
                )
                sums, norms = noisy_clipped_gradient(
                    clipper,
                    xb,
                    yb,
                    noise_multiplier=noise_multiplier,
                    max_grad_norm=max_grad_norm,
                    expected_batch_size=expected_batch_size,
                    generator=generator,
                )
                del xb, yb  # not held through the optimizer's step
                # Recorded before it is applied, so that no applied step goes unrecorded.
                accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
                if optimizer is None:
                    with torch.no_grad():
                        for name, p in params:
                            p.add_(sums[name], alpha=-lr)
                else:
                    for name, p in params:
                        p.grad = sums[name]
                    optimizer.step()
                    for _, p in params:
                        p.grad = None
                del sums  # the next gradient is computed without this one: a copy of the weights
                clipped = clipped + (norms > max_grad_norm).sum()  # on the device: no sync
                seen += norms.shape[0]
            record: dict[str, Any] = {"epoch": epoch, "steps": epoch * steps_per_epoch}
            record["total_steps"] = len(accountant)
            record["epsilon"] = accountant.get_epsilon(delta)
            record["delta"] = delta
            record["noise_multiplier"] = noise_multiplier
            record["clipped_fraction"] = int(clipped) / seen if seen else 0.0
            with parameters_unwritten(model):
                record.update(epoch_record(model, epoch, train_data, test_data, loss))
            history.append(record)
    except BaseException as error:  # KeyboardInterrupt too: say what the steps taken spent
        note_spent(error, accountant, len(accountant) - start, delta, run="train_dpsgd")
        raise
    return history
