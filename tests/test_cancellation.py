"""Records crafted so that their gradient's parts cancel must not get past the clipping norm.

Two rules measure an example's norm on another computation than the vector they add: the ghost
norm of a linear layer on sequences (Gram matrices) and the embedding rule (a token held at
several positions). Rounding there is relative to the parts, not to their sum, so a record whose
parts cancel could be measured too small (or NaN) and added far above ``C``. The oracle is the
clipped sum of one example alone: its norm is that example's whole contribution, which DP-SGD's
sensitivity analysis bounds by ``C``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _oracles import _assert_same, _loop_clipped_sum
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from companion.per_example import (
    PerExampleClipper,
    clipped_gradient_sum,
    ghost,
    gradients,
)

pytestmark = pytest.mark.unit

#: float32's unit roundoff.
U = 2.0**-24


class SequenceNet(nn.Module):
    """A Linear on every position, a mean over positions, a head: on 16 positions the rules take
    the ghost norm for ``lin`` (3 * positions * (in + out) < in * out)."""

    def __init__(self, width: int = 256, classes: int = 4) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lin(x).mean(dim=1))


def cancelling_records(batch: int, length: int, width: int, scale: float) -> torch.Tensor:
    """Each record repeats one large vector with alternating signs: its positions cancel in the
    weight gradient of ``lin``, which is then tiny next to its parts."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(batch, 1, width, generator=g)
    base = scale * base / base.norm(dim=-1, keepdim=True)
    signs = torch.tensor([(-1.0) ** t for t in range(length)])[None, :, None]
    return signs * base + 1e-3 * torch.randn(batch, length, width, generator=g)


def total_norm(sums: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum(v.double().square().sum() for v in sums.values())))


@pytest.fixture
def ghost_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many times the ghost path ran: its tests check that they test it."""
    calls: list[int] = []
    squares = ghost.ghost_squares

    def counted(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(a.shape[0])
        return squares(a, b)

    monkeypatch.setattr(ghost, "ghost_squares", counted)
    return calls


@pytest.fixture
def refined(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many examples each ``GhostSum.refine`` measured on their materialised gradients."""
    counts: list[int] = []
    refine = ghost.GhostSum.refine

    def counted(self: ghost.GhostSum) -> torch.Tensor:
        squares = refine(self)
        counts.append(len(self.exact))
        return squares

    monkeypatch.setattr(ghost.GhostSum, "refine", counted)
    return counts


@pytest.mark.parametrize("scale", [2e4, 1e5])
def test_ghost_norm_never_lets_a_cancelling_record_past_c(
    scale: float, ghost_calls: list[int], refined: list[int]
) -> None:
    torch.manual_seed(0)
    model, length, batch, c = SequenceNet(), 16, 16, 1.0
    x = cancelling_records(batch, length, 256, scale)
    y = torch.randint(0, 4, (batch,), generator=torch.Generator().manual_seed(2))
    result = PerExampleClipper(model, loss="cross_entropy")(x, y, max_grad_norm=c)
    assert bool(torch.isfinite(result.norms).all())
    assert all(bool(torch.isfinite(v).all()) for v in result.sums.values())
    assert refined == [batch]  # every record cancels, and is measured on its gradient
    # Each record's whole contribution: C norm / (norm + 1e-6), below C by 8e-7 here, up to the
    # float32 roundings of the norms (of vectors of 256 and 4 entries, summed pairwise: 8 u at
    # most) and of the factor: 16 u, since every part is measured on the vector it adds. Before
    # the float64 Gram and the bound, records here went in at 1.2 C or as NaN.
    for i in range(batch):
        alone = clipped_gradient_sum(
            model, "cross_entropy", x[i : i + 1], y[i : i + 1], max_grad_norm=c
        )
        assert total_norm(alone) <= c * (1 + 16 * U)
    assert len(ghost_calls) == 1 + batch
    assert refined == [batch] + [1] * batch


class FrameDifference(nn.Module):
    """A Linear (or a grouped 1x1 Conv1d, wide enough to take the ghost norm) on two frames,
    read as their difference, as in a change detector: where the frames are equal, the layer's
    weight gradient cancels exactly."""

    def __init__(self, conv: bool, width: int) -> None:
        super().__init__()
        self.conv = conv
        self.lin = nn.Conv1d(width, width, 1, groups=2) if conv else nn.Linear(width, width)
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 2 frames, width)
        h = self.lin(x.transpose(1, 2)).transpose(1, 2) if self.conv else self.lin(x)
        return self.head(h[:, 0] - h[:, 1])


