"""Tests of companion.dpsgd.train_dpsgd for coursework: target epsilon, continued accounting, any
optimizer, callable losses, Datasets, a public normaliser, the device, and the port to Opacus.

Accounting claims are checked against an independent computation: compute_rdp for the total
number of steps (or Opacus's own accountant), never against the loop's own accountant object.
Training runs are float64 on 160 digits with q = 1/8 (8 steps an epoch), so two runs that should
be the same function of the same random draws agree to rounding (1e-12 relative).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from companion import data, models
from companion._outputs import check_outputs
from companion.accounting import (
    DEFAULT_ORDERS,
    PLDAccountant,
    RDPAccountant,
    compute_rdp,
    get_noise_multiplier,
    get_privacy_spent,
    steps_for_epochs,
)
from companion.dpsgd import set_private_gradients, train_dpsgd
from companion.per_example import clipped_gradient_sum

DIGITS = data.load_digits(seed=0)
N = 160
Q = 0.125
X = torch.tensor(DIGITS.x_train[:N], dtype=torch.float64)
Y = torch.tensor(DIGITS.y_train[:N])
DELTA = 1e-4


def _model(seed=1):
    return models.logistic_regression(seed=seed).double()


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _run(model=None, x=X, y=Y, **overrides):
    model = _model() if model is None else model
    arguments = (
        dict(
            max_grad_norm=1.0,
            sample_rate=Q,
            epochs=2,
            delta=DELTA,
            noise_multiplier=1.0,
            lr=0.5,
            seed=0,
        )
        | overrides
    )
    history = train_dpsgd(model, x, y, **arguments)
    return model, history


def _rdp_epsilon(sigma, steps, q=Q, delta=DELTA):
    rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=DEFAULT_ORDERS)
    return get_privacy_spent(orders=DEFAULT_ORDERS, rdp=rdp, delta=delta)[0]


class _TupleModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10).double()

    def forward(self, x):
        return self.fc(x), x


# --- accounting ---------------------------------------------------------------------------------


def test_continuing_through_accountant_reports_the_epsilon_of_one_long_run():
    accountant = RDPAccountant()
    _run(epochs=2, accountant=accountant)
    _, history = _run(epochs=3, accountant=accountant, seed=1)
    assert len(accountant) == 5 * 8
    assert history[-1]["epsilon"] == pytest.approx(_rdp_epsilon(1.0, 5 * 8), rel=1e-12)
    assert history[-1]["steps"] == 3 * 8  # this run's steps; the accountant holds the total


def test_a_second_call_never_replays_the_first_calls_noise():
    """Default seed None: fresh entropy, so two runs from the same start differ; the same explicit
    seed reproduces a run bit for bit."""
    a, _ = _run(seed=None)
    b, _ = _run(seed=None)
    assert not torch.equal(_flat(a), _flat(b))
    c, _ = _run(seed=5)
    d, _ = _run(seed=5)
    assert torch.equal(_flat(c), _flat(d))


def test_continuing_an_accountant_with_the_same_seed_draws_new_batches_and_noise():
    """Two calls from the same weights with seed 5: with a new accountant each, the same run;
    with the second continuing the first's accountant, another one (before, the same: the
    difference of two continued runs' updates would have been noise-free)."""
    first = RDPAccountant()
    a, _ = _run(seed=5, accountant=first)
    b, _ = _run(seed=5, accountant=RDPAccountant())
    assert torch.equal(_flat(a), _flat(b))
    continued, _ = _run(seed=5, accountant=first)
    assert not torch.allclose(_flat(a), _flat(continued))
    assert len(first) == 2 * 2 * 8
    again_first = RDPAccountant()
    _run(seed=5, accountant=again_first)
    again, _ = _run(seed=5, accountant=again_first)  # the derived seed is reproducible
    assert torch.equal(_flat(continued), _flat(again))


@pytest.mark.parametrize("target", [1.0, 3.0, 8.0])
def test_target_epsilon_is_reached_within_two_percent_and_never_exceeded(target):
    _, history = _run(target_epsilon=target, noise_multiplier=None, epochs=4)
    steps = steps_for_epochs(epochs=4, sample_rate=Q)
    spent = _rdp_epsilon(history[-1]["noise_multiplier"], steps)
    assert history[-1]["epsilon"] == pytest.approx(spent, rel=1e-12)
    assert 0.98 * target <= spent <= target


