#!/usr/bin/env python3
"""Smoke test of the ``confide`` command as a plain ``pip install -e .`` leaves it.

Usage: ``python scripts/cli_smoke.py PATH/TO/confide`` (scripts/check runs it with the console
script of a fresh virtual environment). Each case checks the exit code, that stderr is empty or
exactly one ``error: ...`` line, and that no traceback appears anywhere. Exit 1 on any failure.
Standard library only: it runs with whatever interpreter is at hand.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

#: (name, arguments, files to create, expected exit code, text stderr must contain)
CASES: list[tuple[str, list[str], dict[str, str], int, str]] = [
    ("--help", ["--help"], {}, 0, ""),
    ("bad flag", ["simulate", "--bogus"], {}, 2, "No such option"),
    ("bad config file", ["simulate", "-q", "-o", "run", "job.toml"],
     {"job.toml": "[run\nrounds = 3\n"}, 2, "is not valid TOML"),
    ("unknown key keeps its section", ["simulate", "-q", "-o", "run", "job.toml"],
     {"job.toml": "[run]\nround = 3\n"}, 2, "allowed keys in [run]: "),
    ("bad data file", ["simulate", "-q", "-o", "run", "--set", "data.path='data.csv'"],
     {"data.csv": "f1,f2,label\n1.0,abc,0\n2.0,3.0,1\n"}, 3, "must be numeric"),
    ("strategies list", ["strategies", "list"], {}, 0, ""),
    ("config reference", ["config", "run"], {}, 0, ""),
]


def run_case(confide: str, name: str, args: list[str], files: dict[str, str], code: int,
             needle: str) -> list[str]:
    """Run one case in a fresh folder; return what is wrong with it (empty: it passed)."""
    with tempfile.TemporaryDirectory() as tmp:
        for rel, text in files.items():
            Path(tmp, rel).write_text(text, encoding="utf-8")
        env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "NO_COLOR": "1"}
        env.pop("CONFIDE_DEBUG", None)
        env.pop("PYTHONPATH", None)  # the installed package, not a source tree
        proc = subprocess.run([confide, *args], capture_output=True, text=True, cwd=tmp,  # noqa: S603
                              env=env, timeout=300, check=False)
    problems = []
    err_lines = [line for line in proc.stderr.splitlines() if line.strip()]
    if proc.returncode != code:
        problems.append(f"exit code {proc.returncode}, expected {code}")
    if "Traceback" in proc.stderr or "Traceback" in proc.stdout:
        problems.append("a traceback was printed")
    if code == 0:
        if err_lines:
            problems.append("stderr is not empty")
        if not proc.stdout.strip():
            problems.append("stdout is empty")
    else:
        if len(err_lines) != 1 or not err_lines[0].startswith("error: "):
            problems.append(f"stderr is not one 'error: ...' line ({len(err_lines)} lines)")
        if needle not in proc.stderr:
            problems.append(f"stderr does not say {needle!r}")
    if problems:
        problems.append(f"stderr was:\n{proc.stderr.rstrip()}")
    return problems


def main() -> int:
    """Run every case against the ``confide`` executable named on the command line."""
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    confide = sys.argv[1]
    failed = 0
    for name, args, files, code, needle in CASES:
        problems = run_case(confide, name, args, files, code, needle)
        status = "ok" if not problems else "FAIL"
        print(f"cli smoke: {status:4}  confide {' '.join(args)}  ({name})")
        for problem in problems:
            print(f"    {problem}")
        failed += bool(problems)
    print(f"cli-smoke: {len(CASES) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
