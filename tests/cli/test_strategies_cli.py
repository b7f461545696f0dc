"""``confide strategies`` and bad strategy input through ``confide simulate``."""

import pytest
from confide_testing import FAST, assert_one_line_error, run_cli


def _simulate(tmp_path, capsys, *sets):
    out = tmp_path / "run"
    args = ["simulate", "-q", "-o", str(out)]
    for item in [*FAST, *sets]:
        args += ["--set", item]
    code, stdout, err = run_cli(args, capsys)
    return code, err, out


@pytest.mark.parametrize(("sets", "message"), [
    (["strategy.name='fedsgd'"],
     "error: unknown strategy 'fedsgd'; available: fedadagrad, fedadam, fedavg, fedavgm, fedbuff, "
     "fedmedian, fedprox, fedyogi, krum, scaffold, trimmedmean"),
    (["strategy.name='no_such_package.strategies:FedFoo'"],
     "error: strategy 'no_such_package.strategies:FedFoo': cannot import "
     "'no_such_package.strategies' (No module named 'no_such_package')"),
    (["strategy.name='collections:OrderedDict'"],
     "error: strategy 'collections:OrderedDict' is not a confide Strategy subclass"),
    (["strategy.name='fedadam'", "strategy.server_lr=-0.01"],
     "error: strategy.server_lr = -0.01 is out of range; it must be > 0"),
    (["strategy.name='krum'", "secure_aggregation.enabled=true"],
     "error: strategy 'krum' needs individual client updates, but secure aggregation reveals "
     "only their sum"),
    (["strategy.name='fedmedian'", "secure_aggregation.enabled=true"],
     "error: strategy 'fedmedian' needs individual client updates"),
])
def test_bad_strategy_input_is_one_line_and_writes_nothing(tmp_path, capsys, sets, message):
    code, err, out = _simulate(tmp_path, capsys, *sets)
    assert code == 2
    assert_one_line_error(code, err)
    assert err.strip().startswith(message), err
    assert not out.exists()  # nothing half-written


def test_list_shows_every_strategy_origin_and_secure_aggregation(capsys):
    code, out, err = run_cli(["strategies", "list"], capsys)
    assert code == 0, err
    rows = {line.split()[0]: line for line in out.splitlines()[1:] if line.strip()}
    assert set(rows) >= {"fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad",
                         "scaffold", "fedmedian", "trimmedmean", "krum"}
    assert out.splitlines()[0].split()[:3] == ["name", "origin", "secure"]
    for name in ("fedavg", "fedprox", "fedadam", "scaffold"):
        assert rows[name].split()[1:3] == ["confide", "yes"], rows[name]
    for name in ("fedmedian", "trimmedmean", "krum"):
        assert "no (needs individual updates)" in rows[name]
    assert "Karimireddy et al. 2020" in rows["scaffold"]


def test_show_lists_parameters(capsys):
    code, out, _ = run_cli(["strategies", "show", "fedadam"], capsys)
    assert code == 0
    assert "server_lr = 0.01  [> 0]" in out
    assert "secure aggregation: yes" in out
    code, _, err = run_cli(["strategies", "show", "nope"], capsys)
    assert code == 2
    assert_one_line_error(code, err)


def test_strategy_parameters_from_a_job_file(tmp_path, capsys):
    job = tmp_path / "job.toml"
    job.write_text('[strategy]\nname = "fedavgm"\nserver_lr = 0.5\nserver_momentum = 0.5\n')
    code, out, err = run_cli(["simulate", "-q", str(job), "-o", str(tmp_path / "r"),
                              *[a for s in FAST for a in ("--set", s)]], capsys)
    assert code == 0, err
    saved = (tmp_path / "r" / "config.toml").read_text()
    assert 'name = "fedavgm"' in saved and "server_lr = 0.5" in saved
