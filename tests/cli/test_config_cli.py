"""``confide config``: every key, its default, what it accepts and what it means."""

import dataclasses
import tomllib
import typing

import pytest
from confide_testing import ROOT, assert_one_line_error, run_cli

from confide.cli._builtin_strategies import BUILTIN_STRATEGIES
from confide.config import Config, validate_config


def _every_field():
    hints = typing.get_type_hints(Config)
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(hints[section.name]):
            yield section.name, f


def test_every_config_key_is_printed_with_its_help(capsys):
    code, out, err = run_cli(["config"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    for section, f in _every_field():
        if (section, f.name) == ("strategy", "options"):
            continue  # the strategy's own keys, listed per strategy below
        start = lines.index(f"[{section}]")
        block = lines[start:lines.index("", start) if "" in lines[start:] else None]
        (line,) = [ln for ln in block if ln.startswith((f"{f.name} = ", f"# {f.name} = "))]
        help_text = f.metadata.get("help")
        assert help_text, f"{section}.{f.name} has no help text in confide/config.py"
        assert f"# {help_text}" == block[block.index(line) - 1]
        if f.default is not None:
            assert line.split("  # ")[0] == f"{f.name} = {_toml(f.default)}"
    for name, info in BUILTIN_STRATEGIES.items():
        for p in info["params"]:
            assert f"#   {name}: {p['name']} = " in out


def _toml(value):
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, tuple | list):  # a TOML array
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def test_output_is_a_job_file_of_the_defaults(capsys, tmp_path):
    code, out, _ = run_cli(["config"], capsys)
    assert code == 0
    assert validate_config(tomllib.loads(out)) == Config()


def test_ranges_and_choices_are_shown(capsys):
    code, out, _ = run_cli(["config", "secure_aggregation"], capsys)
    assert code == 0
    assert out.startswith("[secure_aggregation]\n")
    assert "clipping_range = 8.0  # a number > 0\n" in out
    assert "bits = 32  # an integer >= 8 and <= 62\n" in out
    assert "# threshold = ...  # an integer >= 2; unset by default\n" in out
    assert "[run]" not in out
    code, out, _ = run_cli(["config", "simulation"], capsys)
    assert 'mixed_precision = "off"  # one of "off", "bf16"' in out
    for executor in ("sequential", "vectorized", "flower"):
        assert executor in out


def test_unknown_section_is_one_line(capsys):
    code, _, err = run_cli(["config", "nope"], capsys)
    assert code == 2
    assert_one_line_error(code, err)
    assert "unknown section [nope]; allowed sections: client, cohort" in err


@pytest.mark.parametrize("section", [f.name for f in dataclasses.fields(Config)])
def test_each_section_alone(section, capsys):
    code, out, _ = run_cli(["config", section], capsys)
    assert code == 0
    assert validate_config(tomllib.loads(out)) == Config()


def test_readme_table_lists_every_key():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = {line.split("|")[1].strip().strip("`"): line for line in readme.splitlines()
            if line.startswith("| `")}
    for section, f in _every_field():
        if (section, f.name) == ("strategy", "options"):
            continue
        assert f"`{f.name}`" in rows[section], f"README's config table lacks {section}.{f.name}"
