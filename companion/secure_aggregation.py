r"""Secure aggregation in miniature: pairwise masks that cancel in the sum.

Bonawitz, Ivanov, Kreuter, Marcedone, McMahan, Patel, Ramage, Segal and Seth (2017), "Practical
Secure Aggregation for Privacy-Preserving Machine Learning", ACM CCS. Clients hide their model
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
(:data:`MODULUS`) makes the cancellation exact; with floating-point masks it would only be
approximate. Updates are encoded in fixed point with ``scale`` steps per unit.

If a client drops out after the masks were set up, its masks no longer cancel. The real protocol
secret-shares every seed so that the surviving clients can help the server remove the dropped
client's masks; here the survivors simply reveal the seeds they shared with it
(:func:`secure_sum` with ``dropped``).

What secure aggregation does not do: the server still learns the exact sum, which can reveal a
lot when few clients take part, and nothing stops the server from learning each update when
only one client survives. It is not differential privacy; the two are combined in practice
(:func:`companion.federated.dp_fedavg` adds the noise; see the federated-learning chapter).

.. warning::

    Teaching code. It uses numpy's generator, which is not a cryptographic PRG, creates the
    seeds in one place instead of by key agreement, and has no authentication or secret
    sharing. Use a maintained framework (Flower's SecAgg+, for instance) for real deployments.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from companion._random import RNGLike, as_generator
from companion._validation import check_int, check_positive, check_positive_int

__all__ = ["MODULUS", "mask_update", "pairwise_seeds", "secure_sum"]

MODULUS = 2**32
"""Size :math:`R` of the ring of integers in which updates are masked and summed."""

Seeds = Mapping[tuple[int, int], int]


def pairwise_seeds(num_clients: int, *, rng: RNGLike = None) -> dict[tuple[int, int], int]:
    """One random seed for every pair of clients ``(i, j)`` with ``i < j``.

    In the protocol of Bonawitz et al. (2017) each pair agrees on its seed by key exchange;
    here one generator draws them all. The seeds are secrets of the clients: whoever knows
    them can remove the masks.

    Args:
        num_clients: the number of clients that set up masks together, >= 1.
        rng: a :class:`numpy.random.Generator`, an int seed, or None for fresh entropy.

    Returns:
        A dict ``(i, j) -> seed`` with ``num_clients * (num_clients - 1) / 2`` entries, each
        seed an integer in ``[0, 2^63)``.

    Raises:
        TypeError: if ``num_clients`` is not an integer or ``rng`` not a generator, int or None.
        ValueError: if ``num_clients`` < 1.

    Example:
        >>> seeds = pairwise_seeds(3, rng=0)
        >>> sorted(seeds)
        [(0, 1), (0, 2), (1, 2)]
    """
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
    """``client``'s share of ``pair``'s mask: +PRG for the lower index, -PRG for the higher."""
    sign = 1 if client == pair[0] else -1
    return sign * _prg(seeds[pair], dim)


def _encode(update: np.ndarray, scale: float, num_clients: int) -> np.ndarray:
    if not isinstance(update, np.ndarray) or update.ndim != 1:
        raise TypeError("update must be a one-dimensional numpy array.")
    if not (np.issubdtype(update.dtype, np.floating) or np.issubdtype(update.dtype, np.integer)):
        raise TypeError(f"update must hold real numbers, got dtype {update.dtype}.")
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
    r"""What ``client`` sends: its update in fixed point plus its pairwise masks, modulo 2^32.

    :math:`y_i = \mathrm{round}(x_i \cdot \text{scale}) + \sum_{j > i} \mathrm{PRG}(s_{ij})
    - \sum_{j < i} \mathrm{PRG}(s_{ji}) \pmod{2^{32}}` (Bonawitz et al. 2017, the masking
    step without secret sharing).

    Args:
        update: the client's model update, a one-dimensional float array.
        client: this client's index, 0 <= client < num_clients.
        seeds: the pairwise seeds from :func:`pairwise_seeds`.
        num_clients: the number of clients that set up masks together.
        scale: fixed-point steps per unit, > 0; the sum is exact up to rounding each update to
            1/scale.

    Returns:
        An int64 array of the length of ``update``, values in ``[0, 2^32)``.

    Raises:
        TypeError: if ``update`` is not a one-dimensional numpy array of real numbers, or
            ``client`` not an integer.
        ValueError: if ``client`` is out of range, ``seeds`` lack a pair of ``client`` (its
            update would go out unmasked) or hold a pair other than ``(i, j)``,
            ``0 <= i < j < num_clients``, ``scale`` is not > 0, ``update`` holds NaN or inf, or
            ``|update| * scale * num_clients`` reaches 2^31 (the sum could wrap).

    Example:
        >>> import numpy as np
        >>> seeds = pairwise_seeds(2, rng=0)
        >>> sent = [mask_update(np.array([0.5, -1.0]), client=c, seeds=seeds, num_clients=2)
        ...         for c in (0, 1)]
        >>> total = (sent[0] + sent[1]) % MODULUS
        >>> (np.where(total >= MODULUS // 2, total - MODULUS, total) / 2**16).tolist()
        [1.0, -2.0]
    """
    num_clients = check_positive_int("num_clients", num_clients)
    client = check_int("client", client, minimum=0)
    if not client < num_clients:
        raise ValueError(f"client must lie in [0, {num_clients}), got {client}.")
    # Every pair of this client (one missing, its update would go out unmasked), and pairs of the
    # num_clients clients only (one of another client, its mask would have no partner). A subset
    # is allowed: the seeds a client reveals give the masks the server removes.
    own = ((min(client, j), max(client, j)) for j in range(num_clients) if j != client)
    if (
        not isinstance(seeds, Mapping)
        or not all(p in seeds for p in own)
        or not all(
            isinstance(p, tuple) and len(p) == 2 and 0 <= p[0] < p[1] < num_clients for p in seeds
        )
    ):
        raise ValueError(
            f"seeds must hold a seed for each pair of client {client} with the other clients, "
            f"and only pairs (i, j) with 0 <= i < j < num_clients={num_clients}, as "
            "pairwise_seeds(num_clients) makes them: with other seeds the update would go out "
            "unmasked or the masks would not cancel."
        )
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
    removes those masks, so the result is the sum of the surviving clients' updates, exact up to
    the fixed-point rounding: within ``len(survivors) / (2 * scale)`` of the float sum.

    Args:
        updates: one one-dimensional float array per client, all of the same length.
        dropped: indices of clients whose masked update never arrives.
        scale: fixed-point steps per unit, > 0.
        rng: seeds the pairwise masks (a generator, an int seed, or None for fresh entropy; a
            seed given here is a secret of the clients).

    Returns:
        ``(total, received)``: the decoded sum of the surviving updates, and the masked updates
        the server received (one per survivor), which is all the server sees of any client.

    Raises:
        TypeError: if an update is not a one-dimensional numpy array of real numbers, or
            ``dropped`` not a sequence.
        ValueError: if there is no update, the updates differ in length, ``dropped`` holds an
            index out of range or every client, an update is not finite or too large for the
            ring at this ``scale``, or ``scale`` is not > 0.

    Example:
        >>> import numpy as np
        >>> updates = [np.array([0.25, -0.5]), np.array([1.0, 0.75]), np.array([2.0, 0.0])]
        >>> total, received = secure_sum(updates, rng=0)
        >>> total.tolist(), len(received)
        ([3.25, 0.25], 3)
        >>> secure_sum(updates, dropped=[2], rng=0)[0].tolist()
        [1.25, 0.25]
    """
    num_clients = len(updates)
    check_positive_int("number of updates", num_clients)
    if not all(isinstance(u, np.ndarray) for u in updates):
        raise TypeError("updates must be numpy arrays (for torch tensors, pass t.numpy()).")
    dims = {u.size for u in updates}
    if len(dims) != 1:
        raise ValueError("updates must be numpy arrays of one common length.")
    dim = dims.pop()
    if not isinstance(dropped, Sequence | set | frozenset | np.ndarray) or isinstance(dropped, str):
        raise TypeError(
            f"dropped must be a sequence of client indices, got {type(dropped).__name__}."
        )
    dropped_set = set(np.asarray(dropped).ravel().tolist())
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
