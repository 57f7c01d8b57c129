"""Client partitions: sizes, reproducibility, label mixes and errors for every scheme."""

from __future__ import annotations

import numpy as np
import pytest

from ray_lips.data import ClientSplit, partition_clients
from ray_lips.data.partition import rounded_counts

SCHEMES = ["dirichlet", "pathological", "iid", "uniform"]
NUM_CLASSES = 10


@pytest.fixture(scope="module")
def labels() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(123)
    return rng.permutation(np.arange(2000) % NUM_CLASSES), rng.permutation(np.arange(800) % 10)


def split(labels, scheme: str, **kw) -> list[ClientSplit]:
    args = dict(scheme=scheme, clients=8, train_per_client=50, test_per_client=30, seed=0)
    args.update(kw)
    return partition_clients(labels[0], labels[1], NUM_CLASSES, **args)


def reference_counts(q: np.ndarray, n: int) -> list[int]:
    """The spec's rule, written out independently of the implementation."""
    counts = [round(n * float(p)) for p in q[:-1]]
    counts.append(n - sum(counts))
    while counts[-1] < 0:
        largest = max(range(len(counts) - 1), key=lambda i: counts[i])
        counts[largest] -= 1
        counts[-1] += 1
    return counts


@pytest.mark.parametrize("scheme", SCHEMES)
def test_sizes_types_and_mix(labels, scheme):
    splits = split(labels, scheme)
    assert len(splits) == 8
    for s in splits:
        assert s.train_idx.dtype == np.int64 and s.test_idx.dtype == np.int64
        assert s.train_idx.shape == (50,) and s.test_idx.shape == (30,)
        assert s.train_idx.min() >= 0 and s.train_idx.max() < len(labels[0])
        assert s.test_idx.min() >= 0 and s.test_idx.max() < len(labels[1])
        assert s.class_mix.dtype == np.float64 and s.class_mix.shape == (NUM_CLASSES,)
        assert s.class_mix.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_same_seed_same_split_other_seed_differs(labels, scheme):
    a, b, c = split(labels, scheme, seed=5), split(labels, scheme, seed=5), split(labels, scheme)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.train_idx, y.train_idx)
        np.testing.assert_array_equal(x.test_idx, y.test_idx)
        np.testing.assert_array_equal(x.class_mix, y.class_mix)
    assert any(not np.array_equal(x.train_idx, y.train_idx) for x, y in zip(a, c, strict=True))
    assert any(not np.array_equal(x.test_idx, y.test_idx) for x, y in zip(a, c, strict=True))


def test_dirichlet_counts_follow_class_mix(labels):
    y_train, y_test = labels
    splits = split(labels, "dirichlet", clients=20, alpha=0.1)
    for s in splits:
        train_counts = np.bincount(y_train[s.train_idx], minlength=NUM_CLASSES)
        test_counts = np.bincount(y_test[s.test_idx], minlength=NUM_CLASSES)
        assert train_counts.tolist() == reference_counts(s.class_mix, 50)
        assert test_counts.tolist() == reference_counts(s.class_mix, 30)
        # pools (200 train / 80 test per class) are large enough: no repeats within a client
        assert len(np.unique(s.train_idx)) == 50 and len(np.unique(s.test_idx)) == 30
    # alpha = 0.1 is strongly skewed: most clients are dominated by one class
    assert np.median([s.class_mix.max() for s in splits]) > 0.5


def test_dirichlet_alpha_controls_skew(labels):
    skewed = split(labels, "dirichlet", clients=30, alpha=0.05)
    flat = split(labels, "dirichlet", clients=30, alpha=100.0)
    assert np.mean([s.class_mix.max() for s in skewed]) > 0.6
    assert np.mean([s.class_mix.max() for s in flat]) < 0.25


def test_rounded_counts_overshoot_takes_from_largest():
    q = np.array([0.3, 0.3, 0.3, 0.1])  # round(1.5) = 2 three times: 6 > 5
    counts = rounded_counts(q, 5)
    assert counts.sum() == 5 and (counts >= 0).all()
    assert counts.tolist() == reference_counts(q, 5) == [1, 2, 2, 0]
    assert rounded_counts(np.array([0.25, 0.5, 0.25]), 8).tolist() == [2, 4, 2]


