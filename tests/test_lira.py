"""Tests of companion.attacks.lira (the likelihood-ratio attack of Carlini et al. 2022).

Setting (one thread): a population of 1,000 of the 1,797 digits (a permutation drawn by
``numpy.random.default_rng(0)``), its first 500 the target's members and the other 500 its
non-members; the remaining 797 digits are never used by the target or the main shadow models.
Models are ``models.mlp`` trained by ``training.train`` for 300 epochs (batch 32, lr 0.5, no
regularisation): training accuracy 1.0, an overfitted model. 16 shadow models, each example in
8 of them.

Measured here (about 0.6 s a model on one idle core; 0.9 s on a loaded one):

=====================  ======  ===========  =========
attack                 AUC     TPR@0.1%     TPR@1%
=====================  ======  ===========  =========
loss threshold         0.514   0.002        0.012
LiRA online, global    0.641   0.026        0.086
LiRA offline, global   0.602   0.026        0.050
=====================  ======  ===========  =========

With 500 non-members, TPR at 0.1% FPR is the TPR at zero false positives (0.001 * 500 < 1).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch
from conftest import load_shared_digits

from companion import accounting, dpsgd, models, training
from companion.attacks import (
    MembershipAttackResult,
    lira_attack,
    lira_scores,
    logit_confidence,
    loss_threshold_attack,
    shadow_confidences,
)

pytestmark = pytest.mark.usefixtures("one_thread")

DIGITS = load_shared_digits()
X_ALL = np.concatenate([DIGITS.x_train, DIGITS.x_test])
Y_ALL = np.concatenate([DIGITS.y_train, DIGITS.y_test])
POPULATION, NUM_SHADOW = 1000, 16


def overfit(x, y, *, seed):
    """The target's training procedure, which the attacker knows: 300 epochs of plain SGD."""
    model = models.mlp(seed=seed)
    training.train(model, x, y, epochs=300, batch_size=32, lr=0.5, seed=seed)
    return model


def quick(x, y, *, seed):
    """A cheap procedure for tests of the plumbing (a few hundredths of a second)."""
    model = models.logistic_regression(seed=seed)
    training.train(model, x, y, epochs=10, batch_size=20, lr=1.0, seed=seed)
    return model


@pytest.fixture(scope="module")
def overfitted(one_thread):
    """The target, the confidences of the 16 shadow models, and both attacks' results."""
    order = np.random.default_rng(0).permutation(len(X_ALL))
    pop, rest = order[:POPULATION], order[POPULATION:]
    x, y = X_ALL[pop], Y_ALL[pop]
    half = POPULATION // 2
    members, nonmembers = (x[:half], y[:half]), (x[half:], y[half:])
    target = overfit(*members, seed=12345)
    assert training.evaluate(target, *members)["accuracy"] == 1.0
    target_phi = logit_confidence(target, x, y)
    shadow_phi, shadow_in = shadow_confidences(
        x, y, train_fn=overfit, num_shadow=NUM_SHADOW, seed=0
    )
    return {
        "x": x,
        "y": y,
        "rest": rest,
        "half": half,
        "target": target,
        "target_phi": target_phi,
        "shadow_phi": shadow_phi,
        "shadow_in": shadow_in,
        "loss": loss_threshold_attack(target, members, nonmembers),
    }


def _result(scores, half):
    return MembershipAttackResult.from_scores(scores[:half], scores[half:])


# --- the scores against an independent computation ----------------------------------------------


def _scipy_scores(target, phi, mask, *, online, global_variance):
    """LiRA's scores example by example with scipy.stats.norm: the oracle."""
    n = target.size
    fits = {}
    for side, side_mask in (("in", mask), ("out", ~mask)):
        values = [phi[side_mask[:, i], i] for i in range(n)]
        means = np.array([v.mean() for v in values])
        if global_variance:  # pooled: sum of squared deviations over sum of (count - 1)
            squares = sum(((v - v.mean()) ** 2).sum() for v in values)
            sds = np.full(n, math.sqrt(squares / sum(v.size - 1 for v in values)))
        else:
            sds = np.array([math.sqrt(np.var(v, ddof=1)) for v in values])
        fits[side] = means, sds
    (mu_in, sd_in), (mu_out, sd_out) = fits["in"], fits["out"]
    if not online:
        return scipy.stats.norm.logcdf(target, mu_out, sd_out)  # elementwise, example by example
    return np.array(
        [
            scipy.stats.norm.logpdf(target[i], mu_in[i], sd_in[i])
            - scipy.stats.norm.logpdf(target[i], mu_out[i], sd_out[i])
            for i in range(n)
        ]
    )


