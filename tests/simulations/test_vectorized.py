"""The vectorized executor gives sequential's results (float64, CPU), falls back when it must,
survives out-of-memory chunks, and spreads a cohort over torch.distributed ranks."""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from confide.app.simulate import build_simulation
from confide.client.trainer import TrainSettings
from confide.config import load_config
from confide.exceptions import DeviceError
from confide.shuffle import epoch_orders
from confide.simulations import vectorized as vec
from confide.simulations.vectorized.schedule import PartitionTable, chunk_schedule

BASE = [
    "run.rounds=3",
    "data.num_clients=10",
    "data.partition='dirichlet'",  # unequal client sizes
    "client.epochs=2",
    "client.batch_size=16",
    "client.device='cpu'",
    "model.hidden_units=32",
]
TOL = 1e-6


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _run(executor: str, extra=()):
    cfg = load_config(None, [*BASE, f"simulation.executor='{executor}'", *extra])
    sim = build_simulation(cfg)
    history = sim.coordinator.run()
    return sim, history


def _assert_same(extra=(), vec_extra=()):
    seq, h_seq = _run("sequential", extra)
    vsim, h_vec = _run("vectorized", [*extra, *vec_extra])
    a, b = seq.coordinator.params, vsim.coordinator.params
    rel = float((a - b).norm() / a.norm())
    assert rel < TOL, rel
    for ra, rb in zip(h_seq, h_vec, strict=True):
        assert ra["num_clients"] == rb["num_clients"]
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=TOL)
    return seq, vsim


def _sizes_differ(sim) -> bool:
    sizes = {len(p) for p in sim.partitions}
    return len(sizes) > 1


@pytest.mark.parametrize("extra", [
    pytest.param([], id="fedavg-sgd-momentum"),
    pytest.param(["client.momentum=0.0"], id="plain-sgd"),
    pytest.param(["client.momentum=0.0", "client.weight_decay=0.01"], id="sgd-weight-decay"),
    pytest.param(["client.optimizer='adam'", "client.weight_decay=0.001", "client.lr=0.01"],
                 id="adam"),
    pytest.param(["strategy.name='fedprox'", "strategy.mu=0.1"], id="fedprox"),
    pytest.param(["strategy.name='scaffold'", "client.momentum=0.0"], id="scaffold"),
    pytest.param(["strategy.name='scaffold'", "cohort.size=5"], id="scaffold-partial-cohort"),
    pytest.param(["simulation.dropout_rate=0.3"], id="fault-injection"),
    pytest.param(["privacy.mode='central'", "privacy.noise_multiplier=0.5",
                  "privacy.clip_norm=0.5", "cohort.size=5"], id="client-level-dp"),
    pytest.param(["client.batch_size=1000"], id="one-batch-per-epoch"),
    pytest.param(["secure_aggregation.enabled=true", "run.rounds=2"], id="secure-aggregation"),
])
def test_vectorized_matches_sequential(extra):
    seq, vsim = _assert_same(extra)
    assert _sizes_differ(seq)
    assert vsim.coordinator.executor.fallback_reason is None


