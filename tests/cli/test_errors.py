"""Every CLI error is one plain line: section names survive, usage errors exit 2, no traceback."""

import os
import subprocess

import pytest
from confide_testing import ROOT, assert_one_line_error, cli_command, run_cli


@pytest.mark.parametrize(("args", "code", "message"), [
    (["simulate", "--bogus"], 2, "error: No such option"),
    (["simulate", "--stop-after", "0"], 2, "error: Invalid value for '--stop-after'"),
    (["strategies", "show"], 2, "error: Missing argument 'NAME'"),
    (["no-such-command"], 2, "error: No such command 'no-such-command'"),
])
def test_usage_errors_exit_2_in_one_line(args, code, message, capsys):
    got, _, err = run_cli(args, capsys)
    assert got == code
    assert_one_line_error(got, err)
    assert err.startswith(message), err
    assert "--help" in err  # where to look next


def test_section_names_are_printed_as_written(tmp_path, capsys):
    code, _, err = run_cli(["simulate", "-o", str(tmp_path / "r"), "--set", "run.round=3"],
                           capsys)
    assert code == 2
    assert_one_line_error(code, err)
    assert err.strip() == ("error: unknown key run.round (did you mean run.rounds?); allowed "
                           "keys in [run]: eval_every, rounds, seed, trackers")


def test_section_in_a_job_file_is_printed_as_written(tmp_path, capsys):
    job = tmp_path / "job.toml"
    job.write_text("[secure_aggregation]\nclip_range = 1.0\n")
    code, _, err = run_cli(["simulate", str(job), "-o", str(tmp_path / "r")], capsys)
    assert_one_line_error(code, err)
    assert "[secure_aggregation]: " in err and "clipping_range" in err


@pytest.mark.parametrize(("sets", "message"), [
    (["strategy.mu=0.1"],
     "error: unknown key strategy.mu; fedavg and fedmedian take no [strategy] keys; "
     "it belongs to: fedprox"),
    (["strategy.name='fedadam'", "strategy.mu=0.1"],
     "error: unknown key strategy.mu; allowed keys in [strategy]: beta1, beta2, server_lr, tau "
     "(fedadam's); it belongs to: fedprox"),
    (["strategy.name='fedprox'", "strategy.server_lr=1"],
     "error: unknown key strategy.server_lr; allowed keys in [strategy]: mu (fedprox's); it "
     "belongs to: fedadagrad, fedadam, fedavgm, fedbuff, fedyogi, scaffold"),
    (["strategy.server_l=1"],
     "error: unknown key strategy.server_l; fedavg and fedmedian take no [strategy] keys; "
     "did you mean strategy.server_lr?"),
])
def test_unknown_strategy_key_names_the_strategies_that_take_it(sets, message, tmp_path,
                                                                 capsys):
    args = ["simulate", "-q", "-o", str(tmp_path / "r")]
    for item in sets:
        args += ["--set", item]
    code, _, err = run_cli(args, capsys)
    assert code == 2
    assert_one_line_error(code, err)
    assert err.strip() == message
    assert not (tmp_path / "r").exists()


def test_a_path_that_is_not_a_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, _, err = run_cli(["simulate", "-q", "-o", str(tmp_path / "file" / "run")], capsys)
    assert code == 1
    assert_one_line_error(code, err)
    assert "Not a directory" in err


_BUGGY = """
from confide.strategies import Strategy

class Buggy(Strategy):
    '''Fails in its own code: an unexpected error, not a user mistake.'''
    name = "buggy"

    def initialize(self, global_params):
        raise ZeroDivisionError("plugin bug [sic]")
"""


def test_unexpected_error_is_one_line_with_a_debug_hint(tmp_path, monkeypatch, capsys):
    (tmp_path / "buggy_strategy.py").write_text(_BUGGY)
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["simulate", "-q", "-o", str(tmp_path / "r"), "--set", "run.rounds=1",
            "--set", "data.num_clients=4", "--set", "strategy.name='buggy_strategy:Buggy'"]
    code, _, err = run_cli(args, capsys)
    assert code == 1
    assert_one_line_error(code, err)
    assert "unexpected ZeroDivisionError: plugin bug [sic]" in err  # brackets kept
    assert "--debug" in err and "CONFIDE_DEBUG=1" in err


def test_debug_shows_the_traceback(tmp_path):
    (tmp_path / "buggy_strategy.py").write_text(_BUGGY)
    env_path = f"{tmp_path}{os.pathsep}{ROOT}"
    proc = subprocess.run(
        [*cli_command(), "--debug", "simulate", "-q", "-o", str(tmp_path / "r"),
         "--set", "run.rounds=1", "--set", "data.num_clients=4",
         "--set", "strategy.name='buggy_strategy:Buggy'"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={**os.environ, "PYTHONPATH": env_path})
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr
    assert "ZeroDivisionError: plugin bug [sic]" in proc.stderr


def test_no_arguments_prints_the_help(capsys):
    code, out, err = run_cli([], capsys)
    assert code == 2  # click's convention for a bare group
    assert "Usage:" in out + err and "simulate" in out + err
    assert "Traceback" not in err
