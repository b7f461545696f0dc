"""The cyclic cohort order: fixed seeded groups, each client exactly every N // size rounds."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from confide.server.sampling import cyclic_groups, sample_cohort


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300), st.integers(1, 40), st.integers(0, 2 ** 31))
def test_cyclic_order_partitions_clients_and_keeps_the_separation(num_clients, size, seed):
    groups = cyclic_groups(num_clients=num_clients, size=size, seed=seed)
    period = max(1, num_clients // size)
    assert len(groups) == period
    assert np.array_equal(np.sort(np.concatenate(groups)), np.arange(num_clients))
    assert all(len(g) >= min(size, num_clients) for g in groups)
    seen: dict[int, list[int]] = {}
    for rnd in range(1, 3 * period + 1):
        cohort = sample_cohort(num_clients=num_clients, size=size, method="cyclic", seed=seed,
                               server_round=rnd)
        assert np.array_equal(cohort, groups[(rnd - 1) % period])
        for cid in cohort:
            seen.setdefault(int(cid), []).append(rnd)
    # every client comes back exactly every `period` rounds
    assert all(np.all(np.diff(rounds) == period) for rounds in seen.values())
    assert len(seen) == num_clients


def test_cyclic_order_is_seeded():
    a = cyclic_groups(num_clients=100, size=10, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, cyclic_groups(num_clients=100, size=10,
                                                                     seed=1), strict=True))
    b = cyclic_groups(num_clients=100, size=10, seed=2)
    assert not all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_cyclic_order_respects_availability():
    group = sample_cohort(num_clients=20, size=5, method="cyclic", seed=0, server_round=1)
    cohort = sample_cohort(num_clients=20, size=5, method="cyclic", seed=0, server_round=1,
                           available=group[:2])
    assert np.array_equal(cohort, group[:2])
