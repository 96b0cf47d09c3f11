"""Numeric flags are range-checked before any work (one line naming the flag, exit 2), and --help shows
every enumerated flag's choices and each default once."""
import dataclasses
import math
import re

import pytest

from stablemoe_megatron.cli_args import build_parser, parse_config
from stablemoe_megatron.config import SECTIONS, RunConfig, check_ranges, flag_name, parse_range
from stablemoe_megatron.errors import ConfigError


def _ranged_fields():
    for section, (cls, _) in SECTIONS.items():
        for fld in dataclasses.fields(cls):
            if "range" in fld.metadata:
                yield section, fld


def _just_outside(text: str):
    """Values just below / above the range (None where the range is unbounded)."""
    low, high, low_in, high_in = parse_range(text)
    below = low - 1 if low_in else low
    above = None if math.isinf(high) else (high + 1 if high_in else high)
    return [v for v in (below, above) if v is not None]


RANGED = [(section, fld.name) for section, fld in _ranged_fields()]


@pytest.mark.parametrize("section,name", RANGED, ids=[f"{s}.{n}" for s, n in RANGED])
def test_every_ranged_setting_rejects_values_outside_its_range(section, name):
    fld = next(f for f in dataclasses.fields(SECTIONS[section][0]) if f.name == name)
    is_int = fld.type in ("int", "Optional[int]")
    for value in _just_outside(fld.metadata["range"]):
        config = RunConfig()
        setattr(getattr(config, section), name, int(value) if is_int else float(value))
        with pytest.raises(ConfigError) as err:
            check_ranges(config)
        assert str(err.value).startswith(f"{flag_name(section, name)} must be "), str(err.value)


def test_defaults_are_inside_their_ranges():
    check_ranges(RunConfig())


@pytest.mark.parametrize("argv,message", [
    (["--lr", "-1"], "--lr must be >= 0, got -1.0"),
    (["--moe-balance-loss-coeff", "-1"], "--moe-balance-loss-coeff must be >= 0, got -1.0"),
    (["--adam-beta2", "1"], "--adam-beta2 must be in [0, 1), got 1.0"),
    (["--lr", "nan"], "--lr must be >= 0, got nan"),
    (["--hidden-dropout", "1.5"], "--hidden-dropout must be in [0, 1), got 1.5"),
    (["--moe-expert-capacity-factor", "0"], "--moe-expert-capacity-factor must be > 0, got 0.0"),
    (["--seed", "-3"], "--seed must be in [0, 4294967295], got -3"),
    (["--min-lr", "0.1", "--lr", "0.01"], "--min-lr 0.1 is above --lr 0.01"),
])
def test_bad_values_stop_the_trainer_with_one_line(argv, message, monkeypatch, capsys):
    from stablemoe_megatron.train import main

    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    code = main(["--config", "configs/tiny.yaml", *argv, "--data-path", "/nonexistent/never-read"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == f"stablemoe-train: error: {message}", err


def _help_entries(text: str) -> dict:
    """{flag: its help text} from argparse's --help output."""
    entries, current = {}, None
    for line in text.splitlines():
        match = re.match(r"^  (--[a-z0-9-]+)", line)
        if match:
            current = match.group(1)
            entries[current] = line
        elif current and line.startswith("    "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


def test_help_lists_choices_and_each_default_once():
    entries = _help_entries(build_parser().format_help())
    for section, (cls, _) in SECTIONS.items():
        for fld in dataclasses.fields(cls):
            entry = entries[flag_name(section, fld.name)]
            assert entry.count("default") <= 1, entry
            if "choices" in fld.metadata:
                assert "{" + ",".join(map(str, fld.metadata["choices"])) + "}" in entry, entry
            if fld.type not in ("bool",) and fld.metadata.get("help") and "default" not in fld.metadata["help"]:
                assert "(default: " in entry, entry


def test_eval_help_shows_evaluation_flags_not_the_trainers():
    from stablemoe_megatron.evaluate import build_parser as eval_parser

    text = eval_parser().format_help()
    for flag in ("--eval-split", "--eval-data-path", "--moe-eval-stage", "--full-split", "--output", "--load",
                 "--tensor-model-parallel-size", "--micro-batch-size", "--eval-iters"):
        assert flag in text, flag
    for flag in ("--lr ", "--num-layers", "--moe-router", "--save ", "--metrics-file"):
        assert flag not in text, flag


def test_yaml_values_are_range_checked_too(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optimizer: {lr: -0.5}\n")
    config = parse_config(["--config", str(path)])
    with pytest.raises(ConfigError, match=r"^--lr must be >= 0, got -0.5$"):
        check_ranges(config)
