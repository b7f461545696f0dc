import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from confide.exceptions import DataError
from confide.simulations.partition import partition, partition_report


@settings(max_examples=40, deadline=None)
@given(
    n_samples=st.integers(50, 400),
    n_classes=st.integers(2, 10),
    n_clients=st.integers(2, 12),
    method=st.sampled_from(["iid", "dirichlet", "shards"]),
    alpha=st.floats(0.1, 10),
    seed=st.integers(0, 2**31),
)
def test_every_sample_exactly_once(n_samples, n_classes, n_clients, method, alpha, seed):
    y = np.random.default_rng(seed).integers(0, n_classes, n_samples)
    y[:n_classes] = np.arange(n_classes)  # every class present
    try:
        parts = partition(y, num_clients=n_clients, method=method, seed=seed, alpha=alpha,
                          classes_per_client=min(2, n_classes), min_samples=1)
    except DataError:
        return  # an impossible request is an error, never a wrong partition
    assert len(parts) == n_clients
    joined = np.concatenate(parts)
    assert np.array_equal(np.sort(joined), np.arange(n_samples))


def test_seeded_and_seed_sensitive():
    y = np.repeat(np.arange(10), 50)
    a = partition(y, num_clients=8, method="dirichlet", seed=1, alpha=0.5)
    b = partition(y, num_clients=8, method="dirichlet", seed=1, alpha=0.5)
    c = partition(y, num_clients=8, method="dirichlet", seed=2, alpha=0.5)
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c, strict=True))


def test_shards_give_k_classes():
    y = np.repeat(np.arange(10), 100)
    parts = partition(y, num_clients=10, method="shards", seed=0, classes_per_client=2)
    report = partition_report(parts, y, 10)
    assert all(sum(1 for c in counts if c) == 2 for counts in report.label_counts)
    assert sum(report.sizes) == len(y)


def test_dirichlet_small_alpha_is_skewed_and_respects_min_size():
    y = np.repeat(np.arange(10), 200)
    parts = partition(y, num_clients=10, method="dirichlet", seed=0, alpha=0.1, min_samples=10)
    report = partition_report(parts, y, 10)
    assert min(report.sizes) >= 10
    dominant = [max(c) / sum(c) for c in report.label_counts]
    assert np.mean(dominant) > 0.4


def test_natural_partition_needs_client_ids():
    y = np.zeros(10, dtype=int)
    with pytest.raises(DataError, match="natural"):
        partition(y, num_clients=2, method="natural", seed=0)
    parts = partition(y, num_clients=2, method="natural", seed=0,
                      natural=np.array([0, 1] * 5))
    assert [len(p) for p in parts] == [5, 5]
    with pytest.raises(DataError, match="set data.num_clients = 2"):
        partition(y, num_clients=3, method="natural", seed=0, natural=np.array([0, 1] * 5))


def test_too_many_clients():
    with pytest.raises(DataError, match="larger than the dataset"):
        partition(np.zeros(5, dtype=int), num_clients=6, method="iid", seed=0)
