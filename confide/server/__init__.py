"""The coordinator: round loop, cohort sampling, checkpoints, history; CA, enrolment, gateway."""

from confide.server.coordinator import Coordinator
from confide.server.sampling import sample_cohort

__all__ = ["Coordinator", "sample_cohort"]
