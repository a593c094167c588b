"""Tests of companion.attacks.membership and companion.attacks.roc (membership inference: the
per-example signals, the loss-threshold attack of Yeom et al. 2018, and the ROC summaries).

Setting measured (``load_digits(seed=0)``, one thread): members are 250 training digits and
non-members 250 test digits, both drawn by ``numpy.random.default_rng(seed)``;
``models.mlp(seed=seed)``.

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
deviation sqrt((n1 + n2 + 1) / (12 n1 n2)) = 0.0258 (Mann-Whitney); the TPR at 1% FPR and the
advantage are simulated in the ``null`` fixture (2,000 draws, seed 0, plain numpy): TPR at 1%
FPR mean 0.012, 90th percentile 0.024, 99th 0.044; advantage mean 0.055, 99th percentile 0.136.
"""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import scipy.special
import torch
from conftest import load_shared_digits
from sklearn.metrics import roc_auc_score
from torch import nn

from companion import accounting, data, dpsgd, models, training
from companion.attacks import MembershipAttackResult, logit_confidence, loss_threshold_attack

pytestmark = pytest.mark.usefixtures("one_thread")

DIGITS = load_shared_digits()
N = 250
NULL_SD = math.sqrt((N + N + 1) / (12 * N * N))  # 0.0258
EPSILON, DELTA = 1.0, 1e-5


def _null_rates(members, nonmembers, fpr=0.01):
    """TPR at ``fpr`` and the advantage of each row of continuous scores (no ties), computed
    without the code under test: the TPR counts members above the (k+1)-th largest non-member
    score, k = floor(fpr n), and the advantage is the largest gap of the two cumulative counts
    down the merged ranking (the one-sided Kolmogorov-Smirnov statistic, at least 0)."""
    n = nonmembers.shape[1]
    threshold = -np.sort(-nonmembers, axis=1)[:, math.floor(fpr * n)]
    tpr = (members > threshold[:, None]).mean(axis=1)
    labels = np.r_[np.ones(members.shape[1]), np.zeros(n)]
    ranked = labels[np.argsort(-np.concatenate([members, nonmembers], axis=1), axis=1)]
    gaps = np.cumsum(ranked, axis=1) / members.shape[1] - np.cumsum(1 - ranked, axis=1) / n
    return tpr, np.maximum(gaps.max(axis=1), 0.0)


@pytest.fixture(scope="module")
def null():
    """The null distributions for 250 + 250 examples with no membership signal (both sets from
    one distribution), 2,000 draws from a fixed seed (0.2 s)."""
    rng = np.random.default_rng(0)
    tpr, advantage = _null_rates(rng.standard_normal((2000, N)), rng.standard_normal((2000, N)))
    return {"tpr_q99": np.quantile(tpr, 0.99), "advantage_q99": np.quantile(advantage, 0.99)}


def test_null_rates_agree_with_the_result_object():
    """The plain formulas of the null simulation against MembershipAttackResult, draw by draw."""
    rng = np.random.default_rng(1)
    members, nonmembers = rng.standard_normal((20, N)), rng.standard_normal((20, N))
    tpr, advantage = _null_rates(members, nonmembers)
    for i in range(20):
        result = MembershipAttackResult.from_scores(members[i], nonmembers[i])
        assert result.tpr_at(0.01) == tpr[i]
        assert result.advantage() == pytest.approx(advantage[i], abs=1e-12)


def _split(seed):
    rng = np.random.default_rng(seed)
    members = rng.choice(len(DIGITS.x_train), N, replace=False)
    nonmembers = rng.choice(len(DIGITS.x_test), N, replace=False)
    return (
        (DIGITS.x_train[members], DIGITS.y_train[members]),
        (DIGITS.x_test[nonmembers], DIGITS.y_test[nonmembers]),
    )


@pytest.fixture(scope="module")
def overfitted(one_thread):
    members, nonmembers = _split(0)
    model = models.mlp(seed=0)
    history = training.train(model, *members, epochs=300, batch_size=32, lr=0.5, seed=0)
    assert history[-1]["train_accuracy"] == 1.0
    return model, members, nonmembers


@pytest.fixture(scope="module")
def private(one_thread):
    members, nonmembers = _split(0)
    sample_rate, epochs = 50 / N, 20
    sigma = accounting.get_noise_multiplier(
        target_epsilon=EPSILON,
        target_delta=DELTA,
        sample_rate=sample_rate,
        steps=epochs * round(1 / sample_rate),
    )
    model = models.mlp(seed=0)
    history = dpsgd.train_dpsgd(
        model,
        *members,
        noise_multiplier=sigma,
        max_grad_norm=1.0,
        sample_rate=sample_rate,
        epochs=epochs,
        lr=1.0,
        delta=DELTA,
        seed=0,
        progress=False,
    )
    assert history[-1]["epsilon"] <= EPSILON
    return model, members, nonmembers, history[-1]["epsilon"]


