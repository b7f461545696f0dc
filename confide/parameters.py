"""Model weights as one flat vector.

Everything that crosses the client/server boundary (global weights, client updates, control
variates) is a single 1-D tensor in the model's ``state_dict`` order. Clipping, secure
aggregation and DP noise then act on one vector, as the papers state them.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["get_flat_params", "set_flat_params", "num_params", "param_shapes"]


def _float_entries(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(k, v) for k, v in model.state_dict().items() if torch.is_floating_point(v)]


def param_shapes(model: nn.Module) -> list[tuple[str, torch.Size]]:
    """Names and shapes of the floating-point state, in flat-vector order."""
    return [(k, v.shape) for k, v in _float_entries(model)]


def num_params(model: nn.Module) -> int:
    """Length of the model's flat vector."""
    return sum(v.numel() for _, v in _float_entries(model))


def get_flat_params(model: nn.Module) -> torch.Tensor:
    """A detached copy of the model's floating-point state as one vector."""
    entries = _float_entries(model)
    return torch.cat([v.detach().reshape(-1) for _, v in entries]).clone()


@torch.no_grad()
def set_flat_params(model: nn.Module, flat: torch.Tensor) -> None:
    """Load a flat vector produced by :func:`get_flat_params` into ``model`` in place."""
    state = model.state_dict()
    offset = 0
    for name, value in _float_entries(model):
        n = value.numel()
        state[name].copy_(flat[offset : offset + n].view_as(value))
        offset += n
    if offset != flat.numel():
        raise ValueError(f"flat vector has {flat.numel()} entries, the model needs {offset}")
