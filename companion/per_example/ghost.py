r"""The ghost norm of a linear layer on sequences, and its clipped sum, with bounded rounding.

Part of :mod:`companion.per_example`; import from there. Example :math:`i`'s weight gradient of a
linear layer on :math:`L` positions is :math:`\sum_s b_s a_s^\top` (input rows :math:`a_s`, output
gradient rows :math:`b_s`). Its squared norm, from Gram matrices without the :math:`I \times O`
product (Goodfellow 2015; Li, Tramèr, Liang and Hashimoto 2022, "Large Language Models Can Be
Strong Differentially Private Learners", ICLR), is

.. math::

    \Bigl\lVert \sum_s b_s a_s^\top \Bigr\rVert_F^2
    = \sum_{s,t} \langle a_s, a_t \rangle \langle b_s, b_t \rangle,

and the clipped sum over the batch, with clipping factors :math:`f_i`, is one product,
:math:`\sum_i f_i b_i^\top a_i`. Both run on chunks of examples of at most
:data:`~companion.per_example.gradients.CHUNK_ELEMENTS` elements on the CPU, more on a GPU (or
of one example, where one is larger), so that the wider copies they make (float64) grow with the
chunk, not the batch; the clipped sum also holds one (g, O, I) accumulator of the weight's size.
An example whose positions cancel, so that the Gram matrices' rounding could hide its norm, is
measured again on its materialised gradient (:class:`GhostSum`).
"""

from __future__ import annotations

import torch

from companion.per_example.gradients import Entry, Refinable, example_chunks, norm_dtype

__all__ = ["GHOST_MAX_CANCELLATION"]

#: An example whose norm from the Gram matrices is below its bound divided by this (its square
#: below :math:`M / 100^2`) is measured again on its materialised gradient (:func:`ghost_squares`,
#: :class:`GhostSum`).
GHOST_MAX_CANCELLATION = 100.0


def ghost_weight(a: torch.Tensor, b: torch.Tensor, shape: torch.Size) -> Entry:
    """The entry of a weight of ``shape`` whose example-``i`` gradient is :math:`b_i^\\top a_i`,
    by group: ``a`` is (B, g, L, I) and ``b`` (B, g, L, O)."""
    squares, loose = ghost_squares(a, b)
    return ("weight", squares, GhostSum(a, b, shape, squares, loose))


