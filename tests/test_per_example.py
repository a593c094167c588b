"""Tests of companion.per_example: every rule of the layer table against a plain per-example loop.

The oracle (tests/_oracles.py) runs one forward and one backward pass per example. Models and data
are float64, so the two agree to rounding (about 1e-15 relative over a few dozen examples); the
tolerance of 1e-5 relative leaves a wide margin while a missing clip changes the sum by order 1
(the negative control). The clipping norm is the 20% quantile of the examples' norms, so most
examples are clipped and the test sees the clipping factors.
"""

from __future__ import annotations

import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from _oracles import _assert_same, _loop_at_most_clipped, _loop_clipped_sum, _most_clipped_norm
from torch import nn

from companion.dpsgd import train_dpsgd
from companion.per_example import (
    LAYER_RULES,
    PerExampleClipper,
    check_dp_compatible,
    check_examples_independent,
    clipped_gradient_sum,
    engine,
    gradients,
    layout,
    per_example_gradients,
    rules,
)
from companion.per_example.engine import autograd_graph

B = 12  # examples per batch


def _seeded(build, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().double()


class _TextClassifier(nn.Module):
    """Bag of embeddings: Embedding (with a padding index) -> mean over tokens -> LayerNorm ->
    Linear. Tokens repeat within an example, so the Embedding rule must add their rows."""

    def __init__(self, vocab=20, dim=8, classes=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):
        return self.head(self.norm(self.embed(tokens).mean(dim=1)))


class _BagClassifier(nn.Module):
    """An EmbeddingBag on (B, T) token ids (one bag per example) -> Linear."""

    def __init__(self, mode, vocab=20, padding_idx=None):
        super().__init__()
        self.bag = nn.EmbeddingBag(vocab, 8, mode=mode, padding_idx=padding_idx)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens):
        return self.head(torch.tanh(self.bag(tokens)))


def _padded_tokens(vocab):
    """Token ids whose example 1 is all padding (0) and example 2 mostly: a bag's mean is over
    its other tokens, and an empty bag has no gradient."""
    tokens = torch.randint(1, vocab, (B, 9), generator=_gen())
    tokens[1], tokens[2, :-2] = 0, 0
    return tokens


class _SequenceModel(nn.Module):
    """Linear on sequences (B, T, d), a Conv1d over time, and a LayerNorm over each example's
    whole (channels, time) map: ``LayerNorm([4, 7])``, one position per example."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(5, 6)
        self.conv = nn.Conv1d(6, 4, kernel_size=3, padding="same", padding_mode="reflect")
        self.norm = nn.LayerNorm([4, 7])
        self.head = nn.Linear(28, 2)

    def forward(self, x):
        h = torch.tanh(self.proj(x)).transpose(1, 2)  # (B, 6, T)
        return self.head(self.norm(self.conv(h)).flatten(1))


class _LayerNormOverTime(nn.Module):
    """Linear on sequences (B, T, d), ``LayerNorm(d)`` at each of the T positions, mean over time,
    Linear: an example's LayerNorm gradients are sums over its T = 7 positions (the models above
    have one position per example, where taking one position in place of the sum goes unseen)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(5, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.proj(x))).mean(dim=1))


class _CifarLike(nn.Module):
    """Conv2d variants (groups, dilation, strides, padding modes, no bias) with GroupNorm."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, padding_mode="replicate"),
            nn.GroupNorm(4, 8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding="same", dilation=2, groups=2, bias=False),
            nn.GroupNorm(2, 8, affine=True),
            nn.ReLU(inplace=True),
            nn.Conv2d(8, 4, 2, stride=2, padding_mode="circular", padding=1),
        )
        self.head = nn.Linear(4 * 5 * 5, 5)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


class _DeepConv(nn.Module):
    """Convolutions with many channels on a 2x2 map, whose per-example gradients would take
    several times the memory of the patches: the rule takes the ghost norm (a grouped one and a
    reflect-padded one too)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3),
            nn.Tanh(),
            nn.Conv2d(32, 64, 3, groups=2, padding=1, padding_mode="reflect"),
            nn.Tanh(),
            nn.Conv2d(64, 48, 2, bias=False),
        )
        self.head = nn.Linear(48, 3)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


class _Conv1dGroups(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv1d(4, 6, 3, stride=2, dilation=2, groups=2, padding=2)
        self.b = nn.Conv1d(6, 2, 1, padding_mode="circular")

    def forward(self, x):
        return self.b(torch.relu(self.a(x))).mean(dim=2)


class _Scaled(nn.Module):
    """A hand-written layer holding its own parameter: no rule, so vmap over its call."""

    def __init__(self, dim):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, dim))

    def forward(self, x):
        return x * self.scale


class _Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(10, 6)
        self.scaled = _Scaled(6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.scaled(self.first(x))))


class _Affine(nn.Module):
    """A hand-written layer with a frozen gain and a trainable shift."""

    def __init__(self, dim):
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(1.5, 0.5, dim), requires_grad=False)
        self.shift = nn.Parameter(torch.linspace(-0.2, 0.2, dim))

    def forward(self, x):
        return torch.tanh(x * self.gain + self.shift)


class _OwnLayers(nn.Module):
    """Layers without a rule that hold parameters of their own and no other layer: PReLU with a
    slope per channel, on a (B, C, L) sequence, and with one slope for all; a hand-written scale;
    a layer with a frozen parameter next to a trainable one. Each takes vmap over its own call."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3)
        self.act = nn.PReLU(4, init=0.1)
        self.scaled = _Scaled(12)
        self.affine = _Affine(12)
        self.act2 = nn.PReLU(init=0.2)
        self.out = nn.Linear(12, 3)

    def forward(self, x):
        h = self.scaled(self.act(self.conv(x)).flatten(1))
        return self.out(self.act2(self.affine(h)))


class _Bilinear(nn.Module):
    """An ``nn.Bilinear`` (no rule) called on two inputs: vmap over its call cannot repeat it."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(10, 4)
        self.bilinear = nn.Bilinear(4, 10, 3)

    def forward(self, x):
        return self.bilinear(torch.tanh(self.inp(x)), x)


class _DoublesItsInput(nn.Module):
    """A layer that doubles its input in place, then scales it: vmap over its call, from the
    input the hooks keep (already doubled), would double it again."""

    def __init__(self, dim):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, dim))

    def forward(self, x):
        x.mul_(2.0)
        return x * self.scale


class _ReadsItsValue(nn.Module):
    """A layer whose forward branches on a value (``.item()``), which vmap cannot batch."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x * self.scale if x.sum().item() > -1e9 else -x


class _ScaledBlock(nn.Module):
    """A block holding a Linear and a parameter of its own: no rule computes that parameter,
    and vmap over the block's call would run the Linear's hooks again, so vmap over the model."""

    def __init__(self, dim):
        super().__init__()
        self.lin = nn.Linear(dim, dim)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, dim))

    def forward(self, x):
        return self.lin(x) * self.scale


class _MixedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(10, 6)
        self.block = _ScaledBlock(6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.block(self.first(x))))


class _CalledTwice(nn.Module):
    """One Linear used twice in the forward pass (weight sharing across depth)."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(6, 6)
        self.inp = nn.Linear(10, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.shared(torch.tanh(self.inp(x))))
        return self.out(torch.tanh(self.shared(h)))


class _Tied(nn.Module):
    """An Embedding and an output Linear sharing one weight matrix (tied weights)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(12, 6)
        self.out = nn.Linear(6, 12, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens):
        return self.out(torch.tanh(self.embed(tokens).mean(dim=1)))


class _TiedByHand(nn.Module):
    """An output head written as ``h @ embedding.weight.t()``: the Embedding's weight is read
    by its call and once more outside it."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(12, 6)

    def forward(self, tokens):
        return torch.tanh(self.embed(tokens).mean(dim=1)) @ self.embed.weight.t()


class _BiasReadTwice(nn.Module):
    """A Linear whose bias the forward pass also reads directly."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(10, 3)

    def forward(self, x):
        return self.lin(x) + x[:, :3] * self.lin.bias


class _ShiftedScale(_Scaled):
    """A layer without a rule that reads its parameter twice in its call: the graph check does
    not tell reads in the call from reads outside it, so it moves to vmap over the model."""

    def forward(self, x):
        return x * self.scale + self.scale


class _WeightReadOnly(nn.Module):
    """A Linear that is never called: ``F.linear`` reads its parameters."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(10, 3)

    def forward(self, x):
        return nn.functional.linear(x, self.lin.weight, self.lin.bias)