# --- the attack on real models ------------------------------------------------------------------


def test_attack_detects_membership_in_an_overfitted_model(overfitted, null):
    model, members, nonmembers = overfitted
    result = loss_threshold_attack(model, members, nonmembers)
    # Measured 0.578 = 0.5 + 3.0 null sds (seeds 0-4: 0.539-0.584); require more than 2 null sds.
    assert result.auc > 0.5 + 2 * NULL_SD
    # Measured 0.224 (seeds 0-4: 0.21-0.25); no signal gives 0.055 on average, 0.136 at the
    # 99th percentile: require both 0.15 and more than that percentile.
    assert result.advantage() > max(0.15, null["advantage_q99"])
    # No check of the TPR at 1% FPR: it measured 0.024 (6 of 250 members at <= 2 of 250 false
    # positives), only the 90th percentile of no signal (0.024), and of seeds 0-5, seeds 1, 4 and
    # 5 gave 0.004 to 0.008, below no signal's mean (0.012). The single-threshold loss attack is
    # weak at low FPR even on a model with 100% training accuracy, the point of Carlini et al.
    # 2022; tests/test_lira.py checks the per-example attack there.


def test_attack_on_a_strongly_private_model_is_near_chance(private, null):
    model, members, nonmembers, epsilon = private
    result = loss_threshold_attack(model, members, nonmembers)
    # Measured 0.526 = 0.5 + 1.0 null sd (seeds 0-4: 0.497-0.526).
    assert abs(result.auc - 0.5) < 3 * NULL_SD
    # Measured 0.080 (seeds 0-4: 0.036-0.080), within the null's range (99th percentile 0.136);
    # TPR at 1% FPR measured 0 (seeds 0-4), below the null's 99th percentile (0.044).
    assert result.advantage() < null["advantage_q99"]
    assert result.tpr_at(0.01) <= null["tpr_q99"]
    # (epsilon, delta)-DP bounds every point of the *true* ROC curve: TPR <= e^eps FPR + delta.
    # The measured TPR is a mean of 250 indicators, sd <= sqrt(0.25 / 250) = 0.032, so allow
    # 3 sds (0.095). The measured curve meets the bound with no tolerance (largest excess -1e-5).
    # The slack makes the check bite only at low FPR: for FPR >= (1 - 0.095) / e = 0.33 the
    # bound exceeds 1 and holds for any curve.
    bound = np.exp(epsilon) * result.fpr + DELTA
    assert np.all(result.tpr <= bound + 3 * math.sqrt(0.25 / N))
    # The same bound applied to the complementary test (guess "member" below the threshold)
    # caps the advantage of any (epsilon, delta)-DP test at (e^eps - 1 + 2 delta) / (e^eps + 1)
    # = 0.462 (Kairouz, Oh and Viswanath 2015, Theorem 2.1), well below the trivial 1. Sampling
    # error of the measured advantage is at most the sum of the two empirical CDFs' deviations,
    # each below sqrt(ln(4 / alpha) / (2 N)) = 0.129 with probability 1 - alpha / 2 (DKW
    # inequality, alpha = 1e-3).
    kairouz = (math.expm1(epsilon) + 2 * DELTA) / (math.exp(epsilon) + 1)
    dkw = math.sqrt(math.log(4 / 1e-3) / (2 * N))
    assert result.advantage() <= kairouz + 2 * dkw


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
        losses = torch.nn.functional.cross_entropy(
            model(torch.tensor(x)).double(), torch.tensor(y), reduction="none"
        )
    np.testing.assert_allclose(m, -losses.numpy(), rtol=1e-12)


