"""The routing-probe history: every probe's expert choices, stored compactly so it survives resume.

Directory ``<dir>/routing_probe/``, <dir> being ``--save``, else the directory of ``--metrics-file``,
else ``--tensorboard-dir`` (:func:`.probe.run_directory`); for the recipes in ``examples/`` that is
``RUN_DIR/checkpoints/routing_probe/``:

* ``meta.json`` - the layout: MoE layer numbers, the views recorded per layer (``routed``: the
  expert the layer used; ``backbone`` / ``distilled``: the two routers' own choices where the
  router has a distilled router), probe token count, expert count, dtype, plus run information;
* ``tokens.npy`` - the probe's token ids [n] (int32), to check identity on resume and for reports;
* ``choices.bin`` - append-only, one block per probe: for each layer (meta order) and each of its
  views, n expert ids (uint8, or int16 above 254 experts; the dtype's max means "no expert");
* ``probes.jsonl`` - one line per probe, the ``routing_probe`` record logged to the metrics JSONL
  (line k describes block k);
* ``fluctuation.json`` - the final last-fluctuation curves (:mod:`.fluctuation`), written at the end
  of training;
* ``run_config.yaml`` - the run's configuration (the report reads the tokenizer from it).

On resume only probes at or before the resumed iteration are kept (later blocks and lines are cut),
so the history always matches the weights. A run starting at iteration 0, or resuming with other
probe tokens or MoE layers, moves an existing history aside to ``routing_probe.prev/`` and starts a
new one. Without a run directory the history lives in memory. Readers find the directory from the
run, save or routing_probe directory with :func:`.locate.locate_history`.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from stablemoe_megatron.analysis.locate import META, PROBE_DIR, locate_history  # noqa: F401 - META, PROBE_DIR re-exported

TOKENS, CHOICES, PROBES = "tokens.npy", "choices.bin", "probes.jsonl"
CURVE, CONFIG = "fluctuation.json", "run_config.yaml"
FORMAT = 1


@dataclass
class Layout:
    """What one probe block holds: ``views[layer]`` names, ``num_tokens`` ids each."""

    layers: List[int]
    views: Dict[int, List[str]]
    num_tokens: int
    num_experts: int

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint8 if self.num_experts < 255 else np.int16)

    @property
    def none_value(self) -> int:
        return int(np.iinfo(self.dtype).max)

    @property
    def slots(self) -> List[Tuple[int, str]]:
        return [(layer, view) for layer in self.layers for view in self.views[layer]]

    @property
    def block_bytes(self) -> int:
        return len(self.slots) * self.num_tokens * self.dtype.itemsize

    def to_json(self) -> dict:
        return {"layers": self.layers, "views": {str(k): v for k, v in self.views.items()},
                "num_tokens": self.num_tokens, "num_experts": self.num_experts, "dtype": self.dtype.name,
                "none_value": self.none_value}

    @classmethod
    def from_json(cls, meta: dict) -> "Layout":
        return cls([int(x) for x in meta["layers"]], {int(k): list(v) for k, v in meta["views"].items()},
                   int(meta["num_tokens"]), int(meta["num_experts"]))


class ProbeHistory:
    """Probe records and choices in probe order; appends go to disk at once when a directory is set."""

    def __init__(self, layout: Layout, tokens: np.ndarray, directory: Optional[Path] = None,
                 meta: Optional[dict] = None):
        self.layout = layout
        self.tokens = np.asarray(tokens, dtype=np.int32)
        self.directory = Path(directory) if directory is not None else None
        self.meta = dict(meta or {})
        self.records: List[dict] = []
        self._blocks: List[np.ndarray] = []   # in-memory mode only
        self._last: Optional[np.ndarray] = None

    # -- opening ----------------------------------------------------------------------------------
    @classmethod
    def open(cls, directory, layout: Layout, tokens: np.ndarray, resume_iteration: int,
             meta: Optional[dict] = None) -> Tuple["ProbeHistory", Optional[str]]:
        """(history, note for the log): continue a compatible history up to ``resume_iteration``."""
        history = cls(layout, tokens, directory, meta)
        if directory is None:
            return history, None
        path = history.directory
        note = None
        if (path / META).is_file():
            if resume_iteration > 0 and history._compatible():
                kept, dropped = history._reload(resume_iteration)
                note = (f"routing probe history {path}: kept {kept} probes up to iteration {resume_iteration}"
                        + (f", dropped {dropped} newer" if dropped else ""))
                history._write_meta()
                return history, note
            aside = path.with_name(path.name + ".prev")
            shutil.rmtree(aside, ignore_errors=True)
            path.rename(aside)
            why = "is for other probe tokens or MoE layers" if resume_iteration > 0 else "is from an earlier run"
            note = f"routing probe history {path} {why}: moved to {aside}, starting a new one"
        history._start_fresh()
        return history, note

    def _compatible(self) -> bool:
        path = self.directory
        try:
            old = json.loads((path / META).read_text())
            same = Layout.from_json(old) == self.layout and old.get("format") == FORMAT
            return same and np.array_equal(np.load(path / TOKENS), self.tokens)
        except (OSError, ValueError, KeyError):
            return False

    def _reload(self, resume_iteration: int) -> Tuple[int, int]:
        path = self.directory
        lines = [line for line in (path / PROBES).read_text().splitlines() if line.strip()] \
            if (path / PROBES).is_file() else []
        size = (path / CHOICES).stat().st_size if (path / CHOICES).is_file() else 0
        complete = min(len(lines), size // self.layout.block_bytes)
        records = [json.loads(line) for line in lines[:complete]]
        keep = [r for r in records if r["iteration"] <= resume_iteration]
        self.records = keep
        with open(path / CHOICES, "ab") as f:
            f.truncate(len(keep) * self.layout.block_bytes)
        _atomic_write(path / PROBES, "".join(json.dumps(r) + "\n" for r in keep))
        (path / CURVE).unlink(missing_ok=True)
        if keep:
            self._last = self.all_choices()[-1]
        return len(keep), len(lines) - len(keep)

    def _start_fresh(self) -> None:
        path = self.directory
        path.mkdir(parents=True, exist_ok=True)
        np.save(path / TOKENS, self.tokens)
        for name in (CHOICES, PROBES):
            (path / name).write_bytes(b"")
        (path / CURVE).unlink(missing_ok=True)
        self._write_meta()

    def _write_meta(self) -> None:
        meta = dict(self.meta, format=FORMAT, **self.layout.to_json())
        _atomic_write(self.directory / META, json.dumps(meta, indent=1))

    # -- appending and reading --------------------------------------------------------------------
    def append(self, record: dict, choices: Dict[int, Dict[str, np.ndarray]]) -> None:
        """Add one probe: its record and ``choices[layer][view]`` [n] expert ids."""
        if self.records and record["iteration"] <= self.records[-1]["iteration"]:
            raise ValueError(f"probe at iteration {record['iteration']} is not after the last one "
                             f"({self.records[-1]['iteration']})")
        block = np.stack([np.asarray(choices[layer][view], dtype=self.layout.dtype)
                          for layer, view in self.layout.slots])
        if self.directory is None:
            self._blocks.append(block)
        else:
            with open(self.directory / CHOICES, "ab") as f:
                f.write(block.tobytes())
            with open(self.directory / PROBES, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        self.records.append(record)
        self._last = block

    def previous(self, layer: int, view: str) -> Optional[np.ndarray]:
        """The last probe's [n] choices of (layer, view), or None before the first probe."""
        if self._last is None:
            return None
        return self._last[self.layout.slots.index((layer, view))]

    @property
    def iterations(self) -> np.ndarray:
        return np.asarray([r["iteration"] for r in self.records], dtype=np.int64)

    def all_choices(self) -> np.ndarray:
        """[K, slots, n] all choices (read from disk in file mode)."""
        shape = (len(self.layout.slots), self.layout.num_tokens)
        if self.directory is None:
            return np.stack(self._blocks) if self._blocks else np.zeros((0,) + shape, self.layout.dtype)
        raw = np.fromfile(self.directory / CHOICES, dtype=self.layout.dtype,
                          count=len(self.records) * shape[0] * shape[1])
        return raw.reshape((len(self.records),) + shape)

    def choices(self, layer: int, view: str = "routed") -> np.ndarray:
        """[K, n] expert ids of (layer, view) at every probe."""
        return self.all_choices()[:, self.layout.slots.index((layer, view))]

    # -- tools ------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path) -> "ProbeHistory":
        """Read a finished (or running) history: ``path`` is a run, save or routing_probe directory
        (:func:`.locate.locate_history`; its HistoryNotFound, a FileNotFoundError, says what was looked for)."""
        directory = locate_history(path).probe_dir
        meta = json.loads((directory / META).read_text())
        history = cls(Layout.from_json(meta), np.load(directory / TOKENS), directory, meta)
        lines = [line for line in (directory / PROBES).read_text().splitlines() if line.strip()]
        complete = min(len(lines), (directory / CHOICES).stat().st_size // history.layout.block_bytes)
        history.records = [json.loads(line) for line in lines[:complete]]
        return history


def stage_switch_iteration(records: List[dict], stage2_start_iter: Optional[int] = None) -> Optional[int]:
    """The iteration of the StableMoE stage switch (stage 1 -> 2) seen in probe ``records``, or None.

    The records prove the switch lies between the last stage-1 probe (iteration a) and the first
    stage-2 probe (b): the trainer's switch iteration S (its last stage-1 iteration, logged as "stage
    switch at iteration S") satisfies a <= S < b. ``stage2_start_iter`` (the run's configured S, from
    meta.json) is returned when it fits; otherwise a, which is S whenever the probe interval divides
    S. When the first probe is already in stage 2, ``stage2_start_iter`` is returned if it is
    earlier; otherwise None (no switch recorded, or nothing to place it by).
    """
    if records and records[0].get("stage") == 2:
        early = stage2_start_iter is not None and int(stage2_start_iter) < int(records[0]["iteration"])
        return int(stage2_start_iter) if early else None
    for before, after in zip(records, records[1:]):
        if before.get("stage") == 1 and after.get("stage") == 2:
            first, last = int(before["iteration"]), int(after["iteration"])
            if stage2_start_iter is not None and first <= int(stage2_start_iter) < last:
                return int(stage2_start_iter)
            return first
    return None


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
