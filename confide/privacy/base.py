"""What the coordinator asks of the privacy layer, at DESIGN.md's steps 4, 6 and 8.

:class:`RoundPrivacy` with every hook a no-op is "privacy off". Differential-privacy modes
implement the hooks (client stages such as clipping, server noise, accounting) in their own
classes; the coordinator calls the same hooks whatever the mode.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from confide.client.pipeline import UpdateStage
from confide.client.trainer import LocalTrainer

if TYPE_CHECKING:
    from confide.round import Aggregate, ResultBatch

__all__ = ["RoundPrivacy", "SampleLevelDP"]


@dataclass(frozen=True)
class SampleLevelDP:
    """DP-SGD as the clients run it (Opacus: per-sample clipping to ``max_grad_norm``, Gaussian
    noise of ``noise_multiplier * max_grad_norm`` per step; Abadi et al. 2016, Alg. 1).
    """

    noise_multiplier: float
    max_grad_norm: float


class RoundPrivacy:
    """Privacy hooks of the round loop; this base class is privacy off."""

    #: ``examples`` (FedAvg) or ``uniform`` (client-level DP bounds each client's weight)
    weighting: str = "examples"
    #: overrides ``cohort.sampling`` when the accountant needs a particular scheme
    sampling: str | None = None

    def client_stages(self) -> list[UpdateStage]:
        """Step 4: stages appended to every client's update pipeline."""
        return []

    def make_trainer(self, model: torch.nn.Module, device: torch.device) -> LocalTrainer:
        """The local trainer clients use (DP-SGD returns an Opacus-backed one)."""
        return LocalTrainer(model, device)

    def attach_run_dir(self, run_dir: Path) -> None:
        """Before the first round (after ``load_state_dict`` on resume): the run folder,
        where a DP mode keeps (and reconciles) its privacy ledger.
        """

    def observe_results(self, batch: ResultBatch, server_round: int) -> None:
        """After step 4: what the clients reported (DP-SGD clients report their privacy
        events in the batch's ``info`` rows, in simulation and deployment alike).
        """

    def sample_level_dp(self) -> SampleLevelDP | None:
        """The DP-SGD settings clients train with (``None`` when training is not DP-SGD).

        Executors that train a cohort their own way (the vectorized executor) ask the privacy
        object this, rather than recognising a trainer's class. Raises ``ConfigError`` with the
        reason when the clients' DP-SGD cannot be reproduced outside its own trainer.
        """
        return None

    def admit_cohort(self, cohort: np.ndarray, server_round: int) -> np.ndarray:
        """After step 1: the sampled clients that may take part (a mechanism that promised a
        participation pattern refuses the others here, before they get work).
        """
        return cohort

    def check_budget(self, server_round: int, num_sampled_expected: int) -> None:
        """Before a round: raise PrivacyBudgetExceeded if it would overspend."""

    def process_aggregate(self, aggregate: Aggregate, server_round: int) -> Aggregate:
        """Step 6: central noise or distributed-DP decoding of the sum."""
        return aggregate

    def account(self, server_round: int, run_dir: Path | None) -> float | None:
        """Step 8: record the round's privacy event; return epsilon spent so far (or None)."""
        return None

    def round_metrics(self) -> dict[str, float]:
        """Extra per-round values for the history (e.g. the adaptive clip norm)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Ledger and mechanism state saved in every checkpoint."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
