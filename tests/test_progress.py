"""Progress inside a round: plain periodic lines when stderr is not a terminal."""

import logging
import os
import subprocess

import pytest
from confide_testing import FAST, ROOT, cli_command

from confide.progress import LogRoundProgress, RichRoundProgress


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_plain_lines_at_most_every_interval_and_at_round_end(caplog):
    caplog.set_level(logging.INFO, logger="confide")
    clock = Clock()
    p = LogRoundProgress(interval_s=5.0, rounds=3, clock=clock)
    p.start_round(2, 4)
    p.epoch(1, 2)
    p.client_done()  # t = 0: too soon
    clock.t = 6.0
    p.epoch(2, 2)  # the second client's second epoch: a line
    clock.t = 7.0
    p.client_done()  # within 5 s of the last line: quiet
    p.end_round({"round": 2, "num_clients": 4, "num_sampled": 4, "train_loss": 0.5,
                 "test_accuracy": 0.9, "epsilon": None})
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "round 2/3: 1/4 clients done, client 2 in epoch 2/2 (6 s)"
    assert lines[1].startswith("round 2/3 done: 4/4 clients, train loss 0.5000, "
                               "test accuracy 0.9000")
    assert len(lines) == 2


def test_rich_bar_counts_clients():
    import io

    from rich.console import Console
    from rich.progress import Progress, TextColumn

    progress = Progress(TextColumn("{task.fields[status]}"), console=Console(file=io.StringIO()))
    rp = RichRoundProgress(progress)
    rp.start_round(1, 5)
    rp.epoch(2, 3)
    assert progress.tasks[0].fields["status"] == "round 1: clients, epoch 2/3"
    rp.client_done(2)
    rp.start_round(2, 5)
    rp.client_done()
    assert progress.tasks[0].completed == 1 and progress.tasks[0].total == 5


@pytest.mark.slow
def test_simulate_prints_in_round_lines_to_a_pipe(tmp_path):
    env = dict(os.environ, CONFIDE_PROGRESS_INTERVAL="0")
    sets = [a for kv in [*FAST, "run.rounds=2", "data.num_clients=4"] for a in ("--set", kv)]
    proc = subprocess.run([*cli_command(), "simulate", "-o", str(tmp_path / "r"), *sets],
                          capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr
    for rnd in (1, 2):
        assert f"round {rnd}/2: 1/4 clients done" in err
        assert f"round {rnd}/2: 4/4 clients done" in err
        assert f"round {rnd}/2 done: 4/4 clients" in err
    assert "in epoch 1/1" in err