class _SecondCallDetached(nn.Module):
    """A Linear called twice, its second output cut from the graph: the parameter is read once
    in the graph of the loss, by the first call, which is not the one a rule would see."""

    def __init__(self, no_grad=False):
        super().__init__()
        self.lin = nn.Linear(10, 3)
        self.no_grad = no_grad

    def forward(self, x):
        out = self.lin(x)
        if self.no_grad:
            with torch.no_grad():
                aux = self.lin(x + 1)
        else:
            aux = self.lin(x + 1).detach()
        return out + 0 * aux


class _TiedAfterDetach(nn.Module):
    """A tied head whose embedding call is detached: the weight is read only by the head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(12, 6)
        self.mid = nn.Linear(6, 6)

    def forward(self, tokens):
        h = torch.tanh(self.mid(self.embed(tokens).detach().mean(dim=1)))
        return h @ self.embed.weight.t()


class _KeywordCall(nn.Module):
    """A Linear called with its input as a keyword argument."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(10, 3)

    def forward(self, x):
        return self.lin(input=torch.tanh(x))


def _weight_norm():
    """``torch.nn.utils.weight_norm`` (deprecated, still used): the Linear's trainable parameters
    are ``weight_g``, ``weight_v`` and ``bias``, and ``weight`` is computed from the first two."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return nn.Sequential(nn.utils.weight_norm(nn.Linear(10, 3)))


def _frozen(model, name):
    for p in getattr(model, name).parameters():
        p.requires_grad_(False)
    return model


def _bitfit(model, *names):
    """Freeze the weight of each named layer and train its bias, as BitFit does (Ben Zaken et al.,
    2022): the rules must then give the bias alone."""
    for name in names:
        model.get_submodule(name).weight.requires_grad_(False)
    return model


def _gen(seed=1):
    return torch.Generator().manual_seed(seed)


def _classes(n, k, seed=2):
    return torch.randint(0, k, (n,), generator=_gen(seed))


FAST = {
    "text_embedding_layernorm": (
        lambda: _seeded(_TextClassifier),
        lambda: (torch.randint(0, 20, (B, 9), generator=_gen()), _classes(B, 3)),
        "cross_entropy",
    ),
    "embedding_bag_sum_repeated_tokens": (
        lambda: _seeded(lambda: _BagClassifier("sum", vocab=5)),
        lambda: (torch.randint(0, 5, (B, 9), generator=_gen()), _classes(B, 3)),
        "cross_entropy",
    ),
    "embedding_bag_mean_padding": (
        lambda: _seeded(lambda: _BagClassifier("mean", vocab=200, padding_idx=0)),
        lambda: (_padded_tokens(200), _classes(B, 3)),
        "cross_entropy",
    ),
    "linear_on_sequences_conv1d_same_reflect": (
        lambda: _seeded(_SequenceModel),
        lambda: (torch.randn(B, 7, 5, generator=_gen(), dtype=torch.float64), _classes(B, 2)),
        "cross_entropy",
    ),
    "cifar_like_conv2d_variants_groupnorm": (
        lambda: _seeded(_CifarLike),
        lambda: (torch.randn(B, 3, 8, 8, generator=_gen(), dtype=torch.float64), _classes(B, 5)),
        "cross_entropy",
    ),
    "layernorm_over_the_positions_of_a_sequence": (
        lambda: _seeded(_LayerNormOverTime),
        lambda: (torch.randn(B, 7, 5, generator=_gen(), dtype=torch.float64), _classes(B, 2)),
        "cross_entropy",
    ),
    "bitfit_conv2d_groupnorm": (
        lambda: _bitfit(_seeded(_CifarLike), "features.0", "features.1", "features.6"),
        lambda: (torch.randn(B, 3, 8, 8, generator=_gen(), dtype=torch.float64), _classes(B, 5)),
        "cross_entropy",
    ),
    "bitfit_linear_on_sequences_layernorm": (
        lambda: _bitfit(_seeded(_LayerNormOverTime), "proj", "norm"),
        lambda: (torch.randn(B, 7, 5, generator=_gen(), dtype=torch.float64), _classes(B, 2)),
        "cross_entropy",
    ),
    "deep_conv_ghost_norm": (
        lambda: _seeded(_DeepConv),
        lambda: (torch.randn(B, 3, 4, 4, generator=_gen(), dtype=torch.float64), _classes(B, 3)),
        "cross_entropy",
    ),
    "conv1d_groups_dilation_stride": (
        lambda: _seeded(_Conv1dGroups),
        lambda: (torch.randn(B, 4, 11, generator=_gen(), dtype=torch.float64), _classes(B, 2)),
        "cross_entropy",
    ),
    "frozen_embedding": (
        lambda: _frozen(_seeded(_TextClassifier), "embed"),
        lambda: (torch.randint(0, 20, (B, 9), generator=_gen()), _classes(B, 3)),
        "cross_entropy",
    ),
    "linear_called_with_a_keyword": (
        lambda: _seeded(_KeywordCall),
        lambda: (torch.randn(B, 10, generator=_gen(), dtype=torch.float64), _classes(B, 3)),
        "cross_entropy",
    ),
    "regression_mse_callable": (
        lambda: _seeded(lambda: nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))),
        lambda: (
            torch.randn(B, 4, generator=_gen(), dtype=torch.float64),
            torch.randn(B, 2, generator=_gen(3), dtype=torch.float64),
        ),
        nn.MSELoss(),
    ),
}


def _with_hook(model, name):
    """``model`` with a forward hook on layer ``name`` that doubles its output."""
    model.get_submodule(name).register_forward_hook(lambda module, args, out: 2 * out)
    return model


FALLBACK = {
    "parameter_of_a_container": (
        lambda: _seeded(_MixedBlock),
        lambda: (torch.randn(B, 10, generator=_gen(), dtype=torch.float64), _classes(B, 3)),
        r"'block' \(_ScaledBlock\) holds parameters \['scale'\] itself",
    ),
    "layer_without_a_rule_with_a_hook": (
        lambda: _with_hook(_seeded(_Mixed), "scaled"),
        lambda: (torch.randn(B, 10, generator=_gen(), dtype=torch.float64), _classes(B, 3)),
        r"'scaled' \(_Scaled\) has no rule and hooks of its own",
    ),
    "tied_weights": (
        lambda: _seeded(_Tied),
        lambda: (torch.randint(0, 12, (B, 5), generator=_gen()), _classes(B, 12)),
        "'embed' shares its parameters",
    ),
    "embedding_bag_max": (
        lambda: _seeded(lambda: _BagClassifier("max")),
        lambda: (torch.randint(0, 20, (B, 9), generator=_gen()), _classes(B, 3)),
        r"'bag' \(EmbeddingBag\) has mode='max', which its rule does not compute",
    ),
    "weight_norm": (
        lambda: _seeded(_weight_norm),
        lambda: (torch.randn(B, 10, generator=_gen(), dtype=torch.float64), _classes(B, 3)),
        r"'0' \(Linear\) has parameters \['weight_g', 'weight_v'\]",
    ),
}

#: Models whose layers have rules, but whose forward pass reads a parameter of a layer more than
#: once or outside the layer's call: found in the autograd graph of each batch, so these layers
#: fall back to vmap with a warning at the first batch.
READ_OUTSIDE = {
    "layer_called_twice": (_CalledTwice, "'shared'", lambda: torch.randn(B, 10, generator=_gen())),
    "tied_by_hand": (
        _TiedByHand,
        "'embed'",
        lambda: torch.randint(0, 12, (B, 5), generator=_gen()),
    ),
    "bias_read_twice": (_BiasReadTwice, "'lin'", lambda: torch.randn(B, 10, generator=_gen())),
    "weight_read_not_called": (
        _WeightReadOnly,
        "'lin'",
        lambda: torch.randn(B, 10, generator=_gen()),
    ),
    "second_call_detached": (
        _SecondCallDetached,
        "'lin'",
        lambda: torch.randn(B, 10, generator=_gen()),
    ),
    "second_call_without_grad": (
        lambda: _SecondCallDetached(no_grad=True),
        "'lin'",
        lambda: torch.randn(B, 10, generator=_gen()),
    ),
    "tied_after_detach": (
        _TiedAfterDetach,
        "'embed'",
        lambda: torch.randint(0, 12, (B, 5), generator=_gen()),
    ),
    "own_layer_reading_its_parameter_twice": (
        lambda: nn.Sequential(nn.Linear(10, 6), _ShiftedScale(6), nn.Tanh(), nn.Linear(6, 3)),
        "'1'",
        lambda: torch.randn(B, 10, generator=_gen()),
    ),
}


@pytest.mark.parametrize("method", ["layerwise", "auto", "vmap"])
@pytest.mark.parametrize("name", sorted(FAST))
def test_every_rule_matches_the_loop(name, method):
    build, batch, loss = FAST[name]
    model, (x, y) = build(), batch()
    c, expected, loop_norms = _loop_at_most_clipped(model, loss, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no layer of these models falls back to vmap
        warnings.filterwarnings("ignore", "There is a performance drop")  # torch's, in vmap
        sums, norms = clipped_gradient_sum(
            model, loss, x, y, max_grad_norm=c, method=method, return_norms=True
        )
    _assert_same(sums, expected)
    torch.testing.assert_close(norms, loop_norms, rtol=1e-5, atol=0)


@pytest.mark.parametrize("name", sorted(FAST))
def test_negative_control_a_loop_that_forgets_to_clip_differs(name):
    build, batch, loss = FAST[name]
    model, (x, y) = build(), batch()
    c, _, _ = _loop_at_most_clipped(model, loss, x, y)
    unclipped, _ = _loop_clipped_sum(model, loss, x, y, c, clip=False)
    sums = clipped_gradient_sum(model, loss, x, y, max_grad_norm=c)
    with pytest.raises(AssertionError):
        _assert_same(sums, unclipped)


@pytest.mark.parametrize("name", sorted(FALLBACK))
def test_mixed_models_fall_back_to_vmap_for_those_layers_only(name):
    build, batch, message = FALLBACK[name]
    model, (x, y) = build(), batch()
    c, expected, loop_norms = _loop_at_most_clipped(model, "cross_entropy", x, y)
    if message is not None:
        with pytest.warns(UserWarning, match=message):
            sums, norms = clipped_gradient_sum(
                model, "cross_entropy", x, y, max_grad_norm=c, return_norms=True
            )
        with pytest.raises(ValueError, match=f"method='layerwise' does not apply: layer {message}"):
            clipped_gradient_sum(model, "cross_entropy", x, y, max_grad_norm=c, method="layerwise")
    else:
        sums, norms = clipped_gradient_sum(
            model, "cross_entropy", x, y, max_grad_norm=c, return_norms=True
        )
    _assert_same(sums, expected)
    torch.testing.assert_close(norms, loop_norms, rtol=1e-5, atol=0)


@pytest.mark.parametrize("method", ["auto", "layerwise"])
@pytest.mark.parametrize("name", sorted(READ_OUTSIDE))
def test_a_parameter_read_outside_its_layers_call_falls_back_to_vmap(name, method):
    """Without the graph check, the rules gave these parameters the gradient of the layer's call
    alone: 74% off for the tied head, 97% for the bias read twice, and noise only (no gradient)
    for the weight read by ``F.linear``. A layer whose output does not reach the loss has no
    gradient from its call, so a read of its parameter elsewhere sends it to vmap too (before
    the output check, a detached second call of a layer zeroed its gradients)."""
    build, layer, inputs = READ_OUTSIDE[name]
    model, x = _seeded(build), inputs()
    x = x.double() if x.is_floating_point() else x
    y = _classes(B, 12 if name.startswith("tied") else 3)
    c, expected, loop_norms = _loop_at_most_clipped(model, "cross_entropy", x, y)
    with pytest.warns(UserWarning, match=f"layer {layer} is called more than once, or has a "):
        sums, norms = clipped_gradient_sum(
            model, "cross_entropy", x, y, max_grad_norm=c, method=method, return_norms=True
        )
    _assert_same(sums, expected)
    torch.testing.assert_close(norms, loop_norms, rtol=1e-5, atol=0)


def test_a_rules_input_and_output_gradient_are_released_once_it_returns(monkeypatch):
    """The convolution rule keeps per-example gradients, not the layer's input and output
    gradient: those are freed as the rule returns, not held until every rule has run (the CIFAR
    benchmark's step: 238.7 to 200.3 MiB of tensors). When the second Conv2d's rule starts, the
    tensors the first one got must be dead."""
    given, alive, conv_rule = [], [], rules.LAYER_RULES[nn.Conv2d]

    def watched(layer, a, b):
        alive.append(sum(ref() is not None for ref in given))
        given.extend((weakref.ref(a), weakref.ref(b)))
        return conv_rule(layer, a, b)

    monkeypatch.setitem(rules.LAYER_RULES, nn.Conv2d, watched)
    model = _seeded(
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Conv2d(3, 2, 3), nn.Flatten(), nn.Linear(8, 3)
        )
    )
    x, y = torch.randn(B, 2, 6, 6, generator=_gen(), dtype=torch.float64), _classes(B, 3)
    c, expected, _ = _loop_at_most_clipped(model, "cross_entropy", x, y)
    _assert_same(clipped_gradient_sum(model, "cross_entropy", x, y, max_grad_norm=c), expected)
    assert alive == [0, 0]


def test_small_layers_above_another_take_their_rules_in_the_backward_pass(monkeypatch):
    """A layer above another hooked layer, whose per-example gradients take no more room than
    its input and output gradient, has its rule run as soon as the backward pass reaches its
    output, so that those are not held until the pass ends (the transformer benchmark's step:
    44.6 to 36.9 MiB of tensors). Here the LayerNorm (12 parameters; 6 inputs and 6 outputs an
    example) takes its rule during the pass; the two Linears, after it, in the layers' order:
    the lowest is asked of autograd, and the head's gradients (21 an example) are larger than
    its input and output (9). When the lowest Linear's rule runs, the LayerNorm's input (as the
    engine keeps it) and its output gradient must be dead."""
    calls, norm_input, norm_grad = [], [], []
    linear_rule, norm_rule = rules.LAYER_RULES[nn.Linear], rules.LAYER_RULES[nn.LayerNorm]

    def watched_linear(layer, a, b):
        calls.append((layer, sum(ref() is not None for ref in norm_input + norm_grad)))
        return linear_rule(layer, a, b)

    def watched_norm(layer, a, b):
        calls.append((layer, None))
        norm_grad.append(weakref.ref(b))
        return norm_rule(layer, a, b)

    keep = layout.Capture._keep

    def watched_keep(capture, module, args, kwargs, output):
        kept = keep(capture, module, args, kwargs, output)
        if isinstance(module, nn.LayerNorm):  # the input the engine holds, from the last pass
            norm_input[:] = [weakref.ref(capture.seen[module][0])]
        return kept

    monkeypatch.setitem(rules.LAYER_RULES, nn.Linear, watched_linear)
    monkeypatch.setitem(rules.LAYER_RULES, nn.LayerNorm, watched_norm)
    monkeypatch.setattr(layout.Capture, "_keep", watched_keep)
    model = _seeded(
        lambda: nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.LayerNorm(6), nn.Linear(6, 3))
    )
    x, y = torch.randn(B, 4, generator=_gen(), dtype=torch.float64), _classes(B, 3)
    c, expected, _ = _loop_at_most_clipped(model, "cross_entropy", x, y)
    _assert_same(clipped_gradient_sum(model, "cross_entropy", x, y, max_grad_norm=c), expected)
    assert calls == [(model[2], None), (model[0], 0), (model[3], 0)]


class _HookedOutput(nn.Module):
    """Linear -> Tanh -> LayerNorm -> Linear, whose forward hooks the output tensor of one layer
    (``where``) to triple its gradient: that layer's backward, and so its parameters' gradients,
    get the tripled one."""

    def __init__(self, where):
        super().__init__()
        self.where = where
        self.lin, self.norm, self.head = nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3)

    def forward(self, x):
        z = self._hooked("lin", self.lin(x))
        z = self._hooked("norm", self.norm(torch.tanh(z)))
        return self._hooked("head", self.head(z))

    def _hooked(self, name, z):
        if name == self.where and z.requires_grad:
            z.register_hook(lambda g: 3 * g)
        return z


@pytest.mark.parametrize("where", ["lin", "norm", "head"])
def test_a_hook_on_a_layers_output_tensor_reaches_its_rule(where):
    """autograd.grad gives the gradient of an edge whose node it still runs without the hooks on
    its tensor; the engine reads every layer above another in a hook on its node, after those.
    Before, the LayerNorm's and the head's sums were off by up to 0.2, silently."""
    model = _seeded(lambda: _HookedOutput(where))
    x, y = torch.randn(B, 4, generator=_gen(), dtype=torch.float64), _classes(B, 3)
    c, expected, loop_norms = _loop_at_most_clipped(model, "cross_entropy", x, y)
    sums, norms = clipped_gradient_sum(
        model, "cross_entropy", x, y, max_grad_norm=c, return_norms=True
    )
    _assert_same(sums, expected)
    torch.testing.assert_close(norms, loop_norms, rtol=1e-5, atol=0)


class _Weighted(nn.Module):
    """``x * weight``, per feature: a layer named as the rules name parameters, with no rule of
    its own (a test gives it one)."""

    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, n))

    def forward(self, x):
        return x * self.weight


@pytest.mark.parametrize("changed", ["a", "b"])
def test_a_rule_that_changes_its_input_or_output_gradient_is_refused(changed, monkeypatch):
    """A small layer's rule runs in the backward pass, which still reads the layer's input and
    output gradient. A rule that changed one in place gave the layers below wrong gradients
    (b, silently) or torch's error about a saved tensor (a); now a clear error names it."""

    def rule(layer, a, b):
        return [gradients.materialised("weight", a.mul_(b) if changed == "a" else b.mul_(a))]

    monkeypatch.setitem(rules.LAYER_RULES, _Weighted, rule)
    model = _seeded(
        lambda: nn.Sequential(nn.Linear(4, 6), nn.Tanh(), _Weighted(6), nn.Linear(6, 3))
    )
    x, y = torch.randn(B, 4, generator=_gen(), dtype=torch.float64), _classes(B, 3)
    with pytest.raises(ValueError, match="the rule for _Weighted changed its input or output g"):
        clipped_gradient_sum(model, "cross_entropy", x, y, max_grad_norm=1.0)


@pytest.mark.parametrize("method", ["auto", "layerwise"])
def test_layers_without_a_rule_take_vmap_over_their_own_call(method):
    """PReLU and hand-written layers (_OwnLayers) match the loop, with one warning naming them,
    and none of their parameters goes to vmap over the model; the negative control differs."""
    model = _seeded(_OwnLayers)
    x, y = torch.randn(B, 2, 5, generator=_gen(), dtype=torch.float64), _classes(B, 3)
    c, expected, loop_norms = _loop_at_most_clipped(model, "cross_entropy", x, y)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clipper = PerExampleClipper(model, loss="cross_entropy", method=method)
        clipped = clipper(x, y, max_grad_norm=c)
    assert [str(w.message) for w in caught] == [
        "layer 'act' (PReLU), 'scaled' (_Scaled), 'affine' (_Affine), 'act2' (PReLU) has no rule: "
        "vmap over its own call computes its per-example gradients, which is slower than a rule; "
        "the result is the same."
    ]
    assert clipper.plan.fallback == [] and caught[0].filename == __file__
    _assert_same(clipped.sums, expected)
    torch.testing.assert_close(clipped.norms, loop_norms, rtol=1e-5, atol=0)
    with pytest.raises(AssertionError):
        _assert_same(
            clipped.sums, _loop_clipped_sum(model, "cross_entropy", x, y, c, clip=False)[0]
        )


def test_a_model_that_is_itself_a_layer_without_a_rule_is_called_the_model():
    """Its name is '', which the warnings printed as "layer ''"."""
    model = _seeded(lambda: _ShiftedScale(3)).double()
    x, y = torch.randn(B, 3, generator=_gen(), dtype=torch.float64), _classes(B, 3)
    c, expected, _ = _loop_at_most_clipped(model, "cross_entropy", x, y)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sums = clipped_gradient_sum(model, "cross_entropy", x, y, max_grad_norm=c)
    assert [str(w.message).split(":")[0] for w in caught] == [
        "the model (_ShiftedScale) has no rule",
        "the model is called more than once, or has a parameter read more than once in its call "
        "or outside it",
    ]
    _assert_same(sums, expected)


@pytest.mark.parametrize("method", ["auto", "layerwise"])
def test_a_layer_called_on_two_inputs_falls_back_to_vmap_over_the_model(method):
    """vmap over a layer's call repeats a call of one tensor to one tensor; nn.Bilinear takes
    two, so the first batch moves it to vmap over the whole model, with a warning."""
    model = _seeded(_Bilinear)
    x, y = torch.randn(B, 10, generator=_gen(), dtype=torch.float64), _classes(B, 3)
    c, expected, loop_norms = _loop_at_most_clipped(model, "cross_entropy", x, y)
    with pytest.warns(UserWarning, match="layer 'bilinear' takes or returns more than one tensor"):
        sums, norms = clipped_gradient_sum(
            model, "cross_entropy", x, y, max_grad_norm=c, method=method, return_norms=True
        )
    _assert_same(sums, expected)
    torch.testing.assert_close(norms, loop_norms, rtol=1e-5, atol=0)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled_block"])
@pytest.mark.parametrize("method", ["auto", "layerwise"])
def test_a_layer_changing_its_input_in_place_falls_back_to_vmap_over_the_model(method, compiled):
    """The kept input of a layer that changes it in place is not what the call read: repeated
    from it, the call gives another output, so the first batch moves the layer to vmap over the
    whole model, with a warning. In a compiled block (aot_eager, no C compiler needed) the hooks
    run only while dynamo traces, so only the repeated call's output shows the change (without
    that check the layer got twice its gradient, and the others wrong clipping factors), unless
    the compiled graph hides the block's outputs' gradients, which moves its layers too."""

    torch._dynamo.reset()  # no decision of an earlier compile about the hooks' code

    def build():
        block = nn.Sequential(nn.Linear(6, 6), _DoublesItsInput(6))
        block = torch.compile(block, backend="aot_eager") if compiled else block
        return nn.Sequential(nn.Linear(10, 6), nn.Tanh(), block, nn.Tanh(), nn.Linear(6, 3))

    model = _seeded(build)
    x, y = torch.randn(B, 10, generator=_gen(), dtype=torch.float64), _classes(B, 3)
    c, expected, loop_norms = _loop_at_most_clipped(model, "cross_entropy", x, y)
    moved = "gives another output when its call is repeated|autograd does not give"
    with pytest.warns(UserWarning, match=moved):
        sums, norms = clipped_gradient_sum(
            model, "cross_entropy", x, y, max_grad_norm=c, method=method, return_norms=True
        )
    _assert_same(sums, expected)
    torch.testing.assert_close(norms, loop_norms, rtol=1e-5, atol=0)


class _DoublesTheBatch(nn.Module):
    """Doubles its input, the batch itself, in place, then a Linear (or a layer without a rule,
    which takes a second pass over the model, if ``own_layer``)."""

    def __init__(self, own_layer):
        super().__init__()
        self.own = _DoublesItsInput(10) if own_layer else None
        self.lin = nn.Linear(10, 3)

    def forward(self, x):
        return self.lin(self.own(x) if self.own is not None else x.mul_(2.0))


@pytest.mark.parametrize("own_layer", [False, True], ids=["one_pass", "second_pass"])
@pytest.mark.parametrize("method", ["auto", "layerwise", "vmap"])
def test_a_model_changing_the_batch_in_place_is_refused_where_a_pass_would_read_it(
    method, own_layer
):
    """One pass over the model reads the batch as it was; a second (vmap over the model, for the
    layer without a rule here) would read it doubled, and gave that layer's parameter a gradient
    95% off. So a second pass after the batch changed raises a ValueError; one pass matches the
    loop (which gives each example its own copy of the batch's row to change)."""
    model = _seeded(lambda: _DoublesTheBatch(own_layer))
    x, y = torch.randn(B, 10, generator=_gen(), dtype=torch.float64), _classes(B, 3)
    _, norms = _loop_clipped_sum(model, "cross_entropy", x.clone(), y, 1.0)  # each a fresh copy
    c = _most_clipped_norm(norms)
    expected, loop_norms = _loop_clipped_sum(model, "cross_entropy", x.clone(), y, c)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the layer without a rule, named
        if own_layer and method != "vmap":
            with pytest.raises(ValueError, match="the model changes its input in place"):
                clipped_gradient_sum(model, "cross_entropy", x, y, max_grad_norm=c, method=method)
            return
        sums, norms = clipped_gradient_sum(
            model, "cross_entropy", x, y, max_grad_norm=c, method=method, return_norms=True
        )
    _assert_same(sums, expected)
    torch.testing.assert_close(norms, loop_norms, rtol=1e-5, atol=0)


class _ShiftsTheTokens(nn.Module):
    """Shifts its token ids, the batch itself, in place (mod 12), then an Embedding."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(12, 6), nn.Linear(6, 3)

    def forward(self, t):
        return self.head(torch.tanh(self.embed(t.add_(1).remainder_(12))).mean(dim=1))


@pytest.mark.parametrize("method", ["auto", "layerwise", "vmap"])
def test_a_model_changing_its_token_ids_in_place_matches_the_loop(method):
    """The layout check of the first batches ran the model on the batch's own integer rows, not
    a copy (as it did for floating-point inputs): the step then read them shifted twice, and
    the sums were 151% off the loop (a second review)."""
    model = _seeded(_ShiftsTheTokens)
    t, y = torch.randint(0, 12, (B, 5), generator=_gen()), _classes(B, 3)
    _, norms = _loop_clipped_sum(model, "cross_entropy", t.clone(), y, 1.0)  # each a fresh copy
    c = _most_clipped_norm(norms)
    expected, loop_norms = _loop_clipped_sum(model, "cross_entropy", t.clone(), y, c)
    sums, norms = clipped_gradient_sum(
        model, "cross_entropy", t, y, max_grad_norm=c, method=method, return_norms=True
    )
    _assert_same(sums, expected)
    torch.testing.assert_close(norms, loop_norms, rtol=1e-5, atol=0)


class _Gate(nn.Module):
    """Scales its input by a parameter and by a gate its parent sets as an attribute for the
    batch (FiLM-style conditioning): the call reads more than its input."""

    def __init__(self, dim):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, dim))
        self.gate = None

    def forward(self, x):
        return x * self.scale * torch.sigmoid(self.gate)


class _Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.cond, self.out = nn.Linear(10, 6), nn.Linear(10, 6), nn.Linear(6, 3)
        self.gated = _Gate(6)

    def forward(self, x):
        self.gated.gate = self.cond(x)
        return self.out(torch.tanh(self.gated(self.inp(x))))


def _prelu_net():
    return nn.Sequential(nn.Linear(10, 6), nn.PReLU(6, init=0.1), nn.Linear(6, 3))


def _tripled_prelu_inputs():
    """A global forward pre-hook that triples every PReLU's input (its handle)."""
    return nn.modules.module.register_module_forward_pre_hook(
        lambda module, args: (3 * args[0],) if isinstance(module, nn.PReLU) else None
    )


@pytest.mark.parametrize("case", ["state set by the parent", "hook added", "global pre-hook"])
def test_a_call_that_reads_more_than_its_input_falls_back_to_vmap_over_the_model(case):
    """vmap over a layer's call repeats it from the input the hooks kept. A call that reads more
    (a gate its parent set for the whole batch, a hook added after the clipper was built, a
    global pre-hook that rescales the input again) gives another output when repeated: the layer
    moves to vmap over the whole model, with a warning, and the sums match the loop. (Before the
    outputs were compared, the gate gave a misleading error and the hooks twice or three times
    the PReLU's gradient, silently.)"""
    model = _seeded(_Gated if case == "state set by the parent" else _prelu_net)
    x, y = torch.randn(B, 10, generator=_gen(), dtype=torch.float64) - 0.5, _classes(B, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the layer's one-time "has no rule" warning
        clipper = PerExampleClipper(model, loss="cross_entropy")
    handle = None
    if case == "hook added":
        handle = model[1].register_forward_hook(lambda module, args, out: 2 * out)
    elif case == "global pre-hook":
        handle = _tripled_prelu_inputs()
    try:
        c, expected, loop_norms = _loop_at_most_clipped(model, "cross_entropy", x, y)
        with pytest.warns(UserWarning, match="gives another output when its call is repeated"):
            clipped = clipper(x, y, max_grad_norm=c)
    finally:
        if handle is not None:
            handle.remove()
    _assert_same(clipped.sums, expected)
    torch.testing.assert_close(clipped.norms, loop_norms, rtol=1e-5, atol=0)


class _Masked(_Scaled):
    """A scale, then -inf at every third unit (a masked softmax's scores follow)."""

    def forward(self, x):
        return (x * self.scale).masked_fill(torch.arange(x.shape[1]) % 3 == 0, float("-inf"))


def test_a_repeated_call_may_give_infinite_and_empty_outputs():
    """-inf entries come back as -inf (their difference is NaN, so they are compared exactly):
    the layer keeps vmap over its call and matches the loop. An output with no entries is the
    same output again (the tolerance is 0, not an error)."""
    model = _seeded(
        lambda: nn.Sequential(nn.Linear(10, 6), _Masked(6), nn.Softmax(dim=1), nn.Linear(6, 3))
    )
    x, y = torch.randn(B, 10, generator=_gen(), dtype=torch.float64), _classes(B, 3)
    c, expected, loop_norms = _loop_at_most_clipped(model, "cross_entropy", x, y)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sums, norms = clipped_gradient_sum(
            model, "cross_entropy", x, y, max_grad_norm=c, return_norms=True
        )
    assert [str(w.message)[:30] for w in caught] == ["layer '1' (_Masked) has no rul"]
    _assert_same(sums, expected)
    torch.testing.assert_close(norms, loop_norms, rtol=1e-5, atol=0)
    empty = torch.zeros(B, 0, dtype=torch.float64)
    [(name, squares, _)] = rules.vmap_over_call(_Scaled(0).double(), empty, empty, empty)
    assert name == "scale" and torch.equal(squares, torch.zeros(B, dtype=torch.float64))


def test_the_repeated_call_must_give_the_kept_output_to_within_the_square_root_of_eps():
    """One entry of the kept output moved by 1e-3 of its largest finite entry is not what the
    call gives (the tolerance is sqrt(eps) = 1.5e-8 of it in float64): None, and the caller
    moves the layer. Moved by 1e-10 of it, it is rounding: accepted. The -inf entries of the
    mask count in neither the tolerance (it would be infinite) nor the difference."""
    layer = _Masked(6).double()
    a = torch.randn(B, 6, generator=_gen(), dtype=torch.float64)
    b = torch.randn(B, 6, generator=_gen(3), dtype=torch.float64)
    output = layer(a).detach()
    largest = float(output[output.isfinite()].abs().max())
    for change, accepted in [(1e-3, False), (1e-10, True)]:
        kept = output.clone()
        kept[0, 1] += change * largest  # a finite entry: the mask is on units 0 and 3
        assert (rules.vmap_over_call(layer, a, b, kept) is not None) == accepted


def test_a_layer_with_a_random_draw_falls_back_to_vmap_over_the_model():
    """Repeated, a layer's random draw would differ from the one its output gradient came from:
    vmap over its call refuses random operations, and the layer moves to vmap over the model,
    whose draws are each example's own (as for any random layer under vmap)."""

    class _DropScaled(_Scaled):
        def forward(self, x):
            return F.dropout(x, 0.5, self.training) * self.scale

    model = _seeded(lambda: nn.Sequential(nn.Linear(10, 6), _DropScaled(6), nn.Linear(6, 3)))
    x, y = torch.randn(B, 10, generator=_gen(), dtype=torch.float64), _classes(B, 3)
    with pytest.warns(UserWarning, match="layer '1' gives another output when its call is rep"):
        clipped_gradient_sum(model, "cross_entropy", x, y, max_grad_norm=1.0)


def test_a_layer_vmap_cannot_batch_gets_a_value_error_naming_it():
    """vmap over the call of a layer without a rule fails as vmap over the model would, and the
    error names the layer, not its parameters."""
    model = _seeded(lambda: nn.Sequential(nn.Linear(10, 3), _ReadsItsValue()))
    x, y = torch.randn(B, 10, generator=_gen(), dtype=torch.float64), _classes(B, 3)
    with pytest.raises(ValueError, match=r"vmap cannot compute .* layer\(s\) 1: .*\.item\(\)"):
        clipped_gradient_sum(model, "cross_entropy", x, y, max_grad_norm=1.0)


class _CellLoop(nn.Module):
    """A GRUCell run over the time steps, from an initial state made in forward."""

    def __init__(self, new_zeros: bool) -> None:
        super().__init__()
        self.new_zeros = new_zeros
        self.cell = nn.GRUCell(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = (x.shape[0], 5)
        h = x.new_zeros(size) if self.new_zeros else torch.zeros(size, dtype=x.dtype)
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
        return self.head(h)


def test_a_recurrent_cell_from_a_state_made_by_torch_zeros_gets_the_fix():
    """The coursework trial's F7: vmap cannot batch a GRUCell's state made by torch.zeros, and
    the message spoke of a cell "without an initial state" only; it now names torch.zeros and
    the fix, x.new_zeros, with which the clipped sum is the loop's."""
    x, y = torch.randn(B, 3, 4, generator=_gen(), dtype=torch.float64), _classes(B, 3)
    model = _seeded(lambda: _CellLoop(new_zeros=False).double())
    with pytest.raises(ValueError, match=r"layer\(s\) cell: .*made by torch.zeros .*new_zeros"):
        clipped_gradient_sum(model, "cross_entropy", x, y, max_grad_norm=1.0)
    model = _seeded(lambda: _CellLoop(new_zeros=True).double())
    expected, _ = _loop_clipped_sum(model, "cross_entropy", x, y, 1.0)
    with pytest.warns(UserWarning, match="layer 'cell' takes or returns more than one tensor"):
        sums = clipped_gradient_sum(model, "cross_entropy", x, y, max_grad_norm=1.0)
    _assert_same(sums, expected)


def test_a_clipper_names_a_layer_that_falls_back_once_pointing_at_the_caller():
    """The fallback is found on every batch; the warning comes once per clipper (Python's own
    once-per-line filter is reset whenever a library changes the filters), at the caller."""
    build, _, inputs = READ_OUTSIDE["layer_called_twice"]
    clipper = PerExampleClipper(_seeded(build), loss="cross_entropy")
    x, y = inputs().double(), _classes(B, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            clipper(x, y, max_grad_norm=1.0)
    assert [str(w.message)[:31] for w in caught] == ["layer 'shared' is called more t"]
    assert caught[0].filename == __file__


def test_autograd_graph_counts_the_reads_of_each_leaf_and_lists_the_operations():
    w, b = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)
    frozen = torch.ones(3)
    h = w * 2 + b
    cut = (w * 5).detach()
    loss = (h * w).sum() + (h * h).sum() + (frozen * 3).sum() + cut.sum()  # w read twice, b once
    reads, nodes = autograd_graph(loss)
    assert (reads[id(w)], reads[id(b)], reads[id(frozen)]) == (2, 1, 0)
    assert h.grad_fn in nodes and loss.grad_fn in nodes
    assert autograd_graph(torch.ones(())) == ({}, set())  # no graph


def test_the_fallback_computes_only_the_unsupported_parameters_with_vmap():
    """The plan hooks the three Linear layers and sends only 'block.scale' to vmap."""
    with pytest.warns(UserWarning):
        clipper = PerExampleClipper(_seeded(_MixedBlock), loss="cross_entropy")
    assert [name for name, _ in clipper.plan.hooked] == ["first", "block.lin", "out"]
    assert clipper.plan.fallback == ["block.scale"]


def test_the_known_fallback_runs_before_the_hooked_pass(monkeypatch):
    """The parameters known to fall back ('block.scale') get their vmap pass before the hooked
    pass, so that the two passes' tensors are not alive together (after the rules, it ran with
    every layer's input and output gradient alive). The order is watched at the last layer: a
    call on a plain tensor is the hooked pass (the vmap pass's calls see functorch's wrapped
    tensors); the first batches run the layout check first, which calls the model too (and
    without gradients, for the outputs' check, not watched)."""
    with pytest.warns(UserWarning):
        clipper = PerExampleClipper(_seeded(_MixedBlock), loss="cross_entropy")
    events, vmap_gradients = [], engine.vmap_gradients

    def watch(module, args):
        wrapped = torch._C._functorch.is_functorch_wrapped_tensor(args[0])
        if not wrapped and torch.is_grad_enabled():
            events.append("model")

    def vmap_watched(*args):
        events.append("vmap")
        return vmap_gradients(*args)

    clipper.model.out.register_forward_pre_hook(watch)
    monkeypatch.setattr(engine, "vmap_gradients", vmap_watched)
    x = torch.randn(B, 10, dtype=torch.float64, generator=_gen())
    for _ in range(2):
        clipper(x, _classes(B, 3), max_grad_norm=1.0)
    assert events == ["model", "vmap", "model"] * 2  # layout check, fallback, hooked pass


def test_a_model_changing_a_kept_tensor_in_place_runs_again_with_copies_from_then_on():
    """ReLU(inplace=True) changes the first Linear's output, which the hooks keep, in place: the
    first batch runs the model a second time with copies, after freeing the first pass's output;
    later batches run it once, with copies. Batches of one example (the layout check of the first
    batches, which runs the model too, needs two); the sums against the loop."""

    def build():
        return nn.Sequential(nn.Linear(10, 6), nn.ReLU(inplace=True), nn.Linear(6, 3))

    x, y = torch.randn(1, 10, dtype=torch.float64, generator=_gen()), _classes(1, 3)
    expected, _ = _loop_clipped_sum(_seeded(build), "cross_entropy", x, y, 0.1)
    model = _seeded(build)
    clipper = PerExampleClipper(model, loss="cross_entropy")
    outputs, alive_at_start = [], []
    model.register_forward_pre_hook(
        lambda module, args: alive_at_start.append(sum(ref() is not None for ref in outputs))
    )
    model.register_forward_hook(lambda module, args, out: outputs.append(weakref.ref(out)))
    for _ in range(3):
        _assert_same(clipper(x, y, max_grad_norm=0.1).sums, expected)
    assert alive_at_start == [0, 0, 0, 0]  # two passes for the first batch, then one


def test_the_table_covers_the_layers_the_book_promises():
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding, nn.EmbeddingBag, nn.LayerNorm)
    for kind in (*kinds, nn.GroupNorm):
        assert kind in LAYER_RULES


def test_check_dp_compatible_lists_every_offending_layer():
    model = nn.Sequential(
        nn.Linear(4, 4),
        nn.BatchNorm1d(4),
        nn.InstanceNorm1d(4, track_running_stats=True),
        nn.Embedding(5, 4, scale_grad_by_freq=True),
        nn.Embedding(5, 4, max_norm=1.0),
        nn.EmbeddingBag(5, 4, scale_grad_by_freq=True),
        nn.EmbeddingBag(5, 4, max_norm=1.0),
    )
    parts = (
        "'1' is a BatchNorm1d",
        "'2' is an InstanceNorm1d",
        "'3' is an Embedding with scale_grad_by_freq",
        "'4' is an Embedding with max_norm",
        "'5' is an EmbeddingBag with scale_grad_by_freq",
        "'6' is an EmbeddingBag with max_norm",
    )
    with pytest.raises(ValueError) as error:
        check_dp_compatible(model)
    for part in parts:
        assert part in str(error.value)
    fixes = (
        "use torch.nn.GroupNorm",
        "use track_running_stats=False",
        "use scale_grad_by_freq=False",
        "Use max_norm=None",
    )
    for fix in fixes:  # each fix once, after the list of layers
        assert str(error.value).count(fix) == 1
    with pytest.raises(ValueError) as error:  # per-example gradients need the same
        PerExampleClipper(model, loss="cross_entropy")
    for part in parts:
        assert part in str(error.value)


@pytest.mark.parametrize(
    ("layer", "fix"),
    [
        (nn.BatchNorm1d(4), "use torch.nn.GroupNorm"),
        (nn.InstanceNorm1d(4, track_running_stats=True), "use track_running_stats=False"),
        (nn.Embedding(5, 4, scale_grad_by_freq=True), "use scale_grad_by_freq=False"),
        (nn.Embedding(5, 4, max_norm=1.0), "Use max_norm=None"),
    ],
)
def test_check_dp_compatible_gives_the_fix_of_each_refused_layer_alone(layer, fix):
    """The coursework trial's F6: an Embedding with max_norm got the advice for batch
    normalisation first, its own last; now each refused layer gets its own fix, and no other."""
    with pytest.raises(ValueError) as error:
        check_dp_compatible(nn.Sequential(layer))
    fixes = (
        "use torch.nn.GroupNorm",
        "use track_running_stats=False",
        "use scale_grad_by_freq=False",
        "Use max_norm=None",
    )
    assert [other for other in fixes if other in str(error.value)] == [fix]
    # a frozen pretrained backbone (a coursework trial's case) is told how to use it
    assert ("compute its features once" in str(error.value)) == isinstance(layer, nn.BatchNorm1d)


@pytest.mark.parametrize("kind", ["register_hook", "register_post_accumulate_grad_hook"])
def test_a_gradient_hook_on_a_trainable_parameter_is_refused(kind):
    """The coursework trial's F3: a mask applied by a hook on a weight's gradient (as for
    pruning). A plain backward applies it; the per-example gradients never met it, so the
    masked entries were trained (by 0.54 in two epochs of train_dpsgd), without a word. Now
    every entry point refuses it, a clipper built before the hook too (at its next batch); with
    the hook removed, the clipped sum is the loop's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(8, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    mask = torch.zeros_like(model[0].weight)
    mask[:, :2] = 1
    built = PerExampleClipper(model, loss="cross_entropy")
    if kind == "register_hook":
        handle = model[0].weight.register_hook(lambda g: g * mask)
        F.cross_entropy(model(x), y).backward()
        assert float(model[0].weight.grad[:, 2:].abs().sum()) == 0  # a plain backward masks
    else:
        handle = model[0].weight.register_post_accumulate_grad_hook(lambda p: None)
    message = r"parameter\(s\) \['0.weight'\] have gradient hooks .* Remove them"
    calls = (
        lambda: check_dp_compatible(model),
        lambda: PerExampleClipper(model, loss="cross_entropy"),
        lambda: built(x, y, max_grad_norm=1.0),
        lambda: per_example_gradients(model, "cross_entropy", x, y),
        lambda: train_dpsgd(model, x, y, noise_multiplier=1.0, max_grad_norm=1.0,
                            sample_rate=0.5, epochs=1, delta=1e-3, lr=0.1, seed=0),
    )  # fmt: skip
    for call in calls:
        with pytest.raises(ValueError, match=message):
            call()
    handle.remove()
    expected, _ = _loop_clipped_sum(model, "cross_entropy", x, y, 0.5)
    _assert_same(clipped_gradient_sum(model, "cross_entropy", x, y, max_grad_norm=0.5), expected)


@pytest.mark.parametrize("method", ["layerwise", "vmap"])
@pytest.mark.parametrize(
    "name", ["text_embedding_layernorm", "cifar_like_conv2d_variants_groupnorm"]
)
def test_add_clipped_sum_adds_the_scaled_clipped_sum_into_what_it_is_given(name, method):
    """``add_clipped_sum(into=t, scale=s)`` leaves ``t + s * (clipped sum)``; the clipped sum is
    the one checked against the loop above, and s = 1/8 is a power of two, so both sides round
    alike and agree to float64 rounding."""
    build, batch, loss = FAST[name]
    model, (x, y) = build(), batch()
    clipper = PerExampleClipper(model, loss=loss, method=method)
    expected, expected_norms = clipper(x, y, max_grad_norm=0.5)
    start = {n: torch.full_like(p, 3.0) for n, p in model.named_parameters() if p.requires_grad}
    into = {n: t.clone() for n, t in start.items()}
    norms = clipper.add_clipped_sum(x, y, max_grad_norm=0.5, into=into, scale=0.125)
    for name, value in into.items():
        torch.testing.assert_close(value, start[name] + 0.125 * expected[name])
    torch.testing.assert_close(norms, expected_norms)
    last = list(into)[-1]
    with pytest.raises(ValueError, match=rf"into lacks the trainable parameter\(s\) \['{last}'\]"):
        clipper.add_clipped_sum(x, y, max_grad_norm=0.5, into={n: into[n] for n in list(into)[:-1]})


def test_a_convolution_over_several_chunks_matches_the_loop():
    """The convolution rule computes the per-example gradients in chunks (of 64 examples);
    two chunks and 6 examples make two full chunks and a partial one, each of which must line up
    with its clipping factors (a shifted or dropped chunk changes the sum by order 1)."""

    def build():
        return nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(144, 3)
        )

    model = _seeded(build)
    batch = 2 * rules._CONV_CHUNK + 6
    x = torch.randn(batch, 3, 6, 6, generator=_gen(), dtype=torch.float64)
    y = _classes(batch, 3)
    c, expected, loop_norms = _loop_at_most_clipped(model, "cross_entropy", x, y)
    sums, norms = clipped_gradient_sum(
        model, "cross_entropy", x, y, max_grad_norm=c, method="layerwise", return_norms=True
    )
    _assert_same(sums, expected)
    torch.testing.assert_close(norms, loop_norms, rtol=1e-5, atol=0)


@pytest.mark.parametrize("repeats", ["no token repeated", "tokens repeated three times"])
def test_the_embedding_rule_matches_the_loop_with_and_without_repeated_tokens(repeats):
    """An example's Embedding gradient row for a token it holds several times is the sum of those
    positions' output gradients. The rule has one branch for few repeats and one for many (every
    token three times); both against the loop. The model reads the positions in order, so each
    position has its own output gradient (a mean over positions would give them all the same one
    and hide rows added to the wrong token); token ids recur across examples, whose rows the rule
    must not add together."""

    def build():
        return nn.Sequential(nn.Embedding(20, 4, padding_idx=0), nn.Flatten(), nn.Linear(36, 3))

    model = _seeded(build)
    if repeats == "no token repeated":
        x = torch.stack([torch.randperm(20, generator=_gen(i))[:9] for i in range(B)])
        assert all(len(set(row.tolist())) == 9 for row in x)
    else:
        first = torch.randint(0, 18, (B, 1), generator=_gen())  # examples share some tokens
        x = first + torch.arange(3).repeat_interleave(3)  # t t t t+1 t+1 t+1 t+2 t+2 t+2
        x = x[:, torch.randperm(9, generator=_gen())]
    y = _classes(B, 3)
    c, expected, loop_norms = _loop_at_most_clipped(model, "cross_entropy", x, y)
    sums, norms = clipped_gradient_sum(
        model, "cross_entropy", x, y, max_grad_norm=c, method="layerwise", return_norms=True
    )
    _assert_same(sums, expected)
    torch.testing.assert_close(norms, loop_norms, rtol=1e-5, atol=0)


@pytest.mark.parametrize("bound", [7, 2**62], ids=["packed into int64", "too large to pack"])
def test_the_embedding_rules_sort_is_torchs_stable_sort(bound):
    """The Embedding rule sorts its (example, token) keys on a CPU with numpy, each position
    packed into the low digits of its key; torch's stable sort is the oracle, with many ties (keys
    below 7) so the positions' order within a tie is checked too. A bound too large to pack by
    the 40 positions takes torch's sort itself."""
    keys = torch.randint(0, 7, (40,), generator=_gen())
    got, expected = rules._sort(keys, bound=bound), keys.sort(stable=True)
    assert [t.dtype for t in got] == [torch.int64] * 2
    assert torch.equal(got[0], expected.values) and torch.equal(got[1], expected.indices)
    empty = torch.zeros(0, dtype=torch.int64)
    assert [t.shape for t in rules._sort(empty, bound=bound)] == [(0,), (0,)]


