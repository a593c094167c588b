"""Tests of companion.training.

The reference for :func:`train` is plain SGD written out by hand: the documented permutation
(``torch.randperm`` from a generator seeded with ``seed``, one per epoch), consecutive batches,
the gradient of the mean loss by :func:`torch.autograd.grad`, optionally scaled by
``min(1, C / (norm + 1e-6))``. Comparisons run in float64, where both sides agree to rounding
(about 1e-15 relative); the tolerance of 1e-10 leaves a wide margin and still rejects any real
difference in the update.
"""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from companion import data, models
from companion.training import evaluate, to_tensors, train

DIGITS = data.load_digits(seed=0)
MOONS = data.make_moons(400, seed=0)


def _digits(n, dtype=torch.float64):
    return torch.tensor(DIGITS.x_train[:n], dtype=dtype), torch.tensor(DIGITS.y_train[:n])


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _hand_written_sgd(model, x, y, *, epochs, batch_size, lr, seed, max_grad_norm=None):
    """Minibatch SGD as documented; returns the batch-gradient norms before clipping."""
    generator = torch.Generator().manual_seed(seed)
    params = list(model.parameters())
    norms = []
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=generator)
        for start in range(0, x.shape[0], batch_size):
            index = order[start : start + batch_size]
            grads = torch.autograd.grad(F.cross_entropy(model(x[index]), y[index]), params)
            norm = math.sqrt(sum(float(g.square().sum()) for g in grads))
            factor = 1.0 if max_grad_norm is None else min(1.0, max_grad_norm / (norm + 1e-6))
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    p -= lr * factor * g
            norms.append(norm)
    return norms


# --- training -----------------------------------------------------------------------------------


@pytest.mark.parametrize("max_grad_norm", [None, 0.3, 1e6])
def test_train_is_the_hand_written_sgd_loop(max_grad_norm):
    """Three epochs of 100 examples in batches of 32 (3 full batches and one of 4): the weights
    and the recorded norms equal the loop's. C = 0.3 is below the batch-gradient norms of an
    untrained mlp (about 1-2), so clipping is active; C = 1e6 never clips."""
    model = models.mlp(seed=2).double()
    reference = copy.deepcopy(model)
    x, y = _digits(100)
    history = train(
        model,
        x,
        y,
        epochs=3,
        batch_size=32,
        lr=0.2,
        seed=4,
        max_grad_norm=max_grad_norm,
        record_grad_norms=True,
    )
    norms = _hand_written_sgd(
        reference, x, y, epochs=3, batch_size=32, lr=0.2, seed=4, max_grad_norm=max_grad_norm
    )
    torch.testing.assert_close(_flat(model), _flat(reference), rtol=1e-10, atol=1e-12)
    recorded = [norm for record in history for norm in record["grad_norms"]]
    np.testing.assert_allclose(recorded, norms, rtol=1e-10)
    if max_grad_norm == 0.3:
        assert min(norms) > 0.3  # every step was clipped


def test_one_clipped_step_moves_the_weights_by_at_most_lr_c():
    """One full batch: the update is -lr * min(1, C / (g + 1e-6)) * gradient, whose norm is
    lr * C g / (g + 1e-6) <= lr * C when the batch gradient norm g exceeds C; g is about 0.5
    here, so that is within 1e-5 of lr * C."""
    model = models.mlp(seed=1).double()
    x, y = _digits(64)
    before = _flat(model)
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    gradient = torch.cat([g.reshape(-1) for g in grads])
    norm = float(gradient.norm())
    lr, max_grad_norm = 0.5, norm / 4
    history = train(
        model,
        x,
        y,
        epochs=1,
        batch_size=64,
        lr=lr,
        max_grad_norm=max_grad_norm,
        record_grad_norms=True,
    )
    step = _flat(model) - before
    torch.testing.assert_close(
        step, -lr * max_grad_norm / (norm + 1e-6) * gradient, rtol=1e-10, atol=1e-14
    )
    assert float(step.norm()) <= lr * max_grad_norm
    assert float(step.norm()) == pytest.approx(lr * max_grad_norm, rel=1e-5)
    assert history[0]["grad_norms"] == [pytest.approx(norm, rel=1e-10)]


def test_clipped_training_moves_the_weights_by_at_most_steps_lr_c():
    """Each of the 2 * ceil(300 / 50) = 12 steps moves the weights by at most lr * C, so the
    total displacement is at most 12 lr C (triangle inequality)."""
    model = models.small_cnn(seed=0)
    before = _flat(model)
    x, y = DIGITS.x_train[:300], DIGITS.y_train[:300]
    history = train(
        model, x, y, epochs=2, batch_size=50, lr=0.3, max_grad_norm=0.05, record_grad_norms=True
    )
    assert sum(len(record["grad_norms"]) for record in history) == 12
    assert float((_flat(model) - before).norm()) <= 12 * 0.3 * 0.05 * (1 + 1e-5)  # float32 rounding


