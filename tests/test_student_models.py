"""Models, losses and batches that students bring, found by a coursework trial to break the
per-example clipping: each either matches the plain per-example loop of ``tests/_oracles.py``
or gets a clear error.

The loop is the oracle: one forward and one backward pass per example, clipped and summed
(``_loop_clipped_sum``); equality is to 1e-5 relative (``_assert_same``), float32 rounding over
a few hundred terms.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from _oracles import _assert_same, _loop_clipped_sum, _most_clipped_norm
from torch import nn

from companion.accounting import DEFAULT_ORDERS, PLDAccountant
from companion.attacks import loss_threshold_attack
from companion.dpsgd import (
    add_gaussian_noise,
    gaussian_noise,
    noisy_clipped_gradient,
    set_private_gradients,
    train_dpsgd,
)
from companion.federated import fedavg
from companion.per_example import PerExampleClipper, clipped_gradient_sum, layout


def _gen(seed=1):
    return torch.Generator().manual_seed(seed)


def _seeded(build, seed=0):
    torch.manual_seed(seed)
    return build()


class _FlattenedBatch(nn.Module):
    """A Linear applied to the batch flattened to (B*T, F), as a "time-distributed" layer."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        b, t, f = x.shape
        return self.head(torch.tanh(self.fc(x.reshape(b * t, f))).reshape(b, t, -1).mean(1))


class _SequenceFirst(nn.Module):
    """Layers on the sequence laid out (T, B, F), as torch's recurrent and attention layers do
    by default (batch_first=False): a Linear and, with ``prelu``, a PReLU, a type whose rule
    takes the examples along dimension 0 only; a LayerNorm and the head see the batch first."""

    def __init__(self, prelu=False):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.act = nn.PReLU() if prelu else nn.Tanh()
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.act(self.fc(x.transpose(0, 1)))  # (T, B, 6)
        return self.head(self.norm(h.mean(0)))


class _TokensFirst(nn.Module):
    """An Embedding on token ids laid out (T, B) and a LayerNorm on its (T, B, 6) output."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.norm(self.embed(x.t())).mean(0))


def _transformer():
    """torch's encoder layer with its default batch_first=False, on (B, T, d) inputs."""

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.layer(x.transpose(0, 1)).mean(0))

    return Encoder()


