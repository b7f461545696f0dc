"""Seconds per round of a deployed job: 3 client processes on loopback, a small model.

The coordinator (``confide server start``: SuperLink + mTLS gateway + ServerApp) and three
``confide client start`` processes run the default digits MLP (64-128-10) with FedAvg, over
TLS with node authentication, exactly as a deployment does. Variants, side by side:

* ``confide``: the defaults (ClientApp in the client process; the coordinator's gateway holds
  a client's empty pull until it has pushed messages and tells the round loop when a reply
  is whole, with 10-100 ms polls as the fallback; objects pulled with a 10 ms back-off);
* ``confide secagg+central-dp``: SecAgg+ (t = 2 of 3) and central DP, the issue's target;
* ``secagg, client killed R:STAGE``: client 2 SIGKILLs itself at that point of round R;
  ``death_to_round_end_s`` is the time from its death to the end of that round without it;
* ``flower-polling``: the same processes polling like Flower's own loops (every 3 s on both
  sides: ``flower-supernode`` sleeps 3 s between empty pulls, ``Grid.send_and_receive`` 3 s);
* ``sequential simulation``: the same job in one process (the baseline the ratio uses);
* ``fresh ClientApp process``: starting a Python process that imports torch and Confide's
  ClientApp, which Flower's default isolation (a ClientApp process per message) pays for
  every message on every client.

Round 1 includes each client building the job (imports, model) and is reported apart.
The machine is shared: the load average before and after each variant is recorded.

CPU seconds per later round (every process of the deployment) do not depend on the load.

    python benchmarks/deploy_round_time.py [--rounds 8] [--kills 3:training] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

JOB = """
[run]
seed = 0
rounds = {rounds}
[data]
dataset = "digits"
num_clients = 3
partition = "iid"
[client]
device = "cpu"
{extra}"""

#: the variant the issue's target is about: SecAgg+ (t = 2 of 3) and central DP
SECURE = """[cohort]
min_clients = 2
train_timeout_s = 60
[privacy]
mode = "central"
noise_multiplier = 0.0005
clip_norm = 5.0
[secure_aggregation]
enabled = true
threshold = 2
stage_timeout_s = {stage_timeout}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cli(args: list[str], folder: Path, name: str,
         env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           **(env or {})}
    with (folder / f"{name}.err").open("wb") as err:
        return subprocess.Popen([sys.executable, "-m", "confide.cli", *args], cwd=folder,
                                env=env, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)