def test_chunks_off_the_cpu_are_larger_by_the_gpu_factor():
    """A chunk holds at most CHUNK_ELEMENTS elements on the CPU (8 examples of an eighth of it)
    and GPU_CHUNK_FACTOR (16) times more on another device (a device object is enough: nothing is
    allocated)."""
    per_example = gradients.CHUNK_ELEMENTS // 8

    def bounds(device: str) -> list[tuple[int, int]]:
        parts = gradients.example_chunks(150, per_example, torch.device(device))
        return [(part.start, min(part.stop, 150)) for part in parts]

    assert bounds("cpu") == [(start, min(start + 8, 150)) for start in range(0, 150, 8)]
    assert bounds("cuda") == [(0, 128), (128, 150)]


@pytest.mark.parametrize(
    "name", ["cifar_like_conv2d_variants_groupnorm", "linear_on_sequences_conv1d_same_reflect"]
)
def test_normalisation_rules_in_chunks_of_one_example_match_the_loop(name, monkeypatch):
    """GroupNorm and LayerNorm recompute their normalised input in chunks of examples (of 2**19
    elements, so the test models' batches make one chunk). With one example per chunk, a chunk
    out of line with its examples would change the sum by order 1."""
    monkeypatch.setattr(gradients, "CHUNK_ELEMENTS", 1)
    build, batch, loss = FAST[name]
    model, (x, y) = build(), batch()
    c, expected, loop_norms = _loop_at_most_clipped(model, loss, x, y)
    sums, norms = clipped_gradient_sum(
        model, loss, x, y, max_grad_norm=c, method="layerwise", return_norms=True
    )
    _assert_same(sums, expected)
    torch.testing.assert_close(norms, loop_norms, rtol=1e-5, atol=0)


