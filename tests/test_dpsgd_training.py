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
import weakref

import numpy as np
import pytest
import torch
from _oracles import _assert_same, _loop_clipped_sum, _most_clipped_norm
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
from companion.per_example import check_dp_compatible, clipped_gradient_sum

DIGITS = data.load_digits(seed=0)
N = 160
Q = 0.125
X = torch.tensor(DIGITS.x_train[:N], dtype=torch.float64)
Y = torch.tensor(DIGITS.y_train[:N])
DELTA = 1e-4
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU on this machine")


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
    assert [r["total_steps"] for r in history] == [3 * 8, 4 * 8, 5 * 8]  # 2 epochs before


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


def test_three_continued_calls_with_one_seed_draw_three_different_noises():
    """Three calls with seed 5 continuing one accountant: each call's generator is seeded from
    the seed and the steps the accountant already holds (0, 16, 32), so no call replays another's
    batches and noise, the third the second's included. With sigma = 100 a call's update is
    almost all noise: lr / (qN) times the sum over its 16 steps of sigma C z, of norm about
    sigma C sqrt(16 d) = 10,200 C (d = 650), against at most 16 |B| C, about 320 C for batches
    of 20, for the clipped gradients (3%). Independent noises have a correlation of about
    N(0, 1 / d), below 5 / sqrt(d) = 0.2 with probability 1 - 6e-7; add 2 x 3% for the
    gradients and the bound is 0.26. A replayed noise gives a correlation near 1 (1.000 when
    the third call reused the second's seed; 0.86 to 0.95 with no noise added at all)."""
    accountant, model, updates = RDPAccountant(), _model(), []
    for _ in range(3):
        before = _flat(model)
        _run(model=model, seed=5, accountant=accountant, noise_multiplier=100.0, lr=0.01)
        updates.append(_flat(model) - before)
    assert len(accountant) == 3 * 16
    unit = torch.stack(updates)
    unit = unit / unit.norm(dim=1, keepdim=True)
    correlations = unit @ unit.T
    for i, j in ((0, 1), (0, 2), (1, 2)):
        assert abs(float(correlations[i, j])) < 0.26, (i, j)


def test_a_continued_pld_accountant_reports_the_epsilon_of_one_long_run():
    """Two calls (2 then 3 epochs, sigma 1) continuing one PLDAccountant report the epsilon of
    a fresh PLDAccountant stepped 40 times (the same compressed history, so the same number),
    and dp_accounting's PLD of 40 Poisson-sampled Gaussian steps. Both discretise the privacy
    loss with the same default interval (1e-4) and agree here to about 1e-11; the tolerance,
    1e-6, is far below what one step more or less changes (0.056)."""
    dp_accounting = pytest.importorskip("dp_accounting")
    accountant = PLDAccountant()
    _, first = _run(epochs=2, accountant=accountant)
    _, history = _run(epochs=3, accountant=accountant, seed=1)
    fresh = PLDAccountant()
    for _ in range(5 * 8):
        fresh.step(noise_multiplier=1.0, sample_rate=Q)
    assert accountant.history == ((1.0, Q, 40),)
    assert history[-1]["epsilon"] == pytest.approx(fresh.get_epsilon(DELTA), rel=1e-12)
    reference = dp_accounting.pld.PLDAccountant()
    event = dp_accounting.PoissonSampledDpEvent(Q, dp_accounting.GaussianDpEvent(1.0))
    reference.compose(dp_accounting.SelfComposedDpEvent(event, 5 * 8))
    assert history[-1]["epsilon"] == pytest.approx(reference.get_epsilon(DELTA), abs=1e-6)
    assert first[-1]["epsilon"] < history[-1]["epsilon"]


