"""Model weights as one flat vector.

Everything that crosses the client/server boundary (global weights, client updates, control
variates) is a single 1-D tensor in the model's ``state_dict`` order. Clipping, secure
aggregation and DP noise then act on one vector, as the papers state them.

:func:`flat_layout` is the one definition of that vector: which entries are in it (the
floating-point ``state_dict`` entries, buffers included, tied weights once per name) and in
what order. Every reader and writer of flat vectors (:func:`get_flat_params`,
:func:`set_flat_params`, the local trainer's optimizer slices, the vectorized executor's
stacked weights) is built on it, so checkpoints and updates agree on the layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["FlatEntry", "flat_layout", "get_flat_params", "set_flat_params", "num_params",
           "param_shapes"]


@dataclass(frozen=True)
class FlatEntry:
    """One floating-point ``state_dict`` entry and where it lives in the flat vector."""

    name: str
    shape: tuple[int, ...]
    start: int
    stop: int
    #: a parameter (``named_parameters``), not a buffer
    parameter: bool
    requires_grad: bool

    @property
    def numel(self) -> int:
        """Number of entries."""
        return self.stop - self.start


def flat_layout(model: nn.Module, *, state: dict[str, torch.Tensor] | None = None
                ) -> list[FlatEntry]:
    """The flat vector's entries in order: floating-point ``state_dict`` entries.

    ``state`` is ``model.state_dict()`` when the caller already has it.
    """
    params = dict(model.named_parameters())
    state = model.state_dict() if state is None else state
    out, offset = [], 0
    for name, value in state.items():
        if not torch.is_floating_point(value):
            continue
        n = value.numel()
        p = params.get(name)
        out.append(FlatEntry(name, tuple(value.shape), offset, offset + n, p is not None,
                             bool(p is not None and p.requires_grad)))
        offset += n
    return out


def param_shapes(model: nn.Module) -> list[tuple[str, torch.Size]]:
    """Names and shapes of the floating-point state, in flat-vector order."""
    return [(e.name, torch.Size(e.shape)) for e in flat_layout(model)]


def num_params(model: nn.Module) -> int:
    """Length of the model's flat vector."""
    layout = flat_layout(model)
    return layout[-1].stop if layout else 0


def get_flat_params(model: nn.Module) -> torch.Tensor:
    """A detached copy of the model's floating-point state as one vector."""
    state = model.state_dict()
    return torch.cat([state[e.name].detach().reshape(-1)
                      for e in flat_layout(model, state=state)]).clone()


@torch.no_grad()
def set_flat_params(model: nn.Module, flat: torch.Tensor) -> None:
    """Load a flat vector produced by :func:`get_flat_params` into ``model`` in place."""
    state = model.state_dict()
    layout = flat_layout(model, state=state)
    size = layout[-1].stop if layout else 0
    if size != flat.numel():
        raise ValueError(f"flat vector has {flat.numel()} entries, the model needs {size}")
    for e in layout:
        state[e.name].copy_(flat[e.start:e.stop].view(e.shape))
