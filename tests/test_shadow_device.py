"""The GPU code paths, without a GPU: the model on a shadow device (tests/_shadow_device.py:
tensors labelled "meta" that hold CPU values), the data given on the CPU.

On the shadow device an op that mixes devices, or a draw with a generator of the other device,
raises as on CUDA, and the harness counts the host-to-device and device-to-host copies. Each test
runs a function with the model on the shadow device and checks that

- the model (and what is returned) stays on the shadow device;
- the results equal those of the same run on the CPU: the shadow device computes with the same
  CPU kernels and its generators draw the CPU's stream, so with the same seed the arithmetic is
  the same, bit for bit (a different result means another draw, another order or another path);
- the copies do not grow with the number of steps, epochs, rounds or trials: a generator, a mask
  or test data left on the CPU would run on a GPU too, only with one copy per step, which no
  device error shows.

The CUDA cases of tests/test_devices.py run the real kernels where a GPU exists; these run
everywhere. The ``test_harness_*`` tests check the harness itself (negative controls).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import pytest
import torch
from _oracles import _assert_same, _loop_clipped_sum
from _shadow_device import SHADOW, Shadow, shadow_device, values
from conftest import load_shared_digits
from torch import nn
from torch.overrides import _get_current_function_mode_stack
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
from torch.utils.data import TensorDataset

from companion import data, models
from companion.attacks import loss_threshold_attack
from companion.audit import audit_dpsgd
from companion.dpsgd import (
    noisy_clipped_gradient,
    poisson_sample,
    set_private_gradients,
    train_dpsgd,
)
from companion.federated import client_datasets, dp_fedavg
from companion.per_example import PerExampleClipper, clipped_gradient_sum
from companion.training import train

pytestmark = pytest.mark.usefixtures("one_thread")

DIGITS = load_shared_digits()
X, Y = DIGITS.x_train[:120], DIGITS.y_train[:120]  # numpy arrays: the functions move them
TEST = {"x_test": X[:30], "y_test": Y[:30]}
Copies = Counter[tuple[str, str]]  # (direction, "file:line" in companion) -> number of copies


def _on_shadow(tensors: Iterable[torch.Tensor]) -> bool:
    return all(isinstance(t, Shadow) for t in tensors)


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: values(p.detach()) for name, p in model.named_parameters()}


def _run(run: Callable[[nn.Module, int], Any], n: int) -> tuple[dict, Any, Copies]:
    """``run(model, n)`` with ``models.mlp(seed=0)`` on the shadow device: the weights after it
    (CPU values), what it returned, and the copies it made (the model's own move not counted)."""
    with shadow_device() as copies:
        model = models.mlp(seed=0).to(SHADOW)
        copies.clear()
        result = run(model, n)
        assert _on_shadow(model.parameters()), "the model left the shadow device"
        weights = _weights(model)
    return weights, result, copies


def _assert_same_as_on_the_cpu(run: Callable[[nn.Module, int], Any]) -> tuple[Copies, Copies]:
    """Run ``run`` for n = 1 and 2 on the shadow device, and for n = 2 on the CPU; the weights
    and the results of n = 2 must be equal. Returns the copies of n = 1 and n = 2."""
    model = models.mlp(seed=0)
    expected = run(model, 2)
    _, _, one = _run(run, 1)
    weights, result, two = _run(run, 2)
    assert result == expected
    for name, p in model.named_parameters():
        assert torch.equal(weights[name], p.detach()), f"{name} differs from the CPU run"
    return one, two


def _assert_no_copy_per_step(one: Copies, two: Copies) -> None:
    grown = two - one
    assert not grown, f"copies that grow with the steps, (direction, site): count: {dict(grown)}"


def _train_dpsgd(model: nn.Module, epochs: int) -> list[dict[str, Any]]:
    return train_dpsgd(model, X, Y, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1,
                       epochs=epochs, delta=1e-4, seed=0, lr=0.1, **TEST)  # fmt: skip


def test_train_dpsgd_draws_and_keeps_everything_on_the_model_device():
    """Fails if the sampling or noise generator, the Poisson mask, the noise, the training or
    test data or the clipped count is on the CPU (a device error, or a copy per step or epoch),
    or if the shadow run draws or computes anything differently from the CPU run."""
    _assert_no_copy_per_step(*_assert_same_as_on_the_cpu(_train_dpsgd))


def test_train_dpsgd_on_a_dataset_copies_only_its_batches():
    """A Dataset's items are collated on the CPU, so each step copies its batch's inputs and
    targets (2 copies), and each epoch's evaluation of the 120 training examples (one evaluation
    batch) 2 more; nothing else may grow: the mask stays on the device (``nonzero().tolist()``
    is a sync, not a copy) and nothing comes back to the host."""
    dataset = TensorDataset(torch.tensor(X), torch.tensor(Y))

    def run(model: nn.Module, epochs: int) -> list[dict[str, Any]]:
        return train_dpsgd(model, dataset, noise_multiplier=1.0, max_grad_norm=1.0,
                           sample_rate=0.1, epochs=epochs, delta=1e-4, seed=0, **TEST,
                           optimizer=torch.optim.Adam(model.parameters(), lr=1e-3))  # fmt: skip

    one, two = _assert_same_as_on_the_cpu(run)
    grown = two - one
    steps = 10  # in the second epoch: sample_rate 0.1 (train_dpsgd takes 1 / sample_rate)
    assert {direction for direction, _ in grown} == {"h2d"}, dict(grown)
    assert sum(grown.values()) == 2 * steps + 2, dict(grown)


def test_a_clipper_and_set_private_gradients_on_the_device_draw_what_the_cpu_draws():
    """The low-level API, with the batch and a generator on the model's device: three Poisson
    batches through one PerExampleClipper and noisy_clipped_gradient, then
    set_private_gradients. Equal to the CPU run with the same seed; after the first step (where
    the clipper probes the model's layout, once) no step copies anything."""

    def steps(model: nn.Module, device: torch.device, copies: Copies) -> tuple[list, list, list]:
        x, y = torch.tensor(X).to(device), torch.tensor(Y).to(device)
        generator = torch.Generator(device=device).manual_seed(0)
        clipper = PerExampleClipper(model, loss="cross_entropy")
        results, copies_after = [], []
        for _ in range(3):
            mask = poisson_sample(len(y), sample_rate=0.2, generator=generator)
            results.append(noisy_clipped_gradient(clipper, x[mask], y[mask], noise_multiplier=1.0,
                max_grad_norm=1.0, expected_batch_size=24.0, generator=generator))  # fmt: skip
            copies_after.append(Counter(copies))
        set_private_gradients(model, x[:20], y[:20], noise_multiplier=1.0, max_grad_norm=1.0,
                              expected_batch_size=20.0, generator=generator)  # fmt: skip
        grads = [p.grad for p in model.parameters()]
        return results, grads, copies_after

    expected, expected_grads, _ = steps(models.mlp(seed=0), torch.device("cpu"), Counter())
    with shadow_device() as copies:
        model = models.mlp(seed=0).to(SHADOW)
        actual, grads, copies_after = steps(model, SHADOW, copies)
        assert _on_shadow([*grads, *model.parameters()])
        for result in actual:
            assert _on_shadow([*result.sums.values(), result.norms])
    _assert_no_copy_per_step(copies_after[0], copies_after[-1])
    for (sums, norms), (cpu_sums, cpu_norms) in zip(actual, expected, strict=True):
        assert torch.equal(values(norms), cpu_norms)
        assert all(torch.equal(values(sums[k]), cpu_sums[k]) for k in cpu_sums)
    assert all(torch.equal(values(g), e) for g, e in zip(grads, expected_grads, strict=True))


def test_train_moves_the_batches_of_its_cpu_shuffle_without_a_copy_per_step():
    """Non-private training shuffles on the CPU on purpose (public randomness, the same order
    on every device) and indexes the device's data with CPU indices, which CUDA allows. Fails if
    the training or test data stays on the CPU (a copy per batch or epoch) or a step differs."""

    def run(model: nn.Module, epochs: int) -> list[dict[str, Any]]:
        return train(model, X, Y, epochs=epochs, batch_size=20, lr=0.1, **TEST)

    _assert_no_copy_per_step(*_assert_same_as_on_the_cpu(run))


def test_dp_fedavg_draws_its_noise_on_the_model_device():
    """Three clients, all in every round (sample_rate 1). Fails if the server's noise generator,
    the aggregate or the test data is on the CPU, or a round differs from the CPU run."""
    clients = client_datasets(X, Y, data.partition_iid(len(Y), num_clients=3))

    def run(model: nn.Module, rounds: int) -> list[dict[str, Any]]:
        return dp_fedavg(model, clients, rounds=rounds, sample_rate=1.0, noise_multiplier=1.0,
                         max_update_norm=1.0, local_epochs=1, batch_size=None, lr=0.1,
                         delta=1e-3, seed=1, progress=False, **TEST)  # fmt: skip

    _assert_no_copy_per_step(*_assert_same_as_on_the_cpu(run))


def test_audit_dpsgd_draws_its_trials_on_the_gradients_device():
    """The canary audit with the per-example gradients on the shadow device: the same bound and
    scores as on the CPU, and no copy per trial (its generator and canary must be on the
    gradients' device)."""
    gradients = torch.randn(40, 20, generator=torch.Generator().manual_seed(0))

    def run(gradients: torch.Tensor, trials: int) -> Any:
        return audit_dpsgd(gradients, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5,
                           delta=1e-5, trials=trials, seed=0)  # fmt: skip

    expected = run(gradients, 20)  # on the CPU
    counts = []
    for trials in (10, 20):
        with shadow_device() as copies:
            on_device = gradients.to(SHADOW)
            copies.clear()
            result = run(on_device, trials)  # the last: 20 trials, as expected
        counts.append(copies)
    _assert_no_copy_per_step(*counts)
    assert result.epsilon == expected.epsilon
    assert list(result.scores_with) == list(expected.scores_with)
    assert list(result.scores_without) == list(expected.scores_without)


class _BagOfWords(nn.Module):
    """Embedding, mean over the tokens, LayerNorm, Linear: the Embedding rule's masks and
    ``unique_consecutive`` read values."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.norm, self.head = nn.Embedding(30, 8), nn.LayerNorm(8), nn.Linear(8, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.embed(tokens).mean(dim=1)))


class _ConvNet(nn.Module):
    """Conv2d, GroupNorm and Linear on the 8x8 digits given flat."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4)
        self.head = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.norm(self.conv(x.reshape(-1, 1, 8, 8)))).flatten(1))


