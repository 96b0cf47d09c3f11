"""Model sizes and recipes as config files: ``configs/<name>.yaml`` at the repository root.

One file per size (``tiny``, ``base``, ``large``) holds what defines it: model and MoE shape, batch
sizes, iterations, learning-rate schedule, Adam, weight decay, gradient clip, evaluation / log / save
intervals, bf16. The trainer reads a file through ``--config FILE`` (defaults < file < flags); the
recipes in ``examples/`` pass ``--config configs/$SIZE.yaml``, and Python users (``tools/reproduce.py``,
``bench/``) read the same files here::

    from stablemoe_megatron.size_configs import load_size, size_flags
    load_size("tiny")["model"]["hidden_size"]           # 128
    load_size("configs/base.yaml")                       # a path works too
    size_flags("tiny", without=("moe",))                 # the file as trainer flags, minus sections

A name is looked up in the ``configs/`` directory next to this package's directory (a repository
checkout, or the package installed with ``pip install -e``); anything with a ``/`` or a ``.yaml``
suffix is a path. The files are read by the trainer's own reader (:func:`cli_args.load_yaml`), so
a value here is the value the trainer gets; each value's type is checked against its field
(``lr: 1e-3`` is a string in YAML and must be written ``1.0e-3``).

Run as a file (no install needed; examples/common.sh does this) it prints values for the shell::

    python3 stablemoe_megatron/size_configs.py get configs/tiny.yaml moe.num_experts training.train_iters
    python3 stablemoe_megatron/size_configs.py flags tiny --without moe       # one word a line
    python3 stablemoe_megatron/size_configs.py list

``get`` reads a file nested by section with PyYAML alone (fast: the config tree imports torch) and
falls back to the full reader for flat files and settings the file leaves out (the trainer's
default); tests/test_configs.py checks that both give the same values.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the package is this file's directory
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import dataclasses  # noqa: E402
import typing  # noqa: E402
from typing import Any, Dict, Iterable, List, Union  # noqa: E402

from stablemoe_megatron.errors import ConfigError  # noqa: E402

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
PathLike = Union[str, Path]


def available_sizes(directory: PathLike = CONFIG_DIR) -> List[str]:
    """The size names with a file in ``directory`` (default: the repository's configs/)."""
    return sorted(p.stem for p in Path(directory).glob("*.yaml"))


def size_config_path(name: PathLike) -> Path:
    """The file of a size name (``configs/<name>.yaml``) or the path itself; ConfigError if missing."""
    text = str(name)
    if "/" in text or text.endswith((".yaml", ".yml")) or isinstance(name, Path):
        path = Path(text)
        if not path.is_file():
            raise ConfigError(f"size config {text}: no such file")
        return path
    path = CONFIG_DIR / f"{text}.yaml"
    if not path.is_file():
        sizes = ", ".join(available_sizes()) or "none"
        raise ConfigError(f"unknown size {text!r}: no {path} (sizes: {sizes}; or give a path to a .yaml file)")
    return path


def _check_types(nested: Dict[str, dict], path: Path) -> None:
    from stablemoe_megatron.config import SECTIONS

    for section, values in nested.items():
        cls = SECTIONS[section][0]
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        for key, value in values.items():
            if key not in names:
                raise ConfigError(f"{path}: unknown setting {section}.{key}; known: {', '.join(sorted(names))}")
            if not _matches(value, hints[key]):
                hint = "; write a float with a '.' (1.0e-3, not 1e-3)" if isinstance(value, str) else ""
                raise ConfigError(f"{path}: {section}.{key} = {value!r} is not a {_type_name(hints[key])}{hint}")


def _matches(value, annotation) -> bool:
    origin = typing.get_origin(annotation)
    if origin is typing.Union:
        return any(_matches(value, arg) for arg in typing.get_args(annotation))
    if origin in (list, List):
        item = typing.get_args(annotation)[0]
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _type_name(annotation) -> str:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return getattr(args[0] if args else annotation, "__name__", str(annotation))


def load_size(name: PathLike) -> Dict[str, Dict[str, Any]]:
    """The file as ``{section: {field: value}}``, exactly what ``--config`` gives the trainer."""
    from stablemoe_megatron.cli_args import load_yaml

    path = size_config_path(name)
    nested = load_yaml(str(path))
    _check_types(nested, path)
    return nested


def size_run_config(name: PathLike):
    """The trainer's RunConfig of the file alone (defaults < file)."""
    from stablemoe_megatron.config import RunConfig

    return RunConfig.from_dict(load_size(name))


def size_value(name: PathLike, dotted: str):
    """One resolved setting, ``"section.field"`` (the file's value, else the trainer's default)."""
    from stablemoe_megatron.config import SECTIONS

    section, _, field = dotted.partition(".")
    if section not in SECTIONS or field not in {f.name for f in dataclasses.fields(SECTIONS[section][0])}:
        raise ConfigError(f"{dotted}: not a setting (section.field, e.g. model.num_layers)")
    return getattr(getattr(size_run_config(name), section), field)


_UNSET = object()


def _nested_file_value(path: Path, dotted: str):
    """What a file nested by section sets for ``section.field``, read with PyYAML alone (the shell's fast
    path: importing the config tree imports torch); ``_UNSET`` for a flat file or a setting it leaves out."""
    import yaml

    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return _UNSET
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        return _UNSET
    section, _, field = dotted.partition(".")
    return raw.get(section, {}).get(field, _UNSET)


def to_flags(nested: Dict[str, Dict[str, Any]], without: Iterable[str] = ()) -> List[str]:
    """Trainer flags that set what ``nested`` sets (its sections in ``without`` left out).

    Booleans become ``--flag`` / ``--no-flag``; floats keep their exact value (``repr``).
    """
    from stablemoe_megatron.config import flag_name

    flags: List[str] = []
    for section, values in nested.items():
        if section in without:
            continue
        for key, value in values.items():
            flag = flag_name(section, key)
            if value is None:
                raise ConfigError(f"{section}.{key}: null cannot be given as a flag")
            if isinstance(value, bool):
                flags.append(flag if value else f"--no-{flag[2:]}")
            elif isinstance(value, list):
                flags += [flag, *map(str, value)]
            else:
                flags += [flag, repr(value) if isinstance(value, float) else str(value)]
    return flags


def size_flags(name: PathLike, without: Iterable[str] = ()) -> List[str]:
    """:func:`load_size` as trainer flags (e.g. ``without=("moe",)`` for the dense baseline)."""
    return to_flags(load_size(name), without)


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="size_configs", description="Read configs/<size>.yaml for the shell.")
    sub = parser.add_subparsers(dest="command", required=True)
    get = sub.add_parser("get", help="print resolved settings, space-separated, in the order given")
    get.add_argument("size", help="size name (configs/<name>.yaml) or path")
    get.add_argument("keys", nargs="+", metavar="SECTION.FIELD")
    flags = sub.add_parser("flags", help="print the file as trainer flags, one word a line")
    flags.add_argument("size")
    flags.add_argument("--without", nargs="+", default=[], metavar="SECTION", help="sections to leave out")
    sub.add_parser("list", help="the size names in configs/")
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            print(" ".join(available_sizes()))
        elif args.command == "get":
            values = []
            for key in args.keys:
                value = _nested_file_value(size_config_path(args.size), key)
                if value is _UNSET or isinstance(value, (dict, list)):
                    value = size_value(args.size, key)  # the full reader: flat files, defaults, errors
                if value is None or isinstance(value, list):
                    raise ConfigError(f"{size_config_path(args.size)}: {key} is not set to a single value")
                values.append(str(value))
            print(" ".join(values))
        else:
            print("\n".join(size_flags(args.size, args.without)))
    except ConfigError as exc:
        print(f"size_configs: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
