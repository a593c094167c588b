"""Data sets used by the chapters, all available offline.

- :func:`load_digits`: the 8x8 handwritten digits that ship with scikit-learn (1,797 images, 10
  classes), split into training and test sets.
- :func:`make_patients`: a synthetic table of patients generated from a seed, for counting and
  sum queries and for attacks on "anonymised" aggregates. No real person is in it.
- :func:`partition_iid`, :func:`partition_shards` and :func:`partition_dirichlet`: ways to split
  a labelled data set among the clients of a federated-learning simulation, from identically
  distributed to strongly skewed; :func:`label_distribution` shows the result.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn import datasets

from companion._validation import RNGLike, as_generator, check_positive_int, check_real

__all__ = [
    "Digits",
    "Patients",
    "label_distribution",
    "load_digits",
    "make_patients",
    "partition_dirichlet",
    "partition_iid",
    "partition_shards",
]


@dataclass(frozen=True)
class Digits:
    """Training and test splits of the digits data.

    Attributes:
        x_train, x_test: float32 arrays of shape (n, 64), pixel intensities scaled to [0, 1].
        y_train, y_test: int64 arrays of shape (n,), labels 0-9.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits(*, test_fraction: float = 0.25, seed: int = 0) -> Digits:
    """Load scikit-learn's bundled digits and split them at random, stratified by label.

    Args:
        test_fraction: share of the 1,797 images held out for testing, in (0, 1).
        seed: seed of the shuffle, so every reader gets the same split.
    """
    test_fraction = check_real("test_fraction", test_fraction)
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}.")
    rng = as_generator(seed)
    bunch = datasets.load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    test_index = []
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        test_index.append(members[: round(test_fraction * members.size)])
    is_test = np.zeros(y.size, dtype=bool)
    is_test[np.concatenate(test_index)] = True
    return Digits(x_train=x[~is_test], y_train=y[~is_test], x_test=x[is_test], y_test=y[is_test])


@dataclass(frozen=True)
class Patients:
    """A synthetic patient table; one entry per person in each array.

    Attributes:
        age: int64 ages in years, 18-90.
        zip_code: int64 codes of 10 neighbourhoods, 0-9.
        income: float64 yearly incomes in thousands, heavy-tailed (log-normal).
        has_condition: bool, whether the person has a sensitive medical condition; its
            prevalence rises with age.
    """

    age: np.ndarray
    zip_code: np.ndarray
    income: np.ndarray
    has_condition: np.ndarray

    def __len__(self) -> int:
        return int(self.age.size)


def make_patients(n: int = 1000, *, rng: RNGLike = 0) -> Patients:
    """Generate ``n`` synthetic patients from a seed.

    Args:
        n: number of people, >= 1.
        rng: a ``numpy.random.Generator`` or an int seed (default 0, so the table is the same for
            every reader).
    """
    n = check_positive_int("n", n)
    generator = as_generator(rng)
    age = generator.integers(18, 91, size=n)
    zip_code = generator.integers(0, 10, size=n)
    income = np.round(generator.lognormal(mean=np.log(45.0), sigma=0.6, size=n), 1)
    prevalence = 0.05 + 0.25 * (age - 18) / 72
    has_condition = generator.random(n) < prevalence
    return Patients(age=age, zip_code=zip_code, income=income, has_condition=has_condition)


# --- partitions among federated clients ---------------------------------------------------------


def _check_labels(labels: object) -> np.ndarray:
    if not isinstance(labels, np.ndarray) or labels.ndim != 1:
        raise TypeError("labels must be a one-dimensional numpy array of integer class labels.")
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"labels must hold integers, got dtype {labels.dtype}.")
    if labels.size == 0:
        raise ValueError("labels must not be empty.")
    if labels.min() < 0:
        raise ValueError("labels must be >= 0.")
    return labels


def _check_num_clients(num_clients: object, n: int) -> int:
    num_clients = check_positive_int("num_clients", num_clients)
    if num_clients > n:
        raise ValueError(f"num_clients must be at most the number of examples ({n}), got {num_clients}.")
    return num_clients


