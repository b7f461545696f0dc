"""The secure aggregator: the coordinator learns only the sum of the cohort's contributions.

:class:`SecureAggregator` implements :class:`confide.round.Aggregator` with
SecAgg+ (:mod:`confide.privacy.secagg.protocol`). In simulation every client's side of the
protocol runs in process over :class:`~confide.privacy.secagg.transport.InProcessMessagePath`;
the stages and bytes are exactly those a deployment sends over Flower's Grid.

Per round: each reporting client's contribution ``[w * update, aux..., w]`` is quantised into
Z_{2^b} (:mod:`~confide.privacy.secagg.quantisation`), masked, and summed; the coordinator
decodes ``sum w_i u_i``, ``sum w_i`` and the auxiliary sums. Under ``privacy.mode =
"distributed"`` the clients' updates arrive already encoded in Z_{2^b} by the distributed-DP
stage, and the aggregator returns the raw modular sum for the privacy layer to decode.

Fault injection: ``simulation.dropout_stage`` may name a protocol stage (``advertise_keys``,
``share_keys``, ``masked_input``); ``simulation.dropout_rate`` of the reporting clients then
leave right after answering that stage, chosen by the run's seed.

``secure_aggregation.skip_pairwise_masks = true`` skips the cryptography entirely (NOT
SECURE: the coordinator could see every contribution) but keeps the quantisation, the
modular sum and any distributed-DP noise bit for bit, so accuracy numbers of huge
simulations stay honest. It warns loudly.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from confide.compression import UpdateCodec
from confide.config import Config
from confide.exceptions import ConfigError, PrivacyError, RoundFailedError
from confide.privacy.secagg.compressed import (
    ENCODED_INFO_KEY,
    check_field_settings,
    check_wide_qsgd_field,
    compressed_inputs,
    uses_field_quantisation,
)
from confide.privacy.secagg.graph import graph_parameters
from confide.privacy.secagg.metadata import META_FIELDS, encode_meta, meta_scale
from confide.privacy.secagg.primitives import mask_dtype
from confide.privacy.secagg.protocol import (
    INPUT_FLOATS,
    INPUT_INTEGERS,
    MIN_CLIENTS,
    STAGES,
    Contribution,
    SecAggClient,
)
from confide.privacy.secagg.protocol_server import SecAggServer
from confide.privacy.secagg.quantisation import (
    Quantiser,
    centred_lift,
    check_capacity,
    clipped_entries,
)
from confide.privacy.secagg.transport import InProcessMessagePath, run_secure_aggregation
from confide.round import Aggregate, Aggregator, ClientResult, ResultBatch
from confide.seeding import derive_rng

__all__ = ["SecureAggregator", "RoundReport", "PROTOCOL_DROPOUT_STAGES", "ENCODED_INFO_KEY"]

log = logging.getLogger("confide")


def _report_clipping(quantiser: Quantiser, contributions: Iterable[Contribution],
                     server_round: int) -> None:
    """One warning per round when the fixed-point encoding clips entries (never silent)."""
    counts = [clipped_entries(np.asarray(c.update), [np.asarray(a) for a in c.aux],
                              clipping_range=quantiser.clipping_range) for c in contributions]
    updates, aux = sum(u for u, _ in counts), sum(a for _, a in counts)
    if updates or aux:
        log.warning("secure aggregation, round %d: %d update and %d aux-vector entries lie "
                    "beyond secure_aggregation.clipping_range = %g and are clipped, which "
                    "changes the sum; raise clipping_range", server_round, updates, aux,
                    quantiser.clipping_range)

#: stages a simulated client can leave the protocol after (it answers, then goes silent)
PROTOCOL_DROPOUT_STAGES = STAGES[:-1]

INSECURE_WARNING = (
    "secure_aggregation.skip_pairwise_masks = true: NOT SECURE. Secure aggregation runs "
    "WITHOUT masks or key agreement, so the coordinator can see every client's quantised "
    "contribution. Quantisation and distributed-DP noise are kept exact; use this only to "
    "measure accuracy in large simulations."
)


@dataclass
class RoundReport:
    """What one round of secure aggregation did (for logs, tests and benchmarks)."""

    server_round: int
    cohort: list[int]
    degree: int
    threshold: int
    bits: int
    vector_length: int
    included: list[int]
    dropped: dict[int, str] = field(default_factory=dict)
    rejected: dict[int, str] = field(default_factory=dict)
    bytes_sent: dict[int, int] = field(default_factory=dict)
    bytes_received: dict[int, int] = field(default_factory=dict)
    client_seconds: dict[int, float] = field(default_factory=dict)
    coordinator_seconds: float = 0.0
    insecure: bool = False
    #: the cohort's metadata, known only as sums: num_examples, num_steps, train_loss (the
    #: example-weighted mean over the summed clients)
    metadata: dict[str, float] = field(default_factory=dict)
    #: the unmasked modular sum in Z_{2^b}, exactly what the coordinator learns (the
    #: quantised contributions and metadata of ``included``, summed)
    sum_words: np.ndarray | None = None


class _TimedPath(InProcessMessagePath):
    """The in-process path, timing each client's handlers (for the report)."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.seconds: dict[int, float] = {}

    def exchange(self, stage, requests):  # type: ignore[no-untyped-def]  # noqa: D102
        replies = {}
        for cid, request in requests.items():
            t0 = time.perf_counter()
            replies.update(super().exchange(stage, {cid: request}))
            self.seconds[cid] = self.seconds.get(cid, 0.0) + time.perf_counter() - t0
        return replies


