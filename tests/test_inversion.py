"""Tests of companion.attacks.inversion and companion.attacks.reconstruction (gradient inversion).

Baselines from chance, on the 1,347 training digits of ``load_digits(seed=0)`` with the Pearson
correlation that :func:`reconstruction_similarity` computes, are computed by the ``baselines``
fixture (all pairs of digits in one matrix product, 4,000 random images from seed 0; 0.1 s):

- two *different* training digits: mean 0.49, sd 0.16, 99th percentile 0.885, 99.9th 0.946; a
  digit's most similar *other* digit: median 0.943, max 0.990 (digits of one class look alike);
- a uniformly random image against a digit: mean 0.00, sd 0.12, 99th percentile of the
  absolute value 0.31.

Measured attack (MLP 64-128-10, seed 0, 100 Adam steps at lr 0.1, a few tenths of a second a
digit on 2 cores): from the plain gradient of one digit, similarity >= 0.9995 on each of the
first 40 training digits, for the untrained and a briefly trained model, cosine or l2 distance,
and no other training digit is as similar; the label is always right. Against the same gradient
clipped to norm 1 with Gaussian noise of std 1 per coordinate (DP-SGD at sigma = 1 for a batch
of one), similarity between -0.29 and 0.24 over 40 digits (mean 0.02), the labels right about
as often as chance (20% of 40), and the share of other digits more similar to the
reconstruction than the true one averaged 0.50, exactly what an unrelated image gives.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from conftest import load_shared_digits
from torch import nn

from companion import models, training
from companion.attacks import (
    InversionResult,
    invert_gradient,
    model_gradient,
    reconstruction_similarity,
)

pytestmark = pytest.mark.usefixtures("one_thread")

DIGITS = load_shared_digits()
X, Y = DIGITS.x_train, DIGITS.y_train
FIRST_OF_EACH_CLASS = [int(np.flatnonzero(Y == c)[0]) for c in range(10)]
STEPS, LR = 100, 0.1  # the settings measured above
RECOVERED, CHANCE = 0.99, 0.3  # similarity thresholds: this digit recovered; no better than chance


def _unit_rows(images):
    """Rows centred and scaled to norm 1: their dot products are Pearson correlations."""
    centred = images.astype(np.float64) - images.mean(axis=1, keepdims=True)
    return centred / np.linalg.norm(centred, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def baselines():
    """Chance levels of the similarity, computed here instead of quoted: every pair of different
    training digits, each digit's most similar other digit, and 4,000 uniformly random images
    against digits (seed 0)."""
    unit = _unit_rows(X)
    correlations = unit @ unit.T
    pairs = correlations[np.triu_indices(len(X), k=1)]
    np.fill_diagonal(correlations, -np.inf)
    rng = np.random.default_rng(0)
    random_images = _unit_rows(rng.random((4000, X.shape[1])))
    against_digits = np.abs((random_images * unit[np.arange(4000) % len(X)]).sum(axis=1))
    return {
        "pair_q99": np.quantile(pairs, 0.99),
        "pair_q999": np.quantile(pairs, 0.999),
        "nearest_other_max": correlations.max(axis=1).max(),
        "random_abs_q99": np.quantile(against_digits, 0.99),
    }


def test_thresholds_lie_beyond_chance(baselines):
    """RECOVERED is above the 99.9% quantile of two different digits' similarity and no lower
    than the most similar pair of all; CHANCE is no higher than the 99th percentile of a random
    image's absolute similarity, so a reconstruction below it looks like noise."""
    assert baselines["pair_q999"] < RECOVERED
    assert RECOVERED >= baselines["nearest_other_max"] - 0.001  # measured 0.990
    assert CHANCE <= baselines["random_abs_q99"]  # measured 0.31
    assert baselines["pair_q99"] < baselines["pair_q999"] < baselines["nearest_other_max"]


def _trained_mlp():
    """The MLP after two epochs of SGD (about 70% test accuracy): a model in mid-training."""
    model = models.mlp(seed=0)
    training.train(model, X, Y, epochs=2, batch_size=64, lr=0.1)
    return model


