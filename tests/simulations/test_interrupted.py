"""A run stopped before its first checkpoint: reusable and resumable; SIGTERM says how."""

import os
import signal
import subprocess
import time

import pytest
from confide_testing import ROOT, cli_command

from confide.app.simulate import run_simulation
from confide.exceptions import CheckpointError

JOB = ["run.rounds=2", "data.num_clients=4", "client.epochs=1", "client.device='cpu'"]


class Stop(Exception):
    pass


def _stopped_before_round_one(run_dir):
    def on_start(sim):
        raise KeyboardInterrupt  # as Ctrl-C between start-up and round 1

    with pytest.raises(KeyboardInterrupt):
        run_simulation(None, overrides=JOB, output=run_dir, on_start=on_start)
    assert (run_dir / "config.toml").is_file() and not (run_dir / "checkpoint.pt").exists()


def test_never_started_folder_is_reused(tmp_path, caplog):
    run_dir = tmp_path / "r"
    _stopped_before_round_one(run_dir)
    caplog.set_level("INFO", logger="confide")
    _, history = run_simulation(None, overrides=JOB, output=run_dir)
    assert len(history) == 2 and (run_dir / "model.pt").is_file()
    assert any("reusing" in r.message for r in caplog.records)


def test_never_started_folder_resumes_from_round_zero(tmp_path):
    run_dir = tmp_path / "r"
    _stopped_before_round_one(run_dir)
    _, history = run_simulation(resume=run_dir)
    assert [r["round"] for r in history] == [1, 2]
    fresh_dir, fresh = run_simulation(None, overrides=JOB, output=tmp_path / "fresh")
    assert [r["test_accuracy"] for r in history] == [r["test_accuracy"] for r in fresh]


def test_a_folder_with_other_files_is_still_refused(tmp_path):
    run_dir = tmp_path / "r"
    _stopped_before_round_one(run_dir)
    (run_dir / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already holds files"):
        run_simulation(None, overrides=JOB, output=run_dir)
    assert (run_dir / "notes.txt").read_text() == "mine"


def test_interrupt_logs_the_resume_hint(tmp_path, caplog):
    caplog.set_level("WARNING", logger="confide")

    def stop(record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_simulation(None, overrides=JOB, output=tmp_path / "r", on_round_end=stop)
    hint = [r.message for r in caplog.records if "--resume" in r.message]
    assert hint == [f"stopped after round 1 of 2; continue with: confide simulate --resume "
                    f"{tmp_path / 'r'}"]


@pytest.mark.slow
def test_sigterm_prints_the_resume_hint(tmp_path):
    out = tmp_path / "r"
    sets = [a for kv in ["run.rounds=500", "data.num_clients=4", "client.epochs=1",
                         "client.device='cpu'"] for a in ("--set", kv)]
    env = dict(os.environ, COLUMNS="300")
    proc = subprocess.Popen([*cli_command(), "simulate", "-o", str(out), *sets], cwd=ROOT,
                            env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoint.pt").exists():  # wait for a finished round
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert f"continue with: confide simulate --resume {out}" in " ".join(err.split())
    assert "Traceback" not in err