def test_target_epsilon_counts_what_the_accountant_already_spent():
    accountant = RDPAccountant()
    _run(epochs=2, accountant=accountant)
    _, history = _run(target_epsilon=6.0, noise_multiplier=None, accountant=accountant)
    sigma = history[-1]["noise_multiplier"]
    expected = RDPAccountant()
    for sigma_k, steps in ((1.0, 16), (sigma, 16)):
        for _ in range(steps):
            expected.step(noise_multiplier=sigma_k, sample_rate=Q)
    total = expected.get_epsilon(DELTA)
    assert 0.98 * 6.0 <= total <= 6.0
    with pytest.raises(ValueError, match="already spent"):
        _run(target_epsilon=2.0, noise_multiplier=None, accountant=accountant)


def test_the_same_hyperparameters_given_to_opacus_give_the_same_epsilon():
    """The port: make_private with the same sigma, C, Poisson rate (a DataLoader of N/8 = 20 per
    batch gives q = 1/8) and the same number of steps; Opacus's RDP accountant then reports the
    epsilon our run reports."""
    opacus = pytest.importorskip("opacus")
    epochs = 2
    _, history = _run(epochs=epochs)
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    loader = torch.utils.data.DataLoader(TensorDataset(X, Y), batch_size=int(N * Q))
    engine = opacus.PrivacyEngine(accountant="rdp")
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=True,
    )
    criterion = nn.CrossEntropyLoss()
    for _ in range(epochs):
        for xb, yb in loader:
            optimizer.zero_grad()
            if len(xb):
                criterion(model(xb), yb).backward()
            optimizer.step()
    assert engine.accountant.history[0][2] == steps_for_epochs(epochs=epochs, sample_rate=Q)
    assert history[-1]["epsilon"] == pytest.approx(engine.get_epsilon(DELTA), rel=1e-6)


# --- optimizers, losses, data, normaliser -------------------------------------------------------


def test_an_sgd_optimizer_is_the_same_as_plain_lr():
    plain, _ = _run()
    model = _model()
    via_optimizer, _ = _run(model, lr=None, optimizer=torch.optim.SGD(model.parameters(), lr=0.5))
    torch.testing.assert_close(_flat(via_optimizer), _flat(plain), rtol=1e-12, atol=1e-14)


def test_any_optimizer_receives_the_noisy_gradient():
    """Adam's first step is lr * g / (|g| + eps) coordinate-wise (bias-corrected m = g, v = g^2),
    which shows the optimizer stepped on the private gradient written into .grad."""
    model = _model()
    before = _flat(model)
    norms = set_private_gradients(
        model,
        X[:20],
        Y[:20],
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=20.0,
        generator=torch.Generator().manual_seed(0),
    )
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.optim.Adam(model.parameters(), lr=0.01).step()
    step = _flat(model) - before
    torch.testing.assert_close(step, -0.01 * grad / (grad.abs() + 1e-8), rtol=1e-9, atol=1e-15)
    assert norms.shape == (20,)


def test_a_dataset_gives_the_same_run_as_tensors():
    tensors, _ = _run()
    model, history = _run(x=TensorDataset(X, Y), y=None)
    torch.testing.assert_close(_flat(model), _flat(tensors), rtol=1e-12, atol=1e-14)
    assert {"train_loss", "train_accuracy"} <= set(history[-1])


