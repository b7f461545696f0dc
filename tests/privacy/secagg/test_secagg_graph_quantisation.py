"""The neighbourhood graph, its parameters, and quantisation into Z_{2^b}."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from confide.exceptions import ConfigError, ProtocolError
from confide.privacy.secagg.graph import bell_degree, graph_parameters, harary_graph
from confide.privacy.secagg.quantisation import Quantiser, centred_lift, check_capacity


@settings(max_examples=40, deadline=None)
@given(n=st.integers(3, 80), k=st.integers(2, 90))
def test_harary_graph_is_symmetric_regular_and_loop_free(n, k):
    ids = [7 * i + 3 for i in range(n)]
    g = harary_graph(ids, k)
    degree = min(k + k % 2, n - 1)
    for c, nb in g.items():
        assert c not in nb
        assert len(nb) == degree
        for other in nb:
            assert c in g[other]


def test_harary_graph_is_random():
    ids = list(range(50))
    assert len({tuple(harary_graph(ids, 6)[0]) for _ in range(10)}) > 1


@pytest.mark.parametrize("n", [3, 10, 20, 100, 500, 5000])
@pytest.mark.parametrize("dropout", [0.0, 0.1, 0.3])
def test_graph_parameters_are_admissible(n, dropout):
    k, t = graph_parameters(n, dropout_rate=dropout, corrupt_rate=0.05)
    assert 2 <= t <= k <= n - 1
    assert k >= min(n - 1, bell_degree(n))
    # every client keeps at least t neighbours when exactly `dropout` of the cohort leaves
    if k == n - 1:
        assert n - 1 - int(dropout * n) >= t


def test_graph_degree_grows_with_the_dropout_it_tolerates():
    k10, _ = graph_parameters(500, dropout_rate=0.1, corrupt_rate=0.05)
    k30, _ = graph_parameters(500, dropout_rate=0.3, corrupt_rate=0.05)
    assert bell_degree(500) <= k10 < k30 < 100


def test_impossible_rates_are_config_errors():
    with pytest.raises(ConfigError, match="exceeds 0.9"):
        graph_parameters(100, dropout_rate=0.6, corrupt_rate=0.4)
    with pytest.raises(ConfigError, match="at least 3"):
        graph_parameters(2, dropout_rate=0.1, corrupt_rate=0.0)


# --------------------------------------------------------------------------- quantisation


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(16, 62), n=st.integers(1, 200), clip=st.floats(0.01, 100),
       weight=st.integers(0, 50), dim=st.integers(1, 40), seed=st.integers(0, 2**32))
def test_decode_encode_is_within_one_rounding_step(bits, n, clip, weight, dim, seed):
    rng = np.random.default_rng(seed)
    try:
        q = Quantiser(bits=bits, clipping_range=clip, max_weight=50, cohort_size=n)
    except ConfigError:
        return  # a bit width too small for this cohort is refused (tested below)
    update = rng.normal(scale=clip, size=dim)
    aux = rng.normal(scale=clip, size=dim)
    words = q.encode(update, weight, [aux], rng)
    got_update, got_weight, (got_aux,) = q.decode(words, dim=dim, num_aux=1)
    assert got_weight == weight
    clipped = np.clip(update, -clip, clip)
    assert np.all(np.abs(got_update - weight * clipped) <= 1 / q.update_scale + 1e-9 * clip)
    assert np.all(np.abs(got_aux - np.clip(aux, -clip, clip)) <= 1 / q.aux_scale + 1e-9 * clip)


def test_stochastic_rounding_is_unbiased():
    q = Quantiser(bits=16, clipping_range=1.0, max_weight=1, cohort_size=1000)
    assert q.levels == 32  # (2^15 - 1) // 1000
    x = np.full(200_000, 0.3 / q.aux_scale)  # 0.3 of one step
    words = q.encode(np.zeros(x.size), 0, [x], np.random.default_rng(0))
    _, _, (back,) = q.decode(words, dim=x.size, num_aux=1)
    assert abs(back.mean() * q.aux_scale - 0.3) < 0.01


@given(bits=st.integers(10, 40), n=st.integers(1, 64), sign=st.sampled_from([-1, 1]))
@settings(max_examples=40, deadline=None)
def test_the_sum_of_a_full_cohort_at_the_extremes_never_overflows(bits, n, sign):
    try:
        q = Quantiser(bits=bits, clipping_range=1.0, max_weight=3, cohort_size=n)
    except ConfigError:
        return
    words = [q.encode(np.full(4, sign * 5.0), 3, [], np.random.default_rng(i))
             for i in range(n)]
    total = np.zeros_like(words[0])
    for w in words:
        total += w
    total &= total.dtype.type((1 << bits) - 1)
    update, weight, _ = q.decode(total, dim=4, num_aux=0)
    assert weight == 3 * n
    assert np.allclose(update, sign * 3.0 * n)
    assert np.all(np.abs(centred_lift(total, bits)) < 2 ** (bits - 1))


def test_capacity_check_names_the_bits_needed():
    with pytest.raises(ConfigError, match="too small for 500 clients.*bits >= 20"):
        check_capacity(cohort_size=500, bits=16, max_weight=1000)
    assert check_capacity(cohort_size=500, bits=20, max_weight=1000) >= 1000
    assert check_capacity(cohort_size=500, bits=32, max_weight=1000) == (2**31 - 1) // 500


def test_bad_inputs_are_refused():
    q = Quantiser(bits=32, clipping_range=1.0, max_weight=10, cohort_size=3)
    with pytest.raises(ProtocolError, match="non-finite"):
        q.encode(np.array([np.nan]), 1, [], np.random.default_rng(0))
    with pytest.raises(ProtocolError, match="weight"):
        q.encode(np.zeros(2), 11, [], np.random.default_rng(0))
    with pytest.raises(ProtocolError, match="same length"):
        q.encode(np.zeros(2), 1, [np.zeros(3)], np.random.default_rng(0))
