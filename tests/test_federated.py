"""Tests of companion.federated: client data, local update, the two aggregation rules, the loops.

References are computed by hand, independently of the module: full-batch gradient descent with
:func:`torch.autograd.grad` on the mean loss, weighted means of :func:`local_update` results, the
clipping factor ``min(1, S / (norm + 1e-6))`` written out, the noise drawn by hand from a seeded
:class:`torch.Generator`, and the accountant of :mod:`companion.accounting`. Exact identities
are checked in float64, where both sides differ only by the order of floating-point summation
(a few ulps, about 1e-15 relative per step), so a tolerance of 1e-10 has a wide margin, while
every error of the kind the identities rule out (a wrong weight, a missing clip, a wrong
denominator) changes the result by 1e-3 or more; the negative controls show that the
comparisons see such differences.

Statistical tests use fixed seeds and acceptance regions derived from the sampling distribution
of the statistic (chi-square, binomial), stated at each test.

The models are tiny, so the tests run torch on one thread: with two threads on a loaded
two-core machine, the thread synchronisation of each small matrix product costs far more than
the product itself.
"""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from companion import data, models, training
from companion._torch import add_to_model
from companion.accounting import (
    DEFAULT_ORDERS,
    PLDAccountant,
    RDPAccountant,
    compute_rdp,
    get_privacy_spent,
)
from companion.federated import (
    client_datasets,
    dp_fedavg,
    dp_fedavg_aggregate,
    fedavg,
    fedavg_aggregate,
    local_update,
)

DIGITS = data.load_digits(seed=0)
TOL = 1e-10  # float64 identities; see the module docstring


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tensors(start, stop, dtype=torch.float64):
    x = torch.tensor(DIGITS.x_train[start:stop], dtype=dtype)
    y = torch.tensor(DIGITS.y_train[start:stop])
    return x, y


