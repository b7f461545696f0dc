"""Model registry: ``logreg``, ``mlp``, ``lenet`` and any ``module:factory`` path.

A factory takes ``input_shape`` (one sample's shape) and ``num_classes`` as keyword arguments
and returns a ``torch.nn.Module`` mapping a batch to class logits.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable

from torch import nn

from confide.exceptions import ModelError

__all__ = ["build_model", "register_model", "available_models", "LeNet", "MLP", "FemnistCNN"]

ModelFactory = Callable[..., nn.Module]
_MODELS: dict[str, ModelFactory] = {}


def register_model(name: str, factory: ModelFactory) -> None:
    """Register ``factory`` under ``name``; a duplicate name is an error."""
    if name in _MODELS:
        raise ModelError(f"model {name!r} is already registered")
    _MODELS[name] = factory


def available_models() -> list[str]:
    """Registered model names."""
    return sorted(_MODELS)


class MLP(nn.Module):
    """Two hidden ReLU layers; flattens its input."""

    def __init__(self, in_features: int, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):  # noqa: D102
        return self.net(x)


class LeNet(nn.Module):
    """The NIID-Bench CNN (Li et al., ICDE 2022): conv 6, conv 16, fc 120, fc 84."""

    def __init__(self, channels: int, height: int, width: int, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 6, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        h = ((height - 4) // 2 - 4) // 2
        w = ((width - 4) // 2 - 4) // 2
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * h * w, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x):  # noqa: D102
        return self.classifier(self.features(x))


def _logreg(*, input_shape: tuple[int, ...], num_classes: int, **_: object) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))


def _mlp(*, input_shape: tuple[int, ...], num_classes: int, hidden_units: int = 128,
         **_: object) -> nn.Module:
    return MLP(math.prod(input_shape), hidden_units, num_classes)


def _lenet(*, input_shape: tuple[int, ...], num_classes: int, **_: object) -> nn.Module:
    if len(input_shape) != 3 or input_shape[1] < 16 or input_shape[2] < 16:
        raise ModelError(
            f"model 'lenet' needs images shaped (channels, height>=16, width>=16); this "
            f"dataset's samples are shaped {tuple(input_shape)} - use 'mlp' or 'logreg'"
        )
    return LeNet(input_shape[0], input_shape[1], input_shape[2], num_classes)


class FemnistCNN(nn.Module):
    """LEAF's FEMNIST CNN (Caldas et al. 2018, ``models/femnist/cnn.py``).

    conv 5x5 32 'same', pool, conv 5x5 64 'same', pool, fc 2048, fc classes: 6.6M parameters
    on 28x28 input.
    """

    def __init__(self, channels: int, height: int, width: int, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * (height // 4) * (width // 4), 2048),
            nn.ReLU(),
            nn.Linear(2048, num_classes),
        )

    def forward(self, x):  # noqa: D102
        return self.classifier(self.features(x))


def _femnist_cnn(*, input_shape: tuple[int, ...], num_classes: int, **_: object) -> nn.Module:
    if len(input_shape) != 3 or input_shape[1] < 4 or input_shape[2] < 4:
        raise ModelError(
            f"model 'femnist_cnn' needs images shaped (channels, height>=4, width>=4); this "
            f"dataset's samples are shaped {tuple(input_shape)}"
        )
    return FemnistCNN(input_shape[0], input_shape[1], input_shape[2], num_classes)


register_model("logreg", _logreg)
register_model("mlp", _mlp)
register_model("lenet", _lenet)
register_model("femnist_cnn", _femnist_cnn)


def _import_factory(path: str) -> ModelFactory:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure of user code is a model error
        raise ModelError(f"model {path!r}: cannot import {module_name!r} ({exc})") from None
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise ModelError(f"model {path!r}: {module_name!r} has no callable {attr!r}")
    return factory


def build_model(name: str, *, input_shape: tuple[int, ...], num_classes: int,
                hidden_units: int = 128) -> nn.Module:
    """Build the model ``name`` (registered, or ``module:factory``) for this data shape."""
    if ":" in name:
        factory = _import_factory(name)
    elif name in _MODELS:
        factory = _MODELS[name]
    else:
        raise ModelError(
            f"unknown model {name!r}; available: {', '.join(available_models())}, "
            "or a 'package.module:factory' path"
        )
    kwargs = {"input_shape": tuple(input_shape), "num_classes": num_classes,
              "hidden_units": hidden_units}
    try:
        params = inspect.signature(factory).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            kwargs = {k: v for k, v in kwargs.items() if k in params}
    except (TypeError, ValueError):
        pass
    try:
        model = factory(**kwargs)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"model {name!r} could not be built: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"model {name!r}: the factory returned {type(model).__name__}, "
                         "not a torch.nn.Module")
    return model