MODELS = {"untrained": lambda: models.mlp(seed=0), "trained": _trained_mlp}


def _one(i):
    return torch.tensor(X[i : i + 1]), torch.tensor(Y[i : i + 1])


def _similarities_to_all(image):
    """The Pearson correlation of ``image`` with every training digit (vectorised)."""
    centred = X.astype(np.float64) - X.mean(axis=1, keepdims=True)
    centred /= np.linalg.norm(centred, axis=1, keepdims=True)
    r = image.detach().numpy().reshape(-1).astype(np.float64)
    r = r - r.mean()
    return centred @ (r / np.linalg.norm(r))


def _clip_and_noise(gradient, *, max_grad_norm, noise_multiplier, generator):
    """DP-SGD on a batch of one: clip the whole gradient to norm C, add N(0, (sigma C)^2) noise."""
    norm = float(torch.sqrt(sum(g.square().sum() for g in gradient.values())))
    factor = min(1.0, max_grad_norm / (norm + 1e-6))
    return {
        name: g * factor
        + noise_multiplier * max_grad_norm * torch.randn(g.shape, generator=generator)
        for name, g in gradient.items()
    }


# --- the attack works on a plain gradient --------------------------------------------------------


@pytest.mark.parametrize("distance", ["cosine", "l2"])
@pytest.mark.parametrize("state", sorted(MODELS))
def test_attack_recovers_training_digits_from_a_plain_gradient(state, distance):
    """Measured >= 0.9995. The threshold RECOVERED = 0.99 lies above the 99.9% quantile of the
    similarity of two different digits (0.946) and at the most similar pair of all (0.990; both
    checked in test_thresholds_lie_beyond_chance), so it can only be passed by reconstructing
    *this* digit; the ranking check says so directly. A broken attack (no create_graph, wrong
    sign, wrong label) scores near the random-image baseline."""
    model = MODELS[state]()
    for i in FIRST_OF_EACH_CLASS[:4]:
        gradient = model_gradient(model, *_one(i))
        result = invert_gradient(model, gradient, steps=STEPS, lr=LR, distance=distance)
        similarity = reconstruction_similarity(X[i], result.x[0])
        assert similarity > RECOVERED, (i, similarity)
        assert int(result.y[0]) == Y[i]
        others = np.delete(_similarities_to_all(result.x[0]), i)
        assert (others < similarity).all(), "another training digit is closer than the true one"


def test_attack_recovers_a_small_batch_when_given_the_labels():
    """Two digits from one averaged gradient; each original is matched by one reconstruction
    (measured >= 0.999 for batches of 2 and 4 at 300 steps)."""
    model = models.mlp(seed=0)
    x, y = torch.tensor(X[:2]), torch.tensor(Y[:2])
    result = invert_gradient(
        model, model_gradient(model, x, y), batch_size=2, label=y, steps=300, lr=LR
    )
    assert result.x.shape == (2, 64) and torch.equal(result.y, y)
    best = [max(reconstruction_similarity(X[a], result.x[b]) for b in range(2)) for a in range(2)]
    assert min(best) > 0.99, best


def test_total_variation_prior_runs_and_still_recovers():
    """tv_weight=1e-2 on the 8x8 images: measured 0.9998-0.9999 on 8 digits."""
    model = models.mlp(seed=0)
    result = invert_gradient(
        model,
        model_gradient(model, *_one(0)),
        steps=STEPS,
        lr=LR,
        tv_weight=1e-2,
        image_shape=(8, 8),
    )
    assert reconstruction_similarity(X[0], result.x[0]) > 0.99


def test_clipping_alone_does_not_stop_the_attack():
    """Clipping only rescales the gradient, and the cosine distance ignores scale: without noise
    the clipped update leaks the digit as fully as the plain one."""
    model = models.mlp(seed=0)
    gradient = _clip_and_noise(
        model_gradient(model, *_one(0)),
        max_grad_norm=1.0,
        noise_multiplier=0.0,
        generator=torch.Generator(),
    )
    result = invert_gradient(model, gradient, steps=STEPS, lr=LR)
    assert reconstruction_similarity(X[0], result.x[0]) > 0.99