# --- examples treated independently, and layers vmap cannot handle --------------------------------


class _BatchStandardised(nn.Module):
    """Standardises each feature by the batch's mean and standard deviation: mixes the examples
    (alone, an example's standard deviation is NaN)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin((x - x.mean(dim=0)) / x.std(dim=0))


class _LogitsCentredOverTheBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.lin(x)
        return z - z.mean(dim=0)


@pytest.mark.filterwarnings("ignore:std\\(\\)")  # one example alone
@pytest.mark.parametrize("model", [_BatchStandardised, _LogitsCentredOverTheBatch])
def test_a_forward_pass_that_mixes_examples_is_caught(model):
    x = torch.randn(B, 10, generator=_gen(), dtype=torch.float64)
    with pytest.raises(ValueError, match="depends on the other examples of its batch"):
        check_examples_independent(_seeded(model), x)


class _Leaky(nn.Module):
    """Adds ``c`` times the sum of the other examples' inputs to each example's input. Alone, an
    example gets its input back exactly; in a batch of n examples all equal to 1, every output is
    ``1 + (n - 1) c`` against 1 alone: a difference of ``share = (n - 1) c / (1 + (n - 1) c)`` of
    the batch's largest output, for the c set here (n = 4, the examples the check compares)."""

    def __init__(self, share: float) -> None:
        super().__init__()
        self.c = share / (3 * (1 - share))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.c * (x.sum(dim=0) - x)