class _Bag(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(50, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, tokens):
        return self.head(self.embedding(tokens).mean(dim=1))


def test_integer_token_tensors_train_an_embedding_model_as_a_dataset_of_them_does():
    """Token ids reach the model as integers (a TensorDataset of them always did); the two runs
    with one seed give the same weights, and the model did train (it moved)."""
    tokens = torch.randint(0, 50, (N, 6), generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 2, (N,), generator=torch.Generator().manual_seed(2))

    def build():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return _Bag()

    from_tensors, _ = _run(build(), x=tokens, y=labels)
    from_dataset, _ = _run(build(), x=TensorDataset(tokens, labels), y=None)
    torch.testing.assert_close(_flat(from_tensors), _flat(from_dataset), rtol=0, atol=0)
    assert not torch.equal(_flat(from_tensors), _flat(build()))


def test_a_callable_regression_loss_trains_and_records_the_loss():
    """Noise-free DP-SGD (sigma 0, a huge C) with nn.MSELoss is SGD on Poisson batches; on a
    noiseless linear target the training loss falls by orders of magnitude."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, generator=generator, dtype=torch.float64)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64)
    model = nn.Linear(3, 1).double()
    history = train_dpsgd(
        model,
        x,
        y,
        loss=nn.MSELoss(),
        noise_multiplier=0.0,
        max_grad_norm=1e6,
        sample_rate=0.25,
        epochs=30,
        lr=0.1,
        delta=1e-3,
        seed=0,
    )
    assert "train_accuracy" not in history[-1]
    assert history[-1]["train_loss"] < 1e-3 * history[0]["train_loss"]
    assert history[-1]["epsilon"] == math.inf


@pytest.mark.parametrize(
    ("loss", "targets", "message"),
    [
        # (N, 1) outputs against (N,) targets broadcast to (N, N): every output meets every target
        (nn.MSELoss(), lambda y: y[:, 0], "returned .*, while the mean of its values on each"),
        (nn.MSELoss(reduction="sum"), lambda y: y, "not a sum \\(reduction='sum'\\)"),
        (nn.MSELoss(reduction="none"), lambda y: y, "it returned a tensor of shape \\(4, 1\\)"),
        (lambda outputs, targets: 1.0, lambda y: y, "it returned a float"),
    ],
)
def test_a_callable_loss_that_is_not_the_mean_of_the_examples_losses_is_refused(
    loss, targets, message
):
    """Before the check, the first case trained on wrong gradients with only torch's broadcast
    warning, and the second gave the per-example rules 8 times vmap's gradient (batch of 8)."""
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64)
    model = nn.Linear(3, 1).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's broadcast warning
        with pytest.raises(ValueError, match=f"loss must return the mean.*{message}"):
            _run(model, x=x, y=targets(y), loss=loss)
        with pytest.raises(ValueError, match=f"loss must return the mean.*{message}"):
            clipped_gradient_sum(model, loss, x, targets(y), max_grad_norm=1.0)


def test_the_loss_check_allows_bfloat16_rounding_and_names_weighted_means():
    """bfloat16 keeps 8 significant bits, so a batch's mean loss and the mean of the examples'
    losses differ by a few of its roundings: no model of 50 is refused (with a tolerance of 1e-4,
    11 were). A class-weighted cross-entropy divides by the sum of the batch's weights, a
    weighted mean: refused, and the message names class weights."""
    for seed in range(50):
        torch.manual_seed(seed)
        model = nn.Linear(4, 3).to(torch.bfloat16)
        x, y = torch.randn(8, 4, dtype=torch.bfloat16), torch.randint(0, 3, (8,))
        check_outputs(model, x, y, loss=nn.CrossEntropyLoss())
    weighted = nn.CrossEntropyLoss(weight=torch.linspace(0.2, 5.0, 10, dtype=torch.float64))
    with pytest.raises(ValueError, match="nor a weighted mean \\(class weights, ignore_index"):
        _run(loss=weighted)


def test_the_normaliser_is_a_public_argument():
    """Every step is lr * (noisy clipped sum) / expected_batch_size, so doubling both the
    learning rate and the expected batch size gives the same run."""
    a, _ = _run(lr=0.5)
    b, _ = _run(lr=1.0, expected_batch_size=2 * Q * N)
    torch.testing.assert_close(_flat(a), _flat(b), rtol=1e-12, atol=1e-14)
    c, _ = _run(lr=0.5, expected_batch_size=2 * Q * N)
    assert not torch.allclose(_flat(a), _flat(c))


def test_runs_on_the_models_device_cpu():
    model, history = _run(model=_model().to("cpu"))
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert len(history) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU on this machine")
def test_runs_on_the_models_device_gpu():
    model = models.mlp(seed=0).to("cuda")
    history = train_dpsgd(
        model,
        DIGITS.x_train,
        DIGITS.y_train,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        sample_rate=0.1,
        epochs=2,
        lr=0.5,
        delta=1e-5,
        seed=0,
    )
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert history[-1]["train_accuracy"] > 0.3


# --- bad input ----------------------------------------------------------------------------------


def _other_model_optimizer():
    return torch.optim.SGD(_model().parameters(), lr=0.1)


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"target_epsilon": 1.0}, ValueError, "exactly one of noise_multiplier and target_epsilon"),
        (
            {"noise_multiplier": None},
            ValueError,
            "exactly one of noise_multiplier and target_epsilon",
        ),
        (
            {"noise_multiplier": None, "target_epsilon": -1.0},
            ValueError,
            "target_epsilon must be > 0",
        ),
        ({"lr": None}, ValueError, "give lr"),
        ({"optimizer": "sgd", "lr": None}, TypeError, "optimizer must be a torch.optim.Optimizer"),
        (
            {"optimizer": _other_model_optimizer(), "lr": None},
            ValueError,
            "does not hold the model",
        ),
        ({"accountant": "rdp"}, TypeError, "accountant must be a companion.accounting.RDPAcc"),
        ({"accountant": RDPAccountant}, TypeError, r"the class RDPAccountant; pass an instance"),
        ({"expected_batch_size": 0.0}, ValueError, "expected_batch_size must be > 0"),
        ({"loss": 3}, TypeError, "loss must be one of"),
    ],
)
def test_bad_arguments(overrides, error, message):
    with pytest.raises(error, match=message):
        _run(**overrides)


