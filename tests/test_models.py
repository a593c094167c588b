"""Tests of companion.models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from companion import models
from companion.dpsgd import check_dp_compatible

# name -> (factory, the same architecture written out by hand, input features, outputs)
ARCHITECTURES = {
    "logistic_regression": (
        models.logistic_regression,
        lambda: nn.Sequential(nn.Linear(64, 10)),
        64,
        10,
    ),
    "mlp": (
        models.mlp,
        lambda: nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)),
        64,
        10,
    ),
    "small_cnn": (
        models.small_cnn,
        lambda: nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(128, 10),
        ),
        64,
        10,
    ),
    "binary_mlp": (
        models.binary_mlp,
        lambda: nn.Sequential(nn.Linear(2, 10), nn.ReLU(), nn.Linear(10, 1)),
        2,
        1,
    ),
}
NAMES = sorted(ARCHITECTURES)


def _weights(model):
    return [p.detach().clone() for p in model.state_dict().values()]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_weights_other_seed_other_weights(name):
    factory = ARCHITECTURES[name][0]
    assert _same(_weights(factory(seed=3)), _weights(factory(seed=3)))
    assert not _same(_weights(factory(seed=3)), _weights(factory(seed=4)))
    # numpy integers are integers too
    assert _same(_weights(factory(seed=np.int64(3))), _weights(factory(seed=3)))


@pytest.mark.parametrize("name", NAMES)
def test_weights_are_pytorch_defaults_drawn_from_the_seed_alone(name):
    """As documented: default initialisation under torch.manual_seed(seed), whatever the global
    random state was before."""
    factory, by_hand, _, _ = ARCHITECTURES[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        expected = by_hand()
        torch.manual_seed(123)  # a different global state must not matter
        actual = factory(seed=7)
    assert [type(m) for m in actual.modules()] == [type(m) for m in expected.modules()]
    assert actual.state_dict().keys() == expected.state_dict().keys()
    assert _same(_weights(actual), _weights(expected))


@pytest.mark.parametrize("name", NAMES)
def test_building_a_model_leaves_the_global_random_state_alone(name):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        state = torch.get_rng_state()
        ARCHITECTURES[name][0](seed=5)
        assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("name", NAMES)
def test_building_a_model_does_not_reseed_the_gpus(name, monkeypatch):
    """torch.manual_seed would also reseed every GPU generator (queued until CUDA starts), which
    fork_rng(devices=[]) does not restore: dropout on a GPU would then replay the model's seed."""
    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: calls.append(seed))
    ARCHITECTURES[name][0](seed=5)
    assert calls == []


@pytest.mark.parametrize("n", [1, 7])
@pytest.mark.parametrize("name", NAMES)
def test_output_shapes(name, n):
    factory, _, features, outputs = ARCHITECTURES[name]
    model = factory()
    assert isinstance(model, nn.Sequential)
    out = model(torch.zeros(n, features))
    assert out.shape == (n, outputs) and out.dtype == torch.float32


def test_parameter_counts_follow_the_documented_architectures():
    counts = {name: sum(p.numel() for p in ARCHITECTURES[name][0]().parameters()) for name in NAMES}
    assert counts == {
        "logistic_regression": 64 * 10 + 10,
        "mlp": 64 * 128 + 128 + 128 * 10 + 10,
        "small_cnn": (16 * 9 + 16) + (32 * 16 * 9 + 32) + (32 * 2 * 2 * 10 + 10),
        "binary_mlp": 2 * 10 + 10 + 10 * 1 + 1,
    }


def test_options_change_the_shapes():
    assert models.logistic_regression(n_features=5, n_classes=3)(torch.zeros(4, 5)).shape == (4, 3)
    assert models.mlp(n_features=5, hidden=7, n_classes=2)[0].out_features == 7
    assert models.small_cnn(n_classes=4)(torch.zeros(2, 64)).shape == (2, 4)
    assert models.binary_mlp(n_features=3, hidden=4)(torch.zeros(6, 3)).shape == (6, 1)


@pytest.mark.parametrize("name", NAMES)
def test_no_batch_normalisation_anywhere(name):
    model = ARCHITECTURES[name][0]()
    assert not any(isinstance(m, _BatchNorm) for m in model.modules())
    check_dp_compatible(model)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: models.logistic_regression(n_classes=1), ValueError, "n_classes must be >= 2"),
        (lambda: models.mlp(n_classes=1), ValueError, "n_classes must be >= 2"),
        (lambda: models.small_cnn(n_classes=1), ValueError, "n_classes must be >= 2"),
        (lambda: models.mlp(n_classes=0), ValueError, "n_classes must be >= 1"),
        (lambda: models.mlp(n_classes=2.0), TypeError, "n_classes must be an integer"),
        (lambda: models.mlp(hidden=0), ValueError, "hidden must be >= 1"),
        (lambda: models.binary_mlp(hidden=0), ValueError, "hidden must be >= 1"),
        (lambda: models.mlp(hidden=2.5), TypeError, "hidden must be an integer"),
        (lambda: models.logistic_regression(n_features=0), ValueError, "n_features must be >= 1"),
        (lambda: models.binary_mlp(n_features=True), TypeError, "n_features must be an integer"),
        (lambda: models.mlp(seed=-1), ValueError, "seed must be >= 0"),
        (lambda: models.small_cnn(seed=-3), ValueError, "seed must be >= 0"),
        (lambda: models.logistic_regression(seed=True), TypeError, "seed must be an integer"),
        (lambda: models.binary_mlp(seed=1.0), TypeError, "seed must be an integer"),
        (lambda: models.mlp(seed="0"), TypeError, "seed must be an integer"),
        (lambda: models.small_cnn(seed=None), TypeError, "seed must be an integer"),
    ],
)
def test_bad_arguments(call, error, message):
    with pytest.raises(error, match=message):
        call()
