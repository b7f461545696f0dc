"""Federated optimisation strategies: the contract, the registry and the built-ins."""

from confide.strategies.base import ClientRule, NoParams, RoundInstructions, Strategy
from confide.strategies.fedavg import FedAvg
from confide.strategies.registry import (
    available_strategies,
    get_strategy,
    register_strategy,
    strategy_origin,
)

register_strategy("fedavg", FedAvg)

__all__ = [
    "Strategy",
    "ClientRule",
    "RoundInstructions",
    "NoParams",
    "FedAvg",
    "register_strategy",
    "get_strategy",
    "available_strategies",
    "strategy_origin",
]
