"""Independent references for the per-example gradient tests (imported by the test modules).

The reference for every gradient is a plain loop: one forward and one backward pass per example
with :func:`torch.autograd.grad`, the norm taken over all trainable parameters together, the factor
``min(1, C / (norm + 1e-6))`` applied, and the results summed. Nothing here calls companion.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _reference_loss(loss, outputs, targets):
    """The mean loss of a batch, written out independently of companion.training."""
    if callable(loss):
        return loss(outputs, targets)
    if loss == "bce":
        return F.binary_cross_entropy_with_logits(outputs[:, 0], targets.to(outputs.dtype))
    return F.cross_entropy(outputs, targets)


def _trainable(model):
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def _loop_gradients(model, loss, x, y):
    """Per-example gradients, one forward/backward per example: (dict name -> (B, ...))."""
    params = _trainable(model)
    rows = []
    for i in range(x.shape[0]):
        value = _reference_loss(loss, model(x[i : i + 1]), y[i : i + 1])
        rows.append(torch.autograd.grad(value, [p for _, p in params]))
    return {
        name: torch.stack([row[k] for row in rows]) if rows else p.new_zeros((0, *p.shape))
        for k, (name, p) in enumerate(params)
    }


def _loop_clipped_sum(model, loss, x, y, max_grad_norm, *, clip=True):
    """Clip every example's gradient (norm over all parameters) and sum: (sums, norms).

    With ``clip=False`` this is the faulty loop of the negative control, which forgets to clip.
    """
    grads = _loop_gradients(model, loss, x, y)
    sums = {name: torch.zeros_like(p) for name, p in _trainable(model)}
    norms = []
    for i in range(x.shape[0]):
        norm = math.sqrt(sum(float(g[i].square().sum()) for g in grads.values()))
        factor = min(1.0, max_grad_norm / (norm + 1e-6)) if clip else 1.0
        for name, g in grads.items():
            sums[name] += factor * g[i]
        norms.append(norm)
    return sums, torch.tensor(norms, dtype=torch.float64)


def _assert_same(actual, expected):
    """Dicts of tensors equal to 1e-5 relative. The absolute floor is 1e-5 times the largest
    entry of each tensor, so entries far below its scale (weights of nearly dead ReLU units)
    are compared at that scale rather than relative to themselves."""
    assert actual.keys() == expected.keys()
    for name, e in expected.items():
        torch.testing.assert_close(actual[name], e, rtol=1e-5, atol=1e-5 * float(e.abs().max()))


def _most_clipped_norm(norms):
    """A clipping norm below 80% of the examples' gradient norms (their 20% quantile)."""
    return float(torch.quantile(norms, 0.2))


def _loop_at_most_clipped(model, loss, x, y):
    """The loop's clipped sum at a norm that clips most examples (:func:`_most_clipped_norm` of
    their norms): (that norm, the sums, the examples' norms)."""
    _, norms = _loop_clipped_sum(model, loss, x, y, 1.0)
    c = _most_clipped_norm(norms)
    sums, _ = _loop_clipped_sum(model, loss, x, y, c)
    return c, sums, norms
