r"""The clipping that SecAgg+'s quantization needs: its ranges, the norm, updates not finite.

Part of the SecAgg+ app (:mod:`companion.flower.secagg`); it imports no Flower.

**Ranges, chosen for our models.** After clipping, every coordinate of an update lies in
:math:`[-S, S]` (a coordinate is at most the L2 norm), so the quantizer's clipping range is
:math:`S` (``clipping_range = max_update_norm``; Flower's default of 8 would waste a factor
:math:`8/S` of resolution, and a range below :math:`S` would clip coordinates a second time).
Each coordinate is rounded stochastically to one of :math:`2^{22}` levels (Flower's default
``quantization_range``), a step of :math:`2S / 2^{22}` (4.8e-7 for :math:`S = 1`), and the
masked sum lives in the integers modulo :math:`2^{32}`, which holds the sum of up to
:data:`MAX_CLIENTS` :math:`= 2^{32}/2^{22} - 1 = 1023` clients without wrapping (a setup with
more is refused). Every client sends weight 1 (``max_weight = 1``: the server must not weight
by private data sizes, and a weight below ``max_weight`` would scale the update down before
quantization and lose precision), so the unmasked sum differs from the plain sum of the
clipped updates by less than :math:`m` steps per coordinate for :math:`m` clients, far below
the noise :math:`\sigma S`.

**The norm.** Stochastic rounding moves each coordinate by less than a step, so it can lengthen
an update by up to :math:`\sqrt d` steps. Each client therefore clips to :func:`clipping_norm`,
not :math:`S`, and the update the protocol sums has norm at most :math:`S`: the sensitivity the
accountant assumes.
"""

from __future__ import annotations

import math
import warnings

import torch

from companion.per_example import clip_factors

__all__ = ["MAX_CLIENTS", "QUANTIZATION_RANGE", "clip_update", "clipping_norm"]

QUANTIZATION_RANGE = 2**22
"""Quantization levels per coordinate (Flower's default); the sum lives modulo 2**32."""

MAX_CLIENTS = 2**32 // QUANTIZATION_RANGE - 1
"""The most clients a run may have. Each adds up to 2**22 to every coordinate of the masked sum
(and to its weight factor), so 1024 of them would wrap around 2**32."""


def clipping_norm(max_update_norm: float, dimension: int) -> float:
    r"""The norm a client clips its update to: :math:`S` less the most that stochastic rounding
    can add to the norm of a ``dimension``-long update, :math:`\sqrt d` steps of
    :math:`2S / 2^{22}`, so that the update SecAgg+ sums has norm at most :math:`S`.

    Example:
        >>> round(1 - clipping_norm(1.0, 650), 7)  # logistic regression 64-10: 1.2e-5 below S
        1.22e-05
    """
    return max_update_norm * (1 - math.sqrt(dimension) * 2 / QUANTIZATION_RANGE)


def clip_update(
    update: dict[str, torch.Tensor], *, max_update_norm: float
) -> dict[str, torch.Tensor]:
    """The update times :math:`\\min(1, S / (\\lVert u \\rVert_2 + 10^{-6}))`, the norm over all
    parameters: the factor and the arithmetic of :func:`companion.federated.dp_fedavg_aggregate`.

    An update whose norm is not finite (local training that diverged) becomes zero, with a
    warning on the client: a zero contribution is within the bound and tells the server
    nothing, where an error would tell it that this client's training failed (and NaN,
    quantized, would move the secure sum by about :math:`1023 S` per coordinate).

    Args:
        update: name -> tensor, as :func:`companion.federated.local_update` returns it.
        max_update_norm: :math:`S`, > 0.

    Returns:
        A new dict; its L2 norm over all tensors is at most :math:`S`.

    Raises:
        ValueError: if ``max_update_norm`` is not > 0.

    Example:
        >>> clip_update({"w": torch.tensor([3.0, 4.0])}, max_update_norm=1.0)["w"]
        tensor([0.6000, 0.8000])
    """
    norms = torch.stack([torch.linalg.vector_norm(value) for value in update.values()])
    norm = torch.linalg.vector_norm(norms)
    if not torch.isfinite(norm):
        warnings.warn(
            "the local update's norm is not finite (local training diverged: lower lr?); this "
            "client sends a zero update in its place.",
            UserWarning,
            stacklevel=2,
        )
        return {name: torch.zeros_like(value) for name, value in update.items()}
    factor = float(clip_factors(norm, max_grad_norm=max_update_norm))
    return {name: value * factor for name, value in update.items()}