@pytest.mark.parametrize("online", [True, False])
@pytest.mark.parametrize("global_variance", [True, False])
def test_scores_match_scipy(online, global_variance):
    """Random confidences, and IN/OUT counts that differ between examples (2 to 8 each), so the
    pooled variance weighs examples by their counts. float64 throughout: agreement to 1e-10."""
    rng = np.random.default_rng(1)
    num_shadow, n = 10, 40
    phi = rng.normal(loc=rng.normal(0, 3, n), scale=rng.uniform(0.5, 2, n), size=(num_shadow, n))
    n_in = rng.integers(2, num_shadow - 1, size=n)
    mask = rng.random((num_shadow, n)).argsort(axis=0) < n_in
    target = rng.normal(0, 3, n)
    ours = lira_scores(target, phi, mask, online=online, global_variance=global_variance)
    oracle = _scipy_scores(target, phi, mask, online=online, global_variance=global_variance)
    np.testing.assert_allclose(ours, oracle, rtol=1e-10, atol=1e-10)
    # Negative control: the other variance choice gives other scores.
    other = lira_scores(target, phi, mask, online=online, global_variance=not global_variance)
    assert np.abs(other - ours).max() > 1e-3


def test_scores_take_tensors_and_rank_by_closeness_to_the_in_mean():
    phi = torch.tensor([[0.0], [2.0], [10.0], [12.0]], dtype=torch.float64)
    mask = torch.tensor([[False], [False], [True], [True]])
    scores = lira_scores(torch.tensor([1.0, 11.0])[:1], phi, mask)
    assert scores.shape == (1,) and scores[0] < 0  # at the OUT mean: "non-member"
    assert lira_scores(np.array([11.0]), phi.numpy(), mask.numpy())[0] > 0


# --- the attack on an overfitted model ----------------------------------------------------------


def _bootstrap_differences(first, second, draws=400, seed=0):
    """Paired bootstrap over members and non-members of (first - second) for the AUC and the
    TPR at 1% FPR: the same resampled examples are scored by both attacks."""
    rng = np.random.default_rng(seed)
    m, n = first.member_scores.size, first.nonmember_scores.size
    out = []
    for _ in range(draws):
        i, j = rng.integers(0, m, m), rng.integers(0, n, n)
        a = MembershipAttackResult.from_scores(first.member_scores[i], first.nonmember_scores[j])
        b = MembershipAttackResult.from_scores(second.member_scores[i], second.nonmember_scores[j])
        out.append([a.auc - b.auc, a.tpr_at(0.01) - b.tpr_at(0.01)])
    return np.array(out)


def _lira(overfitted):
    s = overfitted
    return _result(lira_scores(s["target_phi"], s["shadow_phi"], s["shadow_in"]), s["half"])


def test_lira_beats_the_loss_attack_on_an_overfitted_model(overfitted):
    """Measured (see the top of the file): AUC 0.641 against 0.514 and TPR@1% 0.086 against
    0.012. Each difference must exceed three paired-bootstrap standard errors of itself (400
    resamples of the 500 + 500 examples; measured 0.025 for the AUC, 0.018 for TPR@1%), so the
    margin comes from this run's own sampling error, not from a constant."""
    lira, loss = _lira(overfitted), overfitted["loss"]
    observed = np.array([lira.auc - loss.auc, lira.tpr_at(0.01) - loss.tpr_at(0.01)])
    se = _bootstrap_differences(lira, loss).std(axis=0)
    assert (observed > 3 * se).all(), (observed, se)
    # The loss attack itself is weak here, within 3 null sds of chance (AUC sd 0.018).
    assert loss.auc < 0.5 + 3 * math.sqrt(1001 / (12 * 500 * 500))