def test_a_target_epsilon_on_a_continued_pld_accountant_is_not_exceeded():
    """16 steps at sigma 1 spend epsilon 3.24 under PLD; a second call targets a total of 4 in
    8 more steps. Its sigma brings the total within 1% of the target (the documented
    calibration) and not above it, by companion's PLD and by dp_accounting's for the two kinds
    of steps composed (they agree to about 3e-11; the test allows 1e-6)."""
    dp_accounting = pytest.importorskip("dp_accounting")
    accountant = PLDAccountant()
    _run(epochs=2, accountant=accountant)
    _, history = _run(
        target_epsilon=4.0, noise_multiplier=None, accountant=accountant, epochs=1, seed=1
    )
    sigma = history[-1]["noise_multiplier"]
    assert accountant.history == ((1.0, Q, 16), (sigma, Q, 8))
    assert 0.99 * 4.0 <= history[-1]["epsilon"] <= 4.0
    reference = dp_accounting.pld.PLDAccountant()
    for noise, steps in ((1.0, 16), (sigma, 8)):
        event = dp_accounting.PoissonSampledDpEvent(Q, dp_accounting.GaussianDpEvent(noise))
        reference.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    assert history[-1]["epsilon"] == pytest.approx(reference.get_epsilon(DELTA), abs=1e-6)


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


@pytest.mark.parametrize(
    ("orders", "target", "largest"), [([2, 4, 8], 0.88, "8"), ([2, math.inf], 5.0, "2")]
)
def test_a_target_below_the_floor_of_an_accountants_orders_names_them(orders, target, largest):
    """The RDP conversion (Balle et al.) cannot go below min over the orders a of
    log((a - 1)/a) - (log(delta) + log(a)) / (a - 1), whatever the noise: 0.885 at delta = 1e-4
    for orders up to 8, 7.82 for order 2 (an infinite order counts for nothing)."""
    with pytest.raises(ValueError, match=f"largest finite one: {largest}.*even with infinite"):
        _run(target_epsilon=target, noise_multiplier=None, accountant=RDPAccountant(orders=orders))


def test_a_target_just_above_the_floor_of_an_accountants_orders_is_reached():
    """The negative control of the floor: 0.9 > 0.885 is reachable, with much noise."""
    accountant = RDPAccountant(orders=[2, 4, 8])
    _, history = _run(target_epsilon=0.9, noise_multiplier=None, accountant=accountant)
    assert 0.9 * 0.98 <= history[-1]["epsilon"] <= 0.9


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


def _scaled_cross_entropy(outputs, targets):
    return 1e-3 * nn.functional.cross_entropy(outputs, targets)


def test_one_noiseless_step_gives_the_gradient_of_opacus_dpoptimizer():
    """The port, step by step: on one batch of 24 digits with noise_multiplier 0, the gradient
    set_private_gradients writes into .grad is the one Opacus's DPOptimizer (on a
    GradSampleModule) leaves in .grad after pre_step: the clipped per-example gradients, each
    scaled by min(1, C / (norm + 1e-6)), summed and divided by expected_batch_size (30, not the
    24 of the batch). Float64, so the two agree to rounding; 1e-5 relative leaves a wide margin.
    C is the 20% quantile of the loop's norms, so 80% of the examples are clipped and 20% not.
    The loss is cross-entropy times 1e-3, so the norms are about 3e-3 and the 1e-6 in the
    factor shows at 3e-4 relative (a constant of 1e-4 there would be 3% off)."""
    pytest.importorskip("opacus")
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    x, y = X[:24], Y[:24]
    ours = models.mlp(seed=1).double()
    theirs = GradSampleModule(models.mlp(seed=1).double(), loss_reduction="mean")
    _, norms = _loop_clipped_sum(ours, _scaled_cross_entropy, x, y, 1.0)
    max_grad_norm = _most_clipped_norm(norms)
    assert 0 < int((norms <= max_grad_norm).sum()) < 24 and float(norms.max()) < 1e-2
    set_private_gradients(
        ours, x, y, noise_multiplier=0.0, max_grad_norm=max_grad_norm, expected_batch_size=30.0,
        generator=torch.Generator().manual_seed(0), loss=_scaled_cross_entropy,
    )  # fmt: skip
    optimizer = DPOptimizer(
        torch.optim.SGD(theirs.parameters(), lr=0.1),
        noise_multiplier=0.0,
        max_grad_norm=max_grad_norm,
        expected_batch_size=30,
    )
    optimizer.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus's and torch's notes about backward hooks
        _scaled_cross_entropy(theirs(x), y).backward()
    optimizer.pre_step()
    expected = {name: p.grad for name, p in theirs._module.named_parameters()}
    _assert_same({name: p.grad for name, p in ours.named_parameters()}, expected)