def _weights(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _norm(tensors):
    return math.sqrt(sum(float((t**2).sum()) for t in tensors.values()))


def _max_diff(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _weighted_mean(updates, sizes):
    """sum_k n_k u_k / sum_k n_k, written out."""
    pairs = list(zip(sizes, updates, strict=True))
    return {k: sum(n * u[k] for n, u in pairs) / sum(sizes) for k in updates[0]}


def _gd_step(model, x, y, lr):
    """One step of full-batch gradient descent on the mean cross-entropy, in place."""
    params = list(model.parameters())
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            p.sub_(lr * g)


def _iid_clients(num_clients, n=None, seed=0, dtype=torch.float32):
    y = DIGITS.y_train if n is None else DIGITS.y_train[:n]
    parts = data.partition_iid(len(y), num_clients=num_clients, rng=seed)
    clients = client_datasets(DIGITS.x_train[: len(y)], y, parts)
    return [(x.to(dtype), y) for x, y in clients]


# --- client_datasets ----------------------------------------------------------------------------


def test_client_datasets_selects_the_indexed_rows():
    parts = data.partition_shards(DIGITS.y_train, num_clients=5, rng=1)
    clients = client_datasets(DIGITS.x_train, DIGITS.y_train, parts)
    assert len(clients) == 5
    for part, (x_k, y_k) in zip(parts, clients, strict=True):
        assert x_k.dtype == torch.float32 and y_k.dtype == torch.int64
        np.testing.assert_array_equal(x_k.numpy(), DIGITS.x_train[part].astype(np.float32))
        np.testing.assert_array_equal(y_k.numpy(), DIGITS.y_train[part])
    # tensors and plain lists of indices work as well
    x, y = training.to_tensors(DIGITS.x_train, DIGITS.y_train)
    (x_0, y_0), (x_1, _) = client_datasets(x, y, [[3, 1], torch.tensor([0])])
    assert torch.equal(x_0, x[[3, 1]]) and torch.equal(y_0, y[[3, 1]]) and torch.equal(x_1, x[[0]])


@pytest.mark.parametrize(
    ("parts", "match"),
    [
        ([np.array([0, 1]), np.array([], dtype=int)], r"parts\[1\] is empty"),
        ([np.array([0, 1347])], r"parts\[0\] holds indices out of range"),
        ([np.array([-1, 2])], r"parts\[0\] holds indices out of range"),
        ([], "parts must hold at least one"),
    ],
)
def test_client_datasets_rejects_bad_parts(parts, match):
    with pytest.raises(ValueError, match=match):
        client_datasets(DIGITS.x_train, DIGITS.y_train, parts)


def test_client_datasets_rejects_mismatched_lengths_and_float_indices():
    with pytest.raises(ValueError, match="x and y must have the same number of examples"):
        client_datasets(DIGITS.x_train, DIGITS.y_train[:-1], [np.array([0])])
    with pytest.raises(TypeError, match=r"parts\[0\] must hold integer indices"):
        client_datasets(DIGITS.x_train, DIGITS.y_train, [np.array([0.0, 1.0])])


# --- FedSGD / FedAvg: exact identities ----------------------------------------------------------


def test_fedavg_with_one_client_is_full_batch_gradient_descent():
    """One client, C = 1, E = 1, B = all: every round is one full-batch GD step with the same lr."""
    x, y = _tensors(0, 200)
    model = models.mlp(seed=1).double()
    reference = copy.deepcopy(model)
    fedavg(model, [(x, y)], rounds=5, client_fraction=1.0, local_epochs=1, batch_size=None, lr=0.5,
           progress=False)  # fmt: skip
    for _ in range(5):
        _gd_step(reference, x, y, lr=0.5)
    assert _max_diff(_weights(model), _weights(reference)) < TOL
    # negative control: one GD step fewer is far away
    fewer = models.mlp(seed=1).double()
    for _ in range(4):
        _gd_step(fewer, x, y, lr=0.5)
    assert _max_diff(_weights(model), _weights(fewer)) > 1e-3


def test_fedavg_round_is_gradient_step_on_the_union_for_unequal_clients():
    """sum_k (n_k / n) grad L_k = grad of the mean loss over the union, so one FedSGD round with
    every client (unequal sizes 30, 90, 250) is one GD step on the pooled 370 examples."""
    bounds = [(0, 30), (30, 120), (120, 370)]
    clients = [_tensors(a, b) for a, b in bounds]
    model = models.mlp(seed=2).double()
    start = copy.deepcopy(model)
    fedavg(model, clients, rounds=1, client_fraction=1.0, local_epochs=1, batch_size=None, lr=0.3,
           progress=False)  # fmt: skip
    pooled = copy.deepcopy(start)
    _gd_step(pooled, *_tensors(0, 370), lr=0.3)
    assert _max_diff(_weights(model), _weights(pooled)) < TOL

    # the same result by hand from local_update, and the unweighted mean (wrong) is far away
    updates = [local_update(start, x, y, epochs=1, batch_size=None, lr=0.3) for x, y in clients]
    sizes = [b - a for a, b in bounds]
    w0 = _weights(start)
    weighted = {k: w0[k] + v for k, v in _weighted_mean(updates, sizes).items()}
    unweighted = {k: w0[k] + sum(u[k] for u in updates) / len(updates) for k in w0}
    assert _max_diff(_weights(model), weighted) < TOL
    assert _max_diff(_weights(model), unweighted) > 1e-3


def test_fedavg_weights_multi_step_local_updates_by_data_size():
    """With E = 3 full-batch epochs the round is no longer a GD step on the union, but still the
    n_k-weighted mean of the clients' local updates (full batches: independent of the shuffle)."""
    bounds = [(0, 20), (20, 100), (100, 160)]
    clients = [_tensors(a, b) for a, b in bounds]
    model = models.logistic_regression(seed=3).double()
    start = copy.deepcopy(model)
    fedavg(model, clients, rounds=1, client_fraction=1.0, local_epochs=3, batch_size=None, lr=0.4,
           progress=False)  # fmt: skip
    updates = [local_update(start, x, y, epochs=3, batch_size=None, lr=0.4) for x, y in clients]
    sizes = [b - a for a, b in bounds]
    w0 = _weights(start)
    expected = {k: w0[k] + v for k, v in _weighted_mean(updates, sizes).items()}
    assert _max_diff(_weights(model), expected) < TOL
    pooled = copy.deepcopy(start)
    for _ in range(3):
        _gd_step(pooled, *_tensors(0, 160), lr=0.4)
    assert _max_diff(_weights(model), _weights(pooled)) > 1e-4  # it is not 3 GD steps on the union


# --- FedSGD vs FedAvg ---------------------------------------------------------------------------


def _rounds_to_reach(history, target):
    return next((r["round"] for r in history if r["test_accuracy"] >= target), math.inf)


def test_more_local_work_reaches_target_accuracy_in_fewer_rounds():
    """IID digits, 10 clients, C = 0.5, lr = 0.1, target 80% test accuracy within 40 rounds.
    McMahan et al. (2017, Table 2) report large reductions in rounds from more local computation;
    here FedSGD needs about 30 rounds, E = 5 about 6, E = 5 with B = 20 about 2. The assertions
    ask only for a strict ordering and a factor 4 for the largest gap."""
    clients = _iid_clients(10)
    rounds = {}
    for epochs, batch in [(1, None), (5, None), (5, 20)]:
        history = fedavg(models.logistic_regression(seed=0), clients, rounds=40,
                         client_fraction=0.5, local_epochs=epochs, batch_size=batch, lr=0.1,
                         x_test=DIGITS.x_test, y_test=DIGITS.y_test, seed=0,
                         progress=False)  # fmt: skip
        rounds[(epochs, batch)] = _rounds_to_reach(history, 0.8)
    assert rounds[(5, 20)] < rounds[(5, None)] < rounds[(1, None)]
    assert 4 * rounds[(5, 20)] <= rounds[(1, None)]


# --- local_update and FedProx -------------------------------------------------------------------


def test_local_update_leaves_the_model_alone_and_is_reproducible():
    x, y = _tensors(0, 100, dtype=torch.float32)
    model = models.mlp(seed=0)
    before = _weights(model)
    first = local_update(model, x, y, epochs=2, batch_size=16, lr=0.1, seed=7)
    assert all(torch.equal(before[k], v) for k, v in _weights(model).items())
    assert set(first) == {name for name, p in model.named_parameters() if p.requires_grad}
    assert all(first[k].shape == before[k].shape for k in first)
    again = local_update(model, x, y, epochs=2, batch_size=16, lr=0.1, seed=7)
    assert all(torch.equal(first[k], again[k]) for k in first)
    other = local_update(model, x, y, epochs=2, batch_size=16, lr=0.1, seed=8)
    assert _max_diff(first, other) > 1e-4  # another shuffle, another result
    # numpy inputs are accepted
    from_numpy = local_update(model, DIGITS.x_train[:100], DIGITS.y_train[:100], epochs=2,
                              batch_size=16, lr=0.1, seed=7)  # fmt: skip
    assert all(torch.equal(first[k], from_numpy[k]) for k in first)


def test_local_update_skips_frozen_parameters():
    x, y = _tensors(0, 50, dtype=torch.float32)
    model = models.mlp(seed=0)
    model[0].bias.requires_grad_(False)
    update = local_update(model, x, y, epochs=1, batch_size=10, lr=0.1)
    assert "0.bias" not in update and "0.weight" in update


def test_fedprox_with_mu_zero_is_plain_local_sgd():
    """mu = 0 with the same seed: the update equals training.train on a copy minus the start."""
    x, y = _tensors(0, 120)
    model = models.mlp(seed=4).double()
    update = local_update(model, x, y, epochs=3, batch_size=16, lr=0.2, mu=0.0, seed=5)
    trained = copy.deepcopy(model)
    training.train(trained, x, y, epochs=3, batch_size=16, lr=0.2, seed=5)
    w0, w1 = _weights(model), _weights(trained)
    assert _max_diff(update, {k: w1[k] - w0[k] for k in w0}) < TOL


def test_fedprox_shrinks_the_update():
    x, y = _tensors(0, 200)
    model = models.logistic_regression(seed=0).double()
    norms = {
        mu: _norm(local_update(model, x, y, epochs=10, batch_size=10, lr=0.1, mu=mu, seed=1))
        for mu in (0.0, 1.0, 10.0)
    }
    assert norms[10.0] < norms[1.0] < norms[0.0]


def test_fedprox_with_large_mu_keeps_the_update_near_zero():
    """With d = w - w_t and step a = lr * mu <= 1, a local step is d <- (1 - a) d - lr g, so
    |d| <= lr G / a = G / mu for every step, G a bound on the batch-gradient norm. For softmax
    regression with cross-entropy an example's gradient is (p - e_y) [x; 1]^T, of norm at most
    sqrt(2) * sqrt(|x|^2 + 1), and a batch mean is no larger than the largest of these."""
    x, y = _tensors(0, 200)
    model = models.logistic_regression(seed=0).double()
    bound = float(torch.sqrt(2 * ((x**2).sum(dim=1) + 1)).max())
    lr, mu = 0.05, 20.0  # a = lr * mu = 1
    prox = _norm(local_update(model, x, y, epochs=10, batch_size=10, lr=lr, mu=mu, seed=1))
    plain = _norm(local_update(model, x, y, epochs=10, batch_size=10, lr=lr, mu=0.0, seed=1))
    assert prox <= bound / mu
    assert prox < 0.05 * plain
    assert plain > bound / mu  # the bound is not trivially met by plain training


def test_fedprox_with_lr_times_mu_above_2_is_refused():
    """A coursework trial: the proximal term alone multiplies d = w - w_t by 1 - lr * mu at each
    step, so lr * mu above 2 diverges (lr = 1, mu = 3 gave weights of 29.6 and a test loss of
    333; mu = 1e6 a NaN update), without a word. At 2 exactly |1 - lr mu| = 1: allowed."""
    x, y = _tensors(0, 40)
    model = models.logistic_regression(seed=0).double()
    with pytest.raises(ValueError, match=r"lr \* mu must be at most 2, got 1 \* 3 = 3"):
        local_update(model, x, y, epochs=1, batch_size=10, lr=1.0, mu=3.0)
    with pytest.raises(ValueError, match=r"lr \* mu must be at most 2"):
        fedavg(model, _iid_clients(2, n=20, dtype=torch.float64), rounds=1, client_fraction=1.0,
               local_epochs=1, batch_size=None, lr=1.0, mu=3.0, progress=False)  # fmt: skip
    update = local_update(model, x, y, epochs=1, batch_size=10, lr=1.0, mu=2.0)
    assert all(bool(torch.isfinite(v).all()) for v in update.values())


# --- client selection in FedAvg -----------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.33, 0.5, 1.0])
def test_fedavg_picks_max_1_round_ck_distinct_clients(fraction):
    clients = _iid_clients(20, n=60)  # 3 examples each
    kwargs = dict(rounds=4, client_fraction=fraction, local_epochs=1, batch_size=None, lr=0.1,
                  progress=False)  # fmt: skip
    history = fedavg(models.logistic_regression(), clients, seed=3, **kwargs)
    expected = max(1, round(fraction * 20))
    assert [r["round"] for r in history] == [1, 2, 3, 4]
    for record in history:
        picked = record["clients"]
        assert len(picked) == expected
        assert len(set(picked)) == expected
        assert all(isinstance(k, int) and 0 <= k < 20 for k in picked)
    again = fedavg(models.logistic_regression(), clients, seed=3, **kwargs)
    assert [r["clients"] for r in again] == [r["clients"] for r in history]
    if expected < 20:
        other = fedavg(models.logistic_regression(), clients, seed=4, **kwargs)
        assert [r["clients"] for r in other] != [r["clients"] for r in history]


def test_fedavg_picks_clients_uniformly():
    """200 rounds, 3 of 10 clients each: every client is picked Binomial(200, 0.3) times
    (marginally). Pearson's statistic of the counts against 60 each is chi-square with 9 degrees
    of freedom up to a factor (1 - 3/10) for sampling without replacement; p > 1e-3."""
    clients = _iid_clients(10, n=20)
    history = fedavg(models.logistic_regression(), clients, rounds=200, client_fraction=0.3,
                     local_epochs=1, batch_size=None, lr=0.1, seed=0, progress=False)  # fmt: skip
    picks = np.concatenate([np.asarray(r["clients"], dtype=int) for r in history])
    counts = np.bincount(picks, minlength=10)
    statistic = ((counts - 60) ** 2 / 60).sum() / (1 - 0.3)
    assert stats.chi2.sf(statistic, df=9) > 1e-3


def test_fedavg_records_test_scores():
    clients = _iid_clients(4, n=80)
    model = models.logistic_regression()
    history = fedavg(model, clients, rounds=2, client_fraction=0.5, local_epochs=1, batch_size=8,
                     lr=0.1, x_test=DIGITS.x_test, y_test=DIGITS.y_test,
                     progress=False)  # fmt: skip
    final = training.evaluate(model, DIGITS.x_test, DIGITS.y_test)
    assert history[-1]["test_accuracy"] == final["accuracy"]
    assert history[-1]["test_loss"] == pytest.approx(final["loss"], rel=1e-6)
    assert set(history[0]) == {"round", "clients", "test_loss", "test_accuracy"}


# --- DP-FedAvg ----------------------------------------------------------------------------------


def test_dp_fedavg_epsilon_matches_the_accountant():
    clients = _iid_clients(20, n=40)
    history = dp_fedavg(models.logistic_regression(), clients, rounds=6, sample_rate=0.25,
                        noise_multiplier=1.3, max_update_norm=1.0, local_epochs=1, batch_size=None,
                        lr=0.1, delta=1e-3, seed=0, progress=False)  # fmt: skip
    accountant = RDPAccountant()
    for t, record in enumerate(history, start=1):
        accountant.step(noise_multiplier=1.3, sample_rate=0.25)
        rdp = compute_rdp(q=0.25, noise_multiplier=1.3, steps=t, orders=DEFAULT_ORDERS)
        epsilon, _ = get_privacy_spent(orders=DEFAULT_ORDERS, rdp=rdp, delta=1e-3)
        assert record["round"] == t and record["delta"] == 1e-3
        assert record["epsilon"] == pytest.approx(accountant.get_epsilon(1e-3), rel=1e-12)
        assert record["epsilon"] == pytest.approx(epsilon, rel=1e-9)  # summed vs multiplied RDP
    assert 0 < history[0]["epsilon"] < history[-1]["epsilon"]


def _stop_in_the_third_round(monkeypatch):
    """From now on, dp_fedavg's third round fails to apply its update (a KeyboardInterrupt)."""
    calls = []

    def stop_at_the_third(model, aggregate, scale):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        add_to_model(model, aggregate, scale)

    monkeypatch.setattr("companion.federated.loops.add_to_model", stop_at_the_third)


def test_a_stopped_dp_fedavg_run_says_what_its_recorded_rounds_spent(monkeypatch):
    """The third round's update fails to apply (a KeyboardInterrupt, say): its round was
    recorded first, and the note on the exception gives the epsilon of three rounds (compute_rdp,
    the oracle), which would otherwise be lost with the run's own accountant."""
    _stop_in_the_third_round(monkeypatch)
    with pytest.raises(KeyboardInterrupt) as caught:
        dp_fedavg(models.logistic_regression(), _iid_clients(20, n=40), rounds=6,
                  sample_rate=0.25, noise_multiplier=1.3, max_update_norm=1.0, local_epochs=1,
                  batch_size=None, lr=0.1, delta=1e-3, seed=0)  # fmt: skip
    rdp = compute_rdp(q=0.25, noise_multiplier=1.3, steps=3, orders=DEFAULT_ORDERS)
    epsilon, _ = get_privacy_spent(orders=DEFAULT_ORDERS, rdp=rdp, delta=1e-3)
    (note,) = caught.value.__notes__
    assert note.startswith("dp_fedavg stopped after recording 3 noisy step(s)")
    assert f"epsilon = {epsilon:.4g} at delta = 0.001" in note


_CONTINUED = dict(sample_rate=0.25, noise_multiplier=1.3, max_update_norm=1.0, local_epochs=1,
                  batch_size=None, lr=0.1, delta=1e-3, progress=False)  # fmt: skip


def _rdp_epsilon(rounds):
    """The oracle: epsilon of ``rounds`` rounds of _CONTINUED, from compute_rdp directly."""
    rdp = compute_rdp(q=0.25, noise_multiplier=1.3, steps=rounds, orders=DEFAULT_ORDERS)
    return get_privacy_spent(orders=DEFAULT_ORDERS, rdp=rdp, delta=1e-3)[0]


def test_continuing_dp_fedavg_through_accountant_reports_the_epsilon_of_one_long_run():
    accountant, model, clients = RDPAccountant(), models.logistic_regression(), _iid_clients(20)
    first = dp_fedavg(model, clients, rounds=2, accountant=accountant, seed=0, **_CONTINUED)
    history = dp_fedavg(model, clients, rounds=3, accountant=accountant, seed=1, **_CONTINUED)
    assert len(accountant) == 5
    assert [r["round"] for r in history] == [1, 2, 3]  # this call's; the accountant holds all
    assert [r["total_rounds"] for r in first + history] == [1, 2, 3, 4, 5]
    for record in first + history:
        assert record["epsilon"] == pytest.approx(_rdp_epsilon(record["total_rounds"]), rel=1e-9)


def test_a_continued_pld_accountant_reports_dp_accountings_epsilon_of_one_long_run():
    """Two calls (2 then 3 rounds) continuing one PLDAccountant report the epsilon of
    dp_accounting's PLD of 5 Poisson-sampled Gaussian rounds. Both discretise the privacy loss
    with the same default interval (1e-4) and agree here to about 1e-11; the tolerance, 1e-6,
    is far below what one round more or less changes (0.17)."""
    dp_accounting = pytest.importorskip("dp_accounting")
    accountant, model, clients = PLDAccountant(), models.logistic_regression(), _iid_clients(20)
    dp_fedavg(model, clients, rounds=2, accountant=accountant, seed=0, **_CONTINUED)
    history = dp_fedavg(model, clients, rounds=3, accountant=accountant, seed=1, **_CONTINUED)
    reference = dp_accounting.pld.PLDAccountant()
    event = dp_accounting.PoissonSampledDpEvent(0.25, dp_accounting.GaussianDpEvent(1.3))
    reference.compose(dp_accounting.SelfComposedDpEvent(event, 5))
    assert history[-1]["epsilon"] == pytest.approx(reference.get_epsilon(1e-3), abs=1e-6)


@pytest.mark.parametrize(
    "stream",
    [
        pytest.param({"noise_multiplier": 0.0}, id="sampling"),  # q = 0.25, no noise
        pytest.param({"sample_rate": 1.0}, id="noise"),  # every client, full batch: noise alone
        pytest.param(  # every client, no noise, batches of 2: the local shuffling alone
            {"sample_rate": 1.0, "noise_multiplier": 0.0, "batch_size": 2}, id="shuffling"
        ),
    ],
)
def test_continuing_dp_fedavg_with_the_same_seed_draws_new_randomness(stream):
    """Two calls from the same weights with seed 5: with a new accountant each, the same run;
    with the second continuing the first's accountant, another one (the same run would make
    the difference of the two calls' updates noise-free). Each case leaves one of the three
    streams (sampling, noise, shuffling) as the only randomness, so a stream seeded from
    ``seed`` itself in a continued call shows. The derived seed is reproducible."""
    clients, start = _iid_clients(20), models.logistic_regression()
    settings = {**_CONTINUED, **stream}

    def call(accountant):
        model = copy.deepcopy(start)
        dp_fedavg(model, clients, rounds=3, accountant=accountant, seed=5, **settings)
        return _weights(model)

    first = RDPAccountant()
    a = call(first)
    assert _max_diff(a, call(RDPAccountant())) == 0
    continued = call(first)
    assert _max_diff(a, continued) > 1e-3
    again_first = RDPAccountant()
    call(again_first)
    assert _max_diff(continued, call(again_first)) == 0


def test_a_stopped_continued_dp_fedavg_run_notes_the_accountants_total(monkeypatch):
    """A call continuing 2 rounds stops in its third: the note counts this call's 3 rounds and
    gives the total epsilon of 5."""
    accountant, clients = RDPAccountant(), _iid_clients(20)
    dp_fedavg(models.logistic_regression(), clients, rounds=2, accountant=accountant, seed=0,
              **_CONTINUED)  # fmt: skip
    _stop_in_the_third_round(monkeypatch)
    with pytest.raises(KeyboardInterrupt) as caught:
        dp_fedavg(models.logistic_regression(), clients, rounds=6, accountant=accountant, seed=1,
                  **_CONTINUED)  # fmt: skip
    (note,) = caught.value.__notes__
    assert note.startswith("dp_fedavg stopped after recording 3 noisy step(s)")
    assert f"epsilon = {_rdp_epsilon(5):.4g} at delta = 0.001" in note


def test_dp_fedavg_without_noise_or_clipping_is_fedavg_with_equal_weights():
    """Equal client sizes (4 x 30), q = 1, sigma = 0, S = 1e6 (no update comes near it): one
    DP-FedAvg round (divide the sum by qK = 4) gives the same global weights as one FedAvg round
    with C = 1 (weights n_k / n = 1/4). E = 2 full-batch epochs, so the local training does not
    depend on the shuffling seed. With server_lr = 0.5 the change of the weights is halved."""
    clients = [_tensors(30 * k, 30 * (k + 1)) for k in range(4)]
    start = models.mlp(seed=6).double()
    common = dict(local_epochs=2, batch_size=None, lr=0.3, progress=False)
    avg = copy.deepcopy(start)
    fedavg(avg, clients, rounds=1, client_fraction=1.0, **common)
    dp = copy.deepcopy(start)
    history = dp_fedavg(dp, clients, rounds=1, sample_rate=1.0, noise_multiplier=0.0,
                        max_update_norm=1e6, delta=1e-5, seed=0, **common)  # fmt: skip
    half = copy.deepcopy(start)
    dp_fedavg(half, clients, rounds=1, sample_rate=1.0, noise_multiplier=0.0,
              max_update_norm=1e6, delta=1e-5, server_lr=0.5, seed=0, **common)  # fmt: skip
    assert history[0]["clients"] == [0, 1, 2, 3]
    assert history[0]["epsilon"] == math.inf  # no noise, no privacy
    assert _max_diff(_weights(dp), _weights(avg)) < TOL
    w0, w_avg, w_half = _weights(start), _weights(avg), _weights(half)
    half_change = {k: w_half[k] - w0[k] for k in w0}
    assert _max_diff(half_change, {k: (w_avg[k] - w0[k]) / 2 for k in w0}) < TOL


def _huge_client():
    """A client whose update is huge: inputs scaled by 1000."""
    x, y = _tensors(0, 30)
    return x * 1000, y


def test_dp_fedavg_clips_each_update_to_s():
    """A single client with a huge update, q = 1, sigma = 0: the change of the model is its update
    clipped, of norm S * |u| / (|u| + 1e-6), in the direction of the unclipped update."""
    S = 0.5
    start = models.logistic_regression(seed=0).double()
    x, y = _huge_client()
    raw = local_update(start, x, y, epochs=1, batch_size=None, lr=1.0)
    assert _norm(raw) > 1000 * S
    model = copy.deepcopy(start)
    dp_fedavg(model, [(x, y)], rounds=1, sample_rate=1.0, noise_multiplier=0.0, max_update_norm=S,
              local_epochs=1, batch_size=None, lr=1.0, delta=1e-5, seed=0,
              progress=False)  # fmt: skip
    w0, w1 = _weights(start), _weights(model)
    change = {k: w1[k] - w0[k] for k in w0}
    assert _norm(change) <= S
    # the 1e-6 in the factor shortens it by 1e-6 / |u| < 2e-9 relative
    assert _norm(change) == pytest.approx(S, rel=1e-8)
    cosine = sum(float((change[k] * raw[k]).sum()) for k in w0) / (_norm(change) * _norm(raw))
    assert cosine == pytest.approx(1.0, abs=1e-12)


def test_dp_fedavg_sums_clipped_updates_of_mixed_clients():
    """Three clients (one huge, two ordinary), q = 1, sigma = 0, S = 0.5, server_lr = 1: the change
    is (1/3) sum_k u_k min(1, S / (|u_k| + 1e-6)), computed by hand from local_update. One of the
    ordinary updates is below S, so it enters unclipped."""
    S = 0.5
    start = models.logistic_regression(seed=0).double()
    clients = [_huge_client(), _tensors(100, 140), _tensors(140, 180)]
    lrs = 0.05
    raws = [local_update(start, x, y, epochs=1, batch_size=None, lr=lrs) for x, y in clients]
    norms = [_norm(u) for u in raws]
    assert norms[0] > S and min(norms[1:]) < S
    model = copy.deepcopy(start)
    dp_fedavg(model, clients, rounds=1, sample_rate=1.0, noise_multiplier=0.0, max_update_norm=S,
              local_epochs=1, batch_size=None, lr=lrs, delta=1e-3, seed=0,
              progress=False)  # fmt: skip
    w0 = _weights(start)
    factors = [min(1.0, S / (n + 1e-6)) for n in norms]
    expected = {
        k: w0[k] + sum(u[k] * f for u, f in zip(raws, factors, strict=True)) / 3 for k in w0
    }
    assert _max_diff(_weights(model), expected) < TOL
    unclipped = {k: w0[k] + sum(u[k] for u in raws) / 3 for k in w0}
    assert _max_diff(_weights(model), unclipped) > 1e-3


def test_dp_fedavg_noise_has_std_server_lr_sigma_s_over_qk():
    """Two runs with the same seed differ only in sigma (the client sampling and the local
    training do not depend on it), so the difference of the weights is the noise of one round:
    server_lr * N(0, sigma^2 S^2 I) / (qK). Over the 9,610 weights of the MLP, sum(d^2) / std^2 is
    chi-square with 9,610 degrees of freedom; accept within its 1e-6 and 1 - 1e-6 quantiles
    (about +-7% on the variance). The realised number of clients differs from qK = 5, so dividing
    by it instead would move the variance by at least (5/4)^2 and fail."""
    q, K, sigma, S, server_lr = 0.5, 10, 1.5, 2.0, 0.8
    clients = _iid_clients(K, n=50, dtype=torch.float64)
    start = models.mlp(seed=0).double()
    runs = []
    for noise in (sigma, 0.0):
        model = copy.deepcopy(start)
        history = dp_fedavg(model, clients, rounds=1, sample_rate=q, noise_multiplier=noise,
                            max_update_norm=S, local_epochs=1, batch_size=None, lr=0.1, delta=1e-3,
                            server_lr=server_lr, seed=11, progress=False)  # fmt: skip
        runs.append((_weights(model), history[0]["clients"]))
    (noisy, picked), (clean, picked_again) = runs
    assert picked == picked_again and len(picked) != q * K
    d = torch.cat([(noisy[k] - clean[k]).flatten() for k in noisy]).numpy()
    std = server_lr * sigma * S / (q * K)
    statistic = float((d**2).sum()) / std**2
    low, high = stats.chi2.ppf([1e-6, 1 - 1e-6], df=d.size)
    assert low < statistic < high
    assert abs(d.mean()) < 5 * std / math.sqrt(d.size)  # mean 0: a 5-sigma bound
    assert not (low < statistic * (q * K / len(picked)) ** 2 < high)  # realised count would fail


def test_dp_fedavg_poisson_sampling_has_binomial_size():
    """300 rounds, K = 20, q = 0.3: the number of clients per round is Binomial(20, 0.3).
    Pearson's chi-square test of the observed sizes (tails pooled so every expected count >= 5)
    must not reject at level 1e-3; each client joins Binomial(300, 0.3) times, within 5 sd."""
    K, q, rounds = 20, 0.3, 300
    clients = _iid_clients(K, n=2 * K)
    history = dp_fedavg(models.logistic_regression(), clients, rounds=rounds, sample_rate=q,
                        noise_multiplier=1.0, max_update_norm=1.0, local_epochs=1, batch_size=None,
                        lr=0.1, delta=1e-3, seed=2, progress=False)  # fmt: skip
    sizes = np.array([len(r["clients"]) for r in history])
    for record in history:
        assert len(set(record["clients"])) == len(record["clients"])
        assert record["clients"] == sorted(record["clients"])
    edges = [2, 3, 4, 5, 6, 7, 8, 9]  # bins: <=2, 3, ..., 8, >=9
    observed = [np.sum(sizes <= 2)] + [np.sum(sizes == s) for s in edges[1:-1]]
    observed.append(np.sum(sizes >= 9))
    probs = [stats.binom.cdf(2, K, q)] + [stats.binom.pmf(s, K, q) for s in edges[1:-1]]
    probs.append(stats.binom.sf(8, K, q))
    expected = rounds * np.array(probs)
    assert expected.min() >= 5
    _, p_value = stats.chisquare(observed, expected)
    assert p_value > 1e-3
    picks = np.concatenate([np.asarray(r["clients"], dtype=int) for r in history])
    counts = np.bincount(picks, minlength=K)
    assert np.all(np.abs(counts - rounds * q) < 5 * math.sqrt(rounds * q * (1 - q)))
    again = dp_fedavg(models.logistic_regression(), clients, rounds=3, sample_rate=q,
                      noise_multiplier=1.0, max_update_norm=1.0, local_epochs=1, batch_size=None,
                      lr=0.1, delta=1e-3, seed=2, progress=False)  # fmt: skip
    assert [r["clients"] for r in again] == [r["clients"] for r in history[:3]]


def test_dp_fedavg_warns_when_delta_is_not_below_one_over_k():
    clients = _iid_clients(10, n=20)
    kwargs = dict(rounds=1, sample_rate=0.5, noise_multiplier=1.0, max_update_norm=1.0,
                  local_epochs=1, batch_size=None, lr=0.1, seed=0, progress=False)  # fmt: skip
    with pytest.warns(UserWarning, match=r"delta=0.1 is not below 1/K"):
        dp_fedavg(models.logistic_regression(), clients, delta=0.1, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dp_fedavg(models.logistic_regression(), clients, delta=1e-3, **kwargs)


def test_dp_fedavg_records_test_scores():
    """Each round's scores are those of an independent evaluation (training.evaluate) of the
    global model after that round: the returned model for the last round, and a one-round run
    with the same seed for the first (round t's sampling, shuffling and noise do not depend on
    how many rounds follow)."""
    clients = _iid_clients(10, n=50)
    kwargs = dict(sample_rate=0.5, noise_multiplier=1.0, max_update_norm=1.0, local_epochs=1,
                  batch_size=5, lr=0.1, delta=1e-3, x_test=DIGITS.x_test, y_test=DIGITS.y_test,
                  seed=0, progress=False)  # fmt: skip
    model = models.logistic_regression()
    history = dp_fedavg(model, clients, rounds=2, **kwargs)
    assert set(history[0]) == {
        "round",
        "total_rounds",
        "clients",
        "epsilon",
        "delta",
        "test_loss",
        "test_accuracy",
    }
    first = models.logistic_regression()
    dp_fedavg(first, clients, rounds=1, **kwargs)
    for record, trained in [(history[0], first), (history[1], model)]:
        scores = training.evaluate(trained, DIGITS.x_test, DIGITS.y_test)
        assert record["test_accuracy"] == scores["accuracy"]
        assert record["test_loss"] == pytest.approx(scores["loss"], rel=1e-6)
    # negative control: the two rounds' models score differently
    assert history[0]["test_loss"] != pytest.approx(history[1]["test_loss"], rel=1e-3)


def test_dp_fedavg_noise_defaults_to_fresh_entropy():
    """Audit finding F3: two runs with default arguments must not share their noise. With q = 1
    and full-batch local training every client takes part and trains the same way in both runs
    (the shuffle only permutes the summation, about 1e-15 in float64), so the runs differ by
    two independent noise draws, of std sqrt(2) sigma S / qK = 0.35 per weight: over the 650
    weights the largest difference is below 0.1 with probability below 1e-100. The controls:
    without noise the default runs agree to 1e-9, and with seed=0 twice they agree exactly."""
    clients = [_tensors(30 * k, 30 * (k + 1)) for k in range(4)]
    start = models.logistic_regression(seed=0).double()
    kwargs = dict(rounds=1, sample_rate=1.0, max_update_norm=1.0, local_epochs=1, batch_size=None,
                  lr=0.1, delta=1e-3, progress=False)  # fmt: skip

    def run(**more):
        model = copy.deepcopy(start)
        dp_fedavg(model, clients, **kwargs, **more)
        return _weights(model)

    assert _max_diff(run(noise_multiplier=1.0), run(noise_multiplier=1.0)) > 0.1
    assert _max_diff(run(noise_multiplier=0.0), run(noise_multiplier=0.0)) < 1e-9
    seeded = run(noise_multiplier=1.0, seed=0)
    assert all(torch.equal(seeded[k], v) for k, v in run(noise_multiplier=1.0, seed=0).items())


def test_dp_fedavg_round_is_sample_update_aggregate_apply():
    """One round of dp_fedavg with a seed is, step by step, Poisson sampling with
    numpy.random.default_rng(seed), local_update seeded from SeedSequence((seed, 1, k)),
    dp_fedavg_aggregate with a torch.Generator seeded with seed and the denominator qK, and
    w <- w + server_lr * aggregate (the contract companion.flower relies on); float64, equal
    up to the rounding of the last addition (1e-12)."""
    K, q, seed, S, sigma, server_lr = 12, 0.4, 5, 0.3, 1.2, 0.7
    clients = _iid_clients(K, n=120, dtype=torch.float64)
    start = models.logistic_regression(seed=1).double()
    model = copy.deepcopy(start)
    history = dp_fedavg(model, clients, rounds=1, sample_rate=q, noise_multiplier=sigma,
                        max_update_norm=S, local_epochs=2, batch_size=4, lr=0.1, delta=1e-3,
                        server_lr=server_lr, seed=seed, progress=False)  # fmt: skip
    picked = [int(k) for k in np.flatnonzero(np.random.default_rng(seed).random(K) < q)]
    assert history[0]["clients"] == picked and 0 < len(picked) != q * K
    updates = [
        local_update(start, *clients[k], epochs=2, batch_size=4, lr=0.1,
                     seed=int(np.random.SeedSequence((seed, 1, k)).generate_state(1)[0]))
        for k in picked
    ]  # fmt: skip
    aggregate = dp_fedavg_aggregate(updates, max_update_norm=S, noise_multiplier=sigma,
                                    expected_clients=q * K,
                                    generator=torch.Generator().manual_seed(seed))  # fmt: skip
    w0 = _weights(start)
    assert _max_diff(_weights(model), {k: w0[k] + server_lr * aggregate[k] for k in w0}) < 1e-12


# --- the aggregation rules ----------------------------------------------------------------------


def _random_updates(sizes, scales, seed=0):
    """Updates with a (3, 4) weight and a (3,) bias, of norms set by ``scales``."""
    rng = torch.Generator().manual_seed(seed)
    return [
        {"w": s * torch.randn(3, 4, generator=rng, dtype=torch.float64),
         "b": s * torch.randn(3, generator=rng, dtype=torch.float64)}
        for s in scales[: len(sizes)]
    ]  # fmt: skip


def test_fedavg_aggregate_is_the_example_weighted_mean():
    """Against sum_k n_k u_k / sum_k n_k written out (float64, a few ulps apart); the unweighted
    mean (negative control) differs by far more than the tolerance."""
    sizes = [5, 20, 75]
    updates = _random_updates(sizes, [1.0, 2.0, 0.5])
    before = copy.deepcopy(updates)
    result = fedavg_aggregate(updates, sizes)
    expected = _weighted_mean(updates, sizes)
    unweighted = {k: sum(u[k] for u in updates) / len(updates) for k in ("w", "b")}
    assert list(result) == ["w", "b"]
    assert _max_diff(result, expected) < 1e-12
    assert _max_diff(result, unweighted) > 1e-2
    # a pure function: inputs unchanged, the result shares no memory with them
    assert all(torch.equal(u[k], b[k]) for u, b in zip(updates, before, strict=True) for k in u)
    result["w"].add_(1.0)
    assert all(torch.equal(u[k], b[k]) for u, b in zip(updates, before, strict=True) for k in u)
    # one client: its own update
    assert _max_diff(fedavg_aggregate(updates[:1], [7]), updates[0]) == 0


def _clip_by_hand(update, S):
    norm = math.sqrt(sum(float((t**2).sum()) for t in update.values()))
    return {k: v * min(1.0, S / (norm + 1e-6)) for k, v in update.items()}


def test_dp_fedavg_aggregate_clips_sums_noises_and_divides_by_qk():
    """Against a hand-written reference: clip each whole update (two of four are above S), sum,
    add sigma * S times one standard-normal draw over all parameters (in the order w, b) from a
    generator with the same seed, divide by qK = 2.5, the fixed expected number of clients.
    float64 throughout: 1e-12 absolute is far above rounding. Negative controls: the realised
    denominator (4 clients) and the unclipped sum both miss by more than 1e-2."""
    S, sigma, qk = 0.8, 1.3, 2.5
    updates = _random_updates([1, 1, 1, 1], [0.1, 3.0, 0.05, 5.0])
    norms = [_norm(u) for u in updates]
    assert sum(n > S for n in norms) == 2
    before = copy.deepcopy(updates)
    result = dp_fedavg_aggregate(
        updates,
        max_update_norm=S,
        noise_multiplier=sigma,
        expected_clients=qk,
        generator=torch.Generator().manual_seed(9),
    )
    noise = torch.randn(15, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    noise = {"w": noise[:12].view(3, 4), "b": noise[12:]}
    clipped = [_clip_by_hand(u, S) for u in updates]
    noisy_sum = {k: sum(c[k] for c in clipped) + sigma * S * noise[k] for k in noise}
    assert list(result) == ["w", "b"]
    assert _max_diff(result, {k: v / qk for k, v in noisy_sum.items()}) < 1e-12
    assert _max_diff(result, {k: v / len(updates) for k, v in noisy_sum.items()}) > 1e-2
    unclipped = {k: (sum(u[k] for u in updates) + sigma * S * noise[k]) / qk for k in noise}
    assert _max_diff(result, unclipped) > 1e-2
    assert all(torch.equal(u[k], b[k]) for u, b in zip(updates, before, strict=True) for k in u)


def test_dp_fedavg_aggregate_without_clients_is_pure_noise():
    """No client sampled: the result is N(0, sigma^2 S^2 I) / qK with the given names, shapes
    and dtype. sum(x^2) / std^2 over 10,012 values is chi-square(10,012); accept within its
    1e-6 and 1 - 1e-6 quantiles (about +-6% on the variance)."""
    S, sigma, qk = 2.0, 0.9, 3.0
    shapes = {"w": torch.Size([100, 100]), "b": torch.Size([12])}
    result = dp_fedavg_aggregate([], max_update_norm=S, noise_multiplier=sigma,
                                 expected_clients=qk, generator=torch.Generator().manual_seed(1),
                                 parameter_shapes=shapes, dtype=torch.float64)  # fmt: skip
    assert {k: v.shape for k, v in result.items()} == shapes and list(result) == ["w", "b"]
    assert all(v.dtype == torch.float64 for v in result.values())
    x = torch.cat([v.flatten() for v in result.values()]).numpy()
    std = sigma * S / qk
    low, high = stats.chi2.ppf([1e-6, 1 - 1e-6], df=x.size)
    assert low < float((x**2).sum()) / std**2 < high
    assert not low < float((x**2).sum()) / (std * qk) ** 2 < high  # undivided noise would fail
    silent = dp_fedavg_aggregate(
        [],
        max_update_norm=S,
        noise_multiplier=0.0,
        expected_clients=qk,
        generator=torch.Generator(),
        parameter_shapes=shapes,
    )
    assert all(v.dtype == torch.get_default_dtype() and not v.any() for v in silent.values())
    assert all(v.device.type == "cpu" for v in silent.values())
    # on the model's device (meta stands in for a GPU), so that the server can apply it
    elsewhere = dp_fedavg_aggregate([], max_update_norm=S, noise_multiplier=sigma,
                                    expected_clients=qk, generator=torch.Generator(),
                                    parameter_shapes=shapes, device="meta")  # fmt: skip
    assert all(v.device.type == "meta" and v.shape == shapes[k] for k, v in elsewhere.items())


_U = {"w": torch.ones(2, 2), "b": torch.ones(2)}
_GEN = torch.Generator()
_AGG = dict(max_update_norm=1.0, noise_multiplier=1.0, expected_clients=2.0, generator=_GEN)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: fedavg_aggregate([], []), ValueError, "at least one client's update"),
        (lambda: fedavg_aggregate([_U], [1, 2]), ValueError, "one count per update"),
        (lambda: fedavg_aggregate([_U], [0]), ValueError, r"num_examples\[0\] must be >= 1"),
        (lambda: fedavg_aggregate([_U], [1.5]), TypeError, r"num_examples\[0\] must be an integer"),
        (lambda: fedavg_aggregate(_U, [1]), TypeError, "updates must be a list of dicts"),
        (lambda: fedavg_aggregate([_U, {"w": _U["w"]}], [1, 1]), ValueError, "names and shapes"),
        (lambda: fedavg_aggregate([_U, {"w": torch.ones(2), "b": _U["b"]}], [1, 1]), ValueError,
         "names and shapes"),
        (lambda: fedavg_aggregate([{"w": torch.tensor([float("nan")])}], [1]), ValueError,
         "NaN or inf"),
        (lambda: fedavg_aggregate([{"w": torch.ones(2, dtype=torch.long)}], [1]), TypeError,
         "floating-point tensor"),
        (lambda: dp_fedavg_aggregate([], **_AGG), ValueError, "pass parameter_shapes"),
        (lambda: dp_fedavg_aggregate([_U], **_AGG, parameter_shapes={"w": (2, 2)}), ValueError,
         "parameter_shapes must match"),
        (lambda: dp_fedavg_aggregate([_U], **{**_AGG, "expected_clients": 0.0}), ValueError,
         "expected_clients must be > 0"),
        (lambda: dp_fedavg_aggregate([_U], **{**_AGG, "max_update_norm": 0.0}), ValueError,
         "max_update_norm must be > 0"),
        (lambda: dp_fedavg_aggregate([_U], **{**_AGG, "noise_multiplier": -1.0}), ValueError,
         "noise_multiplier must be >= 0"),
        (lambda: dp_fedavg_aggregate([_U], **{**_AGG, "generator": 0}), TypeError, "generator"),
        (lambda: dp_fedavg_aggregate([], **_AGG, parameter_shapes={"w": (2,)}, dtype=torch.long),
         TypeError, "dtype must be a floating"),
    ],
)  # fmt: skip
def test_aggregators_reject_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


# --- validation ---------------------------------------------------------------------------------

_CLIENTS = [_tensors(0, 10, dtype=torch.float32), _tensors(10, 25, dtype=torch.float32)]
_EMPTY = (torch.zeros(0, 64), torch.zeros(0, dtype=torch.long))
_MISMATCHED = (torch.zeros(5, 64), torch.zeros(4, dtype=torch.long))
_LABEL_12 = (torch.zeros(5, 64), torch.tensor([0, 1, 12, 3, 4]))
_FEDAVG = dict(rounds=1, client_fraction=1.0, local_epochs=1, batch_size=None, lr=0.1,
               progress=False)  # fmt: skip
_DP = dict(rounds=1, sample_rate=1.0, noise_multiplier=1.0, max_update_norm=1.0, local_epochs=1,
           batch_size=None, lr=0.1, delta=1e-3, seed=0, progress=False)  # fmt: skip

_BAD = [
    # (which function, changed arguments, error type, message)
    ("both", {"clients": []}, ValueError, "clients must hold at least one client"),
    (
        "both",
        {"clients": [_CLIENTS[0], _EMPTY]},
        ValueError,
        r"clients\[1\] x must hold at least one",
    ),
    (
        "both",
        {"clients": [_MISMATCHED]},
        ValueError,
        r"clients\[0\] x and clients\[0\] y must have the same",
    ),
    ("both", {"clients": _CLIENTS[0][0]}, TypeError, "clients must be a list of"),
    (
        "both",
        {"clients": [_CLIENTS[0], _LABEL_12]},
        ValueError,
        r"clients\[1\]: labels must be below the model's 10 outputs for loss='cross_entropy', "
        "got a label 12",  # the client named since a coursework trial
    ),
    ("both", {"rounds": 0}, ValueError, "rounds must be >= 1"),
    ("both", {"rounds": 2.0}, TypeError, "rounds must be an integer"),
    ("both", {"local_epochs": 0}, ValueError, "local_epochs must be >= 1"),
    ("both", {"batch_size": 0}, ValueError, "batch_size must be >= 1"),
    ("both", {"lr": 0.0}, ValueError, "lr must be > 0"),
    ("both", {"lr": -0.1}, ValueError, "lr must be > 0"),
    ("both", {"loss": "mse"}, ValueError, "loss must be one of"),
    ("both", {"seed": -1}, ValueError, "seed must be >= 0"),
    ("both", {"progress": 0}, TypeError, "progress must be True or False, got int"),
    ("fedavg", {"client_fraction": 0.0}, ValueError, r"client_fraction must be > 0"),
    ("fedavg", {"client_fraction": 1.5}, ValueError, r"client_fraction must lie in \(0, 1\]"),
    ("fedavg", {"mu": -0.1}, ValueError, "mu must be >= 0"),
    ("dp", {"sample_rate": 0.0}, ValueError, "sample_rate must be > 0"),
    ("dp", {"sample_rate": 1.2}, ValueError, r"sample_rate must lie in \(0, 1\]"),
    ("dp", {"noise_multiplier": -1.0}, ValueError, "noise_multiplier must be >= 0"),
    ("dp", {"max_update_norm": 0.0}, ValueError, "max_update_norm must be > 0"),
    ("dp", {"max_update_norm": -1.0}, ValueError, "max_update_norm must be > 0"),
    ("dp", {"delta": 0.0}, ValueError, r"delta must lie in the open interval \(0, 1\)"),
    ("dp", {"delta": 1.0}, ValueError, r"delta must lie in the open interval \(0, 1\)"),
    ("dp", {"server_lr": 0.0}, ValueError, "server_lr must be > 0"),
    ("dp", {"accountant": "rdp"}, TypeError, "accountant must be a companion.accounting.RDPAcc"),
    ("dp", {"accountant": RDPAccountant}, TypeError, "got the class RDPAccountant; pass an inst"),
]


def _cases():
    for which, changes, error, match in _BAD:
        for name in ["fedavg", "dp"] if which == "both" else [which]:
            yield pytest.param(name, changes, error, match, id=f"{name}-{changes}"[:60])


@pytest.mark.parametrize(("name", "changes", "error", "match"), list(_cases()))
def test_bad_configurations_raise(name, changes, error, match):
    function, defaults = (fedavg, _FEDAVG) if name == "fedavg" else (dp_fedavg, _DP)
    kwargs = {"clients": _CLIENTS, **defaults, **changes}
    clients = kwargs.pop("clients")
    with pytest.raises(error, match=match):
        function(models.logistic_regression(), clients, **kwargs)


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"epochs": 0}, ValueError, "epochs must be >= 1"),
        ({"batch_size": 0}, ValueError, "batch_size must be >= 1"),
        ({"lr": 0.0}, ValueError, "lr must be > 0"),
        ({"mu": -1.0}, ValueError, "mu must be >= 0"),
        ({"loss": "hinge"}, ValueError, "loss must be one of"),
        ({"seed": 1.5}, TypeError, "seed must be an integer"),
        ({"y": torch.zeros(9, dtype=torch.long)}, ValueError, "same number of examples"),
        ({"x": _EMPTY[0], "y": _EMPTY[1]}, ValueError, "at least one example"),
        ({"x": _LABEL_12[0], "y": _LABEL_12[1]}, ValueError, "got a label 12"),
    ],
)
def test_local_update_rejects_bad_arguments(changes, error, match):
    kwargs = {"x": _CLIENTS[0][0], "y": _CLIENTS[0][1], "epochs": 1, "batch_size": None, "lr": 0.1,
              **changes}  # fmt: skip
    x, y = kwargs.pop("x"), kwargs.pop("y")
    with pytest.raises(error, match=match):
        local_update(models.logistic_regression(), x, y, **kwargs)