@pytest.mark.parametrize(("share", "refused"), [(0.05, True), (1e-3, False)])
def test_the_independence_check_tolerates_one_percent_of_the_largest_output(share, refused):
    """check_examples_independent refuses outputs of the first 4 examples that differ, together
    and alone, by more than max(1e-2, 8 eps) of the batch's largest output: 1e-2 in float64
    (eps = 2.2e-16). A mixing of 5% lies 5 times above that and must be refused (a tolerance
    loosened to 25% or 90% would let it pass); one of 0.1% lies 10 times below it and must pass, far
    above float64 rounding (an exact comparison, or one at rounding, would refuse it)."""
    x = torch.ones(B, 3, dtype=torch.float64)
    model = _Leaky(share)
    together, alone = model(x[:4]), model(x[:1])  # the derivation in _Leaky's docstring
    assert float((together[0] - alone[0]).abs().max() / together.abs().max()) == pytest.approx(
        share, rel=1e-12
    )
    if refused:
        with pytest.raises(ValueError, match="depends on the other examples of its batch"):
            check_examples_independent(model, x)
    else:
        check_examples_independent(model, x)


@pytest.mark.parametrize("name", sorted(FAST))
def test_models_that_treat_examples_independently_pass(name):
    """Every fast-path model, in float64 and float32 (whose batched and single-example kernels
    round differently) and with dropout, which evaluation mode turns off."""
    build, batch, _ = FAST[name]
    x, _ = batch()
    check_examples_independent(build(), x)
    model, x = build().float(), x.float() if x.is_floating_point() else x
    check_examples_independent(model, x)
    check_examples_independent(nn.Sequential(model, nn.Dropout(0.5)).train(), x)