def _mlp_batch() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    x = torch.tensor(X[:12], dtype=torch.float64)
    return models.mlp(seed=1).double(), x, torch.tensor(Y[:12])


def _text_batch() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 30, (12, 6), generator=generator)
    tokens[0] = 5  # one example repeats a token: its rows of the Embedding's gradient add up
    torch.manual_seed(0)
    return _BagOfWords().double(), tokens, torch.randint(0, 3, (12,), generator=generator)


def _conv_batch() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """80 examples: more than the convolution rule's chunk (64), so its per-example gradients
    come in two chunks."""
    torch.manual_seed(0)
    x = torch.tensor(X[:80], dtype=torch.float64)
    return _ConvNet().double(), x, torch.tensor(Y[:80])


@pytest.mark.parametrize(
    ("batch", "method"),
    [
        (_mlp_batch, "layerwise"),
        (_mlp_batch, "vmap"),
        (_text_batch, "layerwise"),
        (_text_batch, "vmap"),
        (_conv_batch, "layerwise"),  # not vmap: GroupNorm under vmap fails on shadow tensors
    ],
)
def test_clipped_gradient_sum_on_the_device_equals_the_cpu_one(batch, method):
    """The clipped sums (a norm of 1e-3 clips every example) equal those on the CPU: bit for bit
    where the arithmetic is the same; for the convolution, up to the float64 rounding of other
    kernels (relative 1e-16 per operation; 1e-12 leaves a wide margin). Fails if a rule builds an
    index or a mask on the other device or without values (a real meta tensor)."""
    model, x, y = batch()
    expected = clipped_gradient_sum(model, "cross_entropy", x, y, max_grad_norm=1e-3,
                                    method=method)  # fmt: skip
    with shadow_device():
        actual = clipped_gradient_sum(model.to(SHADOW), "cross_entropy", x.to(SHADOW),
                                      y.to(SHADOW), max_grad_norm=1e-3, method=method)  # fmt: skip
        assert _on_shadow(actual.values())
    actual = {name: values(t) for name, t in actual.items()}
    if batch is _conv_batch:
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-15)
    else:
        assert actual.keys() == expected.keys()
        assert all(torch.equal(actual[k], expected[k]) for k in expected)


