"""The client pipeline's compression stage: what a client sends instead of its dense update.

Placed after client-level clipping (central DP's clip stage, DP-SGD's attribution) and before
any secure-aggregation encoding (the aggregator's), so what is compressed is what the
mechanism bounded, and what is masked is what was compressed. The stage returns the *decoded*
payload, the dense vector the server reconstructs from the wire bytes, so every aggregator
sums exactly what a client sent; ``info["bytes_up"]`` holds the payload's exact size.

Error feedback (Karimireddy et al. 2019, Alg. 2): the residual ``e`` is per-client state, read
from ``StageContext.state`` and written to ``StageContext.new_state`` under
:data:`RESIDUAL_KEY`; it travels with a strategy's own client state (SCAFFOLD's ``c_i``) to the
coordinator's ``client_states`` and into the checkpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

from confide.client.pipeline import StageContext
from confide.compression import UpdateCodec
from confide.exceptions import ConfigError

__all__ = ["CompressionStage", "RESIDUAL_KEY", "BYTES_UP_KEY", "DIM_KEY", "ROUND_KEY",
           "PAYLOAD_KEY"]

#: client-state key of the error-feedback residual ``e``
RESIDUAL_KEY = "compression_residual"
#: ``StageContext.info`` key: bytes of this client's upload payload
BYTES_UP_KEY = "bytes_up"
#: ``StageContext.info`` key: how many leading coordinates were compressed
DIM_KEY = "compression_dim"
#: ``StageContext.info`` key: the round whose shared seeds the payload used
ROUND_KEY = "compression_round"
#: ``StageContext.info`` key (with ``keep_payload``): this client's own
#: :class:`~confide.compression.CompressedUpdate`, what a deployed client sends in its reply
PAYLOAD_KEY = "compression_payload"


class CompressionStage:
    """Compress, then decode, each client update; keep the residual with error feedback.

    ``dim`` is the model's parameter count: columns past it (adaptive clipping's indicator)
    are passed through uncompressed and counted as float32. ``clip_norm`` (client-level DP)
    returns the clip norm of the round, applied to ``u + e`` before compressing so the sent
    vector stays within the mechanism's sensitivity.

    ``keep_payload`` (a deployed client): each client's payload rows are also kept under
    :data:`PAYLOAD_KEY`, so its reply carries the compressed arrays, not the dense vector
    (:func:`confide.client.messages.encode_result`); the coordinator decodes them.
    """

    def __init__(self, codec: UpdateCodec, *, dim: int,
                 clip_norm: Callable[[], float | None] | None = None,
                 keep_payload: bool = False) -> None:
        self.codec = codec
        self.dim = int(dim)
        self.clip_norm = clip_norm
        self.keep_payload = keep_payload

    def __call__(self, update: torch.Tensor, context: StageContext) -> torch.Tensor:
        """The per-client form: one row of :meth:`batch`."""
        return self.batch(update.reshape(1, -1), [context]).reshape(update.shape)

    def batch(self, updates: torch.Tensor, contexts: Sequence[StageContext]) -> torch.Tensor:
        """Compress a cohort ``[n, dim]`` as tensor operations on its device."""
        rounds = {c.server_round for c in contexts}
        if len(rounds) != 1:
            raise ConfigError("a compressed cohort must come from one round (shared seeds)")
        server_round = rounds.pop()
        head, tail = updates[:, : self.dim], updates[:, self.dim:]
        residuals = None
        if self.codec.error_feedback and self.codec.method != "none":
            zeros = torch.zeros(self.dim, dtype=torch.float32, device=updates.device)
            residuals = torch.stack([c.state.get(RESIDUAL_KEY, zeros).to(updates.device)
                                     for c in contexts])
        clip = self.clip_norm() if self.clip_norm is not None else None
        payload, new_residuals = self.codec.encode(
            head, server_round=server_round, client_ids=[c.client_id for c in contexts],
            residuals=residuals, clip_norm=clip)
        dense = self.codec.decode(payload).to(updates.dtype)
        per_client = payload.nbytes // max(1, len(contexts)) + 4 * int(tail.shape[1])
        for row, ctx in enumerate(contexts):
            ctx.info[BYTES_UP_KEY] = per_client
            ctx.info[DIM_KEY] = self.dim  # what secure aggregation's randk/qsgd paths read
            ctx.info[ROUND_KEY] = server_round  # whose shared seed chose random-k's support
            if new_residuals is not None:
                ctx.new_state[RESIDUAL_KEY] = new_residuals[row]
            if self.keep_payload and not tail.shape[1]:
                ctx.info[PAYLOAD_KEY] = dataclasses.replace(payload, arrays={
                    k: v[row:row + 1].detach().cpu() for k, v in payload.arrays.items()})
        return torch.cat([dense, tail], dim=1) if tail.shape[1] else dense
