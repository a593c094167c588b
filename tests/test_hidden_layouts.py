"""Forward passes that hide from the layer rules what a layer computes for which example, found
by differential testing of the engine against the per-example loop: each matches the loop or
gets a clear error.

- A batch reordered around a layer (``x.flip(0)``, a sort, a roll, a reshape that mixes rows),
  put back in order after it: the model treats examples independently and every layer sees
  ``B`` rows, but row ``i`` is not example ``i``'s, so the rules would give one example part of
  another's gradient and one example could move the sum by more than ``C``.
- A forward hook of the user's that changes a layer's output, a ``forward`` replaced on the
  instance, a global forward hook: the kept output is not the layer's own.
- Parameters of two dtypes, a reentrant checkpoint, an example whose gradient is nan.

The loop of ``tests/_oracles.py`` is the oracle (one forward and backward pass per example),
to 1e-5 relative (``_assert_same``: float32 rounding over a few hundred terms).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from _oracles import _assert_same, _loop_clipped_sum, _most_clipped_norm
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from companion.per_example import PerExampleClipper, clipped_gradient_sum, layout


def _seeded(build, seed=0):
    torch.manual_seed(seed)
    return build()


def _batch(size, features=6, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(size, features, generator=generator) * 3
    return x, torch.randint(0, 3, (size,), generator=generator)


class _Reordered(nn.Module):
    """A Linear on the batch in another order, put back after it: examples stay independent."""

    def __init__(self, order):
        super().__init__()
        self.order = order
        self.fc = nn.Linear(6, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        index = self.order(x)  # row j of fc belongs to example index[j]
        return self.head(torch.tanh(self.fc(x[index]))[index.argsort()])


class _RowsMixed(nn.Module):
    """Each row of ``fc``'s input mixes several examples (a reshape through the batch), undone
    after it, as a misplaced ``transpose`` does."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        b = x.shape[0]
        z = x.reshape(b, 3, 2).transpose(0, 1).reshape(b, 3, 2)
        h = self.fc(z).reshape(3, b, 2).transpose(0, 1).reshape(b, 6)
        return self.head(torch.tanh(h))


_HIDDEN = {
    "flipped": lambda: _Reordered(lambda x: torch.arange(x.shape[0] - 1, -1, -1)),
    "rolled": lambda: _Reordered(lambda x: torch.arange(x.shape[0]).roll(1)),
    "sorted by a feature": lambda: _Reordered(lambda x: x[:, 0].argsort()),
    "rows mixed": _RowsMixed,
}


@pytest.mark.parametrize("batch", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("name", sorted(_HIDDEN))
def test_a_batch_reordered_around_a_layer_matches_the_loop(name, batch):
    """Every batch of two examples or more that reorders (or mixes) the rows around ``fc`` gets
    a warning; a sort that finds the batch in order leaves it as it is, and the rules are then
    right, as they are where the reshapes of "rows mixed" leave a (T, B, F) layout (3 examples)."""
    model, (x, y) = _seeded(_HIDDEN[name]), _batch(batch)
    _, norms = _loop_clipped_sum(model, "cross_entropy", x, y, 1.0)
    c = _most_clipped_norm(norms)
    expected, _ = _loop_clipped_sum(model, "cross_entropy", x, y, c)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sums = clipped_gradient_sum(model, "cross_entropy", x, y, max_grad_norm=c)
    _assert_same(sums, expected)
    in_order = name == "sorted by a feature" and bool((x[1:, 0] >= x[:-1, 0]).all())
    # With 3 examples the reshapes of "rows mixed" change no shape: fc sees the 3 positions of
    # the examples laid out (T, B, F), which the rules take along dimension 1.
    sequence_first = name == "rows mixed" and batch == 3
    if batch >= 2 and not in_order and not sequence_first:  # one example: no other takes its row
        assert any("rows are not the batch's examples" in str(w.message) for w in caught)


def test_one_example_moves_the_sum_of_a_reordered_batch_by_at_most_c():
    """The bound DP-SGD needs, on the auditor's case: example 1's gradient is 0 (its target is
    the model's output), so removing example 0 must move the sum by exactly example 0's clipped
    gradient, of norm C. The rules on the flipped rows gave sqrt(2) C."""
    model, c = _seeded(_HIDDEN["flipped"]), 0.01
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(0)) * 3
    with torch.no_grad():
        y = model(x) + torch.tensor([[5.0, -5.0, 0.0], [0.0, 0.0, 0.0]])
    loss = nn.MSELoss()
    with pytest.warns(UserWarning, match="rows are not the batch's examples"):
        both = clipped_gradient_sum(model, loss, x, y, max_grad_norm=c)
    alone = clipped_gradient_sum(model, loss, x[1:], y[1:], max_grad_norm=c)
    moved = torch.cat([(both[n] - alone[n]).flatten() for n in both])
    assert float(torch.linalg.vector_norm(moved)) == pytest.approx(c, rel=1e-4)