def test_first_layer_gradient_is_a_scaled_copy_of_the_input():
    """The identity of the module docstring (Phong et al.): x = grad_W[i] / grad_b[i]."""
    model = models.mlp(seed=0).double()
    x, y = torch.tensor(X[:1], dtype=torch.float64), torch.tensor(Y[:1])
    g = model_gradient(model, x, y)
    rows = g["0.bias"].abs() > 1e-3 * g["0.bias"].abs().max()
    assert rows.sum() > 10
    torch.testing.assert_close(
        g["0.weight"][rows] / g["0.bias"][rows, None], x.expand(int(rows.sum()), -1)
    )


# --- the attack fails against a clipped and noised update ----------------------------------------


@pytest.mark.parametrize("state", sorted(MODELS))
def test_attack_fails_against_a_clipped_noised_update(state):
    """C = 1, sigma = 1, one digit of each class. Measured: similarities -0.23 to 0.24, labels
    right 1-2 of 10. Thresholds: each similarity below CHANCE = 0.3, at most the 99th percentile
    of |similarity| of a *random* image (0.31, the ``baselines`` fixture; the plain attack gives
    > 0.999); and on average at least 20% of the
    other training digits are more similar to the reconstruction than the true digit is (an
    unrelated image: 50% on average, sd 0.09 for a mean of ten; the plain attack: 0%)."""
    model = MODELS[state]()
    generator = torch.Generator().manual_seed(0)
    outranked, labels_right = [], 0
    for i in FIRST_OF_EACH_CLASS:
        noisy = _clip_and_noise(
            model_gradient(model, *_one(i)),
            max_grad_norm=1.0,
            noise_multiplier=1.0,
            generator=generator,
        )
        result = invert_gradient(model, noisy, steps=STEPS, lr=LR)
        similarity = reconstruction_similarity(X[i], result.x[0])
        assert similarity < CHANCE, (i, similarity)
        others = np.delete(_similarities_to_all(result.x[0]), i)
        outranked.append((others > similarity).mean())
        labels_right += int(result.y[0]) == Y[i]
    assert np.mean(outranked) > 0.2, outranked
    assert labels_right <= 5  # chance is 1 in 10; the plain gradient gives 10 of 10


# --- model_gradient ------------------------------------------------------------------------------


def test_model_gradient_equals_autograd_and_leaves_grad_alone():
    model = models.mlp(seed=1)
    x, y = torch.tensor(X[:5]), torch.tensor(Y[:5])
    sentinel = {name: torch.full_like(p, 7.0) for name, p in model.named_parameters()}
    for name, p in model.named_parameters():
        p.grad = sentinel[name].clone()
    before = copy.deepcopy(model.state_dict())
    g = model_gradient(model, x, y)
    reference = copy.deepcopy(model)
    reference.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(reference(x), y).backward()
    assert list(g) == [name for name, _ in model.named_parameters()]
    for name, p in reference.named_parameters():
        torch.testing.assert_close(g[name], p.grad)
        assert not g[name].requires_grad
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, sentinel[name])
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name])


def test_model_gradient_takes_numpy_and_skips_frozen_parameters():
    model = models.mlp(seed=1)
    model[0].bias.requires_grad_(False)
    g = model_gradient(model, X[:3], Y[:3])
    assert sorted(g) == ["0.weight", "2.bias", "2.weight"]


# --- invert_gradient: side effects, reproducibility, labels --------------------------------------


def test_invert_gradient_leaves_the_model_unchanged():
    model = models.mlp(seed=0).eval()
    gradient = model_gradient(model, *_one(3))
    before = copy.deepcopy(model.state_dict())
    invert_gradient(model, gradient, steps=5)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name])
    assert all(p.grad is None for p in model.parameters())
    assert not model.training


def test_invert_gradient_is_reproducible_from_the_seed():
    model = models.mlp(seed=0)
    gradient = model_gradient(model, *_one(3))
    a = invert_gradient(model, gradient, steps=10, seed=5)
    b = invert_gradient(model, gradient, steps=10, seed=5)
    c = invert_gradient(model, gradient, steps=10, seed=6)
    assert isinstance(a, InversionResult)
    assert torch.equal(a.x, b.x) and a.losses == b.losses
    assert not torch.equal(a.x, c.x)


