"""The default job on a busy CPU: torch's default threads against Confide's thread policy.

``confide simulate`` with no config (digits, 20 clients, MLP, 30 rounds) is run twice as a
subprocess, each time beside one busy-loop process pinned to core 1 (``os.sched_setaffinity``),
which is what a newcomer's laptop or a shared CI runner looks like:

* **before**: ``--set simulation.cpu_threads=N`` with N = the cores torch sees, i.e. torch's own
  default (what Confide did before the thread policy);
* **after**: the default ``simulation.cpu_threads = "auto"`` (one intra-op thread per
  concurrently trained client, ``confide.threads``).

``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` are removed from the jobs' environment (an
explicit value would be kept by both settings). Reported for both: wall-clock seconds of the
whole command (start-up included), the rounds' own seconds (``timings.csv``), the final test
accuracy, and the ratio before/after. Writes ``benchmarks/results/cpu_default_job.{json,md}``::

    python benchmarks/cpu_default_job.py              # the full default job, both settings
    python benchmarks/cpu_default_job.py --rounds 3   # a quick check (results *_quick.*)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

BUSY_LOOP = "import os\nos.sched_setaffinity(0, {1})\nwhile True:\n    pass\n"


def _job_env() -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(var, None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env["COLUMNS"] = "250"  # the policy's log line unwrapped
    return env


def _run_job(name: str, sets: list[str], out: Path, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "confide.cli", "simulate", "-o", str(out / name)]
    for kv in sets:
        cmd += ["--set", kv]
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=_job_env(), capture_output=True, text=True,
                          timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    history = json.loads((out / name / "history.json").read_text())
    with (out / name / "timings.csv").open() as fh:
        rounds_s = sum(float(r["round_s"]) for r in csv.DictReader(fh))
    policy = next((ln.strip() for ln in proc.stderr.splitlines() if "CPU threads:" in ln), "")
    return {
        "command": " ".join(["confide", "simulate"] + [f"--set {kv}" for kv in sets]),
        "wall_s": round(wall, 2),
        "rounds_s": round(rounds_s, 2),
        "rounds": len(history),
        "final_accuracy": history[-1]["test_accuracy"],
        "policy_log": policy,
        "loadavg_1min_before": round(load_before[0], 2),
        "loadavg_1min_after": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    """Run both settings beside a pinned busy loop and write the results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=None,
                    help="run.rounds (default: the default job's 30)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per job")
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    if cores < 2:
        raise SystemExit("needs at least 2 cores (the busy loop takes core 1)")
    extra = [f"run.rounds={args.rounds}"] if args.rounds else []
    busy = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
    results: dict[str, Any] = {}
    try:
        time.sleep(1.0)  # let the busy loop settle on its core
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            # After first: a short run, then the long one, both beside the same busy loop.
            results["after"] = _run_job("after", [*extra, "simulation.cpu_threads='auto'"],
                                        out, args.timeout)
            print("after:", results["after"], flush=True)
            results["before"] = _run_job("before", [*extra, f"simulation.cpu_threads={cores}"],
                                         out, args.timeout)
            print("before:", results["before"], flush=True)
    finally:
        busy.terminate()
        busy.wait(timeout=10)
    before, after = results["before"], results["after"]
    summary = {
        "benchmark": "cpu_default_job",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {"cores": cores, "cpu": platform.processor() or platform.machine(),
                    "python": platform.python_version()},
        "note": ("one busy-loop process pinned to core 1 during both jobs; the machine is "
                 "shared with other agents' processes, so their load (loadavg) adds to it"),
        "before": before,
        "after": after,
        "speedup_wall": round(before["wall_s"] / after["wall_s"], 2),
        "speedup_rounds": round(before["rounds_s"] / max(after["rounds_s"], 1e-9), 2),
        "same_accuracy": abs(before["final_accuracy"] - after["final_accuracy"]) < 1e-3,
    }
    try:
        import torch

        summary["machine"]["torch"] = torch.__version__
    except ImportError:  # pragma: no cover
        pass
    stem = "cpu_default_job" if not args.rounds else "cpu_default_job_quick"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(summary, indent=2) + "\n")
    rows = [
        "| setting | command | wall s | rounds s | final accuracy | loadavg (1 min) |",
        "|---|---|---|---|---|---|",
    ]
    for key in ("before", "after"):
        r = summary[key]
        rows.append(f"| {key} | `{r['command']}` | {r['wall_s']} | {r['rounds_s']} | "
                    f"{r['final_accuracy']:.4f} | {r['loadavg_1min_before']} -> "
                    f"{r['loadavg_1min_after']} |")
    md = [
        "# The default job beside a busy core (`benchmarks/cpu_default_job.py`)",
        "",
        f"{summary['date']}; {cores} cores; torch {summary['machine'].get('torch')}. "
        f"{summary['note']}.",
        "",
        *rows,
        "",
        f"Speed-up (before / after): **{summary['speedup_wall']}x** wall clock, "
        f"{summary['speedup_rounds']}x on the rounds alone. Same final accuracy: "
        f"{summary['same_accuracy']}.",
        "",
        f"Policy line logged by the after run: `{after['policy_log']}`",
        "",
    ]
    (RESULTS / f"{stem}.md").write_text("\n".join(md))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