def test_record_grad_norms_records_one_norm_per_step():
    x, y = DIGITS.x_train[:100], DIGITS.y_train[:100]
    history = train(
        models.logistic_regression(), x, y, epochs=2, batch_size=32, lr=0.1, record_grad_norms=True
    )
    assert [len(record["grad_norms"]) for record in history] == [4, 4]  # ceil(100 / 32)
    assert all(
        isinstance(n, float) and 0 < n < math.inf
        for record in history
        for n in record["grad_norms"]
    )
    history = train(models.logistic_regression(), x, y, epochs=1, batch_size=32, lr=0.1)
    assert "grad_norms" not in history[0]


def test_train_reduces_the_loss_on_the_digits():
    """An untrained mlp has loss about log 10 = 2.3; three epochs of SGD bring it below 1 on
    the training set and raise the held-out accuracy far above 0.1."""
    model = models.mlp(seed=0)
    start = evaluate(model, DIGITS.x_train, DIGITS.y_train)
    assert start["loss"] == pytest.approx(math.log(10), abs=0.2)
    history = train(
        model,
        DIGITS.x_train,
        DIGITS.y_train,
        epochs=3,
        batch_size=32,
        lr=0.5,
        x_test=DIGITS.x_test,
        y_test=DIGITS.y_test,
    )
    assert [record["epoch"] for record in history] == [1, 2, 3]
    assert set(history[0]) == {
        "epoch",
        "train_loss",
        "train_accuracy",
        "test_loss",
        "test_accuracy",
    }
    assert history[-1]["train_loss"] < 1.0
    assert history[-1]["test_accuracy"] > 0.7
    # the record is the model evaluated after the epoch
    final = evaluate(model, DIGITS.x_test, DIGITS.y_test)
    assert history[-1]["test_accuracy"] == final["accuracy"]
    assert history[-1]["test_loss"] == pytest.approx(final["loss"], rel=1e-6)


def test_train_learns_a_binary_task_with_bce():
    """An untrained binary_mlp on the moons has loss about log 2 = 0.69 and guesses; 20 epochs
    bring the loss well below that (to about 0.22) and the accuracy above 0.8 (about 0.9)."""
    model = models.binary_mlp(seed=0)
    assert evaluate(model, MOONS.x_train, MOONS.y_train, loss="bce")["loss"] > 0.6
    history = train(
        model, MOONS.x_train, MOONS.y_train, epochs=20, batch_size=16, lr=0.5, loss="bce"
    )
    assert history[-1]["train_loss"] < 0.4
    assert history[-1]["train_accuracy"] > 0.8


def test_train_is_reproducible_from_the_seed():
    def run(seed):
        model = models.mlp(seed=0)
        train(
            model,
            DIGITS.x_train[:200],
            DIGITS.y_train[:200],
            epochs=1,
            batch_size=16,
            lr=0.1,
            seed=seed,
        )
        return _flat(model)

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_train_writes_nothing_unless_asked(capfd):
    train(
        models.logistic_regression(),
        DIGITS.x_train[:50],
        DIGITS.y_train[:50],
        epochs=1,
        batch_size=10,
        lr=0.1,
    )
    assert capfd.readouterr().err == ""
    train(
        models.logistic_regression(),
        DIGITS.x_train[:50],
        DIGITS.y_train[:50],
        epochs=1,
        batch_size=10,
        lr=0.1,
        progress=True,
    )
    assert "SGD" in capfd.readouterr().err


def test_frozen_parameters_stay_put():
    model = models.mlp(seed=0)
    model[0].requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    train(model, DIGITS.x_train[:64], DIGITS.y_train[:64], epochs=1, batch_size=16, lr=0.5)
    assert torch.equal(model[0].weight, frozen)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(
            models.mlp().requires_grad_(False),
            DIGITS.x_train[:8],
            DIGITS.y_train[:8],
            epochs=1,
            batch_size=4,
            lr=0.1,
        )