def test_result_shapes_losses_and_bounds():
    model = models.mlp(seed=0)
    result = invert_gradient(model, model_gradient(model, *_one(3)), steps=30, bounds=(0.0, 1.0))
    assert result.x.shape == (1, 64) and result.y.shape == (1,) and result.y.dtype == torch.int64
    assert len(result.losses) == 30 and all(isinstance(v, float) for v in result.losses)
    assert result.losses[-1] < 0.1 * result.losses[0]
    assert result.x.min() >= 0.0 and result.x.max() <= 1.0


@pytest.mark.parametrize("state", sorted(MODELS))
def test_analytic_label_recovery_returns_the_true_label(state):
    """iDLG on one digit of each class (steps=1: the label is recovered before optimising)."""
    model = MODELS[state]()
    for i in FIRST_OF_EACH_CLASS:
        result = invert_gradient(model, model_gradient(model, *_one(i)), steps=1)
        assert int(result.y[0]) == Y[i]


def test_the_label_is_recovered_from_a_model_that_is_one_linear_layer():
    """A coursework trial: a bare nn.Linear names its bias "bias", not "<layer>.bias", and was
    told it had no bias in its last Linear ("pass label")."""
    torch.manual_seed(0)
    model = nn.Linear(64, 10)
    for i in FIRST_OF_EACH_CLASS[:3]:
        result = invert_gradient(model, model_gradient(model, *_one(i)), steps=1)
        assert int(result.y[0]) == Y[i]


@pytest.mark.parametrize("label", [4, [4], (4,), np.array([4]), torch.tensor([4]), torch.tensor(4)])
def test_given_labels_are_used(label):
    model = models.mlp(seed=0)
    result = invert_gradient(model, model_gradient(model, *_one(0)), label=label, steps=1)
    assert result.y.tolist() == [4]


def test_small_cnn_input_size_is_read_from_its_unflatten_layer():
    model = models.small_cnn(seed=0)
    result = invert_gradient(model, model_gradient(model, *_one(0)), steps=2, image_shape=(8, 8))
    assert result.x.shape == (1, 64) and int(result.y[0]) == Y[0]


# --- reconstruction_similarity -------------------------------------------------------------------


def test_similarity_is_one_for_identical_images_and_invariant_to_brightness_and_contrast():
    x, other = (
        X[0].astype(np.float64),
        X[1].astype(np.float64),
    )  # float64: the affine maps are exact to 1e-15
    assert reconstruction_similarity(x, x) == pytest.approx(1.0, abs=1e-12)
    assert reconstruction_similarity(torch.tensor(x)[None], torch.tensor(x)) == pytest.approx(
        1.0, abs=1e-12
    )
    base = reconstruction_similarity(x, other)
    assert -1 <= base < 0.99
    for scale, shift in [(2.0, 0.0), (0.3, 0.5), (5.0, -3.0)]:
        assert reconstruction_similarity(x, scale * other + shift) == pytest.approx(base, abs=1e-12)
        assert reconstruction_similarity(scale * x + shift, other) == pytest.approx(base, abs=1e-12)
    assert reconstruction_similarity(x, 1.0 - x) == pytest.approx(-1.0, abs=1e-12)
    assert reconstruction_similarity(x, np.full(64, 0.5)) == 0.0  # a constant image: no information


def test_random_images_score_near_zero():
    """The chance baseline quoted at the top of this file: mean 0, sd about 1/sqrt(63) = 0.126."""
    rng = np.random.default_rng(0)
    scores = np.array([reconstruction_similarity(X[k], rng.random(64)) for k in range(500)])
    assert abs(scores.mean()) < 0.03 and 0.1 < scores.std() < 0.15


# --- validation ----------------------------------------------------------------------------------


def _gradient():
    model = models.mlp(seed=0)
    return model, model_gradient(model, *_one(0))


def _renamed(g):
    g = dict(g)
    g["extra"] = g.pop("0.bias")
    return g


