"""Confide: federated learning with secure aggregation, differential privacy and TLS.

The curated public API; everything else is importable from its subpackage but not promised.
Names are imported on first use (PEP 562), so ``import confide`` (and the ``confide`` command's
``--help``) does not pay for torch until something that needs it is touched.
"""

import importlib as _importlib
from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

if _TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from confide.app.simulate import build_simulation as build_simulation
    from confide.app.simulate import run_simulation as run_simulation
    from confide.config import Config as Config
    from confide.config import load_config as load_config
    from confide.exceptions import ConfideError as ConfideError
    from confide.models import build_model as build_model
    from confide.models import register_model as register_model
    from confide.simulations.executors import register_executor as register_executor
    from confide.strategies import ClientRule as ClientRule
    from confide.strategies import RoundInstructions as RoundInstructions
    from confide.strategies import Strategy as Strategy
    from confide.strategies import register_strategy as register_strategy

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "Config": "confide.config",
    "load_config": "confide.config",
    "ConfideError": "confide.exceptions",
    "build_model": "confide.models",
    "register_model": "confide.models",
    "register_executor": "confide.simulations.executors",
    "build_simulation": "confide.app.simulate",
    "run_simulation": "confide.app.simulate",
    "Strategy": "confide.strategies",
    "ClientRule": "confide.strategies",
    "RoundInstructions": "confide.strategies",
    "register_strategy": "confide.strategies",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> _Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'confide' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    # the public API plus dunders; helpers of this module and loaded submodules stay out
    return sorted({*__all__, *(name for name in globals() if name.startswith("__"))})