class SecureAggregator(Aggregator):
    """SecAgg+ over the round's reporting clients (Bonawitz et al. 2017; Bell et al. 2020)."""

    dropout_stages = ("training", *PROTOCOL_DROPOUT_STAGES)
    #: rewrite the batch's counts and loss from the secure sums (a deployment, whose replies
    #: carry none of them in the clear); in simulation the batch keeps its own columns
    metadata_from_sum = False

    def __init__(self, config: Config) -> None:
        sa = config.secure_aggregation
        self.config = config
        self.settings = sa
        self.input_mode = INPUT_INTEGERS if config.privacy.mode == "distributed" else INPUT_FLOATS
        expected = config.cohort_size()
        if sa.neighbours is not None and sa.threshold is not None and sa.threshold > sa.neighbours:
            raise ConfigError(f"secure_aggregation.threshold = {sa.threshold} exceeds "
                              f"secure_aggregation.neighbours = {sa.neighbours}")
        if sa.threshold is not None and sa.threshold > expected:
            raise ConfigError(f"secure_aggregation.threshold = {sa.threshold} exceeds the "
                              f"{expected} clients of a cohort (t counts the survivors that "
                              "unmask, each client included); lower it or raise cohort.size")
        if expected < MIN_CLIENTS:
            raise ConfigError(f"secure aggregation needs cohorts of at least {MIN_CLIENTS} "
                              f"clients; cohort.size gives {expected}")
        # Compression (confide.compression): random-k runs over the k shared coordinates;
        # QSGD's integer codes are summed in the field itself (integer inputs).
        self.codec = (UpdateCodec.from_config(config)
                      if config.compression.method != "none" else None)
        if self.codec is not None and type(self).message_path is not \
                SecureAggregator.message_path:
            # A transport subclass (the Grid's) masks what the deployed clients' own SecAgg
            # stage built: the dense update, not the k values or field codes used here.
            raise ConfigError("compression with secure aggregation runs in simulation only: "
                              "the deployed clients' SecAgg stage masks the dense update; "
                              "set compression.method = 'none' for a deployment")
        #: QSGD in a compression.bits-wide field (confide.field_quantisation): the whole
        #: protocol runs at that width, and the metadata travels as limbs inside the input
        self.field_mode = uses_field_quantisation(config)
        if self.codec is not None and self.codec.method == "qsgd":
            self.input_mode = INPUT_INTEGERS
            if self.field_mode:
                check_field_settings(config)
                self.settings = sa = dataclasses.replace(sa, bits=config.compression.bits)
            else:
                check_wide_qsgd_field(self.codec, sa, expected)
        if self.input_mode == INPUT_FLOATS:
            check_capacity(cohort_size=expected, bits=sa.bits, max_weight=sa.max_weight)
        if expected >= 3:  # fails early on impossible rates
            graph_parameters(expected, dropout_rate=self._dropout_rate(),
                             corrupt_rate=sa.corruption_tolerance)
        self._capped_warned = False
        self.last_report: RoundReport | None = None
        if sa.skip_pairwise_masks:
            warnings.warn(INSECURE_WARNING, UserWarning, stacklevel=2)
            log.warning(INSECURE_WARNING)

    # ------------------------------------------------------------------ parameters
    def _dropout_rate(self) -> float:
        """The dropout rate the graph is sized for: the configured tolerance, or the
        simulation's injected protocol dropout rate when that is larger.
        """
        sim = self.config.simulation
        injected = sim.dropout_rate if sim.dropout_stage in PROTOCOL_DROPOUT_STAGES else 0.0
        return max(self.settings.dropout_tolerance, injected)

    def graph_for(self, n: int) -> tuple[int, int]:
        """``(degree, threshold)`` for ``n`` live clients (explicit settings win).

        ``t`` counts the survivors whose shares unmask a client, the client itself included
        (:mod:`~confide.privacy.secagg.protocol`), so ``t <= degree + 1``. The protocol runs
        with ``MIN_CLIENTS = 2`` live clients (why: ``protocol.MIN_CLIENTS``); at ``n = 2``
        the graph is one edge and ``t = 2``: both must survive.
        """
        sa = self.settings
        if n < MIN_CLIENTS:
            raise RoundFailedError(f"secure aggregation needs at least {MIN_CLIENTS} live "
                                   f"clients, {n} reported")
        if n >= 3:
            k, t = graph_parameters(n, dropout_rate=self._dropout_rate(),
                                    corrupt_rate=sa.corruption_tolerance)
        else:
            k, t = 1, 2
        if sa.neighbours is not None:
            k = min(sa.neighbours, n - 1)
            t = min(max(2, math.ceil(2 * k / 3)), k)
        if sa.threshold is not None:
            t = sa.threshold
        degree = min(k + k % 2, n - 1)  # Harary graphs are built with even degree
        if t > degree + 1:
            raise RoundFailedError(f"secure_aggregation.threshold = {t} exceeds the "
                                   f"{degree + 1} holders of each client's shares (its "
                                   f"{degree} neighbours and itself) among {n} live clients; "
                                   "the round cannot release a sum")
        return degree, t

    # ------------------------------------------------------------------ the round
    def aggregate(self, batch: ResultBatch, *, server_round: int,  # type: ignore[override]
                  weighting: str) -> Aggregate:
        """Run the protocol over the batch's clients and decode the sum.

        Each client's protocol messages are computed from its own row (one device-to-host
        copy of the batch: the masks and shares are computed by ``cryptography`` on the host).
        """
        device = torch.device("cpu")
        if isinstance(batch, ResultBatch):
            results: Sequence[ClientResult] = batch.results()
            device = batch.device  # the sum goes back where the global model lives
        else:  # a deployment's replies, one ClientResult per client
            results = batch
        results = sorted(results, key=lambda r: r.client_id)
        results, expand = compressed_inputs(self.codec, self.config, results,
                                            server_round=server_round, weighting=weighting,
                                            bits=self.settings.bits)
        meta_len = 0 if self.field_mode else len(META_FIELDS)
        first = results[0].update
        dim = int(first.numel())
        aux_names = sorted(results[0].aux)
        # A server whose SETUP already went out (a deployment sends it with the tasks): its
        # cohort, the clients sampled, fixes n, and so the quantiser's levels the clients use.
        prepared = self.prepared_server(server_round, [r.client_id for r in results])
        if prepared is not None and prepared.vector_length != self.vector_length(
                dim, len(aux_names), len(prepared.cohort)):
            prepared = None
        n = len(results) if prepared is None else len(prepared.cohort)
        degree, threshold = self.graph_for(n)
        for r in results:
            if sorted(r.aux) != aux_names or int(r.update.numel()) != dim:
                raise RoundFailedError(f"round {server_round}: clients report vectors of "
                                       "different shapes; secure aggregation needs one layout")
        contributions = {r.client_id: self._contribution(r, weighting, aux_names)
                         for r in results}
        bits = self.settings.bits
        if self.input_mode == INPUT_INTEGERS:
            if aux_names:
                raise PrivacyError("distributed DP does not privatise auxiliary vectors "
                                   f"({', '.join(aux_names)}); choose a strategy without them")
            vector_length = dim + 1 + meta_len
            quantiser = None
        else:
            quantiser = Quantiser(bits=bits, clipping_range=self.settings.clipping_range,
                                  max_weight=self.settings.max_weight, cohort_size=n)
            vector_length = quantiser.vector_length(dim, len(aux_names)) + len(META_FIELDS)
            _report_clipping(quantiser, contributions.values(), server_round)
        drop_after = self._protocol_dropouts([r.client_id for r in results], server_round)
        report = RoundReport(server_round=server_round, cohort=[r.client_id for r in results],
                             degree=degree, threshold=threshold, bits=bits,
                             vector_length=vector_length, included=[],
                             insecure=self.settings.skip_pairwise_masks)
        rngs = {cid: derive_rng(self.config.run.seed, "secagg-rounding", server_round, cid)
                for cid in contributions}
        t0 = time.perf_counter()
        if self.settings.skip_pairwise_masks:
            words = self._insecure_sum(contributions, drop_after, quantiser, rngs, report)
            report.sum_words = words
            report.coordinator_seconds = time.perf_counter() - t0
        else:
            server = prepared or SecAggServer(
                cohort=list(contributions), server_round=server_round, bits=bits,
                vector_length=vector_length, degree=degree, threshold=threshold,
                max_weight=self.settings.max_weight,
                clipping_range=self.settings.clipping_range, input_mode=self.input_mode)
            clients = {cid: SecAggClient(cid, server_round=server_round, rng=rngs[cid])
                       for cid in contributions}
            path = self.message_path(clients, contributions, drop_after, server_round)
            try:
                result = run_secure_aggregation(server, path)
            finally:
                elapsed = time.perf_counter() - t0
                report.client_seconds = path.seconds
                report.coordinator_seconds = elapsed - sum(path.seconds.values())
                report.dropped = dict(server.result.dropped)
                report.rejected = dict(server.result.rejected)
                self.last_report = report
            words = result.words
            report.sum_words = words
            report.included = result.included
            report.bytes_sent = result.bytes_sent
            report.bytes_received = result.bytes_received
        self.last_report = report
        log.info("secure aggregation, round %d: %d of %d clients summed (degree %d, threshold "
                 "%d, %d bits)%s", server_round, len(report.included), n, degree, threshold, bits,
                 " WITHOUT MASKS (insecure)" if report.insecure else "")
        if meta_len:
            report.metadata = self._decode_meta(words[-meta_len:], n)
        aggregate, field_meta = expand(self._decode(words[:len(words) - meta_len],
                                                    report.included, first, dim, aux_names,
                                                    quantiser))
        report.metadata.update(field_meta)  # field QSGD: the metadata came as limbs
        if self.metadata_from_sum and isinstance(batch, ResultBatch):
            self._publish_metadata(batch, report)
        return aggregate.to(device)

    def vector_length(self, dim: int, num_aux: int, n: int) -> int:
        """Words each client masks: its encoded update, weight, aux vectors and metadata."""
        if self.input_mode == INPUT_INTEGERS:
            return dim + 1 + len(META_FIELDS)
        quantiser = Quantiser(bits=self.settings.bits, clipping_range=self.settings.clipping_range,
                              max_weight=self.settings.max_weight, cohort_size=n)
        return quantiser.vector_length(dim, num_aux) + len(META_FIELDS)

    def prepared_server(self, server_round: int, reporting: list[int]) -> SecAggServer | None:
        """A server whose ``advertise_keys`` already ran for ``server_round`` (None here)."""
        return None

    def message_path(self, clients: dict[int, SecAggClient],
                     contributions: dict[int, Contribution], drop_after: dict[int, str],
                     server_round: int) -> _TimedPath:
        """How the stages reach the clients: in process here.

        A deployment overrides it to send them over Flower's Grid
        (``confide.server.secagg_transport``); the returned path has a ``seconds`` dict
        (client id -> time in its handlers) for the report.
        """
        return _TimedPath(clients, contributions, drop_after)

    def _contribution(self, r: ClientResult, weighting: str,
                      aux_names: list[str]) -> Contribution:
        if self.input_mode == INPUT_INTEGERS:
            bits = r.info.get(ENCODED_INFO_KEY)
            if bits != self.settings.bits:
                raise PrivacyError(
                    f"client {r.client_id}'s update was not encoded for a {self.settings.bits}"
                    f"-bit secure sum (privacy.mode = 'distributed' encodes it; got {bits!r})")
            if self.field_mode:  # weight and metadata are limbs inside the update
                return Contribution(update=r.update.detach().cpu().numpy().astype(np.int64),
                                    weight=0, meta=())
            return Contribution(update=r.update.detach().cpu().numpy().astype(np.int64),
                                weight=1, meta=self._meta(r))
        weight = float(r.num_examples) if weighting == "examples" else 1.0
        w = int(round(weight))
        if w != weight or w < 0:
            raise RoundFailedError(f"client {r.client_id}'s weight {weight} is not a whole "
                                   "number; secure aggregation sums integer weights")
        if w > self.settings.max_weight:
            if not self._capped_warned:
                log.warning("client weights above secure_aggregation.max_weight = %d are "
                            "capped (client %d has %d examples)", self.settings.max_weight,
                            r.client_id, w)
                self._capped_warned = True
            w = self.settings.max_weight
        return Contribution(update=r.update.detach().cpu().double().numpy(), weight=w,
                            aux=tuple(r.aux[k].detach().cpu().double().numpy()
                                      for k in aux_names), meta=self._meta(r))

    @staticmethod
    def _meta(r: ClientResult) -> tuple[float, ...]:
        """What the coordinator may learn of this client only inside the sum."""
        return (float(r.num_examples), float(r.num_steps),
                float(r.metrics.get("train_loss", 0.0)))

    def _levels(self, n: int) -> int:
        return (2 ** (self.settings.bits - 1) - 1) // n

    def _decode_meta(self, words: np.ndarray, n: int) -> dict[str, float]:
        """The metadata sums: total examples and steps, the example-weighted mean loss."""
        signed = centred_lift(words, self.settings.bits)
        examples, steps, lossx = (float(v) for v in signed)
        scale = meta_scale(self._levels(n), self.settings.max_weight)
        return {"num_examples": examples, "num_steps": steps,
                "train_loss": lossx / scale / examples if examples > 0 else 0.0}

    @staticmethod
    def _publish_metadata(batch: ResultBatch, report: RoundReport) -> None:
        """Give every summed row the cohort's mean count and the cohort's mean loss.

        The coordinator's record (example-weighted mean loss) then holds exactly the secure
        aggregate, and no row holds any one client's value.
        """
        summed = set(report.included)
        mask = torch.tensor([c in summed for c in batch.client_ids], dtype=torch.bool,
                            device=batch.num_examples.device)
        count = max(1, len(summed))
        meta = report.metadata
        zero = torch.zeros_like(batch.num_examples)
        batch.num_examples = torch.where(mask, zero + meta["num_examples"] / count, zero)
        batch.num_steps = torch.where(mask, zero + meta["num_steps"] / count, zero)
        batch.metrics = {"train_loss": torch.where(mask, zero + meta["train_loss"], zero)}

    def _protocol_dropouts(self, cohort: list[int], server_round: int) -> dict[int, str]:
        sim = self.config.simulation
        if sim.dropout_rate <= 0 or sim.dropout_stage not in PROTOCOL_DROPOUT_STAGES:
            return {}
        rng = derive_rng(self.config.run.seed, "secagg-dropout", server_round)
        n_drop = int(round(sim.dropout_rate * len(cohort)))
        chosen = rng.choice(len(cohort), size=n_drop, replace=False)
        return {cohort[int(i)]: sim.dropout_stage for i in chosen}

    def _insecure_sum(self, contributions: dict[int, Contribution], drop_after: dict[int, str],
                      quantiser: Quantiser | None, rngs: dict[int, np.random.Generator],
                      report: RoundReport) -> np.ndarray:
        """The same modular sum without any masking (skip_pairwise_masks)."""
        bits = self.settings.bits
        acc = np.zeros(report.vector_length, dtype=mask_dtype(bits))
        for cid, c in contributions.items():
            stage = drop_after.get(cid)
            if stage is not None and STAGES.index(stage) < STAGES.index("masked_input"):
                report.dropped[cid] = f"{stage}: left after this stage"
                continue
            def meta(cid: int = cid, c: Contribution = c) -> np.ndarray:  # after the update
                return encode_meta(c.meta, levels=self._levels(len(contributions)),
                                   max_weight=self.settings.max_weight, rng=rngs[cid])
            if quantiser is None:
                words = np.empty(report.vector_length, dtype=acc.dtype)
                words[:c.update.size] = np.mod(c.update, 1 << bits)
                words[c.update.size] = c.weight
                if c.meta:
                    words[c.update.size + 1:] = meta()
            else:
                update = quantiser.encode(c.update, c.weight, list(c.aux), rngs[cid])
                words = np.concatenate([update, quantiser.embed(meta())])
            np.add(acc, words, out=acc)
            report.included.append(cid)
        if len(report.included) < report.threshold:
            raise RoundFailedError(f"secure aggregation, round {report.server_round}: "
                                   f"{len(report.included)} inputs, fewer than the threshold "
                                   f"{report.threshold}; no sum is released")
        if bits % (8 * acc.dtype.itemsize):
            acc &= acc.dtype.type((1 << bits) - 1)
        return acc

    def _decode(self, words: np.ndarray, included: list[int], first: torch.Tensor, dim: int,
                aux_names: list[str], quantiser: Quantiser | None) -> Aggregate:
        if quantiser is None:  # distributed DP decodes the modular sum itself
            return Aggregate(
                update_sum=torch.from_numpy(words[:-1].astype(np.float64)),
                weight_sum=float(words[-1]), count=len(included), client_ids=list(included))
        update_sum, weight_sum, aux_sums = quantiser.decode(words, dim=dim,
                                                            num_aux=len(aux_names))
        shape = first.shape
        return Aggregate(
            update_sum=torch.from_numpy(update_sum).reshape(shape).to(first.dtype),
            weight_sum=float(weight_sum), count=len(included),
            aux_sum={k: torch.from_numpy(v).reshape(shape).to(first.dtype)
                     for k, v in zip(aux_names, aux_sums, strict=True)},
            client_ids=list(included))
