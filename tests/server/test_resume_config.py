"""``--resume``: the saved config, only run.rounds may change (shared by simulate and deploy)."""

from __future__ import annotations

import pytest

from confide.config import dump_config, load_config
from confide.exceptions import CheckpointError, ConfigError
from confide.server.checkpoint import check_resumable, resume_config


def _run_dir(tmp_path, *overrides: str):
    run = tmp_path / "run"
    run.mkdir()
    config = load_config(None, ["data.num_clients=3", "run.rounds=4", *overrides])
    (run / "config.toml").write_text(dump_config(config))
    return run, config


def test_the_saved_config_comes_back_with_more_rounds(tmp_path):
    run, saved = _run_dir(tmp_path)
    resumed = resume_config(run, ["run.rounds=9"])
    assert resumed.run.rounds == 9 and resumed.replace(run=saved.run) == saved


def test_a_job_file_must_match_the_saved_config_but_for_rounds(tmp_path):
    run, saved = _run_dir(tmp_path)
    same = load_config(None, ["data.num_clients=3", "run.rounds=12"])
    assert resume_config(run, [], given=same).run.rounds == 12
    other = load_config(None, ["data.num_clients=3", "client.lr=0.5"])
    with pytest.raises(ConfigError, match=r"client\.lr \(0\.05 saved, 0\.5 given\)"):
        resume_config(run, [], given=other)


def test_other_overrides_and_missing_folders_are_refused(tmp_path):
    run, _ = _run_dir(tmp_path)
    with pytest.raises(ConfigError, match="only run.rounds"):
        resume_config(run, ["client.lr=0.5"])
    with pytest.raises(CheckpointError, match="not found"):
        resume_config(tmp_path / "nowhere", [])


def test_a_checkpoint_must_fit_the_job(tmp_path):
    import torch

    state = {"round": 5, "params": torch.zeros(10)}
    with pytest.raises(CheckpointError, match="does not match"):
        check_resumable(state, run_dir=tmp_path, num_params=11, rounds=8)
    with pytest.raises(ConfigError, match="already completed 5 rounds"):
        check_resumable(state, run_dir=tmp_path, num_params=10, rounds=4)
    check_resumable(state, run_dir=tmp_path, num_params=10, rounds=8)
