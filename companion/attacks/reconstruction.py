r"""How close a reconstructed image is to the original: :func:`reconstruction_similarity`.

The score of the gradient-inversion attack :func:`companion.attacks.invert_gradient`, and of any
other reconstruction attack on images: the Pearson correlation of the pixels, which ignores the
brightness and contrast that such attacks cannot pin down.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["reconstruction_similarity"]


def _as_image(name: str, image: object) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise TypeError(
            f"{name} must be a torch.Tensor or a numpy array, got {type(image).__name__}."
        )
    if image.dtype == bool or not np.issubdtype(image.dtype, np.number) or np.iscomplexobj(image):
        raise TypeError(f"{name} must hold real numbers, got dtype {image.dtype}.")
    if not (image.ndim == 1 or (image.ndim == 2 and image.shape[0] == 1)):
        raise ValueError(
            f"{name} must be one image, of shape (n,) or (1, n), got shape {image.shape}."
        )
    flat = image.reshape(-1).astype(np.float64)
    if flat.size < 2:
        raise ValueError(f"{name} must have at least two pixels, got {flat.size}.")
    if not np.isfinite(flat).all():
        raise ValueError(f"{name} must not contain NaN or infinite values.")
    return flat


def reconstruction_similarity(
    original: torch.Tensor | np.ndarray, reconstruction: torch.Tensor | np.ndarray
) -> float:
    r"""How similar a reconstruction is to the original image: the Pearson correlation of pixels.

    .. math::

        \rho(x, \hat x) = \frac{\sum_j (x_j - \bar x)(\hat x_j - \bar{\hat x})}
        {\sqrt{\sum_j (x_j - \bar x)^2}\,\sqrt{\sum_j (\hat x_j - \bar{\hat x})^2}} \in [-1, 1].

    Why the correlation: it is unchanged by a brightness shift or a contrast change of either
    image (:math:`\hat x \mapsto a \hat x + c` with :math:`a > 0`), so it scores whether the
    *picture* was recovered, not whether the attack also guessed the exact intensity scale
    (which the cosine gradient distance does not pin down). 1 means a perfect reconstruction up
    to such a change, 0 no linear relation (what unrelated images give on average), -1 the
    negative image.

    Args:
        original: one image, shape ``(n,)`` or ``(1, n)`` (tensor or numpy array).
        reconstruction: its reconstruction, the same number of pixels.

    Returns:
        The correlation, a float in [-1, 1]. A constant image has no variation to correlate,
        so if either image is constant the score is 0.0 (the reconstruction says nothing about
        the picture).

    Raises:
        TypeError: if an image is not a tensor or numpy array of real numbers.
        ValueError: if an image is not one flat image, has fewer than two pixels or a NaN, or
            the two differ in size.

    Example:
        >>> x = np.array([0.0, 1.0, 2.0, 3.0])
        >>> reconstruction_similarity(x, 2 * x + 1), reconstruction_similarity(x, x[::-1])
        (1.0, -1.0)
    """
    x = _as_image("original", original)
    x_hat = _as_image("reconstruction", reconstruction)
    if x.shape != x_hat.shape:
        raise ValueError(
            "original and reconstruction must have the same number of pixels, got "
            f"{x.size} and {x_hat.size}."
        )
    x = x - x.mean()
    x_hat = x_hat - x_hat.mean()
    denominator = math.sqrt(float(x @ x) * float(x_hat @ x_hat))
    if denominator == 0.0:
        return 0.0
    return float(np.clip(float(x @ x_hat) / denominator, -1.0, 1.0))
