"""CLI start-up: ``confide --help`` and friends beside ``python -c pass`` (issue 13).

Each command is started ``--repeats`` times as a fresh process, interleaved with the others so
that a change in the machine's load hits all of them alike; reported per command: the fastest
and the median wall-clock time, and the median's ratio to ``python -c pass``'s median. On a busy
machine the absolute numbers grow with the load, the ratio much less. Also records whether each
command imported torch (it must not). Writes ``benchmarks/results/cli_startup.json``::

    python benchmarks/cli_startup.py               # 15 repeats
    python benchmarks/cli_startup.py --repeats 31
    VENV/bin/python benchmarks/cli_startup.py --output benchmarks/results/cli_startup_plain.json

(the last one: a plain ``pip install -e .`` environment, where typer vendors click).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "cli_startup.json"

#: what a user types -> the arguments after ``confide``
COMMANDS = {
    "confide --help": ["--help"],
    "confide simulate --help": ["simulate", "--help"],
    "confide strategies list": ["strategies", "list"],
    "confide config": ["config"],
}

# ``confide ARGS`` as the console script runs it (confide.cli.main:main), then whether torch
# was imported; python -X importtime would perturb the timing, so this is a separate probe.
_PROBE = (
    "import sys\n"
    "from confide.cli.main import main\n"
    "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
    "sys.stderr.write('torch' in sys.modules and 'TORCH' or 'no-torch')\n"
)


def _time(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                   cwd=ROOT, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    output = args.output.resolve()
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                       os.environ.get("PYTHONPATH")]))}
    cmds = {"python -c pass": [sys.executable, "-c", "pass"]}
    cmds.update({name: [sys.executable, "-c", "from confide.cli.main import main; main()", *a]
                 for name, a in COMMANDS.items()})
    for cmd in cmds.values():  # warm the file cache and the .pyc files once
        _time(cmd, env)
    times: dict[str, list[float]] = {name: [] for name in cmds}
    for _ in range(args.repeats):
        for name, cmd in cmds.items():
            times[name].append(_time(cmd, env))
    base = statistics.median(times["python -c pass"])
    rows = {}
    for name, xs in times.items():
        median = statistics.median(xs)
        row: dict[str, float | bool] = {"min_s": round(min(xs), 4), "median_s": round(median, 4),
                                        "ratio_to_python": round(median / base, 2)}
        if name in COMMANDS:
            probe = subprocess.run([sys.executable, "-c", _PROBE, *COMMANDS[name]],
                                   capture_output=True, text=True, env=env, cwd=ROOT,
                                   check=False)
            row["imports_torch"] = probe.stderr.strip().endswith("TORCH")
        rows[name] = row
    result = {
        "benchmark": "cli_startup",
        "repeats": args.repeats,
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "typer": importlib.metadata.version("typer"),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "commands": rows,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    width = max(len(n) for n in rows)
    print(f"{'command':{width}}  min s   median s  x python  torch")
    for name, row in rows.items():
        torch_flag = ("-" if "imports_torch" not in row
                      else "yes" if row["imports_torch"] else "no")
        print(f"{name:{width}}  {row['min_s']:.3f}   {row['median_s']:.3f}     "
              f"{row['ratio_to_python']:.2f}      {torch_flag}")
    print(f"load average (1 min): {result['load_average_1m']}; wrote "
          f"{output.relative_to(ROOT) if output.is_relative_to(ROOT) else output}")


if __name__ == "__main__":
    main()
