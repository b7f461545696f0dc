"""Update compression: what a client sends instead of its dense float32 update.

Four codecs, each a tensor operation on a cohort batch ``[clients, dim]`` (or one vector
``[dim]``), with an exact byte count of what goes on the wire (:attr:`CompressedUpdate.nbytes`):

``qsgd``   stochastic quantisation to ``s = 2^(bits-1) - 1`` levels per sign (Alistarh et al.,
           NeurIPS 2017, Sec. 3.1): ``Q(v_i) = scale * sgn(v_i) * l_i / s`` with ``l_i`` the
           unbiased stochastic rounding of ``s * |v_i| / scale``. A code (sign and level) is
           one ``bits``-bit two's-complement word, bit-packed. ``scale`` is the vector's L2 norm
           (the paper's choice, sent as one float32 per client) or, under secure aggregation,
           a *shared* scale every client uses (so integer codes can be summed in the field).
``topk``   the ``k = ceil(ratio * dim)`` largest-magnitude coordinates, values and int32
           indices (Stich et al., NeurIPS 2018, top-k).
``randk``  ``k`` coordinates chosen by the round's *shared* seed: every client keeps the same
           ones, so only the values travel and the sum of payloads is a payload of the sum.
``sign``   one bit per coordinate and a per-vector scale ``||x||_1 / dim`` (scaled signSGD,
           Karimireddy et al., ICML 2019, Alg. 1 / EF-signSGD; Bernstein et al. 2018).

**Error feedback** (Karimireddy et al. 2019, Alg. 2): a client keeps a residual ``e``; it sends
``C(u + e)`` and keeps ``e' = (u + e) - decode(C(u + e))``. Summed over rounds, what was sent
plus the last residual equals what the client computed (telescoping). The residual is
per-client state, stored like SCAFFOLD's ``c_i`` and saved in the checkpoint.

**With secure aggregation** the server learns only the sum, so a codec must decode the sum of
payloads: ``randk`` does (shared indices, the masked sum of the values is the sum of values);
``qsgd`` with a shared scale does (integer codes summed mod 2^b, see :meth:`UpdateCodec.to_field`,
field condition ``num_clients * s <= 2^(b-1) - 1``). ``topk`` and ``sign`` cannot:
:func:`check_secure_aggregation` refuses them with one line saying why. Under SecAgg what
travels is the masked field words, ``b`` bits per coordinate, not the packed codes. Summing
weighted codes exactly needs a wide field (``n * max_weight * s``); with
``compression.clip_norm`` set, QSGD is instead rotated into a ``bits``-wide field, 8-bit words
for 8-bit QSGD, with a bounded overflow probability (:mod:`confide.field_quantisation`).

Seeds come from the run's seed (:func:`confide.seeding.derive_seed`). Stochastic rounding draws
its uniforms from a counter-based hash of (round seed, client id, coordinate), so a client's
payload does not depend on which other clients share its batch (sequential and vectorized
executors agree). This is simulation randomness, never cryptographic.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

# The refusal lives in config.py, which validates [compression] when a config is built and must
# not import this torch module (no import cycle); it is re-exported here for the runtimes.
from confide.config import Config
from confide.config import check_compression_with_secure_aggregation as check_secure_aggregation
from confide.exceptions import ConfigError, ProtocolError
from confide.seeding import derive_seed

__all__ = [
    "Method",
    "METHODS",
    "CompressedUpdate",
    "UpdateCodec",
    "check_secure_aggregation",
    "field_levels",
    "field_bits_needed",
    "check_field",
    "count_bytes",
]

Method = Literal["none", "qsgd", "topk", "randk", "sign"]
METHODS: tuple[str, ...] = ("none", "qsgd", "topk", "randk", "sign")

# Wire layout of each method: array name -> dtype. Shapes are checked in _check_payload.
_LAYOUT: dict[str, dict[str, torch.dtype]] = {
    "none": {"values": torch.float32},
    "qsgd": {"codes": torch.uint8, "norms": torch.float32},
    "qsgd-shared": {"codes": torch.uint8},
    "topk": {"values": torch.float32, "indices": torch.int32},
    "randk": {"values": torch.float32},
    "sign": {"signs": torch.uint8, "scales": torch.float32},
}


def field_levels(*, field_bits: int, num_clients: int) -> int:
    """The most QSGD levels ``s`` per sign whose sum over ``num_clients`` fits Z_2^field_bits.

    Codes lie in ``[-s, s]``, so a sum of ``n`` lies in ``[-n*s, n*s]``; the centred lift of a
    modular sum is exact when ``n * s <= 2^(b-1) - 1`` (as in the SecAgg quantiser,
    ``confide.privacy.secagg.quantisation``).
    """
    return (2 ** (field_bits - 1) - 1) // max(num_clients, 1)


def field_bits_needed(*, levels: int, num_clients: int) -> int:
    """The smallest field width ``b`` with ``num_clients * levels <= 2^(b-1) - 1``."""
    return max(2, math.ceil(math.log2(2 * max(num_clients, 1) * levels + 2)))


def check_field(*, levels: int, num_clients: int, field_bits: int) -> None:
    """Raise a one-line ConfigError unless ``num_clients`` sums of ``levels`` fit the field."""
    if num_clients * levels > 2 ** (field_bits - 1) - 1:
        need = field_bits_needed(levels=levels, num_clients=num_clients)
        raise ConfigError(
            f"secure_aggregation.bits = {field_bits} is too small for {num_clients} clients "
            f"with QSGD at {levels} levels: the sum of codes could wrap around Z_2^{field_bits}; "
            f"use secure_aggregation.bits >= {need} or lower compression.bits")


def count_bytes(payload: Any) -> int:
    """Bytes a message carries: array data, bytes, UTF-8 text, 8 per number; nested containers
    (a mapping's keys count as their text).

    Counts the payload, not a transport's framing (TLS records, gRPC/protobuf headers). Used by
    every runtime to write ``bytes_up`` / ``bytes_down`` into the history.
    """
    if payload is None:
        return 0
    if isinstance(payload, CompressedUpdate):
        return payload.nbytes
    if isinstance(payload, torch.Tensor):
        return payload.numel() * payload.element_size()
    if isinstance(payload, np.ndarray):
        return int(payload.nbytes)
    if isinstance(payload, bytes | bytearray | memoryview):
        return len(payload)
    if isinstance(payload, str):
        return len(payload.encode("utf-8"))
    if isinstance(payload, bool | int | float | np.number):
        return 8
    if isinstance(payload, Mapping):
        return sum(count_bytes(k) + count_bytes(v) for k, v in payload.items())
    if isinstance(payload, list | tuple):
        return sum(count_bytes(v) for v in payload)
    raise TypeError(f"count_bytes: cannot count {type(payload).__name__}")


@dataclass(frozen=True)
class CompressedUpdate:
    """A compressed batch of updates as sent on the wire.

    ``arrays`` is what travels (row ``i`` belongs to the ``i``-th client); everything else is
    known to both sides from the round's configuration (method, bits, dim, the round's seed)
    and is not counted. A server rebuilding a peer's payload fills those fields from its own
    round state, never from the peer's message. ``batched`` is False when one vector was
    encoded (decode returns ``[dim]``).
    """

    method: str
    dim: int
    arrays: Mapping[str, torch.Tensor]
    bits: int = 32
    #: randk: the round whose shared seed chose the indices (sent down, not up)
    server_round: int = 0
    #: qsgd under secure aggregation: the shared scale (None: per-vector norms are sent)
    scale: float | None = None
    batched: bool = True

    @property
    def nbytes(self) -> int:
        """Exact bytes of the arrays on the wire."""
        return sum(t.numel() * t.element_size() for t in self.arrays.values())

    @property
    def num_clients(self) -> int:
        """Rows in the payload."""
        first = next(iter(self.arrays.values()), None)
        return 0 if first is None else int(first.shape[0])

    def summed(self) -> CompressedUpdate:
        """The payload of the sum of this payload's rows (``randk`` and ``none`` only).

        For these methods the wire values of the sum are the sum of the wire values, which is
        exactly what secure aggregation returns.
        """
        if self.method not in ("randk", "none"):
            raise ConfigError(f"compression.method = {self.method!r}: payloads do not add up; "
                              "only 'randk' and 'none' decode the sum of payloads")
        values = self.arrays["values"].sum(dim=0, keepdim=True)
        return CompressedUpdate(method=self.method, dim=self.dim, arrays={"values": values},
                                bits=self.bits, server_round=self.server_round, batched=False)


@dataclass(frozen=True)
class UpdateCodec:
    """Encodes client updates and decodes payloads (``[compression]`` settings).

    ``seed`` is the run's seed; every random choice is derived from it and ``server_round``.
    ``server_round`` keys the randomness: the round in synchronous runs. In asynchronous
    (FedBuff) runs use the index of the buffer the update joins, for random-k so that every
    update summed in one SecAgg instance shares the indices, and for QSGD so that a client's
    (client, key) pair never repeats.

    >>> codec = UpdateCodec(method="randk", ratio=0.5, seed=1)
    >>> batch = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 0.5, 0.5, 0.5]])
    >>> payload, residual = codec.encode(batch, server_round=0)
    >>> payload.nbytes  # two float32 values per client; the shared indices are not sent
    16
    >>> bool(torch.equal(codec.decode(payload) + residual, batch))  # error feedback keeps the rest
    True
    >>> bool(torch.equal(codec.decode(payload.summed()), codec.decode(payload).sum(0)))
    True
    """

    method: str = "none"
    bits: int = 8
    ratio: float = 0.1
    error_feedback: bool = True
    #: qsgd: shared scale (coordinates clipped to [-scale, scale]); None: per-vector L2 norm
    scale: float | None = None
    seed: int = 0
    _layout: str = field(default="", init=False, repr=False)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"compression.method = {self.method!r} is not allowed; choose one "
                              "of: " + ", ".join(repr(m) for m in METHODS))
        if not 0 < self.ratio <= 1:
            raise ConfigError(f"compression.ratio = {self.ratio!r} is out of range; it must be "
                              "in (0, 1]")
        if self.method == "qsgd" and not 2 <= self.bits <= 16:
            raise ConfigError(f"compression.bits = {self.bits} is out of range; QSGD uses "
                              "2 to 16 bits per coordinate")
        if self.scale is not None and not (math.isfinite(self.scale) and self.scale > 0):
            raise ConfigError(f"compression.scale = {self.scale!r} must be a positive number")
        layout = "qsgd-shared" if self.method == "qsgd" and self.scale is not None else self.method
        object.__setattr__(self, "_layout", layout)

    @classmethod
    def from_config(cls, config: Config) -> UpdateCodec:
        """The codec of a run. Under secure aggregation QSGD's scale is shared.

        The shared scale is ``compression.scale`` when set, else
        ``secure_aggregation.clipping_range`` (the per-coordinate range the SecAgg quantiser
        clips to anyway).
        """
        comp = config.compression
        scale = comp.scale
        if config.secure_aggregation.enabled:
            check_secure_aggregation(comp.method)
            if comp.method == "qsgd" and scale is None:
                scale = config.secure_aggregation.clipping_range
        return cls(method=comp.method, bits=comp.bits, ratio=comp.ratio,
                   error_feedback=comp.error_feedback, scale=scale, seed=config.run.seed)

    # ------------------------------------------------------------------ properties

    @property
    def levels(self) -> int:
        """QSGD's levels per sign, ``s = 2^(bits-1) - 1``, so a code fits ``bits`` bits."""
        return 2 ** (self.bits - 1) - 1

    def kept(self, dim: int) -> int:
        """Coordinates top-k / random-k keep: ``max(1, ceil(ratio * dim))``."""
        return max(1, min(dim, math.ceil(self.ratio * dim - 1e-9)))

    def wire_bytes(self, dim: int, num_clients: int = 1) -> int:
        """Bytes :meth:`encode` produces for ``num_clients`` vectors of length ``dim``."""
        per = {
            "none": 4 * dim,
            "qsgd": math.ceil(dim * self.bits / 8) + 4,
            "qsgd-shared": math.ceil(dim * self.bits / 8),
            "topk": 8 * self.kept(dim),
            "randk": 4 * self.kept(dim),
            "sign": math.ceil(dim / 8) + 4,
        }[self._layout]
        return per * num_clients

    def sensitivity(self, *, clip_norm: float, dim: int) -> float:
        """The largest L2 norm of a decoded vector when the input's norm is <= ``clip_norm``.

        top-k, error-feedback random-k and sign never grow the norm (sign: ``||x||_1 /
        sqrt(d) <= ||x||_2``); rescaled random-k multiplies it by ``d/k``; QSGD moves each
        coordinate by less than one level, ``scale / s``, and never past ``scale``.
        """
        if self.method in ("none", "topk", "sign") or (self.method == "randk"
                                                       and self.error_feedback):
            return clip_norm
        if self.method == "randk":
            return clip_norm * dim / self.kept(dim)
        root_d, s = math.sqrt(dim), self.levels
        if self.scale is None:  # per-vector norm: scale = ||x|| <= clip_norm
            return clip_norm * min(1 + root_d / s, root_d)
        return min(clip_norm + self.scale * root_d / s, self.scale * root_d)

    def shared_indices(self, dim: int, *, server_round: int,
                       device: torch.device | str = "cpu") -> torch.Tensor:
        """Random-k's coordinates for ``server_round``: the same for every client (sorted)."""
        # One seed per round for the whole cohort (not per client): that is what keeps the
        # support common, so secure aggregation's masks cancel on it (module docstring).
        gen = torch.Generator(device="cpu").manual_seed(
            derive_seed(self.seed, "compression", "randk", server_round))
        idx = torch.randperm(dim, generator=gen)[: self.kept(dim)]
        return torch.sort(idx).values.to(device)

    # ------------------------------------------------------------------ encode

    def encode(self, updates: torch.Tensor, *, server_round: int,
               client_ids: torch.Tensor | Sequence[int] | int | None = None,
               residuals: torch.Tensor | None = None, clip_norm: float | None = None,
               ) -> tuple[CompressedUpdate, torch.Tensor | None]:
        """Compress ``updates`` (``[clients, dim]`` or ``[dim]``).

        Returns the payload and, with error feedback, the new residuals (same shape as
        ``updates``; pass them back next time the client trains). ``client_ids`` seed QSGD's
        stochastic rounding (required for ``qsgd``). ``clip_norm`` (client-level DP) clips
        each *corrected* vector ``u + e`` to that L2 norm before compressing, so what is sent
        stays within :meth:`sensitivity`; the part clipped away is dropped, not carried.
        """
        batched = updates.ndim == 2
        x = (updates if batched else updates.reshape(1, -1)).to(torch.float32)
        if x.ndim != 2 or x.shape[1] == 0:
            raise ValueError("encode expects a non-empty [clients, dim] batch or one vector")
        if residuals is not None and self.error_feedback:
            x = x + residuals.reshape(x.shape).to(device=x.device, dtype=torch.float32)
        if clip_norm is not None:
            # Clip after adding the residual: the residual is not bounded by the clip, so a
            # clip of u alone would not bound C(u + e) (DP sensitivity, McMahan et al. 2018).
            norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
            x = x * torch.clamp(clip_norm / torch.clamp(norms, min=1e-12), max=1.0)
        dim = x.shape[1]
        arrays: dict[str, torch.Tensor]
        if self.method == "none":
            arrays = {"values": x.clone()}
        elif self.method == "qsgd":
            if client_ids is None:
                raise ValueError("qsgd needs client_ids to seed each client's rounding")
            arrays = self._encode_qsgd(x, server_round, client_ids)
        elif self.method == "topk":
            idx = torch.topk(x.abs(), self.kept(dim), dim=1, sorted=False).indices
            arrays = {"values": torch.gather(x, 1, idx), "indices": idx.to(torch.int32)}
        elif self.method == "randk":
            idx = self.shared_indices(dim, server_round=server_round, device=x.device)
            # Stich et al. (2018) Def. 2.1: rand-k as a k/d-contraction, no rescaling, when
            # error feedback carries what is dropped; without it, scale d/k so E[C(x)] = x.
            values = x[:, idx] if self.error_feedback else x[:, idx] * (dim / idx.numel())
            arrays = {"values": values}
        else:  # sign
            scales = x.abs().sum(dim=1) / dim  # ||x||_1 / d (Karimireddy et al. 2019, Alg. 1)
            arrays = {"signs": _pack((x >= 0).to(torch.int64), 1), "scales": scales}
        payload = CompressedUpdate(method=self.method, dim=dim, arrays=arrays, bits=self.bits,
                                   server_round=server_round, scale=self.scale, batched=batched)
        if not self.error_feedback or self.method == "none":
            return payload, None
        sent = self.decode(payload)
        new_residuals = x - sent.reshape(x.shape)  # e' = (u + e) - C(u + e)  (Alg. 2, l. 7)
        return payload, new_residuals if batched else new_residuals.reshape(-1)

    def _encode_qsgd(self, x: torch.Tensor, server_round: int,
                     client_ids: torch.Tensor | Sequence[int] | int) -> dict[str, torch.Tensor]:
        s = self.levels
        ids = torch.as_tensor(client_ids, dtype=torch.int64, device=x.device).reshape(-1)
        if ids.numel() != x.shape[0]:
            raise ValueError(f"{ids.numel()} client ids for a batch of {x.shape[0]} updates")
        if self.scale is None:
            scale = torch.linalg.vector_norm(x, dim=1)  # ||v||_2 (Alistarh et al., Sec. 3.1)
            ratio = x.abs() / torch.where(scale > 0, scale, 1.0).unsqueeze(1)
        else:
            scale = torch.full((x.shape[0],), self.scale, device=x.device)
            ratio = x.abs().clamp(max=self.scale) / self.scale
        # Unbiased stochastic rounding to l/s: l = floor(s r) + Bernoulli(s r - floor(s r)).
        scaled = (ratio * s).clamp(max=s)
        low = torch.floor(scaled)
        u = _uniform(derive_seed(self.seed, "compression", "qsgd", server_round), ids,
                     x.shape[1], x.device)
        level = (low + (u < (scaled - low)).to(low.dtype)).clamp(max=s).to(torch.int64)
        codes = torch.where(x < 0, -level, level)
        arrays = {"codes": _pack(codes + s, self.bits)}  # offset to [0, 2s] < 2^bits
        if self.scale is None:
            arrays["norms"] = scale.to(torch.float32)
        return arrays

    # ------------------------------------------------------------------ decode

    def decode(self, payload: CompressedUpdate) -> torch.Tensor:
        """The dense vectors a payload stands for (``[clients, dim]``, or ``[dim]``).

        A payload is peer data: a malformed one raises :class:`ProtocolError`.
        """
        _check_payload(self, payload)
        a, dim = payload.arrays, payload.dim
        if self.method == "none":
            dense = a["values"].clone()
        elif self.method == "qsgd":
            codes = self._codes(payload).to(torch.float32)
            scale = a["norms"].unsqueeze(1) if self.scale is None else self.scale
            dense = codes * (scale / self.levels)
        elif self.method == "topk":
            values = a["values"]
            dense = torch.zeros(values.shape[0], dim, device=values.device)
            dense.scatter_(1, a["indices"].to(torch.int64), values)
        elif self.method == "randk":
            values = a["values"]
            idx = self.shared_indices(dim, server_round=payload.server_round,
                                      device=values.device)
            dense = torch.zeros(values.shape[0], dim, device=values.device)
            dense[:, idx] = values
        else:
            signs = _unpack(a["signs"], 1, dim).to(torch.float32) * 2 - 1
            dense = signs * a["scales"].unsqueeze(1)
        return dense if payload.batched else dense.reshape(-1) if dense.shape[0] == 1 else dense

    def decode_sum(self, payload: CompressedUpdate) -> torch.Tensor:
        """The sum over the payload's rows of the decoded vectors, ``[dim]``."""
        if self.method in ("randk", "none"):
            return self.decode(payload.summed()).reshape(-1)
        dense = self.decode(payload)
        return dense.reshape(-1, payload.dim).sum(dim=0)

    def densify_sum(self, values_sum: torch.Tensor, *, dim: int,
                    server_round: int) -> torch.Tensor:
        """Random-k: the dense ``[dim]`` sum from the (securely aggregated) sum of values."""
        if self.method != "randk":
            raise ConfigError("densify_sum is for compression.method = 'randk'")
        payload = CompressedUpdate(method="randk", dim=dim, server_round=server_round,
                                   arrays={"values": values_sum.reshape(1, -1)}, batched=False)
        return self.decode(payload).reshape(-1)

    def _codes(self, payload: CompressedUpdate) -> torch.Tensor:
        """QSGD's signed integer codes ``[clients, dim]`` in ``[-s, s]``."""
        return _unpack(payload.arrays["codes"], self.bits, payload.dim) - self.levels

    # ------------------------------------------------------------------ secure aggregation

    def to_field(self, payload: CompressedUpdate, *, field_bits: int) -> torch.Tensor:
        """QSGD codes as words of Z_2^field_bits (int64 ``[clients, dim]``) for SecAgg.

        Needs a shared scale (``scale`` set): per-vector norms differ and would not add up.
        """
        if self.method != "qsgd" or self.scale is None:
            raise ConfigError("only QSGD with a shared scale maps into the secure-aggregation "
                              "field (per-client norms would not add up)")
        _check_payload(self, payload)
        return self._codes(payload) % (1 << field_bits)  # two's complement embedding

    def decode_field_sum(self, words: torch.Tensor, *, field_bits: int,
                         num_clients: int) -> torch.Tensor:
        """The sum of dequantised vectors from the modular sum of :meth:`to_field` words.

        Exact when ``num_clients * levels <= 2^(field_bits-1) - 1`` (checked).
        """
        if self.method != "qsgd" or self.scale is None:
            raise ConfigError("only QSGD with a shared scale decodes a field sum")
        check_field(levels=self.levels, num_clients=num_clients, field_bits=field_bits)
        w = words.to(torch.int64) & ((1 << field_bits) - 1)
        signed = torch.where(w >= (1 << (field_bits - 1)), w - (1 << field_bits), w)
        return signed.reshape(-1).to(torch.float64).mul(self.scale / self.levels).to(
            torch.float32)


