"""Compute-device selection: ``auto`` picks CUDA when present, else the CPU with a notice."""

from __future__ import annotations

import torch

from confide.exceptions import DeviceError

__all__ = ["resolve_device"]


def resolve_device(spec: str) -> torch.device:
    """Turn ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` into a device that exists."""
    spec = spec.strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(
                f"client.device = {spec!r} but no CUDA GPU is available; use 'auto' or 'cpu'"
            )
        try:
            dev = torch.device(spec)
        except RuntimeError:
            raise DeviceError(f"client.device = {spec!r} is not a valid device name") from None
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(
                f"client.device = {spec!r} but only {torch.cuda.device_count()} GPU(s) exist"
            )
        return dev
    raise DeviceError(f"client.device = {spec!r}: choose 'auto', 'cpu', 'cuda' or 'cuda:N'")
