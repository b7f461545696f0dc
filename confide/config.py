"""Typed, validated run configuration: one TOML file plus ``--set section.key=value`` overrides.

Every section is a frozen dataclass. Values are checked when the config is built; a bad key,
type or value raises :class:`~confide.exceptions.ConfigError` with a one-line message that
names the key and says what is allowed. ``[strategy]`` keys other than ``name`` are the
strategy's own parameters and are validated by the strategy (see ``confide.strategies``).
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from confide.exceptions import ConfigError
from confide.validation import _c, validate_dataclass

__all__ = [
    "RunConfig",
    "DataConfig",
    "ModelConfig",
    "ClientConfig",
    "CohortConfig",
    "StrategyConfig",
    "SimulationConfig",
    "PrivacyConfig",
    "SecureAggregationConfig",
    "CompressionConfig",
    "Config",
    "load_config",
    "parse_overrides",
    "config_to_dict",
    "dump_config",
    "validate_dataclass",
    "check_fedbuff",
    "check_compression_with_secure_aggregation",
    "check_compression_with_privacy",
]


@dataclass(frozen=True)
class RunConfig:
    """``[run]``: seed, rounds and evaluation cadence."""

    seed: int = _c(0, ge=0, help="root seed: partition, sampling, init and noise follow from it")
    rounds: int = _c(30, ge=1, help="federated rounds to run")
    eval_every: int = _c(1, ge=1, help="evaluate the global model on the test set every N rounds "
                         "(and after the last)")
    trackers: tuple[Literal["tensorboard", "mlflow"], ...] = _c(
        (), help="experiment trackers fed every round: tensorboard, mlflow (the 'tracking' "
        "extra)")


@dataclass(frozen=True)
class DataConfig:
    """``[data]``: dataset, number of clients and how the data is partitioned."""

    dataset: str = _c("digits", help="digits, fashion-mnist or heart-disease (ignored when "
                      "data.path is set)")
    num_clients: int = _c(20, ge=1, help="clients the training data is split over")
    partition: Literal["iid", "dirichlet", "shards", "natural"] = _c(
        "dirichlet", help="iid; dirichlet: label skew (data.alpha); shards: "
        "data.classes_per_client labels each; natural: the dataset's own clients")
    alpha: float = _c(0.5, gt=0, help="Dirichlet concentration: smaller is more label skew")
    classes_per_client: int = _c(2, ge=1, help="labels per client under partition = 'shards'")
    min_samples_per_client: int = _c(2, ge=1, help="a Dirichlet draw is repeated until every "
                                     "client has this many samples")
    test_fraction: float = _c(0.2, gt=0, lt=1, help="share of the data held out (stratified) as "
                              "the pooled test set")
    path: str | None = _c(None, help="your own data: a .csv (numeric features, a label column) or "
                          ".npz (x, y, optional client_id, x_test, y_test)")
    client_column: str = _c("client_id", help="CSV column naming each row's client (natural "
                            "partition)")
    label_column: str = _c("label", help="CSV column holding the label")
    standardize: bool = _c(True, help="z-score a user's float features (data.path) with the "
                           "training mean and std; fashion-mnist: normalise pixels with the "
                           "training mean and std (false: raw pixels in [0, 1])")


@dataclass(frozen=True)
class ModelConfig:
    """``[model]``: a registered model name or a ``module:factory`` path."""

    name: str = _c("mlp", help="logreg, mlp, lenet, or a package.module:factory path")
    hidden_units: int = _c(128, ge=1, help="width of the mlp's hidden layer")


@dataclass(frozen=True)
class ClientConfig:
    """``[client]``: the local trainer every client runs."""

    epochs: int = _c(2, ge=1, help="local epochs over the client's data per round")
    batch_size: int = _c(16, ge=1, help="local mini-batch size")
    lr: float = _c(0.05, gt=0, help="local learning rate")
    momentum: float = _c(0.9, ge=0, lt=1, help="local SGD momentum (reset every round)")
    weight_decay: float = _c(0.0, ge=0, help="local L2 weight decay")
    optimizer: Literal["sgd", "adam"] = _c("sgd", help="local optimiser")
    device: str = _c("auto", help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")


@dataclass(frozen=True)
class CohortConfig:
    """``[cohort]``: who takes part in a round.

    ``size`` is a client count (an integer >= 1) or a fraction of all clients (a float in
    (0, 1]). ``sampling = "poisson"`` includes each client independently with probability
    size / num_clients, which is what the DP accountants assume. ``sampling = "cyclic"``
    visits num_clients // size fixed groups in a seeded fixed order (DP-FTRL's setting).
    """

    size: int | float = _c(1.0, help="clients per round: a count (integer >= 1) or a fraction of "
                           "all clients (float in (0, 1])")
    min_clients: int = _c(1, ge=1, help="a round with fewer reporting clients fails")
    sampling: Literal["fixed", "poisson", "cyclic"] = _c(
        "fixed", help="fixed: exactly size clients; poisson: each client independently with "
        "probability size / num_clients (what the DP accountants assume); cyclic: the clients "
        "in seeded fixed groups, visited in order (DP-FTRL's participation)")
    max_retries: int = _c(2, ge=0, help="a round that fails (quorum lost, too few clients for "
                          "secure aggregation) is run again this many times with a fresh "
                          "cohort of the live clients before the job stops")
    train_timeout_s: float | None = _c(None, gt=0, help="deployment: seconds a round waits for "
                                       "training replies before the missing clients count as "
                                       "dropped (unset: server start --round-timeout)")


@dataclass(frozen=True)
class StrategyConfig:
    """``[strategy]``: ``name`` plus the strategy's own parameters (validated by it)."""

    name: str = _c("fedavg", help="a registered strategy (confide strategies list) or a "
                   "package.module:Class path")
    options: Mapping[str, Any] = field(default_factory=dict, metadata={
        "help": "the strategy's own keys, written as [strategy] keys (confide strategies show "
                "NAME)"})