def _members_above_every_nonmember(result):
    return int((result.member_scores > result.nonmember_scores.max()).sum())


def test_lira_finds_members_with_no_false_positive(overfitted):
    """TPR at 0.1% FPR: with 500 non-members that is the TPR at zero false positives, and the
    measured 0.026 (13 members above every non-member) against the loss attack's 0.002 (1) is
    *not* a significant difference by the bootstrap above (se 0.019: the top non-member score
    is what decides, and 500 non-members say little about the top 0.1%). What the run does
    show is that LiRA's count is far beyond chance. With no signal the ranking of the 1,000
    scores is uniformly random, and at least k members are above every non-member exactly when
    the top k scores are all members: probability C(500, k) / C(1000, k), about 2^-k."""
    lira, loss = _lira(overfitted), overfitted["loss"]
    k = _members_above_every_nonmember(lira)
    assert lira.tpr_at(0.001) == k / 500
    assert math.comb(500, k) / math.comb(1000, k) < 1e-3  # k >= 10; measured 13 (p = 1.1e-4)
    assert k > _members_above_every_nonmember(loss)


def test_every_example_is_in_half_of_the_shadow_models(overfitted):
    shadow_in = overfitted["shadow_in"]
    assert shadow_in.shape == (NUM_SHADOW, POPULATION) and shadow_in.dtype == bool
    assert (shadow_in.sum(axis=0) == NUM_SHADOW // 2).all()
    # Each shadow trains on about half the population: Binomial(1000, 1/2), sd 16.
    assert (np.abs(shadow_in.sum(axis=1) - POPULATION / 2) < 5 * 16).all()


def test_online_without_in_models_is_offline(overfitted):
    """Negative control. Shadow models trained on the 797 digits outside the population never
    saw a target example: the online attack has no IN distribution and is the offline one,
    score for score. Labelling half of them IN anyway (the IN fit then describes models that
    never saw the example) changes the scores and gives the attack nothing: its AUC falls to
    chance (measured 0.509 against 0.602 offline)."""
    s = overfitted
    rng = np.random.default_rng(1)
    rest = s["rest"]
    phi = np.array(
        [
            logit_confidence(overfit(X_ALL[h], Y_ALL[h], seed=1000 + k), s["x"], s["y"])
            for k, h in enumerate(rng.choice(rest, len(rest) // 2, replace=False) for _ in range(8))
        ]
    )
    never = np.zeros(phi.shape, dtype=bool)
    online = lira_scores(s["target_phi"], phi, never, online=True)
    offline = lira_scores(s["target_phi"], phi, never, online=False)
    np.testing.assert_array_equal(online, offline)
    fake = rng.random(phi.shape).argsort(axis=0) < 4
    pretended = lira_scores(s["target_phi"], phi, fake, online=True)
    assert np.abs(pretended - offline).max() > 1.0
    chance = 3 * math.sqrt(1001 / (12 * 500 * 500))  # 3 null sds of the AUC
    assert abs(_result(pretended, s["half"]).auc - 0.5) < chance
    assert _result(offline, s["half"]).auc > 0.5 + chance


# --- the pipeline -------------------------------------------------------------------------------


def test_lira_attack_composes_the_pieces():
    members = DIGITS.x_train[:60], DIGITS.y_train[:60]
    nonmembers = DIGITS.x_test[:60], DIGITS.y_test[:60]
    target = quick(*members, seed=7)
    x, y = np.concatenate([members[0], nonmembers[0]]), np.concatenate([members[1], nonmembers[1]])
    phi, shadow_in = shadow_confidences(x, y, train_fn=quick, num_shadow=4, seed=3)
    for online in (True, False):
        result = lira_attack(
            target,
            members,
            nonmembers,
            train_fn=quick,
            num_shadow=4,
            seed=3,
            online=online,
            global_variance=False,
        )
        scores = lira_scores(
            logit_confidence(target, x, y), phi, shadow_in, online=online, global_variance=False
        )
        np.testing.assert_array_equal(result.member_scores, scores[:60])
        np.testing.assert_array_equal(result.nonmember_scores, scores[60:])


def test_shadow_models_are_trained_on_their_halves():
    """train_fn sees exactly the examples of shadow_in[s], as tensors, with a distinct seed."""
    x, y = DIGITS.x_train[:30], DIGITS.y_train[:30]
    calls = []

    def spy(xs, ys, *, seed):
        calls.append((xs.clone(), ys.clone(), seed))
        return quick(xs, ys, seed=seed)

    phi, shadow_in = shadow_confidences(x, y, train_fn=spy, num_shadow=6, seed=5)
    assert len(calls) == 6 and len({seed for _, _, seed in calls}) == 6
    for (xs, ys, _), keep in zip(calls, shadow_in, strict=True):
        assert isinstance(xs, torch.Tensor)
        torch.testing.assert_close(xs, torch.tensor(x[keep]))
        assert ys.tolist() == y[keep].tolist()
    again = shadow_confidences(x, y, train_fn=quick, num_shadow=6, seed=5)
    np.testing.assert_array_equal(again[1], shadow_in)
    np.testing.assert_array_equal(again[0], phi)
    other = shadow_confidences(x, y, train_fn=quick, num_shadow=6, seed=None)
    assert not np.array_equal(other[1], shadow_in)  # fresh entropy: another split (p = 20^-30)


def test_lira_with_dp_sgd_models_stays_within_the_dp_bound():
    """The target and the shadow models trained with DP-SGD at epsilon 1 (delta 1e-5): every
    point of LiRA's ROC curve obeys TPR <= e^eps FPR + delta up to sampling error. The measured
    TPR is a mean of 500 indicators (sd <= sqrt(0.25 / 500) = 0.022); 3 sds of slack make the
    bound bite only where e FPR + 0.067 < 1, that is at FPR below 0.34 (measured: AUC 0.512,
    TPR@1% 0.026 against the bound's 0.027)."""
    epsilon, delta = 1.0, 1e-5
    sigma = accounting.get_noise_multiplier(
        target_epsilon=epsilon, target_delta=delta, sample_rate=0.1, steps=200
    )

    def private(x, y, *, seed):
        model = models.mlp(seed=seed)
        history = dpsgd.train_dpsgd(
            model,
            x,
            y,
            noise_multiplier=sigma,
            max_grad_norm=1.0,
            sample_rate=0.1,
            epochs=20,
            lr=1.0,
            delta=delta,
            seed=seed,
        )
        assert history[-1]["epsilon"] <= epsilon
        return model

    order = np.random.default_rng(0).permutation(len(X_ALL))[:POPULATION]
    x, y = X_ALL[order], Y_ALL[order]
    members, nonmembers = (x[:500], y[:500]), (x[500:], y[500:])
    result = lira_attack(private(*members, seed=12345), members, nonmembers, train_fn=private)
    slack = 3 * math.sqrt(0.25 / 500)
    assert np.all(result.tpr <= math.exp(epsilon) * result.fpr + delta + slack)


# --- validation ---------------------------------------------------------------------------------


def _phi(num_shadow=4, n=3):
    rng = np.random.default_rng(0)
    mask = rng.random((num_shadow, n)).argsort(axis=0) < num_shadow // 2
    return rng.normal(size=n), rng.normal(size=(num_shadow, n)), mask


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda t, p, m: (t[:2], p, m), ValueError, "shape .num_shadow, N. with N"),
        (lambda t, p, m: (t, p, m[:, :2]), ValueError, "shape .num_shadow, N."),
        (lambda t, p, m: (t, p, m.astype(int)), TypeError, "shadow_in must be a bool array"),
        (lambda t, p, m: (list(t), p, m), TypeError, "target_phi must be a numpy array"),
        (lambda t, p, m: (t, m, m), TypeError, "shadow_phi must hold real numbers"),
        (lambda t, p, m: (t.astype(complex), p, m), TypeError, "target_phi must hold real"),
        (lambda t, p, m: (t, p[0], m), ValueError, "shadow_phi must have 2 dimension"),
        (lambda t, p, m: (t * np.nan, p, m), ValueError, "NaN or infinite"),
        (lambda t, p, m: (t, p, np.ones_like(m)), ValueError, "at least one OUT shadow"),
        (lambda t, p, m: (t, p, m & (np.arange(3) > 0)), ValueError, "IN shadow models for some"),
        (lambda t, p, m: (t, np.ones_like(p), m), ValueError, "do not vary"),
    ],
)
def test_scores_reject_bad_input(change, error, match):
    with pytest.raises(error, match=match):
        lira_scores(*change(*_phi()))


