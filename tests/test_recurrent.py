"""torch's recurrent layers (RNN, GRU, LSTM) on the per-layer rules: the recurrence unrolled
step by step, each product a Linear on the sequence (``companion.per_example.recurrent``).

The oracle is the plain per-example loop of ``tests/_oracles.py`` through torch's own fused
layer: one forward and one backward pass per example, clipped and summed; equality is to 1e-5
relative (``_assert_same``). The models read every step's output and the final states, so
that every parameter has a gradient well above rounding.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from _oracles import _assert_same, _loop_at_most_clipped, _loop_clipped_sum
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from companion.dpsgd import train_dpsgd
from companion.per_example import PerExampleClipper, clipped_gradient_sum
from companion.per_example.composite import Part, parts
from companion.per_example.recurrent import SORTED_PACK

pytestmark = pytest.mark.unit

B = 6


def _gen(seed=1):
    return torch.Generator().manual_seed(seed)


class _Tagger(nn.Module):
    """A recurrent layer on (B, T, 4) inputs (laid out (T, B, 4) for it unless batch_first),
    read at every step and through its final states, then a Linear head."""

    def __init__(self, layer, *, initial_state=False, by_keyword=False, **options):
        super().__init__()
        self.rnn = layer(4, 5, **options)
        directions = 2 if options.get("bidirectional") else 1
        self.out_size = directions * (options.get("proj_size") or 5)
        self.head = nn.Linear(self.out_size, 3)
        # the initial state from the input, so that gradients flow through hx too
        self.start = nn.Linear(4, 5) if initial_state else None
        self.by_keyword = by_keyword

    def forward(self, x):
        first = self.rnn.batch_first
        seq = x if first else x.transpose(0, 1)
        hx = None
        if self.start is not None:
            h0 = torch.tanh(self.start(x.mean(1))).expand(self.rnn.num_layers, -1, -1)
            hx = (h0.contiguous(), -h0.contiguous()) if isinstance(self.rnn, nn.LSTM) else h0
        if self.by_keyword:
            out, state = self.rnn(input=seq, hx=hx)
        else:
            out, state = self.rnn(seq) if hx is None else self.rnn(seq, hx)
        steps = (out if first else out.transpose(0, 1)).mean(1)
        return self.head(steps) + _finals(state)


def _finals(state):
    """The final states (an LSTM's h_n and c_n), summed into the logits of classes 0 and 1 (not
    into all three alike, which the cross-entropy would not see)."""
    h_n, c_n = state if isinstance(state, tuple) else (state, torch.zeros_like(state))
    zeros = torch.zeros_like(h_n[0, :, 0])
    return torch.stack([h_n.sum((0, 2)), c_n.sum((0, 2)), zeros], dim=1)


CASES = {
    "rnn_tanh": lambda: _Tagger(nn.RNN),
    "rnn_relu_batch_first": lambda: _Tagger(nn.RNN, nonlinearity="relu", batch_first=True),
    "gru": lambda: _Tagger(nn.GRU),
    "lstm": lambda: _Tagger(nn.LSTM, batch_first=True),
    "gru_two_layers_bidirectional": lambda: _Tagger(nn.GRU, num_layers=2, bidirectional=True),
    "lstm_two_layers_bidirectional_projection": lambda: _Tagger(
        nn.LSTM, num_layers=2, bidirectional=True, proj_size=3, batch_first=True
    ),
    "lstm_without_bias": lambda: _Tagger(nn.LSTM, bias=False, num_layers=2),
    "lstm_with_initial_state_by_keyword": lambda: _Tagger(
        nn.LSTM, initial_state=True, by_keyword=True, num_layers=2
    ),
    "gru_with_initial_state": lambda: _Tagger(nn.GRU, initial_state=True, batch_first=True),
    # dropout between layers acts in training mode only: this model is evaluated
    "lstm_dropout_in_eval_mode": lambda: _Tagger(nn.LSTM, num_layers=2, dropout=0.5).eval(),
    # ... and in training mode p = 1 drops every input of the second layer, in torch's layer
    # and in the unrolled one alike (a draw of its own would change nothing else)
    "gru_dropout_one_in_training": lambda: _Tagger(nn.GRU, num_layers=2, dropout=1.0),
    "frozen_first_layer_inputs": lambda: _frozen(
        _Tagger(nn.LSTM, num_layers=2), "rnn.weight_ih_l0", "rnn.bias_ih_l0"
    ),
    "frozen_biases": lambda: _frozen(_Tagger(nn.GRU), "rnn.bias_ih_l0", "rnn.bias_hh_l0"),
    "biases_only": lambda: _frozen(
        _Tagger(nn.GRU, num_layers=2),
        *[f"rnn.weight_{kind}_l{k}" for kind in ("ih", "hh") for k in (0, 1)],
        "head.weight",
    ),
}


class _Packed(nn.Module):
    """A recurrent layer on a packed batch of sequences of several lengths (zero padding at the
    end of each), read at every step and through its final state."""

    def __init__(self, layer, *, enforce_sorted, initial_state=False, **options):
        super().__init__()
        self.rnn = layer(4, 5, batch_first=True, **options)
        self.head = nn.Linear(5 * (2 if options.get("bidirectional") else 1), 3)
        self.enforce_sorted = enforce_sorted
        self.start = nn.Linear(4, 5) if initial_state else None  # hx from the input

    def forward(self, x):
        lengths = x[:, :, 0].ne(0).sum(1)
        packed = pack_padded_sequence(x, lengths, batch_first=True,
                                      enforce_sorted=self.enforce_sorted)  # fmt: skip
        if self.start is None:
            out, state = self.rnn(packed)
        else:  # in the batch's order, as torch takes hx with a packed batch
            states = 2 * self.rnn.num_layers if self.rnn.bidirectional else self.rnn.num_layers
            h0 = torch.tanh(self.start(x.sum(1))).expand(states, -1, -1).contiguous()
            out, state = self.rnn(packed, (h0, -h0) if isinstance(self.rnn, nn.LSTM) else h0)
        steps, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return self.head(steps.sum(1)) + _finals(state)


PACKED = {
    "gru_unsorted": lambda: _Packed(nn.GRU, enforce_sorted=False),
    "lstm_sorted_two_layers_bidirectional": lambda: _Packed(
        nn.LSTM, enforce_sorted=True, num_layers=2, bidirectional=True
    ),
    "rnn_unsorted_bidirectional": lambda: _Packed(nn.RNN, enforce_sorted=False, bidirectional=True),
    "lstm_unsorted_with_initial_state": lambda: _Packed(
        nn.LSTM, enforce_sorted=False, initial_state=True, num_layers=2
    ),
    "gru_unsorted_bidirectional_with_initial_state": lambda: _Packed(
        nn.GRU, enforce_sorted=False, initial_state=True, bidirectional=True
    ),
}


@pytest.mark.parametrize("name", sorted(PACKED))
def test_packed_sequences_match_the_loop(name):
    """Lengths 7, 3, 5, 1, 3, 6 (sorted longest first where the model packs them sorted); the
    loop packs each example alone, at its own length."""
    torch.manual_seed(0)
    model, (x, y) = PACKED[name]().double(), _batch()
    lengths = torch.tensor([7, 3, 5, 1, 3, 6])
    if model.enforce_sorted:
        lengths = lengths.sort(descending=True).values
    x = x * (torch.arange(7) < lengths[:, None])[:, :, None]  # zeros past each length
    c, expected, loop_norms = _loop_at_most_clipped(model, "cross_entropy", x, y)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sums, norms = clipped_gradient_sum(
            model, "cross_entropy", x, y, max_grad_norm=c, method="layerwise", return_norms=True
        )
    # a batch packed sorted is warned about (the model may have sorted it), and nothing else
    told = {str(w.message) for w in caught}
    assert told == ({SORTED_PACK} if model.enforce_sorted else set())
    _assert_same(sums, expected)
    torch.testing.assert_close(norms, loop_norms, rtol=1e-5, atol=0)


class _SortsByLength(_Packed):
    """The pattern of older tutorials: sort the batch by length, pack it sorted, unsort h_n.
    The rules then read the GRU's row i as example i's, and the rows check of the first batches
    sees it only where the sort moves their first examples: here it does not (they are sorted
    already), so only the warning tells."""

    def forward(self, x):
        lengths = x[:, :, 0].ne(0).sum(1)
        order = lengths.argsort(descending=True, stable=True)
        packed = pack_padded_sequence(x[order], lengths[order], batch_first=True)
        _, h_n = self.rnn(packed)
        return self.head(h_n[0][order.argsort()])


def test_a_model_that_sorts_its_batch_to_pack_it_is_warned_about():
    torch.manual_seed(0)
    model = _SortsByLength(nn.GRU, enforce_sorted=True).double()
    x = torch.randn(12, 7, 4, generator=_gen(), dtype=torch.float64)
    lengths = torch.tensor([7, 7, 6, 6, 5, 4, 3, 3, 1, 7, 2, 5])  # the first 8 sorted
    x, y = x * (torch.arange(7) < lengths[:, None])[:, :, None], torch.arange(12) % 3
    with pytest.warns(UserWarning, match="built with enforce_sorted=True") as caught:
        clipped_gradient_sum(model, "cross_entropy", x, y, max_grad_norm=1.0)
    assert {str(w.message) for w in caught} == {SORTED_PACK}  # (at each forward pass)
    assert {w.filename for w in caught} == {__file__}  # the model's line calling the layer


class _TimeFirstView(nn.Module):
    """An LSTM on (T, B, F), its output viewed as (T*B, H), as language-model tutorials do:
    torch's layer returns a contiguous output, so the unrolled one must too."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        out, _ = self.rnn(x.transpose(0, 1))
        flat = out.view(-1, 5)  # raises on a non-contiguous output
        return self.head(flat.view(out.shape).mean(0))


