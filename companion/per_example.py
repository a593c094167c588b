"""Per-example gradients and clipping (work in progress: the engine moves here from dpsgd)."""

from __future__ import annotations

import torch

from companion._validation import check_positive

__all__ = ["clip_factors"]

_CLIP_EPS = 1e-6  # as in Opacus: factor = min(1, C / (norm + 1e-6))


def clip_factors(norms: torch.Tensor, *, max_grad_norm: float) -> torch.Tensor:
    r"""The factors :math:`\min(1, C / (\lVert g_i \rVert + 10^{-6}))` that clip each norm to C.

    Args:
        norms: per-example (or per-client) L2 norms, any shape.
        max_grad_norm: the clipping norm :math:`C`, > 0.

    Returns:
        A tensor of the shape of ``norms``; ``factor * norm <= C`` everywhere.

    Raises:
        ValueError: if ``max_grad_norm`` is not a finite number > 0.

    Example:
        >>> import torch
        >>> clip_factors(torch.tensor([0.5, 4.0]), max_grad_norm=1.0)
        tensor([1.0000, 0.2500])
    """
    max_grad_norm = check_positive("max_grad_norm", max_grad_norm)
    return (max_grad_norm / (norms + _CLIP_EPS)).clamp(max=1.0)