# --- evaluation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["logistic_regression", "mlp", "small_cnn"])
def test_evaluate_matches_a_manual_computation(name):
    model = getattr(models, name)(seed=3)
    train(model, DIGITS.x_train[:200], DIGITS.y_train[:200], epochs=1, batch_size=20, lr=0.3)
    x, y = torch.tensor(DIGITS.x_test), torch.tensor(DIGITS.y_test)
    with torch.no_grad():
        outputs = model(x)
    scores = evaluate(model, DIGITS.x_test, DIGITS.y_test)
    assert set(scores) == {"accuracy", "loss"}
    assert 0 <= scores["accuracy"] <= 1
    assert scores["accuracy"] == pytest.approx(
        float((outputs.argmax(dim=1) == y).double().mean()), abs=1e-12
    )
    assert scores["loss"] == pytest.approx(float(F.cross_entropy(outputs, y)), rel=1e-6)


def test_evaluate_bce_predicts_positive_logits():
    model = models.binary_mlp(seed=1)
    x, y = torch.tensor(MOONS.x_test), torch.tensor(MOONS.y_test)
    with torch.no_grad():
        logits = model(x)[:, 0]
    scores = evaluate(model, MOONS.x_test, MOONS.y_test, loss="bce")
    assert scores["accuracy"] == pytest.approx(
        float(((logits > 0) == (y == 1)).double().mean()), abs=1e-12
    )
    assert scores["loss"] == pytest.approx(
        float(F.binary_cross_entropy_with_logits(logits, y.float())), rel=1e-6
    )
    # float 0/1 labels are accepted too
    assert evaluate(model, MOONS.x_test, MOONS.y_test.astype(np.float32), loss="bce") == scores


def test_a_model_that_returns_probabilities_gets_a_warning_pointing_at_the_call():
    """A softmax in forward trains poorly with cross-entropy (which applies its own); logits
    never sum to 1 on every row by chance, so a model without it gets no warning."""
    softmax = nn.Sequential(models.mlp(seed=0), nn.Softmax(dim=1))
    for run in (
        lambda model: evaluate(model, DIGITS.x_test[:8], DIGITS.y_test[:8]),
        lambda model: train(
            model, DIGITS.x_train[:8], DIGITS.y_train[:8], epochs=1, batch_size=8, lr=0.1
        ),  # fmt: skip
    ):
        with pytest.warns(UserWarning, match="look like probabilities") as record:
            run(softmax)
        assert record[0].filename == __file__
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            run(models.mlp(seed=0))
    # bfloat16 rows sum to 1 only to about 1e-3, well outside float32's tolerance of 1e-4
    x = torch.tensor(DIGITS.x_test[:8], dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match="look like probabilities"):
        evaluate(softmax.bfloat16(), x, DIGITS.y_test[:8])


def test_evaluate_runs_the_model_on_batches_of_at_most_1024_examples():
    """A large data set is evaluated in batches (so that it fits in a GPU's memory), with the
    scores of one pass over all of it."""
    model = models.mlp(seed=0)
    x = np.tile(DIGITS.x_train, (2, 1))[:2500]
    y = np.tile(DIGITS.y_train, 2)[:2500]
    with torch.no_grad():
        outputs = model(torch.tensor(x))
    rows = []
    model.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    scores = evaluate(model, x, y)
    assert rows[1:] == [1024, 1024, 452]  # the first pass is check_outputs' on 4 examples
    assert scores["loss"] == pytest.approx(
        float(F.cross_entropy(outputs, torch.tensor(y))), rel=1e-6
    )
    assert scores["accuracy"] == float((outputs.argmax(1) == torch.tensor(y)).double().mean())


