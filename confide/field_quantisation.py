"""Rotated stochastic quantisation into a narrow field Z_{2^b}, whose modular sum decodes.

What 8-bit QSGD becomes under secure aggregation: every client's words are ``b``-bit elements
of Z_{2^b}, the masked sum is taken modulo 2^b, and the coordinator decodes the cohort's sum.
The construction is that of Kairouz, Liu and Steinke, "The Distributed Discrete Gaussian
Mechanism for Federated Learning with Secure Aggregation", ICML 2021, Sec. 4 (without the
noise): clip, rotate (randomised Hadamard), scale, stochastically round, reduce modulo 2^b;
the sum is correct unless it leaves the field's range, whose probability is bounded. The
rotation and stochastic rounding are Suresh et al., "Distributed Mean Estimation with Limited
Communication", ICML 2017, Sec. 4 (pi_srk). Bonawitz et al., "Federated Learning with
Autotuned Communication-Efficient Secure Aggregation", 2019, size the field the same way:
from a bound on the sum, not on one client.

Per client ``i`` (weight factor ``a_i`` in [0, 1]: 1 under uniform weighting, ``w_i / W``
with the known cap ``W = max_weight`` under example weighting, applied *before* quantising
so the field never holds example counts):

1. clip ``x_i`` to L2 norm ``c`` (``clip_norm``) and multiply by ``a_i``: ``||a_i x_i|| <= c``;
2. rotate, ``y_i = R(a_i x_i) / gamma``, ``R`` orthogonal and shared by the round (below);
3. round stochastically, ``z_i = floor(y_i) + Bernoulli(frac(y_i))`` (unbiased), saturate
   to ``[-M, M]`` with ``M = 2^(b-1) - 1``, and send ``z_i mod 2^b``.

The coordinator lifts the modular sum to ``S`` in ``[-2^(b-1), 2^(b-1))`` and returns
``gamma * R^T S``.

**Stated bounds** (``eps_i = z_i - y_i``, ``|eps_ik| < 1``, ``E[eps_i] = 0`` when unsaturated):

* one vector: ``||decode(encode(x)) - a clip(x)||_2 = gamma ||eps||_2 < gamma sqrt(d)``
  (``R`` is orthogonal), and ``E[decode(encode(x))] = a clip(x)``;
* a sum of ``n`` that fits (``|sum_i z_ik| <= M`` for every k): the decoded sum is
  ``sum_i a_i clip(x_i) + gamma R^T sum_i eps_i``, off by less than ``n gamma sqrt(d)``;
* overflow: ``|sum_i z_ik| <= |(R v)_k| / gamma + n`` with ``v = sum_i a_i clip(x_i)``,
  ``||v|| <= n c``. Each coordinate of ``R v`` is a Rademacher sum of a block of ``B`` entries
  scaled by ``1/sqrt(B)``, hence sub-Gaussian: ``P(|(Rv)_k| >= t) <= 2 exp(-t^2 B / (2
  ||v||^2))`` (Hoeffding; Kairouz et al. 2021, Sec. 4.1 "flattening"; Suresh et al. 2017,
  Lemma 7). A union bound over the ``d`` coordinates gives :func:`overflow_bound`, and
  :func:`field_scale` picks the smallest ``gamma`` with bound ``delta``. The probability is
  over the round's random signs, which no honest client's update depends on; a malicious
  client can always spoil a secure sum, overflow or not (Bonawitz et al. 2017 only protect
  privacy).

**The rotation** for any ``d``: ``B = 2^floor(log2 d)``; ``R`` applies ``H D_1`` to the first
``B`` coordinates, then ``H D_2`` to the last ``B`` (they overlap unless ``d = B``), ``H`` the
normalised Walsh-Hadamard matrix, ``D_1, D_2`` independent random sign diagonals. Both steps
are orthogonal, so ``R`` is, and no coordinate is padded: the words on the wire are exactly
``d`` (a power-of-two padding would cost up to 2x). Every output coordinate is a ``B``-term
Rademacher sum of a vector of norm at most ``||v||`` (conditioning on the first step), which
is the bound above with ``B`` in place of ``d``.

**Randomness**: the rotation's signs are shared by the round (from the run's seed, as random-k's
indices are); each client's rounding uniforms come from the round's seed and its id. This is
simulation randomness, never cryptographic: a deployment would draw the rounding from the
client's own secret randomness.

**Exact integers in a narrow field** (weights, counts): :func:`to_limbs` splits a value into
``L``-bit limbs, one per word, with ``n (2^L - 1) <= 2^b - 1``, so the limb sums never wrap
and :func:`from_limb_sums` recombines the exact total.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from confide.config import Config
from confide.exceptions import ConfigError
from confide.seeding import derive_seed

__all__ = ["uses_field_quantisation", "OVERFLOW_DELTA", "RandomRotation", "FieldQuantiser",
           "field_scale", "overflow_bound", "limb_bits", "to_limbs", "from_limb_sums", "hadamard"]

#: the per-round probability bound of any coordinate of the sum wrapping, when every client's
#: update is within the clip norm (module docstring)
OVERFLOW_DELTA = 2.0 ** -20


def uses_field_quantisation(config: Config) -> bool:
    """QSGD under secure aggregation with ``compression.clip_norm`` set: the narrow field."""
    comp = config.compression
    return (config.secure_aggregation.enabled and comp.method == "qsgd"
            and comp.clip_norm is not None)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """The normalised Walsh-Hadamard transform of each row (length a power of two)."""
    rows, n = x.shape
    if n & (n - 1):
        raise ValueError(f"hadamard needs a power-of-two length, got {n}")
    y = x
    h = 1
    while h < n:  # log2(n) butterfly passes, each over the whole batch
        y = y.reshape(rows, n // (2 * h), 2, h)
        y = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), dim=2)
        h *= 2
    return y.reshape(rows, n) / math.sqrt(n)


def block_size(dim: int) -> int:
    """``B = 2^floor(log2 dim)``, the Hadamard block of the rotation."""
    return 1 << (int(dim).bit_length() - 1)


@dataclass(frozen=True)
class RandomRotation:
    """The round's shared orthogonal ``R`` (two overlapping randomised Hadamard blocks)."""

    dim: int
    seed: int

    def _signs(self) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        b = block_size(self.dim)
        draws = torch.randint(0, 2, (2, b), generator=gen, dtype=torch.int64)
        signs = (draws * 2 - 1).to(torch.float64)
        return signs[0], signs[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``R x`` for each row of ``x`` (float64)."""
        d, b = self.dim, block_size(self.dim)
        d1, d2 = self._signs()
        y = x.to(torch.float64).clone()
        y[:, :b] = hadamard(y[:, :b] * d1)
        if d != b:
            y[:, d - b:] = hadamard(y[:, d - b:] * d2)
        return y

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """``R^T y`` (``H`` is symmetric and its own inverse)."""
        d, b = self.dim, block_size(self.dim)
        d1, d2 = self._signs()
        x = y.to(torch.float64).clone()
        if d != b:
            x[:, d - b:] = hadamard(x[:, d - b:]) * d2
        x[:, :b] = hadamard(x[:, :b]) * d1
        return x


def _headroom(bits: int, num_clients: int) -> int:
    """``M - n``: what the rotated sum may reach, in units of gamma, before it can wrap."""
    room = 2 ** (bits - 1) - 1 - num_clients
    if room < 1:
        raise ConfigError(f"a {bits}-bit field cannot sum {num_clients} clients' rotated codes "
                          f"(needs 2^(bits-1) - 1 > {num_clients}); raise compression.bits or "
                          "lower cohort.size")
    return room


def field_scale(*, clip_norm: float, num_clients: int, dim: int, bits: int,
                delta: float = OVERFLOW_DELTA) -> float:
    """The smallest ``gamma`` whose overflow bound is ``delta`` (module docstring).

    ``2 d exp(-(gamma (M - n))^2 B / (2 (n c)^2)) = delta``.
    """
    if not (clip_norm > 0 and math.isfinite(clip_norm)):
        raise ConfigError(f"compression.clip_norm = {clip_norm!r} must be a positive number")
    room = _headroom(bits, num_clients)
    b = block_size(dim)
    return num_clients * clip_norm * math.sqrt(2 * math.log(2 * dim / delta) / b) / room


def overflow_bound(*, sum_norm: float, dim: int, gamma: float, bits: int,
                   num_clients: int) -> float:
    """An upper bound on P(the modular sum wraps) when ``||sum_i a_i clip(x_i)|| <= sum_norm``."""
    if sum_norm <= 0:
        return 0.0
    t = gamma * _headroom(bits, num_clients)
    return min(1.0, 2 * dim * math.exp(-(t ** 2) * block_size(dim) / (2 * sum_norm ** 2)))


@dataclass(frozen=True)
class FieldQuantiser:
    """Encodes one round's clients into Z_{2^bits} and decodes their modular sum."""

    bits: int
    dim: int
    clip_norm: float
    num_clients: int
    #: the round's shared seed (rotation); each client's rounding is keyed by its id too
    seed: int
    delta: float = OVERFLOW_DELTA

    @property
    def max_code(self) -> int:
        """``M = 2^(bits-1) - 1``: a client's codes saturate at +-M."""
        return 2 ** (self.bits - 1) - 1

    @property
    def gamma(self) -> float:
        """The quantisation step, from :func:`field_scale`."""
        return field_scale(clip_norm=self.clip_norm, num_clients=self.num_clients,
                           dim=self.dim, bits=self.bits, delta=self.delta)

    @property
    def rotation(self) -> RandomRotation:
        """The round's shared rotation."""
        return RandomRotation(self.dim, derive_seed(self.seed, "field-rotation"))

    def codes(self, x: torch.Tensor, *, client_ids: list[int],
              factors: torch.Tensor | None = None) -> torch.Tensor:
        """Signed integer codes ``z_i`` in ``[-M, M]`` (int64 ``[clients, dim]``)."""
        if x.ndim != 2 or x.shape[1] != self.dim or x.shape[0] != len(client_ids):
            raise ValueError(f"expected [{len(client_ids)}, {self.dim}], got {tuple(x.shape)}")
        v = x.to(torch.float64)
        norms = torch.linalg.vector_norm(v, dim=1, keepdim=True)
        v = v * torch.clamp(self.clip_norm / torch.clamp(norms, min=1e-300), max=1.0)
        if factors is not None:
            a = factors.to(torch.float64).reshape(-1, 1)
            if bool(((a < 0) | (a > 1)).any()):
                raise ValueError("weight factors must lie in [0, 1]")
            v = v * a
        y = self.rotation.forward(v) / self.gamma
        low = torch.floor(y)
        u = torch.stack([torch.rand(self.dim, dtype=torch.float64, generator=torch.Generator(
            device="cpu").manual_seed(derive_seed(self.seed, "field-rounding", int(c))))
            for c in client_ids])
        z = low + (u < (y - low)).to(torch.float64)
        return z.clamp(-self.max_code, self.max_code).to(torch.int64)

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes as words of Z_{2^bits} (two's complement)."""
        return codes % (1 << self.bits)

    def lift(self, words: torch.Tensor) -> torch.Tensor:
        """The centred lift of words to ``[-2^(bits-1), 2^(bits-1))``."""
        w = words.to(torch.int64) & ((1 << self.bits) - 1)
        return torch.where(w >= (1 << (self.bits - 1)), w - (1 << self.bits), w)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """``gamma R^T z`` for each row of (lifted) codes (float64)."""
        return self.rotation.inverse(codes.to(torch.float64).reshape(-1, self.dim) * self.gamma)

    def decode_sum(self, words: torch.Tensor) -> torch.Tensor:
        """The cohort's sum ``sum_i a_i clip(x_i)`` from the modular sum of its words."""
        return self.decode(self.lift(words.reshape(1, -1))).reshape(-1)

    def wrapped(self, code_sum: torch.Tensor) -> int:
        """How many coordinates of an integer sum (not reduced) left the field's range.

        Only a simulation can call this: it needs the clients' codes, which the coordinator
        never sees. It is a diagnostic, never part of the decoded result.
        """
        return int((code_sum.abs() > self.max_code).sum())


# --------------------------------------------------------------------------- exact integers


def limb_bits(*, bits: int, num_clients: int) -> int:
    """The widest limb ``L`` with ``n (2^L - 1) <= 2^bits - 1``: limb sums never wrap."""
    width = int(math.floor(math.log2((2 ** bits - 1) / max(num_clients, 1) + 1)))
    if width < 1:
        raise ConfigError(f"a {bits}-bit field cannot carry exact counts for {num_clients} "
                          "clients; raise compression.bits or lower cohort.size")
    return width


def to_limbs(values: torch.Tensor, *, width: int, value_bits: int = 32) -> torch.Tensor:
    """Non-negative integers ``[..., m]`` (< 2^value_bits) as ``[..., m * ceil(V/L)]`` limbs."""
    v = values.to(torch.int64)
    if bool(((v < 0) | (v >= (1 << value_bits))).any()):
        raise ValueError(f"limb values must lie in [0, 2^{value_bits})")
    count = math.ceil(value_bits / width)
    shifts = torch.arange(count, dtype=torch.int64) * width
    return ((v.unsqueeze(-1) >> shifts) & ((1 << width) - 1)).reshape(*v.shape[:-1], -1)


def from_limb_sums(sums: torch.Tensor, *, width: int, value_bits: int = 32) -> torch.Tensor:
    """The exact totals from summed limbs (each sum below 2^bits, so unwrapped)."""
    count = math.ceil(value_bits / width)
    s = sums.to(torch.int64).reshape(-1, count)
    shifts = torch.arange(count, dtype=torch.int64) * width
    return (s << shifts).sum(dim=1)
