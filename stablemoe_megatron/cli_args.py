"""Command line generated from the config dataclasses (Megatron-LM flag names).

Precedence: dataclass defaults < ``--config FILE.yaml`` < flags given on the command line.
The YAML file may be nested by section (``moe: {num_experts: 32}``) or flat with flag names
(``num-experts: 32`` / ``num_experts: 32``).
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from stablemoe_megatron.config import SECTIONS, RunConfig, describe_range, flag_name  # noqa: F401 - flag_name re-exported
from stablemoe_megatron.errors import ConfigError

_Field = Tuple[str, dataclasses.Field, type]  # (section, field, resolved type)


def _fields() -> List[_Field]:
    out = []
    for section, (cls, _) in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for fld in dataclasses.fields(cls):
            out.append((section, fld, hints[fld.name]))
    return out


def _base_type(annotation):
    """(scalar type, is_list) of an annotation such as Optional[int] or List[str]."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0])
    if origin in (list, List):
        return typing.get_args(annotation)[0], True
    return annotation, False


def build_parser(prog: str = "stablemoe-train", description: str = "",
                 include: Optional[Callable[[str, str], bool]] = None) -> argparse.ArgumentParser:
    """The parser of every config field (or those ``include(section, name)`` accepts, without --config).

    Parsed values are only present for the flags actually given (``argparse.SUPPRESS`` defaults).
    """
    parser = argparse.ArgumentParser(prog=prog, description=description, argument_default=argparse.SUPPRESS,
                                     allow_abbrev=False)
    if include is None:
        parser.add_argument("--config", metavar="FILE.yaml", help="YAML settings applied before the flags")
    groups: Dict[str, argparse._ArgumentGroup] = {}
    for section, fld, annotation in _fields():
        if include is not None and not include(section, fld.name):
            continue
        group = groups.setdefault(section, parser.add_argument_group(section))
        scalar, is_list = _base_type(annotation)
        names = [flag_name(section, fld.name), *fld.metadata.get("aliases", ())]
        kwargs = dict(dest=f"{section}.{fld.name}", help=_help(fld))
        if scalar is bool:
            group.add_argument(*names, action="store_true", **kwargs)
            group.add_argument(f"--no-{names[0][2:]}", action="store_false", dest=kwargs["dest"],
                               help=argparse.SUPPRESS if fld.default is False else f"turn {names[0]} off")
            continue
        if "choices" in fld.metadata:
            kwargs["choices"] = fld.metadata["choices"]
            kwargs["metavar"] = "{" + ",".join(map(str, fld.metadata["choices"])) + "}"
        else:
            kwargs["metavar"] = "VALUE" if is_list else fld.name.upper()
        if is_list:
            kwargs["nargs"] = "+"
        group.add_argument(*names, type=scalar, **kwargs)
    return parser


def _help(fld: dataclasses.Field) -> str:
    """The field's help, its range if it has one, and its default once (unless the text gives it)."""
    text = fld.metadata.get("help", "")
    if "range" in fld.metadata:
        text += f"; {describe_range(fld.metadata['range'])}"
    if "default" in text:
        return text.replace("%", "%%")
    default = fld.default if fld.default is not dataclasses.MISSING else fld.default_factory()
    if default is None or default == []:
        shown = "unset"
    elif isinstance(default, bool):
        return text.replace("%", "%%")  # a switch: off unless given
    else:
        shown = default
    return f"{text} (default: {shown})".replace("%", "%%")


def _flat_key_index() -> Dict[str, Tuple[str, str]]:
    index = {}
    for section, fld, _ in _fields():
        flag = flag_name(section, fld.name)[2:]
        for key in {flag, flag.replace("-", "_"), fld.name}:
            index.setdefault(key, (section, fld.name))
    return index


def load_yaml(path: str) -> dict:
    """Read a config file into the nested {section: {field: value}} form."""
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            raw = yaml.safe_load(handle) or {}
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path}: expected a mapping of settings")
    nested: Dict[str, dict] = {}
    index = _flat_key_index()
    for key, value in raw.items():
        if key in SECTIONS and isinstance(value, dict):
            nested.setdefault(key, {}).update(value)
        elif key in index:
            section, name = index[key]
            nested.setdefault(section, {})[name] = value
        else:
            raise ConfigError(f"--config {path}: unknown setting {key!r}")
    return nested


def parse_config(argv: Optional[Sequence[str]] = None, prog: str = "stablemoe-train") -> RunConfig:
    """Defaults, then ``--config`` YAML, then the command-line flags."""
    parser = build_parser(prog)
    args = vars(parser.parse_args(argv))
    config_file = args.pop("config", None)
    config = RunConfig.from_dict(load_yaml(config_file)) if config_file else RunConfig()
    for dest, value in args.items():
        section, name = dest.split(".", 1)
        setattr(getattr(config, section), name, value)
    return config


def config_from_yaml_text(text: str) -> RunConfig:
    """A RunConfig from the YAML written by :func:`dump_config` (checkpoints, run dirs)."""
    import yaml

    return RunConfig.from_dict(yaml.safe_load(text) or {})


def dump_config(config: RunConfig) -> str:
    import yaml

    return yaml.safe_dump(config.to_dict(), sort_keys=False)
