"""The CPU thread policy: never more busy threads than cores, and the user's choice kept."""

import pytest
import torch

from confide import threads
from confide.config import load_config
from confide.exceptions import ConfigError


@pytest.fixture
def torch_default(monkeypatch):
    """Torch as a fresh process sees it: one thread per core, no thread variables set."""
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "_applied", None)
    torch.set_num_threads(threads.available_cores())
    yield
    torch.set_num_threads(before)


def test_auto_gives_one_thread_per_concurrent_client(torch_default):
    policy = threads.apply_thread_policy("auto", quiet=True)
    assert policy.intra_op == 1 and torch.get_num_threads() == 1
    assert "one intra-op thread" in policy.describe()
    # Applied twice in one process (two runs): still the policy, not "the user's choice".
    again = threads.apply_thread_policy("auto", quiet=True)
    assert again.intra_op == 1 and again.reason.startswith("auto")


def test_a_count_forces_that_many_threads(torch_default):
    policy = threads.apply_thread_policy(3, quiet=True)
    assert policy.intra_op == 3 and torch.get_num_threads() == 3


def test_an_explicit_omp_num_threads_is_kept(torch_default, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    torch.set_num_threads(2)
    policy = threads.apply_thread_policy("auto", quiet=True)
    assert policy.intra_op == 2 and torch.get_num_threads() == 2
    assert "OMP_NUM_THREADS=2" in policy.reason


def test_a_users_set_num_threads_is_kept(torch_default):
    wanted = threads.available_cores() + 3
    torch.set_num_threads(wanted)
    policy = threads.apply_thread_policy("auto", quiet=True)
    assert policy.intra_op == wanted and "set_num_threads" in policy.reason


def test_accelerator_runs_keep_one_host_thread(torch_default):
    assert threads.choose_threads("auto", device_type="cuda").intra_op == 1


def test_policy_is_one_note_of_the_run(torch_default):
    from confide.app.simulate import build_simulation

    sim = build_simulation(load_config(None, ["data.num_clients=4", "client.device='cpu'"]))
    assert len([n for n in sim.notes if n.startswith("CPU threads")]) == 1
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize("value", ["2", "'auto'"])
def test_config_accepts_auto_and_counts(value):
    cfg = load_config(None, [f"simulation.cpu_threads={value}"])
    assert cfg.simulation.cpu_threads in (2, "auto")


@pytest.mark.parametrize(("value", "fragment"), [("0", "out of range"), ("'many'", "wrong type")])
def test_config_refuses_bad_thread_counts(value, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, [f"simulation.cpu_threads={value}"])