@dataclass(frozen=True)
class SimulationConfig:
    """``[simulation]``: executor and fault injection."""

    executor: str = _c("sequential", help="sequential (one client after another), vectorized "
                       "(a cohort at once on one device) or flower (Flower's Ray simulation)")
    dropout_rate: float = _c(0.0, ge=0, lt=1, help="fault injection: fraction of sampled "
                             "clients that drop out (simulation only)")
    dropout_stage: str = _c("training", help="when they drop: training, or a secure-aggregation "
                            "stage (advertise_keys, share_keys, masked_input)")
    # The ``vectorized`` executor's knobs (confide.simulations.vectorized):
    chunk_size: int = _c(0, ge=0, help="vectorized: clients trained at once per device; 0 sizes "
                         "chunks to the free memory")
    mixed_precision: Literal["off", "bf16"] = _c(
        "off", help="vectorized: bf16 runs forward and backward under bfloat16 autocast (fp32 "
        "master weights)")
    compile: Literal["auto", "off", "cuda-graphs", "torch-compile"] = _c(
        "auto", help="vectorized: cuda-graphs replays each local step as a CUDA graph, "
        "torch-compile compiles it; auto: CUDA graphs on a GPU where they apply (SGD, no "
        "DP-SGD), else off")
    conv_lowering: Literal["auto", "grouped", "unfold"] = _c(
        "auto", help="vectorized: convolutions with per-client weights as grouped conv (vmap's "
        "own rule) or unfold + bmm")
    world_size: int = _c(1, ge=1, help="vectorized: processes, one GPU each, a cohort is split "
                         "over (torch.distributed, NCCL or gloo)")
    concurrency: int | None = _c(None, ge=1, help="clients training at the same time "
                                 "(asynchronous rounds, FedBuff); unset: the cohort size")
    # The virtual clock's latency model (confide.simulations.latency; defaults cited there):
    latency: Literal["lognormal", "trace"] = _c(
        "lognormal", help="virtual clock: lognormal is the seeded model below; trace replays "
        "latency_trace")
    latency_trace: str | None = _c(None, help="virtual clock: CSV with columns client_id, "
                                   "train_s, up_s, down_s")
    latency_train_s_per_sample: float = _c(0.005, gt=0, help="virtual clock: median seconds "
                                           "of local training per example processed")
    latency_speed_sigma: float = _c(0.7, ge=0, help="virtual clock: log-normal sigma of a "
                                    "client's compute speed (persistent, per client)")
    latency_jitter_sigma: float = _c(0.25, ge=0, help="virtual clock: log-normal sigma of each "
                                     "task's jitter around the client's speed")
    latency_up_bytes_per_s: float = _c(1.25e6, gt=0, help="virtual clock: median upload "
                                       "bandwidth, bytes per second")
    latency_down_bytes_per_s: float = _c(5.0e6, gt=0, help="virtual clock: median download "
                                         "bandwidth, bytes per second")
    latency_network_sigma: float = _c(0.8, ge=0, help="virtual clock: log-normal sigma of a "
                                      "client's bandwidth (persistent and per task, each)")
    latency_rtt_s: float = _c(0.1, ge=0, help="virtual clock: fixed seconds per message each "
                              "way (connection set-up, round trips)")
    cpu_threads: int | Literal["auto"] = _c(
        "auto", ge=1, help="intra-op CPU threads: auto (one per concurrently trained client; an "
        "explicit OMP_NUM_THREADS is kept) or a thread count")