def test_opacus_checks_batch_norm_only_with_trainable_parameters():
    """What the FAQ says of Opacus (faq-batchnorm): its validator, which make_private runs,
    reports a BatchNorm with trainable parameters and passes a frozen one or one built with
    affine=False; companion refuses all three."""
    validators = pytest.importorskip("opacus.validators")
    frozen, fixed = nn.BatchNorm1d(4).requires_grad_(False), nn.BatchNorm1d(4, affine=False)
    for norm, reported in [(nn.BatchNorm1d(4), 1), (frozen, 0), (fixed, 0)]:
        model = nn.Sequential(nn.Linear(3, 4), norm, nn.Linear(4, 2))
        assert len(validators.ModuleValidator.validate(model, strict=False)) == reported
        with pytest.raises(ValueError, match="BatchNorm1d"):
            check_dp_compatible(model)


# --- optimizers, losses, data, normaliser -------------------------------------------------------


def test_an_sgd_optimizer_is_the_same_as_plain_lr():
    plain, _ = _run()
    model = _model()
    via_optimizer, _ = _run(model, lr=None, optimizer=torch.optim.SGD(model.parameters(), lr=0.5))
    torch.testing.assert_close(_flat(via_optimizer), _flat(plain), rtol=1e-12, atol=1e-14)


def test_an_optimizer_that_also_holds_other_tensors_is_warned_about():
    """A tensor outside the model gets no gradient from the run: the optimizer skips it."""
    model, outside = _model(), torch.zeros(3, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.SGD([*model.parameters(), outside], lr=0.5)
    with pytest.warns(UserWarning, match="also holds 1 tensor"):
        _run(model, lr=None, optimizer=optimizer)
    assert not outside.any()


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
        # (N, 1) outputs against (N,) targets broadcast to (N, N): every output meets every
        # target (torch's losses warn, and test_input_checks refuses them on the warning)
        (
            lambda outputs, targets: ((outputs - targets) ** 2).mean(),
            lambda y: y[:, 0],
            "returned .*, while the mean of its values on each",
        ),
        (nn.MSELoss(reduction="sum"), lambda y: y, "not a sum \\(reduction='sum'\\)"),
        (nn.MSELoss(reduction="none"), lambda y: y, "it returned a tensor of shape \\(8, 1\\)"),
        (lambda outputs, targets: 1.0, lambda y: y, "it returned a float"),
        (lambda outputs, targets: 3, lambda y: y, "it returned an int"),
    ],
)
def test_a_callable_loss_that_is_not_the_mean_of_the_examples_losses_is_refused(
    loss, targets, message
):
    """Before the check, the first case (then with torch's MSELoss) trained on wrong gradients
    with only torch's broadcast warning, and the second gave the per-example rules 8 times
    vmap's gradient (batch of 8)."""
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64)
    model = nn.Linear(3, 1).double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning first: torch's broadcast one came 5 times
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


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=GPU)])
def test_runs_on_the_models_device(device):
    """numpy data given with a model on ``device``: the data, the batches and the generator of
    the batches and noise must be put on the model's device (a run that kept any of them on the
    CPU fails on cuda, where the model cannot take CPU inputs). The run must also train: the
    training accuracy must exceed 0.5, against about 0.1 for guessing on the 1,347 balanced
    digits (standard deviation 0.008); on the CPU, seeds 0 to 4 give 0.72 to 0.79 (a GPU draws
    other numbers from the same seed). On the CPU this checks the test itself, since a
    train_dpsgd that ignored the model's device would run there too: only the cuda case, where a
    GPU exists, can catch that."""
    model = models.mlp(seed=0).to(device)
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
    assert all(p.device.type == device for p in model.parameters())
    assert history[-1]["steps"] == 20
    assert history[-1]["epsilon"] == pytest.approx(_rdp_epsilon(1.0, 20, q=0.1, delta=1e-5))
    assert history[-1]["train_accuracy"] > 0.5


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
    # the boundary: one label equal to the number of outputs (10 for 10), in tensors, in the
    # first 256 items of a Dataset (checked before training) and in a later one (as it is read)
    at_10 = torch.cat([Y[:-1], torch.tensor([10])])
    message = "labels must be below the model's 10 outputs .*got a label 10"
    with pytest.raises(ValueError, match=message):
        _run(y=at_10)
    with pytest.raises(ValueError, match=message):
        _run(x=TensorDataset(X, at_10), y=None)
    with pytest.raises(ValueError, match=f"{message} in the Dataset x"):
        _run(x=_late_bad_label(10), y=None, sample_rate=1.0)
    with pytest.raises(ValueError, match="loss='bce' needs one output logit"):
        _run(y=(Y > 4).long(), loss="bce")


