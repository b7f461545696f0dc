"""The one job builder: model factory, initial weights, strategy, privacy, client pipeline.

Simulation, deployment (coordinator side) and the client side each call :func:`build_job`, so
a job means the same thing in every runtime: the same model and parameter layout, the same
seeded initial weights, the same strategy and privacy layer, the same client pipeline.
The parameter count comes from the model factory alone; no data is loaded here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from confide.client.compression import CompressionStage
from confide.client.pipeline import ClientPipeline, UpdateStage
from confide.compression import UpdateCodec
from confide.config import Config
from confide.field_quantisation import uses_field_quantisation
from confide.models import build_model
from confide.parameters import get_flat_params
from confide.privacy import build_round_privacy
from confide.privacy.base import RoundPrivacy
from confide.seeding import derive_seed
from confide.strategies.aux_vectors import check_aux_contract
from confide.strategies.base import Strategy
from confide.strategies.registry import get_strategy

__all__ = ["Job", "build_job"]


@dataclass
class Job:
    """A built job: everything a runtime needs besides data and transport."""

    config: Config
    input_shape: tuple[int, ...]
    num_classes: int
    model_factory: Callable[[], nn.Module]
    #: the seeded initial global weights, flat, on the CPU
    params: torch.Tensor
    strategy: Strategy
    privacy: RoundPrivacy
    pipeline: ClientPipeline

    @property
    def dim(self) -> int:
        """Length of the flat parameter vector."""
        return int(self.params.numel())


def build_job(config: Config, *, input_shape: tuple[int, ...], num_classes: int,
              num_clients: int, dataset_size: int) -> Job:
    """Assemble ``config``'s job for a federation of ``num_clients`` clients.

    ``dataset_size`` is the federation's training-set size (DP modes that need it). The
    initial weights are drawn from ``run.seed`` (seeding.py), so every runtime starts from
    the same model.
    """
    dtype = torch.get_default_dtype()
    shape = tuple(int(s) for s in input_shape)

    def model_factory() -> nn.Module:
        return build_model(config.model.name, input_shape=shape, num_classes=num_classes,
                           hidden_units=config.model.hidden_units).to(dtype)

    torch.manual_seed(derive_seed(config.run.seed, "model-init"))
    params = get_flat_params(model_factory()).detach().cpu()
    strategy = get_strategy(config.strategy.name).from_options(config.strategy.options)
    strategy.check_compatible(secure_aggregation=config.secure_aggregation.enabled)
    # The aux-vector contract, before anything runs: one line, not per-client aborts.
    check_aux_contract(strategy, dim=int(params.numel()),
                       secure_aggregation=config.secure_aggregation.enabled,
                       clipping_range=config.secure_aggregation.clipping_range,
                       privacy_mode=config.privacy.mode)
    privacy = build_round_privacy(config, num_clients=num_clients, dataset_size=dataset_size,
                                  dim=int(params.numel()))
    stages = list(privacy.client_stages())
    compression = compression_stage(config, privacy=privacy, dim=int(params.numel()))
    if compression is not None:
        stages.append(compression)
    return Job(config=config, input_shape=shape, num_classes=int(num_classes),
               model_factory=model_factory, params=params, strategy=strategy,
               privacy=privacy, pipeline=ClientPipeline(stages))


#: where the compression stage sits, written to the privacy ledger's settings
COMPRESSION_ORDER = ("after client-level clipping (clip_norm applied to update + residual), "
                     "before the server's noise and before secure aggregation's encoding")


def compression_stage(config: Config, *, privacy: RoundPrivacy, dim: int) -> UpdateStage | None:
    """``[compression]``'s client stage (``None`` for ``method = "none"`` and for QSGD in the
    secure-aggregation field, which each client's side of the protocol quantises).

    It goes last in the client pipeline: after client-level clipping and DP-SGD, before any
    secure-aggregation encoding (the aggregator's). Under client-level DP the ledger's
    settings say so (``compression``, ``compression_order``).
    """
    comp = config.compression
    if comp.method == "none":
        return None
    field = uses_field_quantisation(config)
    ledger = getattr(privacy, "ledger", None)
    if ledger is not None:
        ledger.settings["compression"] = (
            f"{comp.method} (ratio {comp.ratio}, bits {comp.bits}, "
            f"error_feedback {comp.error_feedback}"
            + (f", rotated into the SecAgg field, clip_norm {comp.clip_norm})" if field else ")"))
        ledger.settings["compression_order"] = (
            "after DP-SGD training (post-processing)" if config.privacy.mode == "dp-sgd"
            else COMPRESSION_ORDER)
    if field:
        # QSGD in the secure-aggregation field is quantised by each client's side of the
        # protocol, once its weight is known (confide.privacy.secagg.compressed)
        return None
    codec = UpdateCodec.from_config(config)
    clip_norm = None
    if config.privacy.mode == "central":
        def clip_norm() -> float | None:  # the round's clip norm (adaptive clipping moves it)
            return float(privacy.clip_norm)  # type: ignore[attr-defined]
    return CompressionStage(codec, dim=dim, clip_norm=clip_norm)