def test_a_model_must_be_a_module():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fedavg("model", _CLIENTS, **_FEDAVG)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        dp_fedavg(None, _CLIENTS, **_DP)


@pytest.mark.parametrize("loop", ["fedavg", "dp_fedavg"])
def test_a_model_with_batch_norm_is_trained_with_a_warning(loop):
    """BatchNorm's running statistics are buffers, which federated averaging does not aggregate:
    the global model keeps its initial ones (checked), and both loops say so, naming the layer;
    a model without such a layer trains without a warning."""
    clients = _iid_clients(4, n=20)
    kwargs = dict(rounds=1, local_epochs=1, batch_size=None, lr=0.1, seed=0, progress=False)
    if loop == "dp_fedavg":
        kwargs |= dict(sample_rate=1.0, noise_multiplier=1.0, max_update_norm=1.0, delta=1e-3)
    else:
        kwargs |= dict(client_fraction=1.0)
    run = {"fedavg": fedavg, "dp_fedavg": dp_fedavg}[loop]
    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.BatchNorm1d(16),
                                torch.nn.Linear(16, 10))  # fmt: skip
    with pytest.warns(UserWarning, match=r"layer\(s\) \['1'\] keep running statistics"):
        run(model, clients, **kwargs)
    assert torch.equal(model[1].running_mean, torch.zeros(16))
    assert int(model[1].num_batches_tracked) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(models.logistic_regression(), clients, **kwargs)