@pytest.mark.parametrize("extra", [
    pytest.param([], id="fedavg"),
    pytest.param(["privacy.mode='central'", "privacy.noise_multiplier=0.5",
                  "privacy.clip_norm=0.5", "privacy.adaptive_clipping=true"],
                 id="central-dp-adaptive"),
    pytest.param(["strategy.name='scaffold'", "simulation.dropout_rate=0.3"],
                 id="scaffold-dropouts"),
])
def test_cohort_stays_on_the_device_without_host_reads(extra, monkeypatch):
    """run_cohort builds the batch with tensor operations only: no tensor is read back to the
    host (``item``, ``tolist``, ``cpu``, ``float()``/``int()``) inside it."""
    cfg = load_config(None, [*BASE, "simulation.executor='vectorized'", *extra])
    sim = build_simulation(cfg)
    coord = sim.coordinator
    instructions = coord.strategy.configure_round(1)
    tasks = [coord._task(cid, 1, instructions) for cid in range(10)]
    coord._inject_dropouts(tasks, 1)
    ex = coord.executor
    ex.run_cohort(tasks)  # warm-up: chunk sizing reads the free memory once

    def host_read(self, *args, **kwargs):
        raise AssertionError("a tensor was read back to the host inside run_cohort")

    for name in ("item", "tolist", "cpu", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    out = ex.run_cohort(tasks)
    monkeypatch.undo()
    assert out.batch.updates.device == coord.params.device
    assert len(out.batch) + len(out.failures) == len(tasks)
    assert set(out.batch.metrics) == {"train_loss", "train_accuracy"}
    assert out.batch.metrics["train_loss"].shape == (len(out.batch),)


def test_chunked_cohort_matches_sequential():
    _, vsim = _assert_same(vec_extra=["simulation.chunk_size=3"])
    assert vsim.coordinator.executor.trainer.chunk_limit(
        TrainSettings(epochs=2, batch_size=16, momentum=0.9)) == 3


@pytest.mark.parametrize("extra", [
    pytest.param(["strategy.name='fedprox'", "strategy.mu=0.1"], id="fedprox-momentum"),
    pytest.param(["client.optimizer='adam'", "client.lr=0.01"], id="adam"),
])
def test_masked_full_chunk_steps_match_sequential(extra, monkeypatch):
    """The CUDA-graph path's stepping run eagerly: fixed-shape steps with finished clients
    masked out, state kept in fixed buffers refilled for every chunk and round."""
    built = []
    real = vec.CohortTrainer._init_state

    def counting(self, *args, **kwargs):
        built.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(vec.CohortTrainer, "_init_state", counting)
    seq, _ = _run("sequential", extra)
    cfg = load_config(None, [*BASE, "simulation.executor='vectorized'",
                             "simulation.chunk_size=5", *extra])
    vsim = build_simulation(cfg)
    vsim.coordinator.executor.trainer._masked_steps = True
    vsim.coordinator.run()
    a, b = seq.coordinator.params, vsim.coordinator.params
    assert float((a - b).norm() / a.norm()) < TOL
    assert len(built) < 6  # 2 chunks x 3 rounds, mostly refilled in place


def test_dropped_clients_fail_like_sequential():
    extra = ["simulation.dropout_rate=0.5", "run.rounds=1"]
    seq, _ = _run("sequential", extra)
    vsim, _ = _run("vectorized", extra)
    tasks = [seq.coordinator._task(cid, 7, seq.coordinator.strategy.configure_round(7))
             for cid in range(10)]
    seq.coordinator._inject_dropouts(tasks, 7)
    assert any(t.drop_after_steps is not None for t in tasks)
    a = seq.coordinator.executor.run_cohort(tasks)
    b = vsim.coordinator.executor.run_cohort(tasks)
    assert a.failures == b.failures
    assert sorted(a.batch.client_ids) == sorted(b.batch.client_ids)
    ra = {r.client_id: r for r in a.batch.results()}
    for rb in b.batch.results():
        oa = ra[rb.client_id]
        assert torch.allclose(oa.update, rb.update, rtol=1e-9, atol=1e-12)
        assert oa.num_steps == rb.num_steps
        assert oa.metrics == pytest.approx(rb.metrics, rel=1e-9)


def test_clients_without_a_vectorised_optimizer_join_the_batch(caplog):
    """Tasks whose optimizer has no vectorised rule train sequentially; their rows are
    concatenated with the vectorised ones, on the same device, equal to sequential's."""
    seq, _ = _run("sequential", ["run.rounds=1"])
    vsim = build_simulation(load_config(None, [*BASE, "simulation.executor='vectorized'"]))
    coord = vsim.coordinator
    tasks = [coord._task(cid, 1, coord.strategy.configure_round(1)) for cid in range(10)]
    for t in tasks[::3]:  # LocalTrainer runs an unknown optimizer name as SGD
        t.settings = dataclasses.replace(t.settings, optimizer="sgd-nesterov-free")
    with caplog.at_level(logging.WARNING, logger="confide"):
        b = coord.executor.run_cohort(tasks).batch
    assert any("train sequentially" in r.message for r in caplog.records)
    a = seq.coordinator.executor.run_cohort(tasks).batch
    assert sorted(b.client_ids) == list(range(10)) and b.device == coord.params.device
    rows = {cid: i for i, cid in enumerate(a.client_ids)}
    for i, cid in enumerate(b.client_ids):
        assert torch.allclose(b.updates[i], a.updates[rows[cid]], rtol=1e-9, atol=1e-12)
        assert float(b.metrics["train_loss"][i]) == pytest.approx(
            float(a.metrics["train_loss"][rows[cid]]), rel=1e-9)


# --------------------------------------------------------------------------- DP-SGD

DP_SGD = ["privacy.mode='dp-sgd'", "privacy.noise_multiplier=0.8", "privacy.clip_norm=1.0",
          "client.epochs=1"]


@pytest.mark.parametrize("extra", [
    pytest.param([], id="sgd-momentum"),
    pytest.param(["strategy.name='scaffold'", "client.momentum=0.0",
                  "simulation.dropout_rate=0.3"], id="scaffold-fault-injection"),
    pytest.param(["client.optimizer='adam'", "client.lr=0.01"], id="adam"),
])
def test_dp_sgd_matches_opacus(extra):
    """Opacus's DP-SGD, one client at a time, and the nested-vmap version: same weights, same
    per-client privacy accounts."""
    seq, vsim = _assert_same([*DP_SGD, *extra])
    assert vsim.coordinator.executor.dp_sgd is not None
    eps_seq = seq.coordinator.privacy.client_epsilons()
    eps_vec = vsim.coordinator.privacy.client_epsilons()
    assert eps_seq and eps_seq == eps_vec
    assert [r["epsilon"] for r in seq.coordinator.history] == \
        [r["epsilon"] for r in vsim.coordinator.history]


def test_dp_sgd_lenet_matches_opacus(image_data):
    _assert_same([*DP_SGD, f"data.path='{image_data}'", "model.name='lenet'",
                  "data.num_clients=4", "run.rounds=2", "client.epochs=1",
                  "client.batch_size=10"], ["simulation.conv_lowering='unfold'"])


def test_dp_sgd_with_target_epsilon_falls_back(caplog):
    with caplog.at_level(logging.WARNING, logger="confide"):
        vsim = build_simulation(load_config(None, [
            *BASE, "simulation.executor='vectorized'", *DP_SGD, "privacy.target_epsilon=50"]))
    assert "target_epsilon" in vsim.coordinator.executor.fallback_reason


# --------------------------------------------------------------------------- convolutions


@pytest.fixture
def image_data(tmp_path):
    rng = np.random.default_rng(0)
    n = 240
    y = rng.integers(0, 4, size=n)
    x = rng.normal(size=(n, 1, 16, 16)).astype(np.float32)
    x[np.arange(n), 0, y * 3, y * 3] += 3.0  # learnable signal
    path = tmp_path / "images.npz"
    np.savez(path, x=x, y=y)
    return path


@pytest.mark.parametrize("lowering", ["grouped", "unfold"])
def test_lenet_matches_sequential(image_data, lowering):
    extra = [f"data.path='{image_data}'", "model.name='lenet'", "data.num_clients=6",
             "run.rounds=2", "client.epochs=1"]
    _, vsim = _assert_same(extra, [f"simulation.conv_lowering='{lowering}'"])
    trainer = vsim.coordinator.executor.trainer
    if lowering == "unfold":
        assert trainer.layout.unfolded == ("features.0", "features.3")
        assert isinstance(trainer.fmodel.features[0], vec.UnfoldConv2d)
    else:
        assert trainer.layout.unfolded == ()


def test_unfold_conv_equals_conv2d():
    torch.manual_seed(0)
    for stride, padding, dilation in [(1, 0, 1), (2, 1, 1), (1, 2, 2)]:
        conv = nn.Conv2d(3, 5, 3, stride=stride, padding=padding, dilation=dilation)
        x = torch.randn(4, 3, 11, 9)
        low = vec.lower_convolutions(nn.Sequential(conv), ["0"])[0]
        assert torch.allclose(low(x), conv(x), atol=1e-12)


# --------------------------------------------------------------------------- models


class Frozen(nn.Module):
    """A frozen layer, an unused one and a buffer: only some weights train."""

    def __init__(self, d: int, k: int) -> None:
        super().__init__()
        self.inp = nn.Linear(d, 16)
        self.inp.weight.requires_grad_(False)
        self.unused = nn.Linear(3, 3)
        self.register_buffer("scale", torch.full((16,), 0.5))
        self.out = nn.Linear(16, k)

    def forward(self, x):
        return self.out(torch.relu(self.inp(x)) * self.scale)


def frozen_model(*, input_shape, num_classes):
    return Frozen(int(np.prod(input_shape)), num_classes)


def batchnorm_model(*, input_shape, num_classes):
    d = int(np.prod(input_shape))
    return nn.Sequential(nn.Linear(d, 16), nn.BatchNorm1d(16), nn.ReLU(),
                         nn.Linear(16, num_classes))


def dropout_model(*, input_shape, num_classes):
    d = int(np.prod(input_shape))
    return nn.Sequential(nn.Linear(d, 16), nn.Dropout(0.2), nn.ReLU(), nn.Linear(16, num_classes))


def item_model(*, input_shape, num_classes):
    class UsesItem(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(int(np.prod(input_shape)), num_classes)

        def forward(self, x):
            return self.fc(x) * float(x.abs().max().item() > -1)

    return UsesItem()


def test_frozen_unused_and_buffers_match_sequential():
    _, vsim = _assert_same([f"model.name='{__name__}:frozen_model'",
                            "client.weight_decay=0.01", "strategy.name='scaffold'"])
    layout = vsim.coordinator.executor.trainer.layout
    trained = {e.name for e in layout.trainable}
    assert trained == {"inp.bias", "out.weight", "out.bias"}


@pytest.mark.parametrize(("factory", "why"), [
    ("batchnorm_model", "BatchNorm"),
    ("dropout_model", "dropout"),
    ("item_model", "vmap"),
])
def test_fallback_to_sequential_says_why(factory, why, caplog):
    # one batch per epoch: BatchNorm cannot train on a last batch of one sample
    extra = [f"model.name='{__name__}:{factory}'", "run.rounds=1", "client.batch_size=1000"]
    with caplog.at_level(logging.WARNING, logger="confide"):
        vsim, _ = _run("vectorized", extra)
    reason = vsim.coordinator.executor.fallback_reason
    assert reason is not None and why in reason
    assert any("falling back to sequential" in r.message and why in r.message
               for r in caplog.records)
    if factory != "dropout_model":  # dropout draws from the global RNG
        seq, _ = _run("sequential", extra)
        assert torch.equal(seq.coordinator.params, vsim.coordinator.params)


def test_blocker_names_tied_weights():
    a = nn.Linear(4, 4)
    model = nn.Sequential(a, nn.ReLU(), nn.Linear(4, 4))
    model[2].weight = a.weight
    assert "tied" in vec.vectorization_blocker(model)


# --------------------------------------------------------------------------- memory


def test_out_of_memory_halves_the_chunk(monkeypatch, caplog):
    calls = []
    real = vec.CohortTrainer.train_chunk

    def flaky(self, jobs, *args, **kwargs):
        calls.append(len(jobs))
        if len(jobs) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, jobs, *args, **kwargs)

    monkeypatch.setattr(vec.CohortTrainer, "train_chunk", flaky)
    with caplog.at_level(logging.INFO, logger="confide"):
        _assert_same(vec_extra=["simulation.chunk_size=8"])
    assert calls[0] == 5  # 10 clients in two even chunks of at most 8
    assert calls[1] == 2  # halved after the out-of-memory error
    assert max(calls[2:]) <= 2
    assert any("out of memory" in r.message for r in caplog.records)


def test_out_of_memory_for_one_client_is_a_device_error(monkeypatch):
    def always(self, jobs, *args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(vec.CohortTrainer, "train_chunk", always)
    cfg = load_config(None, [*BASE, "simulation.executor='vectorized'", "run.rounds=1"])
    sim = build_simulation(cfg)
    with pytest.raises(DeviceError, match="does not fit"):
        sim.coordinator.run()


def test_chunk_size_follows_free_memory(monkeypatch):
    cfg = load_config(None, [*BASE, "simulation.executor='vectorized'"])
    trainer = build_simulation(cfg).coordinator.executor.trainer
    s = TrainSettings(epochs=1, batch_size=16)
    per_client = trainer.client_bytes(s)
    assert per_client > trainer.layout.trainable_numel * 8
    monkeypatch.setattr(vec.CohortTrainer, "free_bytes", lambda self: 10 * per_client)
    trainer._chunk_limit.clear()
    assert trainer.chunk_limit(s) == 10


# --------------------------------------------------------------------------- schedule


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), batch=st.integers(1, 50), epochs=st.integers(1, 3),
       seed=st.integers(0, 2**31))