def test_labels_out_of_range_and_mismatched_outputs_are_explained():
    with pytest.raises(ValueError, match="labels must be below the model's 10 outputs"):
        _run(y=Y + 10)
    with pytest.raises(ValueError, match="loss='bce' needs one output logit"):
        _run(y=(Y > 4).long(), loss="bce")


class _CentredOverTheBatch(nn.Module):
    """Subtracts the batch's mean input: one example changes every other example's gradient."""

    def __init__(self):
        super().__init__()
        self.lin = _model()

    def forward(self, x):
        return self.lin(x - x.mean(dim=0))


def test_a_model_that_returns_probabilities_gets_a_warning():
    with pytest.warns(UserWarning, match="look like probabilities"):
        _run(model=nn.Sequential(_model(), nn.Softmax(dim=1)), epochs=1)


class _SqueezedLogit(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 1).double()

    def forward(self, x):
        return self.lin(x).squeeze()  # 0-d for one example


def test_a_binary_model_that_squeezes_its_logit_trains():
    """The independence check compares one example's 0-d output with its row of the batch's."""
    _, history = _run(model=_SqueezedLogit(), y=(Y > 4).long(), loss="bce")
    assert len(history) == 2 and math.isfinite(history[-1]["train_loss"])


@pytest.mark.parametrize("data", ["tensors", "dataset"])
def test_a_forward_pass_that_mixes_examples_is_refused(data):
    x, y = (X, Y) if data == "tensors" else (TensorDataset(X, Y), None)
    with pytest.raises(ValueError, match="depends on the other examples of its batch"):
        _run(model=_CentredOverTheBatch(), x=x, y=y)


def test_a_dataset_with_separate_labels_is_refused():
    with pytest.raises(ValueError, match="give y only with tensor or array inputs"):
        _run(x=TensorDataset(X, Y))
    with pytest.raises(ValueError, match="give y_test only with tensor or array inputs"):
        _run(x_test=TensorDataset(X, Y), y_test=Y)


def test_a_dataloader_is_refused_with_a_pointer_to_its_dataset():
    with pytest.raises(TypeError, match=r"x is a DataLoader: pass its Dataset \(x.dataset\)"):
        _run(x=DataLoader(TensorDataset(X, Y), batch_size=16), y=None)


def test_test_data_may_be_a_dataset():
    """The same run with the test set as tensors and as a Dataset: identical records (the
    evaluation draws nothing); its labels are checked like the training Dataset's."""
    _, as_tensors = _run(x_test=X[:40], y_test=Y[:40])
    _, as_dataset = _run(x_test=TensorDataset(X[:40], Y[:40]))
    assert as_dataset == as_tensors and "test_accuracy" in as_dataset[-1]
    with pytest.raises(ValueError, match="the targets of the Dataset x_test must hold class"):
        _run(x_test=TensorDataset(X[:40], Y[:40] - 1))


class _Triples(torch.utils.data.Dataset):
    def __len__(self):
        return N

    def __getitem__(self, i):
        return X[i], Y[i], i


def _late_bad_label():
    """Labels in range for the first 256 examples (checked before training), then one of 12."""
    x = torch.cat([X, X])[:300]
    y = torch.cat([Y, Y])[:300].clone()
    y[280] = 12
    return TensorDataset(x, y)


