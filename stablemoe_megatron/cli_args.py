"""Command line generated from the config dataclasses (Megatron-LM flag names).

Precedence: dataclass defaults < ``--config FILE.yaml`` < flags given on the command line.
One default follows another flag: ``--moe-router-topk`` k > 1 without ``--moe-router`` (flag or file)
selects ``switch``, Megatron-LM's softmax top-k router and the only one here that takes k > 1, so a
Megatron-LM top-k MoE command line runs as written.
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
            off = fld.metadata.get("off_flag")  # Megatron's name of the negative form, e.g. --disable-bias-linear
            off_names = [off, f"--no-{names[0][2:]}"] if off else [f"--no-{names[0][2:]}"]
            group.add_argument(*off_names, action="store_false", dest=kwargs["dest"],
                               help=argparse.SUPPRESS if fld.default is False else f"turn {names[0]} off")
            continue
        if "parse" in fld.metadata:  # a value with its own syntax (e.g. --moe-layer-freq 2 or "([0]+[1]*3)")
            scalar = fld.metadata["parse"]
        if fld.metadata.get("megatron_list"):  # Megatron takes a list here; one value is meaningful
            kwargs["nargs"] = "+"
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
    from_file = load_yaml(config_file) if config_file else {}
    from_file = {section: {name: _one_of_list(section, name, value) for name, value in values.items()}
                 for section, values in from_file.items()}
    config = RunConfig.from_dict(from_file)
    for dest, value in args.items():
        section, name = dest.split(".", 1)
        setattr(getattr(config, section), name, _one_of_list(section, name, value))
    router_given = "moe.router" in args or "router" in from_file.get("moe", {})
    if not router_given and (config.moe.router_topk or 1) > 1:
        config.moe.router = "switch"  # a Megatron-LM top-k command line: its softmax router (module doc)
    return config


def _one_of_list(section: str, name: str, value):
    """A flag Megatron-LM takes as a list (one entry per load-balancing type) holds one value here."""
    if not isinstance(value, list) or section not in SECTIONS:
        return value
    fld = next((f for f in dataclasses.fields(SECTIONS[section][0]) if f.name == name), None)
    if fld is None or not fld.metadata.get("megatron_list"):
        return value
    if len(value) != 1:
        raise ConfigError(f"{flag_name(section, name)} takes one value here (one load-balancing loss per "
                          f"router), got {len(value)}: {' '.join(map(str, value))}")
    return value[0]


def config_from_yaml_text(text: str) -> RunConfig:
    """A RunConfig from the YAML written by :func:`dump_config` (checkpoints, run dirs).

    A config saved before the Megatron-LM flag semantics (no ``model.add_bias_linear`` key) is read as
    the model it described: bias-free linears, and an integer ``moe.layer_freq`` k meaning layers
    k, 2k, ... (now Megatron-LM's 1, k+1, ...), turned into the explicit 0/1 pattern.
    """
    import yaml

    values = yaml.safe_load(text) or {}
    model = values.get("model") or {}
    if isinstance(model, dict) and model and "add_bias_linear" not in model:
        model["add_bias_linear"] = False
        moe, layers = values.get("moe") or {}, model.get("num_layers")
        if isinstance(moe.get("layer_freq"), int) and layers:
            moe["layer_freq"] = [1 if n % moe["layer_freq"] == 0 else 0 for n in range(1, layers + 1)]
    return RunConfig.from_dict(values)


def dump_config(config: RunConfig) -> str:
    """The resolved config as YAML, headed by the resolved MoE layout as a comment (readers ignore it)."""
    import yaml

    header = ""
    if config.model.num_layers:
        try:
            header = f"# {config.moe.layout_summary(config.model.num_layers)}\n"
        except ConfigError:  # an inconsistent MoE setting: validation names it; the YAML is still written
            header = ""
    return header + yaml.safe_dump(config.to_dict(), sort_keys=False)
