"""Checks of the inputs and the loss that DP-SGD takes: findings of two audits, each a case that
passed silently (a privacy loss or a wrong gradient), failed with a raw torch error, or named
the wrong thing.

* A callable loss that is a mean over the tokens of a padded batch weights example i by its token
  count T_i (its gradient with respect to example i's outputs is n T_i / sum_j T_j times a mean's),
  so one example's clipped gradient depends on the others and the clipping bounds nothing: the
  loss check must refuse it also when the first examples of the batch are unpadded.
* A callable loss that reads a model parameter (an L2 penalty) loses that term's gradient in the
  per-example methods: refused.
* Labels of shape (N, 1), one-hot or multi-label with a named loss: a message with the fix.
* numpy's bools are flags; a Dataset's bad item is named by its index in the Dataset; an
  IterableDataset (no length, so no Poisson sampling) is refused by name.

Oracles: the plain per-example loop of tests/_oracles.py (one backward per example, float64),
and the loss written per example by hand. Tolerances are those of _assert_same (1e-5 relative,
float64 sums of a few dozen terms agree to about 1e-15).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _oracles import _assert_same, _loop_clipped_sum
from torch import nn
from torch.utils.data import Dataset, IterableDataset

from companion._validation import check_flag
from companion.dpsgd import set_private_gradients, train_dpsgd
from companion.dpsgd.data import RunData
from companion.per_example import clipped_gradient_sum

VOCAB, WIDTH, LENGTH, BATCH = 11, 6, 12, 48
PAD = -100  # torch's default ignore_index


class _TokenModel(nn.Module):
    """Logits for every token: outputs (B, VOCAB, LENGTH), as nn.CrossEntropyLoss takes them."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, WIDTH)
        self.out = nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens):
        return self.out(torch.tanh(self.embedding(tokens))).transpose(1, 2)


def _token_model():
    torch.manual_seed(0)
    return _TokenModel().double()


def _padded_batch(unpadded=4, seed=0):
    """Random tokens and next-token targets; the first ``unpadded`` examples are full length,
    the others padded after a random length in [2, LENGTH): the layout of a batch of texts whose
    first few are the longest (a sorted or bucketed data set)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=generator)
    targets = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=generator)
    lengths = torch.randint(2, LENGTH, (BATCH,), generator=generator)
    lengths[:unpadded] = LENGTH
    targets[torch.arange(LENGTH) >= lengths[:, None]] = PAD
    return tokens, targets


def _per_example_token_mean(outputs, targets):
    """Each example's mean over its own tokens, then the mean over the examples: a plain mean of
    per-example losses (what DP-SGD's clipping assumes)."""
    token_losses = F.cross_entropy(outputs, targets, ignore_index=PAD, reduction="none")
    return (token_losses.sum(1) / (targets != PAD).sum(1)).mean()


def _private_gradients(model, x, y, loss):
    return set_private_gradients(
        model,
        x,
        y,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=float(len(x)),
        generator=torch.Generator().manual_seed(0),
        loss=loss,
    )


def _train(model, x, y=None, **overrides):
    arguments = dict(
        max_grad_norm=1.0,
        sample_rate=0.25,
        epochs=1,
        delta=1e-3,
        noise_multiplier=1.0,
        lr=0.1,
        seed=0,
    )
    return train_dpsgd(model, x, y, **(arguments | overrides))


_ENTRY_POINTS = {
    "clipped_gradient_sum": lambda model, x, y, loss: clipped_gradient_sum(
        model, loss, x, y, max_grad_norm=1.0
    ),
    "set_private_gradients": _private_gradients,
    "train_dpsgd": lambda model, x, y, loss: _train(model, x, y, loss=loss),
}


# --- F1: a mean over the tokens of a padded batch -----------------------------------------------


@pytest.mark.parametrize("entry", sorted(_ENTRY_POINTS))
def test_a_token_mean_over_a_padded_batch_is_refused_though_its_first_examples_are_unpadded(
    entry,
):
    """Before, the check probed the first 4 examples of (B, T) targets only: unpadded here, so
    the token mean equalled the mean of the examples' means and the loss passed."""
    tokens, targets = _padded_batch(unpadded=4)
    with pytest.raises(ValueError, match="loss must .*mean over the examples.*padded batch"):
        _ENTRY_POINTS[entry](_token_model(), tokens, targets, nn.CrossEntropyLoss())


def test_a_weighting_is_caught_even_where_every_token_has_the_same_loss():
    """The audit's batch: one token id and one target everywhere, so every token's loss is the
    same and the token mean equals the mean of the examples' means at any padding; but its
    gradient weights example i by n T_i / sum_j T_j (50 tokens for the first five examples, one
    for the others). Only the comparison of gradients sees it."""
    tokens = torch.zeros(BATCH, LENGTH, dtype=torch.long)
    targets = torch.full((BATCH, LENGTH), 3)
    targets[5:, 1:] = PAD
    loss = nn.CrossEntropyLoss()
    outputs = _token_model()(tokens)
    singles = torch.stack([loss(outputs[i : i + 1], targets[i : i + 1]) for i in range(BATCH)])
    torch.testing.assert_close(loss(outputs, targets), singles.mean())  # the values agree
    with pytest.raises(ValueError, match="its gradient with respect to one example's outputs"):
        clipped_gradient_sum(_token_model(), loss, tokens, targets, max_grad_norm=1.0)


def test_the_per_example_token_mean_is_accepted_and_matches_the_plain_loop():
    """Negative controls: the loss the message recommends passes on the padded batch and gives
    the plain loop's clipped sum; the token mean passes on a batch without padding (where it is
    a plain mean over the examples)."""
    tokens, targets = _padded_batch(unpadded=4)
    model = _token_model()
    sums = clipped_gradient_sum(model, _per_example_token_mean, tokens, targets, max_grad_norm=0.5)
    expected, _ = _loop_clipped_sum(model, _per_example_token_mean, tokens, targets, 0.5)
    _assert_same(sums, expected)
    unpadded = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=torch.Generator().manual_seed(1))
    sums = clipped_gradient_sum(model, nn.CrossEntropyLoss(), tokens, unpadded, max_grad_norm=0.5)
    expected, _ = _loop_clipped_sum(model, nn.CrossEntropyLoss(), tokens, unpadded, 0.5)
    _assert_same(sums, expected)