@pytest.mark.parametrize("conv", [False, True], ids=["linear", "grouped-conv"])
def test_cancelling_examples_are_measured_on_their_gradients(
    conv: bool, ghost_calls: list[int], refined: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Examples 2 and 3 have equal frames, 4 and 5 frames 1e-3 apart: their ghost norms are far
    below their bound :math:`M`, which alone gave norms 4 to 9 times too large. They are
    measured again on their gradients, materialised in float64, and those are added; examples 0
    and 1 (random frames) take the Gram matrices and one product. The norms and the sum are the
    float64 per-example loop's, to float64 roundings (1e-10); the remeasured examples last, with
    gradients that are not 0, so that a factor taken from another example shows. Negative
    control: with the bounds kept, the norms of examples 2 to 5 are more than twice the loop's."""
    torch.manual_seed(0)
    width = 64 if conv else 16
    model = FrameDifference(conv, width).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 2, width, dtype=torch.float64, generator=g)
    x[2:4, 1] = x[2:4, 0]
    x[4:, 1] = x[4:, 0] + 1e-3 * torch.randn(2, width, dtype=torch.float64, generator=g)
    y = torch.randint(0, 3, (6,), generator=g)
    expected, norms = _loop_clipped_sum(model, "cross_entropy", x, y, 0.5)
    clipper = PerExampleClipper(model, loss="cross_entropy", method="layerwise")
    result = clipper(x, y, max_grad_norm=0.5)
    torch.testing.assert_close(result.norms, norms, rtol=1e-10, atol=0)
    _assert_same(result.sums, expected)
    assert ghost_calls == [6] and refined == [4]
    monkeypatch.setattr(ghost.GhostSum, "refine", lambda self: self.squares)
    bounded = clipper(x, y, max_grad_norm=0.5).norms
    assert bool((bounded[2:] > 2 * norms[2:]).all())
    torch.testing.assert_close(bounded[:2], norms[:2], rtol=1e-10, atol=0)


def test_ghost_norm_of_ordinary_records_is_exact(ghost_calls: list[int]) -> None:
    """The bound replaces only cancelling norms: on random records every norm, and the clipped
    sum, are the per-example loop's (tests/_oracles.py)."""
    torch.manual_seed(0)
    model = SequenceNet()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(16, 16, 256, generator=g), torch.randint(0, 4, (16,), generator=g)
    result = PerExampleClipper(model, loss="cross_entropy")(x, y, max_grad_norm=1.0)
    expected, norms = _loop_clipped_sum(model, "cross_entropy", x, y, 1.0)
    torch.testing.assert_close(result.norms.double(), norms, rtol=1e-5, atol=0)
    _assert_same(result.sums, expected)
    assert ghost_calls == [16]


class SignedBag(nn.Module):
    """Embeddings weighted by a fixed factor per position and summed; a frozen head. Positions 0
    and 1 weigh ``s`` and ``-s (1 + 2**-23)``: a token at both has gradient rows that cancel to
    about ``-1.2e-7 s`` times the row, next to parts of size ``s``."""

    def __init__(self, vocabulary: int, length: int, s: float) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocabulary, 8)
        self.head = nn.Linear(8, 3).requires_grad_(False)
        weights = torch.ones(length)
        weights[0], weights[1] = s, -s * (1 + 2.0**-23)
        self.register_buffer("weights", weights)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head((self.embedding(tokens) * self.weights[:, None]).sum(dim=1))


@pytest.mark.parametrize("c", [1e-3, 1e-2, 1e-1])
@pytest.mark.parametrize("distinct", [True, False], ids=["few-repeats", "many-repeats"])
def test_embedding_adds_a_token_s_rows_as_measured(distinct: bool, c: float) -> None:
    torch.manual_seed(0)
    length = 8
    model = SignedBag(vocabulary=100, length=length, s=1e7)
    # One record; its token 7 at positions 0 and 1. The rest distinct (few repeats: the rows are
    # added one by one, except the pair's) or all one token (many repeats: every pair summed).
    rest = torch.arange(10, 10 + length - 2) if distinct else torch.full((length - 2,), 9)
    tokens = torch.cat((torch.tensor([7, 7]), rest))[None]
    y = torch.tensor([1])
    for method in ("auto", "vmap"):
        alone = clipped_gradient_sum(
            model, "cross_entropy", tokens, y, max_grad_norm=c, method=method, return_norms=True
        )
        norm = float(alone.norms[0])
        assert norm > c  # clipped: the contribution's norm is C norm / (norm + 1e-6)
        # ... up to a few roundings of float32 (u each), when the norm is measured on the vector
        # added. Adding the pair's rows one by one was off by -4% to +1.1% here.
        expected = c * norm / (norm + 1e-6)
        assert total_norm(alone.sums) == pytest.approx(expected, rel=8 * U), method


def test_a_bfloat16_ghost_sum_keeps_a_crafted_record_within_c(ghost_calls: list[int]):
    """A record found by a hill-climb over cancelling positions (7 positions, 64 features, just
    above the cancellation threshold; tests/ghost_bf16_record.pt, ``a`` the inputs and ``b`` the
    output gradient the loss below gives). With the clipped sum run in bfloat16 its term had norm
    1.1875 C; in float32 it is C up to two roundings to bfloat16 (2**-8 relative each): of the
    clipping factor and of the result."""
    record = torch.load(Path(__file__).with_name("ghost_bf16_record.pt"))
    model = nn.Linear(64, 64, bias=False).to(torch.bfloat16)

    def loss(outputs, targets):  # the gradient of example i's loss at its outputs is targets[i]
        return (outputs * targets).flatten(1).sum(1).mean()

    for method in ("layerwise", "vmap"):
        alone = clipped_gradient_sum(
            model, loss, record["a"], record["b"], max_grad_norm=1.0, method=method
        )
        assert total_norm(alone) <= (1 + 2.0**-8) ** 2, method
    assert len(ghost_calls) == 1  # layerwise; vmap measures the vector it adds


