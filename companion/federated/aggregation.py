"""The server's aggregation rules: FedAvg's weighted mean and DP-FedAvg's clipped noisy sum.

Part of :mod:`companion.federated`; import from there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from companion._validation import check_nonnegative, check_positive, check_positive_int
from companion.dpsgd import add_gaussian_noise
from companion.federated.clients import Update
from companion.per_example import clip_factors

__all__ = ["dp_fedavg_aggregate", "fedavg_aggregate"]


# --- aggregation rules (the server's step) ------------------------------------------------------


def _check_updates(updates: object, *, allow_empty: bool) -> list[Update]:
    """A list of updates with one set of names and shapes, floating point and finite."""
    if isinstance(updates, (str, bytes, Mapping)) or not isinstance(updates, Sequence):
        raise TypeError(
            "updates must be a list of dicts name -> tensor (one per client, as returned by "
            f"local_update), got {type(updates).__name__}."
        )
    if not updates and not allow_empty:
        raise ValueError("updates must hold at least one client's update, got an empty list.")
    first: Update | None = None
    for k, update in enumerate(updates):
        if not isinstance(update, Mapping) or not update:
            raise TypeError(
                f"updates[{k}] must be a non-empty dict name -> tensor, got "
                f"{type(update).__name__}."
            )
        for name, value in update.items():
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                raise TypeError(f"updates[{k}][{name!r}] must be a floating-point tensor.")
            if not torch.isfinite(value).all():
                raise ValueError(
                    f"updates[{k}][{name!r}] holds NaN or inf: local training diverged; lower lr."
                )
        if first is None:
            first = update
        elif list(update) != list(first) or any(
            update[name].shape != first[name].shape for name in first
        ):
            raise ValueError(
                f"updates[{k}] must have the parameter names and shapes of updates[0]."
            )
    return list(updates)


def fedavg_aggregate(
    updates: Sequence[Update], num_examples: Sequence[int]
) -> dict[str, torch.Tensor]:
    r"""FedAvg's aggregation rule: the mean of the updates weighted by the clients' data sizes.

    .. math:: \bar\Delta = \sum_{k \in S} \frac{n_k}{\sum_{j \in S} n_j} \Delta_k

    (McMahan et al. 2017, Algorithm 1). Weighting by :math:`n_k` makes the average of the
    clients' mean gradients the mean gradient over all their examples; an unweighted mean would
    overweight small clients. A pure function: the inputs are not changed.

    Args:
        updates: one dict name -> tensor per client (see :func:`local_update`), all with the
            same names and shapes.
        num_examples: :math:`n_k`, the number of examples of each client, integers >= 1.

    Returns:
        A new dict name -> tensor, the weighted mean, in the order of ``updates[0]``.

    Raises:
        TypeError: if ``updates`` is not a list of dicts of floating-point tensors or a count
            is not an integer.
        ValueError: if ``updates`` is empty, its length differs from ``num_examples``, the names
            or shapes differ between clients, an update is not finite, or a count is < 1.

    Example:
        >>> import torch
        >>> updates = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 4.0])}]
        >>> fedavg_aggregate(updates, [3, 1])
        {'w': tensor([0.7500, 1.0000])}
    """
    updates = _check_updates(updates, allow_empty=False)
    if isinstance(num_examples, (str, bytes)) or not isinstance(num_examples, Sequence):
        raise TypeError(
            f"num_examples must be a list of integers, got {type(num_examples).__name__}."
        )
    if len(num_examples) != len(updates):
        raise ValueError(
            f"num_examples must hold one count per update: got {len(num_examples)} counts for "
            f"{len(updates)} updates."
        )
    counts = [check_positive_int(f"num_examples[{k}]", n) for k, n in enumerate(num_examples)]
    total = sum(counts)
    average: dict[str, torch.Tensor] = {}
    for update, count in zip(updates, counts, strict=True):
        weight = count / total
        for name, value in update.items():
            if name in average:
                average[name].add_(value, alpha=weight)
            else:
                average[name] = value * weight
    return average


def dp_fedavg_aggregate(
    updates: Sequence[Update],
    *,
    max_update_norm: float,
    noise_multiplier: float,
    expected_clients: float,
    generator: torch.Generator,
    parameter_shapes: Mapping[str, torch.Size] | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    r"""DP-FedAvg's aggregation rule: clip each update, sum, add Gaussian noise, divide by qK.

    McMahan, Ramage, Talwar and Zhang (2018), "Learning Differentially Private Recurrent
    Language Models", ICLR, with equal client weights and the fixed-denominator estimator:

    .. math::

        \tilde\Delta = \frac{1}{qK} \Bigl( \sum_{k \in S} \Delta_k
        \min\Bigl(1, \frac{S}{\lVert \Delta_k \rVert_2 + 10^{-6}}\Bigr)
        + \mathcal N(0, \sigma^2 S^2 I) \Bigr).

    The norm :math:`\lVert \Delta_k \rVert_2` is taken over all parameters of the update
    together, with the factor of :func:`companion.per_example.clip_factors`; the noise is
    :func:`companion.dpsgd.add_gaussian_noise` with std :math:`\sigma S`, one draw over all
    parameters in the order of ``parameter_shapes`` (or of ``updates[0]``). The norms, the sum
    and the noise are computed in float32 for 16-bit updates, and the result is rounded to
    their dtype once, after the noise (post-processing). The denominator
    ``expected_clients`` :math:`= qK` must be fixed before seeing the data, never the realised
    number of clients, which depends on the sample and would leak it. Then the noisy sum has L2
    sensitivity :math:`S` with respect to adding or removing one client, and one call is one
    step of the (Poisson-subsampled, if the clients were so sampled) Gaussian mechanism with
    noise multiplier :math:`\sigma`. With no client the result is pure noise
    :math:`\mathcal N(0, \sigma^2 S^2 I) / qK`: a round in which nobody was sampled must look
    like any other, so the names and shapes come from ``parameter_shapes``.

    Args:
        updates: one dict name -> tensor per sampled client (see :func:`local_update`), all
            with the same names and shapes; may be empty if ``parameter_shapes`` is given.
        max_update_norm: the clipping norm :math:`S`, > 0.
        noise_multiplier: :math:`\sigma`, >= 0 (0 adds no noise: no privacy).
        expected_clients: :math:`qK`, the expected number of sampled clients, > 0; public.
        generator: the :class:`torch.Generator` the noise is drawn from; seed it from fresh
            entropy (``g = torch.Generator(); g.seed()``). A seed used for noise is a secret:
            whoever knows it can regenerate the noise and subtract it.
        parameter_shapes: name -> shape of every parameter, in the order the noise is drawn;
            required when ``updates`` is empty, else checked against the updates.
        dtype: floating dtype of the result when ``updates`` is empty (default: torch's
            default dtype); with updates, theirs.
        device: device of the result when ``updates`` is empty (default: the CPU); with
            updates, theirs. Pass the model's, so that a round without clients can update it.

    Returns:
        A new dict name -> tensor, the noisy average update :math:`\tilde\Delta`.

    Raises:
        TypeError: if the updates are not dicts of floating-point tensors or ``generator`` is
            not a :class:`torch.Generator`.
        ValueError: if ``max_update_norm`` or ``expected_clients`` is not > 0,
            ``noise_multiplier`` is negative, an update is not finite, the names or shapes
            disagree, or ``updates`` is empty and ``parameter_shapes`` not given.

    Example:
        >>> import torch
        >>> updates = [{"w": torch.tensor([3.0, 4.0])}, {"w": torch.tensor([0.1, 0.0])}]
        >>> aggregate = dp_fedavg_aggregate(updates, max_update_norm=1.0,
        ...     noise_multiplier=0.0, expected_clients=2.0, generator=torch.Generator())
        >>> aggregate["w"]  # (0.6, 0.8) clipped from (3, 4), plus (0.1, 0), over qK = 2
        tensor([0.3500, 0.4000])
        >>> noise_only = dp_fedavg_aggregate([], max_update_norm=1.0, noise_multiplier=1.0,
        ...     expected_clients=2.0, generator=torch.Generator().manual_seed(0),
        ...     parameter_shapes={"w": torch.Size([2])})
        >>> noise_only["w"].shape
        torch.Size([2])
    """
    max_update_norm = check_positive("max_update_norm", max_update_norm)
    noise_multiplier = check_nonnegative("noise_multiplier", noise_multiplier)
    expected_clients = check_positive("expected_clients", expected_clients)
    updates = _check_updates(updates, allow_empty=True)
    if parameter_shapes is not None:
        if not isinstance(parameter_shapes, Mapping) or not parameter_shapes:
            raise TypeError("parameter_shapes must be a non-empty dict name -> torch.Size.")
        shapes = {name: torch.Size(shape) for name, shape in parameter_shapes.items()}
        first_shapes = {n: v.shape for n, v in updates[0].items()} if updates else shapes
        if first_shapes != shapes:
            raise ValueError(
                "parameter_shapes must match the names and shapes of the updates, got "
                f"{dict(shapes)} and {dict(first_shapes)}."
            )
    elif updates:
        shapes = {name: value.shape for name, value in updates[0].items()}
    else:
        raise ValueError(
            "with no update (no client sampled) the result is pure noise: pass parameter_shapes "
            "so that its names and shapes are known."
        )
    if updates:
        like = {name: updates[0][name] for name in shapes}
    else:
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}.")
        like = {
            name: torch.zeros(shape, dtype=dtype, device=device) for name, shape in shapes.items()
        }
    # The norms, the sum and the noise in the widest of the updates' dtypes, float32 at least: in
    # bfloat16 the rounding of the clipped updates' sum let one reach 1.006 S. Rounding the noisy
    # result to the first update's dtype afterwards is post-processing.
    wide = dict.fromkeys(like, torch.float32)
    for update in [like, *updates]:
        for name, value in update.items():
            wide[name] = torch.promote_types(wide[name], value.dtype)
    total = {name: torch.zeros_like(v, dtype=wide[name]) for name, v in like.items()}
    for update in updates:
        norms = torch.stack([torch.linalg.vector_norm(v, dtype=wide[n]) for n, v in update.items()])
        factor = float(clip_factors(torch.linalg.vector_norm(norms), max_grad_norm=max_update_norm))
        for name, value in update.items():
            total[name].add_(value.to(wide[name]), alpha=factor)
    add_gaussian_noise(total, std=noise_multiplier * max_update_norm, generator=generator)
    return {name: (v / expected_clients).to(like[name].dtype) for name, v in total.items()}
