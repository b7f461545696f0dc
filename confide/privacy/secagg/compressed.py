"""What enters secure aggregation when clients compress (``confide.compression``).

Three ways a compressed update becomes the protocol's input, each a function of the rows a
round reports; each returns the rows to mask and how to read the unmasked sum:

``randk``        every client kept the same ``k`` coordinates (the round's shared seed), so
                 only those ``k`` values enter the protocol (SecAgg's own fixed-point
                 quantiser, ``secure_aggregation.bits`` per word, packed at that width); the
                 decoded sum is densified with zeros elsewhere.
``qsgd`` (wide)  a shared-scale QSGD payload's integer codes ``c_i`` times the client's integer
                 weight, summed exactly in Z_2^b; the field must hold ``n * max_weight * s``.
``qsgd`` (field) with ``compression.clip_norm`` set: rotated stochastic quantisation into
                 Z_2^bits with ``bits = compression.bits`` (8-bit words for 8-bit QSGD), weights
                 applied before quantising, counts carried as limbs
                 (:mod:`confide.field_quantisation`, which states the bounds and cites them).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from confide.compression import UpdateCodec, check_field
from confide.config import Config, SecureAggregationConfig
from confide.exceptions import ConfigError, PrivacyError, RoundFailedError
from confide.field_quantisation import (
    FieldQuantiser,
    field_scale,
    from_limb_sums,
    limb_bits,
    to_limbs,
    uses_field_quantisation,
)
from confide.privacy.secagg.metadata import LOSS_CAP
from confide.privacy.secagg.quantisation import centred_lift
from confide.round import Aggregate, ClientResult
from confide.seeding import derive_seed

__all__ = ["uses_field_quantisation", "check_field_settings", "check_wide_qsgd_field",
           "compressed_inputs", "FIELD_META", "ENCODED_INFO_KEY"]

log = logging.getLogger("confide")

#: ``ClientResult.info`` key of an update already encoded into Z_{2^b}; its value is b
ENCODED_INFO_KEY = "secagg_encoded_bits"
#: exact integers a field-QSGD client appends as limbs: its weight, then the metadata
#: (example count, step count, fixed-point loss x examples)
FIELD_META = ("weight", "num_examples", "num_steps", "loss_x_examples")
#: fixed-point units per unit of loss x examples in the limbs
_LOSS_UNITS = 2 ** 10
_VALUE_BITS = 32

Expand = Callable[[Aggregate], tuple[Aggregate, dict[str, float]]]


def check_field_settings(config: Config) -> None:
    """One-line ConfigErrors for settings the narrow field cannot honour."""
    comp = config.compression
    if comp.bits < 8:
        raise ConfigError(f"compression.bits = {comp.bits}: QSGD under secure aggregation "
                          "uses the bits as the field's word width, 8 to 16")
    if comp.error_feedback:
        raise ConfigError("compression.error_feedback = true cannot run with QSGD in the "
                          "secure-aggregation field: the rounding happens inside the "
                          "protocol's client side and is unbiased; set it to false")
    n = config.cohort_size()
    field_scale(clip_norm=float(comp.clip_norm or 0.0), num_clients=n, dim=1, bits=comp.bits)
    limb_bits(bits=comp.bits, num_clients=n)
    if LOSS_CAP * config.secure_aggregation.max_weight * _LOSS_UNITS >= 2 ** _VALUE_BITS:
        raise ConfigError(f"secure_aggregation.max_weight = "
                          f"{config.secure_aggregation.max_weight} is too large for QSGD's "
                          "exact counts in the field; lower it")


def check_wide_qsgd_field(codec: UpdateCodec, settings: SecureAggregationConfig,
                          n: int) -> None:
    """QSGD's weighted codes ``w_i * c_i`` (``|c_i| <= s``, ``w_i <= max_weight``) of ``n``
    clients must sum without wrapping Z_2^b; a one-line ConfigError names the bits needed.
    """
    if settings.bits > 53:  # the decoded words pass through float64
        raise ConfigError(f"secure_aggregation.bits = {settings.bits}: QSGD under "
                          "secure aggregation sums at most 53-bit words; lower it")
    try:
        check_field(levels=codec.levels * settings.max_weight, num_clients=n,
                    field_bits=settings.bits)
    except ConfigError:
        raise ConfigError(
            f"secure_aggregation.bits = {settings.bits} is too small for QSGD under "
            f"secure aggregation: {n} clients' codes (up to {codec.levels} levels) "
            f"times their weights (up to {settings.max_weight}) could wrap around "
            f"Z_2^{settings.bits}; raise secure_aggregation.bits, or lower "
            "compression.bits or secure_aggregation.max_weight, or set "
            "compression.clip_norm (rotated QSGD in a compression.bits-wide field)") from None


def _plain(a: Aggregate) -> tuple[Aggregate, dict[str, float]]:
    return a, {}


def compressed_inputs(codec: UpdateCodec | None, config: Config, rows_in: Sequence[ClientResult],
                      *, server_round: int, weighting: str, bits: int,
                      ) -> tuple[list[ClientResult], Expand]:
    """The protocol's inputs under compression, and how to read the decoded aggregate.

    The reader returns the aggregate and, for field QSGD, the cohort's metadata sums.
    """
    rows = list(rows_in)
    if codec is None or not rows:
        return rows, _plain
    if codec.method == "randk":
        return _randk_inputs(codec, rows, server_round)
    full = int(rows[0].update.numel())
    cdim = int(rows[0].info.get("compression_dim", full))
    if cdim != full or rows[0].aux:
        raise ConfigError("QSGD under secure aggregation sums integer codes only; "
                          "auxiliary vectors or extra coordinates (adaptive clipping, "
                          "SCAFFOLD) cannot join that sum; choose compression 'randk'")
    if uses_field_quantisation(config):
        return _field_inputs(config, rows, server_round, weighting, bits)
    return _wide_qsgd_inputs(codec, config.secure_aggregation, rows, weighting, bits)


def _randk_inputs(codec: UpdateCodec, rows: list[ClientResult], server_round: int,
                  ) -> tuple[list[ClientResult], Expand]:
    full = int(rows[0].update.numel())
    cdim = int(rows[0].info.get("compression_dim", full))
    chosen = sorted({int(r.info.get("compression_round", server_round)) for r in rows})
    supports = [codec.shared_indices(cdim, server_round=c) for c in chosen]
    if any(not torch.equal(supports[0], other) for other in supports[1:]):
        # e.g. a FedBuff buffer of clients that started in different rounds
        raise RoundFailedError(
            f"round {server_round}: random-k payloads from rounds {chosen} keep "
            "different coordinates; secure aggregation needs one shared support")
    idx = supports[0]
    kept = [dataclasses.replace(r, update=torch.cat(
        [r.update.reshape(-1)[idx], r.update.reshape(-1)[cdim:]])) for r in rows]

    def densify(a: Aggregate) -> tuple[Aggregate, dict[str, float]]:
        short = a.update_sum.reshape(-1)
        dense = torch.zeros(full, dtype=short.dtype)
        dense[idx] = short[: idx.numel()]
        dense[cdim:] = short[idx.numel():]
        return dataclasses.replace(a, update_sum=dense), {}

    return kept, densify


def _wide_qsgd_inputs(codec: UpdateCodec, settings: SecureAggregationConfig,
                      rows: list[ClientResult], weighting: str, bits: int,
                      ) -> tuple[list[ClientResult], Expand]:
    """Each row is a decoded payload ``c_i * scale / s``; its integer codes ``c_i`` are
    recovered exactly (``|c_i| <= 2^15``, float32 relative error 2^-24), weighted by the
    client's integer weight, and summed in Z_2^b with the weight as one more coordinate; the
    centred lift of the sum is exact under :func:`check_wide_qsgd_field`.
    """
    check_wide_qsgd_field(codec, settings, len(rows))
    scale, s = float(codec.scale or 0.0), codec.levels
    encoded = []
    for r in rows:
        codes = torch.round(r.update.reshape(-1).double() * (s / scale)).to(torch.int64)
        if bool((codes.abs() > s).any()):
            raise PrivacyError(f"client {r.client_id}'s update is not a QSGD payload of "
                               f"{s} levels at scale {scale}")
        w = min(int(r.num_examples), settings.max_weight) if weighting == "examples" else 1
        encoded.append(dataclasses.replace(
            r, update=torch.cat([codes * w, torch.tensor([w])]),
            info={**r.info, ENCODED_INFO_KEY: bits}))

    def dequantise(a: Aggregate) -> tuple[Aggregate, dict[str, float]]:
        raw = a.update_sum.to(torch.int64).numpy()  # the modular sum, words < 2^b
        signed = torch.from_numpy(centred_lift(raw, bits))
        update_sum = signed[:-1].to(torch.float64) * (scale / s)
        return dataclasses.replace(a, update_sum=update_sum.to(torch.float32),
                                   weight_sum=float(signed[-1])), {}

    return encoded, dequantise


def field_quantiser(config: Config, *, dim: int, server_round: int) -> FieldQuantiser:
    """The round's :class:`FieldQuantiser`, sized for the configured cohort."""
    comp = config.compression
    return FieldQuantiser(bits=comp.bits, dim=dim, clip_norm=float(comp.clip_norm or 0.0),
                          num_clients=config.cohort_size(),
                          seed=derive_seed(config.run.seed, "compression", "field",
                                           server_round))