@dataclass(frozen=True)
class PrivacyConfig:
    """``[privacy]``: differential privacy (see ``confide.privacy``)."""

    mode: Literal["off", "central", "dp-sgd", "distributed", "dp-ftrl"] = _c(
        "off", help="off; central: client-level DP-FedAvg, trusted coordinator; dp-sgd: "
        "sample-level DP-SGD in every client (Opacus); distributed: client-level DP noise "
        "added by the clients under secure aggregation; dp-ftrl: correlated noise, no "
        "sampling assumed (Kairouz et al. 2021)")
    noise_multiplier: float | None = _c(None, ge=0, help="Gaussian noise std / clip norm; unset: "
                                        "calibrated from privacy.target_epsilon")
    clip_norm: float = _c(1.0, gt=0, help="L2 clipping bound of a client update (central, "
                          "distributed) or of a per-sample gradient (dp-sgd)")
    adaptive_clipping: bool = _c(False, help="central: adapt the clip norm to a quantile of "
                                 "the update norms (Andrew et al. 2021)")
    target_quantile: float = _c(0.5, gt=0, lt=1, help="adaptive clipping: the norm quantile "
                                "to track")
    clip_learning_rate: float = _c(0.2, gt=0, help="adaptive clipping: geometric step size of "
                                   "the clip norm")
    target_epsilon: float | None = _c(None, gt=0, help="privacy budget: the run stops before "
                                      "spending more (and calibrates the noise if unset)")
    delta: float = _c(1e-5, gt=0, lt=1, help="the δ of (ε, δ)-DP; keep it below 1 / number of "
                      "clients (central) or samples (dp-sgd)")
    accountant: Literal["rdp", "prv", "pld"] = _c(
        "rdp", help="rdp (Opacus, Rényi DP), prv (Opacus, privacy random variables) or pld "
        "(Google dp-accounting, privacy loss distributions)")
    ftrl_mechanism: Literal["tree", "banded"] = _c(
        "banded", help="dp-ftrl: tree aggregation (Kairouz et al. 2021) or a banded matrix "
        "factorisation (Choquette-Choo et al. 2023)")
    tree_estimator: Literal["honaker", "vanilla"] = _c(
        "honaker", help="dp-ftrl tree: Honaker's variance-reduced estimator or plain node sums")
    tree_restart: int | None = _c(None, ge=1, help="dp-ftrl tree: rounds per tree before a "
                                  "restart (default: privacy.min_separation when cyclic)")
    band: int | None = _c(None, ge=1, help="dp-ftrl banded: the band (default: min_separation "
                          "when cyclic, else min(rounds, 32))")
    participation: Literal["single", "cyclic"] = _c(
        "cyclic", help="dp-ftrl: each client takes part once, or cyclically with "
        "privacy.min_separation rounds between participations")
    min_separation: int | None = _c(None, ge=1, help="dp-ftrl: fewest rounds between a "
                                    "client's participations (default: num_clients // cohort)")
    noise_key_file: str | None = _c(None, help="dp-ftrl: the key-encryption key of the noise "
                                    "key (default: RUN_DIR/secrets/dp_ftrl_noise.kek)")


