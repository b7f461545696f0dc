"""`confide simulate` as a user meets it: one-line errors, nothing overwritten."""

import subprocess

import pytest
from confide_testing import FAST, ROOT, assert_one_line_error, cli_command, run_cli

SETS = [a for kv in FAST for a in ("--set", kv)]


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "done"
    proc = subprocess.run([*cli_command(), "simulate", "-q", "-o", str(out), *SETS],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out


def test_subprocess_run_prints_run_folder(finished_run):
    assert (finished_run / "model.pt").is_file()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["simulate", "missing.toml"], "not found"),
        (["simulate", "--set", "data.bogus=1"], "unknown key data.bogus"),
        (["simulate", "--set", "client.lr=-1"], "client.lr = -1.0 is out of range"),
        (["simulate", "--set", "data.num_clients=5000"], "larger than the dataset"),
        (["simulate", "--set", "data.dataset='mnist'"], "unknown dataset 'mnist'"),
        (["simulate", "--set", "model.name='resnet'"], "unknown model 'resnet'"),
        (["simulate", "--set", "simulation.executor='warp'"], "simulation.executor = 'warp'"),
    ],
)
def test_bad_input_is_one_line(args, fragment, capsys, tmp_path):
    code, _, err = run_cli([*args, "-o", str(tmp_path / "new")], capsys)
    assert_one_line_error(code, err)
    assert fragment in err
    assert not (tmp_path / "new").exists()  # nothing created for a job that cannot start


def test_existing_run_folder_is_never_overwritten(finished_run, capsys):
    before = _snapshot(finished_run)
    code, _, err = run_cli(["simulate", "-q", "-o", str(finished_run), *SETS], capsys)
    assert_one_line_error(code, err)
    assert "already holds files" in err
    assert _snapshot(finished_run) == before


def test_corrupt_checkpoint_on_resume(finished_run, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    (copy / "checkpoint.pt").write_bytes(b"\x80\x04garbage" * 10)
    before = _snapshot(copy)
    code, _, err = run_cli(["simulate", "--resume", str(copy), "--set", "run.rounds=5"], capsys)
    assert_one_line_error(code, err)
    assert "corrupt" in err
    assert _snapshot(copy) == before


def test_resume_of_missing_folder(tmp_path, capsys):
    code, _, err = run_cli(["simulate", "--resume", str(tmp_path / "nope")], capsys)
    assert_one_line_error(code, err)
    assert "not found" in err


def test_resume_refuses_config_changes(finished_run, capsys):
    before = _snapshot(finished_run)
    code, _, err = run_cli(["simulate", "--resume", str(finished_run), "--set", "client.lr=1"],
                           capsys)
    assert_one_line_error(code, err)
    assert "only run.rounds" in err
    assert _snapshot(finished_run) == before


def test_round_below_min_clients_is_one_line(capsys, tmp_path):
    code, _, err = run_cli(["simulate", "-q", "-o", str(tmp_path / "r"), *SETS, "--set",
                            "simulation.dropout_rate=0.5", "--set", "cohort.min_clients=8"],
                           capsys)
    assert_one_line_error(code, err)
    assert "fewer than cohort.min_clients = 8" in err