@pytest.mark.parametrize("training", [True, False])
def test_evaluate_uses_eval_mode_and_restores_the_mode(training):
    """With dropout p = 0.5 a pass in training mode would zero about half the hidden units; the
    result must equal the deterministic eval-mode computation, and the mode must come back."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 10))
    model.train(training)
    model.eval()
    with torch.no_grad():
        expected = float(
            F.cross_entropy(model(torch.tensor(DIGITS.x_test)), torch.tensor(DIGITS.y_test))
        )
    model.train(training)
    scores = evaluate(model, DIGITS.x_test, DIGITS.y_test)
    assert model.training is training
    assert scores["loss"] == pytest.approx(expected, rel=1e-6)


def test_evaluate_gives_the_modes_back_through_train_which_a_module_may_override():
    """A module whose train(mode) also sets its dropout rate: the mode was given back by setting
    .training alone, which left the rate of evaluation mode (0) in training mode. A submodule
    the user put in evaluation mode stays there."""

    class Rated(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.head, self.rate = nn.Linear(64, 10), nn.Linear(10, 10), 0.5

        def train(self, mode=True):
            super().train(mode)
            self.rate = 0.5 if mode else 0.0
            return self

        def forward(self, x):
            return self.head(F.dropout(self.fc(x), self.rate, training=self.rate > 0))

    model = Rated()
    model.head.eval()
    evaluate(model, DIGITS.x_test[:10], DIGITS.y_test[:10])
    assert model.training and model.rate == 0.5 and not model.head.training


# --- conversion ---------------------------------------------------------------------------------


def test_to_tensors_converts_dtypes():
    x, y = to_tensors(np.zeros((3, 2), dtype=np.float64), np.array([0, 1, 2], dtype=np.int32))
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (3, 2)
    _, y = to_tensors(np.zeros((2, 2), dtype=np.int16), np.array([True, False]))
    assert y.dtype == torch.int64 and y.tolist() == [1, 0]
    _, y = to_tensors(np.zeros((2, 2)), np.array([0.0, 1.0]))
    assert y.dtype == torch.float32
    tx, ty = torch.zeros(2, 2, dtype=torch.float64), torch.tensor([1, 0])
    x, y = to_tensors(tx, ty)
    assert x is tx and y is ty  # tensors pass through unchanged
    x, _ = to_tensors(np.asfortranarray(np.arange(6.0).reshape(2, 3)), np.array([0, 1]))
    assert x.tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        ([[0.0]], np.array([0]), "x must be a torch.Tensor or a numpy array"),
        (np.zeros((1, 1)), [0], "y must be a torch.Tensor or a numpy array"),
        (np.array([["a"]]), np.array([0]), "x must be a numeric array"),
        (np.array([[True]]), np.array([0]), "x must be a numeric array"),
        (np.zeros((1, 1)), np.array(["a"]), "y must be an integer or float array"),
    ],
)
def test_to_tensors_bad_input(x, y, message):
    with pytest.raises(TypeError, match=message):
        to_tensors(x, y)


# --- argument checks ----------------------------------------------------------------------------

X, Y = DIGITS.x_train[:20], DIGITS.y_train[:20]
NAN_X = X.copy()
NAN_X[3, 5] = np.nan
INF_X = X.copy()
INF_X[0, 0] = np.inf

BAD_DATA = [
    ({"x": NAN_X}, ValueError, "x must not contain NaN"),
    ({"x": INF_X}, ValueError, "x must not contain NaN or infinite"),
    ({"x": X[:, 0]}, ValueError, r"x must have shape \(N, n_features\)"),
    ({"y": Y[:, None]}, ValueError, r"y must have shape \(N,\)"),
    ({"x": X[:-1]}, ValueError, "x and y must have the same number of examples"),
    ({"x": X[:0], "y": Y[:0]}, ValueError, "x must hold at least one example"),
    (
        {"y": Y.astype(np.float32)},
        TypeError,
        "y must hold integer class labels for loss='cross_entropy', got dtype torch.float32. "
        r"Class labels: convert them with y.long\(\). Regression targets: give a callable loss "
        r"\(companion.dpsgd and companion.per_example take one\)",
    ),
    ({"y": torch.tensor(Y) > 4}, TypeError, "y must hold integer class labels"),
    ({"y": -Y - 1}, ValueError, "y must hold class labels >= 0"),
    ({"y": np.where(np.arange(len(Y)) == 7, -3, Y)}, ValueError, "got -3 at position 7"),
    ({"x": torch.tensor(X).long()}, ValueError, "model cannot be applied to the inputs"),
    ({"x": torch.tensor(X) > 0.5}, TypeError, "x must hold real or integer inputs"),
    ({"x": X.tolist()}, TypeError, "x must be a torch.Tensor or a numpy array"),
    ({"model": "mlp"}, TypeError, "model must be a torch.nn.Module"),
    ({"loss": "hinge"}, ValueError, "loss must be one of"),
    ({"loss": "bce", "y": Y}, ValueError, "y must hold labels 0 or 1 for loss='bce'"),
    ({"loss": "bce", "y": np.full(20, 0.5)}, ValueError, "y must hold labels 0 or 1"),
    ({"loss": "bce", "y": np.eye(20, dtype=int)[5] * 2}, ValueError, "got 2 at position 5"),
    ({"loss": "bce", "y": np.eye(20, dtype=np.float32)[1] * 0.3}, ValueError, "got 0.3 at pos"),
    ({"loss": "bce", "y": torch.ones(20, dtype=torch.complex64)}, TypeError, "real labels"),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD_DATA)
def test_evaluate_bad_input(kwargs, error, message):
    arguments = {"model": models.logistic_regression(), "x": X, "y": Y} | kwargs
    with pytest.raises(error, match=message):
        evaluate(arguments.pop("model"), arguments.pop("x"), arguments.pop("y"), **arguments)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        *BAD_DATA,
        ({"x_test": X}, ValueError, "x_test and y_test must be given together"),
        ({"y_test": Y}, ValueError, "x_test and y_test must be given together"),
        ({"x_test": NAN_X, "y_test": Y}, ValueError, "x_test must not contain NaN"),
        ({"x_test": X, "y_test": Y[:3]}, ValueError, "x_test and y_test must have the same number"),
        (
            {"x_test": X, "y_test": Y.astype(float)},
            TypeError,
            "y_test must hold integer class labels",
        ),
        ({"x_test": X.tolist(), "y_test": Y}, TypeError, "x_test must be a torch.Tensor"),
        ({"epochs": 0}, ValueError, "epochs must be >= 1"),
        ({"epochs": 2.0}, TypeError, "epochs must be an integer"),
        ({"batch_size": 0}, ValueError, "batch_size must be >= 1"),
        ({"lr": 0.0}, ValueError, "lr must be > 0"),
        ({"lr": float("nan")}, ValueError, "lr must be a number, got NaN"),
        ({"max_grad_norm": 0.0}, ValueError, "max_grad_norm must be > 0"),
        ({"max_grad_norm": float("nan")}, ValueError, "max_grad_norm must be a number, got NaN"),
        ({"seed": -1}, ValueError, "seed must be >= 0"),
        (
            {"seed": 2**64},
            ValueError,
            r"seed must be >= 0 and below 2\*\*64, got 18446744073709551616",
        ),
        ({"seed": True}, TypeError, "seed must be an integer"),
        ({"progress": "no"}, TypeError, "progress must be True or False, got str"),
    ],
)
def test_train_bad_input(kwargs, error, message):
    arguments = {
        "model": models.logistic_regression(),
        "x": X,
        "y": Y,
        "epochs": 1,
        "batch_size": 8,
        "lr": 0.1,
    } | kwargs
    model = arguments.pop("model")
    before = _flat(model) if isinstance(model, nn.Module) else None
    with pytest.raises(error, match=message):
        train(model, arguments.pop("x"), arguments.pop("y"), **arguments)
    if before is not None:
        assert torch.equal(_flat(model), before)  # nothing is trained before the checks pass


@pytest.mark.parametrize(("batch_size", "refused"), [(len(X) - 1, True), (len(X) - 2, False)])
def test_a_last_batch_of_one_example_for_batch_normalisation_is_refused_by_its_size(
    batch_size, refused
):
    """helper-104's trial: torch's "Expected more than 1 value per channel" named no argument;
    a last batch of two is trained."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(X.shape[1], 4), nn.BatchNorm1d(4), nn.Linear(4, 10))
    if refused:
        with pytest.raises(ValueError, match=rf"batch_size={batch_size}, so the last batch .* '1'"):
            train(model, X, Y, epochs=1, batch_size=batch_size, lr=0.1)
    else:
        assert len(train(model, X, Y, epochs=1, batch_size=batch_size, lr=0.1)) == 1


