"""Soak: a long deployed job that keeps losing clients and its coordinator, and finishes.

Five ``confide client start`` processes and ``confide server start`` on loopback run a
SecAgg + central-DP job (digits MLP) for ``--rounds`` rounds. Every few rounds a random
client is SIGKILLed (at a random moment: training or any protocol stage) and restarted a
round or two later; once, about half way, the coordinator itself is SIGKILLed and started
again with ``server start --resume``. Should a round fail anyway (the coordinator exits with
an error), it is resumed too, and that counts as a retry.

Reported: rounds completed, kills, restarts, coordinator resumes and retries, whether
anything was lost (history, ledger and checkpoint agree: every round exactly once, epsilon
never below what the recorded rounds spent) and seconds per round. The machine may be
shared: the load average is recorded. This is a benchmark, not a test.

    python benchmarks/deploy_soak.py [--rounds 100] [--clients 5] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from deploy_round_time import _cli, _free_port, _partitions, _stop, _wait_listening  # noqa: E402

JOB = """
[run]
seed = 0
rounds = {rounds}
eval_every = 5
[data]
dataset = "digits"
num_clients = {clients}
partition = "iid"
[client]
epochs = 1
device = "cpu"
[cohort]
min_clients = 3
train_timeout_s = 60
[privacy]
mode = "central"
noise_multiplier = 0.0005
clip_norm = 5.0
[secure_aggregation]
enabled = true
threshold = 3
stage_timeout_s = 10
"""


def _history(run: Path) -> list[dict]:
    with contextlib.suppress(FileNotFoundError, ValueError):
        return json.loads((run / "history.json").read_text())
    return []


def soak(rounds: int, clients: int, seed: int, kill_every: int, folder: Path) -> dict:
    rng = random.Random(seed)
    job = folder / "job.toml"
    job.write_text(JOB.format(rounds=rounds, clients=clients))
    data = _partitions(job, folder)
    from confide.client.enrol import enrol_online
    from confide.server.ca import init_federation, load_federation
    from confide.server.enrolment import EnrolmentAuthority

    init_federation(folder / "fed", name="soak", hosts=["127.0.0.1"])
    authority = EnrolmentAuthority(load_federation(folder / "fed"))
    tokens = [authority.issue_token(name=f"c{i}") for i in range(clients)]
    port = _free_port()
    run = folder / "run"
    base = ["server", "start", "--ca", "fed", "--port", str(port), "--wait", "120",
            "--round-timeout", "120", "-q"]
    servers = [_cli([*base, "--config", "job.toml", "--output", "run"], folder, "server0")]
    _wait_listening(servers[-1], port, folder / "server0.err")
    for i in range(clients):
        enrol_online(coordinator=f"127.0.0.1:{port}", token=tokens[i], directory=folder / f"c{i}")

    def start_client(i: int, n: int) -> subprocess.Popen[bytes]:
        return _cli(["client", "start", "--dir", f"c{i}", "--data", str(data[i]), "--threads",
                     "1", "-q", "--reconnect-timeout", "600"], folder, f"c{i}-{n}")

    procs = {i: start_client(i, 0) for i in range(clients)}
    starts = dict.fromkeys(range(clients), 1)
    events: list[dict] = []
    kills = restarts = resumes = retries = 0
    dead: dict[int, int] = {}  # client -> round after which it comes back
    next_kill = kill_every
    coordinator_kill_at = rounds // 2
    t0 = time.monotonic()
    all_procs = list(procs.values()) + servers
    try:
        while True:
            done = len(_history(run))
            server = servers[-1]
            code = server.poll()
            if code is not None:
                if code == 0 and done >= rounds:
                    break
                retries += 1  # a failed round ended the job: resume it
                events.append({"round": done, "event": f"coordinator exited {code}; resume"})
                if retries > 10:
                    raise RuntimeError((folder / f"server{len(servers) - 1}.err").read_text())
                servers.append(_cli([*base, "--resume", "run"], folder,
                                    f"server{len(servers)}"))
                all_procs.append(servers[-1])
                _wait_listening(servers[-1], port, folder / f"server{len(servers) - 1}.err")
                continue
            if done >= coordinator_kill_at and resumes == 0:
                time.sleep(rng.uniform(0.0, 2.0))  # somewhere inside the next round
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
                resumes += 1
                events.append({"round": len(_history(run)), "event": "coordinator SIGKILL"})
                servers.append(_cli([*base, "--resume", "run"], folder, f"server{len(servers)}"))
                all_procs.append(servers[-1])
                _wait_listening(servers[-1], port, folder / f"server{len(servers) - 1}.err")
                continue
            for i, back in list(dead.items()):
                if done >= back:
                    procs[i] = start_client(i, starts[i])
                    all_procs.append(procs[i])
                    starts[i] += 1
                    restarts += 1
                    del dead[i]
                    events.append({"round": done, "event": f"client {i} restarted"})
            if done >= next_kill and not dead and done < rounds - 2:
                victim = rng.randrange(clients)
                time.sleep(rng.uniform(0.0, 3.0))  # a random moment of the round
                if procs[victim].poll() is None:
                    os.killpg(procs[victim].pid, signal.SIGKILL)
                    procs[victim].wait()
                    kills += 1
                    dead[victim] = len(_history(run)) + rng.randint(1, 2)
                    events.append({"round": len(_history(run)), "event": f"client {victim} "
                                   "SIGKILL"})
                next_kill = done + kill_every + rng.randint(0, 2)
            time.sleep(0.2)
        wall = time.monotonic() - t0
    finally:
        _stop(all_procs)
    return {"wall_s": wall, "kills": kills, "restarts": restarts, "coordinator_resumes":
            resumes, "retries": retries, "events": events, **_audit(run, rounds, wall)}


def _audit(run: Path, rounds: int, wall: float) -> dict:
    """History, ledger and checkpoint agree; nothing lost, epsilon never under-counted."""
    import torch

    history = _history(run)
    numbers = [r["round"] for r in history]
    ledger = json.loads((run / "privacy_ledger.json").read_text())
    entries = [e for account in ledger["accounts"].values() for e in account]
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    checks = {
        "every_round_once": numbers == list(range(1, rounds + 1)),
        "checkpoint_matches_history": int(state["round"]) == len(history) == rounds,
        "ledger_covers_every_round": {e["round"] for e in entries} >= set(numbers),
        "epsilon_never_under_counted": max(e["epsilon"] for e in entries)
        >= history[-1]["epsilon"],
        "epsilon_monotone": [r["epsilon"] for r in history]
        == sorted(r["epsilon"] for r in history),
    }
    return {"rounds_completed": len(history), "nothing_lost": all(checks.values()),
            "checks": checks, "seconds_per_round": wall / max(1, len(history)),
            "clients_per_round": [r["num_clients"] for r in history],
            "ledger_entries": len(entries), "final_epsilon": history[-1]["epsilon"],
            "final_accuracy": next((r["test_accuracy"] for r in reversed(history)
                                    if r["test_accuracy"] is not None), None)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--kill-every", type=int, default=4, help="rounds between kills")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="confide-soak-") as tmp:
        result = soak(args.rounds, args.clients, args.seed, args.kill_every, Path(tmp))
    result.update(rounds=args.rounds, clients=args.clients, cpus=os.cpu_count(),
                  load_before=load_before, load_after=os.getloadavg()[0])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "deploy_soak.json").write_text(json.dumps(result, indent=2))
    lines = ["# Deployment soak", "",
             f"{args.clients} clients, {args.rounds} rounds, SecAgg (t = 3) + central DP, "
             f"digits MLP, loopback; {os.cpu_count()} CPUs, load {load_before:.1f} -> "
             f"{result['load_after']:.1f} (shared machine).", "",
             "| figure | value |", "|---|---|"]
    for key in ("rounds_completed", "kills", "restarts", "coordinator_resumes", "retries",
                "nothing_lost", "seconds_per_round", "final_epsilon", "final_accuracy"):
        value = result[key]
        lines.append(f"| {key} | {value:.2f} |" if isinstance(value, float)
                     else f"| {key} | {value} |")
    lines += ["", "Checks: " + ", ".join(f"{k} {v}" for k, v in result["checks"].items()), ""]
    (args.out / "deploy_soak.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