def _wait_listening(server: subprocess.Popen[bytes], port: int, err: Path,
                    timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        if server.poll() is not None:
            raise RuntimeError(err.read_text()[-3000:])
        time.sleep(0.2)
    raise RuntimeError(f"the coordinator did not listen within {timeout:g} s")


def _rounds_done(run: Path) -> int:
    with contextlib.suppress(FileNotFoundError, ValueError):
        return len(json.loads((run / "history.json").read_text()))
    return 0


def _tree_cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds of these processes and their descendants (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo, seen = 0.0, list(pids), set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{pid}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
    return total


def _partitions(job: Path, folder: Path) -> list[Path]:
    from confide.app.simulate import build_simulation
    from confide.config import load_config

    sim = build_simulation(load_config(job))
    out = []
    for i, part in enumerate(sim.partitions):
        np.savez(folder / f"client{i}.npz", x=sim.dataset.x_train[part],
                 y=sim.dataset.y_train[part])
        out.append(folder / f"client{i}.npz")
    return out


def deployed(rounds: int, *, poll: float, max_poll: float, threads: int, extra: str = "",
             kill_at: str | None = None) -> dict[str, object]:
    """One deployed job; per-round seconds from the coordinator's timings.csv.

    ``kill_at = "<round>:<stage>"`` SIGKILLs client 2 at that point (``CONFIDE_FAULT_KILL_AT``)
    and measures the seconds from its death to the end of that round without it.
    """
    folder = Path(tempfile.mkdtemp(prefix="confide-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        job = folder / "job.toml"
        job.write_text(JOB.format(rounds=rounds, extra=extra))
        data = _partitions(job, folder)
        from confide.server.ca import init_federation, load_federation
        from confide.server.enrolment import EnrolmentAuthority

        init_federation(folder / "fed", name="bench", hosts=["127.0.0.1"])
        authority = EnrolmentAuthority(load_federation(folder / "fed"))
        tokens = [authority.issue_token(name=f"c{i}") for i in range(3)]
        port = _free_port()
        timing = ["--poll-interval", str(poll), "--max-poll-interval", str(max_poll)]
        server = _cli(["server", "start", "--ca", "fed", "--config", "job.toml", "--port",
                       str(port), "--output", "run", "--wait", "300", *timing], folder,
                      "server")
        procs.append(server)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if server.poll() is not None:
                raise RuntimeError((folder / "server.err").read_text())
            time.sleep(0.2)
        from confide.client.enrol import enrol_online

        for i in range(3):
            enrol_online(coordinator=f"127.0.0.1:{port}", token=tokens[i],
                         directory=folder / f"c{i}")
        for i in range(3):
            env = {"CONFIDE_FAULT_KILL_AT": kill_at} if kill_at and i == 2 else None
            procs.append(_cli(["client", "start", "--dir", f"c{i}", "--data", str(data[i]),
                               "--threads", str(threads), "-q", *timing], folder, f"c{i}",
                              env=env))
        death: dict[str, float] = {}
        #: CPU seconds of every process of the deployment when each round was recorded
        cpu_at_round: dict[int, float] = {}
        pids = [p.pid for p in procs]

        def watch(until: Any) -> None:  # sample the rounds (and CPU) every 5 ms
            while not until() and server.poll() is None:
                done = _rounds_done(folder / "run")
                if done and done not in cpu_at_round:
                    cpu_at_round[done] = _tree_cpu_s(pids)
                time.sleep(0.005)

        if kill_at is not None:
            victim, kill_round = procs[-1], int(kill_at.split(":")[0])
            watch(lambda: victim.poll() is not None)
            died = time.monotonic()
            watch(lambda: _rounds_done(folder / "run") >= kill_round)
            death = {"death_to_round_end_s": time.monotonic() - died}
        watch(lambda: _rounds_done(folder / "run") >= rounds)
        if server.wait(timeout=900) != 0:
            raise RuntimeError((folder / "server.err").read_text()[-2000:])
        with (folder / "run" / "timings.csv").open() as fh:
            seconds = [float(r["round_s"]) for r in csv.DictReader(fh)]
        history = json.loads((folder / "run" / "history.json").read_text())
        later = sorted(r for r in cpu_at_round if r >= 1)
        # A killed client's CPU leaves the sum with it: only whole federations are counted.
        cpu = ((cpu_at_round[later[-1]] - cpu_at_round[later[0]]) / (later[-1] - later[0])
               if len(later) >= 2 and kill_at is None else None)
        return {"round_s": seconds, "first_round_s": seconds[0],
                "median_later_round_s": statistics.median(seconds[1:]),
                "final_accuracy": history[-1]["test_accuracy"],
                "clients_per_round": [r["num_clients"] for r in history],
                "cpu_s_per_later_round": cpu, **death}
    finally:
        _stop(procs)
        shutil.rmtree(folder, ignore_errors=True)


def simulated(rounds: int, *, threads: int) -> dict[str, object]:
    import torch

    from confide.app.simulate import build_simulation
    from confide.config import load_config

    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "job.toml"
        job.write_text(JOB.format(rounds=rounds, extra=""))
        sim = build_simulation(load_config(job))
        torch.set_num_threads(threads)  # as each deployed client
        sim.coordinator.run()
        seconds = [t["round_s"] for t in sim.coordinator.timings]
    return {"round_s": seconds, "first_round_s": seconds[0],
            "median_later_round_s": statistics.median(seconds[1:]),
            "final_accuracy": sim.coordinator.history[-1]["test_accuracy"]}


def fresh_process_seconds(repeats: int = 3) -> float:
    """Median wall time to start a process that imports the ClientApp's dependencies."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch, flwr.clientapp, "
                        "confide.app.client_app"], check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _markdown(variants: dict[str, dict[str, Any]], args: argparse.Namespace,
              spawn: float) -> str:
    lines = [f"# Deployed round time ({args.rounds} rounds, 3 clients, {os.cpu_count()} CPUs, "
             "TLS on, loopback)", "",
             "Produced by `python benchmarks/deploy_round_time.py` "
             f"(--rounds {args.rounds}). The machine is shared: the load average (1 min) "
             "before and after each variant is given; CPU s/round is every process of the "
             "deployment (coordinator, SuperLink, clients) between rounds 1 and the last.", "",
             "| variant | median later round (s) | rounds (s) | CPU s/round | death to round "
             "end (s) | clients per round | load before -> after |",
             "|---|---|---|---|---|---|---|"]
    for name, v in variants.items():
        cpu = v.get("cpu_s_per_later_round")
        death = v.get("death_to_round_end_s")
        lines.append(
            f"| {name} | {v['median_later_round_s']:.3f} | "
            f"{', '.join(f'{x:.2f}' for x in v['round_s'])} | "
            f"{'' if cpu is None else f'{cpu:.2f}'} | "
            f"{'' if death is None else f'{death:.2f}'} | "
            f"{', '.join(str(c) for c in v.get('clients_per_round', []))} | "
            f"{v['load_before']:.1f} -> {v['load_after']:.1f} |")
    lines += ["", f"Starting a fresh ClientApp process (Flower's default isolation, per "
              f"message): {spawn:.2f} s.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per client process (3 clients share the CPUs)")
    parser.add_argument("--skip-flower-polling", action="store_true")
    parser.add_argument("--stage-timeout", type=float, default=5.0,
                        help="secure_aggregation.stage_timeout_s of the SecAgg variants")
    parser.add_argument("--kills", default="3:training,3:share_keys,3:unmask",
                        help="comma-separated <round>:<stage> client kills to time ('' none)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    variants: dict[str, dict[str, object]] = {}

    def run(name: str, fn, **kwargs) -> None:  # type: ignore[no-untyped-def]
        before = os.getloadavg()[0]
        result = fn(args.rounds, **kwargs)
        result["load_before"], result["load_after"] = before, os.getloadavg()[0]
        variants[name] = result
        print(f"{name:>24}: first round {result['first_round_s']:.2f} s, later rounds "
              f"median {result['median_later_round_s']:.3f} s, final accuracy "
              f"{result['final_accuracy']:.4f} (load {before:.1f} -> "
              f"{result['load_after']:.1f})", flush=True)

    run("sequential simulation", simulated, threads=args.threads)
    run("confide", deployed, poll=0.01, max_poll=0.1, threads=args.threads)
    secure = SECURE.format(stage_timeout=args.stage_timeout)
    run("confide secagg+central-dp", deployed, poll=0.01, max_poll=0.1, threads=args.threads,
        extra=secure)
    for kill in [k for k in args.kills.split(",") if k]:
        run(f"secagg, client killed {kill}", deployed, poll=0.01, max_poll=0.1,
            threads=args.threads, extra=secure, kill_at=kill)
        print(f"{'':>24}  death to the end of round 3 without it: "
              f"{variants[f'secagg, client killed {kill}']['death_to_round_end_s']:.2f} s",
              flush=True)
    if not args.skip_flower_polling:
        run("flower-polling", deployed, poll=3.0, max_poll=3.0, threads=args.threads)
    spawn = fresh_process_seconds()
    print(f"{'fresh ClientApp process':>24}: {spawn:.2f} s to start (per message under "
          "Flower's default isolation)", flush=True)
    base = variants["sequential simulation"]["median_later_round_s"]
    for v in variants.values():
        v["ratio_to_simulation"] = v["median_later_round_s"] / base  # type: ignore[operator]
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "deploy_round_time.json"
    out.write_text(json.dumps({"rounds": args.rounds, "clients": 3, "model": "mlp 64-128-10",
                               "threads_per_client": args.threads, "cpus": os.cpu_count(),
                               "fresh_clientapp_process_s": spawn, "variants": variants},
                              indent=2))
    (args.out / "deploy_round_time.md").write_text(_markdown(variants, args, spawn))
    print(f"target < 2 s per round: confide later rounds "
          f"{variants['confide']['median_later_round_s']:.3f} s, with SecAgg + central DP "
          f"{variants['confide secagg+central-dp']['median_later_round_s']:.3f} s; written "
          f"to {out}")


if __name__ == "__main__":
    main()