def test_label_errors_outside_dpsgd_name_no_dataset_and_say_where_callables_go():
    """helper-104's trial: the membership attack's float labels were told to come "from the
    Dataset's __getitem__" (no Dataset involved: its name, "members y", is not an identifier),
    and training.train's to give a callable loss, which it does not take."""
    from companion import attacks

    x, y = torch.as_tensor(X, dtype=torch.float32), torch.as_tensor(Y, dtype=torch.float32)
    with pytest.raises(TypeError, match=r"members y must hold .* convert them with y\.long\(\)"):
        attacks.loss_threshold_attack(models.logistic_regression(), (x, y), (x, y))
    with pytest.raises(TypeError, match=r"callable loss \(companion.dpsgd and .* take one\)"):
        train(models.logistic_regression(), x, y, epochs=1, batch_size=8, lr=0.1)


def test_the_finiteness_check_of_a_large_data_set_finds_a_nan_in_its_last_rows():
    """The check runs in chunks of about a million elements (isfinite on a whole data set made
    temporaries twice its size): a NaN in the last example of the last chunk is still found."""
    x = torch.zeros(3000, 784)  # 2.35 million elements: three chunks
    x[-1, -1] = float("nan")
    with pytest.raises(ValueError, match="x must not contain NaN"):
        evaluate(models.logistic_regression(n_features=784), x, torch.zeros(3000, dtype=torch.long))
    x[-1, -1] = 0.0
    assert evaluate(
        models.logistic_regression(n_features=784), x, torch.zeros(3000, dtype=torch.long)
    )
