"""Counter-based shuffles: permutations, row independence, determinism (confide.shuffle)."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from confide.shuffle import epoch_orders

SEED = st.integers(min_value=0, max_value=(1 << 63) - 1)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(SEED, st.integers(0, 70)), min_size=1, max_size=6),
       st.integers(0, 3), st.integers(0, 5))
def test_each_row_is_a_permutation_of_the_clients_positions(clients, epochs, extra):
    seeds = torch.tensor([s for s, _ in clients])
    sizes = torch.tensor([n for _, n in clients])
    width = int(sizes.max()) + extra
    orders = epoch_orders(seeds, sizes, epochs, width)
    assert orders.shape == (len(clients), epochs, width)
    for c, (_, n) in enumerate(clients):
        for e in range(epochs):
            row = orders[c, e].tolist()
            assert sorted(row[:n]) == list(range(n))
            assert row[n:] == list(range(n, width))  # padding last, in order


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(SEED, st.integers(1, 50)), min_size=2, max_size=5))
def test_a_clients_order_does_not_depend_on_the_rest_of_the_cohort(clients):
    """What LocalTrainer.fit computes alone equals its row in the vectorized cohort call."""
    seeds = torch.tensor([s for s, _ in clients])
    sizes = torch.tensor([n for _, n in clients])
    together = epoch_orders(seeds, sizes, 2, int(sizes.max()) + 3)
    for c, (s, n) in enumerate(clients):
        alone = epoch_orders(torch.tensor([s]), torch.tensor([n]), 2, n)[0]
        assert torch.equal(together[c, :, :n], alone)


def test_seeds_and_epochs_give_different_orders_and_repeat_exactly():
    seeds = torch.arange(200) * 7919
    sizes = torch.full((200,), 60)
    a = epoch_orders(seeds, sizes, 2, 60)
    assert torch.equal(a, epoch_orders(seeds, sizes, 2, 60))
    assert len({tuple(r) for r in a[:, 0].tolist()}) == 200
    assert not torch.equal(a[:, 0], a[:, 1])


def test_positions_are_spread_uniformly():
    """Chi-square over where position 0 lands, 20,000 seeds x 10 slots (loose bound)."""
    seeds = torch.arange(20_000) * 1_000_003 + 17
    first = epoch_orders(seeds, torch.full((20_000,), 10), 1, 10)[:, 0, :]
    where = (first == 0).float().argmax(-1).numpy()
    counts = np.bincount(where, minlength=10)
    chi2 = ((counts - 2000) ** 2 / 2000).sum()
    assert chi2 < 40, counts  # 9 degrees of freedom: p < 1e-5 above 37.7