# --- F5: a loss that reads a parameter ----------------------------------------------------------


class _Temperature(nn.Module):
    """A loss with a learnable temperature: a parameter the per-example gradients never see."""

    def __init__(self):
        super().__init__()
        self.log_temperature = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, outputs, targets):
        return F.cross_entropy(outputs * self.log_temperature.exp(), targets)


def _classifier():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def _classes(n=32):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, generator=generator, dtype=torch.float64)
    return x, torch.randint(0, 3, (n,), generator=generator)


@pytest.mark.parametrize("entry", sorted(_ENTRY_POINTS))
def test_a_loss_that_reads_a_model_parameter_is_refused(entry):
    """Before, an L2 penalty in the loss passed the check (it adds the same to every example's
    loss) and every method dropped its gradient: 76% relative error against the plain loop."""
    model = _classifier()

    def penalised(outputs, targets):
        return F.cross_entropy(outputs, targets) + 0.5 * model[2].weight.square().sum()

    x, y = _classes()
    with pytest.raises(ValueError, match="loss must read only its arguments.*weight_decay"):
        _ENTRY_POINTS[entry](model, x, y, penalised)
    with pytest.raises(ValueError, match="loss must read only its arguments"):
        clipped_gradient_sum(model, _Temperature(), x, y, max_grad_norm=1.0)


def test_a_loss_that_reads_a_constant_tensor_is_accepted():
    """Negative control: a tensor without a gradient (label weights known in advance, applied
    per example) is data of the loss, not a parameter; the sum matches the plain loop."""
    model, (x, y) = _classifier(), _classes()
    scale = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)

    def scaled(outputs, targets):
        return (scale[targets] * F.cross_entropy(outputs, targets, reduction="none")).mean()

    sums = clipped_gradient_sum(model, scaled, x, y, max_grad_norm=0.1)
    _assert_same(sums, _loop_clipped_sum(model, scaled, x, y, 0.1)[0])


# --- F7: labels that are not one per example for a named loss -----------------------------------


def test_labels_of_shape_n_by_1_get_a_message_with_the_fix_not_a_torch_error():
    """Before, y of shape (B, 1) with loss='cross_entropy' reached torch's "0D or 1D target
    tensor expected, multi-target not supported" (a RuntimeError)."""
    x, y = _classes(6)
    message = r"y must have shape \(N,\), one label per example, .*got shape \(6, 1\).*squeeze\(1\)"
    with pytest.raises(ValueError, match=message):
        clipped_gradient_sum(_classifier(), "cross_entropy", x, y[:, None], max_grad_norm=1.0)
    with pytest.raises(ValueError, match=f"{message[:1]}_batch {message[2:]}"):
        _private_gradients(_classifier(), x, y[:, None], "cross_entropy")
    with pytest.raises(ValueError, match=r"for loss='bce'; got shape \(6, 1\).*squeeze\(1\)"):
        clipped_gradient_sum(
            nn.Linear(5, 1).double(), "bce", x, (y > 0)[:, None], max_grad_norm=1.0
        )


