"""Confide: federated learning with secure aggregation, differential privacy and TLS.

The curated public API; everything else is importable from its subpackage but not promised.
"""

from confide.app.simulate import build_simulation, run_simulation
from confide.config import Config, load_config
from confide.exceptions import ConfideError
from confide.models import build_model, register_model
from confide.simulations.executors import register_executor
from confide.strategies import ClientRule, RoundInstructions, Strategy, register_strategy

__version__ = "0.1.0"

__all__ = [
    "Config",
    "load_config",
    "ConfideError",
    "build_model",
    "register_model",
    "register_executor",
    "build_simulation",
    "run_simulation",
    "Strategy",
    "ClientRule",
    "RoundInstructions",
    "register_strategy",
    "__version__",
]
