"""Every function that runs a model runs it on the model's device, with data given on the CPU.

Each test runs on the CPU and, where one exists, on a GPU (``-k cuda`` selects the GPU cases): a
numpy array or a CPU Dataset given with a model on ``cuda`` must be moved there, and what is
returned must fit the model. The CPU cases check the tests themselves. The clipped sums are
compared with the per-example loop of ``tests/_oracles.py`` on the device, in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
from _oracles import _assert_same, _loop_clipped_sum
from torch import nn
from torch.utils.data import TensorDataset

from companion import data, models
from companion.attacks import logit_confidence, loss_threshold_attack, model_gradient
from companion.dpsgd import set_private_gradients, train_dpsgd
from companion.federated import client_datasets, dp_fedavg, fedavg, local_update
from companion.per_example import clipped_gradient_sum
from companion.training import evaluate, train

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU on this machine")
DEVICES = ["cpu", pytest.param("cuda", marks=GPU)]
DIGITS = data.load_digits(seed=0)
X, Y = DIGITS.x_train[:120], DIGITS.y_train[:120]  # numpy arrays, converted on the CPU


class _ConvNet(nn.Module):
    """Conv2d, GroupNorm and Linear on the 8x8 digits given flat."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.head = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm(self.conv(x.reshape(-1, 1, 8, 8))))
        return self.head(h.flatten(1))