@dataclass(frozen=True)
class SecureAggregationConfig:
    """``[secure_aggregation]``: SecAgg+ (see ``confide.privacy.secagg``)."""

    enabled: bool = _c(False, help="SecAgg+: the coordinator learns only the sum of the "
                       "cohort's updates")
    bits: int = _c(32, ge=8, le=62, help="updates are quantised into integers modulo 2^bits")
    neighbours: int | None = _c(None, ge=2, help="SecAgg+ graph degree; unset: sized from the "
                                "dropout and corruption tolerances")
    threshold: int | None = _c(None, ge=2, help="Shamir threshold t of the secret shares; "
                               "unset: sized from the tolerances")
    clipping_range: float = _c(8.0, gt=0, help="every update and aux-vector entry is clipped "
                               "to [-range, range] before quantisation")
    skip_pairwise_masks: bool = _c(False, help="NOT SECURE: skip the masking cryptography, "
                                   "keep the quantisation (accuracy studies of huge "
                                   "simulations; warns)")
    max_weight: int = _c(1000, ge=1, help="largest client weight (example count) a client may "
                         "claim; larger ones are capped")
    dropout_tolerance: float = _c(0.1, ge=0, lt=0.9, help="fraction of a cohort the graph must "
                                  "tolerate dropping mid-protocol")
    corruption_tolerance: float = _c(0.05, ge=0, lt=0.9, help="fraction of a cohort that may "
                                     "collude with the coordinator (sets the threshold)")
    stage_timeout_s: float = _c(20.0, gt=0, help="deployment: seconds the coordinator waits "
                                "for one protocol stage's replies; clients still silent then "
                                "have dropped out at that stage")


@dataclass(frozen=True)
class CompressionConfig:
    """``[compression]``: how clients compress their updates (see ``confide.compression``)."""

    method: Literal["none", "qsgd", "topk", "randk", "sign"] = _c(
        "none", help="none, qsgd (stochastic k-bit quantisation), topk / randk "
        "(sparsification), sign")
    bits: int = _c(8, ge=2, le=16, help="qsgd: bits per coordinate, sign included "
                   "(2^(bits-1) - 1 levels per sign)")
    ratio: float = _c(0.1, help="topk / randk: fraction of coordinates kept, in (0, 1]")
    error_feedback: bool = _c(True, help="carry what was not sent to the next round "
                              "(Karimireddy et al. 2019, EF-SGD)")
    scale: float | None = _c(None, gt=0, help="qsgd: a shared scale instead of per-vector norms "
                             "(under secure aggregation, unset means "
                             "secure_aggregation.clipping_range)")
    clip_norm: float | None = _c(None, gt=0, help="qsgd under secure aggregation: clip each "
                                 "update to this L2 norm and quantise it, rotated, into a "
                                 "compression.bits-wide field (8-bit words for 8-bit QSGD)")