# --- test data that the model does not fit ------------------------------------------------------


@pytest.mark.parametrize(
    ("x_test", "y_test", "message"),
    [
        (DIGITS.x_test[:3], np.array([0, 1, 11]), "x_test and y_test: labels must be below"),
        (DIGITS.x_test[:3, :5], DIGITS.y_test[:3], r"x_test and y_test: model cannot be applied"),
    ],
    ids=["label-11", "5-features"],
)
@pytest.mark.parametrize("loop", ["fedavg", "dp_fedavg", "train"])
def test_test_data_the_model_does_not_fit_are_refused_before_training(
    loop, x_test, y_test, message
):
    """A coursework trial: the test data were first read after the first round (or epoch),
    through torch's own IndexError or RuntimeError, with the model already changed and a
    continued accountant already charged. They are now checked as the training data are."""
    model, accountant = models.logistic_regression(seed=0), RDPAccountant()
    before = copy.deepcopy(model.state_dict())
    test = dict(x_test=x_test, y_test=y_test)
    runs = {
        "fedavg": lambda: fedavg(
            model, _iid_clients(4), rounds=1, client_fraction=1.0, local_epochs=1,
            batch_size=None, lr=0.1, progress=False, **test,
        ),
        "dp_fedavg": lambda: dp_fedavg(
            model, _iid_clients(4), rounds=1, accountant=accountant, **_CONTINUED, **test
        ),
        "train": lambda: training.train(
            model, DIGITS.x_train[:32], DIGITS.y_train[:32], epochs=1, batch_size=8, lr=0.1,
            **test,
        ),
    }  # fmt: skip
    with pytest.raises(ValueError, match=message):
        runs[loop]()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(accountant) == 0