def test_the_ghost_sum_runs_in_float64_when_float32_products_are_rounded():
    """TF32 (CUDA) or bfloat16 (oneDNN on the CPU) products have a unit roundoff near
    bfloat16's: where the tensor's device rounds float32 products so, the ghost path's clipped
    sum runs in float64. Each setting is put back as it was."""
    a = torch.zeros(2, 1, 3, 4)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert ghost.ghost_sum_dtype(a) == torch.float32
    assert ghost.ghost_sum_dtype(a.to(torch.bfloat16)) == torch.float32
    settings = [
        (torch.backends.mkldnn.matmul, "bf16", {cpu: False, cuda: True}),
        (torch.backends.cuda.matmul, "tf32", {cpu: True, cuda: False}),
        (torch.backends, "tf32", {cpu: False, cuda: False}),  # the global one
    ]
    for backend, value, full in settings:
        before = backend.fp32_precision
        try:
            backend.fp32_precision = value
            assert {d: ghost.full_float32_matmul(d) for d in full} == full, (backend, value)
        finally:
            backend.fp32_precision = before
        assert ghost.ghost_sum_dtype(a) == torch.float32
    before = torch.backends.mkldnn.matmul.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    try:
        assert ghost.ghost_sum_dtype(a) == torch.float64
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = before


def test_the_ghost_path_in_chunks_matches_the_loop(
    ghost_calls: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The float64 copies are made on chunks of examples: with a bound of 64 examples' elements
    (as ghost_squares counts them; the clipped sum, which counts fewer, takes 70), 150 examples
    are two full chunks and a partial one, in the batch's order. A chunk out of line with its
    examples would change norms and sums by order 1."""
    torch.manual_seed(0)
    model = SequenceNet(width=64).double()
    length, width = 4, 64
    # Per example, as ghost_squares counts: a and b (L * 2 * width), the Grams and their product.
    monkeypatch.setattr(gradients, "CHUNK_ELEMENTS", 64 * (length * 2 * width + 3 * length**2))
    chunks: list[list[int]] = []

    def counted(batch: int, per_example: int, device: torch.device) -> list[slice]:
        parts = gradients.example_chunks(batch, per_example, device)
        chunks.append([len(range(batch)[part]) for part in parts])
        return parts

    monkeypatch.setattr(ghost, "example_chunks", counted)
    x, y = torch.randn(150, length, width, dtype=torch.float64), torch.arange(150) % 4
    expected, norms = _loop_clipped_sum(model, "cross_entropy", x, y, 1.0)
    result = PerExampleClipper(model, loss="cross_entropy", method="layerwise")(
        x, y, max_grad_norm=1.0
    )
    torch.testing.assert_close(result.norms, norms, rtol=1e-10, atol=0)
    _assert_same(result.sums, expected)
    assert ghost_calls == [150]
    assert chunks == [[64, 64, 22], [70, 70, 10]]  # the norms, then the clipped sum


class _LargestNewTensor(TorchDispatchMode):
    """Records the bytes of the largest storage an operation allocates while on (a view shares
    an argument's storage and is not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {
            t.untyped_storage().data_ptr()
            for t in (*args, *kwargs.values())
            if isinstance(t, torch.Tensor)
        }
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_ghost_paths_copies_stay_within_a_chunk(dtype: torch.dtype, monkeypatch):
    """A BERT-sized projection (768 -> 2304 on 512 positions) once took a 1 GiB float64 copy on
    64 examples. Here, scaled down (96 -> 288 on 64 positions, 32 examples, a 2.25 MiB float32
    output gradient), no tensor the ghost path allocates exceeds the chunk bound (64 Ki float64
    elements, 512 KiB), in the norms or in the clipped sum (float64 with a float64 layer): an
    example (24 Ki elements of a and b) and the weight's accumulator (27 Ki) are below it. The
    negative control: with a bound above the batch, the float64 copy of the whole output gradient
    (4.5 MiB) shows."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(32, 1, 64, 96, generator=g, dtype=dtype)
    b = torch.randn(32, 1, 64, 288, generator=g, dtype=dtype)

    def largest_allocation(bound: int) -> int:
        monkeypatch.setattr(gradients, "CHUNK_ELEMENTS", bound)
        total = torch.zeros(288, 96, dtype=dtype)
        with _LargestNewTensor() as seen:
            _, squares, add_to = ghost.ghost_weight(a, b, total.shape)
            add_to(torch.rand(32, generator=g, dtype=dtype), total)
        return seen.largest

    bound = 2**16
    assert largest_allocation(bound) <= 8 * bound
    assert largest_allocation(2**30) >= 8 * 32 * 64 * 288