class _Temperature(nn.Module):
    """A learnable scalar temperature: a 0-d parameter outside any layer."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.temperature = nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        return self.fc(x) / self.temperature


def _twice_registered():
    """One Linear registered at two places of the tree (nn.Sequential(layer, ..., layer))."""
    layer = nn.Linear(6, 6)
    return nn.Sequential(layer, nn.Tanh(), layer, nn.Tanh(), nn.Linear(6, 3))


def _sequences(batch, steps=5, features=4):
    return torch.randn(batch, steps, features, generator=_gen()) * 3


def _tokens(batch, steps=5):
    return torch.randint(0, 10, (batch, steps), generator=_gen())


# name -> (model builder, input builder given the batch size)
_LAYOUTS = {
    "flattened batch": (_FlattenedBatch, lambda b: _sequences(b)),
    "PReLU, sequence first": (lambda: _SequenceFirst(prelu=True), lambda b: _sequences(b)),
    "PReLU, 2 positions": (lambda: _SequenceFirst(prelu=True), lambda b: _sequences(b, steps=2)),
}
_SEQUENCE_FIRST = {
    "Linear": (_SequenceFirst, lambda b: _sequences(b)),
    "Linear, 2 positions": (_SequenceFirst, lambda b: _sequences(b, steps=2)),
    "Linear, 3 positions": (_SequenceFirst, lambda b: _sequences(b, steps=3)),
    "Embedding and LayerNorm": (_TokensFirst, lambda b: _tokens(b)),
    "Embedding and LayerNorm, 3 positions": (_TokensFirst, lambda b: _tokens(b, steps=3)),
    "transformer, batch_first=False": (_transformer, lambda b: _sequences(b, features=8)),
}


def _batch_of(layouts, name, batch):
    """The model of ``layouts[name]``, a batch, and the loop's clipped sum at a norm that clips
    some examples and not others."""
    build, inputs = layouts[name]
    model, x = _seeded(build), inputs(batch)
    y = torch.randint(0, 3, (batch,), generator=_gen(2))
    _, norms = _loop_clipped_sum(model, "cross_entropy", x, y, 1.0)
    c = _most_clipped_norm(norms)
    return model, x, y, c, _loop_clipped_sum(model, "cross_entropy", x, y, c)[0]


_PRELU_HAS_NO_RULE = r"ignore:layer 'act' \(PReLU\) has no rule"


@pytest.mark.filterwarnings(_PRELU_HAS_NO_RULE)
@pytest.mark.parametrize("batch", [2, 3, 5])  # B = T: the rows match the examples in number
@pytest.mark.parametrize("name", sorted(_LAYOUTS))
def test_layers_whose_rows_are_not_the_examples_match_the_loop(name, batch):
    """The rules read dimension 0 as the examples (a Linear, Embedding or LayerNorm on a sequence
    laid out (T, B, F): dimension 1 too). A layer that sees another layout falls back to vmap,
    also when the batch has as many examples as the sequence has positions (B = T), which a
    shape check on the batch cannot see; the loop is the oracle."""
    model, x, y, c, expected = _batch_of(_LAYOUTS, name, batch)
    with pytest.warns(UserWarning, match="rows are not the batch's examples"):
        sums = clipped_gradient_sum(model, "cross_entropy", x, y, max_grad_norm=c)
    _assert_same(sums, expected)


@pytest.mark.parametrize("batch", [2, 3, 5])  # B = T: the rows match the examples in number
@pytest.mark.parametrize("name", sorted(_SEQUENCE_FIRST))
def test_layers_on_a_sequence_laid_out_t_b_f_take_the_rules_and_match_the_loop(name, batch):
    """A Linear, Embedding or LayerNorm called on (T, B, F) holds the examples along dimension
    1. The check of the first batch finds it there, also where B = T and dimension 0 has as
    many rows (the check rules it out: each of its rows is read by every example's loss), and
    the rules take the layer: no fallback, so no warning. The loop is the oracle."""
    model, x, y, c, expected = _batch_of(_SEQUENCE_FIRST, name, batch)
    clipper = PerExampleClipper(model, loss="cross_entropy")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sums = clipper(x, y, max_grad_norm=c).sums
    _assert_same(sums, expected)
    assert 1 in clipper.plan.dims.values()  # the examples along dimension 1 for some layer


def _assert_matches_the_loop_without_warning(clipper, model, x, y):
    """The clipper's sum of the batch ``(x, y)`` at C = 0.5 equals the loop's, and no layer
    moves to vmap (which always warns)."""
    expected, _ = _loop_clipped_sum(model, "cross_entropy", x, y, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _assert_same(clipper(x, y, max_grad_norm=0.5).sums, expected)


@pytest.mark.parametrize(
    ("layer", "a_shape", "b_shape", "dims"),
    [
        (nn.Linear(4, 4), (4, 4), (4, 4), [0]),  # (B, F): dimension 1 holds the features
        (nn.Linear(4, 3), (5, 4, 4), (5, 4, 3), [1]),  # (T, B, F)
        (nn.Linear(4, 3), (4, 4, 4), (4, 4, 3), [0, 1]),  # T = B: the graph's check decides
        (nn.Embedding(9, 3), (5, 4), (5, 4, 3), [1]),  # token ids laid out (T, B)
        (nn.LayerNorm(4), (5, 4, 4), (5, 4, 4), [1]),
        (nn.LayerNorm((4, 4)), (5, 4, 4), (5, 4, 4), []),  # normalised over dimension 1
        (nn.PReLU(), (5, 4, 4), (5, 4, 4), []),  # its rule takes the batch first only
        (nn.Conv1d(4, 2, 1), (4, 4, 7), (4, 2, 7), [0]),  # dimension 1 holds the channels
    ],
)
def test_the_dimensions_that_may_hold_a_layers_examples(layer, a_shape, b_shape, dims):
    """Four examples: dimension 1 may hold them only where the layer computes each index of it
    alike, as a position (a Linear's or LayerNorm's leading dimensions, all of an Embedding's)."""
    assert layout.example_dims(layer, torch.zeros(a_shape), torch.zeros(b_shape), 4) == dims


def test_a_later_batch_with_as_many_examples_as_positions_keeps_the_dimension_found():
    """Three checked batches (4, 3 and 2 examples of 5 positions) show ``fc``'s examples along
    dimension 1. The fourth batch, not checked, has B = T = 5, so its shapes would fit
    dimension 0 as well: the plan, not the shapes, decides, or each example would get the
    gradient of one position of every example."""
    model = _seeded(_SequenceFirst)
    clipper = PerExampleClipper(model, loss="cross_entropy")
    for size in (4, 3, 2):
        clipper(_sequences(size), torch.arange(size) % 3, max_grad_norm=0.5)
    x, y = _sequences(5), torch.tensor([0, 2, 1, 1, 0])
    _assert_matches_the_loop_without_warning(clipper, model, x, y)


def test_negative_control_the_rules_on_the_flattened_rows_would_clip_each_row():
    """What the fallback prevents: clipping the 5 rows of one example separately lets the
    example move the sum by up to 5 C. The first assertion checks the data (the rows clipped one
    by one give a sum of norm above 1.5 C), so that the second, on companion, can fail: the
    clipped sum of one example has norm at most C."""
    model, x = _seeded(_FlattenedBatch), _sequences(1) * 10
    y = torch.tensor([0])
    rows = x.reshape(5, 1, 4)  # each position as its own "example"
    row_sums, _ = _loop_clipped_sum(model, "cross_entropy", rows, y.repeat(5), 0.01)
    assert _norm(row_sums) > 0.01 * 1.5
    with pytest.warns(UserWarning, match="rows are not the batch's examples"):
        sums = clipped_gradient_sum(model, "cross_entropy", x, y, max_grad_norm=0.01)
    assert _norm(sums) <= 0.01 * (1 + 1e-6)


def _norm(sums):
    return float(torch.linalg.vector_norm(torch.cat([s.flatten() for s in sums.values()])))


@pytest.mark.filterwarnings(_PRELU_HAS_NO_RULE)
def test_a_clipper_moves_such_a_layer_once_and_names_it_once():
    """The first batch already has B = T, so only the check of its autograd graph can see that
    the PReLU's rows are positions; later batches reuse the plan without a second warning."""
    model, x = _seeded(lambda: _SequenceFirst(prelu=True)), _sequences(5)
    y = torch.randint(0, 3, (5,), generator=_gen(2))
    clipper = PerExampleClipper(model, loss="cross_entropy")
    with pytest.warns(UserWarning, match="layer 'act' is called on an input whose rows") as caught:
        first = clipper(x, y, max_grad_norm=0.5)
    assert len(caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = clipper(x, y, max_grad_norm=0.5)
    expected, _ = _loop_clipped_sum(model, "cross_entropy", x, y, 0.5)
    _assert_same(first.sums, expected)
    _assert_same(second.sums, expected)


class _FcSkippable(_SequenceFirst):
    """Calls ``fc`` (on (T, B, F)) only while ``use_fc`` is set."""

    use_fc = True

    def forward(self, x):
        if self.use_fc:
            return super().forward(x)
        return self.head(self.norm(x.mean(1).repeat(1, 2)[:, :6]))


def test_a_layer_that_a_checked_batch_does_not_call_keeps_the_dimension_found():
    """The first checked batch (4 examples) shows ``fc``'s examples along dimension 1; the next
    two (3 and 5 examples) do not call it. The fourth batch, not checked, has B = T = 6: the
    dimension found for ``fc`` must hold until a check sees it again."""
    model = _seeded(_FcSkippable)
    clipper = PerExampleClipper(model, loss="cross_entropy")
    for size in (4, 3, 5):
        model.use_fc = size == 4
        clipper(_sequences(size, steps=6), torch.arange(size) % 3, max_grad_norm=0.5)
    model.use_fc = True
    x, y = _sequences(6, steps=6), torch.tensor([0, 2, 1, 1, 0, 2])
    _assert_matches_the_loop_without_warning(clipper, model, x, y)


class _Switching(_SequenceFirst):
    """Calls ``fc`` on (T, B, F) while ``time_first``, on (B, T, F) otherwise."""

    time_first = True

    def forward(self, x):
        if self.time_first:
            return super().forward(x)
        return self.head(self.norm(torch.tanh(self.fc(x)).mean(1)))


@pytest.mark.parametrize("first", [True, False])
def test_a_layer_the_checks_see_on_two_layouts_falls_back_for_good(first):
    """The checked batches (4, 3, 2 examples of 5 positions) call ``fc`` on one layout, then the
    other: it moves to vmap with a warning, since a later batch with B = T = 5 could be either.
    That batch, on the first layout again, matches the loop."""
    model = _seeded(_Switching)
    clipper = PerExampleClipper(model, loss="cross_entropy")
    for size, time_first in ((4, first), (3, not first)):
        model.time_first = time_first
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            clipper(_sequences(size), torch.arange(size) % 3, max_grad_norm=0.5)
    assert any("along dimension 0 in some batches" in str(w.message) for w in caught)
    clipper(_sequences(2), torch.arange(2) % 3, max_grad_norm=0.5)
    model.time_first = first
    x, y = _sequences(5), torch.tensor([0, 2, 1, 1, 0])
    _assert_matches_the_loop_without_warning(clipper, model, x, y)


def test_a_layer_no_check_settled_falls_back_where_b_equals_t():
    """``fc`` is first called after the checks, on (T, B, F) with B = T = 5: its shapes fit
    both dimensions, and nothing says which holds the examples, so it moves to vmap with a
    warning; the sum matches the loop."""
    model = _seeded(_FcSkippable)
    model.use_fc = False
    clipper = PerExampleClipper(model, loss="cross_entropy")
    for size in (4, 3, 2):
        clipper(_sequences(size), torch.arange(size) % 3, max_grad_norm=0.5)
    model.use_fc = True
    x, y = _sequences(5), torch.tensor([0, 2, 1, 1, 0])
    expected, _ = _loop_clipped_sum(model, "cross_entropy", x, y, 0.5)
    with pytest.warns(UserWarning, match="layer 'fc' is called on an input whose rows"):
        _assert_same(clipper(x, y, max_grad_norm=0.5).sums, expected)


def test_a_batch_of_one_example_takes_the_rules_on_any_layout():
    """One example cannot be mixed with another: ``fc`` on (T, 1, F) takes the rules before any
    check, also with T = 1 (where its shapes fit both dimensions), and the next batches (one
    checked) keep them."""
    model = _seeded(_SequenceFirst)
    clipper = PerExampleClipper(model, loss="cross_entropy")
    for size, steps in ((1, 1), (1, 5), (4, 5), (1, 5)):
        x, y = _sequences(size, steps=steps), torch.arange(size) % 3
        _assert_matches_the_loop_without_warning(clipper, model, x, y)
    assert clipper.plan.dims[model.fc] == 1


class _FlippedSequences(nn.Module):
    """A Linear on (B, T, F) sequences in the reversed order of the batch, put back after it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(x.flip(0))).flip(0).mean(1))


@pytest.mark.parametrize("batch", [2, 4])
def test_a_batch_reordered_around_a_layer_is_seen_along_both_dimensions(batch):
    """With B = T both dimensions of ``fc``'s (B, T, F) input have B rows; the check of the
    graph rules out both (dimension 0: the flip; dimension 1: positions every example reads),
    so ``fc`` moves to vmap with a warning and the sum matches the loop."""
    model, x = _seeded(_FlippedSequences), _sequences(batch, steps=batch)
    y = torch.arange(batch) % 3
    expected, _ = _loop_clipped_sum(model, "cross_entropy", x, y, 0.5)
    with pytest.warns(UserWarning, match="layer 'fc' is called on an input whose rows"):
        _assert_same(
            clipped_gradient_sum(model, "cross_entropy", x, y, max_grad_norm=0.5), expected
        )


class _LastToken(nn.Module):
    """An Embedding and a Linear on ids laid out (T, B); each example's loss reads the Linear's
    output at its last token other than padding (0) only."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.fc(self.embed(x.t())))  # (T, B, 4)
        return self.head(h[(x != 0).sum(1) - 1, torch.arange(len(x))])


def _padded(lengths, steps):
    x = torch.randint(1, 10, (len(lengths), steps), generator=_gen(3))
    for i, length in enumerate(lengths):
        x[i, length:] = 0
    return x


def test_a_layer_both_dimensions_pass_for_is_not_settled_and_falls_back():
    """Example i has length i + 1 in the first batch (B = T = 4), so the Linear's output row
    (i, i) is the only one example i's loss reads: either dimension passes the check (and gives
    the same sum on this batch). Neither is settled, and the shapes fit both, so ``fc`` moves to
    vmap with a warning; a later batch with B = T = 5 and other lengths, where the two would
    differ, matches the loop."""
    model = _seeded(_LastToken)
    clipper = PerExampleClipper(model, loss="cross_entropy")
    with pytest.warns(UserWarning, match="layer 'embed', 'fc' is called on an input whose rows"):
        clipper(_padded(range(1, 5), 4), torch.arange(4) % 3, max_grad_norm=0.5)
    assert model.fc not in clipper.plan.dims
    x, y = _padded([5, 5, 3, 2, 5], 5), torch.tensor([0, 2, 1, 1, 0])
    expected, _ = _loop_clipped_sum(model, "cross_entropy", x, y, 0.5)
    _assert_same(clipper(x, y, max_grad_norm=0.5).sums, expected)


class _LayoutBySize(_SequenceFirst):
    """Sequence-first only for batches of more than three examples: the checked batches of a
    clipper fed small batches first show ``fc``'s examples along dimension 0."""

    def forward(self, x):
        if x.shape[0] <= 3:
            return self.head(self.norm(torch.tanh(self.fc(x)).mean(1)))
        return super().forward(x)


class _GatedAttention(nn.MultiheadAttention):
    """A subclass of MultiheadAttention with a sublayer it calls: a gate on its output."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate = nn.Linear(self.embed_dim, self.embed_dim)

    def forward(self, *args, **kwargs):
        out, weights = super().forward(*args, **kwargs)
        return torch.sigmoid(self.gate(out)) * out, weights


class _Attention(nn.Module):
    """torch's MultiheadAttention (or ``kind``), batch first, and a head."""

    def __init__(self, kind=nn.MultiheadAttention):
        super().__init__()
        self.attn = kind(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h, _ = self.attn(x, x, x, need_weights=False)
        return self.head(h.mean(1))


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap of torch's attention
def test_a_multihead_attention_subclass_falls_back_with_its_out_proj_from_the_start():
    """MultiheadAttention reads its out_proj's parameters without calling it. torch's own layer
    is computed by products (tests/test_attention.py), but a subclass may compute something
    else. The out_proj was announced as a layer taking vmap over its own call, then moved to
    vmap over the model at the first batch, with a second warning and a second vmap pass. Now
    the plan sends the attention's parameters and its out_proj's to vmap at once, with one
    warning naming them; a sublayer that the subclass calls keeps its rule. The loop is the
    oracle. With only out_proj trainable, method="layerwise" is refused when the clipper is
    built, as for any layer without a rule."""
    model, x = _seeded(lambda: _Attention(_GatedAttention)), _sequences(6, features=8)
    y = torch.randint(0, 3, (6,), generator=_gen(2))
    c = _most_clipped_norm(_loop_clipped_sum(model, "cross_entropy", x, y, 1.0)[1])
    expected, _ = _loop_clipped_sum(model, "cross_entropy", x, y, c)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clipper = PerExampleClipper(model, loss="cross_entropy")
        for _ in range(2):
            sums = clipper(x, y, max_grad_norm=c).sums
    names = ["in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"]
    ours = [str(w.message) for w in caught if "performance drop" not in str(w.message)]
    assert [message.split(":")[0] for message in ours] == [
        f"layer 'attn' (_GatedAttention) reads parameters {names} itself, which no rule computes"
    ]
    assert clipper.plan.fallback == [f"attn.{name}" for name in names]
    assert [name for name, _ in clipper.plan.hooked] == ["attn.gate", "head"]
    _assert_same(sums, expected)
    model.attn.in_proj_weight.requires_grad_(False)
    model.attn.in_proj_bias.requires_grad_(False)
    with pytest.raises(ValueError, match=r"'layerwise' does not apply: .*\['out_proj.weight', "):
        PerExampleClipper(model, loss="cross_entropy", method="layerwise")


def test_a_batch_whose_rows_are_not_the_examples_falls_back_although_the_checks_passed():
    """After three checked batches of two or three examples (batch first), a batch of four
    calls ``fc`` on (T, B, F): every batch's shapes are checked against the dimension the
    checks found, so ``fc`` moves to vmap, with a warning."""
    model = _seeded(_LayoutBySize)
    clipper = PerExampleClipper(model, loss="cross_entropy")
    for size in (2, 3, 2):
        clipper(_sequences(size), torch.arange(size) % 3, max_grad_norm=0.5)
    x, y = _sequences(4), torch.tensor([0, 2, 1, 1])  # 4 examples of 5 positions
    expected, _ = _loop_clipped_sum(model, "cross_entropy", x, y, 0.5)
    with pytest.warns(UserWarning, match="layer 'fc' is called on an input whose rows"):
        sums = clipper(x, y, max_grad_norm=0.5).sums
    _assert_same(sums, expected)


class _PositionalEmbedding(nn.Module):
    """Token and position embeddings: the position table is read with arange(T), one row per
    position for the whole batch, whatever the batch size."""

    def __init__(self):
        super().__init__()
        self.tokens = nn.Embedding(10, 4)
        self.positions = nn.Embedding(5, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head((self.tokens(x) + self.positions(torch.arange(x.shape[1]))).mean(1))


def test_a_position_table_read_once_per_batch_matches_the_loop_when_b_equals_t():
    """With B = T = 5 the position Embedding's input has B rows, as if each were an example's;
    only the probe can tell."""
    model = _seeded(_PositionalEmbedding)
    x, y = torch.randint(0, 10, (5, 5), generator=_gen()), torch.tensor([0, 1, 1, 0, 1])
    expected, _ = _loop_clipped_sum(model, "cross_entropy", x, y, 0.5)
    with pytest.warns(UserWarning, match="layer 'positions' is called on an input whose rows"):
        sums = clipped_gradient_sum(model, "cross_entropy", x, y, max_grad_norm=0.5)
    _assert_same(sums, expected)


class _Squeezed(nn.Module):
    """A common student CNN: pool to (B, C, 1, 1), then .squeeze(), which also drops the batch
    dimension of a batch of one."""

    def __init__(self, squeeze=True):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4, 3)
        self.squeeze = squeeze

    def forward(self, x):
        pooled = torch.relu(self.conv(x)).mean((2, 3), keepdim=True)
        return self.fc(pooled.squeeze() if self.squeeze else pooled.flatten(1))


def test_a_forward_pass_with_squeeze_keeps_the_rules():
    """The probe runs copies of one example, never one alone, so .squeeze() keeps the batch
    dimension and the layers keep their rules: no warning, the loop's result. (The loop feeds
    one example at a time, so it runs the same weights with .flatten(1) instead.)"""
    model = _seeded(_Squeezed)
    x, y = torch.randn(6, 1, 6, 6, generator=_gen()), torch.randint(0, 3, (6,), generator=_gen(2))
    twin = _Squeezed(squeeze=False)
    twin.load_state_dict(model.state_dict())
    expected, _ = _loop_clipped_sum(twin, "cross_entropy", x, y, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sums = clipped_gradient_sum(model, "cross_entropy", x, y, max_grad_norm=0.5)
    _assert_same(sums, expected)


@pytest.mark.parametrize("method", ["auto", "vmap"])
def test_a_module_registered_twice_keeps_its_parameters(method):
    """torch.func.functional_call swaps the wrong tensors back into a module that appears twice
    in the tree; the model must come back with its own Parameters, which then get gradients."""
    model = _seeded(_twice_registered)
    weight = model[0].weight
    x, y = torch.randn(7, 6, generator=_gen()), torch.randint(0, 3, (7,), generator=_gen(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the layer falls back to vmap, with a warning
        sums = clipped_gradient_sum(model, "cross_entropy", x, y, max_grad_norm=0.5, method=method)
    assert model[0].weight is weight and model[2].weight is weight
    assert isinstance(model[0].weight, nn.Parameter)
    expected, _ = _loop_clipped_sum(model, "cross_entropy", x, y, 0.5)
    _assert_same(sums, expected)
    nn.functional.cross_entropy(model(x), y).backward()
    assert weight.grad is not None and float(weight.grad.abs().sum()) > 0


def test_a_scalar_parameter_matches_the_loop_and_trains():
    model, x = _seeded(_Temperature), torch.randn(9, 4, generator=_gen())
    y = torch.randint(0, 3, (9,), generator=_gen(2))
    expected, _ = _loop_clipped_sum(model, "cross_entropy", x, y, 0.05)
    for method in ("auto", "vmap"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the temperature is computed with vmap
            sums = clipped_gradient_sum(model, "cross_entropy", x, y, max_grad_norm=0.05,
                                        method=method)  # fmt: skip
        _assert_same(sums, expected)
    before = model.temperature.item()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_dpsgd(model, x, y, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5,
                    epochs=1, lr=0.5, delta=1e-3, seed=0)  # fmt: skip
    assert model.temperature.item() != before


@pytest.mark.parametrize(
    "loss",
    [
        nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 3.0])),
        nn.CrossEntropyLoss(ignore_index=2),
    ],
    ids=["class weights", "ignore_index"],
)
def test_a_weighted_mean_loss_is_refused_on_data_sorted_by_class(loss):
    """Torch divides these losses by the batch's total weight, which depends on the other
    examples' labels, so no per-example gradient exists. On the first examples, all of one class,
    the weighted mean equals the plain mean; the check must look at other labels too."""
    model = _seeded(lambda: nn.Linear(4, 3))
    x, y = torch.randn(40, 4, generator=_gen()), torch.arange(40) // 14  # sorted by class
    with pytest.raises(ValueError, match="weighted mean"):
        clipped_gradient_sum(model, loss, x, y, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="weighted mean"):
        train_dpsgd(model, x, y, loss=loss, noise_multiplier=1.0, max_grad_norm=1.0,
                    sample_rate=0.5, epochs=1, lr=0.1, delta=1e-3, seed=0)  # fmt: skip
    # positive control: the unweighted loss on the same data passes
    clipped_gradient_sum(model, nn.CrossEntropyLoss(), x, y, max_grad_norm=1.0)


def _step(model, x, y):
    return set_private_gradients(
        model, x, y, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=4.0,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip


def test_the_lower_level_step_takes_int32_labels_and_explains_bad_ones():
    model = _seeded(lambda: nn.Linear(4, 3))
    x, y = torch.randn(4, 4, generator=_gen()), torch.tensor([0, 2, 1, 2])
    _step(model, x, y)
    expected = [p.grad.clone() for p in model.parameters()]
    _step(model, x, y.int())
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=0, atol=0)
    with pytest.raises(TypeError, match="y_batch must hold integer class labels"):
        _step(model, x, y.float())
    with pytest.raises(ValueError, match="y_batch must hold class labels >= 0"):
        _step(model, x, torch.tensor([0, -1, 1, 2]))
    with pytest.raises(ValueError, match="labels must be below the model's 3 outputs"):
        _step(model, x, torch.tensor([0, 3, 1, 2]))


class _Bag(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.embed(x).mean(1))


@pytest.mark.parametrize("method", ["auto", "vmap"])
def test_a_token_id_out_of_range_in_a_later_row_gets_a_clear_error(method):
    """The model is checked on a few examples before training; a bad id further on is met in a
    batch, and must get the same kind of message, not torch's IndexError."""
    x = torch.randint(0, 10, (100, 5), generator=_gen())
    x[50, 2] = 10
    y = torch.randint(0, 2, (100,), generator=_gen(2))
    with pytest.raises(ValueError, match="token ids are below the Embedding's num_embeddings"):
        train_dpsgd(_seeded(_Bag), x, y, noise_multiplier=1.0, max_grad_norm=1.0, method=method,
                    sample_rate=0.5, epochs=1, lr=0.1, delta=1e-3, seed=0)  # fmt: skip


def _train(model=None, **kwargs):
    x = torch.randn(40, 4, generator=_gen())
    y = torch.randint(0, 2, (40,), generator=_gen(2))
    arguments = dict(max_grad_norm=1.0, sample_rate=0.5, epochs=1, delta=1e-5, seed=0)
    if "optimizer" not in kwargs:
        arguments["lr"] = 0.1
    if "target_epsilon" not in kwargs:
        arguments["noise_multiplier"] = 1.0
    model = _seeded(lambda: nn.Linear(4, 2)) if model is None else model
    return train_dpsgd(model, x, y, **(arguments | kwargs))


def test_a_huge_target_with_a_pld_accountant_is_met_not_refused():
    """Below some noise the PLD grid cannot hold a step's privacy loss; such candidates count as
    missing the target, as in get_noise_multiplier, instead of ending the run. The search then
    ends at the grid's edge: 1% less noise no longer fits (the bracket stops at 0.1%)."""
    history = _train(
        target_epsilon=1e4, accountant=PLDAccountant(value_discretization_interval=0.01)
    )
    assert history[-1]["epsilon"] <= 1e4
    accountant = PLDAccountant(value_discretization_interval=0.01)
    for _ in range(history[-1]["steps"]):
        accountant.step(noise_multiplier=history[-1]["noise_multiplier"] * 0.99, sample_rate=0.5)
    with pytest.raises(ValueError, match="too small for the PLD accountant"):
        accountant.get_epsilon(1e-5)


def test_a_target_below_the_rdp_floor_names_the_floor():
    """RDP converts to (epsilon, delta) with a floor that no noise removes: the conversion of
    zero RDP, min over the orders of log((a - 1) / a) - (log delta + log a) / (a - 1) (Balle et
    al. 2020, Theorem 21, the conversion companion states), written out here."""
    a = np.asarray(DEFAULT_ORDERS, dtype=float)
    floor = float(np.min(np.log((a - 1) / a) - (np.log(1e-5) + np.log(a)) / (a - 1)))
    with pytest.raises(ValueError, match="cannot be reached") as caught:
        _train(target_epsilon=floor / 2)
    reported = float(str(caught.value).split("bound epsilon below by ")[1].split(" ")[0])
    assert reported == pytest.approx(floor, rel=1e-3)  # 4 digits printed
    assert "even with infinite noise" in str(caught.value)


def test_a_loss_class_instead_of_an_instance_is_named():
    for call in (
        lambda: _train(loss=nn.CrossEntropyLoss),
        lambda: clipped_gradient_sum(
            nn.Linear(4, 2),
            nn.CrossEntropyLoss,
            torch.zeros(2, 4),
            torch.tensor([0, 1]),
            max_grad_norm=1.0,
        ),  # fmt: skip
    ):
        with pytest.raises(TypeError, match=r"class CrossEntropyLoss; pass an instance"):
            call()


def test_an_optimizer_that_needs_a_closure_is_refused():
    model = _seeded(lambda: nn.Linear(4, 2))
    with pytest.raises(ValueError, match="LBFGS needs a closure"):
        _train(model, optimizer=torch.optim.LBFGS(model.parameters()))
    _train(model, optimizer=torch.optim.Adam(model.parameters()))  # control: Adam is taken


def test_an_opacus_accountant_is_named_with_its_module():
    opacus_accountants = pytest.importorskip("opacus.accountants")
    with pytest.raises(TypeError, match=r"got opacus\.accountants\.rdp\.RDPAccountant\."):
        _train(accountant=opacus_accountants.RDPAccountant())


def test_the_documented_recipe_for_a_batch_split_into_parts_equals_one_step():
    """companion.dpsgd's docstring tells Opacus users without BatchMemoryManager to add up
    clipped_gradient_sum over the parts of a batch, add the noise once with add_gaussian_noise
    (std sigma C) and divide by expected_batch_size. With the same generator seed that is the
    gradient set_private_gradients writes for the whole batch (the same normal draws, in the
    same order; float32 rounding of a different summation order apart)."""
    model = _seeded(lambda: nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)))
    x, y = torch.randn(12, 4, generator=_gen()), torch.randint(0, 3, (12,), generator=_gen(2))
    sigma, c, m = 0.7, 0.5, 10.0
    set_private_gradients(model, x, y, noise_multiplier=sigma, max_grad_norm=c,
                          expected_batch_size=m, generator=_gen(5))  # fmt: skip
    whole = {name: p.grad.clone() for name, p in model.named_parameters()}
    parts = [clipped_gradient_sum(model, "cross_entropy", x[i : i + 4], y[i : i + 4],
                                  max_grad_norm=c) for i in (0, 4, 8)]  # fmt: skip
    total = {name: sum(part[name] for part in parts) for name in whole}
    add_gaussian_noise(total, std=sigma * c, generator=_gen(5))
    _assert_same({name: t / m for name, t in total.items()}, whole)
    # negative control: noising each part, as three calls of set_private_gradients would
    noisy_parts = [{k: v.clone() for k, v in part.items()} for part in parts]
    for part in noisy_parts:
        add_gaussian_noise(part, std=sigma * c, generator=_gen(5))
    tripled = {name: sum(part[name] for part in noisy_parts) / m for name in whole}
    assert not all(torch.allclose(tripled[k], whole[k], rtol=1e-3) for k in whole)


# --- own loops with the lower-level step ----------------------------------------------------------


def _clipper_and_batch():
    model = _seeded(lambda: nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)))
    x, y = torch.randn(6, 4, generator=_gen()), torch.randint(0, 3, (6,), generator=_gen(2))
    return model, PerExampleClipper(model, loss="cross_entropy"), x, y


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"expected_batch_size": -4.0}, ValueError, "expected_batch_size must be > 0"),
        ({"expected_batch_size": 0}, ValueError, "expected_batch_size must be > 0"),
        ({"max_grad_norm": -1.0}, ValueError, "max_grad_norm must be > 0"),
        ({"noise_multiplier": -1.0}, ValueError, "noise_multiplier must be >= 0"),
        ({"clipper": "model"}, TypeError, "clipper must be a companion.per_example"),
    ],
)
def test_the_step_core_checks_its_numbers(change, error, match):
    """A negative expected_batch_size used to return minus the gradient, and a negative clipping
    norm scaled each example by -C/norm, both without a word."""
    _, clipper, x, y = _clipper_and_batch()
    arguments = dict(clipper=clipper, noise_multiplier=0.0, max_grad_norm=1.0,
                     expected_batch_size=4.0, generator=_gen(5))  # fmt: skip
    with pytest.raises(error, match=match):
        noisy_clipped_gradient(x_batch=x, y_batch=y, **(arguments | change))