def test_a_clipper_moves_a_layer_for_good_and_checks_only_its_first_batches():
    """The first batch moves ``fc`` to vmap, with one warning; later batches use the new plan
    without a warning. A clipper checks three batches of two examples or more; a batch of one
    is not counted."""
    model, (x, y) = _seeded(_HIDDEN["rolled"]), _batch(6)
    clipper = PerExampleClipper(model, loss="cross_entropy")
    with pytest.warns(UserWarning, match="layer 'fc' is called on an input whose rows"):
        clipper(x[:3], y[:3], max_grad_norm=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = clipper(x, y, max_grad_norm=0.5)
    _assert_same(second.sums, _loop_clipped_sum(model, "cross_entropy", x, y, 0.5)[0])
    clipper = PerExampleClipper(_seeded(_FlipsLargeBatches), loss="cross_entropy")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for size in (1, 2, 3):  # the batch of one is not checked: the third check is still due
            clipper(x[:size], y[:size], max_grad_norm=0.5)
    with pytest.warns(UserWarning, match="layer 'fc' is called on an input whose rows"):
        clipper(x[:4], y[:4], max_grad_norm=0.5)


class _FlipsLargeBatches(_Reordered):
    """Flips batches of four examples or more around ``fc``."""

    def __init__(self):
        super().__init__(lambda x: torch.arange(x.shape[0] - 1, -1, -1))

    def forward(self, x):
        return super().forward(x) if len(x) >= 4 else self.head(torch.tanh(self.fc(x)))


def _mlp():
    return nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3))


def _doubled(module, args, output):
    return 2 * output


def _doubled_in_place(module, args, output):
    output.mul_(2)