@pytest.mark.parametrize("vocabulary", [3, 40])  # most positions repeat a pair; few do
def test_the_embedding_rule_on_the_device_matches_the_loop(vocabulary):
    """Off the CPU the Embedding rule sums the rows of every (example, token) pair with no count
    read back from the device: its sums have a row per position, and those past the last pair
    stay zero under the keys of the last positions. Example 0 holds token 0 twice here, and
    token 1, the padding, once: rows summed into another pair's sum, a pair's rows split, or an
    unused sum that is not zero would move a norm or a row of the Embedding's sum (checked against
    the per-example loop, with a clipping norm that clips every example)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Embedding(vocabulary, 4, padding_idx=1), nn.Flatten(), nn.Linear(24, 3)
    ).double()
    tokens = torch.randint(0, vocabulary, (10, 6), generator=torch.Generator().manual_seed(0))
    tokens[0, :3] = torch.tensor([0, 0, 1])
    y = torch.arange(10) % 3
    expected, norms = _loop_clipped_sum(model, "cross_entropy", tokens, y, 1e-3)
    assert float(norms.min()) > 1e-3
    with shadow_device():
        model, tokens, y = model.to(SHADOW), tokens.to(SHADOW), y.to(SHADOW)
        actual = clipped_gradient_sum(
            model, "cross_entropy", tokens, y, max_grad_norm=1e-3, return_norms=True
        )
    torch.testing.assert_close(values(actual.norms), norms, rtol=1e-12, atol=0)
    _assert_same({name: values(t) for name, t in actual.sums.items()}, expected)


def test_loss_threshold_attack_scores_cpu_data_with_a_model_on_the_device():
    """The attack moves the examples to the model and its scores back with ``.cpu()`` (a
    ``.numpy()`` of a device tensor raises): the same scores as on the CPU."""
    members, nonmembers = (X[:20], Y[:20]), (X[20:40], Y[20:40])
    expected = loss_threshold_attack(models.mlp(seed=0), members, nonmembers)
    with shadow_device():
        model = models.mlp(seed=0).to(SHADOW)
        result = loss_threshold_attack(model, members, nonmembers)
        assert _on_shadow(model.parameters())
    assert list(result.member_scores) == list(expected.member_scores)
    assert list(result.nonmember_scores) == list(expected.nonmember_scores)
    assert result.auc == expected.auc


# --- the harness itself ------------------------------------------------------------------------


def test_harness_raises_where_cuda_raises_and_counts_copies():
    """Negative controls: what the tests above rely on the harness to catch, it catches."""
    with shadow_device() as copies:
        x = torch.arange(4.0).to(SHADOW)
        assert isinstance(x, Shadow) and x.device == SHADOW
        assert torch.equal(values(x * torch.tensor(2.0)), torch.arange(4.0) * 2)  # 0-dim CPU ok
        with pytest.raises(RuntimeError, match="same device"):
            x + torch.ones(4)
        with pytest.raises(RuntimeError, match="indices should be either on cpu"):
            torch.ones(4)[x.long()]
        assert torch.equal(values(x[torch.tensor([0, 2])]), values(x[[0, 2]]))  # CPU indices ok
        generator = torch.Generator(device=SHADOW).manual_seed(0)
        with pytest.raises(RuntimeError, match="device type for generator"):
            torch.rand(3, generator=generator)  # a CPU draw with a device generator
        with pytest.raises(RuntimeError, match="device type for generator"):
            torch.rand(3, generator=torch.Generator(), device=SHADOW)
        draw = values(torch.rand(3, generator=generator, device=SHADOW))
        with pytest.raises(TypeError, match="numpy"):
            x.numpy()
        assert x.cpu().tolist() == x.tolist() == [0.0, 1.0, 2.0, 3.0]
        built = torch.tensor([1, 2], device=SHADOW)  # in C++: rerouted, else it has no values
        assert isinstance(built, Shadow) and values(built).tolist() == [1, 2]
    assert torch.equal(draw, torch.rand(3, generator=torch.Generator().manual_seed(0)))
    assert copies == {("h2d", "outside companion"): 2, ("d2h", "outside companion"): 1}


def test_harness_closes_everything_when_a_test_fails_inside_it():
    """An assertion that fails inside the context must not leave torch.Generator replaced or a
    mode active, or every later test of the session would run on a patched torch."""
    real_generator = torch.Generator
    with pytest.raises(AssertionError, match="inside"), shadow_device():
        x = torch.ones(2).to(SHADOW)
        assert torch.Generator is not real_generator
        raise AssertionError("a failure inside the context")
    assert torch.Generator is real_generator is torch._C.Generator
    assert _get_current_function_mode_stack() == []
    assert _get_current_dispatch_mode_stack() == []
    assert type(torch.zeros(2, device="meta")) is torch.Tensor  # a real meta tensor again
    with pytest.raises(RuntimeError, match="outside shadow_device"):
        x + 1