def test_dp_fedavg_aggregate_sums_16_bit_updates_in_float32_and_rounds_once():
    """A coursework trial: bfloat16 updates were clipped and summed in bfloat16, whose rounding
    let one clipped update reach 1.006 S, above the sensitivity the accountant assumes. The sum
    and the noise are now float32, and the result is rounded to bfloat16 once (post-processing
    of the noisy sum): each entry of 40 clipped updates' sum is within bfloat16's unit roundoff,
    2**-8, of the float64 sum of the same clipped bfloat16 values (before: up to 68 times that,
    the roundings of 40 additions)."""
    g = torch.Generator().manual_seed(0)
    updates = [{"w": (torch.randn(50, generator=g) * 100).to(torch.bfloat16)} for _ in range(40)]
    out = dp_fedavg_aggregate(updates, max_update_norm=1.0, noise_multiplier=0.0,
                              expected_clients=1.0, generator=torch.Generator())  # fmt: skip
    assert out["w"].dtype == torch.bfloat16
    exact = sum(u["w"].double() * min(1.0, 1.0 / (float(u["w"].double().norm()) + 1e-6))
                for u in updates)  # fmt: skip
    error = (out["w"].double() - exact).abs()
    assert bool((error <= 2.0**-8 * exact.abs() + 1e-6).all())


