"""torch's MultiheadAttention on the per-layer rules: its input and output projections as
products (``companion.per_example.attention``).

Two oracles, neither of which calls companion: torch's own layer for the forward that replaces
it (the same outputs and attention weights in float64, and with dropout the same draws), and the
plain per-example loop of ``tests/_oracles.py`` through torch's own layer for the clipped sum:
one forward and one backward pass per example, equal to 1e-5 relative (``_assert_same``). The
models read the attention weights where they ask for them, so that every parameter has a
gradient well above rounding.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from _oracles import _assert_same, _loop_at_most_clipped, _loop_clipped_sum
from torch import nn
from torch.utils.checkpoint import checkpoint

from companion.per_example import PerExampleClipper, clipped_gradient_sum
from companion.per_example.composite import Part, call, parts

pytestmark = pytest.mark.unit

B, T, S = 6, 7, 5  # examples, query positions, key positions (where keys are another tensor)


def _gen(seed=1):
    return torch.Generator().manual_seed(seed)


class _Attending(nn.Module):
    """(B, T, 8) inputs through a MultiheadAttention with 2 heads (laid out (T, B, 8) for it
    unless batch_first), then a Linear head on the mean over positions.

    ``inputs``: ``"self"`` (query, key and value one tensor), ``"memory"`` (keys and values one
    other tensor of S positions, as a decoder's cross-attention) or ``"distinct"`` (three
    tensors). ``masks``: ``"padding"`` (a bool key padding mask and a bool (T, S) mask) or
    ``"per_example"`` (a float key padding mask and a float (B * heads, T, S) mask); each
    example's masks are computed from its own input, as the loop needs. The attention weights,
    if asked for, reach the logits."""

    def __init__(self, *, inputs="self", masks=None, need_weights=False, average=True, **options):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, **options)
        self.memory = nn.Linear(8, 8) if inputs != "self" else None
        self.head = nn.Linear(8, 3)
        self.inputs, self.masks = inputs, masks
        self.need_weights, self.average = need_weights, average

    def forward(self, x):
        key = value = x
        if self.memory is not None:
            key = value = torch.tanh(self.memory(x[:, :S]))
            if self.inputs == "distinct":
                value = key.flip(1)
        length = key.shape[1]
        options = {}
        if self.masks == "padding":  # no example's first key is masked: no row is all -inf
            options["key_padding_mask"] = (x[:, :length, 0] > 0.5) & (torch.arange(length) > 0)
            keys = torch.arange(length)
            options["attn_mask"] = ((torch.arange(T)[:, None] + keys) % 3 == 1) & (keys > 0)
        elif self.masks == "per_example":
            options["key_padding_mask"] = x[:, :length, 1].tanh()
            options["attn_mask"] = x[:, :, :length].repeat_interleave(2, dim=0)
        first = self.attn.batch_first
        q, k, v = (t if first else t.transpose(0, 1) for t in (x, key, value))
        out, weights = self.attn(
            q, k, v, need_weights=self.need_weights, average_attn_weights=self.average, **options
        )
        logits = self.head((out if first else out.transpose(0, 1)).mean(1))
        if weights is not None:  # (B, T, S), or (B, heads, T, S)
            logits = logits + weights.reshape(x.shape[0], -1)[:, :3]
        return logits


def _frozen(model, *names):
    for name in names:
        model.get_parameter(name).requires_grad_(False)
    return model


class _Encoder(nn.Module):
    """torch's TransformerEncoderLayer, batch first, with a causal mask and a key padding mask."""

    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        causal = torch.ones(T, T, dtype=torch.bool).triu(1)  # True: a later position, masked
        padding = (x[:, :, 0] > 0.5) & (torch.arange(T) > 0)
        h = self.layer(x, src_mask=causal, src_key_padding_mask=padding, is_causal=True)
        return self.head(h.mean(1))


class _Decoder(nn.Module):
    """torch's TransformerDecoderLayer, batch first: self-attention, then cross-attention on a
    memory computed from the input."""

    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.memory = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.layer(x, torch.tanh(self.memory(x[:, :S]))).mean(1))


