"""Simulation mode: datasets, partitioners, executors and the one-call runner."""

from confide.simulations.datasets import FederatedDataset, available_datasets, load_dataset
from confide.simulations.executors import (
    Executor,
    SequentialExecutor,
    available_executors,
    register_executor,
)
from confide.simulations.partition import partition

__all__ = [
    "FederatedDataset",
    "available_datasets",
    "load_dataset",
    "Executor",
    "SequentialExecutor",
    "available_executors",
    "register_executor",
    "partition",
]
