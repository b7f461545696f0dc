"""Checkpoints: written atomically after every round, read back without unpickling code.

A checkpoint holds tensors, numbers, strings, lists and dicts only, and is loaded with
``torch.load(weights_only=True)``, so a tampered file cannot execute code.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from confide.config import Config, config_to_dict, load_config
from confide.exceptions import CheckpointError, ConfigError

__all__ = ["save_checkpoint", "load_checkpoint", "resume_config", "check_resumable",
           "resume_job", "CHECKPOINT_NAME", "FORMAT_VERSION"]

log = logging.getLogger("confide")

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> Path:
    """Atomically write ``state`` to ``run_dir/checkpoint.pt``."""
    path = run_dir / CHECKPOINT_NAME
    tmp = run_dir / f".{CHECKPOINT_NAME}.tmp"
    torch.save({"format": FORMAT_VERSION, **state}, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(run_dir: Path) -> dict[str, Any]:
    """Read and sanity-check ``run_dir/checkpoint.pt``."""
    path = run_dir / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"no checkpoint in {str(run_dir)!r}; nothing to resume")
    try:
        with warnings.catch_warnings():  # torch warns on odd pickle protocols; we raise below
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, OSError,
            ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt or unreadable ({first})") \
            from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a Confide checkpoint "
                              f"(format {FORMAT_VERSION})")
    for key in ("round", "params", "strategy", "client_states", "history", "privacy"):
        if key not in state:
            raise CheckpointError(f"checkpoint {str(path)!r} is incomplete (no {key!r})")
    if not isinstance(state["params"], torch.Tensor) or not torch.isfinite(state["params"]).all():
        raise CheckpointError(f"checkpoint {str(path)!r} holds no valid weights")
    return state


# --------------------------------------------------------------------------- resume


def resume_config(run_dir: Path, overrides: list[str], *,
                  given: Config | None = None) -> Config:
    """The saved config of ``run_dir`` with only ``run.rounds`` changed (``--resume``).

    ``given``, when the operator also names a job file, must equal the saved config in every
    key but ``run.rounds``: a resumed run is the same job (its ledger's epsilon was computed
    for those settings), only longer.
    """
    cfg_path = run_dir / "config.toml"
    if not run_dir.is_dir():
        raise CheckpointError(f"run folder {str(run_dir)!r} not found; nothing to resume")
    if not cfg_path.is_file():
        raise CheckpointError(f"{str(run_dir)!r} has no config.toml; is it a Confide run folder?")
    bad = [o for o in overrides if not o.strip().startswith("run.rounds=")]
    if bad:
        raise ConfigError(f"--resume uses the run's saved config; only run.rounds may be "
                          f"changed (got --set {bad[0]})")
    try:
        config = load_config(cfg_path, overrides)
    except ConfigError as exc:
        raise CheckpointError(f"{str(cfg_path)!r} is invalid: {exc}") from None
    if given is not None:
        rounds = {"run": dataclasses.replace(config.run, rounds=given.run.rounds)}
        saved, asked = config_to_dict(config.replace(**rounds)), config_to_dict(given)
        diff = _first_difference(saved, asked)
        if diff is not None:
            raise ConfigError(f"--resume: the job file differs from the run's saved config at "
                              f"{diff}; only run.rounds may change")
        config = given if not overrides else config
    return config


def _first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            diff = _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
            if diff is not None:
                return diff
        return None
    return None if a == b else f"{prefix.rstrip('.')} ({a!r} saved, {b!r} given)"


def check_resumable(state: dict[str, Any], *, run_dir: Path, num_params: int,
                    rounds: int) -> None:
    """A checkpoint fits the job it resumes: same model size, rounds left to run."""
    if state["params"].numel() != num_params:
        raise CheckpointError(f"checkpoint in {str(run_dir)!r} does not match the model "
                              "of its config.toml")
    if int(state["round"]) > rounds:
        raise ConfigError(f"the run already completed {state['round']} rounds; raise "
                          "run.rounds to continue it")


def resume_job(config_path: str | Path | None, overrides: list[str], resume: Path | None
               ) -> tuple[Config, dict[str, Any] | None]:
    """The job's config and, with ``resume`` (a run folder), the checkpoint to go on from.

    A resumed run keeps its saved config (only ``run.rounds`` may change; a job file given
    too must match it). Without a checkpoint (the coordinator died in round 1) the run
    starts over in its folder; the ledger keeps whatever was already spent.
    """
    if resume is None:
        if config_path is None:
            raise ConfigError("give the job with --config FILE (or --resume RUN_DIR)")
        return load_config(config_path, overrides), None
    given = load_config(config_path, overrides) if config_path is not None else None
    config = resume_config(resume, overrides, given=given)
    if not (resume / CHECKPOINT_NAME).is_file():
        log.warning("%s has no checkpoint yet; its job starts again from round 1", resume)
        return config, None
    return config, load_checkpoint(resume)