CASES = {
    "self_batch_first": lambda: _Attending(batch_first=True),
    "self_time_first": lambda: _Attending(),
    "memory_time_first": lambda: _Attending(inputs="memory"),
    "distinct_inputs": lambda: _Attending(inputs="distinct", batch_first=True),
    "without_bias": lambda: _Attending(inputs="memory", bias=False, batch_first=True),
    "padding_masks": lambda: _Attending(masks="padding", batch_first=True),
    "per_example_masks": lambda: _Attending(inputs="memory", masks="per_example"),
    "weights_in_the_loss": lambda: _Attending(need_weights=True, masks="padding"),
    "weights_per_head": lambda: _Attending(need_weights=True, average=False, batch_first=True),
    "frozen_input_projection": lambda: _frozen(
        _Attending(batch_first=True), "attn.in_proj_weight", "attn.in_proj_bias"
    ),
    "frozen_output_projection_weight": lambda: _frozen(_Attending(), "attn.out_proj.weight"),
    "encoder_layer": _Encoder,
    "decoder_layer": _Decoder,
}


def _batch():
    x = torch.randn(B, T, 8, generator=_gen(), dtype=torch.float64)
    return x, torch.randint(0, 3, (B,), generator=_gen(2))


@pytest.mark.parametrize("method", ["layerwise", "auto"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_attention_matches_the_loop(name, method):
    torch.manual_seed(0)
    model, (x, y) = CASES[name]().double(), _batch()
    c, expected, loop_norms = _loop_at_most_clipped(model, "cross_entropy", x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no layer falls back to vmap
        clipper = PerExampleClipper(model, loss="cross_entropy", method=method)
        result = clipper(x, y, max_grad_norm=c)
    _assert_same(result.sums, expected)
    torch.testing.assert_close(result.norms, loop_norms, rtol=1e-5, atol=0)
    assert clipper.plan.fallback == []
    attention = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    assert {m.layer for _, m in clipper.plan.hooked if isinstance(m, Part)} == set(attention)
    assert not any("forward" in vars(m) for m in attention)  # the clipper's forward is removed


def test_negative_control_a_loop_that_forgets_to_clip_differs():
    torch.manual_seed(0)
    model, (x, y) = CASES["memory_time_first"]().double(), _batch()
    c, _, _ = _loop_at_most_clipped(model, "cross_entropy", x, y)
    unclipped, _ = _loop_clipped_sum(model, "cross_entropy", x, y, c, clip=False)
    with pytest.raises(AssertionError):
        _assert_same(clipped_gradient_sum(model, "cross_entropy", x, y, max_grad_norm=c), unclipped)


@pytest.mark.parametrize(
    ("batch_first", "inputs", "masks", "need_weights", "average"),
    [
        (first, inputs, masks, need, average)
        for first, inputs, masks, (need, average) in itertools.product(
            [True, False],
            ["self", "memory", "distinct"],
            [None, "padding", "per_example"],
            [(False, True), (True, True), (True, False)],
        )
    ],
)
def test_the_replaced_forward_gives_what_torchs_layer_gives(
    batch_first, inputs, masks, need_weights, average
):
    """The forward the clipper's hooks put in place (``composite.call``) against torch's own
    layer, on the model's inputs: outputs and attention weights to float64 rounding."""
    torch.manual_seed(0)
    model = _Attending(inputs=inputs, masks=masks, batch_first=batch_first).double()
    seen = []
    model.attn.register_forward_hook(lambda m, args, kwargs, out: seen.append((args, kwargs, out)),
                                     with_kwargs=True)  # fmt: skip
    model(_batch()[0])
    args, kwargs, (output, weights) = seen[0]
    kwargs = kwargs | {"need_weights": need_weights, "average_attn_weights": average}
    (ours, our_weights), kept = call(model.attn, args, kwargs)
    expected, expected_weights = model.attn(*args, **kwargs)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    assert ours.is_contiguous() or batch_first  # torch's (T, B, E) output is contiguous
    if need_weights:
        torch.testing.assert_close(our_weights, expected_weights, rtol=1e-12, atol=1e-12)
    else:
        assert our_weights is None and expected_weights is None
    assert sorted(kept) == ["in_proj_weight", "out_proj.weight"]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("need_weights", [False, True])
def test_dropout_draws_what_torchs_layer_draws(need_weights, training):
    """With dropout in training mode, the same seed gives the same output as torch's layer (the
    same draws, in the same order), so the clipped sum is that of the model torch would run; in
    evaluation mode, none."""
    layer = nn.MultiheadAttention(8, 2, dropout=0.5, batch_first=True).train(training)
    x = torch.randn(3, T, 8, generator=_gen())
    torch.manual_seed(5)
    expected = layer(x, x, x, need_weights=need_weights)
    torch.manual_seed(5)
    (ours, weights), _ = call(layer, (x, x, x), {"need_weights": need_weights})
    torch.testing.assert_close(ours, expected[0], rtol=0, atol=0)
    if need_weights:
        torch.testing.assert_close(weights, expected[1], rtol=0, atol=0)


def test_every_parameter_of_the_layer_is_in_exactly_one_part():
    layer = nn.MultiheadAttention(8, 2)
    found = [name for part in parts(layer) for name in part.names if name is not None]
    assert sorted(found) == sorted(name for name, _ in layer.named_parameters())
    layer.in_proj_weight.requires_grad_(False)
    layer.in_proj_bias.requires_grad_(False)
    assert [part.names for part in parts(layer)] == [("out_proj.weight", "out_proj.bias")]
    assert parts(layer)[0].weight is layer.out_proj.weight


class _SelfAttention(nn.Module):
    """Self-attention, batch first, and a head; the subclasses' forward says how they call it."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)


class _ChangesItsOutput(_SelfAttention):
    """Attention whose output the model scales in place (a batch-first output is the output
    projection's own tensor): the clipper must keep that product's output as computed."""

    def forward(self, x):
        out, _ = self.attn(x, x, x, need_weights=False)
        return self.head(out.mul_(3.0).mean(1))


def test_an_output_changed_in_place_matches_the_loop():
    torch.manual_seed(0)
    model, (x, y) = _ChangesItsOutput().double(), _batch()
    c, expected, _ = _loop_at_most_clipped(model, "cross_entropy", x, y)
    _assert_same(clipped_gradient_sum(model, "cross_entropy", x, y, max_grad_norm=c), expected)


@pytest.mark.parametrize(
    "options", [{"add_bias_kv": True}, {"add_zero_attn": True}, {"kdim": 4, "vdim": 4}]
)
def test_a_layer_these_products_do_not_compute_falls_back_with_its_out_proj(options):
    """Key and value biases, a zero attention position and key or value sizes other than
    embed_dim are torch's layer's alone: the layer's parameters and its out_proj's take vmap
    over the model from the start, named in one warning, and the sum is still the loop's."""
    torch.manual_seed(0)
    model = _Attending(inputs="memory", batch_first=True, **options).double()
    if "kdim" in options:
        model.memory = nn.Linear(8, 4).double()
    x, y = _batch()
    c, expected, _ = _loop_at_most_clipped(model, "cross_entropy", x, y)
    with pytest.warns(UserWarning, match=r"layer 'attn' \(MultiheadAttention\) reads parameters"):
        clipper = PerExampleClipper(model, loss="cross_entropy")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "There is a performance drop")  # torch's, in vmap
        _assert_same(clipper(x, y, max_grad_norm=c).sums, expected)
    assert all(name.startswith("attn.") for name in clipper.plan.fallback)
    assert not any(isinstance(m, Part) for _, m in clipper.plan.hooked)


class _CalledTwice(_SelfAttention):
    """One attention layer run on the input and again on its own output."""

    def forward(self, x):
        h, _ = self.attn(x, x, x, need_weights=False)
        h, _ = self.attn(h, h, h, need_weights=False)
        return self.head(h.mean(1))


def test_a_layer_called_twice_moves_to_vmap_under_its_parameters_names():
    """Its products' parameters are read twice in the graph: both parts move to vmap over the
    model at the first batch, under the layer's names of their parameters, named once."""
    torch.manual_seed(0)
    model, (x, y) = _CalledTwice().double(), _batch()
    c, expected, _ = _loop_at_most_clipped(model, "cross_entropy", x, y)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clipper = PerExampleClipper(model, loss="cross_entropy")
        sums = clipper(x, y, max_grad_norm=c).sums
    told = [str(w.message) for w in caught if "'attn'" in str(w.message)]
    assert len(told) == 1 and told[0].startswith("layer 'attn' is called more than once")
    names = ["in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"]
    assert clipper.plan.fallback == [f"attn.{name}" for name in names]
    _assert_same(sums, expected)


@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("need_weights", [False, True])
def test_the_causal_hint_is_taken_as_torchs_layer_takes_it(padding, need_weights):
    """``is_causal=True`` with a mask that is not causal (a wrong hint, or a causal mask with
    a bias): torch's layer uses SDPA's own causal mask and drops the given one where nothing is
    merged into it (no padding mask, no weights), and the given mask otherwise."""
    layer = nn.MultiheadAttention(8, 2, batch_first=True).double()
    x = _batch()[0]
    options = {"attn_mask": torch.ones(T, T, dtype=torch.bool).tril(-1), "is_causal": True}
    options["need_weights"] = need_weights
    if padding:
        options["key_padding_mask"] = torch.zeros(B, T, dtype=torch.bool)
    (ours, _), _ = call(layer, (x, x, x), options)
    torch.testing.assert_close(ours, layer(x, x, x, **options)[0], rtol=1e-12, atol=1e-12)


def test_a_call_torchs_layer_refuses_is_left_to_it():
    """The causal hint without a mask, an integer mask, a mask of another shape, an input
    without a batch dimension: torch's layer runs (and says what is wrong, where it is)."""
    layer, x = nn.MultiheadAttention(8, 2, batch_first=True), torch.randn(3, T, 8)
    assert call(layer, (x, x, x), {"is_causal": True}) is None
    assert call(layer, (x, x, x), {"attn_mask": torch.zeros(T, T, dtype=torch.int64)}) is None
    assert call(layer, (x, x, x), {"attn_mask": torch.zeros(T, T + 1)}) is None
    assert call(layer, (x[0], x[0], x[0]), {}) is None
    assert call(layer, (x, x, x), {"attn_mask": torch.zeros(T, T)}) is not None


class _SharedOutProj(_SelfAttention):
    """An attention layer whose out_proj is also registered under another name, before it."""

    def __init__(self):
        super().__init__()
        attn = self.attn
        del self.attn
        self.proj = attn.out_proj  # an alias, as for an initialisation
        self.attn = attn

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))


def test_an_out_proj_registered_twice_falls_back_with_the_attention():
    """Its parameters' names are those of their first place (proj.weight): the attention's
    parts would name them attn.out_proj.weight. The plan sends the attention to vmap."""
    torch.manual_seed(0)
    model, (x, y) = _SharedOutProj().double(), _batch()
    c, expected, _ = _loop_at_most_clipped(model, "cross_entropy", x, y)
    with pytest.warns(UserWarning, match="'attn' shares its parameters"):
        clipper = PerExampleClipper(model, loss="cross_entropy")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "There is a performance drop")  # torch's, in vmap
        _assert_same(clipper(x, y, max_grad_norm=c).sums, expected)
    assert not any(isinstance(m, Part) for _, m in clipper.plan.hooked)


