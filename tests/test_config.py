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