def test_hand_made_example():
    # Scores, members M = {5, 4, 2, 1}, non-members N = {3, 0}; thresholds from high to low:
    #   tau=5: TPR 1/4, FPR 0;  tau=4: 2/4, 0;  tau=3: 2/4, 1/2;  tau=2: 3/4, 1/2;
    #   tau=1: 1, 1/2;  tau=0: 1, 1.
    result = MembershipAttackResult.from_scores(
        np.array([5.0, 4.0, 2.0, 1.0]), np.array([3.0, 0.0])
    )
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
    """Scores are minus the binary cross-entropy, log(1 + e^-z) for label 1 and log(1 + e^z)
    for label 0, computed here with numpy's logaddexp in float64; the AUC is their Mann-Whitney
    statistic."""
    moons = data.make_moons(200, seed=0)
    model = models.binary_mlp(seed=0)
    members, nonmembers = (moons.x_train, moons.y_train), (moons.x_test, moons.y_test)
    result = loss_threshold_attack(model, members, nonmembers, loss="bce")

    def minus_bce(x, y):
        with torch.no_grad():
            z = model(torch.tensor(x)).double().reshape(-1).numpy()
        return -np.logaddexp(0.0, np.where(y == 1, -z, z))

    m, n = minus_bce(*members), minus_bce(*nonmembers)
    np.testing.assert_allclose(result.member_scores, m, rtol=1e-12)
    np.testing.assert_allclose(result.nonmember_scores, n, rtol=1e-12)
    mann_whitney = np.mean((m[:, None] > n[None, :]) + 0.5 * (m[:, None] == n[None, :]))
    assert result.auc == pytest.approx(mann_whitney, abs=1e-12)
    assert np.all(result.member_scores <= 0)


# --- the log-log ROC plot -----------------------------------------------------------------------


def test_plot_draws_the_curve_on_log_axes():
    import matplotlib.pyplot as plt

    result = MembershipAttackResult.from_scores(
        np.array([5.0, 4.0, 2.0, 1.0]), np.array([3.0, 0.0])
    )
    fig, ax = plt.subplots()
    try:
        assert result.plot(ax, label="loss") is ax
        curve, diagonal = ax.get_lines()
        np.testing.assert_array_equal(curve.get_xdata(), result.fpr)
        np.testing.assert_array_equal(curve.get_ydata(), result.tpr)
        assert curve.get_label() == "loss"
        assert (ax.get_xscale(), ax.get_yscale()) == ("log", "log")
        assert ax.get_xlim() == pytest.approx((0.25, 1.0))  # half a step: 1 / (2 * 2)
        result.plot(ax2 := fig.add_subplot(2, 1, 2), log=False)
        assert ax2.get_xscale() == "linear" and ax2.get_lines()[0].get_label() == "AUC 0.750"
    finally:
        plt.close(fig)


# --- logit-scaled confidence --------------------------------------------------------------------


def test_logit_confidence_is_log_odds_of_the_softmax(overfitted):
    """phi = log(p_y / (1 - p_y)) with p = softmax of the logits, computed here with scipy in
    float64 where 1 - p_y keeps its precision (p_y < 0.999: the untrained model); on the trained
    model phi ranks the members as minus the loss does (both are increasing in p_y)."""
    x, y = DIGITS.x_test[:100], DIGITS.y_test[:100]
    model = models.mlp(seed=0)
    with torch.no_grad():
        z = model(torch.tensor(x)).double().numpy()
    p = scipy.special.softmax(z, axis=1)[np.arange(100), y]
    assert p.max() < 0.999
    np.testing.assert_allclose(logit_confidence(model, x, y), np.log(p) - np.log1p(-p), rtol=1e-9)

    trained, members, _ = overfitted
    phi = logit_confidence(trained, *members)
    losses = -loss_threshold_attack(trained, members, members).member_scores
    order = np.argsort(phi, kind="stable")
    assert np.all(np.diff(losses[order]) <= 1e-15)  # higher phi, lower (or equal) loss


def test_logit_confidence_for_one_logit_is_the_signed_logit():
    model = models.binary_mlp(seed=0)
    moons = data.make_moons(50, seed=0)
    with torch.no_grad():
        z = model(torch.tensor(moons.x_train)).double().reshape(-1).numpy()
    phi = logit_confidence(model, moons.x_train, moons.y_train, loss="bce")
    np.testing.assert_array_equal(phi, np.where(moons.y_train == 1, z, -z))


def test_logit_confidence_does_not_round_confident_predictions_to_infinity():
    """Logits (60, 0, 0): p_y = 1 - 2e-26 is 1.0 in float64, so log(p / (1 - p)) would be
    infinite; phi = 60 - log 2 is not."""
    model = nn.Linear(1, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[60.0], [0.0], [0.0]]))
    phi = logit_confidence(model, np.array([[1.0]]), np.array([0]))
    assert phi[0] == pytest.approx(60 - math.log(2), rel=1e-12)


# --- models that return probabilities -----------------------------------------------------------