def test_client_batches_cover_every_sample_each_epoch(n, batch, epochs, seed):
    part = np.arange(100, 100 + n)
    rows = vec.client_batches(part, seed, TrainSettings(epochs=epochs, batch_size=batch))
    per_epoch = -(-n // batch)
    assert rows.shape == (epochs * per_epoch, min(batch, n))
    assert rows.shape[0] == vec.num_local_steps(n, TrainSettings(epochs=epochs,
                                                                 batch_size=batch))
    orders = epoch_orders(torch.tensor([seed]), torch.tensor([n]), epochs, n)[0]
    for e in range(epochs):
        block = rows[e * per_epoch:(e + 1) * per_epoch].reshape(-1)
        taken = block[block >= 0]
        # LocalTrainer.fit's order: one permutation per epoch, batches in order, none dropped
        assert sorted(taken.tolist()) == part.tolist()
        assert (taken == part[orders[e].numpy()]).all()


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 40), min_size=1, max_size=8), batch=st.integers(1, 20),
       epochs=st.integers(1, 3), seed=st.integers(0, 2**31))
def test_chunk_schedule_stacks_each_clients_batches(sizes, batch, epochs, seed):
    """The chunk's [clients, steps, width] schedule holds every client's own batches."""
    s = TrainSettings(epochs=epochs, batch_size=batch)
    offsets = np.cumsum([0, *sizes])
    samples = np.random.default_rng(seed).permutation(int(offsets[-1]))  # not contiguous
    parts = [samples[offsets[i]:offsets[i + 1]] for i in range(len(sizes))]
    table = PartitionTable(parts, torch.device("cpu"))
    assert table.flat.numel() == sum(sizes) + 1  # flat, not clients x largest partition
    # the chunk's clients in another order than the table's (ids, not positions)
    ids = [int(c) for c in np.random.default_rng(seed + 1).permutation(len(sizes))]
    jobs = [vec.Job(slot=k, client_id=c, seed=seed + c, num_samples=sizes[c],
                    num_steps=vec.num_local_steps(sizes[c], s)) for k, c in enumerate(ids)]
    sched = chunk_schedule(jobs, table, s, torch.device("cpu"), torch.float64)
    for i, job in enumerate(jobs):
        own = vec.client_batches(parts[job.client_id], job.seed, s)
        steps, width = own.shape
        got = sched.index[i, :steps, :width].numpy()
        real = own >= 0
        assert (got[real] == own[real]).all()
        counts = torch.as_tensor(real.sum(1), dtype=torch.float64)
        assert torch.equal(sched.count[i, :steps], counts)
        assert float(sched.weight[i].sum()) == pytest.approx(steps)  # each batch's mean
        assert float(sched.count[i, steps:].sum()) == 0  # finished: no samples after