@pytest.mark.parametrize(
    "dtypes", [(torch.float32, torch.float64), (torch.bfloat16, torch.float64)], ids=str
)
def test_dp_fedavg_aggregate_takes_updates_of_mixed_dtypes(dtypes):
    """A review: with the sum in the first update's dtype (float32 at least), a later float64
    update made vector_norm refuse to narrow it (a RuntimeError; a Flower client replying in
    float64 could end a run). The sum runs in the widest dtype and is rounded to the first's:
    the updates (1, 1, 1, 1) and (2, 2, 2, 2), of norms 2 and 4, clipped to norm 1, sum to
    1 / (2 + 1e-6) + 2 / (4 + 1e-6) in each entry, within the first dtype's unit roundoff."""
    updates = [{"w": torch.ones(4, dtype=dtypes[0])}, {"w": torch.full((4,), 2.0, dtype=dtypes[1])}]
    out = dp_fedavg_aggregate(updates, max_update_norm=1.0, noise_multiplier=0.0,
                              expected_clients=1.0, generator=torch.Generator())  # fmt: skip
    assert out["w"].dtype == dtypes[0]
    expected = 1 / (2 + 1e-6) + 2 / (4 + 1e-6)
    unit = torch.finfo(dtypes[0]).eps / 2
    assert bool(((out["w"].double() - expected).abs() <= unit * expected).all())


@pytest.mark.parametrize("dp", [False, True], ids=["fedavg", "dp_fedavg"])
def test_a_diverging_client_is_named_by_its_index(dp):
    """helper-104's trial: the error named the client's place in the round's sample
    (updates[1]), not clients[4], whose inputs of 1e30 made its local training diverge."""
    generator = torch.Generator().manual_seed(0)
    clients = [(torch.randn(10, 5, generator=generator), torch.arange(10) % 2) for _ in range(6)]
    clients[4] = (clients[4][0] * 1e30, clients[4][1])
    common = dict(rounds=4, local_epochs=3, batch_size=None, lr=0.1, progress=False)
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 2)
    with pytest.raises(ValueError, match=r"local training of clients\[4\] diverged"):
        if dp:
            dp_fedavg(model, clients, sample_rate=0.5, noise_multiplier=1.0, max_update_norm=1.0,
                      delta=1e-3, seed=1, **common)  # fmt: skip
        else:
            fedavg(model, clients, client_fraction=1.0, **common)
