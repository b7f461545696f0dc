"""The benchmarks' resumable runs: a run cut short and continued equals one uninterrupted run."""

from __future__ import annotations

import importlib
import json
import sys
import threading
from pathlib import Path

import pytest
from confide_testing import FAST, ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
resumable = importlib.import_module("_resumable")

BASE = [o for o in FAST if not o.startswith("run.rounds=")]


def _run(run_dir: Path | None, rounds: int, extra: list[str] | None = None
         ) -> tuple[list[dict], list[int], int]:
    seen: list[int] = []
    history, _, resumed = resumable.run_or_resume(
        None, [*BASE, f"run.rounds={rounds}", *(extra or [])], run_dir,
        lambda r: seen.append(r["round"]))
    return history, seen, resumed


def test_resumed_run_equals_uninterrupted(tmp_path: Path) -> None:
    whole, _, _ = _run(None, 3)
    first, seen, resumed = _run(tmp_path / "run", 2)
    assert (seen, resumed) == ([1, 2], 0)
    history, seen, resumed = _run(tmp_path / "run", 3)
    # the earlier session's rounds are reported first, then the new one
    assert (seen, resumed) == ([1, 2, 3], 2)
    assert history == whole
    assert json.loads((tmp_path / "run" / "history.json").read_text()) == whole
    assert resumable.round_seconds(tmp_path / "run") > 0
    # a finished run is reported, not rerun
    again, seen, resumed = _run(tmp_path / "run", 3)
    assert (again, seen, resumed) == (whole, [1, 2, 3], 3)


def test_other_config_or_fewer_rounds_is_refused(tmp_path: Path) -> None:
    _run(tmp_path / "run", 2)
    with pytest.raises(SystemExit, match="another config"):
        _run(tmp_path / "run", 3, ["client.lr=0.02"])
    with pytest.raises(SystemExit, match="more than asked"):
        _run(tmp_path / "run", 1)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="not empty"):
        _run(tmp_path / "other", 2)
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep me"


def test_locked_writes_from_threads_keep_every_row(tmp_path: Path) -> None:
    path = tmp_path / "results.json"

    def add(name: str) -> None:
        for i in range(20):
            with resumable.locked(path):
                rows = json.loads(path.read_text()) if path.is_file() else {}
                rows[f"{name}-{i}"] = i
                resumable.write_atomic(path, json.dumps(rows))

    threads = [threading.Thread(target=add, args=(n,)) for n in "abcd"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(json.loads(path.read_text())) == 80