def _reshaped(g):
    g = dict(g)
    g["0.weight"] = g["0.weight"].T
    return g


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (
            lambda g: {"gradient": _renamed(g)},
            ValueError,
            "gradient must have one entry per trainable",
        ),
        (lambda g: {"gradient": _reshaped(g)}, ValueError, r"gradient\['0.weight'\] must have"),
        (
            lambda g: {"gradient": {k: v.numpy() for k, v in g.items()}},
            TypeError,
            "must be a torch.Tensor",
        ),
        (lambda g: {"gradient": list(g.values())}, TypeError, "gradient must be a dict"),
        (lambda g: {"gradient": {**g, "2.bias": g["2.bias"] * float("nan")}}, ValueError, "NaN"),
        (lambda g: {"steps": 0}, ValueError, "steps must be >= 1"),
        (lambda g: {"steps": 2.5}, TypeError, "steps must be an integer"),
        (lambda g: {"lr": 0.0}, ValueError, "lr must be > 0"),
        (lambda g: {"lr": -1.0}, ValueError, "lr must be > 0"),
        (lambda g: {"distance": "l1"}, ValueError, "distance must be one of"),
        (lambda g: {"tv_weight": -0.1}, ValueError, "tv_weight must be >= 0"),
        (lambda g: {"tv_weight": 0.1}, ValueError, "tv_weight > 0 needs image_shape"),
        (lambda g: {"image_shape": (7, 7)}, ValueError, "image_shape .* 49 pixels"),
        (lambda g: {"image_shape": (8, 8, 1)}, TypeError, "image_shape must be a pair"),
        (lambda g: {"batch_size": 0}, ValueError, "batch_size must be >= 1"),
        (lambda g: {"batch_size": 2}, ValueError, "label is required for batch_size > 1"),
        (
            lambda g: {"batch_size": 2, "label": [1]},
            ValueError,
            r"label must have shape \(batch_size,\)",
        ),
        (lambda g: {"label": [[1]]}, ValueError, r"label must have shape \(batch_size,\)"),
        (lambda g: {"label": [1, 2]}, ValueError, r"label must have shape \(batch_size,\)"),
        (lambda g: {"label": 10}, ValueError, "label must hold classes below"),
        (lambda g: {"label": -1}, ValueError, "label must hold class labels >= 0"),
        (lambda g: {"label": 1.0}, TypeError, "label must be an int"),
        (lambda g: {"label": torch.tensor([1.0])}, TypeError, "label must hold integer"),
        (lambda g: {"bounds": (1.0, 0.0)}, ValueError, "bounds must satisfy low < high"),
        (lambda g: {"seed": -1}, ValueError, "seed must be >= 0"),
        (lambda g: {"progress": "no"}, TypeError, "progress must be True or False"),
    ],
)
def test_invert_gradient_rejects_bad_arguments(change, error, match):
    model, g = _gradient()
    kwargs = {"gradient": g, "steps": 1}
    kwargs.update(change(g))
    with pytest.raises(error, match=match):
        invert_gradient(model, **kwargs)


def test_invert_gradient_rejects_a_non_module_and_a_model_without_a_last_bias():
    _, g = _gradient()
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        invert_gradient("mlp", g)
    model = nn.Sequential(nn.Linear(64, 10, bias=False))
    g = model_gradient(model, *_one(0))
    with pytest.raises(ValueError, match="without a bias in the last Linear: pass label"):
        invert_gradient(model, g, steps=1)
    assert invert_gradient(model, g, steps=1, label=int(Y[0])).y.tolist() == [Y[0]]


def test_model_gradient_rejects_bad_arguments():
    model = models.mlp(seed=0)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        model_gradient(None, X[:1], Y[:1])
    with pytest.raises(ValueError, match="loss must be one of"):
        model_gradient(model, X[:1], Y[:1], loss="mse")
    with pytest.raises(ValueError, match="same number of examples"):
        model_gradient(model, X[:2], Y[:1])
    with pytest.raises(ValueError, match="labels must be below the model's 10 outputs"):
        model_gradient(model, X[:1], Y[:1] + 10)  # was torch's "Target 1x is out of bounds"