def test_replacement_only_when_pool_too_small():
    # class 0 has 3 samples, class 1 has 100: a client needing 10 of each must repeat class 0
    y_train = np.array([0] * 3 + [1] * 100)
    y_test = np.array([0, 1] * 20)
    splits = partition_clients(
        y_train, y_test, 2, scheme="pathological", clients=4, train_per_client=20,
        test_per_client=10, classes_per_client=2,
    )
    for s in splits:
        small = s.train_idx[y_train[s.train_idx] == 0]
        large = s.train_idx[y_train[s.train_idx] == 1]
        assert len(small) == 10 and set(small.tolist()) <= {0, 1, 2}
        assert len(large) == 10 and len(np.unique(large)) == 10


def test_dirichlet_draws_with_replacement_from_tiny_pools():
    y_train = np.repeat(np.arange(4), 2)  # two samples per class
    y_test = np.repeat(np.arange(4), 50)
    for s in partition_clients(y_train, y_test, 4, scheme="dirichlet", clients=5,
                               train_per_client=40, test_per_client=40, alpha=0.5):
        assert len(s.train_idx) == 40 and len(np.unique(s.train_idx)) <= 8
        counts = np.bincount(y_train[s.train_idx], minlength=4).tolist()
        assert counts == reference_counts(s.class_mix, 40)
        for c, want in enumerate(reference_counts(s.class_mix, 40)):
            idx = s.test_idx[y_test[s.test_idx] == c]
            assert len(idx) == want and len(np.unique(idx)) == want  # test pools are large


@pytest.mark.parametrize("k", [1, 2, 3])
def test_pathological_classes_per_client(labels, k):
    y_train, y_test = labels
    for s in split(labels, "pathological", classes_per_client=k):
        train_counts = np.bincount(y_train[s.train_idx], minlength=NUM_CLASSES)
        classes = np.flatnonzero(train_counts)
        assert len(classes) == k
        assert set(train_counts[classes].tolist()) <= {50 // k, 50 // k + 1}
        assert set(np.flatnonzero(np.bincount(y_test[s.test_idx], minlength=10))) == set(classes)
        expected = np.zeros(NUM_CLASSES)
        expected[classes] = 1 / k
        np.testing.assert_allclose(s.class_mix, expected)


def test_iid_samples_without_replacement_and_mix_is_empirical(labels):
    y_train = labels[0]
    for s in split(labels, "iid"):
        assert len(np.unique(s.train_idx)) == 50 and len(np.unique(s.test_idx)) == 30
        empirical = np.bincount(y_train[s.train_idx], minlength=NUM_CLASSES) / 50
        np.testing.assert_allclose(s.class_mix, empirical)


def test_uniform_chunks_are_disjoint(labels):
    splits = split(labels, "uniform", clients=40)  # 40 x 50 = all 2000 samples
    everything = np.concatenate([s.train_idx for s in splits])
    assert len(np.unique(everything)) == 2000
    with pytest.raises(ValueError, match="data.train_per_client"):
        split(labels, "uniform", clients=41)


@pytest.mark.parametrize(
    ("kw", "key"),
    [
        (dict(scheme="pathological", classes_per_client=11), "data.classes_per_client"),
        (dict(scheme="pathological", classes_per_client=3, train_per_client=2),
         "data.classes_per_client"),
        (dict(scheme="iid", train_per_client=2001), "data.train_per_client"),
        (dict(scheme="iid", test_per_client=801), "data.test_per_client"),
        (dict(scheme="uniform", test_per_client=801), "data.test_per_client"),
        (dict(scheme="dirichlet", alpha=0.0), "data.alpha"),
        (dict(scheme="shards"), "data.partition"),
        (dict(scheme="iid", clients=0), "data.clients"),
        (dict(scheme="dirichlet", train_per_client=0), "data.train_per_client"),
    ],
)
def test_impossible_requests_name_the_key(labels, kw, key):
    with pytest.raises(ValueError, match=key):
        split(labels, **kw)


def test_missing_class_that_a_client_needs():
    y_train = np.array([0, 1, 2] * 10)  # class 3 absent
    with pytest.raises(ValueError, match="class 3 has no samples in the train split"):
        partition_clients(y_train, np.arange(40) % 4, 4, scheme="pathological", clients=2,
                          train_per_client=8, test_per_client=4, classes_per_client=4)


def test_labels_out_of_range():
    with pytest.raises(ValueError, match="labels"):
        partition_clients(np.array([0, 5]), np.array([0, 1]), 3, scheme="iid", clients=1,
                          train_per_client=1, test_per_client=1)