# --------------------------------------------------------------------------- validation


def _check_payload(codec: UpdateCodec, payload: CompressedUpdate) -> None:
    """Refuse a payload whose arrays do not match the codec's wire layout (peer data)."""
    if payload.method != codec.method:
        raise ProtocolError(f"a {payload.method!r} payload for a {codec.method!r} codec")
    if codec.method == "qsgd" and payload.bits != codec.bits:
        raise ProtocolError(f"a {payload.bits}-bit QSGD payload for a {codec.bits}-bit codec")
    layout = _LAYOUT[codec._layout]
    arrays = payload.arrays
    if not isinstance(arrays, Mapping) or set(arrays) != set(layout):
        raise ProtocolError(f"a {codec.method!r} payload must carry exactly: "
                            + ", ".join(sorted(layout)))
    dim = payload.dim
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise ProtocolError(f"a payload's dim must be a positive integer, got {dim!r}")
    rows = None
    for name, dtype in layout.items():
        t = arrays[name]
        if not isinstance(t, torch.Tensor) or t.dtype != dtype:
            raise ProtocolError(f"payload array {name!r} must be a {dtype} tensor")
        want_ndim = 1 if name in ("norms", "scales") else 2
        if t.ndim != want_ndim or t.shape[0] < 1:
            raise ProtocolError(f"payload array {name!r} has shape {tuple(t.shape)}")
        if rows is not None and t.shape[0] != rows:
            raise ProtocolError("payload arrays disagree on the number of clients")
        rows = t.shape[0]
        if dtype == torch.float32 and not bool(torch.isfinite(t).all()):
            raise ProtocolError(f"payload array {name!r} has non-finite entries")
        if name in ("norms", "scales") and bool((t < 0).any()):
            raise ProtocolError(f"payload array {name!r} has negative entries")
    width = {"values": None, "indices": None, "codes": math.ceil(dim * codec.bits / 8),
             "signs": math.ceil(dim / 8)}
    for name, cols in width.items():
        if name in arrays and cols is not None and arrays[name].shape[1] != cols:
            raise ProtocolError(f"payload array {name!r} has {arrays[name].shape[1]} columns; "
                                f"{cols} expected for dim {dim}")
    if "values" in arrays:
        k = {"none": dim, "topk": codec.kept(dim), "randk": codec.kept(dim)}[codec.method]
        if arrays["values"].shape[1] != k:
            raise ProtocolError(f"payload values have {arrays['values'].shape[1]} columns; "
                                f"{k} expected for dim {dim}")
    if "indices" in arrays:
        idx = arrays["indices"]
        if idx.shape != arrays["values"].shape:
            raise ProtocolError("payload indices and values differ in shape")
        if bool(((idx < 0) | (idx >= dim)).any()):
            raise ProtocolError(f"payload indices fall outside [0, {dim})")
        ordered = torch.sort(idx, dim=1).values
        if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
            raise ProtocolError("payload indices repeat a coordinate")
    if "codes" in arrays:
        top = int(_unpack(arrays["codes"], codec.bits, dim).max())
        if top > 2 * codec.levels:
            raise ProtocolError(f"payload QSGD code {top - codec.levels} exceeds "
                                f"{codec.levels} levels")