def test_an_output_viewed_as_torch_returns_it_matches_the_loop():
    torch.manual_seed(0)
    model, (x, y) = _TimeFirstView().double(), _batch()
    c, expected, _ = _loop_at_most_clipped(model, "cross_entropy", x, y)
    _assert_same(clipped_gradient_sum(model, "cross_entropy", x, y, max_grad_norm=c), expected)


def test_a_weight_computed_by_weight_norm_falls_back_when_the_clipper_is_built():
    """Old-style weight_norm turns weight_hh_l0 into a tensor computed from weight_hh_l0_g and
    _v; with those frozen, no trainable parameter is left unruled, but no part can take it."""
    torch.manual_seed(0)
    model = _Tagger(nn.LSTM, batch_first=True)
    nn.utils.weight_norm(model.rnn, "weight_hh_l0")
    model.rnn.weight_hh_l0_g.requires_grad_(False)
    model.rnn.weight_hh_l0_v.requires_grad_(False)
    with pytest.warns(UserWarning, match=r"'rnn' \(LSTM\) computes \['weight_hh_l0'\] \(weight_"):
        clipper = PerExampleClipper(model, loss="cross_entropy")
    assert not any(isinstance(m, Part) for _, m in clipper.plan.hooked)


def _frozen(model, *names):
    for name in names:
        model.get_parameter(name).requires_grad_(False)
    return model


