"""The DP-SGD step: Poisson sampling, Gaussian noise, the noisy clipped gradient, the update.

Part of :mod:`companion.dpsgd`; import from there.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from companion._random import check_generator, warn_if_unseeded
from companion._torch import LossFn, LossName, trainable_named
from companion._validation import (
    check_fraction,
    check_nonnegative,
    check_positive,
    check_positive_int,
)
from companion.per_example import ClippedSum, PerExampleClipper
from companion.per_example.gradients import Method, check_batch

__all__ = [
    "add_gaussian_noise",
    "dp_sgd_step",
    "gaussian_noise",
    "noisy_clipped_gradient",
    "poisson_sample",
    "set_private_gradients",
]

LossLike = LossName | LossFn


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
            Float64 uniforms are compared with :math:`q`, so an example joins with probability
            :math:`q` up to :math:`2^{-53}` (float32's grid of :math:`2^{-24}` would add up to
            :math:`6 \cdot 10^{-8}`, and double a :math:`q` below :math:`2^{-24}`).
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
    generator = check_generator(generator)
    # Uniform on [0, 1), so q = 1 includes every example. In float64: float32 draws lie on a grid
    # of 2**-24 and would include an example with probability ceil(q 2**24) / 2**24, above the
    # q the accountant uses (by 0.1% for q = 256 / 10**7, twice q for q = 2**-25).
    warn_if_unseeded(generator)
    u = torch.rand(n, generator=generator, device=generator.device, dtype=torch.float64)
    return u < sample_rate


def _normal_draw(
    total: int, *, std: float, generator: torch.Generator, dtype: torch.dtype
) -> torch.Tensor:
    """``total`` independent draws of N(0, std^2) from ``generator``, on its device.

    One thread draws them all. Drawing chunks in parallel threads halved the time of a draw on its
    own, but made a training step slower on CPU: after each parallel torch operation the OpenMP
    threads spin, waiting for the next, on the cores the helper threads need.
    """
    warn_if_unseeded(generator)
    return torch.empty(total, dtype=dtype, device=generator.device).normal_(
        0.0, std, generator=generator
    )


def _check_noise(sums: object, std: object, generator: object) -> tuple[float, torch.Generator]:
    std = check_nonnegative("std", std)
    generator = check_generator(generator)
    if not isinstance(sums, dict) or not all(isinstance(v, torch.Tensor) for v in sums.values()):
        raise TypeError("sums must be a dict of name -> torch.Tensor.")
    dtypes = {v.dtype for v in sums.values()}
    if not all(dtype.is_floating_point for dtype in dtypes):
        raise TypeError(
            "the tensors must be floating point (the noise takes their dtype), got "
            f"{sorted(map(str, dtypes))}."
        )
    for dtype in dtypes:
        if std >= torch.finfo(dtype).max / 100:
            raise ValueError(
                f"std={std:g} is too large for {dtype} noise; lower the noise multiplier or the "
                "clipping norm."
            )
    return std, generator


def _check_step(
    clipper: object,
    noise_multiplier: object,
    max_grad_norm: object,
    expected_batch_size: object,
    generator: object,
) -> tuple[float, torch.Generator]:
    r"""The checked noise std :math:`\sigma C` and generator of :func:`noisy_clipped_gradient`.
    (The batch is not checked there: that takes a forward pass; the wrappers do it.)"""
    if not isinstance(clipper, PerExampleClipper):
        raise TypeError(
            "clipper must be a companion.per_example.PerExampleClipper built for the model and "
            f"loss, got {type(clipper).__name__}."
        )
    sigma = check_nonnegative("noise_multiplier", noise_multiplier)
    c = check_positive("max_grad_norm", max_grad_norm)
    check_positive("expected_batch_size", expected_batch_size)
    return _check_noise(clipper.trainable, sigma * c, generator)


def gaussian_noise(
    like: dict[str, torch.Tensor], *, std: float, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    r"""Fresh :math:`\mathcal N(0, \text{std}^2)` tensors of the shapes of those in ``like``.

    One draw of a normal vector from ``generator``, cut in the order of the dict, so a run is
    reproducible from the generator's seed, which must then stay secret. The noise has the
    device and dtype of the tensors of ``like``, whose values are not read; it is drawn in the
    widest of their dtypes, so float64 tensors get float64 noise next to float32 ones.

    Args:
        like: dict name -> floating-point tensor.
        std: the noise standard deviation, >= 0 (0 gives zeros and draws nothing).
        generator: the :class:`torch.Generator` the noise is drawn from.

    Returns:
        A dict with the keys of ``like``: name -> noise tensor.

    Raises:
        TypeError: if ``generator`` is not a :class:`torch.Generator` or ``like`` not a dict of
            tensors.
        ValueError: if ``std`` is negative, not finite or too large for the dtype.

    Example:
        >>> noise = gaussian_noise({"w": torch.zeros(200, 1000)}, std=2.0,
        ...                        generator=torch.Generator().manual_seed(0))
        >>> noise["w"].shape, round(float(noise["w"].std()), 2)
        (torch.Size([200, 1000]), 2.0)
    """
    std, generator = _check_noise(like, std, generator)
    if std == 0 or not like:
        return {name: torch.zeros_like(t) for name, t in like.items()}
    first = next(iter(like.values()))
    total = sum(t.numel() for t in like.values())
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in like.values()))  # the widest
    flat = _normal_draw(total, std=std, generator=generator, dtype=dtype)
    flat = flat.to(first.device)
    noise, start = {}, 0
    for name, t in like.items():
        noise[name] = flat[start : start + t.numel()].view(t.shape).to(t.device, t.dtype)
        start += t.numel()
    return noise


def add_gaussian_noise(
    sums: dict[str, torch.Tensor], *, std: float, generator: torch.Generator
) -> None:
    r"""Add :math:`\mathcal N(0, \text{std}^2)` to every coordinate of ``sums``, in place.

    The noise for all entries is one draw of a standard normal vector from ``generator``, in the
    order of the dict, drawn as in :func:`gaussian_noise`, so a run is reproducible from the
    generator's seed (which must then stay secret: whoever knows it can subtract the noise).
    DP-FedAvg (:func:`companion.federated.dp_fedavg`) noises the sum of clipped client updates
    this way.

    Args:
        sums: dict name -> floating-point tensor, changed in place.
        std: the noise standard deviation, >= 0 (for DP-SGD :math:`\sigma C`).
        generator: the :class:`torch.Generator` the noise is drawn from.

    Raises:
        TypeError: if ``generator`` is not a :class:`torch.Generator` or ``sums`` not a dict of
            tensors.
        ValueError: if ``std`` is negative, not finite or too large for the dtype.

    Example:
        >>> sums = {"w": torch.zeros(2, 2), "b": torch.zeros(2)}
        >>> add_gaussian_noise(sums, std=1.0, generator=torch.Generator().manual_seed(0))
        >>> sums["w"].shape, bool(sums["b"].abs().sum() > 0)
        (torch.Size([2, 2]), True)
    """
    std, generator = _check_noise(sums, std, generator)
    if torch.is_grad_enabled() and any(v.requires_grad for v in sums.values()):
        raise ValueError(
            "sums holds tensors that require gradients, which autograd does not let change in "
            "place: pass detached tensors, or call add_gaussian_noise under torch.no_grad()."
        )
    if std == 0:
        return
    noise = gaussian_noise(sums, std=1.0, generator=generator)  # std scales it in the addition
    for name, value in sums.items():
        value.add_(noise[name], alpha=std)


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
    eq. :eq:`dpsgd-noise`: the clipped per-example gradient sum, Gaussian noise (one draw of
    :func:`gaussian_noise`), divided by ``expected_batch_size`` (:math:`qN`, fixed before seeing
    the data, never the realised batch size). With batches from :func:`poisson_sample`, any
    optimizer's ``step()`` and an accountant told of each call, your own loop is DP-SGD (see the
    example). The gradient replaces ``.grad`` (``backward`` would add to it), and a frozen
    parameter's ``.grad`` is set to None (an optimizer holding it would apply a stale one). One
    call per optimizer step, on one Poisson batch (summed calls would add the noise each); no
    ``backward()`` between it and ``optimizer.step()``: a raw ``.grad`` would be applied without
    clipping or noise.

    Each call checks the batch and plans the model anew (a few small forward passes, most of a
    tiny model's time). Where that matters, build a
    :class:`~companion.per_example.PerExampleClipper` once and call :func:`noisy_clipped_gradient`
    at each step, as :func:`train_dpsgd` does.

    Args:
        model: the model; must pass :func:`~companion.per_example.check_dp_compatible`. Its
            parameters are not changed.
        x_batch, y_batch: the batch (tensors on the model's device; the batch may be empty).
        noise_multiplier: :math:`\sigma`, >= 0 (0 gives no privacy; for tests).
        max_grad_norm: the clipping norm :math:`C`, > 0.
        expected_batch_size: :math:`qN`, > 0.
        generator: the :class:`torch.Generator` the noise is drawn from (its seed is a secret).
        loss: ``"cross_entropy"``, ``"bce"`` or a callable returning the mean loss over examples.
        method: ``"auto"``, ``"vmap"`` or ``"layerwise"`` (see
            :func:`companion.per_example.clipped_gradient_sum`).

    Returns:
        The per-example gradient norms before clipping, shape ``(B,)``, read from the raw
        batch: not covered by the guarantee, like the training loss.

    Raises:
        TypeError: if an argument is of the wrong kind.
        ValueError: if an argument is out of range, the model has a layer that mixes examples
            (:func:`~companion.per_example.check_dp_compatible`), its forward pass is seen to mix
            the first examples or to write a parameter, or an example's gradient is not finite.
        RuntimeError: inside ``torch.inference_mode()``.

    Example:
        >>> from companion import accounting, models
        >>> x, y = torch.randn(200, 64), torch.randint(10, (200,))
        >>> model = models.logistic_regression()
        >>> optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        >>> generator, accountant = torch.Generator().manual_seed(0), accounting.RDPAccountant()
        >>> for step in range(20):  # a loop of one's own, with any optimizer
        ...     batch = poisson_sample(len(x), sample_rate=0.1, generator=generator)
        ...     norms = set_private_gradients(model, x[batch], y[batch], noise_multiplier=1.0,
        ...         max_grad_norm=1.0, expected_batch_size=20.0, generator=generator)
        ...     optimizer.step()  # no backward() in between: it would add a raw gradient
        ...     accountant.step(noise_multiplier=1.0, sample_rate=0.1)
        >>> len(accountant), round(accountant.get_epsilon(1e-5), 2)
        (20, 4.22)
    """
    sums, norms = _checked_noisy_gradient(
        model, x_batch, y_batch, noise_multiplier, max_grad_norm, expected_batch_size, generator,
        loss, method, release_grads=True,
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
    for the model and loss), add :math:`\mathcal N(0, \sigma^2 C^2)` to every coordinate (one
    draw of :func:`gaussian_noise`), divide by the expected batch size :math:`qN`. The training
    loop calls this once per step; :func:`set_private_gradients` and :func:`dp_sgd_step` wrap it
    with checks of the batch (which take a forward pass: this function checks only that the
    batch is two tensors, and the other arguments). A batch the model or the loss cannot take
    (labels of the wrong dtype or out of range) then fails with torch's own error; check the
    data once before the loop, as :func:`~companion.dpsgd.train_dpsgd` does.

    Args:
        clipper: the planned clipper of the model and loss.
        x_batch, y_batch: the batch (tensors; the batch may be empty).
        noise_multiplier: :math:`\sigma`, >= 0.
        max_grad_norm: the clipping norm :math:`C`, > 0.
        expected_batch_size: :math:`qN`, > 0.
        generator: the :class:`torch.Generator` the noise is drawn from (its seed is a secret).

    Returns:
        ``ClippedSum(sums, norms)``: the noisy mean gradient per parameter name, and the
        per-example norms before clipping (read from the raw batch: not covered by the guarantee).

    Raises:
        TypeError: if ``clipper`` is not a :class:`~companion.per_example.PerExampleClipper`,
            the batch not two tensors, or ``generator`` not a :class:`torch.Generator`.
        ValueError: if a number is out of range or an example's gradient is not finite.

    Example:
        >>> from companion import models
        >>> clipper = PerExampleClipper(models.logistic_regression(), loss="cross_entropy")
        >>> noisy, norms = noisy_clipped_gradient(clipper, torch.zeros(2, 64),
        ...     torch.tensor([0, 1]), noise_multiplier=0.0, max_grad_norm=0.5,
        ...     expected_batch_size=2.0, generator=torch.Generator().manual_seed(0))
        >>> round(float(torch.linalg.vector_norm(noisy["0.bias"])), 4)  # a mean of two, norm <= 0.5
        0.3345
    """
    std, generator = _check_step(
        clipper, noise_multiplier, max_grad_norm, expected_batch_size, generator
    )
    # The noise first, divided by m; then each clipped gradient, divided by m, is added into it.
    noisy = gaussian_noise(clipper.trainable, std=std / expected_batch_size, generator=generator)
    norms = clipper.add_clipped_sum(
        x_batch, y_batch, max_grad_norm=max_grad_norm, into=noisy, scale=1 / expected_batch_size
    )
    return ClippedSum(noisy, norms)


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
    from ``generator`` of a normal vector with standard deviation :math:`\sigma C / m`
    (:math:`m` the ``expected_batch_size``; in the order of ``model.named_parameters()``): the
    noise :math:`\sigma C` of the sum, already divided by :math:`m`. With :math:`\sigma = 0`
    nothing is drawn.

    Args:
        model: the model to update; must pass :func:`~companion.per_example.check_dp_compatible`.
        x_batch, y_batch: the batch (tensors; the batch may be empty).
        noise_multiplier: :math:`\sigma`, >= 0 (0 gives no privacy; for tests).
        max_grad_norm: the clipping norm :math:`C`, > 0.
        expected_batch_size: :math:`qN`, > 0.
        lr: learning rate :math:`\eta`, > 0.
        generator: the :class:`torch.Generator` the noise is drawn from (its seed is a secret).
        loss: ``"cross_entropy"``, ``"bce"`` or a callable returning the mean loss over examples.
        method: ``"auto"``, ``"vmap"`` or ``"layerwise"``.

    Returns:
        The per-example gradient norms before clipping, shape ``(B,)``, read from the raw
        batch: not covered by the guarantee, like the training loss.

    Raises:
        TypeError: if an argument is of the wrong kind.
        ValueError: if an argument is out of range, the model has a layer that mixes examples
            (:func:`~companion.per_example.check_dp_compatible`), its forward pass is seen to mix
            the first examples or to write a parameter, or an example's gradient is not finite.
        RuntimeError: inside ``torch.inference_mode()``.

    Example:
        >>> from companion import models
        >>> model = models.logistic_regression()
        >>> norms = dp_sgd_step(model, torch.ones(3, 64), torch.tensor([0, 1, 2]),
        ...     noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=3.0, lr=0.1,
        ...     generator=torch.Generator().manual_seed(0))
        >>> [round(float(n), 2) for n in norms]  # each clipped to 1 before the update
        [8.26, 8.05, 8.13]
    """
    lr = check_positive("lr", lr)
    sums, norms = _checked_noisy_gradient(
        model, x_batch, y_batch, noise_multiplier, max_grad_norm, expected_batch_size, generator,
        loss, method,
    )  # fmt: skip
    with torch.no_grad():
        for name, p in trainable_named(model):
            p.add_(sums[name], alpha=-lr)
    return norms


def _checked_noisy_gradient(
    model: nn.Module,
    x_batch: torch.Tensor,
    y_batch: torch.Tensor,
    noise_multiplier: object,
    max_grad_norm: object,
    expected_batch_size: object,
    generator: object,
    loss: LossLike,
    method: Method,
    release_grads: bool = False,
) -> ClippedSum:
    """Check a step's arguments (all before any computation), then its noisy gradient; with
    ``release_grads``, every parameter's ``.grad`` is set to None in between (the caller
    replaces the trainable ones': the old one is then not held while the new one is computed)."""
    clipper = PerExampleClipper(model, loss=loss, method=method)
    x_batch, y_batch = check_batch(model, loss, x_batch, y_batch, ("x_batch", "y_batch"))
    noise_multiplier = check_nonnegative("noise_multiplier", noise_multiplier)
    max_grad_norm = check_positive("max_grad_norm", max_grad_norm)
    expected_batch_size = check_positive("expected_batch_size", expected_batch_size)
    generator = check_generator(generator)
    if release_grads:  # a frozen parameter's too: an optimizer that holds it would apply it
        for p in model.parameters():
            p.grad = None
    return noisy_clipped_gradient(
        clipper, x_batch, y_batch, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size, generator=generator,
    )  # fmt: skip