@pytest.mark.parametrize(
    ("dataset", "overrides", "error", "message"),
    [
        (
            _Triples(),
            {},
            ValueError,
            r"must return \(input, target\) pairs; one of its items is a ",
        ),
        (
            TensorDataset(X, Y - 1),
            {},
            ValueError,
            "the targets of the Dataset x must hold class labels >=",
        ),
        (
            TensorDataset(X, Y.double()),
            {},
            TypeError,
            "the targets of the Dataset x must hold integer",
        ),
        (TensorDataset(X, Y + 10), {}, ValueError, "labels must be below the model's 10 outputs"),
        (_late_bad_label(), {"sample_rate": 1.0}, ValueError, "got a label 12 in the Dataset x"),
        (TensorDataset(X, Y > 4), {"loss": "bce"}, ValueError, "loss='bce' needs one output logit"),
        (TensorDataset(X.float(), Y), {}, ValueError, "model cannot be applied to the inputs"),
    ],
)
def test_a_datasets_items_are_checked_as_tensors_are(dataset, overrides, error, message):
    """Before, a Dataset skipped the checks of tensor data, and each of these cases failed with a
    torch error from inside the step (the last: float32 inputs to the float64 model)."""
    with pytest.raises(error, match=message):
        _run(x=dataset, y=None, **overrides)


def test_numpy_inputs_are_accepted():
    model = models.logistic_regression(seed=0)
    history = train_dpsgd(
        model,
        DIGITS.x_train[:N],
        np.asarray(DIGITS.y_train[:N]),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        sample_rate=Q,
        epochs=1,
        lr=0.1,
        delta=DELTA,
        seed=0,
    )
    assert history[-1]["steps"] == 8


@pytest.mark.parametrize(
    ("case", "error", "message"),
    [
        (
            "wrong_feature_count",
            ValueError,
            r"model cannot be applied to the inputs \(one example has shape \(32,\)",
        ),
        ("float32_model_float64_x", ValueError, "dtype torch.float64"),
        ("tuple_output", TypeError, "model must return a tensor of outputs, got tuple"),
        ("test_label_out_of_range", ValueError, "labels must be below the model's 10 outputs"),
        ("overflowing_noise", ValueError, "is too large for torch.float64 noise"),
    ],
)
def test_the_newcomer_bad_input_table(case, error, message):
    """Rows of the coursework review's table that used to end in a torch-internal error."""
    model, x, y, extra = _model(), X, Y, {}
    if case == "wrong_feature_count":
        x = X[:, :32]
    elif case == "float32_model_float64_x":
        model = models.logistic_regression(seed=1)
    elif case == "tuple_output":
        model = _TupleModel()
    elif case == "test_label_out_of_range":
        extra = {"x_test": X[:5], "y_test": Y[:5] + 10}
    elif case == "overflowing_noise":
        extra = {"noise_multiplier": 1e307}
    with pytest.raises(error, match=message):
        _run(model, x=x, y=y, **extra)


def test_int32_labels_are_accepted_as_class_labels():
    _, a = _run(y=Y.int())
    _, b = _run()
    assert a[-1]["train_loss"] == b[-1]["train_loss"]


def test_get_noise_multiplier_with_epochs_uses_the_training_loops_steps():
    """A student who calibrates with epochs= and trains for those epochs spends at most the
    target: the two use one steps rule (the coursework review found 1.021 / 3.076 / 8.213 for
    targets 1 / 3 / 8 with a different rule)."""
    for target in (1.0, 3.0, 8.0):
        sigma = get_noise_multiplier(
            target_epsilon=target, target_delta=DELTA, sample_rate=Q, epochs=3
        )
        _, history = _run(noise_multiplier=sigma, epochs=3)
        assert target - 0.01 <= history[-1]["epsilon"] <= target
    with pytest.raises(ValueError, match="exactly one of steps and epochs"):
        get_noise_multiplier(
            target_epsilon=1.0, target_delta=DELTA, sample_rate=Q, steps=8, epochs=1
        )


def test_a_pld_accountant_can_be_continued_and_targeted():
    """train_dpsgd takes any accountant with step/get_epsilon: with PLDAccountant the target is
    met under PLD, and the epsilon reported equals dp_accounting's for the same Poisson-sampled
    Gaussian steps (to the discretisation error, 1e-3)."""
    dp_accounting = pytest.importorskip("dp_accounting")
    accountant = PLDAccountant()
    _, history = _run(target_epsilon=2.0, noise_multiplier=None, accountant=accountant, epochs=3)
    sigma, steps = history[-1]["noise_multiplier"], steps_for_epochs(epochs=3, sample_rate=Q)
    assert 0.98 * 2.0 <= history[-1]["epsilon"] <= 2.0
    reference = dp_accounting.pld.PLDAccountant()
    event = dp_accounting.PoissonSampledDpEvent(Q, dp_accounting.GaussianDpEvent(sigma))
    reference.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    assert history[-1]["epsilon"] == pytest.approx(reference.get_epsilon(DELTA), abs=1e-3)
