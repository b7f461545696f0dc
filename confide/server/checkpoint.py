"""Checkpoints: written atomically after every round, read back without unpickling code.

A checkpoint holds tensors, numbers, strings, lists and dicts only, and is loaded with
``torch.load(weights_only=True)``, so a tampered file cannot execute code.
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from confide.exceptions import CheckpointError

__all__ = ["save_checkpoint", "load_checkpoint", "CHECKPOINT_NAME", "FORMAT_VERSION"]

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
