import pytest

from confide.config import Config, dump_config, load_config, parse_overrides
from confide.exceptions import ConfigError


def test_defaults_are_the_default_job():
    cfg = load_config()
    assert cfg.data.dataset == "digits"
    assert cfg.data.num_clients == 20
    assert cfg.data.partition == "dirichlet" and cfg.data.alpha == 0.5
    assert cfg.strategy.name == "fedavg" and cfg.model.name == "mlp"
    assert cfg.simulation.executor == "sequential"


def test_toml_file_and_overrides(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text(
        '[run]\nrounds = 7\n[data]\ndataset = "digits"\n[strategy]\nname = "x"\nmu = 0.1\n'
    )
    cfg = load_config(path, ["run.seed=3", "client.lr=0.2", "cohort.size=0.5",
                             "data.partition=iid"])
    assert (cfg.run.rounds, cfg.run.seed, cfg.client.lr) == (7, 3, 0.2)
    assert cfg.cohort.size == 0.5 and cfg.cohort_size() == 10
    assert cfg.data.partition == "iid"
    assert cfg.strategy.name == "x" and cfg.strategy.options == {"mu": 0.1}


def test_round_trip_through_toml(tmp_path):
    cfg = load_config(None, ["privacy.delta=1e-6", "cohort.size=5", "strategy.beta=0.5"])
    path = tmp_path / "config.toml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_int_widens_to_float():
    assert load_config(None, ["client.lr=1"]).client.lr == 1.0


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("data.bogus=1", "unknown key data.bogus"),
        ("bogus.key=1", "unknown section [bogus]"),
        ("client.lr=-0.1", "client.lr = -0.1 is out of range"),
        ("client.lr='fast'", "client.lr = 'fast' has the wrong type"),
        ("run.rounds=0", "run.rounds = 0 is out of range"),
        ("run.rounds=2.5", "expected an integer"),
        ("data.partition='random'", "choose one of"),
        ("cohort.size=0", "cohort.size = 0 is out of range"),
        ("cohort.size=1.5", "cohort.size = 1.5 is out of range"),
        ("cohort.min_clients=50", "larger than the cohort size"),
        ("simulation.dropout_rate=1.0", "simulation.dropout_rate = 1.0 is out of range"),
        ("privacy.delta=1.0", "privacy.delta = 1.0 is out of range"),
        ("privacy.clip_norm=0", "privacy.clip_norm = 0.0 is out of range"),
        ("run.rounds", "expected section.key=value"),
        ("rounds=3", "expected section.key=value"),
    ],
)
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nrounds=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_parse_overrides_values():
    parsed = parse_overrides(["a.b=1", "a.c=true", "a.d=hello", "a.e='quoted'", "a.f=[1,2]"])
    assert parsed == {"a": {"b": 1, "c": True, "d": "hello", "e": "quoted", "f": [1, 2]}}


def test_config_is_frozen():
    cfg = Config()
    with pytest.raises(AttributeError):
        cfg.run.rounds = 5  # type: ignore[misc]


# --------------------------------------------------------------------------- compression, clock
# Issue 14, acceptance 5: bad input is a one-line error, through load_config and the CLI.

COMPRESSION_AND_CLOCK_ERRORS = [
    (["compression.ratio=0"], "compression.ratio = 0.0 is out of range; it must be in (0, 1]"),
    (["compression.ratio=1.5"], "compression.ratio = 1.5 is out of range; it must be in (0, 1]"),
    (["compression.ratio=-0.1"], "it must be in (0, 1]"),
    (["compression.ratio=inf"], "compression.ratio = inf is out of range"),
    (["compression.method='topk'", "secure_aggregation.enabled=true"],
     "'topk' cannot run with secure aggregation: each client keeps different indices"),
    (["compression.method='sign'", "secure_aggregation.enabled=true"],
     "'sign' cannot run with secure aggregation"),
    (["compression.bits=1"], "compression.bits = 1 is out of range"),
    (["compression.bits=17"], "compression.bits = 17 is out of range"),
    (["compression.method='gzip'"], "compression.method = 'gzip' is not allowed"),
    (["compression.scale=0"], "compression.scale = 0.0 is out of range"),
    (["strategy.name='fedbuff'", "strategy.buffer_size=11", "simulation.concurrency=10"],
     "strategy.buffer_size = 11 is larger than the concurrency (10 clients"),
    (["strategy.name='fedbuff'", "strategy.buffer_size=21"],  # concurrency unset: the cohort
     "strategy.buffer_size = 21 is larger than the concurrency (20 clients"),
    (["strategy.name='fedbuff'", "strategy.buffer_size=0"], "strategy.buffer_size = 0 must be"),
    (["simulation.concurrency=21"], "simulation.concurrency = 21 is larger than data.num_clients"),
    (["simulation.concurrency=0"], "simulation.concurrency = 0 is out of range"),
]


@pytest.mark.parametrize(("overrides", "fragment"), COMPRESSION_AND_CLOCK_ERRORS)
def test_compression_and_clock_errors_are_one_line(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_compression_and_clock_defaults_and_good_values(tmp_path):
    cfg = load_config()
    assert cfg.compression.method == "none" and cfg.compression.error_feedback
    assert cfg.simulation.concurrency is None and cfg.simulation.latency == "lognormal"
    good = load_config(None, ["compression.method='randk'", "compression.ratio=1",
                              "secure_aggregation.enabled=true", "simulation.concurrency=10",
                              "strategy.name='fedbuff'", "strategy.buffer_size=10"])
    assert good.compression.ratio == 1.0 and good.strategy.options == {"buffer_size": 10}
    path = tmp_path / "config.toml"
    path.write_text(dump_config(good))
    assert load_config(path) == good  # the new keys survive the run folder's config.toml


def test_check_fedbuff_directly():
    from confide.config import check_fedbuff

    check_fedbuff(buffer_size=10, concurrency=10)
    with pytest.raises(ConfigError, match="never fill"):
        check_fedbuff(buffer_size=11, concurrency=10)
    with pytest.raises(ConfigError, match="whole number"):
        check_fedbuff(buffer_size=True, concurrency=10)


@pytest.mark.parametrize(("overrides", "fragment"), [
    (["compression.ratio=0"], "must be in (0, 1]"),
    (["compression.ratio=2"], "must be in (0, 1]"),
    (["compression.method='topk'", "secure_aggregation.enabled=true"],
     "cannot run with secure aggregation"),
    (["strategy.name='fedbuff'", "strategy.buffer_size=11", "simulation.concurrency=10"],
     "larger than the concurrency"),
])
def test_confide_simulate_refuses_with_one_line(overrides, fragment, capsys, tmp_path):
    from confide_testing import assert_one_line_error, run_cli

    args = ["simulate", "-o", str(tmp_path / "new")]
    for kv in overrides:
        args += ["--set", kv]
    code, _, err = run_cli(args, capsys)
    assert_one_line_error(code, err)
    assert code == 2 and fragment in err
    assert not (tmp_path / "new").exists()


def test_confide_simulate_subprocess_exit_code(tmp_path):
    import subprocess

    from confide_testing import ROOT, assert_one_line_error, cli_command

    proc = subprocess.run([*cli_command(), "simulate", "-o", str(tmp_path / "new"), "--set",
                           "compression.ratio=0"], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert_one_line_error(proc.returncode, proc.stderr)
    assert proc.returncode == 2 and "compression.ratio" in proc.stderr
