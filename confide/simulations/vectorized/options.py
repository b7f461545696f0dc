"""The ``[simulation]`` knobs of the vectorized executor, and what they switch."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

# torch.optim.Adam's defaults, which LocalTrainer's optimizer uses
from confide.client.trainer import ADAM_BETAS, ADAM_EPS

__all__ = ["VectorizedOptions", "DROP_MESSAGE", "OPTIMIZERS", "ADAM_BETAS", "ADAM_EPS",
           "autocast"]

#: the message LocalTrainer's fault injection raises, so both executors report the same
DROP_MESSAGE = "client left mid-round (fault injection)"
#: local optimizers with a vectorised update rule
OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class VectorizedOptions:
    """The ``[simulation]`` knobs of this executor (see ``confide.config.SimulationConfig``)."""

    chunk_size: int = 0
    mixed_precision: str = "off"
    compile: str = "auto"
    conv_lowering: str = "auto"
    world_size: int = 1

    @classmethod
    def from_config(cls, config: Any) -> VectorizedOptions:
        """Read the options from a run config (defaults where it has none)."""
        sim = getattr(config, "simulation", None)
        return cls(**{f: getattr(sim, f) for f in cls.__dataclass_fields__ if hasattr(sim, f)})


@contextlib.contextmanager
def autocast(device: torch.device, mixed_precision: str) -> Iterator[None]:
    """bfloat16 autocast when ``simulation.mixed_precision = "bf16"``."""
    if mixed_precision == "bf16":
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield
    else:
        yield