class _SoftmaxInForward(nn.Module):
    """A classifier whose forward ends in a softmax, invisible from its layers."""

    def __init__(self) -> None:
        super().__init__()
        self.net = models.mlp(seed=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x), dim=1)


class _SigmoidInForward(nn.Module):
    """A binary classifier whose forward ends in a sigmoid, invisible from its layers."""

    def __init__(self) -> None:
        super().__init__()
        self.net = models.binary_mlp(n_features=64, seed=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(x))


def test_a_sigmoid_in_forward_is_warned_about_and_logits_are_not():
    """Outputs all in [0, 1] on at least 8 examples: a warning (logits can lie there too, so it
    is not an error). Negative control: the same network's logits, of both signs, pass."""
    x, y = DIGITS.x_test[:20], (DIGITS.y_test[:20] % 2).astype(np.int64)
    with pytest.warns(UserWarning, match=r"outputs on the members and non-members all lie in") as w:
        loss_threshold_attack(_SigmoidInForward(), (x, y), (x, y), loss="bce")
    assert len(w) == 1 and w[0].filename == __file__  # one warning, pointing at the caller
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss_threshold_attack(_SigmoidInForward().net, (x, y), (x, y), loss="bce")
        logit_confidence(_SigmoidInForward().net, x, y, loss="bce")
    with pytest.warns(UserWarning, match=r"outputs on x all lie in \[0, 1\]") as caught:
        logit_confidence(_SigmoidInForward(), x, y, loss="bce")
    assert caught[0].filename == __file__


def test_a_sigmoid_on_class_logits_is_warned_about_under_cross_entropy():
    """A coursework trial: a 10-class model whose forward ends in torch.sigmoid passed the
    cross-entropy checks, which refused only rows that sum to 1, and the attack read its
    squashed outputs (member losses in [1.78, 1.96]) as logits, without a word. Negative
    control: the logits, of both signs, pass."""
    torch.manual_seed(0)
    net = nn.Linear(64, 10)
    x, y = DIGITS.x_test[:20], DIGITS.y_test[:20]
    with pytest.warns(UserWarning, match=r"outputs on the members and non-members all lie in"):
        loss_threshold_attack(nn.Sequential(net, _Sigmoid()), (x, y), (x, y))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss_threshold_attack(net, (x, y), (x, y))


def test_the_sigmoid_warning_counts_members_and_non_members_together():
    """An attack review: 5 members and 5 non-members, each under the 8 examples the warning
    needs, got no warning, though together they are 10. Now they count together; with 3 and 3
    (6 in all) it stays silent, as for 6 examples of one set. Control: the logits pass."""
    x, y = DIGITS.x_test[:10], (DIGITS.y_test[:10] % 2).astype(np.int64)
    with pytest.warns(UserWarning, match=r"members and non-members all lie in \[0, 1\]"):
        loss_threshold_attack(_SigmoidInForward(), (x[:5], y[:5]), (x[5:], y[5:]), loss="bce")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss_threshold_attack(_SigmoidInForward(), (x[:3], y[:3]), (x[3:6], y[3:6]), loss="bce")
        logits = _SigmoidInForward().net
        loss_threshold_attack(logits, (x[:5], y[:5]), (x[5:], y[5:]), loss="bce")