@pytest.mark.parametrize("hook", [_doubled, _doubled_in_place])
def test_a_forward_hook_that_changes_an_output_keeps_the_rules_and_matches_the_loop(hook):
    """The hooks that keep a layer's output run before the user's, so they keep the layer's own
    output, and the user's change is downstream of it in the graph."""
    model, (x, y) = _seeded(_mlp), _batch(6)
    model[0].register_forward_hook(hook)
    expected, _ = _loop_clipped_sum(model, "cross_entropy", x, y, 0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        sums = clipped_gradient_sum(model, "cross_entropy", x, y, max_grad_norm=0.2)
    _assert_same(sums, expected)


def test_a_forward_replaced_on_the_instance_falls_back_to_vmap():
    """A wrapper's ``forward`` may compute something else than the layer's maths (here it
    doubles the input), so the layer's rule cannot apply."""
    model, (x, y) = _seeded(_mlp), _batch(6)
    layer = model[0]
    layer.forward = lambda inp: F.linear(2 * inp, layer.weight, layer.bias)
    expected, _ = _loop_clipped_sum(model, "cross_entropy", x, y, 0.2)
    with pytest.warns(UserWarning, match=r"'0' \(Linear\) has its forward replaced"):
        sums = clipped_gradient_sum(model, "cross_entropy", x, y, max_grad_norm=0.2)
    _assert_same(sums, expected)


def test_a_global_forward_hook_sends_every_layer_to_vmap_while_it_is_registered():
    """Global forward hooks run before a layer's own, so none could keep the layer's output. A
    clipper planned and probed before the hook is registered must see it at the next batch."""
    model, (x, y) = _seeded(_mlp), _batch(6)
    clipper = PerExampleClipper(model, loss="cross_entropy")
    clipper(x, y, max_grad_norm=0.2)  # planned and probed without the hook
    handle = nn.modules.module.register_module_forward_hook(
        lambda m, args, out: 2 * out if isinstance(m, nn.Linear) else None
    )
    try:
        expected, _ = _loop_clipped_sum(model, "cross_entropy", x, y, 0.2)
        with pytest.warns(UserWarning, match="a global forward hook is registered"):
            sums = clipper(x, y, max_grad_norm=0.2).sums
    finally:
        handle.remove()
    _assert_same(sums, expected)


class _MixedDtypes(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)  # float32
        self.head = nn.Linear(4, 3).double()

    def forward(self, x):
        return self.head(torch.tanh(self.fc(x)).double())


@pytest.mark.parametrize("method", ["auto", "vmap"])
def test_parameters_of_two_dtypes_match_the_loop(method):
    """The float32 layer rounds differently in batches of 2 and 3, far above float64's epsilon:
    the probe must still see that the float64 head's rows are the examples' (no warning)."""
    model, (x, y) = _seeded(_MixedDtypes), _batch(6)
    expected, _ = _loop_clipped_sum(model, "cross_entropy", x, y, 0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sums = clipped_gradient_sum(model, "cross_entropy", x, y, max_grad_norm=0.2, method=method)
    assert {name: s.dtype for name, s in sums.items()} == {
        name: p.dtype for name, p in model.named_parameters()
    }
    _assert_same(sums, expected)


class _Checkpointed(nn.Module):
    def __init__(self, reentrant):
        super().__init__()
        self.reentrant = reentrant
        self.first = nn.Linear(6, 4)
        self.block = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(checkpoint(self.block, self.first(x), use_reentrant=self.reentrant))


def test_a_reentrant_checkpoint_is_refused_and_a_non_reentrant_one_matches_the_loop():
    """With ``use_reentrant=True`` the checkpointed layers run without autograd in the forward
    pass, so neither their rules nor torch.autograd.grad can see them."""
    (x, y), model = _batch(6), _seeded(lambda: _Checkpointed(reentrant=True))
    with pytest.raises(ValueError, match="use_reentrant=True.*pass use_reentrant=False"):
        clipped_gradient_sum(model, "cross_entropy", x, y, max_grad_norm=0.2)
    model.reentrant = False
    expected, _ = _loop_clipped_sum(model, "cross_entropy", x, y, 0.2)
    _assert_same(clipped_gradient_sum(model, "cross_entropy", x, y, max_grad_norm=0.2), expected)


def _distance_loss(outputs, targets):
    """The mean Euclidean distance, written out: its gradient at a perfect prediction is
    inf * 0 (torch's ``vector_norm`` would give 0 there)."""
    return ((outputs - targets) ** 2).sum(dim=1).sqrt().mean()


@pytest.mark.parametrize("method", ["auto", "vmap"])
def test_an_example_whose_gradient_is_nan_is_refused_before_anything_is_added(method):
    """Example 2 is predicted exactly (input 0, no biases, target 0), so its gradient under the
    distance loss is nan; clipping it would make the whole sum nan (min(1, C/nan) is nan), so
    the clipper refuses, naming the example, and leaves ``into`` as it was."""
    model = _seeded(lambda: nn.Sequential(nn.Linear(6, 4, bias=False), nn.Linear(4, 3, bias=False)))
    x, y = _batch(4)[0], torch.ones(4, 3)
    x[2], y[2] = 0.0, 0.0
    clipper = PerExampleClipper(model, loss=_distance_loss, method=method)
    into = {name: torch.ones_like(p) for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"example\(s\) \[2\] of the batch is not finite"):
        clipper.add_clipped_sum(x, y, max_grad_norm=1.0, into=into)
    assert all(bool((t == 1).all()) for t in into.values())


class _Sampling(nn.Module):
    """A VAE's reparameterisation: the decoder's rows change with every draw of the noise."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(6, 4)
        self.decoder = nn.Linear(2, 3)

    def forward(self, x):
        mean, log_var = self.encoder(x).chunk(2, dim=1)
        return self.decoder(mean + torch.randn_like(mean) * (0.5 * log_var).exp())


def test_a_layer_after_a_random_draw_keeps_its_rule():
    """The decoder's rows change with every draw of the noise, but each example's loss still
    reads its own row only: no layer falls back (the VAE stays 25 times faster than with vmap).
    The check runs no forward pass of its own, so the clipper draws what the model draws."""
    model, (x, y) = _seeded(_Sampling), _batch(6)
    checked = PerExampleClipper(model, loss="cross_entropy")
    for _ in range(3):
        checked(x, y, max_grad_norm=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        torch.manual_seed(5)
        PerExampleClipper(model, loss="cross_entropy")(x, y, max_grad_norm=0.5)
        after_check = torch.get_rng_state()
        torch.manual_seed(5)
        checked(x, y, max_grad_norm=0.5)
    assert torch.equal(after_check, torch.get_rng_state())


class _NoisyFlip(_Reordered):
    """Noise added to the input, then the batch flipped around ``fc``: a comparison of values
    between runs would blame the noise and keep the rule."""

    def __init__(self):
        super().__init__(lambda x: torch.arange(x.shape[0] - 1, -1, -1))

    def forward(self, x):
        return super().forward(x + 0.3 * torch.randn(x.shape, generator=self.noise))


class _TrainOnlyHead(_Reordered):
    """An auxiliary head used in training only (as in Inception), on the flipped batch."""

    def __init__(self):
        super().__init__(lambda x: torch.arange(x.shape[0] - 1, -1, -1))
        self.aux = nn.Linear(6, 3)

    def forward(self, x):
        out = self.head(torch.tanh(self.fc(x)))
        return out + self.aux(x.flip(0)).flip(0) if self.training else out


class _DeadFlip(_Reordered):
    """The flipped layer's input is 0 for every example (a dead ReLU): its rows' values are all
    alike, but its bias's gradient rows still belong to the flipped examples."""

    def __init__(self):
        super().__init__(lambda x: torch.arange(x.shape[0] - 1, -1, -1))
        self.first = nn.Linear(6, 6)
        with torch.no_grad():
            self.first.bias.fill_(-100.0)

    def forward(self, x):
        return super().forward(torch.relu(self.first(x)))


@pytest.mark.parametrize("build", [_NoisyFlip, _TrainOnlyHead, _DeadFlip])
def test_reorders_that_values_cannot_show_are_found_in_the_graph(build):
    """Three models on which a probe comparing layer values was fooled: each flipped layer goes
    to vmap. Where the model draws no noise, the loop is the oracle (with noise, the loop's
    draws differ from the batch's, and so does vmap's second forward pass)."""
    model, (x, y) = _seeded(build), _batch(6)
    model.train()
    model.noise = torch.Generator().manual_seed(3)
    clipper = PerExampleClipper(model, loss="cross_entropy")
    with pytest.warns(UserWarning, match="rows are not the batch's examples"):
        sums = clipper(x, y, max_grad_norm=0.3).sums
    flipped = {"aux"} if build is _TrainOnlyHead else {"fc"}
    assert flipped.isdisjoint(name for name, _ in clipper.plan.hooked)
    if build is not _NoisyFlip:
        _assert_same(sums, _loop_clipped_sum(model, "cross_entropy", x, y, 0.3)[0])


def test_a_float16_model_with_norms_above_256_is_clipped_like_the_float64_loop():
    """float16's squares overflow past 65504, a norm of 256: the squared norms are taken in
    float32. The oracle is the loop on a float64 copy; float16 rounding (2**-11 relative) over a
    few terms bounds the difference by 1%."""
    model, (x, y) = _seeded(lambda: nn.Linear(6, 3)), _batch(4)
    x = x * 100  # unnormalised inputs: weight gradients (p - y) x^T of norm in the hundreds
    _, norms = _loop_clipped_sum(model.double(), "cross_entropy", x.double(), y, 1.0)
    assert float(norms.max()) > 256  # else nothing would overflow
    expected, _ = _loop_clipped_sum(model, "cross_entropy", x.double(), y, 1.0)
    for method in ("auto", "vmap"):
        half = clipped_gradient_sum(
            model.half(), "cross_entropy", x.half(), y, max_grad_norm=1.0, method=method
        )
        for name, value in half.items():
            torch.testing.assert_close(value.double(), expected[name], rtol=1e-2, atol=1e-2)
        model.double()


class _Bag(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, tokens):
        return self.head(self.embed(tokens).mean(dim=1))


class _Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(x), x


@pytest.mark.parametrize(
    "build, x, error, match",
    [
        (_Bag, torch.tensor([[1, 7], [2, 3]]), ValueError, "model cannot be applied.*out of range"),
        (_Pair, torch.ones(2, 6), TypeError, "model must return a tensor of outputs, got tuple"),
    ],
)
def test_the_first_batchs_check_explains_a_model_it_cannot_run(build, x, error, match):
    """The check's own forward pass is a clipper's first: its errors say what is wrong."""
    clipper = PerExampleClipper(_seeded(build), loss="cross_entropy")
    with pytest.raises(error, match=match):
        clipper(x, torch.tensor([0, 1]), max_grad_norm=1.0)


class _OwnBatchNorm(nn.Module):
    """A student's batch norm between two Linears: the batch mean in training, a buffer in
    evaluation. In training each example's loss reads every example's input."""

    def __init__(self, centre_input=False):
        super().__init__()
        self.centre_input = centre_input
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)
        self.register_buffer("mean", torch.zeros(8))

    def forward(self, x):
        if self.centre_input and self.training:
            x = x - x.mean(0)
        h = self.fc1(x)
        if not self.centre_input:
            h = h - (h.mean(0) if self.training else self.mean)
        return self.fc2(torch.relu(h))


@pytest.mark.parametrize("centre_input", [False, True], ids=["after-fc1", "input"])
@pytest.mark.parametrize("method", ["auto", "layerwise"])
def test_a_forward_pass_that_mixes_examples_in_training_is_refused(centre_input, method):
    """Before, the rules read fc2's batch-centred input, and one example moved the sum by 5.4 C
    (the audit's measure) under a warning that the result was the same."""
    model = _seeded(lambda: _OwnBatchNorm(centre_input))
    x, y = _batch(16)
    with pytest.raises(ValueError, match="mixes the examples of a batch"):
        clipped_gradient_sum(model, "cross_entropy", x, y, max_grad_norm=0.1, method=method)
    # Control: in evaluation mode the same model treats examples independently.
    model.eval()
    expected, _ = _loop_clipped_sum(model, "cross_entropy", x, y, 0.1)
    result = clipped_gradient_sum(model, "cross_entropy", x, y, max_grad_norm=0.1, method=method)
    _assert_same(result, expected)


def test_train_dpsgd_refuses_a_model_that_mixes_examples_in_training_only():
    """train_dpsgd's own independence check runs in evaluation mode; the clipper's sees it."""
    from companion.dpsgd import train_dpsgd

    x, y = _batch(64)
    with pytest.raises(ValueError, match="mixes the examples of a batch"):
        train_dpsgd(
            _seeded(_OwnBatchNorm), x, y, max_grad_norm=1.0, sample_rate=0.25, epochs=1,
            delta=1e-3, noise_multiplier=1.0, lr=0.1, seed=0,
        )  # fmt: skip


class _Squeezed(nn.Module):
    """The tutorial binary classifier: ``.squeeze()`` drops the batch dimension of one example."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 1)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x))).squeeze()


@pytest.mark.parametrize("method, batch", [("auto", 1), ("vmap", 3), ("layerwise", 1)])
def test_a_squeeze_that_drops_the_batch_dimension_gets_a_message_naming_it(method, batch):
    """A Poisson batch of one (or vmap's one example) gave torch's BCE shape error."""
    clipper = PerExampleClipper(_seeded(_Squeezed), loss="bce", method=method)
    x = _batch(batch)[0]
    with pytest.raises(ValueError, match=r"shape \(\) for a batch of 1 .*squeeze\(-1\)"):
        clipper(x, torch.ones(batch), max_grad_norm=1.0)


def test_a_compiled_model_is_refused_and_a_compiled_part_matches_the_loop():
    """torch.compile's graph gives the outputs the hooks keep no gradient: before, every norm
    was 0. A compiled model is refused; a compiled submodule falls back to vmap (aot_eager,
    the backend that shows it, without a C compiler). Dynamo's caches are reset first: what an
    earlier compile in the process decided about the hooks' code changes what this one traces."""
    torch._dynamo.reset()
    with pytest.raises(TypeError, match="compiled module"):
        PerExampleClipper(torch.compile(nn.Linear(6, 3)), loss="cross_entropy")

    class Body(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.compile(
                nn.Sequential(nn.Linear(6, 8), nn.Tanh()), backend="aot_eager"
            )
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.body(x))

    model, (x, y) = _seeded(Body), _batch(12)
    expected, _ = _loop_clipped_sum(model, "cross_entropy", x, y, 0.5)
    with pytest.warns(UserWarning, match="autograd does not give"):
        result = clipped_gradient_sum(model, "cross_entropy", x, y, max_grad_norm=0.5)
    _assert_same(result, expected)


@pytest.mark.parametrize("part", ["model", "submodule"])
def test_a_model_compiled_in_place_is_accepted_and_matches_the_loop(part):
    """``Module.compile()`` compiles in place, keeping the module and its layers, so it is not
    refused as ``torch.compile(model)``'s wrapper is, and the result is each example's clipped
    gradient, summed."""
    torch._dynamo.reset()
    model, (x, y) = (
        _seeded(lambda: nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))),
        _batch(12),
    )
    expected, _ = _loop_clipped_sum(model, "cross_entropy", x, y, 0.5)
    (model if part == "model" else model[0]).compile(backend="aot_eager")
    result = clipped_gradient_sum(model, "cross_entropy", x, y, max_grad_norm=0.5)
    _assert_same(result, expected)