class _BagOfWords(nn.Module):
    """Embedding, mean over the tokens, LayerNorm, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(30, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.embed(tokens).mean(dim=1)))


def _devices(tensors) -> set[str]:
    return {t.device.type for t in tensors}


@pytest.mark.parametrize("device", DEVICES)
def test_training_federated_learning_and_attacks_take_cpu_data(device):
    model = models.mlp(seed=0).to(device)
    assert set(evaluate(model, X, Y)) == {"accuracy", "loss"}
    history = train(model, X, Y, epochs=1, batch_size=20, lr=0.1, x_test=X[:30], y_test=Y[:30])
    assert math.isfinite(history[-1]["test_loss"])
    update = local_update(model, X[:40], Y[:40], epochs=1, batch_size=10, lr=0.1)
    assert _devices(update.values()) == {device}
    clients = client_datasets(X, Y, data.partition_iid(len(Y), num_clients=3))
    fedavg(model, clients, rounds=2, client_fraction=0.5, local_epochs=1, batch_size=None,
           lr=0.1, x_test=X[:30], y_test=Y[:30], progress=False)  # fmt: skip
    # seed 1 samples nobody in round 2: the server adds pure noise, made on the model's device
    history = dp_fedavg(model, clients, rounds=2, sample_rate=0.3, noise_multiplier=1.0,
                        max_update_norm=1.0, local_epochs=1, batch_size=None, lr=0.1,
                        delta=1e-3, seed=1, progress=False)  # fmt: skip
    assert [record["clients"] for record in history] == [[2], []]
    assert logit_confidence(model, X[:10], Y[:10]).shape == (10,)
    result = loss_threshold_attack(model, (X[:20], Y[:20]), (X[20:40], Y[20:40]))
    assert 0 <= result.auc <= 1
    gradient = model_gradient(model, X[:1], Y[:1])
    assert _devices(gradient.values()) == {device}
    assert _devices(model.parameters()) == {device}


@pytest.mark.parametrize("device", DEVICES)
def test_train_dpsgd_with_a_dataset_an_optimizer_and_test_data(device):
    torch.manual_seed(0)
    model = _ConvNet().to(device)
    dataset = TensorDataset(torch.tensor(X), torch.tensor(Y))
    history = train_dpsgd(model, dataset, noise_multiplier=1.0, max_grad_norm=1.0,
                          sample_rate=0.1, epochs=1, delta=1e-4, seed=0,
                          optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
                          x_test=X[:30], y_test=Y[:30])  # fmt: skip
    assert history[-1]["steps"] == 10 and math.isfinite(history[-1]["test_loss"])
    assert _devices(model.parameters()) == {device}


def _conv_batch() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    x = torch.tensor(DIGITS.x_train[:12], dtype=torch.float64)
    return _ConvNet(), x, torch.tensor(DIGITS.y_train[:12])


def _text_batch() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 30, (12, 6), generator=generator)
    tokens[0] = 5  # one example repeats a token: its rows of the Embedding's gradient add up
    return _BagOfWords(), tokens, torch.randint(0, 3, (12,), generator=generator)


def _mlp_batch() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    x = torch.tensor(DIGITS.x_train[:12], dtype=torch.float64)
    return models.mlp(seed=1), x, torch.tensor(DIGITS.y_train[:12])


@pytest.mark.parametrize("method", ["layerwise", "vmap"])
@pytest.mark.parametrize("batch", [_conv_batch, _text_batch, _mlp_batch])
@pytest.mark.parametrize("device", DEVICES)
def test_clipped_sums_match_the_loop_on_the_device(device, batch, method):
    """The per-layer rules (on a GPU the Embedding's reads no count back, and the chunks of
    examples are larger) and vmap against the loop, with a clipping norm that clips every
    example."""
    torch.manual_seed(0)
    model, x, y = batch()
    model, x, y = model.double().to(device), x.to(device), y.to(device)
    expected, norms = _loop_clipped_sum(model, "cross_entropy", x, y, 1e-3)
    assert float(norms.min()) > 1e-3
    actual = clipped_gradient_sum(model, "cross_entropy", x, y, max_grad_norm=1e-3, method=method)
    assert _devices(actual.values()) == {device}
    _assert_same(actual, expected)


@GPU
def test_building_a_model_leaves_the_gpu_generator_alone():
    torch.cuda.manual_seed(1)
    expected = torch.randn(5, device="cuda")
    torch.cuda.manual_seed(1)
    models.mlp(seed=0)
    assert torch.equal(torch.randn(5, device="cuda"), expected)


@pytest.mark.parametrize(
    "run",
    [
        lambda m: train_dpsgd(
            m, X, Y, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1, epochs=1,
            lr=0.1, delta=1e-3,
        ),
        lambda m: train(m, X, Y, epochs=1, batch_size=16, lr=0.1),
        lambda m: fedavg(
            m, client_datasets(X, Y, data.partition_iid(len(Y), num_clients=2)), rounds=1,
            client_fraction=1.0, local_epochs=1, batch_size=None, lr=0.1,
        ),
    ],
    ids=["train_dpsgd", "train", "fedavg"],
)  # fmt: skip
def test_a_model_on_the_meta_device_is_refused_with_the_fix(run):
    """A model built under torch.device("meta") holds no values: torch's error was about an
    operator with no meta kernel; the message says to materialise and initialise it."""
    with torch.device("meta"):
        model = models.logistic_regression()
    with pytest.raises(ValueError, match=r"meta device, which hold no values: call .*to_empty"):
        run(model)


@pytest.mark.parametrize(
    "run",
    [
        lambda m, x, y: train_dpsgd(
            m, x, y, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1, epochs=1,
            lr=0.1, delta=1e-3,
        ),
        lambda m, x, y: clipped_gradient_sum(m, "cross_entropy", x, y, max_grad_norm=1.0),
        lambda m, x, y: set_private_gradients(
            m, x, y, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=8.0,
            generator=torch.Generator().manual_seed(0),
        ),
        lambda m, x, y: train(m, x, y, epochs=1, batch_size=16, lr=0.1),
    ],
    ids=["train_dpsgd", "clipped_gradient_sum", "set_private_gradients", "train"],
)  # fmt: skip
def test_data_on_the_meta_device_is_refused(run):
    """The coursework trial's F5: inputs made on the meta device hold no values; torch's error
    was "Tensor.item() cannot be called on meta tensors", from companion's finiteness check."""
    x, y = torch.as_tensor(X[:8]).to("meta"), torch.as_tensor(Y[:8]).to("meta")
    with pytest.raises(ValueError, match=r"^x\w* is on the meta device, which holds no values"):
        run(models.logistic_regression(), x, y)


class _MetaBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(64, 10)
        self.register_buffer("scale", torch.ones(64), persistent=False)

    def forward(self, x):
        return self.linear(x * self.scale)


@pytest.mark.parametrize(
    "run",
    [
        lambda m: evaluate(m, X, Y),
        lambda m: clipped_gradient_sum(
            m, "cross_entropy", torch.as_tensor(X[:4]), torch.as_tensor(Y[:4]), max_grad_norm=1.0
        ),
        lambda m: train(m, X, Y, epochs=1, batch_size=16, lr=0.1),
    ],
    ids=["evaluate", "clipped_gradient_sum", "train"],
)
def test_a_buffer_left_on_the_meta_device_is_refused(run):
    """Built on meta, then loaded with assign=True: the parameters land on the CPU, but a
    non-persistent buffer stays on meta; evaluate returned numbers read from no values."""
    with torch.device("meta"):
        model = _MetaBuffer()
    cpu = {name: torch.zeros(p.shape) for name, p in model.named_parameters()}
    model.load_state_dict(cpu, assign=True)
    assert not any(p.is_meta for p in model.parameters()) and model.scale.is_meta
    with pytest.raises(ValueError, match=r"meta device, which hold no values"):
        run(model)