def test_the_lower_level_step_refuses_a_batch_with_nan_or_labels_on_another_device():
    """One NaN input makes every coordinate of the released gradient NaN: refused, as
    train_dpsgd refuses it."""
    model, _, x, y = _clipper_and_batch()
    x[2, 0] = float("nan")
    with pytest.raises(ValueError, match="x_batch must not contain NaN or infinite values"):
        _step(model, x, y)
    x[2, 0] = float("inf")
    with pytest.raises(ValueError, match="x_batch must not contain NaN or infinite values"):
        _step(model, x, y)
    with pytest.raises(ValueError, match="must be on one device"):
        _step(model, torch.randn(6, 4), y.to("meta"))


def test_noise_needs_floating_tensors_it_may_change_and_is_drawn_in_the_widest_dtype():
    with pytest.raises(TypeError, match="must be floating point"):
        gaussian_noise({"w": torch.zeros(3, dtype=torch.long)}, std=1.0, generator=_gen())
    # next to float32, float64 noise is drawn in float64: the values of a float64 draw
    mixed = gaussian_noise({"a": torch.zeros(3), "b": torch.zeros(3, dtype=torch.float64)},
                           std=1.0, generator=_gen())  # fmt: skip
    wide = torch.randn(6, generator=_gen(), dtype=torch.float64)
    assert mixed["b"].dtype == torch.float64 and torch.equal(mixed["b"], wide[3:])
    assert torch.equal(mixed["a"], wide[:3].float())
    parameters = dict(nn.Linear(3, 2).named_parameters())
    with pytest.raises(ValueError, match="require gradients"):
        add_gaussian_noise(parameters, std=1.0, generator=_gen())
    before = {k: p.detach().clone() for k, p in parameters.items()}
    with torch.no_grad():  # control: as an optimizer does
        add_gaussian_noise(parameters, std=1.0, generator=_gen())
    assert all(not torch.equal(parameters[k], before[k]) for k in before)