class _Squeezed(nn.Module):
    """One logit squeezed away: a 0-d output for one example, shape (N,) for a batch."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(10, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).squeeze()


class _DropoutInEvaluation(nn.Module):
    """Monte Carlo dropout: random in evaluation mode, but each example on its own."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.nn.functional.dropout(x, 0.5, training=True))


class _Rounded(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (10 * x).long()


@pytest.mark.parametrize("model", [_Squeezed, _DropoutInEvaluation, _Rounded])
def test_independent_models_of_every_output_shape_and_kind_pass(model):
    """Outputs of another shape for one example (0-d) or of an integer dtype are compared
    flattened; a model random in evaluation mode cannot be compared and passes."""
    check_examples_independent(
        _seeded(model), torch.randn(B, 10, generator=_gen(), dtype=torch.float64)
    )


def test_degenerate_batches_and_outputs():
    check_examples_independent(nn.Linear(3, 2), torch.randn(1, 3))  # nothing to compare
    check_examples_independent(nn.Linear(3, 2), torch.randn(0, 3))
    with pytest.raises(TypeError, match="model must return a tensor of outputs, got tuple"):
        check_examples_independent(nn.LSTM(3, 2, batch_first=True), torch.randn(4, 5, 3))


def test_outputs_that_are_nan_are_named():
    model = _seeded(lambda: nn.Linear(10, 3))
    with torch.no_grad():
        model.bias.fill_(float("nan"))
    with pytest.raises(ValueError, match="outputs on the first examples are NaN"):
        check_examples_independent(model, torch.randn(B, 10, generator=_gen(), dtype=torch.float64))


class _ReadsAValue(nn.Module):
    """Branches on a value of the data: vmap cannot batch ``.item()``."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) if x.sum().item() > -1e9 else -self.lin(x)


class _Recurrent(nn.Module):
    def __init__(self, layer: type[nn.RNNBase]) -> None:
        super().__init__()
        self.rnn = layer(4, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


def test_a_model_vmap_cannot_batch_gets_a_value_error_naming_the_layer():
    x, y = torch.randn(B, 10, generator=_gen(), dtype=torch.float64), _classes(B, 3)
    with pytest.raises(ValueError, match=r"vmap cannot compute .* layer\(s\) lin: .*\.item\(\)"):
        clipped_gradient_sum(_seeded(_ReadsAValue), "cross_entropy", x, y,
                             max_grad_norm=1.0, method="vmap")  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layer", [nn.RNN, nn.GRU, nn.LSTM])
def test_recurrent_layers_under_vmap_run_unrolled_and_match_the_loop(layer, dtype):
    """``method="vmap"`` (and vmap over the model, where a layer falls back to it) runs torch's
    recurrent layers unrolled: in PyTorch 2.13 vmap cannot batch the fused RNN and GRU in any
    dtype, nor the LSTM in float64. Against the float64 loop: float32 rounds at about 1e-7, so
    1e-5 relative leaves room. (The rules unroll these layers too: ``tests/test_recurrent.py``.)"""
    model = _seeded(lambda: _Recurrent(layer)).to(dtype)
    x, y = torch.randn(B, 5, 4, generator=_gen(), dtype=dtype), _classes(B, 3)
    actual = clipped_gradient_sum(model, "cross_entropy", x, y, max_grad_norm=0.1, method="vmap")
    expected, norms = _loop_clipped_sum(model.double(), "cross_entropy", x.double(), y, 0.1)
    assert float(norms.min()) > 0.1  # every example is clipped
    _assert_same({n: t.double() for n, t in actual.items()}, expected)
    assert "forward" not in vars(model.rnn)