@settings(max_examples=40, deadline=None)
@given(steps=st.lists(st.integers(0, 30), min_size=1, max_size=40),
       world=st.integers(1, 5))
def test_shard_jobs_assigns_each_job_once_and_balances(steps, world):
    jobs = [vec.Job(slot=i, client_id=i, seed=i, num_samples=s, num_steps=s)
            for i, s in enumerate(steps)]
    shards = vec.shard_jobs(jobs, world)
    assert sorted(j.slot for s in shards for j in s) == list(range(len(jobs)))
    loads = [sum(max(1, j.num_steps) for j in s) for s in shards]
    assert max(loads) - min(loads) <= max(max(1, s) for s in steps)


# --------------------------------------------------------------------------- options


def test_bf16_keeps_accuracy():
    extra = ["run.rounds=5", "data.partition='iid'"]
    torch.set_default_dtype(torch.float32)
    _, h32 = _run("vectorized", extra)
    _, h16 = _run("vectorized", [*extra, "simulation.mixed_precision='bf16'"])
    assert h32[-1]["test_accuracy"] > 0.8
    assert abs(h32[-1]["test_accuracy"] - h16[-1]["test_accuracy"]) < 0.03


def test_import_pulls_no_optional_runtime():
    code = ("import sys, confide.app.simulate, confide.simulations.vectorized; "
            "bad = [m for m in ('opacus', 'flwr', 'cryptography', 'ray') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
def test_two_ranks_with_gloo_match_sequential():
    """torch.distributed scale-out, two processes on the CPU (NCCL on GPUs)."""
    seq, vsim = _assert_same(["strategy.name='scaffold'", "simulation.dropout_rate=0.2"],
                             ["simulation.world_size=2"])
    assert vsim.coordinator.executor._pool is None  # closed at the end of run()
