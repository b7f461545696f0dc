"""Helpers shared by tests (tests/ is on pytest's pythonpath)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: a quick digits job for behaviour tests
FAST = [
    "run.rounds=3",
    "data.num_clients=10",
    "client.epochs=1",
    "client.device='cpu'",
]


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run ``confide ARGS`` in process; return (exit code, stdout, stderr)."""
    from confide.cli.main import main

    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def cli_command() -> list[str]:
    """``confide`` as a subprocess command line (works without the console script)."""
    return [sys.executable, "-m", "confide.cli"]


def assert_one_line_error(code: int, err: str) -> None:
    """A user error: non-zero exit, exactly one line on stderr, no traceback."""
    assert code != 0, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error:"), err
    assert "Traceback" not in err