class _Centred(nn.Module):
    """Subtracts the batch mean: a forward pass that mixes examples."""

    def forward(self, x):
        return x - x.mean(dim=0)


class _CompiledPReLU(nn.Module):
    """A block compiled with inductor's partitioner (``aot_eager_decomp_partition``: no C
    compiler), whose backward with PReLU in float64 donates its saved tensors once recompiled
    for another batch size, so autograd then allows one backward pass through its graph. A
    Linear runs unless ``skip`` is set (as a layer dropped at random would be)."""

    def __init__(self, centred=False):
        super().__init__()
        self.first, self.middle, self.head = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        block = nn.Sequential(nn.Linear(8, 8), *([_Centred()] if centred else []), nn.PReLU())
        self.block = torch.compile(block, backend="aot_eager_decomp_partition")
        self.skip = False

    def forward(self, x):
        h = self.first(x)
        h = h if self.skip else self.middle(h)
        return self.head(torch.tanh(self.block(h)))


def _one_pass_graphs(build, x):
    """``build()`` in float64, after calls on two other batch sizes, which leave its compiled
    block allowing one backward pass through its graph; dynamo's caches are reset first."""
    torch._dynamo.reset()
    model = _seeded(build).double()
    model(x[:1])
    model(x[:3])
    return model