def _field_inputs(config: Config, rows: list[ClientResult], server_round: int,
                  weighting: str, bits: int) -> tuple[list[ClientResult], Expand]:
    """Rotated QSGD into Z_2^bits (what each client's side of the protocol computes).

    The weight factor is ``w_i / max_weight`` under example weighting (the weight is applied
    before quantising, so the sum's range does not grow with it), 1 under uniform weighting;
    the integer weight and the metadata follow as limbs (exact sums).
    """
    n, dim = len(rows), int(rows[0].update.numel())
    fq = field_quantiser(config, dim=dim, server_round=server_round)
    if n > fq.num_clients:  # the overflow bound was sized for cohort.size clients
        log.warning("round %d: %d clients in one secure sum, more than the %d the QSGD field "
                    "was sized for; the overflow bound no longer holds", server_round, n,
                    fq.num_clients)
    width = limb_bits(bits=bits, num_clients=max(n, fq.num_clients))
    cap = config.secure_aggregation.max_weight
    weights = [min(int(r.num_examples), cap) if weighting == "examples" else 1 for r in rows]
    if weighting == "examples" and any(int(r.num_examples) > cap for r in rows):
        log.warning("client weights above secure_aggregation.max_weight = %d are capped "
                    "(round %d)", cap, server_round)
    factors = torch.tensor([w / cap if weighting == "examples" else 1.0 for w in weights])
    x = torch.stack([r.update.reshape(-1).to(torch.float64) for r in rows])
    codes = fq.codes(x, client_ids=[r.client_id for r in rows], factors=factors)
    meta = torch.tensor([[w, min(max(int(r.num_examples), 0), cap),
                          min(max(int(r.num_steps), 0), 2 ** _VALUE_BITS - 1),
                          _loss_units(r, cap)] for r, w in zip(rows, weights, strict=True)],
                        dtype=torch.int64)
    limbs = to_limbs(meta, width=width, value_bits=_VALUE_BITS)
    by_id = {r.client_id: i for i, r in enumerate(rows)}
    encoded = [dataclasses.replace(r, update=torch.cat([fq.embed(codes[i]), limbs[i]]),
                                   info={**r.info, ENCODED_INFO_KEY: bits})
               for i, r in enumerate(rows)]

    def decode(a: Aggregate) -> tuple[Aggregate, dict[str, float]]:
        words = a.update_sum.to(torch.int64).reshape(-1)[: dim + limbs.shape[1]]
        total = fq.decode_sum(words[:dim])  # sum_i a_i clip(x_i)
        sums = from_limb_sums(words[dim:], width=width, value_bits=_VALUE_BITS).tolist()
        weight_sum, examples, steps, loss_units = (float(v) for v in sums)
        if weighting == "examples":
            total = total * cap  # sum_i w_i clip(x_i), as every aggregator returns
        included = [by_id[c] for c in a.client_ids]
        wrapped = fq.wrapped(codes[included].sum(dim=0))  # simulation-only diagnostic
        peak = float(fq.lift(words[:dim]).abs().max()) / fq.max_code
        log.debug("field sum: round %d, %d coordinates wrapped, peak %.3f of the range",
                  server_round, wrapped, peak)
        if wrapped:
            log.warning("round %d: the QSGD field sum wrapped on %d coordinates (the "
                        "clients' updates exceeded compression.clip_norm's bound?)",
                        server_round, wrapped)
        meta_sums: dict[str, Any] = {
            "num_examples": examples, "num_steps": steps,
            "train_loss": loss_units / _LOSS_UNITS / examples if examples > 0 else 0.0,
            "field_wrapped": float(wrapped), "field_peak": peak}
        return dataclasses.replace(a, update_sum=total.to(torch.float32),
                                   weight_sum=weight_sum), meta_sums

    return encoded, decode


def _loss_units(r: ClientResult, cap: int) -> int:
    loss = float(r.metrics.get("train_loss", 0.0))
    loss = min(max(loss, 0.0), LOSS_CAP) if loss == loss else 0.0  # NaN -> 0
    return int(round(loss * min(max(int(r.num_examples), 0), cap) * _LOSS_UNITS))
