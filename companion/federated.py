r"""Federated learning: the pieces the book's federated-learning chapter builds on.

So far this module holds a miniature of **secure aggregation** (Bonawitz et al. 2017, "Practical
Secure Aggregation for Privacy-Preserving Machine Learning", ACM CCS): clients hide their model
updates under random masks that cancel in the sum, so the server learns the sum of the updates
and nothing else about any single one.

Every pair of clients :math:`i < j` shares a random seed :math:`s_{ij}` (in the real protocol
they agree on it by a Diffie-Hellman key exchange, so the server never sees it). Client
:math:`i` encodes its update :math:`x_i` as integers modulo :math:`R` and sends

.. math::

    y_i = x_i + \sum_{j > i} \mathrm{PRG}(s_{ij}) - \sum_{j < i} \mathrm{PRG}(s_{ji}) \pmod R .

Each pairwise mask is added by one client and subtracted by the other, so
:math:`\sum_i y_i = \sum_i x_i \pmod R` exactly, while each :math:`y_i` alone is uniformly
distributed: it says nothing about :math:`x_i`. Integer arithmetic modulo :math:`R = 2^{32}`
makes the cancellation exact; with floating-point masks it would only be approximate. Updates
are encoded in fixed point with ``scale`` steps per unit.

If a client drops out after the masks were set up, its masks no longer cancel. The real protocol
secret-shares every seed so that the surviving clients can help the server remove the dropped
client's masks; here the survivors simply reveal the seeds they shared with it
(:func:`secure_sum` with ``dropped``).

What secure aggregation does not do: the server still learns the exact sum, which can reveal a
lot when few clients take part, and nothing stops the server from learning each update when
only one client survives. It is not differential privacy; the two are combined in practice.

.. warning::

    A teaching toy: numpy's generator is not a cryptographic PRG, the seeds are created in one
    place instead of by key agreement, and there is no authentication or secret sharing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from companion._validation import RNGLike, as_generator, check_positive, check_positive_int

__all__ = ["MODULUS", "mask_update", "pairwise_seeds", "secure_sum"]

MODULUS = 2**32
"""Size :math:`R` of the ring of integers in which updates are masked and summed."""

Seeds = Mapping[tuple[int, int], int]


def pairwise_seeds(num_clients: int, *, rng: RNGLike = None) -> dict[tuple[int, int], int]:
    """One random seed for every pair of clients ``(i, j)`` with ``i < j``."""
    num_clients = check_positive_int("num_clients", num_clients)
    generator = as_generator(rng)
    return {
        (i, j): int(generator.integers(0, 2**63))
        for i in range(num_clients)
        for j in range(i + 1, num_clients)
    }


def _prg(seed: int, dim: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, MODULUS, size=dim, dtype=np.int64)


def _pair_mask(client: int, pair: tuple[int, int], dim: int, seeds: Seeds) -> np.ndarray:
    """The part of ``client``'s mask that comes from ``pair``: +PRG for the lower index, -PRG for the higher."""
    sign = 1 if client == pair[0] else -1
    return sign * _prg(seeds[pair], dim)


def _encode(update: np.ndarray, scale: float, num_clients: int) -> np.ndarray:
    if not isinstance(update, np.ndarray) or update.ndim != 1:
        raise TypeError("update must be a one-dimensional numpy array.")
    if not np.isfinite(update).all():
        raise ValueError("update must be finite (no NaN or inf).")
    fixed = np.round(update * scale)
    if np.abs(fixed).max(initial=0) * num_clients >= MODULUS // 2:
        raise ValueError(
            f"update too large for exact aggregation: |update| * scale * num_clients must stay "
            f"below 2^31; lower scale (now {scale})."
        )
    return fixed.astype(np.int64) % MODULUS


def mask_update(
    update: np.ndarray, *, client: int, seeds: Seeds, num_clients: int, scale: float = 2.0**16
) -> np.ndarray:
    """What ``client`` sends: its update in fixed point plus its pairwise masks, modulo 2^32.

    Args:
        update: the client's model update, a one-dimensional float array.
        client: this client's index, 0 <= client < num_clients.
        seeds: the pairwise seeds from :func:`pairwise_seeds`.
        num_clients: the number of clients that set up masks together.
        scale: fixed-point steps per unit; the sum is exact up to rounding to 1/scale.
    """
    num_clients = check_positive_int("num_clients", num_clients)
    if not 0 <= client < num_clients:
        raise ValueError(f"client must lie in [0, {num_clients}), got {client}.")
    scale = check_positive("scale", scale)
    masked = _encode(update, scale, num_clients)
    for pair in seeds:
        if client in pair:
            masked = (masked + _pair_mask(client, pair, update.size, seeds)) % MODULUS
    return masked


def secure_sum(
    updates: Sequence[np.ndarray],
    *,
    dropped: Sequence[int] = (),
    scale: float = 2.0**16,
    rng: RNGLike = None,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Simulate one round of secure aggregation and return what the server computes and sees.

    Every client masks its update (:func:`mask_update`); the clients in ``dropped`` fail before
    sending. The survivors reveal the seeds they shared with dropped clients, and the server
    removes those masks, so the result is the sum of the surviving clients' updates.

    Args:
        updates: one one-dimensional float array per client, all of the same length.
        dropped: indices of clients whose masked update never arrives.
        scale: fixed-point steps per unit.
        rng: seeds the pairwise masks.

    Returns:
        ``(total, received)``: the decoded sum of the surviving updates, and the masked updates
        the server received (one per survivor), which is all the server sees of any client.
    """
    num_clients = len(updates)
    check_positive_int("number of updates", num_clients)
    dims = {u.size if isinstance(u, np.ndarray) else -1 for u in updates}
    if len(dims) != 1 or -1 in dims:
        raise ValueError("updates must be numpy arrays of one common length.")
    dim = dims.pop()
    dropped_set = set(dropped)
    if not dropped_set <= set(range(num_clients)):
        raise ValueError(f"dropped must hold client indices in [0, {num_clients}).")
    survivors = [c for c in range(num_clients) if c not in dropped_set]
    if not survivors:
        raise ValueError("at least one client must survive.")

    seeds = pairwise_seeds(num_clients, rng=rng)
    received = [
        mask_update(updates[c], client=c, seeds=seeds, num_clients=num_clients, scale=scale)
        for c in survivors
    ]
    total = np.sum(received, axis=0) % MODULUS
    # Masks a survivor shares with a dropped client have no partner in the sum: remove them.
    for client in survivors:
        for pair in seeds:
            if client in pair and (set(pair) & dropped_set):
                total = (total - _pair_mask(client, pair, dim, seeds)) % MODULUS
    signed = np.where(total >= MODULUS // 2, total - MODULUS, total)
    return signed / scale, received