@pytest.mark.parametrize(
    ("original", "reconstruction", "error", "match"),
    [
        (X[0], X[0][:10], ValueError, "same number of pixels"),
        (X[:2], X[0], ValueError, r"original must be one image, of shape \(n,\) or \(1, n\)"),
        (X[0], [0.1] * 64, TypeError, "reconstruction must be a torch.Tensor or a numpy array"),
        (X[0], np.full(64, np.nan), ValueError, "reconstruction must not contain NaN"),
        (X[0], np.ones(64, dtype=bool), TypeError, "reconstruction must hold real numbers"),
    ],
)
def test_similarity_rejects_bad_inputs(original, reconstruction, error, match):
    with pytest.raises(error, match=match):
        reconstruction_similarity(original, reconstruction)


class _HeadFirst(nn.Module):
    """An MLP whose head is registered before its body: the first Linear in registration order
    takes 16 features, while the model takes 64."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(16, 10)
        self.body = nn.Linear(64, 16)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def test_a_model_registered_head_first_needs_and_accepts_image_shape():
    """The review's head-first model: the guess from the first registered layer is refused with
    a message that says what to pass (not a torch shape error), and image_shape is then used
    (the review got a false "the model takes 64 input features" for it)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = _HeadFirst()
    g = model_gradient(model, *_one(0))
    with pytest.raises(ValueError, match="the first layer registered takes 16 input features, but"):
        invert_gradient(model, g, steps=1)
    result = invert_gradient(model, g, steps=STEPS, lr=LR, image_shape=(8, 8))
    assert result.x.shape == (1, 64)
    assert reconstruction_similarity(X[0], result.x[0]) > CHANCE  # the attack ran on 64 inputs


def test_a_convolutional_model_is_told_to_take_flat_inputs():
    """helper-104's trial: a CNN given image_shape=(8, 8), as the message asked, was refused
    again with no word that the dummy inputs are flat; the message now says so, and a leading
    Unflatten makes the attack run."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        body = [nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10)]
        model = nn.Sequential(*body)
    images = torch.as_tensor(X[:1], dtype=torch.float32).view(1, 1, 8, 8)
    g = model_gradient(model, images, torch.tensor([int(Y[0])]))
    with pytest.raises(
        ValueError, match=r"flat, \(batch, 64\): .* nn\.Unflatten\(1, \(C, H, W\)\)"
    ):
        invert_gradient(model, g, steps=1, image_shape=(8, 8))
    flat = nn.Sequential(nn.Unflatten(1, (1, 8, 8)), *body)
    g = model_gradient(flat, images.view(1, 64), torch.tensor([int(Y[0])]))
    assert invert_gradient(flat, g, steps=1, image_shape=(8, 8)).x.shape == (1, 64)


def test_a_one_logit_model_is_refused():
    model = nn.Sequential(nn.Linear(64, 1))
    g = model_gradient(model, X[:1], np.array([1]), loss="bce")
    with pytest.raises(ValueError, match="returns 1 output per example; .* not one-logit"):
        invert_gradient(model, g, steps=1, label=0)


def test_a_batch_gradient_attacked_as_one_example_warns_but_a_noised_one_does_not():
    """A batch's bias gradient sums to zero with one negative entry per class present, which
    one example's cannot: the attack warns. Noise breaks the zero sum (and makes any number of
    entries negative), so a noised single-example gradient is not taken for a batch."""
    model = models.mlp(seed=0)
    batch = [FIRST_OF_EACH_CLASS[c] for c in (0, 1, 2)]
    g = model_gradient(model, X[batch], Y[batch])
    with pytest.warns(
        UserWarning, match="it is the gradient of a batch of at least 3 examples"
    ) as record:
        invert_gradient(model, g, steps=1)
    assert record[0].filename == __file__  # points at the caller's line
    noised = {name: v + torch.randn(v.shape, generator=torch.Generator().manual_seed(0))
              for name, v in model_gradient(model, *_one(0)).items()}  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        invert_gradient(model, noised, steps=1)
        invert_gradient(model, model_gradient(model, *_one(0)), steps=1)