def test_one_hot_and_multi_label_targets_with_a_named_loss_get_the_fix_and_the_fix_works():
    """Before, the message was "y must have shape (N,), got shape (32, 3)", without the fix.
    The fixes it names are right: argmax labels with 'cross_entropy' and the one-hot targets
    with nn.CrossEntropyLoss() give the plain loop's clipped sum."""
    x, y = _classes()
    one_hot = F.one_hot(y, 3).double()
    with pytest.raises(ValueError, match=r"argmax\(1\).*torch\.nn\.CrossEntropyLoss\(\)"):
        _train(_classifier(), x, one_hot)
    with pytest.raises(ValueError, match=r"multi-label.*torch\.nn\.BCEWithLogitsLoss\(\)"):
        _train(_classifier(), x, (one_hot > 0).long(), loss="bce")
    expected, _ = _loop_clipped_sum(_classifier(), "cross_entropy", x, y, 0.1)
    labels = one_hot.argmax(1)
    by_index = clipped_gradient_sum(_classifier(), "cross_entropy", x, labels, max_grad_norm=0.1)
    soft = clipped_gradient_sum(_classifier(), nn.CrossEntropyLoss(), x, one_hot, max_grad_norm=0.1)
    _assert_same(by_index, expected)
    _assert_same(soft, expected)


# --- S4a: numpy bools as flags ------------------------------------------------------------------


def test_numpy_bools_are_flags_and_other_types_are_named_with_their_module():
    """Before, progress=np.True_ gave "progress must be True or False, got bool"."""
    for value in (np.True_, np.False_, np.bool_(3 > 2)):
        flag = check_flag("progress", value)
        assert type(flag) is bool and flag == bool(value)
    x, y = _classes()
    assert len(_train(_classifier(), x, y, progress=np.False_)) == 1
    with pytest.raises(TypeError, match=r"progress must be True or False, got numpy\.int64\."):
        check_flag("progress", np.int64(1))
    with pytest.raises(TypeError, match=r"progress must be True or False, got torch\.Tensor\."):
        check_flag("progress", torch.tensor(True))
    with pytest.raises(TypeError, match=r"progress must be True or False, got int\."):
        check_flag("progress", 1)  # builtins keep their bare names


# --- S4b and S3: Datasets -----------------------------------------------------------------------


class _BadItem(Dataset):
    """400 examples of 4 features; item 350 (after the 256 checked before training) is bad."""

    def __init__(self, kind):
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(400, 4, generator=generator)
        self.y = torch.randint(0, 3, (400,), generator=generator)
        self.kind = kind

    def __len__(self):
        return 400

    def __getitem__(self, i):
        x, y = self.x[i], self.y[i]
        if i == 350 and self.kind == "shape":
            x = torch.zeros(5)
        if i == 350 and self.kind == "nan":
            x = torch.full((4,), float("nan"))
        if i == 350 and self.kind == "label":
            y = torch.tensor(7)
        return x, y


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("shape", r"the input of its item at index 350 has shape \(5,\), where .* \(4,\)"),
        ("nan", r"NaN or infinite values; its item at index 350 does"),
        ("label", r"got a label 7 in the Dataset x, at index 350"),
    ],
)
def test_a_datasets_bad_item_is_named_by_its_index_in_the_dataset(kind, message):
    """Before, the item of shape (5,) was named by its place in the batch ("entry 2" here, "entry
    46" in the audit's Poisson batch), and the other two had no index at all. The batch holds
    items 3, 100, 350 and 399, read as train_dpsgd reads a Poisson batch, after the check of the
    first 256 items; then a run with every item in its first batch (sample_rate=1)."""
    data = RunData(_BadItem(kind), None, "cross_entropy", torch.device("cpu"))
    data.check(nn.Linear(4, 3))
    mask = torch.zeros(400, dtype=torch.bool)
    mask[[3, 100, 350, 399]] = True
    with pytest.raises(ValueError, match=message):
        data.batch(mask)
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=message):
        _train(nn.Linear(4, 3), _BadItem(kind), sample_rate=1.0)


class _Stream(IterableDataset):
    def __iter__(self):
        yield from zip(torch.randn(8, 4), torch.randint(0, 3, (8,)), strict=True)


class _NoLength(Dataset):
    def __getitem__(self, i):
        return torch.zeros(4), 0


def test_an_iterable_dataset_is_refused_by_name():
    """Before: TypeError: object of type '_Stream' has no len()."""
    model = nn.Linear(4, 3)
    with pytest.raises(TypeError, match=r"x is an IterableDataset .*__len__ and __getitem__"):
        _train(model, _Stream())
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with pytest.raises(TypeError, match=r"x_test is an IterableDataset .*map-style"):
        _train(model, x, y, x_test=_Stream())
    with pytest.raises(TypeError, match=r"x is a Dataset \(_NoLength\) without __len__"):
        _train(model, _NoLength())