class _OneRowForTheBatch(nn.Module):
    """The mean of the batch's logits: one row of shape (1, 10) whatever the batch's size."""

    def __init__(self):
        super().__init__()
        self.lin = _model()

    def forward(self, x):
        return self.lin(x).mean(dim=0, keepdim=True)


class _ThreeDimensional(nn.Module):
    """Logits of shape (N, 5, 2): the shape of a per-position classifier, not (N, n_classes)."""

    def __init__(self):
        super().__init__()
        self.lin = _model()

    def forward(self, x):
        return self.lin(x).reshape(-1, 5, 2)


class _Summed(nn.Module):
    """A 0-d output: the sum of the batch's logits."""

    def __init__(self):
        super().__init__()
        self.lin = _model()

    def forward(self, x):
        return self.lin(x).sum()


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (
            _OneRowForTheBatch,
            r"model must return one row of outputs per example: \d+ examples gave outputs of "
            r"shape \(1, 10\)",
        ),
        (
            _Summed,
            r"model must return one row of outputs per example: \d+ examples gave outputs of "
            r"shape \(\)",
        ),
        (
            _ThreeDimensional,
            r"loss='cross_entropy' needs model outputs of shape \(N, n_classes\), got "
            r"\(1, 5, 2\) for one example",
        ),
    ],
)
def test_outputs_that_are_not_one_row_of_logits_per_example_are_explained(model, message):
    """The output checks run on a few examples, before training and before any gradient.
    Without them, the first model was refused as one that mixes examples, the 0-d output got a
    torch IndexError, and the third a message about labels above its 5 "outputs"."""
    with pytest.raises(ValueError, match=message):
        _run(model=model())
    with pytest.raises(ValueError, match=message):
        clipped_gradient_sum(model(), "cross_entropy", X[:24], Y[:24], max_grad_norm=1.0)


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


class _TwoInputs(torch.utils.data.Dataset):
    def __len__(self):
        return N

    def __getitem__(self, i):
        return (X[i, :32], X[i, 32:]), Y[i]


def _late_bad_label(label=12):
    """Labels in range for the first 256 examples (checked before training), then ``label``."""
    x = torch.cat([X, X])[:300]
    y = torch.cat([Y, Y])[:300].clone()
    y[280] = label
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
            _TwoInputs(),
            {},
            ValueError,
            "must return one input tensor per item; .* returns a tuple as input. For several "
            "inputs, concatenate them",
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
            "the targets of the Dataset x must hold integer .* Class labels: return them as "
            "integers from the Dataset's __getitem__",
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