class _Sigmoid(nn.Module):
    """torch.sigmoid in a layer of one's own, which the check of the last layer does not know."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x)


def test_probabilities_read_as_logits_give_wrong_losses(overfitted):
    """Why the refusal below: the cross-entropy of a probability vector p read as logits is
    -p_y + log sum_k e^{p_k} >= log(10) + 1/10 - 1 = 1.40 for ten classes (Jensen: the log of a
    mean of exponentials is at least the mean, 1/10), whatever the model: members the model
    fits perfectly would get "losses" above 1.4 instead of near 0. (The loss attack happens to
    keep roughly its ranking; LiRA's Gaussian fits of such squashed confidences do not hold.)"""
    model, members, _ = overfitted
    x, y = torch.tensor(members[0]), torch.tensor(members[1])
    with torch.no_grad():
        logits = model(x).double()
    true = nn.functional.cross_entropy(logits, y, reduction="none")
    squashed = nn.functional.cross_entropy(torch.softmax(logits, dim=1), y, reduction="none")
    assert float(true.median()) < 0.01
    assert float(squashed.min()) >= math.log(10) + 0.1 - 1 - 1e-12


@pytest.mark.parametrize(
    ("model", "loss"),
    [
        (nn.Sequential(models.mlp(seed=0), nn.Softmax(dim=1)), "cross_entropy"),
        (nn.Sequential(nn.Sequential(models.mlp(seed=0), nn.Softmax(dim=-1))), "cross_entropy"),
        (_SoftmaxInForward(), "cross_entropy"),
        (nn.Sequential(models.binary_mlp(n_features=64, seed=0), nn.Sigmoid()), "bce"),
    ],
    ids=["Softmax layer", "nested Softmax", "softmax in forward", "Sigmoid layer"],
)
def test_models_that_return_probabilities_are_refused(model, loss):
    x, y = DIGITS.x_test[:20], DIGITS.y_test[:20]
    if loss == "bce":
        y = (y % 2).astype(np.int64)
    with pytest.raises(ValueError, match="probabilities"):
        loss_threshold_attack(model, (x, y), (x, y), loss=loss)
    with pytest.raises(ValueError, match="probabilities"):
        logit_confidence(model, x, y, loss=loss)


def test_log_probabilities_and_non_negative_logits_are_accepted(overfitted):
    """A final LogSoftmax shifts each example's logits by a constant, which changes neither
    the cross-entropy nor phi (up to float32 rounding inside the model). Negative control of
    the output check: logits that are all non-negative but do not sum to 1 pass."""
    model, members, nonmembers = overfitted
    log_probs = nn.Sequential(model, nn.LogSoftmax(dim=1))
    a = loss_threshold_attack(model, members, nonmembers)
    b = loss_threshold_attack(log_probs, members, nonmembers)
    np.testing.assert_allclose(b.member_scores, a.member_scores, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        logit_confidence(log_probs, *members), logit_confidence(model, *members), rtol=1e-5
    )
    shifted = nn.Sequential(model, nn.Softplus())  # positive outputs, rows not summing to 1
    assert loss_threshold_attack(shifted, members, nonmembers).auc > 0.5


# --- validation ---------------------------------------------------------------------------------


TRAIN5, TEST5 = (DIGITS.x_train[:5], DIGITS.y_train[:5]), (DIGITS.x_test[:5], DIGITS.y_test[:5])


@pytest.mark.parametrize(
    ("members", "nonmembers", "loss", "error", "match"),
    [
        (
            (TRAIN5[0], TRAIN5[1][:4]),
            TEST5,
            "cross_entropy",
            ValueError,
            "members x and members y must have the same number",
        ),
        (
            TRAIN5,
            (TEST5[0][:0], TEST5[1][:0]),
            "cross_entropy",
            ValueError,
            "nonmembers x must hold at least one example",
        ),
        (TRAIN5[0], TEST5, "cross_entropy", TypeError, "members must be a pair"),
        (
            ([[0.0] * 64], TRAIN5[1][:1]),
            TEST5,
            "cross_entropy",
            TypeError,
            "members x must be a torch.Tensor or a numpy array",
        ),
        (
            (TRAIN5[0], TRAIN5[1].astype(float)),
            TEST5,
            "cross_entropy",
            TypeError,
            "members y must hold integer class labels",
        ),
        (
            TRAIN5,
            (TEST5[0], TEST5[1] + 10),
            "cross_entropy",
            ValueError,
            r"below the model's 10 outputs .* in the labels of nonmembers\.",
        ),
        (TRAIN5, TEST5, "hinge", ValueError, "loss must be one of"),
        (
            (torch.tensor(TRAIN5[0], dtype=torch.float64), torch.tensor(TRAIN5[1])),
            TEST5,
            "cross_entropy",
            ValueError,
            r"model cannot be applied to the inputs .* dtype torch.float64",
        ),
    ],
)
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


class _NoMemoryForLargeBatches(nn.Module):
    """Stands in for a GPU that runs out of memory on more than 1024 examples at once."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 10)

    def forward(self, x):
        if x.shape[0] > 1024:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.lin(x)


def test_the_attack_runs_the_model_in_batches_and_reports_running_out_of_memory():
    """The model sees at most 1024 examples at a time; out of memory is not reported as a model
    that cannot be applied to its inputs."""
    torch.manual_seed(0)
    x = np.tile(DIGITS.x_train, (2, 1))[:2500]
    y = np.tile(DIGITS.y_train, 2)[:2500]
    result = loss_threshold_attack(_NoMemoryForLargeBatches(), (x, y), (x[:100], y[:100]))
    assert result.member_scores.shape == (2500,)

    class _NoMemory(_NoMemoryForLargeBatches):
        def forward(self, x):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    with pytest.raises(torch.OutOfMemoryError):
        loss_threshold_attack(_NoMemory(), (x[:10], y[:10]), (x[:10], y[:10]))