def ghost_squares(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Each example's squared norm of :math:`\sum_s b_s a_s^\top` over positions :math:`s`, from
    Gram matrices (``a`` is (B, g, L, I) and ``b`` (B, g, L, O), by group), and a mask of the
    examples where it is only a bound.

    The squared norm is :math:`\sum_{s,t} \langle a_s, a_t \rangle \langle b_s, b_t \rangle`, whose
    rounding error is relative to the bound :math:`M = (\sum_s \lVert a_s \rVert \lVert b_s
    \rVert)^2` (the triangle inequality), not to the norm: where an example's positions cancel
    (duplicate positions read as a difference, or a record crafted so), float32 would measure the
    norm far too small, even negative (NaN), and the clipped vector, computed by another product,
    would exceed :math:`C`. So the sums run in float64 (float32 on Apple's ``mps``, which has
    none), and an example whose squared norm is below :math:`M / 100^2` is given :math:`M` and
    marked: :class:`GhostSum` measures it again, exactly, on its materialised gradient. For the
    others the rounding of the clipped sum (:func:`ghost_sum_dtype`) adds to an example's term
    an error of order :math:`L u f \sqrt{M} \le 100 L u C` (:math:`u = 6 \times 10^{-8}` the unit
    roundoff of float32, :math:`f` the clipping factor; :math:`L = 64`: :math:`4 \times 10^{-4}
    C`), and in practice far less, plus the rounding of the factors and of the result to the
    parameters' dtype. (Run in bfloat16, whose :math:`u` is :math:`2^{15}` times larger, the sum
    let a crafted record reach 1.19 C.)
    """
    dtype = norm_dtype(a.dtype)
    wide = _wide(a)
    groups, length = a.shape[1], a.shape[2]
    # Per example: the wide copies of a and b, the two Gram matrices and their product.
    per_example = a[0].numel() + b[0].numel() + 3 * groups * length * length
    found, loose = [], []
    for part in example_chunks(a.shape[0], per_example, a.device):
        x, y = a[part].to(wide), b[part].to(wide)
        squares = torch.einsum("bgls,bgls->b", x @ x.transpose(-1, -2), y @ y.transpose(-1, -2))
        row_norms = torch.linalg.vector_norm(x, dim=-1) * torch.linalg.vector_norm(y, dim=-1)
        bound = row_norms.sum(dim=-1).square().sum(dim=-1)
        loose.append(squares * GHOST_MAX_CANCELLATION**2 < bound)
        found.append(torch.where(loose[-1], bound, squares))
    return torch.cat(found).to(dtype), torch.cat(loose)


class GhostSum(Refinable):
    r"""The clipped sum of :func:`ghost_weight`: one product of the weighted output gradients
    with the inputs, except for the ``loose`` examples, whose norms :func:`ghost_squares` could
    only bound. :meth:`refine` measures those on their gradients :math:`b_i^\top a_i`,
    materialised in float64 (float32 on ``mps``), and the sum then adds those very gradients:
    each such example's term is its factor times the vector whose norm was measured."""

    def __init__(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        shape: torch.Size,
        squares: torch.Tensor,
        loose: torch.Tensor,
    ) -> None:
        self.a, self.b, self.shape, self.squares, self.loose = a, b, shape, squares, loose
        self.exact: list[int] = []  # the examples measured on their materialised gradient

    def _chunks(self) -> list[list[int]]:
        """The exact examples in chunks: a materialised gradient is (g, O, I) each."""
        if not self.exact:
            return []
        size = self.a[0, :, 0].numel() * self.b.shape[-1] + self.a[0].numel() + self.b[0].numel()
        return [self.exact[part] for part in example_chunks(len(self.exact), size, self.a.device)]

    def _gradients(self, index: list[int]) -> torch.Tensor:
        wide = _wide(self.a)
        return self.b[index].to(wide).transpose(-1, -2) @ self.a[index].to(wide)  # (k, g, O, I)

    def refine(self) -> torch.Tensor:
        self.exact = torch.nonzero(self.loose).flatten().tolist()
        squares = self.squares.clone()
        for index in self._chunks():
            exact = self._gradients(index).flatten(1).square().sum(dim=1)
            squares[index] = exact.to(squares.dtype)
        return squares

    def __call__(self, f: torch.Tensor, total: torch.Tensor) -> None:
        a, b, wide = self.a, self.b, ghost_sum_dtype(self.a)
        summed = a.new_zeros((a.shape[1], b.shape[-1], a.shape[-1]), dtype=wide)  # (g, O, I)
        for index in self._chunks():
            grads = self._gradients(index)
            summed += torch.einsum("k,kgoi->goi", f[index].to(grads.dtype), grads).to(wide)
        if self.exact:
            f = f.index_fill(0, torch.tensor(self.exact, device=f.device), 0.0)
        for part in example_chunks(a.shape[0], a[0].numel() + b[0].numel(), a.device):
            weighted = b[part].to(wide) * f[part].to(wide)[:, None, None, None]
            summed += torch.einsum("bglo,bgli->goi", weighted, a[part].to(wide))
        total.add_(summed.reshape(self.shape).to(total.dtype))


def _wide(a: torch.Tensor) -> torch.dtype:
    """The dtype of the ghost norm's sums: float64, or float32 on ``mps``, which has none."""
    return torch.float32 if a.device.type == "mps" else torch.float64


def full_float32_matmul(device: torch.device) -> bool:
    """Whether float32 matrix products on ``device`` round as float32: not to TF32 or bfloat16,
    as they may after ``torch.set_float32_matmul_precision("high")`` or a backend's
    ``fp32_precision`` (oneDNN on the CPU, cuBLAS on CUDA)."""
    backends = {
        "cpu": getattr(torch.backends.mkldnn, "matmul", None),
        "cuda": torch.backends.cuda.matmul,
    }
    precision = getattr(backends.get(device.type), "fp32_precision", None)
    if precision is None:  # torch before 2.9, or another device: the legacy setting
        try:
            return torch.get_float32_matmul_precision() == "highest"
        except RuntimeError:  # torch refuses to read it after a mix of legacy and new settings
            return False
    if precision == "none":  # the backend follows the global setting
        precision = getattr(torch.backends, "fp32_precision", "none")
    return precision in ("none", "ieee")


def ghost_sum_dtype(a: torch.Tensor) -> torch.dtype:
    """The dtype of the ghost path's clipped sum: float32, or float64 where float32 products
    would be rounded to fewer bits (:func:`ghost_squares`)."""
    if a.device.type == "mps":  # no float64 there
        return torch.float32
    if a.dtype == torch.float64 or not full_float32_matmul(a.device):
        return torch.float64
    return torch.float32
