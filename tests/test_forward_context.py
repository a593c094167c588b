"""What a pass over private data needs of its context and its model (companion/_forward.py).

- Autograd on: under a caller's ``torch.no_grad()`` the per-layer rules once saw no graph and
  returned norms of 0 (each step moved the model by noise alone, with an epsilon reported); now
  every entry point gives what it gives outside. ``torch.inference_mode()``, which nothing can
  turn back, and tensors made there are refused with a message, not a torch error.
- No parameter written by the forward pass: a layer that sets its weights from the data it reads
  (Glow's ActNorm on its first batch, found by a coursework trial) put four examples' mean into
  the weights with no noise while an epsilon of 1 was reported. Now every entry point refuses it,
  written in place, through ``.data`` or by a ``.data`` assignment; a move to new storage that
  keeps the values and a lazy layer's creation are accepted.
- No buffer written from the data (helper-100's audit): a running mean kept in a buffer, in
  training or in evaluation mode, is refused; buffers written by every pass but not from the
  data (a count of calls, a random mask, spectral normalisation's vectors) are accepted.
- The caller's data unchanged: train_dpsgd's evaluation passes ran the model on views of the
  training tensors, so a model that divides its input in place divided the caller's data.
"""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from companion._forward import check_buffers_unwritten
from companion.dpsgd import dp_sgd_step, set_private_gradients, train_dpsgd
from companion.per_example import PerExampleClipper, clipped_gradient_sum

