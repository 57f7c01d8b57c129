"""Split a dataset's train and test splits into per-client index sets.

Schemes (see LIPS_SPEC.md, "Data partition"):

- ``dirichlet``: client k draws label proportions q_k ~ Dir(alpha); it gets round(n * q_kc)
  samples of class c (the last class takes the remainder), drawn from the class's pool without
  replacement when the pool is large enough, with replacement otherwise. Clients may overlap.
- ``pathological``: client k gets ``classes_per_client`` random distinct classes in equal shares.
- ``iid``: each client draws n samples uniformly without replacement (clients may overlap).
- ``uniform``: one permutation cut into disjoint chunks of n.

In every scheme a client's test set is drawn from the test split like its train set (same q_k
for dirichlet, same classes for pathological, uniformly otherwise). Indices are grouped by class
for dirichlet and pathological clients; shuffle them when batching.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SCHEMES = ("dirichlet", "pathological", "iid", "uniform")


@dataclass
class ClientSplit:
    train_idx: np.ndarray  # int64 indices into the train split
    test_idx: np.ndarray  # int64 indices into the test split
    class_mix: np.ndarray  # float64 (num_classes,), the client's label proportions q_k


def partition_clients(
    y_train: np.ndarray,
    y_test: np.ndarray,
    num_classes: int,
    *,
    scheme: str,
    clients: int,
    train_per_client: int,
    test_per_client: int,
    alpha: float = 0.1,
    classes_per_client: int = 2,
    seed: int = 0,
) -> list[ClientSplit]:
    """Partition the labels ``y_train``/``y_test`` into ``clients`` client splits.

    The result depends only on the arguments: the same seed gives the same split.
    Raises ValueError, naming the config key, for requests that cannot be met.
    """
    y_train = _labels(y_train, num_classes, "train")
    y_test = _labels(y_test, num_classes, "test")
    _check(scheme, clients, train_per_client, test_per_client, alpha)
    rng = np.random.default_rng(seed)
    n, n_test = train_per_client, test_per_client
    train_rows, test_rows = _class_rows(y_train), _class_rows(y_test)

    if scheme == "dirichlet":
        mixes = rng.dirichlet(np.full(num_classes, float(alpha)), size=clients)
        train_rng, test_rng = rng.spawn(2)
        return [
            ClientSplit(
                _draw_by_class(train_rows, rounded_counts(q, n), train_rng, k, "train"),
                _draw_by_class(test_rows, rounded_counts(q, n_test), test_rng, k, "test"),
                q,
            )
            for k, q in enumerate(mixes)
        ]

    if scheme == "pathological":
        if classes_per_client > num_classes:
            raise ValueError(
                f"data.classes_per_client: {classes_per_client} exceeds the {num_classes} classes"
            )
        if classes_per_client > n:
            raise ValueError(
                f"data.classes_per_client: {classes_per_client} classes cannot each get a sample "
                f"of data.train_per_client = {n}"
            )
        picks = [rng.choice(num_classes, classes_per_client, replace=False) for _ in range(clients)]
        train_rng, test_rng = rng.spawn(2)
        splits = []
        for k, picked in enumerate(picks):
            q = np.zeros(num_classes)
            q[picked] = 1.0 / classes_per_client
            splits.append(ClientSplit(
                _draw_by_class(train_rows, _equal_counts(picked, n, num_classes), train_rng, k,
                               "train"),
                _draw_by_class(test_rows, _equal_counts(picked, n_test, num_classes), test_rng, k,
                               "test"),
                q,
            ))
        return splits

    if n > len(y_train):
        raise ValueError(
            f"data.train_per_client: {n} exceeds the {len(y_train)} training samples"
        )
    if n_test > len(y_test):
        raise ValueError(
            f"data.test_per_client: {n_test} exceeds the {len(y_test)} test samples"
        )
    if scheme == "iid":
        train = [rng.choice(len(y_train), n, replace=False) for _ in range(clients)]
    else:  # uniform
        if clients * n > len(y_train):
            raise ValueError(
                f"data.train_per_client: uniform partition needs clients x train_per_client = "
                f"{clients * n} disjoint samples, but there are {len(y_train)}"
            )
        train = np.split(rng.permutation(len(y_train))[: clients * n], clients)
    test_rng = rng.spawn(1)[0]
    return [
        ClientSplit(
            idx.astype(np.int64),
            test_rng.choice(len(y_test), n_test, replace=False).astype(np.int64),
            np.bincount(y_train[idx], minlength=num_classes) / n,
        )
        for idx in train
    ]


def rounded_counts(q: np.ndarray, n: int) -> np.ndarray:
    """Per-class counts round(n * q_c), the last class taking the remainder; they sum to n.

    If rounding overshoots n, the excess is taken one by one from the largest counts, so no
    count is negative.
    """
    counts = np.zeros(len(q), dtype=np.int64)
    counts[:-1] = np.rint(n * np.asarray(q[:-1], dtype=np.float64))
    counts[-1] = n - counts[:-1].sum()
    while counts[-1] < 0:
        counts[-1] += 1
        counts[int(np.argmax(counts[:-1]))] -= 1
    return counts


def _equal_counts(classes: np.ndarray, n: int, num_classes: int) -> np.ndarray:
    """``n`` split equally over ``classes``; the first ``n % len(classes)`` get one more."""
    counts = np.zeros(num_classes, dtype=np.int64)
    share, extra = divmod(n, len(classes))
    counts[classes] = share
    counts[classes[:extra]] += 1
    return counts


def _draw_by_class(
    by_class: list[np.ndarray], counts: np.ndarray, rng: np.random.Generator, client: int,
    split: str
) -> np.ndarray:
    """Draw ``counts[c]`` of the rows ``by_class[c]`` of class c; with replacement only if the
    class has fewer rows than the count."""
    parts = []
    for c in np.flatnonzero(counts):
        pool = by_class[c] if c < len(by_class) else np.zeros(0, dtype=np.int64)
        if len(pool) == 0:
            raise ValueError(
                f"data.dataset: class {c} has no samples in the {split} split, but client "
                f"{client} needs {counts[c]} of them"
            )
        parts.append(rng.choice(pool, int(counts[c]), replace=len(pool) < counts[c]))
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


def _class_rows(y: np.ndarray) -> list[np.ndarray]:
    """The rows of each class of ``y`` in increasing order (``np.flatnonzero(y == c)``),
    computed once per partition instead of once per client and class."""
    order = np.argsort(y, kind="stable")
    bounds = np.searchsorted(y[order], np.arange(int(y.max(initial=-1)) + 2))
    return [order[bounds[c]:bounds[c + 1]] for c in range(len(bounds) - 1)]


def _labels(y: np.ndarray, num_classes: int, split: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or (y.size and (y.min() < 0 or y.max() >= num_classes)):
        raise ValueError(
            f"{split} labels must be a 1-D array of integers in [0, {num_classes})"
        )
    return y.astype(np.int64, copy=False)


def _check(scheme: str, clients: int, n: int, n_test: int, alpha: float) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"data.partition: unknown scheme {scheme!r}; expected one of {SCHEMES}")
    if clients < 1:
        raise ValueError(f"data.clients: must be >= 1, got {clients}")
    if n < 1:
        raise ValueError(f"data.train_per_client: must be >= 1, got {n}")
    if n_test < 0:
        raise ValueError(f"data.test_per_client: must be >= 0, got {n_test}")
    if scheme == "dirichlet" and not alpha > 0:
        raise ValueError(f"data.alpha: must be > 0, got {alpha}")
