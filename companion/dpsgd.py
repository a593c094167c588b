r"""Differentially private stochastic gradient descent (DP-SGD).

DP-SGD (Abadi, Chu, Goodfellow, McMahan, Mironov, Talwar and Zhang 2016, "Deep Learning with
Differential Privacy", ACM CCS 2016, Algorithm 1; building on Song, Chaudhuri and Sarwate 2013
and Bassily, Smith and Thakurta 2014) changes one step of SGD in three ways.

1. **Poisson sampling.** Each of the :math:`N` training examples joins the batch :math:`B`
   independently with probability :math:`q` (``sample_rate``), so the batch size is random,
   :math:`|B| \sim \mathrm{Binomial}(N, q)`, and may even be zero (:func:`poisson_sample`).
2. **Per-example clipping.** Every example's gradient :math:`g_i = \nabla_\theta
   \ell(\theta; x_i, y_i)` is computed separately (:func:`per_example_gradients`) and scaled to
   L2 norm at most :math:`C` (``max_grad_norm``), the norm taken over *all* parameters at once:

   .. math::
       :label: dpsgd-clip

       \bar g_i = g_i \cdot \min\Bigl(1, \frac{C}{\lVert g_i \rVert_2 + 10^{-6}}\Bigr)

   (the factor Opacus uses; the :math:`10^{-6}` guards against division by zero and keeps
   :math:`\lVert \bar g_i \rVert_2 < C`).
3. **Gaussian noise.** The clipped gradients are summed and Gaussian noise with standard deviation
   :math:`\sigma C` is added to every coordinate (``noise_multiplier`` is :math:`\sigma`):

   .. math::
       :label: dpsgd-noise

       \tilde g = \frac{1}{qN}\Bigl(\sum_{i \in B} \bar g_i + \mathcal N(0, \sigma^2 C^2 I)\Bigr),
       \qquad \theta \leftarrow \theta - \eta\, \tilde g .

Why these choices:

- *Sensitivity.* Under add/remove neighbouring (one data set has one more example), the clipped
  sum :math:`\sum_{i \in B} \bar g_i` changes by exactly one term, whose norm is at most
  :math:`C`: its L2 sensitivity is :math:`C`, whatever the model and the data. Noise of standard
  deviation :math:`\sigma C` therefore makes each step a Gaussian mechanism with noise
  multiplier :math:`\sigma` (noise std divided by sensitivity).
- *Normalisation by the expected batch size.* The sum is divided by :math:`qN`, a public
  constant, not by the realised :math:`|B|`: the realised size depends on whether a given
  person's example was drawn, so dividing by it would change the sensitivity analysis. (An
  empty batch is no special case: the step still adds the noise and divides by :math:`qN`.)
- *Poisson sampling is what the accountant assumes.* The privacy amplification by subsampling
  that :class:`companion.accounting.RDPAccountant` computes (Mironov, Talwar and Zhang 2019,
  "Rényi Differential Privacy of the Sampled Gaussian Mechanism") is for the Poisson-subsampled
  Gaussian mechanism. Shuffling the data into fixed-size batches, as a
  :class:`torch.utils.data.DataLoader` does, is a different mechanism, and using the Poisson
  accountant for it can understate epsilon considerably (Chua et al. 2024, "How Private are
  DP-SGD Implementations?"). :func:`train_dpsgd` samples as the accountant assumes.

What is protected is the sequence of noisy gradients, hence the model weights (by
post-processing). Quantities computed from the raw data outside the mechanism, such as the
training accuracy that :func:`train_dpsgd` records for the reader, are not covered.

The clipped sum is computed by :mod:`companion.per_example` (per-layer rules with hooks on any
module tree, ``vmap`` for layers without a rule). The step's phases are public, so the code the
book prints is the code that runs: :func:`poisson_sample`, :func:`add_gaussian_noise`,
:func:`noisy_clipped_gradient` (the heart of a step), :func:`set_private_gradients` (its result
written into ``.grad``:
write your own loop with any :class:`torch.optim.Optimizer`), :func:`dp_sgd_step` and the loop
:func:`train_dpsgd`.

See the DP-SGD chapter, :ref:`sec-dpsgd-algorithm`, for the derivation and runs.

.. warning::

    This is a teaching implementation. Its noise comes from torch's pseudo-random generator,
    which is not a cryptographically secure source, and it is floating-point Gaussian noise,
    whose low-order bits can leak information (Mironov 2012, "On Significance of the Least
    Significant Bits for Differential Privacy"). For real deployments use Opacus
    (https://opacus.ai), which has a secure random mode, validates models more thoroughly and is
    maintained for production; the keyword names here follow Opacus.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from companion._random import torch_generator
from companion._torch import (
    ArrayLike,
    LossFn,
    LossName,
    check_data,
    check_loss_or_callable,
    check_optional_test,
    check_outputs,
    epoch_record,
    model_device,
    progress_loop,
    trainable_named,
    warn_if_delta_large,
)
from companion._validation import (
    check_delta,
    check_epsilon,
    check_fraction,
    check_nonnegative,
    check_positive,
    check_positive_int,
)
from companion.accounting import RDPAccountant, steps_for_epochs
from companion.per_example import (
    ClippedSum,
    Method,
    PerExampleClipper,
    check_dp_compatible,
    clip_and_sum,
    clip_factors,
    clipped_gradient_sum,
    per_example_gradients,
)

__all__ = [
    "ClippedSum",
    "add_gaussian_noise",
    "check_dp_compatible",
    "clip_and_sum",
    "clip_factors",
    "clipped_gradient_sum",
    "dp_sgd_step",
    "noisy_clipped_gradient",
    "per_example_gradients",
    "poisson_sample",
    "set_private_gradients",
    "train_dpsgd",
]

LossLike = LossName | LossFn


def _check_generator(generator: object) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator (e.g. torch.Generator().manual_seed(0)), got "
            f"{type(generator).__name__}."
        )
    return generator


def _check_batch(x: object, y: object) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError("x and y must be torch tensors (see companion.training.to_tensors).")
    if x.ndim == 0 or y.ndim == 0 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"x and y must hold the same number of examples along their first dimension, got "
            f"shapes {tuple(x.shape)} and {tuple(y.shape)}."
        )


# --- sampling and noise -------------------------------------------------------------------------


def poisson_sample(n: int, *, sample_rate: float, generator: torch.Generator) -> torch.Tensor:
    r"""A Poisson-sampled batch: each of ``n`` examples is included independently with prob. q.

    Returns a boolean mask of shape ``(n,)``; select the batch from in-memory tensors with
    ``x[mask]``, ``y[mask]``. The batch size is :math:`\mathrm{Binomial}(n, q)`: random, with
    mean :math:`qn`, and possibly 0 (an empty batch is a valid DP-SGD step: it releases only
    noise). Masking tensors in memory is much cheaper than a ``DataLoader`` for small models.

    Args:
        n: number of examples, >= 1.
        sample_rate: inclusion probability :math:`q`, in (0, 1]; ``q = 1`` takes everyone.
        generator: a :class:`torch.Generator`; the draw is reproducible from its seed.

    Returns:
        A boolean tensor of shape ``(n,)`` on the generator's device.

    Raises:
        TypeError: if ``generator`` is not a :class:`torch.Generator` or ``n`` not an integer.
        ValueError: if ``n < 1`` or ``sample_rate`` is outside (0, 1].

    Example:
        >>> mask = poisson_sample(10, sample_rate=1.0, generator=torch.Generator().manual_seed(0))
        >>> int(mask.sum())
        10
    """
    n = check_positive_int("n", n)
    sample_rate = check_fraction("sample_rate", sample_rate)
    generator = _check_generator(generator)
    return _poisson_mask(n, sample_rate, generator)


def _poisson_mask(n: int, sample_rate: float, generator: torch.Generator) -> torch.Tensor:
    # torch.rand is uniform on [0, 1), so q = 1 includes every example.
    return torch.rand(n, generator=generator, device=generator.device) < sample_rate


def add_gaussian_noise(sums: dict[str, torch.Tensor], *, std: float, generator: torch.Generator) -> None:
    r"""Add :math:`\mathcal N(0, \text{std}^2)` to every coordinate of ``sums``, in place.

    The noise for all entries is one draw of a standard normal vector from ``generator``, in the
    order of the dict, so a run is reproducible from the generator's seed (which must then stay
    secret: whoever knows it can subtract the noise). DP-SGD noises the clipped gradient sum this
    way and DP-FedAvg (:func:`companion.federated.dp_fedavg`) the sum of clipped client updates.

    Args:
        sums: dict name -> tensor, changed in place; all on one device, one floating dtype.
        std: the noise standard deviation, >= 0 (for DP-SGD :math:`\sigma C`).
        generator: the :class:`torch.Generator` the noise is drawn from.

    Raises:
        TypeError: if ``generator`` is not a :class:`torch.Generator` or ``sums`` not a dict of
            tensors.
        ValueError: if ``std`` is negative or not finite.

    Example:
        >>> sums = {"w": torch.zeros(2, 2), "b": torch.zeros(2)}
        >>> add_gaussian_noise(sums, std=1.0, generator=torch.Generator().manual_seed(0))
        >>> sums["w"].shape, bool(sums["b"].abs().sum() > 0)
        (torch.Size([2, 2]), True)
    """
    std = check_nonnegative("std", std)
    generator = _check_generator(generator)
    if not isinstance(sums, dict) or not all(isinstance(v, torch.Tensor) for v in sums.values()):
        raise TypeError("sums must be a dict of name -> torch.Tensor.")
    if std == 0 or not sums:
        return
    first = next(iter(sums.values()))
    if std >= torch.finfo(first.dtype).max / 100:
        raise ValueError(
            f"std={std:g} is too large for {first.dtype} noise; lower the noise multiplier or "
            "the clipping norm."
        )
    total = sum(t.numel() for t in sums.values())
    noise = torch.randn(total, generator=generator, device=generator.device, dtype=first.dtype)
    noise = noise.to(first.device)
    start = 0
    for value in sums.values():
        size = value.numel()
        value.add_(noise[start : start + size].view_as(value), alpha=std)
        start += size


# --- the step -----------------------------------------------------------------------------------


def set_private_gradients(
    model: nn.Module,
    x_batch: torch.Tensor,
    y_batch: torch.Tensor,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: float,
    generator: torch.Generator,
    loss: LossLike = "cross_entropy",
    method: Method = "auto",
) -> torch.Tensor:
    r"""Write DP-SGD's noisy gradient :math:`\tilde g` into ``.grad`` of every trainable parameter.

    :math:`\tilde g = \bigl(\sum_{i \in B} \bar g_i + \mathcal N(0, \sigma^2 C^2 I)\bigr) / (qN)`,
    eq. :eq:`dpsgd-noise`: the clipped per-example gradient sum
    (:func:`companion.per_example.clipped_gradient_sum`), Gaussian noise
    (:func:`add_gaussian_noise`), divided by ``expected_batch_size`` (:math:`qN`, fixed before
    seeing the data, never the realised batch size). Then call any optimizer's ``step()``: your
    own loop, with the batch drawn by :func:`poisson_sample`, is DP-SGD. Account for each call
    with ``accountant.step(noise_multiplier=..., sample_rate=...)``.

    Args:
        model: the model; must pass :func:`check_dp_compatible`. Its parameters are not changed.
        x_batch, y_batch: the batch (tensors on the model's device; the batch may be empty).
        noise_multiplier: :math:`\sigma`, >= 0 (0 gives no privacy; for tests).
        max_grad_norm: the clipping norm :math:`C`, > 0.
        expected_batch_size: :math:`qN`, > 0.
        generator: the :class:`torch.Generator` the noise is drawn from (its seed is a secret).
        loss: ``"cross_entropy"``, ``"bce"`` or a callable returning the mean loss over examples.
        method: ``"auto"``, ``"vmap"`` or ``"layerwise"`` (see
            :func:`companion.per_example.clipped_gradient_sum`).

    Returns:
        The per-example gradient norms before clipping, shape ``(B,)``.

    Raises:
        TypeError: if an argument is of the wrong kind.
        ValueError: if an argument is out of range or the model mixes examples.

    Example:
        >>> from companion import models
        >>> model = models.logistic_regression()
        >>> optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        >>> norms = set_private_gradients(model, torch.zeros(4, 64), torch.tensor([0, 1, 2, 3]),
        ...     noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4.0,
        ...     generator=torch.Generator().manual_seed(0))
        >>> optimizer.step()
        >>> model[0].weight.grad.shape, norms.shape
        (torch.Size([10, 64]), torch.Size([4]))
    """
    check_dp_compatible(model)
    clipper = PerExampleClipper(model, loss=loss, method=method)
    _check_batch(x_batch, y_batch)
    noise_multiplier = check_nonnegative("noise_multiplier", noise_multiplier)
    max_grad_norm = check_positive("max_grad_norm", max_grad_norm)
    expected_batch_size = check_positive("expected_batch_size", expected_batch_size)
    generator = _check_generator(generator)
    sums, norms = noisy_clipped_gradient(
        clipper, x_batch, y_batch, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size, generator=generator,
    )  # fmt: skip
    for name, p in trainable_named(model):
        p.grad = sums[name]
    return norms


def noisy_clipped_gradient(
    clipper: PerExampleClipper,
    x_batch: torch.Tensor,
    y_batch: torch.Tensor,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: float,
    generator: torch.Generator,
) -> ClippedSum:
    r"""The heart of a DP-SGD step: :math:`\tilde g` of eq. :eq:`dpsgd-noise` and the norms.

    Clip and sum (``clipper``, a :class:`companion.per_example.PerExampleClipper` planned once
    for the model and loss), add :math:`\mathcal N(0, \sigma^2 C^2)` to every coordinate
    (:func:`add_gaussian_noise`), divide by the expected batch size :math:`qN`. The training
    loop calls this once per step; :func:`set_private_gradients` and :func:`dp_sgd_step` wrap it
    with argument checks.

    Args:
        clipper: the planned clipper of the model and loss.
        x_batch, y_batch: the batch (tensors; the batch may be empty).
        noise_multiplier: :math:`\sigma`, >= 0.
        max_grad_norm: the clipping norm :math:`C`, > 0.
        expected_batch_size: :math:`qN`, > 0.
        generator: the :class:`torch.Generator` the noise is drawn from (its seed is a secret).

    Returns:
        ``ClippedSum(sums, norms)``: the noisy mean gradient per parameter name, and the
        per-example norms before clipping.

    Raises:
        TypeError: if ``generator`` is not a :class:`torch.Generator`.
        ValueError: if a number is out of range.

    Example:
        >>> from companion import models
        >>> clipper = PerExampleClipper(models.logistic_regression(), loss="cross_entropy")
        >>> noisy, norms = noisy_clipped_gradient(clipper, torch.zeros(2, 64),
        ...     torch.tensor([0, 1]), noise_multiplier=0.0, max_grad_norm=0.5,
        ...     expected_batch_size=2.0, generator=torch.Generator().manual_seed(0))
        >>> round(float(torch.linalg.vector_norm(noisy["0.bias"])), 4)  # a mean of two, norm <= 0.5
        0.3345
    """
    sums, norms = clipper(x_batch, y_batch, max_grad_norm=max_grad_norm)
    with torch.no_grad():
        add_gaussian_noise(sums, std=noise_multiplier * max_grad_norm, generator=generator)
        for value in sums.values():
            value.div_(expected_batch_size)
    return ClippedSum(sums, norms)


def dp_sgd_step(
    model: nn.Module,
    x_batch: torch.Tensor,
    y_batch: torch.Tensor,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: float,
    lr: float,
    generator: torch.Generator,
    loss: LossLike = "cross_entropy",
    method: Method = "auto",
) -> torch.Tensor:
    r"""One DP-SGD step with plain SGD on a (Poisson-sampled) batch; updates ``model`` in place.

    :math:`\theta \leftarrow \theta - \eta \tilde g` with :math:`\tilde g` as in
    :func:`set_private_gradients`, eq. :eq:`dpsgd-noise`. An empty batch is allowed: the step
    then moves the parameters by noise alone. The noise for all trainable parameters is one draw
    of a standard normal vector from ``generator`` (in the order of
    ``model.named_parameters()``), scaled by :math:`\sigma C`; with :math:`\sigma = 0` nothing
    is drawn.

    Args:
        model: the model to update; must pass :func:`check_dp_compatible`.
        x_batch, y_batch: the batch (tensors; the batch may be empty).
        noise_multiplier: :math:`\sigma`, >= 0 (0 gives no privacy; for tests).
        max_grad_norm: the clipping norm :math:`C`, > 0.
        expected_batch_size: :math:`qN`, > 0.
        lr: learning rate :math:`\eta`, > 0.
        generator: the :class:`torch.Generator` the noise is drawn from (its seed is a secret).
        loss: ``"cross_entropy"``, ``"bce"`` or a callable returning the mean loss over examples.
        method: ``"auto"``, ``"vmap"`` or ``"layerwise"``.

    Returns:
        The per-example gradient norms before clipping, shape ``(B,)``.

    Raises:
        TypeError: if an argument is of the wrong kind.
        ValueError: if an argument is out of range or the model mixes examples.

    Example:
        >>> from companion import models
        >>> model = models.logistic_regression()
        >>> norms = dp_sgd_step(model, torch.ones(3, 64), torch.tensor([0, 1, 2]),
        ...     noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=3.0, lr=0.1,
        ...     generator=torch.Generator().manual_seed(0))
        >>> [round(float(n), 2) for n in norms]  # each clipped to 1 before the update
        [8.26, 8.05, 8.13]
    """
    check_dp_compatible(model)
    clipper = PerExampleClipper(model, loss=loss, method=method)
    _check_batch(x_batch, y_batch)
    noise_multiplier = check_nonnegative("noise_multiplier", noise_multiplier)
    max_grad_norm = check_positive("max_grad_norm", max_grad_norm)
    expected_batch_size = check_positive("expected_batch_size", expected_batch_size)
    lr = check_positive("lr", lr)
    generator = _check_generator(generator)
    sums, norms = noisy_clipped_gradient(
        clipper, x_batch, y_batch, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size, generator=generator,
    )  # fmt: skip
    with torch.no_grad():
        for name, p in trainable_named(model):
            p.add_(sums[name], alpha=-lr)
    return norms


# --- the training loop --------------------------------------------------------------------------


class _Data:
    """Training data as in-memory tensors or a :class:`torch.utils.data.Dataset`, batch by mask."""

    def __init__(self, x: object, y: object, loss: str | LossFn, device: torch.device) -> None:
        self.device = device
        if isinstance(x, Dataset):
            if y is not None:
                raise ValueError("give y only with tensor or array inputs, not with a Dataset.")
            self.dataset: Dataset | None = x
            self.n = len(x)  # type: ignore[arg-type]
            if self.n == 0:
                raise ValueError("the Dataset must hold at least one example.")
            self.x, self.y = None, None
        else:
            if y is None:
                raise ValueError("y is required unless x is a torch.utils.data.Dataset.")
            self.dataset = None
            x, y = check_data(x, y, loss=loss)
            self.x, self.y = x.to(device), y.to(device)
            self.n = x.shape[0]

    def check(self, model: nn.Module, loss: str | LossFn) -> None:
        """The model's output fits the loss and the labels (tensor data; a Dataset is not read)."""
        if self.dataset is None:
            check_outputs(model, self.x, self.y, loss=loss)

    def batch(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.dataset is None:
            mask = mask.to(self.device)
            return self.x[mask], self.y[mask]
        index = torch.nonzero(mask).squeeze(1).tolist()
        if not index:
            xb, yb = default_collate([self.dataset[0]])
            return xb[:0].to(self.device), yb[:0].to(self.device)
        xb, yb = default_collate([self.dataset[i] for i in index])
        return xb.to(self.device), yb.to(self.device)

    def record(self, model: nn.Module, epoch: int, test_data: Any, loss: str | LossFn) -> dict[str, Any]:
        if self.dataset is None:
            return epoch_record(model, epoch, (self.x, self.y), test_data, loss)
        loader = DataLoader(self.dataset, batch_size=1024)
        return epoch_record(model, epoch, loader, test_data, loss)


def _check_optimizer(optimizer: object, model: nn.Module, lr: object) -> torch.optim.Optimizer | None:
    if optimizer is None:
        if lr is None:
            raise ValueError("give lr (plain SGD) or an optimizer built on the model's parameters.")
        return None
    if lr is not None:
        raise ValueError("give lr to the optimizer, not to train_dpsgd, when you pass an optimizer.")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}.")
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [name for name, p in trainable_named(model) if id(p) not in held]
    if missing:
        raise ValueError(
            f"optimizer does not hold the model's trainable parameters {missing}; build it with "
            "torch.optim.SGD(model.parameters(), lr=...) (or another optimizer) on this model."
        )
    return optimizer


def _check_accountant(accountant: object) -> Any:
    if accountant is None:
        return RDPAccountant()
    if not all(callable(getattr(accountant, m, None)) for m in ("step", "get_epsilon")):
        raise TypeError(
            "accountant must have step(noise_multiplier=, sample_rate=) and get_epsilon(delta), "
            f"such as companion.accounting.RDPAccountant(); got {type(accountant).__name__}."
        )
    return accountant


def _calibrate(
    accountant: Any, *, target_epsilon: float, delta: float, sample_rate: float, steps: int
) -> float:
    """The noise multiplier that brings ``accountant``, continued by ``steps`` steps, to at most
    ``target_epsilon`` and within 1% of it: bisection keeping the upper end, which never exceeds
    the target (the search of :func:`companion.accounting.get_noise_multiplier`)."""

    def epsilon(sigma: float) -> float:
        trial = copy.deepcopy(accountant)
        for _ in range(steps):
            trial.step(noise_multiplier=sigma, sample_rate=sample_rate)
        return trial.get_epsilon(delta)

    spent = accountant.get_epsilon(delta)
    if spent >= target_epsilon:
        raise ValueError(
            f"the accountant has already spent epsilon={spent:.4g} at delta={delta}, which is not "
            f"below target_epsilon={target_epsilon}; raise the target or start a new accountant."
        )
    low, high, eps_high = 0.0, 0.5, math.inf
    while eps_high > target_epsilon:
        high *= 2
        if high > 1e6:
            raise ValueError(
                f"target_epsilon={target_epsilon} cannot be reached with {steps} steps at "
                f"sample_rate={sample_rate}: it needs a noise_multiplier above 1e6."
            )
        eps_high = epsilon(high)
    while target_epsilon - eps_high > 0.01 * target_epsilon and high - low > 1e-9 * high:
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
    accountant: Any = None,
    expected_batch_size: float | None = None,
    x_test: ArrayLike | None = None,
    y_test: ArrayLike | None = None,
    seed: int | None = None,
    loss: LossLike = "cross_entropy",
    method: Method = "auto",
    progress: bool = False,
) -> list[dict[str, Any]]:
    r"""Train ``model`` in place with DP-SGD and account for the privacy spent.

    The run takes :math:`T` = :func:`companion.accounting.steps_for_epochs` steps (``epochs``
    times :math:`\mathrm{round}(1/q)`, the rule :func:`companion.accounting.get_noise_multiplier`
    uses for ``epochs=``). Each step draws a Poisson batch (:func:`poisson_sample`), writes the
    noisy clipped gradient into ``.grad`` (:func:`set_private_gradients`) and lets the optimizer
    step (plain SGD with ``lr`` when no optimizer is given); the accountant records one step of
    the Poisson-subsampled Gaussian mechanism. After each epoch it converts the privacy spent so
    far into epsilon at ``delta``.

    *Noise.* Give ``noise_multiplier`` :math:`\sigma`, or ``target_epsilon``: then :math:`\sigma`
    is the smallest (to 1%) that keeps the accountant's total epsilon after exactly these
    :math:`T` steps at or below the target, so the target is never exceeded.

    *Accounting across calls.* Pass the ``accountant`` of an earlier run (or one you built) to
    continue it: this run's steps are added to it in place and the reported epsilon is the total.
    Default: a new :class:`companion.accounting.RDPAccountant`.

    *What is public.* The normaliser :math:`qN` (``expected_batch_size``) must not depend on
    the private data. By default it is ``sample_rate * len(x)``, which treats the data-set size
    as public (as Opacus does); pass a value fixed in advance to avoid that assumption. Choose
    ``delta`` well below :math:`1/N` (a ``UserWarning`` says otherwise). Only the model is
    protected: the training-set statistics in the records are computed from the raw data, for
    the reader's monitoring only.

    *Randomness.* One :class:`torch.Generator` draws the batches and the noise; ``seed=None``
    (the default) seeds it from fresh OS entropy, so two runs never share noise. A seed makes a
    run reproducible and must then stay secret.

    Args:
        model: the model to train; must pass :func:`check_dp_compatible`. Everything runs on the
            device of its parameters.
        x: training inputs, shape ``(N, ...)`` (tensor or numpy array), or a
            :class:`torch.utils.data.Dataset` of ``(input, target)`` pairs (then no ``y``).
        y: training targets, shape ``(N, ...)``.
        max_grad_norm: the clipping norm :math:`C`, > 0.
        sample_rate: :math:`q`, in (0, 1].
        epochs: number of epochs, >= 1.
        delta: the delta at which epsilon is reported and targeted, in (0, 1).
        noise_multiplier: :math:`\sigma`, >= 0 (0 means no privacy: epsilon is infinite).
        target_epsilon: > 0, instead of ``noise_multiplier``.
        lr: learning rate of plain SGD, > 0 (without ``optimizer``).
        optimizer: any :class:`torch.optim.Optimizer` built on the model's parameters.
        accountant: an accountant to continue (``step`` and ``get_epsilon``), such as
            :class:`companion.accounting.RDPAccountant`.
        expected_batch_size: :math:`qN`, > 0; default ``sample_rate * N`` (see above).
        x_test, y_test: optional held-out data, evaluated after every epoch.
        seed: seed of the sampling and noise generator, or None for fresh entropy.
        loss: ``"cross_entropy"``, ``"bce"``, or a callable ``(outputs, targets)`` returning the
            mean loss over examples (``torch.nn.MSELoss()`` for regression).
        method: ``"auto"``, ``"vmap"`` or ``"layerwise"`` (see
            :func:`companion.per_example.clipped_gradient_sum`).
        progress: show a tqdm progress bar over the epochs.

    Returns:
        One dict per epoch, with keys ``"epoch"``, ``"steps"`` (this run's DP steps so far),
        ``"epsilon"`` (the accountant's total, at ``delta``), ``"delta"``,
        ``"noise_multiplier"``, ``"clipped_fraction"`` (the share of the epoch's per-example
        gradients whose norm exceeded :math:`C`), ``"train_loss"`` (and ``"train_accuracy"``
        for a named loss) on the whole training set, and the same for test data if given.

    Raises:
        TypeError: if an argument is of the wrong kind.
        ValueError: if an argument is out of range, the model mixes examples, or the target
            cannot be reached.

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
    loss = check_loss_or_callable(loss)
    device = model_device(model)
    data = _Data(x, y, loss, device)
    data.check(model, loss)
    test_data = check_optional_test(x_test, y_test, loss=loss)
    if test_data is not None:
        test_data = (test_data[0].to(device), test_data[1].to(device))
        check_outputs(model, *test_data, loss=loss)
    max_grad_norm = check_positive("max_grad_norm", max_grad_norm)
    sample_rate = check_fraction("sample_rate", sample_rate)
    epochs = check_positive_int("epochs", epochs)
    delta = check_delta(delta)
    if (noise_multiplier is None) == (target_epsilon is None):
        raise ValueError("give exactly one of noise_multiplier and target_epsilon.")
    if lr is not None:
        lr = check_positive("lr", lr)
    optimizer = _check_optimizer(optimizer, model, lr)
    accountant = _check_accountant(accountant)
    if expected_batch_size is None:
        expected_batch_size = sample_rate * data.n
    expected_batch_size = check_positive("expected_batch_size", expected_batch_size)
    generator = torch_generator(seed)
    clipper = PerExampleClipper(model, loss=loss, method=method)
    warn_if_delta_large(delta, data.n)
    steps_per_epoch = steps_for_epochs(epochs=1, sample_rate=sample_rate)
    if target_epsilon is not None:
        target_epsilon = check_epsilon(target_epsilon, "target_epsilon")
        noise_multiplier = _calibrate(
            accountant, target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate,
            steps=epochs * steps_per_epoch,
        )  # fmt: skip
    noise_multiplier = check_nonnegative("noise_multiplier", noise_multiplier)
    params = trainable_named(model)

    history: list[dict[str, Any]] = []
    model.train()
    for epoch in progress_loop(epochs, history=history, desc="DP-SGD", unit="epoch", progress=progress):
        clipped, seen = 0, 0
        for _ in range(steps_per_epoch):
            xb, yb = data.batch(_poisson_mask(data.n, sample_rate, generator))
            sums, norms = noisy_clipped_gradient(
                clipper, xb, yb, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                expected_batch_size=expected_batch_size, generator=generator,
            )  # fmt: skip
            if optimizer is None:
                with torch.no_grad():
                    for name, p in params:
                        p.add_(sums[name], alpha=-lr)
            else:
                for name, p in params:
                    p.grad = sums[name]
                optimizer.step()
            accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
            clipped += int((norms > max_grad_norm).sum())
            seen += norms.shape[0]
        record: dict[str, Any] = {"epoch": epoch, "steps": epoch * steps_per_epoch}
        record["epsilon"] = accountant.get_epsilon(delta)
        record["delta"] = delta
        record["noise_multiplier"] = noise_multiplier
        record["clipped_fraction"] = clipped / seen if seen else 0.0
        record.update(data.record(model, epoch, test_data, loss))
        history.append(record)
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    return history