@pytest.mark.parametrize("method", ["auto", "layerwise"])
def test_a_compiled_part_that_allows_one_backward_pass_matches_the_loop(method, monkeypatch):
    """The layout check's backward passes share one graph, and raised torch's RuntimeError on
    such a block ("donated buffers"); now they take a forward pass each there (counted). The
    check still finds a forward pass that mixes examples inside the block, and refuses, with a
    ValueError, a forward pass that calls other layers when it runs again."""
    traced, passes = layout._traced, []

    def counted(model, *args):
        passes.append(1)
        model.skip = skipping and len(passes) > 1  # the check's later passes skip a layer
        return traced(model, *args)

    monkeypatch.setattr(layout, "_traced", counted)
    skipping = False
    x, y = _batch(12)
    x = x.double()
    model = _one_pass_graphs(_CompiledPReLU, x)
    expected, _ = _loop_clipped_sum(model, "cross_entropy", x, y, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the block's layers move to vmap, as above
        result = clipped_gradient_sum(
            model, "cross_entropy", x, y, max_grad_norm=0.5, method=method
        )
    _assert_same(result, expected)
    assert len(passes) == 7  # the first, then one for each of the 2 log2(8) backward passes
    passes.clear()
    with pytest.raises(ValueError, match="mixes the examples"):
        clipped_gradient_sum(
            _one_pass_graphs(lambda: _CompiledPReLU(centred=True), x),
            "cross_entropy",
            x,
            y,
            max_grad_norm=0.5,
            method=method,
        )
    assert len(passes) > 1  # found on a pass of its own
    skipping = True
    passes.clear()
    with pytest.raises(ValueError, match="calls other layers when it runs again"):
        clipped_gradient_sum(
            _one_pass_graphs(_CompiledPReLU, x),
            "cross_entropy",
            x,
            y,
            max_grad_norm=0.5,
            method=method,
        )


class _ThroughNumpy(nn.Module):
    """A forward pass that reads its input through numpy, which refuses a tensor that requires
    a gradient: the check's input leaf must not make it fail."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    fail_in_training = False

    def forward(self, x):
        if self.fail_in_training and self.training:
            raise RuntimeError("a genuine error")
        return self.fc(torch.from_numpy(x.cpu().numpy()))


def test_a_forward_pass_that_cannot_take_an_input_requiring_grad_keeps_its_rules():
    """It failed with torch's error; now the check runs it again on the input as it is, and says
    that mixing was not checked. A genuine error still comes out."""
    model, (x, y) = _seeded(_ThroughNumpy), _batch(8)
    expected, _ = _loop_clipped_sum(model, "cross_entropy", x, y, 0.5)
    with pytest.warns(UserWarning, match="mixes the examples of a batch is not checked"):
        result = clipped_gradient_sum(model, "cross_entropy", x, y, max_grad_norm=0.5)
    _assert_same(result, expected)
    model.fail_in_training = True
    with pytest.raises(RuntimeError, match="a genuine error"):
        clipped_gradient_sum(model, "cross_entropy", x, y, max_grad_norm=0.5)


class _SqrtInput(nn.Module):
    """The square root of a non-negative input with zeros (black pixels): its derivative at 0 is
    infinite, so the check's backward pass that masks an example out meets 0 * inf = NaN there."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(x.sqrt())


def test_an_infinite_input_derivative_is_not_read_as_mixing():
    """e96480f refused this model as mixing examples; it treats them independently."""
    model, (x, y) = _seeded(_SqrtInput), _batch(8)
    x = x.relu()  # about half the entries are exact zeros
    expected, _ = _loop_clipped_sum(model, "cross_entropy", x, y, 0.5)
    _assert_same(clipped_gradient_sum(model, "cross_entropy", x, y, max_grad_norm=0.5), expected)


class _AddBatchMean(nn.Module):
    def forward(self, x):
        return x + x.mean(0, keepdim=True)


def test_a_loss_gradient_whose_sum_overflows_still_gets_the_mixing_check():
    """float16 gradients of about 1e4 each: their float16 sum is inf. The check returned early
    on a non-finite sum, so this mixing model trained without an error."""
    torch.manual_seed(0)
    model = nn.Sequential(_AddBatchMean(), nn.Linear(4, 1)).half()
    x, y = torch.randn(8, 4).half(), torch.full((8, 1), 5000.0).half()
    assert float((2 * (model(x) - y)).sum()) == float("-inf")  # finite entries, overflowing sum
    with pytest.raises(ValueError, match="mixes the examples of a batch"):
        PerExampleClipper(model, loss=nn.MSELoss())(x, y, max_grad_norm=1.0)


class _SumPool(nn.Module):
    """Sums a bag of feature vectors: its input's gradient is an expanded view (stride 0)."""

    def __init__(self, dim):
        super().__init__()
        self.dim, self.fc = dim, nn.Linear(6, 3)

    def forward(self, x):
        pooled = x.sum(self.dim, keepdim=self.dim == 0)
        return self.fc(pooled.expand(x.shape[0], -1) if self.dim == 0 else pooled)


def test_an_input_gradient_that_is_an_expanded_view_is_checked_without_error():
    """The input check once changed the input's gradient in place, which torch refuses for an
    expanded view: a bag of features summed over positions trained with a torch error, and a
    batch sum (which mixes examples) got that error in place of the check's."""
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 7, 6, generator=generator), torch.randint(0, 3, (8,), generator=generator)
    model = _seeded(lambda: _SumPool(dim=1))
    expected, _ = _loop_clipped_sum(model, "cross_entropy", x, y, 0.5)
    _assert_same(clipped_gradient_sum(model, "cross_entropy", x, y, max_grad_norm=0.5), expected)
    x, y = _batch(8)
    with pytest.raises(ValueError, match="mixes the examples of a batch"):
        PerExampleClipper(_seeded(lambda: _SumPool(dim=0)), loss="cross_entropy")(
            x, y, max_grad_norm=1.0
        )


class _ReshapedAfter(nn.Module):
    """Transposes the first layer's output in place after the second layer has read it."""

    def __init__(self):
        super().__init__()
        self.pre, self.fc = nn.Linear(6, 6), nn.Linear(6, 3)
        self.fc.weight.requires_grad_(False)  # else autograd refuses the change of a saved input

    def forward(self, x):
        h = self.pre(x)
        out = self.fc(h)
        h.t_()
        return out


def test_a_layer_input_reshaped_in_place_after_the_call_keeps_its_rule():
    """The check reads a layer's input shape as the layer saw it: read after the forward pass,
    the transposed (6, 8) input looked like rows that are not the examples, and the layer moved
    to vmap with a false warning."""
    model, (x, y) = _seeded(_ReshapedAfter), _batch(8)
    expected, _ = _loop_clipped_sum(model, "cross_entropy", x, y, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _assert_same(
            clipped_gradient_sum(model, "cross_entropy", x, y, max_grad_norm=0.5), expected
        )
