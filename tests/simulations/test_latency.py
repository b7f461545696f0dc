"""The latency model and the virtual clock: deterministic, heavy-tailed, validated traces."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from confide.config import load_config
from confide.exceptions import ConfigError
from confide.simulations.latency import (
    LatencyModel,
    LogNormalLatency,
    TraceLatency,
    VirtualClock,
    windows,
)


def _model(*overrides):
    return LatencyModel.from_config(load_config(None, list(overrides)))


def test_same_seed_same_durations_other_seed_others():
    kwargs = {"num_samples": 60, "bytes_up": 2e5, "bytes_down": 2e5}
    a = _model("run.seed=3").durations(range(50), 4, **kwargs)
    b = _model("run.seed=3").durations(range(50), 4, **kwargs)
    c = _model("run.seed=4").durations(range(50), 4, **kwargs)
    assert np.array_equal(a.total, b.total) and np.array_equal(a.up_s, b.up_s)
    assert not np.array_equal(a.total, c.total)
    d = _model("run.seed=3").durations(range(50), 5, **kwargs)
    assert not np.array_equal(a.train_s, d.train_s)  # fresh jitter per task


def test_a_clients_time_does_not_depend_on_who_else_is_asked():
    model = _model()
    both = model.durations([7, 3, 11], [2, 0, 5], num_samples=[10, 20, 30], bytes_up=1e5,
                           bytes_down=[1e4, 2e4, 3e4])
    alone = model.durations([3], 0, num_samples=20, bytes_up=1e5, bytes_down=2e4)
    assert both.total[1] == alone.total[0]


def test_the_model_scales_with_work_and_bytes():
    model = LogNormalLatency(seed=1, rtt_s=0.0)
    one = model.durations(range(20), 0, num_samples=10, bytes_up=1e5, bytes_down=1e5)
    two = model.durations(range(20), 0, num_samples=20, bytes_up=2e5, bytes_down=4e5)
    assert np.allclose(two.train_s, 2 * one.train_s)
    assert np.allclose(two.up_s, 2 * one.up_s) and np.allclose(two.down_s, 4 * one.down_s)
    quiet = LogNormalLatency(seed=1, speed_sigma=0, jitter_sigma=0, network_sigma=0, rtt_s=0.5)
    flat = quiet.durations(range(5), 0, num_samples=100, bytes_up=1.25e6, bytes_down=5e6)
    assert np.allclose(flat.train_s, 0.5) and np.allclose(flat.up_s, 1.5)
    assert np.allclose(flat.down_s, 1.5) and np.allclose(flat.total, 3.5)


def test_every_latency_key_reaches_the_model():
    model = _model("simulation.latency_train_s_per_sample=0.5", "simulation.latency_rtt_s=0.25",
                   "simulation.latency_speed_sigma=0", "simulation.latency_jitter_sigma=0",
                   "simulation.latency_network_sigma=0", "simulation.latency_up_bytes_per_s=10",
                   "simulation.latency_down_bytes_per_s=100")
    d = model.durations([0, 1], 3, num_samples=4, bytes_up=20, bytes_down=200)
    assert d.train_s.tolist() == [2.0, 2.0] and d.up_s.tolist() == [2.25, 2.25]
    assert d.down_s.tolist() == [2.25, 2.25]


def test_defaults_are_heavy_tailed_around_the_documented_medians():
    model = _model()
    d = model.durations(range(4000), 0, num_samples=100, bytes_up=1.25e6, bytes_down=0)
    speed = d.train_s / (100 * 0.005)
    # log-normal with sigma sqrt(0.7^2 + 0.25^2): median 1, 95th percentile ~ exp(1.645*0.743)
    assert np.median(speed) == pytest.approx(1.0, rel=0.08)
    assert np.percentile(speed, 95) / np.median(speed) == pytest.approx(3.39, rel=0.15)
    assert np.median(d.up_s - 0.1) == pytest.approx(1.0, rel=0.1)
    assert d.total.max() > 5 * np.median(d.total)  # stragglers exist


def test_per_client_speed_persists_across_tasks():
    model = LogNormalLatency(seed=0, jitter_sigma=0.0)
    a = model.durations(range(30), 0, num_samples=10)
    b = model.durations(range(30), 9, num_samples=10)
    assert np.array_equal(a.train_s, b.train_s)


def test_bad_arguments_are_refused():
    model = _model()
    with pytest.raises(ValueError, match="one value per client"):
        model.durations([1, 2], 0, num_samples=[1, 2, 3])
    with pytest.raises(ValueError, match="non-negative"):
        model.durations([1], 0, bytes_up=-1)
    with pytest.raises(ValueError, match="task_index"):
        model.durations([1], -1)
    with pytest.raises(ConfigError, match="positive"):
        LogNormalLatency(up_bytes_per_s=0)


# --------------------------------------------------------------------------- traces


def _trace(tmp_path, text, name="trace.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_trace_is_replayed_row_by_task(tmp_path):
    path = _trace(tmp_path, "client_id,train_s,up_s,down_s,device\n0,1.0,0.5,0.25,pixel\n"
                            "1,2,1,1,moto\n0,3.0,0.5,0.25,pixel\n")
    model = LatencyModel.from_config(load_config(None, [
        "simulation.latency='trace'", f"simulation.latency_trace='{path}'",
        "data.num_clients=2", "cohort.size=2"]))
    assert isinstance(model, TraceLatency)
    d = model.durations([0, 1, 0], [0, 7, 1], num_samples=99, bytes_up=1e9)
    assert d.train_s.tolist() == [1.0, 2.0, 3.0]  # client 0's task 1 is its second row
    assert d.total.tolist() == [1.75, 4.0, 3.75]
    assert model.durations([0], 2).train_s.tolist() == [1.0]  # rows repeat


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("client_id,train_s,up_s\n0,1,1\n", "lacks the column 'down_s'"),
        ("client_id,train_s,up_s,down_s\n", "has no rows"),
        ("client_id,train_s,up_s,down_s\nx,1,1,1\n", "line 2: client_id = 'x' is not a whole"),
        ("client_id,train_s,up_s,down_s\n0,1,1,1\n-1,1,1,1\n", "line 3: client_id = -1"),
        ("client_id,train_s,up_s,down_s\n0,fast,1,1\n", "train_s = 'fast' is not a number"),
        ("client_id,train_s,up_s,down_s\n0,1,-2,1\n", "up_s = -2.0 must be finite"),
        ("client_id,train_s,up_s,down_s\n0,1,1,inf\n", "down_s = inf must be finite"),
        ("client_id,train_s,up_s,down_s\n0,1,1\n", "down_s = None is not a number"),
        ("client_id,train_s,up_s,down_s\n0,1,1,1\n", "no row for client 1 (19 of"),
    ],
)
def test_bad_traces_are_one_line_errors(tmp_path, text, fragment):
    path = _trace(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        TraceLatency.from_csv(path, num_clients=20)
    assert fragment in str(info.value) and "\n" not in str(info.value)
    assert str(path) in str(info.value)


def test_missing_or_binary_trace(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        TraceLatency.from_csv(tmp_path / "nope.csv")
    binary = tmp_path / "b.csv"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="not UTF-8"):
        TraceLatency.from_csv(binary)


def test_a_client_outside_the_trace_is_named():
    model = TraceLatency({0: np.array([[1.0, 1.0, 1.0]])})
    with pytest.raises(ConfigError, match="no row for client 5"):
        model.durations([0, 5], 0)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["simulation.latency='trace'"], "needs simulation.latency_trace"),
        (["simulation.latency_trace='t.csv'"], "simulation.latency is 'lognormal'"),
        (["simulation.latency='gamma'"], "choose one of"),
        (["simulation.latency_speed_sigma=-1"], "out of range"),
        (["simulation.latency_up_bytes_per_s=0"], "out of range"),
    ],
)
def test_latency_config_is_checked(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert fragment in str(info.value) and "\n" not in str(info.value)


# --------------------------------------------------------------------------- the clock


def test_clock_pops_in_finish_order_and_advances():
    clock = VirtualClock()
    assert clock.start(1, duration=5.0) == 5.0
    clock.start(2, duration=1.0)
    clock.start(3, duration=1.0, at=0.0)  # ties finish in start order
    assert clock.peek() == (1.0, 2) and len(clock) == 3 and clock.in_flight(1)
    assert clock.pop_finished() == (1.0, 2) and clock.now == 1.0
    assert clock.pop_finished() == (1.0, 3)
    clock.start(2, duration=10.0)  # starts at now = 1.0
    assert clock.pop_finished() == (5.0, 1) and clock.now == 5.0
    assert clock.pop_finished() == (11.0, 2) and len(clock) == 0
    with pytest.raises(IndexError):
        clock.pop_finished()
    assert clock.peek() is None


def test_clock_refuses_the_impossible():
    clock = VirtualClock(start=10.0)
    with pytest.raises(ValueError, match="before now"):
        clock.start(0, duration=1.0, at=9.0)
    with pytest.raises(ValueError, match="duration"):
        clock.start(0, duration=float("nan"))
    clock.start(0, duration=1.0)
    with pytest.raises(ValueError, match="already training"):
        clock.start(0, duration=1.0)
    with pytest.raises(ValueError, match="back"):
        clock.advance(3.0)


def test_pop_until_is_a_synchronous_deadline():
    clock = VirtualClock()
    for cid, d in enumerate([3.0, 1.0, 7.0, 2.0]):
        clock.start(cid, duration=d)
    assert clock.pop_until(2.5) == [(1.0, 1), (2.0, 3)]
    assert clock.now == 2.5 and len(clock) == 2
    assert clock.pop_until(100.0) == [(3.0, 0), (7.0, 2)] and clock.now == 100.0


@settings(max_examples=60, deadline=None)
@given(durations=st.lists(st.floats(0, 1e4), min_size=1, max_size=40),
       seed=st.integers(0, 2**32 - 1))
def test_async_loop_sees_every_finish_in_order(durations, seed):
    # An asynchronous driver: keep `concurrency` clients busy, restart each when it finishes.
    rng = np.random.default_rng(seed)
    clock = VirtualClock()
    for cid, d in enumerate(durations):
        clock.start(cid, duration=d)
    seen, last = [], 0.0
    for _ in range(3 * len(durations)):
        t, cid = clock.pop_finished()
        assert t >= last and clock.now == t
        last = t
        seen.append(cid)
        clock.start(cid, duration=float(rng.exponential(10.0)))
    assert len(clock) == len(durations)  # every client busy again, none twice
    assert clock.peek()[0] >= last  # nothing left behind that finished before the last pop


@settings(max_examples=100, deadline=None)
@given(times=st.lists(st.floats(0, 100), max_size=60), width=st.floats(0, 20))
def test_windows_partition_the_starts(times, width):
    groups = windows(times, width)
    flat = np.concatenate(groups) if groups else np.array([], dtype=int)
    assert sorted(flat.tolist()) == list(range(len(times)))  # each start exactly once
    arr = np.asarray(times)
    for g in groups:
        span = arr[g]
        assert np.all(np.diff(span) >= 0)  # sorted within a window
        assert span[-1] - span[0] < width or span[-1] == span[0]
    for a, b in zip(groups, groups[1:], strict=False):
        assert arr[b[0]] >= arr[a[0]] + width or width == 0  # the next window opens later
        assert arr[b[0]] > arr[a[-1]]


def test_windows_examples():
    got = windows([0.0, 0.5, 1.0, 1.0, 3.0, 2.9, 10.0], 1.0)
    assert [g.tolist() for g in got] == [[0, 1], [2, 3], [5, 4], [6]]
    assert [g.tolist() for g in windows([2.0, 1.0, 2.0], 0.0)] == [[1], [0, 2]]
    assert windows([], 1.0) == []
    with pytest.raises(ValueError):
        windows([1.0], -1.0)
