"""Tests of companion.attacks (membership inference: the loss-threshold attack of Yeom et al. 2018).

Setting measured (``load_digits(seed=0)``, one thread): members are 250 training digits and
non-members 250 test digits, both drawn by ``numpy.random.default_rng(seed)``; ``models.mlp(seed=seed)``.

- Overfitted: ``training.train`` with batch 32, lr 0.5, 300 epochs, no regularisation (0.6 s):
  training accuracy 1.000, test accuracy 0.92-0.94. Seeds 0-4: AUC 0.578, 0.577, 0.573, 0.584,
  0.539; TPR at 1% FPR 0.024, 0.004, 0.016, 0.028, 0.008; advantage 0.224, 0.224, 0.244, 0.252,
  0.212. With 100 members (test accuracy 0.88) the AUC rises to 0.63-0.74, but TPR at 1% FPR
  stays 0-0.08: a single loss threshold finds few members with confidence, because easy test
  digits have losses as small as training digits (Carlini et al. 2022).
- DP-SGD on the same members: sample rate 0.2, 20 epochs (100 steps), C = 1, lr 1, noise
  multiplier 8.28 from ``get_noise_multiplier`` for epsilon 1 at delta 1e-5 (0.1 s): test
  accuracy 0.20-0.33. Seeds 0-4: AUC 0.526, 0.516, 0.503, 0.497, 0.525; TPR at 1% FPR 0 for
  all; advantage 0.080, 0.060, 0.036, 0.060, 0.076; the ROC curve never above e^1 FPR + 1e-5.

Null references for 250 + 250 examples with no membership signal: the AUC has standard
deviation sqrt((n1 + n2 + 1) / (12 n1 n2)) = 0.0258 (Mann-Whitney); by simulation (2,000 draws)
TPR at 1% FPR has mean 0.012, 90th percentile 0.024, 99th 0.040, and the advantage (500 draws)
mean 0.055, 99th percentile 0.136.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from companion import accounting, data, dpsgd, models, training
from companion.attacks import MembershipAttackResult, loss_threshold_attack

DIGITS = data.load_digits(seed=0)
N = 250
NULL_SD = math.sqrt((N + N + 1) / (12 * N * N))  # 0.0258
EPSILON, DELTA = 1.0, 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One thread for this file's small models (two threads on a loaded two-core machine were
    50 times slower, see tests/test_attacks.py); the setting is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _split(seed):
    rng = np.random.default_rng(seed)
    members = rng.choice(len(DIGITS.x_train), N, replace=False)
    nonmembers = rng.choice(len(DIGITS.x_test), N, replace=False)
    return (
        (DIGITS.x_train[members], DIGITS.y_train[members]),
        (DIGITS.x_test[nonmembers], DIGITS.y_test[nonmembers]),
    )


@pytest.fixture(scope="module")
def overfitted(_one_thread):
    members, nonmembers = _split(0)
    model = models.mlp(seed=0)
    history = training.train(model, *members, epochs=300, batch_size=32, lr=0.5, seed=0)
    assert history[-1]["train_accuracy"] == 1.0
    return model, members, nonmembers


@pytest.fixture(scope="module")
def private(_one_thread):
    members, nonmembers = _split(0)
    sample_rate, epochs = 50 / N, 20
    sigma = accounting.get_noise_multiplier(
        target_epsilon=EPSILON, target_delta=DELTA, sample_rate=sample_rate, steps=epochs * round(1 / sample_rate)
    )
    model = models.mlp(seed=0)
    history = dpsgd.train_dpsgd(
        model, *members, noise_multiplier=sigma, max_grad_norm=1.0, sample_rate=sample_rate,
        epochs=epochs, lr=1.0, delta=DELTA, seed=0, progress=False,
    )  # fmt: skip
    assert history[-1]["epsilon"] <= EPSILON
    return model, members, nonmembers, history[-1]["epsilon"]


# --- the attack on real models ------------------------------------------------------------------


def test_attack_detects_membership_in_an_overfitted_model(overfitted):
    model, members, nonmembers = overfitted
    result = loss_threshold_attack(model, members, nonmembers)
    # Measured 0.578 = 0.5 + 3.0 null sds (seeds 0-4: 0.539-0.584); require more than 2 null sds.
    assert result.auc > 0.5 + 2 * NULL_SD
    # Measured 0.224 (seeds 0-4: 0.21-0.25); no signal gives 0.055 on average, 0.136 at the 99th percentile.
    assert result.advantage() > 0.15
    # Measured 0.024 (6 of 250 members at <= 2 of 250 false positives). This is above the 0.012
    # of no signal, but only at its 90th percentile: the single-threshold loss attack is weak at
    # low FPR even on a model with 100% training accuracy, the point of Carlini et al. 2022.
    assert result.tpr_at(0.01) > 0.01


def test_attack_on_a_strongly_private_model_is_near_chance(private):
    model, members, nonmembers, epsilon = private
    result = loss_threshold_attack(model, members, nonmembers)
    # Measured 0.526 = 0.5 + 1.0 null sd (seeds 0-4: 0.497-0.526).
    assert abs(result.auc - 0.5) < 3 * NULL_SD
    # Measured 0.080 (seeds 0-4: 0.036-0.080), within the null's range (99th percentile 0.136).
    assert result.advantage() < 0.136
    # (epsilon, delta)-DP bounds every point of the *true* ROC curve: TPR <= e^eps FPR + delta.
    # The measured TPR is a mean of 250 indicators, sd <= sqrt(0.25 / 250) = 0.032, so allow
    # 3 sds (0.095). The measured curve meets the bound with no tolerance (largest excess -1e-5).
    bound = np.exp(epsilon) * result.fpr + DELTA
    assert np.all(result.tpr <= bound + 3 * math.sqrt(0.25 / N))
    # Yeom et al.'s Theorem 1 bound e^eps - 1 = 1.72 is for delta = 0; with delta > 0 the curve
    # bound gives TPR - FPR <= (e^eps - 1) FPR + delta <= e^eps - 1 + delta.
    assert result.advantage() <= math.expm1(epsilon) + DELTA


def test_attack_leaves_model_unchanged(overfitted):
    model, members, nonmembers = overfitted
    for mode in (True, False):
        model.train(mode)
        before = copy.deepcopy(model.state_dict())
        loss_threshold_attack(model, members, nonmembers)
        assert model.training is mode
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert all(p.grad is None for p in model.parameters())


# --- the ROC summaries --------------------------------------------------------------------------


def test_auc_is_sklearn_and_mann_whitney(overfitted):
    model, members, nonmembers = overfitted
    result = loss_threshold_attack(model, members, nonmembers)
    m, n = result.member_scores, result.nonmember_scores
    labels = np.r_[np.ones(m.size), np.zeros(n.size)]
    assert result.auc == pytest.approx(roc_auc_score(labels, np.r_[m, n]), abs=1e-12)
    mann_whitney = np.mean((m[:, None] > n[None, :]) + 0.5 * (m[:, None] == n[None, :]))
    assert result.auc == pytest.approx(mann_whitney, abs=1e-12)
    # The scores are minus the per-example losses.
    x, y = members
    with torch.no_grad():
        losses = torch.nn.functional.cross_entropy(model(torch.tensor(x)).double(), torch.tensor(y), reduction="none")
    np.testing.assert_allclose(m, -losses.numpy(), rtol=1e-12)


def test_hand_made_example():
    # Scores, members M = {5, 4, 2, 1}, non-members N = {3, 0}; thresholds from high to low:
    #   tau=5: TPR 1/4, FPR 0;  tau=4: 2/4, 0;  tau=3: 2/4, 1/2;  tau=2: 3/4, 1/2;  tau=1: 1, 1/2;  tau=0: 1, 1.
    result = MembershipAttackResult.from_scores(np.array([5.0, 4.0, 2.0, 1.0]), np.array([3.0, 0.0]))
    np.testing.assert_allclose(result.fpr, [0, 0, 0, 0.5, 0.5, 0.5, 1])
    np.testing.assert_allclose(result.tpr, [0, 0.25, 0.5, 0.5, 0.75, 1, 1])
    assert result.tpr_at(0.01) == 0.5
    assert result.tpr_at(0.5) == 1.0
    assert result.tpr_at(0.49) == 0.5
    assert result.advantage() == 0.5  # max(1/2 - 0, 1 - 1/2)
    # Of the 4 * 2 member/non-member pairs, all but (2, 3) and (1, 3) rank the member higher: 6/8.
    assert result.auc == 0.75


def test_identical_distributions_give_auc_one_half():
    scores = np.array([0.0, 1.0, 1.0, 2.5, 7.0])
    result = MembershipAttackResult.from_scores(scores, scores.copy())
    assert result.auc == 0.5
    assert result.advantage() == 0.0
    # The same holds for the attack when members and non-members are the same examples.
    x, y = DIGITS.x_test[:50], DIGITS.y_test[:50]
    assert loss_threshold_attack(models.mlp(seed=0), (x, y), (x, y)).auc == 0.5


def test_bce_model():
    moons = data.make_moons(200, seed=0)
    model = models.binary_mlp(seed=0)
    result = loss_threshold_attack(model, (moons.x_train, moons.y_train), (moons.x_test, moons.y_test), loss="bce")
    assert 0.0 <= result.auc <= 1.0
    assert result.member_scores.shape == (len(moons.y_train),)
    assert np.all(result.member_scores <= 0)


# --- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("members", "nonmembers", "loss", "error", "match"),
    [
        ((DIGITS.x_train[:5], DIGITS.y_train[:4]), (DIGITS.x_test[:5], DIGITS.y_test[:5]), "cross_entropy",
         ValueError, "members x and members y must have the same number"),
        ((DIGITS.x_train[:5], DIGITS.y_train[:5]), (DIGITS.x_test[:0], DIGITS.y_test[:0]), "cross_entropy",
         ValueError, "nonmembers x must hold at least one example"),
        (DIGITS.x_train[:5], (DIGITS.x_test[:5], DIGITS.y_test[:5]), "cross_entropy",
         TypeError, "members must be a pair"),
        (([[0.0] * 64], DIGITS.y_train[:1]), (DIGITS.x_test[:5], DIGITS.y_test[:5]), "cross_entropy",
         TypeError, "members x must be a torch.Tensor or a numpy array"),
        ((DIGITS.x_train[:5], DIGITS.y_train[:5].astype(float)), (DIGITS.x_test[:5], DIGITS.y_test[:5]),
         "cross_entropy", TypeError, "members y must hold integer class labels"),
        ((DIGITS.x_train[:5], DIGITS.y_train[:5]), (DIGITS.x_test[:5], DIGITS.y_test[:5] + 10), "cross_entropy",
         ValueError, "nonmembers y holds a label >= the model's 10 classes"),
        ((DIGITS.x_train[:5], DIGITS.y_train[:5]), (DIGITS.x_test[:5], DIGITS.y_test[:5]), "hinge",
         ValueError, "loss must be one of"),
    ],
)  # fmt: skip
def test_attack_rejects_bad_input(members, nonmembers, loss, error, match):
    with pytest.raises(error, match=match):
        loss_threshold_attack(models.mlp(seed=0), members, nonmembers, loss=loss)


def test_attack_rejects_non_model():
    pair = (DIGITS.x_test[:5], DIGITS.y_test[:5])
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        loss_threshold_attack(lambda x: x, pair, pair)


@pytest.mark.parametrize("fpr", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_tpr_at_rejects_fpr_outside_unit_interval(fpr):
    result = MembershipAttackResult.from_scores(np.array([1.0]), np.array([0.0]))
    with pytest.raises(ValueError, match="fpr must"):
        result.tpr_at(fpr)


def test_tpr_at_rejects_non_number():
    result = MembershipAttackResult.from_scores(np.array([1.0]), np.array([0.0]))
    with pytest.raises(TypeError, match="fpr must be a real number"):
        result.tpr_at("0.01")


@pytest.mark.parametrize(
    ("scores", "error", "match"),
    [
        (np.array([]), ValueError, "member_scores must hold at least one score"),
        (np.array([1.0, np.nan]), ValueError, "member_scores must not contain NaN"),
        (np.ones((2, 2)), ValueError, "member_scores must be one-dimensional"),
        ([1.0, 2.0], TypeError, "member_scores must be a numpy array"),
        (np.array([True]), TypeError, "member_scores must hold real numbers"),
    ],
)
def test_from_scores_rejects_bad_scores(scores, error, match):
    with pytest.raises(error, match=match):
        MembershipAttackResult.from_scores(scores, np.array([0.0]))
