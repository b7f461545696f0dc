"""CPU thread policy: never more busy threads than cores.

Torch's default gives every process one intra-op thread per core it may run on. On a small
machine that another process already keeps busy this is the slow case, not the fast one: an
intra-op thread parked on a busy core holds up every other thread of the same op at the next
barrier (a tiny ``nn.Linear`` took 0.05 ms with one thread and 5.9 ms with two while another
process used the second of two cores; ``benchmarks/cpu_default_job.py`` measures the whole
default job). The models a federation trains per client are small, so the policy gives each
concurrently trained client one intra-op thread; clients run in parallel only in executors
that train several at once (``concurrent_clients``), never more than there are cores.

``simulation.cpu_threads = "auto"`` (the default) applies that policy unless the user chose
already: an ``OMP_NUM_THREADS`` in the environment, or a ``torch.set_num_threads`` call made
before the run, is kept. An integer forces that many intra-op threads (``--set
simulation.cpu_threads=2`` restores torch's default on a 2-core machine).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from confide.exceptions import ConfigError

__all__ = ["ThreadPolicy", "available_cores", "choose_threads", "apply_thread_policy"]

log = logging.getLogger("confide")

#: the intra-op thread count this module set last (to tell our setting from the user's)
_applied: int | None = None


@dataclass(frozen=True)
class ThreadPolicy:
    """How many intra-op threads torch uses, and why."""

    intra_op: int
    concurrent_clients: int
    cores: int
    reason: str

    def describe(self) -> str:
        """One line for the log."""
        return (f"CPU threads: {self.intra_op} intra-op thread(s) per process, "
                f"{self.concurrent_clients} client(s) at a time, {self.cores} core(s) "
                f"available ({self.reason})")


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, e.g. under ``taskset`` or a cgroup)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def _user_choice() -> tuple[int, str] | None:
    """A thread count the user already chose (environment or ``torch.set_num_threads``)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        value = os.environ.get(var, "").strip()
        if value:
            return torch.get_num_threads(), f"{var}={value} is set"
    current = torch.get_num_threads()
    # Torch starts with one thread per core of the affinity mask; anything else that this
    # module did not set was set by the caller.
    if current != available_cores() and current != _applied:
        return current, "torch.set_num_threads was called before the run"
    return None


def choose_threads(setting: str | int = "auto", *, device_type: str = "cpu",
                   concurrent_clients: int = 1) -> ThreadPolicy:
    """The policy for ``setting`` (``"auto"`` or a thread count), without applying it."""
    cores = available_cores()
    concurrent = max(1, min(int(concurrent_clients), cores))
    if isinstance(setting, bool) or not (setting == "auto" or isinstance(setting, int)):
        raise ConfigError(f"simulation.cpu_threads = {setting!r}: expected 'auto' or a "
                          "whole number of threads")
    if isinstance(setting, int):
        if setting < 1:
            raise ConfigError(f"simulation.cpu_threads = {setting} is out of range; it must "
                              "be >= 1")
        return ThreadPolicy(setting, concurrent, cores, "simulation.cpu_threads")
    chosen = _user_choice()
    if chosen is not None:
        return ThreadPolicy(chosen[0], concurrent, cores, f"kept: {chosen[1]}")
    if device_type != "cpu":
        # Training runs on the accelerator; the host threads only feed it.
        return ThreadPolicy(1, concurrent, cores, f"auto: training on {device_type}")
    return ThreadPolicy(1, concurrent, cores,
                        "auto: one intra-op thread per concurrently trained client")


def apply_thread_policy(setting: str | int = "auto", *, device_type: str = "cpu",
                        concurrent_clients: int = 1, quiet: bool = False) -> ThreadPolicy:
    """Choose the policy, set torch's intra-op thread count and log it once."""
    global _applied
    policy = choose_threads(setting, device_type=device_type,
                            concurrent_clients=concurrent_clients)
    if torch.get_num_threads() != policy.intra_op:
        torch.set_num_threads(policy.intra_op)
    _applied = policy.intra_op
    if not quiet:
        log.info(policy.describe())
    return policy