def test_a_frozen_parameters_stale_gradient_is_never_applied():
    """A non-private backward pass left a ``.grad`` on a layer frozen afterwards, and torch's
    optimizers step every parameter that has one: without clearing it the run would move the
    frozen weight by -lr T g, a gradient of the raw data, at every step."""
    model = nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10)).double()
    nn.functional.cross_entropy(model(X), Y).backward()
    model[0].weight.requires_grad_(False)
    assert float(model[0].weight.grad.abs().max()) > 0  # the stale gradient is there
    frozen = model[0].weight.detach().clone()
    _run(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5), lr=None)
    assert torch.equal(model[0].weight, frozen)
    assert model[0].weight.grad is None


def test_set_private_gradients_clears_a_frozen_parameters_stale_gradient():
    """The same in a loop of one's own that forgets ``zero_grad``: ``set_private_gradients``
    sets a frozen parameter's ``.grad`` to None, so the optimizer, which holds every parameter,
    steps only the trainable ones, by the private gradient."""
    model = nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10)).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    nn.functional.cross_entropy(model(X), Y).backward()
    model[0].weight.requires_grad_(False)
    assert float(model[0].weight.grad.abs().max()) > 0  # the stale gradient is there
    frozen, trained = model[0].weight.detach().clone(), model[2].weight.detach().clone()
    set_private_gradients(
        model, X[:16], Y[:16], noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=16.0,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert model[0].weight.grad is None
    optimizer.step()
    assert torch.equal(model[0].weight, frozen)
    assert not torch.equal(model[2].weight, trained)  # control: the trainable layer did step


@pytest.mark.parametrize("optimizer", [False, True])
def test_a_step_is_computed_without_the_last_steps_gradient_in_memory(monkeypatch, optimizer):
    """The last step's noisy gradient (the loop's ``sums`` and, with an optimizer, ``.grad``) is
    released before the next is computed: holding it would add a copy of the weights to every
    step's peak memory. Weak references to each step's gradient must be dead at the next call."""
    import companion.dpsgd.loop as loop

    computed, alive = [], []

    def recording(*args, **kwargs):
        alive.append(sum(ref() is not None for ref in computed))
        sums, norms = noisy_clipped_gradient(*args, **kwargs)
        for t in sums.values():  # views of one flat noise draw: watch the draw too
            computed.extend(weakref.ref(u) for u in (t, t._base) if u is not None)
        return sums, norms

    noisy_clipped_gradient = loop.noisy_clipped_gradient
    monkeypatch.setattr(loop, "noisy_clipped_gradient", recording)
    model = _model()
    if optimizer:
        _run(model, optimizer=torch.optim.Adam(model.parameters(), lr=0.01), lr=None)
    else:
        _run(model)
    assert len(alive) == steps_for_epochs(epochs=2, sample_rate=Q) and not any(alive)


def test_the_batch_is_released_before_the_optimizer_steps(monkeypatch):
    """A step's batch (a copy of the sampled rows) is released once its gradient is computed,
    not held through the optimizer's step, where Adam's state sets the peak memory. Weak
    references to every batch must be dead whenever the optimizer steps."""
    import companion.dpsgd.loop as loop

    batches, alive = [], []

    def recording(clipper, xb, yb, **kwargs):
        batches.extend((weakref.ref(xb), weakref.ref(yb)))
        return noisy_clipped_gradient(clipper, xb, yb, **kwargs)

    class Watching(torch.optim.Adam):
        def step(self, closure=None):
            alive.append(sum(ref() is not None for ref in batches))
            return super().step(closure)

    noisy_clipped_gradient = loop.noisy_clipped_gradient
    monkeypatch.setattr(loop, "noisy_clipped_gradient", recording)
    model = _model()
    _run(model, optimizer=Watching(model.parameters(), lr=0.01), lr=None)
    assert len(alive) == steps_for_epochs(epochs=2, sample_rate=Q) and not any(alive)


class _StopsAtStep(torch.optim.SGD):
    """Plain SGD that raises ``error`` in its ``stop``-th step, before changing anything."""

    def __init__(self, params, stop, error):
        super().__init__(params, lr=0.5)
        self.calls, self.stop, self.error = 0, stop, error

    def step(self, closure=None):
        self.calls += 1
        if self.calls == self.stop:
            raise self.error
        return super().step(closure)


@pytest.mark.parametrize(
    "error, continued", [(RuntimeError("disk full"), True), (KeyboardInterrupt(), False)]
)
def test_a_stopped_run_has_recorded_every_step_it_applied_and_says_what_they_spent(
    error, continued
):
    """The 11th step fails in the optimizer: ten noisy steps changed the model, and the 11th
    gradient was computed. The accountant holds 11 steps (each recorded before it is applied:
    never fewer than were applied), and the exception's note gives their epsilon (compute_rdp
    for 11 steps, the oracle), also when the run's accountant was its own."""
    model = _model()
    accountant = RDPAccountant() if continued else None
    with pytest.raises(type(error)) as caught:
        _run(model, optimizer=_StopsAtStep(model.parameters(), 11, error), lr=None,
             accountant=accountant)  # fmt: skip
    if continued:
        assert len(accountant) == 11
    (note,) = caught.value.__notes__
    assert note.startswith("train_dpsgd stopped after recording 11 noisy step(s)")
    assert f"epsilon = {_rdp_epsilon(1.0, 11):.4g} at delta = {DELTA}" in note


def test_an_accountant_that_cannot_follow_the_run_says_so_before_training():
    """With this little noise each step's privacy loss leaves the PLD grid; the run must refuse
    before its first step, not after an epoch of steps that changed the model."""
    model, accountant = _model(), PLDAccountant()
    before = _flat(model)
    with pytest.raises(ValueError, match="too small for the PLD accountant"):
        _run(model, noise_multiplier=0.02, sample_rate=0.5, accountant=accountant)
    assert torch.equal(_flat(model), before)
    assert len(accountant) == 0


def test_the_loss_check_keeps_a_warning_of_the_students_loss():
    """The check silences only torch's broadcast warning: a loss's own warning, given once,
    still reaches the student."""
    state = {"warned": False}

    def loss(outputs, targets):
        if not state["warned"]:
            state["warned"] = True
            warnings.warn("my loss: first call", UserWarning, stacklevel=2)
        return nn.functional.cross_entropy(outputs, targets)

    with pytest.warns(UserWarning, match="my loss: first call"):
        _run(loss=loss, epochs=1)


def _peak_tensor_bytes(run):
    """The highest number of bytes held by tensors during ``run()``, above what they held
    before, from the profiler's allocation events (as benchmarks/dpsgd_memory.py measures)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        run()
    events = [e for e in profiler.profiler.kineto_results.events() if e.name() == "[memory]"]
    held = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        held += event.nbytes()
        peak = max(peak, held)
    return peak


def test_set_private_gradients_does_not_hold_the_old_gradient_while_computing_the_new():
    """The old ``.grad`` (left by a loop without ``zero_grad``) used to stay alive until the
    new one replaced it: the call's peak then held both. A 400x2000 Linear (3.2 MB of weights)
    with a batch of 4: everything else a call allocates is far smaller than the weights, so the
    peak over two calls is one copy of them (a noisy gradient) plus less than half of another;
    holding the first call's gradient makes it two copies."""
    model = nn.Linear(2000, 400)
    x, y = torch.randn(4, 2000), torch.arange(4)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())

    def call():
        set_private_gradients(
            model, x, y, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4.0,
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip

    def two_calls():  # the first leaves a .grad, allocated where the profiler sees its free
        call()
        assert model.weight.grad is not None
        call()

    assert _peak_tensor_bytes(two_calls) < 1.5 * weights
