"""Finding a run's routing-probe history from whichever directory of the run a user names.

The trainer keeps the history in ``<dir>/routing_probe/``, where <dir> is ``--save``, else the
directory of ``--metrics-file``, else ``--tensorboard-dir`` (:func:`.probe.run_directory`). The
recipes in ``examples/`` put everything of a run under one RUN_DIR (``--save RUN_DIR/checkpoints``,
``--metrics-file RUN_DIR/metrics.jsonl``, ``--tensorboard-dir RUN_DIR/tensorboard``), so their
history is ``RUN_DIR/checkpoints/routing_probe/``. Users name any of three levels, and all three
lead to the same history and the same run:

* the run directory RUN_DIR: its own ``routing_probe/``, else ``checkpoints/routing_probe/``,
  else the one direct child that holds a ``routing_probe/``;
* the save directory (``RUN_DIR/checkpoints``);
* the ``routing_probe/`` directory itself.

The run (its name labels the run in reports, and the report goes under it by default) is RUN_DIR:
the save directory's parent when the save directory is the recipes' ``checkpoints/`` or the run's
metrics file lies in that parent, else the directory holding ``routing_probe/``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

PROBE_DIR = "routing_probe"  # the history's directory name (under --save, or beside the metrics)
META = "meta.json"  # its description file; present once the first probe ran

SAVE_DIR = "checkpoints"   # the recipes' --save directory inside RUN_DIR (examples/common.sh)


class HistoryNotFound(FileNotFoundError):
    """The named directory does not exist or holds no (single) routing-probe history."""


@dataclass(frozen=True)
class RunLocation:
    """Where one run's probe history is (``probe_dir``, holding meta.json) and the run it belongs to."""

    probe_dir: Path
    run_dir: Path

    @property
    def name(self) -> str:
        """The run's name: the run directory's name (RUN_DIR, never ``checkpoints``)."""
        return self.run_dir.resolve().name


def _is_history(directory: Path) -> bool:
    return (directory / META).is_file()


def _run_of(save_dir: Path) -> Path:
    """RUN_DIR of the directory holding ``routing_probe/`` (see the module docstring)."""
    parent = save_dir.parent
    if save_dir.resolve().name == SAVE_DIR:
        return parent
    try:
        metrics = json.loads((save_dir / PROBE_DIR / META).read_text()).get("metrics_file")
    except (OSError, ValueError):
        metrics = None
    if metrics and Path(metrics).resolve().parent == parent.resolve():
        return parent
    return save_dir


def no_history_message(path: Path) -> str:
    """What was looked for where, and how to get a history: the error for a run without probes."""
    return (f"{path}: this run has no routing-probe history (looked for {path / META}, "
            f"{path / PROBE_DIR / META} and {path / '*' / PROBE_DIR / META}, e.g. "
            f"{path / SAVE_DIR / PROBE_DIR / META}); train with --routing-probe-interval N (the history "
            f"goes to <--save>/{PROBE_DIR}/, else beside --metrics-file, else into --tensorboard-dir)")


def locate_history(path) -> RunLocation:
    """The history and run of ``path`` (a run, save or routing_probe directory); HistoryNotFound if none."""
    path = Path(path)
    if not path.exists():
        raise HistoryNotFound(f"{path}: no such directory")
    if not path.is_dir():
        raise HistoryNotFound(f"{path}: not a directory (name a run directory, its --save directory "
                              f"or its {PROBE_DIR}/ directory)")
    if _is_history(path):
        return RunLocation(path, _run_of(path.parent))
    if _is_history(path / PROBE_DIR):
        return RunLocation(path / PROBE_DIR, _run_of(path))
    children = sorted(child for child in path.iterdir() if child.is_dir() and _is_history(child / PROBE_DIR))
    preferred = [child for child in children if child.name == SAVE_DIR] or children
    if len(preferred) > 1:
        found = ", ".join(str(child / PROBE_DIR) for child in preferred)
        raise HistoryNotFound(f"{path}: several routing-probe histories ({found}); name the one to report on")
    if preferred:
        return RunLocation(preferred[0] / PROBE_DIR, path)
    raise HistoryNotFound(no_history_message(path))
