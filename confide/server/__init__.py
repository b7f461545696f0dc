"""The coordinator: round loop, cohort sampling, aggregation, checkpoints and history."""

from confide.server.aggregation import Aggregate, Aggregator, PlainAggregator
from confide.server.coordinator import Coordinator
from confide.server.sampling import sample_cohort

__all__ = ["Aggregate", "Aggregator", "PlainAggregator", "Coordinator", "sample_cohort"]