# --------------------------------------------------------------------------- bits and hashing


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Bit-pack unsigned ``codes`` ``[rows, n]`` (< 2^bits) into uint8 ``[rows, ceil(n*bits/8)]``.

    Little-endian: code ``j``'s bit ``b`` is bit ``j*bits + b`` of the row's byte string.
    """
    rows, n = codes.shape
    if bits == 8:
        return codes.to(torch.uint8)
    if bits == 16:
        return torch.stack([codes & 0xFF, codes >> 8], dim=-1).reshape(rows, 2 * n).to(
            torch.uint8)
    if 8 % bits == 0:  # 1, 2, 4 bits: whole codes per byte
        per = 8 // bits
        padded = torch.nn.functional.pad(codes, (0, (-n) % per)).reshape(rows, -1, per)
        shifts = torch.arange(per, device=codes.device) * bits
        return (padded << shifts).sum(dim=-1).to(torch.uint8)
    # A loop over bit positions (at most 16), never over clients.
    planes = torch.stack([((codes >> b) & 1).to(torch.uint8) for b in range(bits)], dim=-1)
    flat = torch.nn.functional.pad(planes.reshape(rows, n * bits), (0, (-n * bits) % 8))
    weights = torch.tensor([1 << b for b in range(8)], dtype=torch.uint8, device=codes.device)
    return (flat.reshape(rows, -1, 8) * weights).sum(dim=-1).to(torch.uint8)


def _unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`_pack`: int64 ``[rows, n]``."""
    rows = packed.shape[0]
    p = packed.to(torch.int64)
    if bits == 8:
        return p
    if bits == 16:
        pairs = p.reshape(rows, n, 2)
        return pairs[..., 0] | (pairs[..., 1] << 8)
    if 8 % bits == 0:
        per = 8 // bits
        shifts = torch.arange(per, device=packed.device) * bits
        return ((p.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(rows, -1)[:, :n]
    shifts = torch.arange(8, device=packed.device)
    flat = ((p.unsqueeze(-1) >> shifts) & 1).reshape(rows, -1)[:, : n * bits]
    weights = torch.tensor([1 << b for b in range(bits)], dtype=torch.int64,
                           device=packed.device)
    return (flat.reshape(rows, n, bits) * weights).sum(dim=-1)


_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (C. Wellons' hash-prospector, constants 0x21f0aaad, 0x735a2d97).

    ``x`` holds values < 2^32 in int64; both multipliers are < 2^31, so no product overflows.
    """
    x = x ^ (x >> 16)
    x.mul_(0x21F0AAAD).bitwise_and_(_M32)
    x.bitwise_xor_(x >> 15)
    x.mul_(0x735A2D97).bitwise_and_(_M32)
    return x.bitwise_xor_(x >> 15)


def _uniform(round_seed: int, client_ids: torch.Tensor, n: int,
             device: torch.device) -> torch.Tensor:
    """Uniforms in [0, 1), ``[clients, n]``; entry (i, j) depends only on (seed, id_i, j)."""
    k0, k1 = round_seed & _M32, (round_seed >> 32) & _M32
    row = _mix32(_mix32((client_ids & _M32) ^ k0) ^ k1).unsqueeze(1)
    # Mix the coordinate before combining it with the client's key: with a raw index, two
    # clients' streams would be permutations of each other whenever their keys differ only in
    # low bits; mixed, a collision is an isolated coordinate (probability n / 2^32).
    col = _mix32(_mix32(torch.arange(n, dtype=torch.int64, device=device) ^ k1) ^ k0)
    h = _mix32(col.unsqueeze(0) ^ row)  # one pass over [clients, n]: the costly part
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))