class _Checkpointed(nn.Module):
    """A layer (attention, or ``rnn``) inside torch.utils.checkpoint: its backward pass runs the
    layer's forward again, torch's own, not the one the clipper's hooks put in place."""

    def __init__(self, rnn=False):
        super().__init__()
        self.rnn = rnn
        if rnn:
            self.layer = nn.GRU(8, 8, batch_first=True)
        else:
            self.layer = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        def block(t):
            return self.layer(t)[0] if self.rnn else self.layer(t, t, t, need_weights=False)[0]

        return self.head(checkpoint(block, x, use_reentrant=False).mean(1))


@pytest.mark.parametrize("rnn", [False, True])
@pytest.mark.parametrize("batch", [1, B])
def test_a_layer_of_parts_under_checkpoint_is_refused_not_silently_wrong(rnn, batch):
    """Under saved-tensor hooks the parts take no call: the layer moves to vmap over the model,
    which refuses those hooks with a ValueError. (A GRU's batch of one gave a clipped sum 145%
    off the loop's, without a word, where the checks of the first batches do not run.)"""
    torch.manual_seed(0)
    model, (x, y) = _Checkpointed(rnn).double(), _batch()
    with pytest.warns(UserWarning, match="makes a call its rule does not take"):
        with pytest.raises(ValueError, match="saved tensor hooks"):
            clipped_gradient_sum(model, "cross_entropy", x[:batch], y[:batch], max_grad_norm=0.1)
