"""The flat-parameter layout as the vectorized executor trains it.

The layout itself (which tensors, in what order) is :func:`confide.parameters.flat_layout`,
the one definition every flat vector uses; :class:`ModelLayout` adds what the cohort trainer
needs beside it: which entries train, the sample shape, activation sizes, lowered convs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from confide.parameters import FlatEntry, flat_layout

__all__ = ["ModelLayout", "model_layout"]


@dataclass(frozen=True)
class ModelLayout:
    """The flat-vector layout of a model (``confide.parameters`` order) and what trains."""

    entries: tuple[FlatEntry, ...]
    size: int
    sample_shape: tuple[int, ...]
    #: activation elements per sample (module outputs, unfolded inputs), for memory sizing
    activation_numel: int
    #: Conv2d modules run as unfold + batched matmul
    unfolded: tuple[str, ...] = ()
    #: names of the entries the optimizer updates (parameters with a gradient)
    trained: frozenset[str] = frozenset()

    @property
    def trainable(self) -> list[FlatEntry]:
        """The entries the optimizer updates."""
        return [e for e in self.entries if e.name in self.trained]

    @property
    def trainable_numel(self) -> int:
        """Number of trained weights per client."""
        return sum(e.numel for e in self.trainable)


def model_layout(model: nn.Module, sample: torch.Tensor, unused: set[str],
                 unfolded: Sequence[str]) -> ModelLayout:
    """The layout of ``model``; ``unused`` parameters get no gradient and do not train."""
    entries = tuple(flat_layout(model))
    trained = frozenset(e.name for e in entries
                        if e.parameter and e.requires_grad and e.name not in unused)
    numel = 0
    hooks = []

    def count(module: nn.Module, args: tuple, out: Any) -> None:
        nonlocal numel
        if isinstance(out, torch.Tensor):
            numel += out.numel()
        if isinstance(module, nn.Conv2d) and args and isinstance(args[0], torch.Tensor):
            # the unfolded input of a lowered conv (or cuDNN's workspace of a grouped one)
            numel += args[0].numel() * math.prod(module.kernel_size)

    for module in model.modules():
        if not list(module.children()):
            hooks.append(module.register_forward_hook(count))
    try:
        with torch.no_grad():
            model(sample[:1])
    finally:
        for h in hooks:
            h.remove()
    size = entries[-1].stop if entries else 0
    return ModelLayout(entries, size, tuple(sample.shape[1:]), numel, tuple(unfolded), trained)

