"""Long benchmark runs that survive a time limit: keep the run folder and continue it.

A 50-round GPU run may not fit one time-limited command. With ``--run-dir DIR`` a benchmark keeps
its Confide run folder at ``DIR``; started again with the same arguments, it resumes from the
folder's last checkpoint (``confide simulate --resume``: same seed, same config, same rounds) and
reports the whole history. The folder's saved config must equal the one the arguments give (only
``run.rounds`` may be raised), so a changed argument never silently continues a different run.

Results files are shared by several benchmark processes (one per strategy, say), so a row is
written under an exclusive lock, read-modify-write, and atomically replaced.
"""

from __future__ import annotations

import csv
import fcntl
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from confide.app.simulate import run_simulation
from confide.config import load_config

RoundRecord = dict[str, Any]


def _saved_history(run_dir: Path) -> list[RoundRecord]:
    path = run_dir / "history.json"
    return json.loads(path.read_text()) if path.is_file() else []


def round_seconds(run_dir: Path) -> float:
    """Seconds spent in rounds (``timings.csv``'s ``round_s``), over every session of the run."""
    path = run_dir / "timings.csv"
    if not path.is_file():
        return 0.0
    with path.open(newline="") as fh:
        return round(sum(float(row["round_s"]) for row in csv.DictReader(fh)), 1)


def run_or_resume(config: Path, overrides: list[str], run_dir: Path | None,
                  on_round_end: Callable[[RoundRecord], None]
                  ) -> tuple[list[RoundRecord], float, int]:
    """Run ``config`` + ``overrides`` in ``run_dir`` (a temporary folder when None), or resume it.

    ``on_round_end`` sees every round, the ones of earlier sessions first. Returns the whole
    history, the seconds spent in rounds over all sessions, and the round resumed after (0 when
    the run started here).
    """
    if run_dir is None:
        with tempfile.TemporaryDirectory() as tmp:
            _, history = run_simulation(config, overrides=overrides, output=Path(tmp) / "run",
                                        on_round_end=on_round_end)
            return history, round_seconds(Path(tmp) / "run"), 0
    wanted = load_config(config, overrides)
    if (run_dir / "checkpoint.pt").is_file():
        saved = load_config(run_dir / "config.toml")
        # only run.rounds may differ (raised to continue a finished run further)
        if replace(saved, run=replace(saved.run, rounds=wanted.run.rounds)) != wanted:
            raise SystemExit(f"{run_dir}: holds a run of another config; use another --run-dir "
                             "or delete it")
        done = _saved_history(run_dir)
        if len(done) > wanted.run.rounds:
            raise SystemExit(f"{run_dir}: already ran {len(done)} rounds, more than asked")
        for record in done:
            on_round_end(record)
        if len(done) >= wanted.run.rounds:
            return done, round_seconds(run_dir), len(done)
        print(f"resuming {run_dir} after round {len(done)}", flush=True)
        _, history = run_simulation(resume=run_dir, overrides=[f"run.rounds={wanted.run.rounds}"],
                                    on_round_end=on_round_end)
        return history, round_seconds(run_dir), len(done)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise SystemExit(f"{run_dir}: not empty and has no checkpoint; use another --run-dir")
    _, history = run_simulation(config, overrides=overrides, output=run_dir,
                                on_round_end=on_round_end)
    return history, round_seconds(run_dir), 0


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` + ``.lock`` for a read-modify-write of ``path``."""
    with open(path.with_name(path.name + ".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one rename (a killed process leaves the old file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