@dataclass(frozen=True)
class Config:
    """The whole run configuration."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    cohort: CohortConfig = field(default_factory=CohortConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secure_aggregation: SecureAggregationConfig = field(default_factory=SecureAggregationConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)

    def replace(self, **sections: Any) -> Config:
        """Return a copy with whole sections replaced (values are re-validated)."""
        return validate_config(config_to_dict(dataclasses.replace(self, **sections)))

    def cohort_size(self) -> int:
        """The (expected) number of clients sampled per round."""
        size = self.cohort.size
        if isinstance(size, float):
            return max(1, round(size * self.data.num_clients))
        return size


# --------------------------------------------------------------------------- validation


_SECTIONS: dict[str, type] = {f.name: f.type for f in dataclasses.fields(Config)}  # type: ignore[misc]


def validate_config(raw: Mapping[str, Any]) -> Config:
    """Build a :class:`Config` from a nested mapping, validating every key and value."""
    hints = typing.get_type_hints(Config)
    unknown = sorted(set(raw) - set(hints))
    if unknown:
        raise ConfigError(
            f"unknown section [{unknown[0]}]; allowed sections: " + ", ".join(sorted(hints))
        )
    sections: dict[str, Any] = {}
    for name, section in raw.items():
        if not isinstance(section, Mapping):
            raise ConfigError(f"[{name}] must be a table of keys, got {section!r}")
        cls = hints[name]
        values = dict(section)
        if cls is StrategyConfig:
            options = dict(values.pop("options", {}) or {})
            options.update({k: v for k, v in values.items() if k != "name"})
            values = {"name": values.get("name", "fedavg"), "options": options}
        sections[name] = validate_dataclass(cls, values, f"{name}.")
    config = Config(**sections)
    _check_cross_field(config)
    return config


def _check_cross_field(config: Config) -> None:
    size = config.cohort.size
    n = config.data.num_clients
    if isinstance(size, float):
        if not 0 < size <= 1:
            raise ConfigError(
                f"cohort.size = {size} is out of range; a fraction must be in (0, 1], "
                "or give a whole number of clients"
            )
    elif size < 1 or size > n:
        raise ConfigError(
            f"cohort.size = {size} is out of range; it must be between 1 and "
            f"data.num_clients ({n})"
        )
    if config.cohort.min_clients > config.cohort_size():
        raise ConfigError(
            f"cohort.min_clients = {config.cohort.min_clients} is larger than the cohort "
            f"size ({config.cohort_size()}); lower it or raise cohort.size"
        )
    if config.privacy.target_epsilon is not None and config.privacy.mode == "off":
        raise ConfigError("privacy.target_epsilon is set but privacy.mode is 'off'")
    _check_compression_and_clock(config)


def check_fedbuff(*, buffer_size: int, concurrency: int) -> None:
    """Raise a one-line ConfigError unless a FedBuff buffer can fill from ``concurrency`` clients.

    FedBuff (Nguyen et al. 2022, Alg. 1) aggregates every ``buffer_size`` arrivals from the
    ``concurrency`` clients in flight; a buffer larger than that never fills.
    """
    if isinstance(buffer_size, bool) or not isinstance(buffer_size, int) or buffer_size < 1:
        raise ConfigError(f"strategy.buffer_size = {buffer_size!r} must be a whole number >= 1")
    if buffer_size > concurrency:
        raise ConfigError(
            f"strategy.buffer_size = {buffer_size} is larger than the concurrency "
            f"({concurrency} clients training at once): the buffer would never fill; lower "
            "strategy.buffer_size or raise simulation.concurrency")


def check_compression_with_secure_aggregation(method: str) -> None:
    """Raise a one-line ConfigError when compression ``method`` cannot run under SecAgg.

    Secure aggregation reveals only the sum of the clients' vectors, so a codec must decode
    the sum of payloads (see ``confide.compression``).
    """
    if method == "topk":
        raise ConfigError(
            "compression.method = 'topk' cannot run with secure aggregation: each client keeps "
            "different indices, so the pairwise masks would not cancel on a common support and "
            "the indices themselves would leak which coordinates each client changed most; use "
            "'randk' (shared indices) or 'qsgd'")
    if method == "sign":
        raise ConfigError(
            "compression.method = 'sign' cannot run with secure aggregation: each client's "
            "scale differs, so the masked sum of signs does not decode to the sum of updates; "
            "use 'randk' or 'qsgd'")


def check_compression_with_privacy(*, method: str, error_feedback: bool, mode: str) -> None:
    """Raise a one-line ConfigError when compression cannot sit between clipping and noise.

    Central DP's noise is calibrated to the clip norm C, so the decoded vector a client sends
    must stay within C (McMahan et al. 2018, Sec. 3): top-k, sign and error-feedback random-k
    never grow a norm; QSGD (levels round up) and rescaled random-k (d/k) do. Distributed DP
    encodes the whole dense update into its own field, so a codec would save no bytes there.
    """
    if method == "none":
        return
    if mode == "distributed":
        raise ConfigError(
            f"compression.method = {method!r} cannot run with privacy.mode = 'distributed': "
            "its encoding rotates and noises the whole dense vector into Z_2^b, so there is "
            "nothing a codec could drop; use privacy.mode = 'central' or compression 'none'")
    if mode == "central" and (method == "qsgd" or (method == "randk" and not error_feedback)):
        what = "QSGD's rounding" if method == "qsgd" else "random-k's d/k rescaling"
        raise ConfigError(
            f"compression.method = {method!r} cannot run with privacy.mode = 'central': "
            f"{what} can push a clipped update past privacy.clip_norm, so the noise would be "
            "calibrated too low; use 'randk' with error_feedback = true, 'topk' or 'sign'")


def _check_compression_and_clock(config: Config) -> None:
    comp, sim = config.compression, config.simulation
    if not 0 < comp.ratio <= 1:  # also catches inf; NaN is refused when coerced
        raise ConfigError(
            f"compression.ratio = {comp.ratio!r} is out of range; it must be in (0, 1]")
    if comp.clip_norm is not None and not (comp.method == "qsgd"
                                           and config.secure_aggregation.enabled):
        raise ConfigError("compression.clip_norm is for compression.method = 'qsgd' under "
                          "secure aggregation (the field's scale follows from it); unset it")
    if config.secure_aggregation.enabled:
        check_compression_with_secure_aggregation(comp.method)
        if comp.method == "randk" and comp.ratio < 1 and config.strategy.name == "fedbuff":
            raise ConfigError(
                "compression.method = 'randk' cannot run with secure aggregation under "
                "strategy 'fedbuff': a buffer mixes clients that started in different rounds, "
                "whose k values stand for different coordinates, so their masked sum means "
                "nothing; use 'qsgd' or a synchronous strategy")
    check_compression_with_privacy(method=comp.method, error_feedback=comp.error_feedback,
                                   mode=config.privacy.mode)
    if sim.concurrency is not None and sim.concurrency > config.data.num_clients:
        raise ConfigError(
            f"simulation.concurrency = {sim.concurrency} is larger than data.num_clients "
            f"({config.data.num_clients})")
    if sim.latency == "trace" and not sim.latency_trace:
        raise ConfigError("simulation.latency = 'trace' needs simulation.latency_trace "
                          "(a CSV file: client_id, train_s, up_s, down_s)")
    if sim.latency != "trace" and sim.latency_trace:
        raise ConfigError("simulation.latency_trace is set but simulation.latency is "
                          f"{sim.latency!r}; set simulation.latency = 'trace'")
    if config.strategy.name == "fedbuff" and "buffer_size" in config.strategy.options:
        check_fedbuff(buffer_size=config.strategy.options["buffer_size"],
                      concurrency=sim.concurrency or config.cohort_size())


# --------------------------------------------------------------------------- loading


def config_to_dict(config: Config) -> dict[str, Any]:
    """A nested plain dict of ``config`` (None values dropped, TOML-serialisable)."""
    out: dict[str, Any] = {}
    for section in dataclasses.fields(config):
        values = dataclasses.asdict(getattr(config, section.name))
        if section.name == "strategy":
            options = values.pop("options")
            values.update(options)
        out[section.name] = {k: v for k, v in values.items() if v is not None}
    return out


def dump_config(config: Config) -> str:
    """The resolved config as TOML text."""
    import tomli_w  # imported here: only writing a run folder needs it

    return tomli_w.dumps(config_to_dict(config))


def parse_overrides(overrides: list[str]) -> dict[str, dict[str, Any]]:
    """Parse ``section.key=value`` strings; values are TOML literals, else plain strings."""
    result: dict[str, dict[str, Any]] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        dotted, _, text = item.partition("=")
        parts = dotted.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. run.rounds=5")
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        result.setdefault(parts[0], {})[parts[1]] = value
    return result


def _merge(base: dict[str, Any], extra: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    merged = {k: dict(v) if isinstance(v, Mapping) else v for k, v in base.items()}
    for section, values in extra.items():
        target = merged.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"[{section}] must be a table")
        target.update(values)
    return merged


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load ``path`` (or the defaults when None), apply ``--set`` overrides and validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} not found")
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {str(p)!r} is not valid TOML: {exc}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {str(p)!r} is not UTF-8 text") from None
    raw = _merge(raw, parse_overrides(overrides or []))
    return validate_config(raw)