def _model(name, dtype=torch.float64):
    torch.manual_seed(0)
    return CASES[name]().to(dtype)


def _batch(dtype=torch.float64, length=7):
    return torch.randn(B, length, 4, generator=_gen(), dtype=dtype), torch.randint(
        0, 3, (B,), generator=_gen(2)
    )


@pytest.mark.parametrize("method", ["layerwise", "auto"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_recurrent_layers_match_the_loop(name, method):
    model, (x, y) = _model(name), _batch()
    c, expected, loop_norms = _loop_at_most_clipped(model, "cross_entropy", x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no layer falls back to vmap
        sums, norms = clipped_gradient_sum(
            model, "cross_entropy", x, y, max_grad_norm=c, method=method, return_norms=True
        )
    _assert_same(sums, expected)
    torch.testing.assert_close(norms, loop_norms, rtol=1e-5, atol=0)
    assert "forward" not in vars(model.rnn)  # the unrolled forward is the clipper's alone


@pytest.mark.parametrize("name", ["gru", "lstm_two_layers_bidirectional_projection"])
def test_recurrent_layers_in_float32_match_the_float64_loop(name):
    """float32 (unit roundoff 6e-8) through 7 steps, 2 layers, 2 directions and a projection,
    against the float64 loop: within 1e-4 of each tensor's largest entry (seen: 3e-5, on a
    weight the cell state c_n reaches)."""
    model, (x, y) = _model(name, torch.float32), _batch(torch.float32)
    c, expected, _ = _loop_at_most_clipped(model.double(), "cross_entropy", x.double(), y)
    sums = clipped_gradient_sum(model.float(), "cross_entropy", x, y, max_grad_norm=c)
    for n, e in expected.items():
        torch.testing.assert_close(sums[n].double(), e, rtol=0, atol=1e-4 * float(e.abs().max()))


@pytest.mark.parametrize("name", ["rnn_tanh", "lstm"])
def test_negative_control_a_loop_that_forgets_to_clip_differs(name):
    model, (x, y) = _model(name), _batch()
    c, _, _ = _loop_at_most_clipped(model, "cross_entropy", x, y)
    unclipped, _ = _loop_clipped_sum(model, "cross_entropy", x, y, c, clip=False)
    sums = clipped_gradient_sum(model, "cross_entropy", x, y, max_grad_norm=c)
    with pytest.raises(AssertionError):
        _assert_same(sums, unclipped)


def test_every_parameter_of_a_layer_is_in_exactly_one_part():
    layer = nn.LSTM(4, 5, num_layers=2, bidirectional=True, proj_size=3)
    found = [name for part in parts(layer) for name in part.names if name is not None]
    assert sorted(found) == sorted(name for name, _ in layer.named_parameters())
    layer.weight_hh_l1.requires_grad_(False)
    layer.bias_hh_l1.requires_grad_(False)
    assert ("weight_hh_l1", "bias_hh_l1") not in [part.names for part in parts(layer)]
    part = parts(layer)[0]
    assert part.weight is layer.weight_ih_l0 and part.bias is layer.bias_ih_l0


class _CalledTwice(nn.Module):
    """One GRU run over the sequence and again over its own outputs."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(4, 4, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.rnn(self.rnn(x)[0])[0].mean(1))


class _OneSequenceAtATime(nn.Module):
    """A GRU called on each example's sequence alone, without a batch dimension."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(4, 5)
        self.h0 = nn.Parameter(torch.randn(1, 5))  # an initial state without a batch dimension
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.stack([self.rnn(sequence, self.h0)[1][0] for sequence in x]))


@pytest.mark.parametrize(
    ("build", "moved"),
    [
        (_CalledTwice, "layer 'rnn' is called more than once"),
        (_OneSequenceAtATime, "layer 'rnn' is called on an input whose rows are not the batch"),
    ],
)
def test_a_call_the_parts_cannot_take_falls_back_to_vmap_named_once(build, moved):
    """A GRU called twice (its parameters read twice in the graph), or on each example's
    sequence without a batch dimension (rows of one example: the rows check of the first batch
    sees it), moves to vmap over the model, named once for all its parts; vmap runs it unrolled
    too (it cannot batch torch's fused GRU) and matches the loop."""
    torch.manual_seed(0)
    model, (x, y) = build().double(), _batch()
    c, expected, _ = _loop_at_most_clipped(model, "cross_entropy", x, y)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sums = clipped_gradient_sum(model, "cross_entropy", x, y, max_grad_norm=c)
    told = [str(w.message) for w in caught if "'rnn'" in str(w.message)]
    assert len(told) == 1 and told[0].startswith(moved) and told[0].count("'rnn'") == 1
    _assert_same(sums, expected)
    assert "forward" not in vars(model.rnn)


class _LearnedInitialState(nn.Module):
    """A GRU whose initial state is a parameter of the model: a container's own parameter,
    which vmap over the model computes (with the GRU unrolled) while the rules take the rest."""

    def __init__(self):
        super().__init__()
        self.h0 = nn.Parameter(torch.randn(1, 1, 5))
        self.rnn = nn.GRU(4, 5, batch_first=True)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h0 = self.h0.expand(1, x.shape[0], 5).contiguous()
        return self.head(self.rnn(x, h0)[0].mean(1))


def _parametrised_gru():
    """A GRU with torch's new weight_norm: a ParametrizedGRU, whose forward is the GRU's."""
    model = _Tagger(nn.GRU, batch_first=True)
    nn.utils.parametrizations.weight_norm(model.rnn, "weight_hh_l0")
    return model


@pytest.mark.parametrize(
    ("build", "moved"),
    [
        (_LearnedInitialState, r"the model \(_LearnedInitialState\) holds parameters \['h0'\]"),
        (_parametrised_gru, r"layer 'rnn.parametrizations.weight_hh_l0.original0'|'rnn'"),
    ],
)
def test_vmap_over_the_model_runs_recurrent_layers_unrolled(build, moved):
    torch.manual_seed(0)
    model, (x, y) = build().double(), _batch()
    c, expected, _ = _loop_at_most_clipped(model, "cross_entropy", x, y)
    with pytest.warns(UserWarning, match=moved):
        sums = clipped_gradient_sum(model, "cross_entropy", x, y, max_grad_norm=c)
    _assert_same(sums, expected)
    assert "forward" not in vars(model.rnn)


def test_the_layers_own_forward_is_back_after_a_forward_pass_that_raises():
    class _Fails(_Tagger):
        def forward(self, x):
            super().forward(x)
            raise RuntimeError("after the recurrent layer")

    torch.manual_seed(0)
    model, (x, y) = _Fails(nn.LSTM).double(), _batch()
    with pytest.raises(RuntimeError, match="after the recurrent layer"):
        PerExampleClipper(model, loss="cross_entropy")(x, y, max_grad_norm=1.0)
    assert "forward" not in vars(model.rnn)


def test_a_layer_whose_forward_is_replaced_is_not_unrolled():
    torch.manual_seed(0)
    model = _Tagger(nn.LSTM, batch_first=True)
    model.rnn.forward = model.rnn.forward  # a wrapper's doing: the call may be other maths
    with pytest.warns(UserWarning, match=r"layer 'rnn' \(LSTM\) has its forward replaced"):
        clipper = PerExampleClipper(model, loss="cross_entropy")
    assert not any(isinstance(m, Part) for _, m in clipper.plan.hooked)


def test_dpsgd_trains_a_gru_text_classifier_with_the_rules():
    """End to end, as a student would: token ids, an Embedding, a GRU; no warning, so no layer
    took vmap (which fails on a GRU)."""

    class TextGRU(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(30, 8)
            self.rnn = nn.GRU(8, 8, batch_first=True)
            self.head = nn.Linear(8, 2)

        def forward(self, tokens):
            return self.head(self.rnn(self.embed(tokens))[1][0])

    tokens = torch.randint(0, 30, (64, 6), generator=_gen())
    labels = (tokens[:, 0] < 15).long()
    torch.manual_seed(0)
    model = TextGRU()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        history = train_dpsgd(
            model, tokens, labels, epochs=2, lr=0.5, max_grad_norm=1.0, sample_rate=0.25,
            delta=1e-5, noise_multiplier=1.0, seed=0,
        )  # fmt: skip
    assert [h["epoch"] for h in history] == [1, 2] and history[-1]["epsilon"] > 0
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())
