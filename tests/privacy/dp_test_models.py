"""Model factories for DP-SGD tests (``model.name = "dp_test_models:<factory>"``)."""

from __future__ import annotations

import math

from torch import nn


def batchnorm_mlp(*, input_shape, num_classes, **_):
    """An MLP with BatchNorm: Opacus cannot compute per-sample gradients through it."""
    d = math.prod(input_shape)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, 16), nn.BatchNorm1d(16), nn.ReLU(),
                         nn.Linear(16, num_classes))