def partition_iid(n: int, *, num_clients: int, rng: RNGLike = 0) -> list[np.ndarray]:
    """Split the indices ``0 .. n-1`` at random into ``num_clients`` parts of (nearly) equal size.

    Every client then sees data drawn from the same distribution: the IID setting of McMahan et
    al. (2017), "Communication-Efficient Learning of Deep Networks from Decentralized Data".

    Returns:
        One sorted index array per client; together they cover every index exactly once.
    """
    n = check_positive_int("n", n)
    num_clients = _check_num_clients(num_clients, n)
    order = as_generator(rng).permutation(n)
    return [np.sort(part) for part in np.array_split(order, num_clients)]


def partition_shards(
    labels: np.ndarray, *, num_clients: int, shards_per_client: int = 2, rng: RNGLike = 0
) -> list[np.ndarray]:
    """The "pathological non-IID" split of McMahan et al. (2017), Section 3.

    Sort the examples by label, cut them into ``num_clients * shards_per_client`` shards of equal
    size, and give each client ``shards_per_client`` shards at random. With two shards per
    client, most clients hold examples of only two classes.

    Returns:
        One sorted index array per client; together they cover every index exactly once.
    """
    labels = _check_labels(labels)
    num_clients = _check_num_clients(num_clients, labels.size)
    shards_per_client = check_positive_int("shards_per_client", shards_per_client)
    num_shards = num_clients * shards_per_client
    if num_shards > labels.size:
        raise ValueError(
            f"num_clients * shards_per_client ({num_shards}) must not exceed the number of examples "
            f"({labels.size})."
        )
    generator = as_generator(rng)
    # a stable sort by label, with ties in random order
    order = generator.permutation(labels.size)
    order = order[np.argsort(labels[order], kind="stable")]
    shards = np.array_split(order, num_shards)
    assignment = generator.permutation(num_shards).reshape(num_clients, shards_per_client)
    return [np.sort(np.concatenate([shards[s] for s in row])) for row in assignment]


def partition_dirichlet(
    labels: np.ndarray,
    *,
    num_clients: int,
    alpha: float,
    min_size: int = 1,
    max_attempts: int = 100,
    rng: RNGLike = 0,
) -> list[np.ndarray]:
    r"""Label-skewed split: each class is shared among clients in Dirichlet proportions.

    For every class :math:`c` draw :math:`p_c \sim \mathrm{Dir}(\alpha, \dots, \alpha)` over the
    clients and give client :math:`k` a share :math:`p_{c,k}` of the examples of class
    :math:`c` (Hsu, Qi and Brown 2019, "Measuring the Effects of Non-Identical Data Distribution
    for Federated Visual Classification"). Large ``alpha`` approaches the IID split; small
    ``alpha`` (0.1 and below) gives most clients one or two dominant classes.

    A draw that leaves some client with fewer than ``min_size`` examples is redrawn, at most
    ``max_attempts`` times (as Flower's ``DirichletPartitioner`` does).

    Example:
        >>> labels = load_digits().y_train
        >>> parts = partition_dirichlet(labels, num_clients=10, alpha=0.5, rng=0)
        >>> sum(p.size for p in parts) == labels.size
        True

    Returns:
        One sorted index array per client; together they cover every index exactly once.
    """
    labels = _check_labels(labels)
    num_clients = _check_num_clients(num_clients, labels.size)
    alpha = check_real("alpha", alpha)
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}.")
    min_size = check_positive_int("min_size", min_size)
    max_attempts = check_positive_int("max_attempts", max_attempts)
    generator = as_generator(rng)
    for _ in range(max_attempts):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for label in np.unique(labels):
            members = generator.permutation(np.flatnonzero(labels == label))
            shares = generator.dirichlet(np.full(num_clients, alpha))
            cuts = np.round(np.cumsum(shares)[:-1] * members.size).astype(int)
            for client, chunk in enumerate(np.split(members, cuts)):
                parts[client].append(chunk)
        result = [np.sort(np.concatenate(chunks)) for chunks in parts]
        if min(part.size for part in result) >= min_size:
            return result
    raise ValueError(
        f"no Dirichlet draw in {max_attempts} attempts gave every client at least {min_size} "
        f"examples; raise alpha, lower num_clients or min_size."
    )


def label_distribution(labels: np.ndarray, parts: list[np.ndarray]) -> np.ndarray:
    """Count the examples of each class held by each client.

    Returns:
        An integer array of shape ``(len(parts), number of classes)``.
    """
    labels = _check_labels(labels)
    n_classes = int(labels.max()) + 1
    return np.stack([np.bincount(labels[part], minlength=n_classes) for part in parts])
