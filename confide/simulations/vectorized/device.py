"""Device-side helpers of the cohort trainer: device time, out-of-memory, cuDNN autotuning."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["DeviceClock", "is_oom", "cudnn_autotune"]


@contextlib.contextmanager
def cudnn_autotune(device: torch.device) -> Iterator[None]:
    """Let cuDNN pick the fastest algorithms for the chunk's fixed conv shapes."""
    if device.type != "cuda" or torch.backends.cudnn.deterministic:
        yield
        return
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is the device (or host) running out of memory."""
    if isinstance(exc, torch.cuda.OutOfMemoryError | MemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text
                                              or "can't allocate memory" in text)


class DeviceClock:
    """Device time of the training kernels, chunk by chunk.

    CUDA events on the compute stream, read only after the round (reading them waits for the
    device); wall time on the CPU.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.laps: list[tuple[Any, Any]] = []
        self._mark = self._event()

    def _event(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def lap(self) -> None:
        """End of a chunk's training."""
        end = self._event()
        self.laps.append((self._mark, end))
        self._mark = self._event()

    def seconds(self) -> float:
        """Total training time (waits for the device to reach the last lap)."""
        if not self.cuda:
            return sum(b - a for a, b in self.laps)
        for _, end in self.laps:
            end.synchronize()
        return sum(a.elapsed_time(b) for a, b in self.laps) / 1e3