def test_per_example_variance_needs_two_per_side():
    target, phi, mask = _phi(num_shadow=2)
    with pytest.raises(ValueError, match="at least two OUT shadow models per example"):
        lira_scores(target, phi, mask, global_variance=False)
    with pytest.raises(ValueError, match="global variance needs two OUT"):
        lira_scores(target, phi, mask, global_variance=True)
    with pytest.raises(TypeError, match="online must be True or False"):
        lira_scores(*_phi(), online=1)


def test_attack_rejects_bad_arguments():
    pair = DIGITS.x_train[:20], DIGITS.y_train[:20]
    other = DIGITS.x_test[:20], DIGITS.y_test[:20]
    model = models.logistic_regression()
    cases = [
        ({"num_shadow": 5}, ValueError, "num_shadow must be even"),
        ({"num_shadow": 2}, ValueError, "num_shadow must be an integer >= 4"),
        ({"train_fn": "overfit"}, TypeError, "train_fn must be a function"),
        ({"train_fn": lambda x, y, *, seed: None}, TypeError, "train_fn must return the trained"),
        ({"online": "yes"}, TypeError, "online must be True or False"),
        ({"seed": -1}, ValueError, "seed must be >= 0"),
        ({"progress": "no"}, TypeError, "progress must be True or False"),
    ]
    for change, error, match in cases:
        kwargs = {"train_fn": quick, "num_shadow": 4, **change}
        with pytest.raises(error, match=match):
            lira_attack(model, pair, other, **kwargs)
    with pytest.raises(TypeError, match="members must be a pair"):
        lira_attack(model, pair[0], other, train_fn=quick)
    with pytest.raises(ValueError, match="same shape per example"):
        lira_attack(model, pair, (other[0][:, :32], other[1]), train_fn=quick)
    with pytest.raises(ValueError, match="too small"):
        shadow_confidences(pair[0][:2], pair[1][:2], train_fn=quick, num_shadow=16)