@pytest.mark.parametrize("method", ["auto", "vmap"])
def test_the_step_under_bfloat16_autocast_equals_the_step_without(method):
    """Autocast is switched off inside the clipping: the gradient is the full-precision one (the
    rules used to mix bfloat16 output gradients with float32 parameters and crash)."""
    model, _, x, y = _clipper_and_batch()

    def step():
        set_private_gradients(model, x, y, noise_multiplier=0.0, max_grad_norm=0.5,
                              expected_batch_size=4.0, generator=_gen(), method=method)  # fmt: skip
        return {k: p.grad.clone() for k, p in model.named_parameters()}

    expected = step()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = step()
    for k, e in expected.items():
        assert under_autocast[k].dtype == torch.float32
        torch.testing.assert_close(under_autocast[k], e, rtol=1e-6, atol=1e-7)


def test_a_federated_client_whose_local_training_fails_is_named():
    """BatchNorm cannot train on a last local batch of one example (9 examples, batches of 4)."""
    model = _seeded(lambda: nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)))
    clients = [(torch.randn(n, 4, generator=_gen(n)), torch.randint(0, 3, (n,))) for n in (8, 9)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BatchNorm's running statistics are not aggregated
        with pytest.raises(ValueError, match=r"local training of clients\[1\] \(9 examples\)"):
            fedavg(model, clients, rounds=1, client_fraction=1.0, local_epochs=1, batch_size=4,
                   lr=0.1, progress=False)  # fmt: skip


def test_numpy_token_ids_get_a_message_that_says_numpy_becomes_float32():
    tokens = np.random.default_rng(0).integers(0, 10, size=(8, 5))
    members = (tokens[:4], np.array([0, 1, 0, 1]))
    nonmembers = (tokens[4:], np.array([1, 0, 1, 0]))
    with pytest.raises(ValueError, match="become float32, .*give token ids as an int64"):
        loss_threshold_attack(_seeded(_Bag), members, nonmembers)


def test_the_step_gives_each_module_back_its_own_training_mode():
    """A student who keeps a Dropout in evaluation mode in a training model finds it so after
    a step, whose checks and probe run the model in evaluation mode (restoring only the root's
    mode would switch the Dropout back on)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Dropout(0.5), nn.Linear(4, 3))
    model.train()
    model[1].eval()
    x, y = torch.randn(5, 6, generator=_gen()), torch.tensor([0, 1, 2, 0, 1])
    set_private_gradients(model, x, y, noise_multiplier=0.0, max_grad_norm=1.0,
                          expected_batch_size=5.0, generator=_gen())  # fmt: skip
    assert [m.training for m in model.modules()] == [True, True, False, True]


class _ScaledHead(nn.Module):
    """A Linear and a scale held by the module itself (as a position table or a class token)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.fc(x) * self.scale


def test_the_fallback_message_names_parameters_a_module_holds_itself():
    """Before, it said "layer 'the model' (_ScaledHead) has no rule", as if the model were one
    layer without a rule; the rule for its Linear applies."""
    with pytest.warns(UserWarning) as caught:
        clipper = PerExampleClipper(_ScaledHead(), loss="cross_entropy")
    message = str(caught[0].message)
    assert message.startswith("the model (_ScaledHead) holds parameters ['scale'] itself")
    assert clipper.plan.fallback == ["scale"]
