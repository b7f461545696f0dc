"""Client side: the local trainer, the update pipeline, and one client's part of a round."""

from confide.client.pipeline import ClientPipeline, StageContext
from confide.client.round import ClientResult, ClientTask, run_client_task
from confide.client.trainer import FitOutput, LocalTrainer, TrainSettings, evaluate_model

__all__ = [
    "ClientPipeline",
    "StageContext",
    "ClientResult",
    "ClientTask",
    "run_client_task",
    "FitOutput",
    "LocalTrainer",
    "TrainSettings",
    "evaluate_model",
]