def test_attack_refuses_models_that_return_probabilities():
    softmax = torch.nn.Sequential(models.logistic_regression(), torch.nn.Softmax(dim=1))
    pair = DIGITS.x_train[:20], DIGITS.y_train[:20]
    with pytest.raises(ValueError, match="returns probabilities"):
        lira_attack(softmax, pair, pair, train_fn=quick, num_shadow=4)

    def softmax_shadows(x, y, *, seed):
        return torch.nn.Sequential(quick(x, y, seed=seed), torch.nn.Softmax(dim=1))

    with pytest.raises(ValueError, match="returns probabilities"):
        shadow_confidences(*pair, train_fn=softmax_shadows, num_shadow=4)


def test_a_shadow_model_that_does_not_fit_the_data_is_named():
    """A coursework trial: a train_fn whose model has 5 outputs for labels up to 9 got "x y
    holds a label >= the model's 5 classes", which named neither the shadow model nor y."""
    x, y = DIGITS.x_train[:40], DIGITS.y_train[:40]

    def train_fn(x, y, *, seed):
        return torch.nn.Linear(64, 5)

    message = r"the shadow model train_fn returned does not fit x and y: labels must be below"
    with pytest.raises(ValueError, match=message):
        shadow_confidences(x, y, train_fn=train_fn, num_shadow=4, seed=0, progress=False)