X = torch.randn(60, 5, generator=torch.Generator().manual_seed(0))
Y = torch.arange(60) % 3
RUN = {"max_grad_norm": 1.0, "sample_rate": 0.2, "epochs": 2, "delta": 1e-3, "lr": 0.5}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def _weights(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# Each entry point on a fresh model, returning what it computes (norms, or the weights after it).
def _clipped_sum(model):
    return clipped_gradient_sum(model, "cross_entropy", X[:6], Y[:6], max_grad_norm=1.0,
                                return_norms=True).norms  # fmt: skip


def _set_private(model):
    generator = torch.Generator().manual_seed(1)
    return set_private_gradients(model, X[:6], Y[:6], noise_multiplier=0.5, max_grad_norm=1.0,
                                 expected_batch_size=6.0, generator=generator)  # fmt: skip


def _step(model):
    generator = torch.Generator().manual_seed(1)
    dp_sgd_step(model, X[:6], Y[:6], noise_multiplier=0.5, max_grad_norm=1.0,
                expected_batch_size=6.0, lr=0.5, generator=generator)  # fmt: skip
    return _weights(model)


def _clipper(model):
    return PerExampleClipper(model, loss="cross_entropy")(X[:6], Y[:6], max_grad_norm=1.0).norms


def _train(model):
    train_dpsgd(model, X, Y, noise_multiplier=0.5, seed=0, progress=False, **RUN)
    return _weights(model)


ENTRIES = {
    "clipped_gradient_sum": _clipped_sum,
    "set_private_gradients": _set_private,
    "dp_sgd_step": _step,
    "PerExampleClipper": _clipper,
    "train_dpsgd": _train,
}


@pytest.mark.parametrize("entry", ENTRIES.values(), ids=ENTRIES.keys())
def test_under_no_grad_every_entry_point_computes_what_it_computes_outside(entry):
    expected = entry(_model())
    with torch.no_grad():
        actual = entry(_model())
    assert torch.equal(actual, expected)
    if entry in (_clipped_sum, _set_private, _clipper):  # the norms, all > 0 (they were 0)
        assert bool((actual > 0).all())
    else:  # the weights moved from the initial ones
        assert not torch.equal(actual, _weights(_model()))


@pytest.mark.parametrize("entry", ENTRIES.values(), ids=ENTRIES.keys())
def test_inference_mode_is_refused_with_a_message(entry):
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode.. turns off"):
        entry(_model())


def test_an_inference_tensor_is_refused_by_name():
    with torch.inference_mode():
        features, labels = X.clone(), Y.clone()
    generator = torch.Generator().manual_seed(1)
    with pytest.raises(ValueError, match=r"^x_batch is an inference tensor.*x_batch\.clone\(\)"):
        set_private_gradients(_model(), features[:6], Y[:6], noise_multiplier=0.5,
                              max_grad_norm=1.0, expected_batch_size=6.0,
                              generator=generator)  # fmt: skip
    with pytest.raises(ValueError, match=r"^y is an inference tensor"):
        clipped_gradient_sum(_model(), "cross_entropy", X[:6], labels[:6], max_grad_norm=1.0)
    with pytest.raises(ValueError, match=r"^x is an inference tensor"):
        PerExampleClipper(_model(), loss="cross_entropy")(features[:6], Y[:6], max_grad_norm=1.0)


def test_train_dpsgd_takes_inference_tensors_as_data():
    """Its batches and evaluation chunks are copies, which autograd can use: the same run."""
    with torch.inference_mode():
        features, labels = X.clone(), Y.clone()
    expected, actual = _model(), _model()
    train_dpsgd(expected, X, Y, noise_multiplier=0.5, seed=0, progress=False, **RUN)
    train_dpsgd(actual, features, labels, noise_multiplier=0.5, seed=0, progress=False, **RUN)
    assert torch.equal(_weights(actual), _weights(expected))


class ActNorm(nn.Module):
    """Glow's ActNorm: its first call sets its shift from the batch's mean."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(width))
        self.ready = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.ready:
            with torch.no_grad():
                self.loc.copy_(-x.mean(dim=0))
            self.ready = True
        return x + self.loc


class Drift(nn.Module):
    """A bias moved by every batch's mean."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.linear.bias.add_(x.mean())
        return self.linear(x)


def _act_norm() -> nn.Module:
    return nn.Sequential(ActNorm(5), nn.Linear(5, 3))


class ActNormThroughData(ActNorm):
    """ActNorm as most code writes it: through ``.data``, which moves no version counter."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.ready:
            self.loc.data = -x.detach().mean(dim=0)
            self.ready = True
        return x + self.loc


class ActNormCopyThroughData(ActNorm):
    """The same with ``.data.copy_``: same storage, no version counter moved."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.ready:
            self.loc.data.copy_(-x.detach().mean(dim=0))
            self.ready = True
        return x + self.loc


def _act_norm_through_data() -> nn.Module:
    return nn.Sequential(ActNormThroughData(5), nn.Linear(5, 3))


def _act_norm_copy_through_data() -> nn.Module:
    return nn.Sequential(ActNormCopyThroughData(5), nn.Linear(5, 3))


@pytest.mark.parametrize("entry", ENTRIES.values(), ids=ENTRIES.keys())
@pytest.mark.parametrize(
    ("build", "name"),
    [
        (_act_norm, "0.loc"),
        (_act_norm_through_data, "0.loc"),
        (_act_norm_copy_through_data, "0.loc"),
        (Drift, "linear.bias"),
    ],
)
def test_a_forward_pass_that_writes_a_parameter_is_refused(entry, build, name):
    with pytest.raises(ValueError, match=rf"changed the values of its parameter\(s\) \['{name}'\]"):
        entry(build())


class SwapsStorage(nn.Module):
    """Moves its weight to new storage with the same values, as an RNN's flatten_parameters does
    on a GPU: a write to no value."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.linear.weight.set_(self.linear.weight.detach().clone())
        return self.linear(x)


def test_a_forward_pass_that_keeps_the_values_is_accepted():
    torch.manual_seed(0)
    model = SwapsStorage()
    history = train_dpsgd(model, X, Y, noise_multiplier=0.5, seed=0, progress=False, **RUN)
    assert history[-1]["steps"] == 10


class CountsCalls(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(5, 3)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.linear(x)


def test_a_forward_pass_that_writes_a_buffer_not_from_the_data_is_accepted():
    """A negative control: a count of calls is written by every pass, not from the data."""
    torch.manual_seed(0)
    model = CountsCalls()
    assert bool((_clipper(model) > 0).all())
    assert float(model.calls) > 0


class RunningMean(nn.Module):
    """Keeps a running mean of its inputs in a buffer, in training mode (``when="train"``), in
    evaluation mode (where train_dpsgd evaluates on the training data) or always, by an update in
    place or by assigning a new tensor."""

    def __init__(self, when: str = "train", in_place: bool = True) -> None:
        super().__init__()
        self.linear = nn.Linear(5, 3)
        self.register_buffer("mean", torch.zeros(5))
        self.when, self.in_place = when, in_place

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.when == "always" or self.training == (self.when == "train"):
            new = 0.9 * self.mean + 0.1 * x.detach().mean(dim=0)
            if self.in_place:
                self.mean.copy_(new)
            else:
                self.mean = new
        return self.linear(x)


class FittedOnFirstCall(nn.Module):
    """Sets a buffer registered as None to the mean of its first batch (helper-101's review)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(5, 3)
        self.register_buffer("mean", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean is None:
            self.mean = x.detach().mean(dim=0)
        return self.linear(x - self.mean)


class RunningVariance(nn.Module):
    """Scales its input by a running variance: on a batch of one the variance is 0 for every
    example, so the check's batches are pairs (helper-103's review)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(5, 3)
        self.register_buffer("mean", torch.zeros(5))  # named so: the test reads model.mean

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.mean.mul_(0.9).add_(0.1 * x.detach().var(dim=0, unbiased=False))
        return self.linear(x / (1 + self.mean).sqrt())


@pytest.mark.parametrize("entry", ENTRIES.values(), ids=ENTRIES.keys())
@pytest.mark.parametrize(
    "build",
    [
        lambda: RunningMean("train", in_place=True),
        lambda: RunningMean("eval", in_place=True),
        lambda: RunningMean("always", in_place=False),
        FittedOnFirstCall,
        RunningVariance,
    ],
    ids=["in training", "in evaluation", "assigned", "fitted on the first call", "variance"],
)
def test_a_forward_pass_that_writes_a_buffer_from_the_data_is_refused(entry, build):
    """The running mean of helper-100's audit: accepted before, with an epsilon reported while
    the buffer held a noise-free mean of the training data (in evaluation mode, of all of it).
    The check runs before any other pass, on copies: a buffer fitted on the first call is seen,
    and the model is left as it was."""
    torch.manual_seed(0)
    model = build()
    with pytest.raises(ValueError, match=r"writes its buffer\(s\) \['mean'\] from the data"):
        entry(model)
    assert model.mean is None if build is FittedOnFirstCall else not model.mean.any()


class RandomBuffer(nn.Module):
    """Writes a random mask (drawn from torch's global generator) and a table to buffers at every
    pass, neither from the data, and uses both."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(5, 3)
        self.register_buffer("mask", torch.ones(5))
        self.register_buffer("table", torch.arange(5.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.mask = (torch.rand(5) > 0.2).float()
        self.table.add_(1.0)
        return self.linear(x * self.mask + self.table)


class BatchSizedCache(nn.Module):
    """Keeps zeros of the batch's size in a buffer (a recurrent state, say): not from the data."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(5, 3)
        self.register_buffer("state", torch.zeros(0, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.state = x.new_zeros(len(x), 3)
        return self.linear(x) + self.state


class Schedule(nn.Module):
    """A temperature in a buffer set from a count of training calls kept in a Python attribute, a
    dropout drawn from a generator of the model's own, and an activation whose gradient it keeps
    in training (which needs autograd on): none of it from the data (helper-101's review)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(5, 3)
        self.register_buffer("temperature", torch.tensor(1.0))
        self.calls, self.generator = 0, torch.Generator().manual_seed(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear(x)
        if self.training:
            self.calls += 1
            self.temperature.fill_(1.0 - 0.01 * self.calls)
            h = h * (torch.rand(h.shape, generator=self.generator) > 0.1)
            h.retain_grad()
        return h / self.temperature


class SparseAdjacency(nn.Module):
    """A graph's adjacency matrix, a sparse buffer, read by every pass (helper-102's review)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(5, 3)
        self.register_buffer("adjacency", torch.eye(5).to_sparse())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.sparse.mm(self.adjacency, x.T).T)


class SharedSchedule(nn.Module):
    """A temperature set from a count kept on the class, shared by every copy: each pass of the
    check's copies sees another count, whatever its example."""

    calls = 0

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(5, 3)
        self.register_buffer("temperature", torch.tensor(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        SharedSchedule.calls += 1
        self.temperature.fill_(1.0 + 0.01 * SharedSchedule.calls)
        return self.linear(x) / self.temperature


@pytest.mark.parametrize(
    "build",
    [
        RandomBuffer,
        BatchSizedCache,
        Schedule,
        SharedSchedule,
        lambda: nn.Sequential(
            nn.utils.parametrizations.spectral_norm(nn.Linear(5, 8)), nn.Tanh(), nn.Linear(8, 3)
        ),  # fmt: skip
    ],
    ids=[
        "random mask and table",
        "cache sized by the batch",
        "schedule",
        "shared schedule",
        "spectral norm",
    ],  # fmt: skip
)
def test_buffers_written_from_no_data_are_accepted(build):
    """Negative controls: spectral normalisation's power iteration writes its vectors from the
    weight alone, a random mask is drawn from the same generator state in each probe, and the
    probes' batches have the same size."""
    torch.manual_seed(0)
    model = build()
    before = {name: b.clone() for name, b in model.named_buffers()}
    history = train_dpsgd(model, X, Y, noise_multiplier=0.5, seed=0, progress=False, **RUN)
    assert history[-1]["steps"] == 10
    assert all(not torch.equal(b, before[name]) for name, b in model.named_buffers())


def test_a_sparse_buffer_is_compared_and_accepted():
    torch.manual_seed(0)
    history = train_dpsgd(SparseAdjacency(), X, Y, noise_multiplier=0.5, seed=0, progress=False,
                          **RUN)  # fmt: skip
    assert history[-1]["steps"] == 10


class RunningMeanWithLock(RunningMean):
    """A running mean in a model that holds a lock, which copy.deepcopy cannot copy."""

    def __init__(self) -> None:
        super().__init__("train")
        self.lock = threading.Lock()


def test_a_model_that_cannot_be_copied_gets_a_warning_that_its_buffers_were_not_checked():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="cannot be copied .* was not checked"):
        train_dpsgd(RunningMeanWithLock(), X, Y, noise_multiplier=0.5, seed=0, progress=False,
                    **RUN)  # fmt: skip


class CopiedAsItself(nn.Module):
    """A submodule whose copy is itself (a frozen backbone shared on purpose)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = RunningMean("train")
        self.inner.__deepcopy__ = lambda memo: self.inner


def test_copies_that_share_the_buffers_get_a_warning_that_they_were_not_checked():
    """The three runs wrote one tensor, which compared equal with itself."""
    torch.manual_seed(0)
    model = CopiedAsItself()
    with pytest.warns(UserWarning, match=r"copies share its buffers\), so .* was not checked"):
        check_buffers_unwritten(model, X[:4])
    assert not model.inner.mean.any()


def test_a_model_that_fails_on_one_example_is_checked_on_pairs():
    """A squeeze that fails on a batch of one: the check ran on single examples, skipped the
    model, and the running mean went through (helper-103's review)."""

    class Squeezes(RunningMean):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x.squeeze())

    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"writes its buffer\(s\) \['mean'\] from the data"):
        check_buffers_unwritten(Squeezes(), X[:4, None, :])


def test_an_integer_parameter_is_fingerprinted():
    """vector_norm takes no integer tensor: torch's RuntimeError came out of the write check."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3))
    model.register_parameter("step", nn.Parameter(torch.zeros(1, dtype=torch.long), False))
    history = train_dpsgd(model, X, Y, noise_multiplier=0.5, seed=0, progress=False, **RUN)
    assert history[-1]["steps"] == 10


def test_the_buffer_check_runs_on_copies_and_leaves_the_model_as_it_was():
    """What the check's passes would have changed, had they run on the model: its count, its
    generator, its buffer, and the global generators."""
    torch.manual_seed(0)
    model = Schedule()
    generator = model.generator.get_state()
    torch.manual_seed(5)
    state = torch.get_rng_state()
    check_buffers_unwritten(model, X[:4])
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(model.generator.get_state(), generator)
    assert model.calls == 0 and float(model.temperature) == 1.0


def test_a_model_that_cannot_take_the_data_gets_the_other_checks_message():
    """The buffer check skips a model that fails on its data (here on a batch of one, from a
    squeeze): the message is check_examples_independent's, which says why."""

    class Squeezes(CountsCalls):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.log_softmax(super().forward(x).squeeze(), dim=1)

    torch.manual_seed(0)
    with pytest.raises(ValueError, match="fails on a batch of one example, which Poisson"):
        train_dpsgd(Squeezes(), X, Y, noise_multiplier=0.5, seed=0, progress=False, **RUN)


def test_a_lazy_layer_is_accepted():
    """A negative control: LazyLinear's first call creates and initialises its parameters from
    the input's shape alone; they are not counted as written (they were refused as such)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.LazyLinear(8), nn.Tanh(), nn.Linear(8, 3))
    history = train_dpsgd(model, X, Y, noise_multiplier=0.5, seed=0, progress=False, **RUN)
    assert history[-1]["steps"] == 10 and model[0].weight.shape == (8, 5)


def test_a_clipper_of_a_lazy_layer_asks_for_a_first_call():
    """A clipper's first batch read the unmade parameters (torch's ValueError from zeros_like);
    once the model has run, the same clipper computes the clipped sum."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.LazyLinear(8), nn.Tanh(), nn.Linear(8, 3))
    clipper = PerExampleClipper(model, loss="cross_entropy")
    with pytest.raises(ValueError, match=r"\['0.weight', '0.bias'\] are not made yet: .* Call the"):
        clipper(X[:6], Y[:6], max_grad_norm=1.0)
    with torch.no_grad():
        model(X[:2])
    assert clipper(X[:6], Y[:6], max_grad_norm=1.0).sums["0.weight"].shape == (8, 5)


class DividesItsInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x /= 4.0
        return self.linear(x)


def test_train_dpsgd_leaves_the_callers_data_as_it_was():
    """The evaluation passes run on copies: the tensors are unchanged, and the run is the one a
    TensorDataset of the same tensors gives (whose items are always copies)."""
    x, x_test = X.clone(), X[:20].clone()
    torch.manual_seed(0)
    on_tensors = DividesItsInput()
    on_dataset = DividesItsInput()
    on_dataset.load_state_dict(on_tensors.state_dict())
    train_dpsgd(on_tensors, x, Y, noise_multiplier=0.5, seed=0, progress=False, x_test=x_test,
                y_test=Y[:20], **RUN)  # fmt: skip
    assert torch.equal(x, X) and torch.equal(x_test, X[:20])
    train_dpsgd(on_dataset, TensorDataset(X.clone(), Y), noise_multiplier=0.5, seed=0,
                progress=False, **RUN)  # fmt: skip
    assert torch.equal(_weights(on_tensors), _weights(on_dataset))
