"""The on-disk format of a checkpoint run directory, and how an iteration is published atomically.

Layout (Megatron-LM's)::

    SAVE/iter_0000100/                 the dist_checkpointing (torch_dist) directory of iteration 100
         common.pt                     its non-sharded entries, plus Megatron-LM's iteration,
                                       checkpoint_version and args (see .megatron_lm)
         run_config.yaml               the resolved RunConfig (also used by eval and the tools)
         train_state.json              iteration, consumed samples, stage, parallel layout
    SAVE/latest_checkpointed_iteration.txt

Publishing (:func:`write_iteration`, used by the trainer and by convert_checkpoint import/reshard):
every rank writes into ``iter_XXXXXXX.tmp``; after all have finished, rank 0 adds Megatron-LM's
fields to ``common.pt`` and the two files above (``train_state.json`` last: it marks the
directory complete), renames the directory into
place (:func:`publish_dir`) and replaces the tracker (fsync, then ``os.replace``). A process killed
mid-save leaves at most a ``.tmp`` directory (removed by the next save) and the previous
checkpoint, which the tracker still names, loadable.

Nothing here imports the training code (the export tools read and write this format too), nor
torch at import time (only the ``common.pt`` update does).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Callable, Optional, Union

from stablemoe_megatron.checkpoint.megatron_lm import add_megatron_fields
from stablemoe_megatron.errors import ConfigError
from stablemoe_megatron.runtime import barrier, global_rank

TRACKER = "latest_checkpointed_iteration.txt"
STATE_FILE = "train_state.json"
CONFIG_FILE = "run_config.yaml"
DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's index of every stored tensor
MEGATRON_METADATA = "metadata.json"  # megatron dist_checkpointing's format marker
STAGING_SUFFIX = ".tmp"


@dataclass
class TrainState:
    """Everything about the run's position that is not a tensor (``train_state.json``)."""

    iteration: int = 0
    consumed_train_samples: int = 0
    stage: int = 1
    layout: dict = field(default_factory=dict)  # tp, pp, ep, dp, distributed optimizer
    tokenizer_vocab_size: int = 0  # the model's embedding rows cover this many token ids


def read_train_state(directory) -> TrainState:
    return TrainState(**json.loads((Path(directory) / STATE_FILE).read_text()))


def train_state_text(state: Union[TrainState, dict]) -> str:
    """The body of ``train_state.json`` for a TrainState or a dict of its fields."""
    return json.dumps(asdict(state) if is_dataclass(state) else dict(state), indent=1)


def iteration_dir(root, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def staging_dir(final: Path) -> Path:
    """Where the files of ``final`` are written before it is published (``iter_XXXXXXX.tmp``)."""
    final = Path(final)
    return final.with_name(final.name + STAGING_SUFFIX)


# -- tracker ---------------------------------------------------------------------------------------
def read_tracker(root) -> Optional[int]:
    """Latest complete iteration under ``root`` (None when there is no tracker)."""
    tracker = Path(root) / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise ConfigError(f"{tracker}: expected an iteration number, found {text!r}")
    return int(text)


def write_tracker(root, iteration: int) -> None:
    """Point the tracker at ``iteration``: a flushed, fsynced temporary file replaces the old one."""
    root = Path(root)
    tmp = root / (TRACKER + STAGING_SUFFIX)
    with open(tmp, "w") as handle:
        handle.write(f"{iteration}\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, root / TRACKER)


# -- publishing ------------------------------------------------------------------------------------
def publish_dir(tmp: Path, final: Path) -> None:
    """Rename the finished directory ``tmp`` to ``final``, replacing an existing ``final``.

    A directory cannot be swapped in one rename, so an existing one is first moved aside to
    ``final.old``; if the second rename fails it is moved back. Under ``final`` there is always
    either the old directory or the new one, whole, never a mixture.
    """
    tmp, final = Path(tmp), Path(final)
    if not final.exists():
        os.replace(tmp, final)
        return
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_iteration(root, iteration: int, write_payload: Callable[[Path], None], config_yaml: str,
                    train_state: Union[TrainState, dict]) -> Path:
    """Collective (every rank calls it): publish checkpoint ``iteration`` under ``root`` atomically.

    ``write_payload(directory)`` writes this rank's part (``dist_checkpointing.save``) into the
    staging directory. Rank 0 then adds Megatron-LM's ``iteration``, ``checkpoint_version`` and
    ``args`` to its ``common.pt`` (when the payload wrote one), ``run_config.yaml`` and
    ``train_state.json``, publishes the directory and moves the tracker. If anything raises, rank 0
    removes the staging directory and the exception propagates: the previous checkpoint and the
    tracker are untouched.
    """
    final = iteration_dir(root, iteration)
    tmp = staging_dir(final)
    first = global_rank() == 0
    if first:
        Path(root).mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    try:
        write_payload(tmp)
        barrier()
        if first:
            add_megatron_fields(tmp, config_yaml, train_state)
            (tmp / CONFIG_FILE).write_text(config_yaml)
            (tmp / STATE_FILE).write_text(train_state_text(train_state))
            publish_dir(tmp, final)
            write_tracker(root, iteration)
    except BaseException:
        if first:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def prune_iterations(root, keep_last: int, newest: int) -> None:
    """Delete all but the ``keep_last`` newest ``iter_*`` directories (never ``newest``)."""
    root = Path(root)
    found = sorted(int(p.name[5:]) for p in root.glob("iter_*") if p.name[5:].isdigit())
    for iteration in found[:-keep_last]:
        if iteration != newest:
            shutil.rmtree(iteration_dir(root, iteration), ignore_errors=True)
