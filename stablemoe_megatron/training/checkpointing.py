"""Checkpoints with megatron-core dist_checkpointing (torch_dist), written atomically.

Layout (Megatron-LM's)::

    SAVE/iter_0000100/                 the dist_checkpointing directory of iteration 100
         run_config.yaml               the resolved RunConfig (also used by eval and the tools)
         train_state.json              iteration, consumed samples, stage, parallel layout
    SAVE/latest_checkpointed_iteration.txt

A save goes to ``iter_XXXXXXX.tmp`` and is renamed into place by rank 0 after every rank has
finished writing; the tracker file is replaced (``os.replace``) last. A run killed mid-save leaves
at most a ``.tmp`` directory behind (removed by the next save) and the previous checkpoint, which
the tracker still names, loadable.

Contents: model (``sharded_state_dict``, so it reloads under any TP/PP/EP layout), megatron
optimizer (the distributed optimizer in its layout-independent ``fully_sharded_model_space``
form), the LR scheduler, the distilled-router optimizer in stage 1, and each rank's RNG states.
Optimizer state and RNG states are restored only under the same parallel layout; loading a
checkpoint under another layout restores the model (and, for training, needs ``--no-load-optim``).
"""
from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from stablemoe_megatron.errors import CheckpointSaveError, ConfigError
from stablemoe_megatron.training.checkpoint_files import (  # noqa: F401 - re-exported names
    STATE_FILE,
    TRACKER,
    describe_iterations,
    complete_iterations,
    iteration_dir,
    previous_hint,
    verify_files,
)

CONFIG_FILE = "run_config.yaml"
OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_sharded_model_space"}


@dataclass
class TrainState:
    """Everything about the run's position that is not a tensor."""

    iteration: int = 0
    consumed_train_samples: int = 0
    stage: int = 1
    layout: dict = field(default_factory=dict)  # tp, pp, ep, dp, distributed optimizer
    tokenizer_vocab_size: int = 0  # the model's embedding rows cover this many token ids


def read_tracker(root) -> Optional[int]:
    """Latest complete iteration under ``root`` (None when there is no checkpoint)."""
    tracker = Path(root) / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise ConfigError(f"{tracker}: expected an iteration number, found {text!r}")
    return int(text)


def read_train_state(directory) -> TrainState:
    return TrainState(**json.loads((Path(directory) / STATE_FILE).read_text()))


def unwrap(model):
    """The GPT model inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


# -- RNG -------------------------------------------------------------------------------------------
def _rng_state() -> dict:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": get_cuda_rng_tracker().get_states()}


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded_object(state):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return ShardedObject("rng_state", state, (world,), (_rank(),), replica_id=0)


# -- state dicts -----------------------------------------------------------------------------------
def _sharded_state(model, optimizer, scheduler, side_optimizer, with_optim: bool, is_loading: bool,
                   with_rng: bool) -> dict:
    state = {"model": unwrap(model).sharded_state_dict()}
    if with_optim:
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading, metadata=OPTIM_METADATA)
        state["opt_param_scheduler"] = scheduler.state_dict()
        if side_optimizer is not None:
            state["distilled_optimizer"] = side_optimizer.sharded_state_dict(state["model"])
    if with_rng:
        state["rng_state"] = _rng_sharded_object(_rng_state() if not is_loading else None)
    return state


def save_checkpoint(root, train_state: TrainState, model, optimizer, scheduler, side_optimizer,
                    config_yaml: str, keep_last: Optional[int] = None) -> Path:
    """Write iteration ``train_state.iteration`` atomically (collective: every rank calls it)."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    final = iteration_dir(root, train_state.iteration)
    tmp = final.with_name(final.name + ".tmp")
    if _rank() == 0:
        Path(root).mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    try:
        state = _sharded_state(model, optimizer, scheduler, side_optimizer, True, False, True)
        dist_checkpointing.save(state, str(tmp))
        _barrier()
        if _rank() == 0:
            (tmp / CONFIG_FILE).write_text(config_yaml)
            (tmp / STATE_FILE).write_text(json.dumps(asdict(train_state), indent=1))
            _replace_dir(tmp, final)
            _write_tracker(Path(root), train_state.iteration)
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - a full disk, a quota, a lost mount
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointSaveError(_save_failure(root, tmp, exc)) from exc
    if _rank() == 0 and keep_last:
        _prune(Path(root), keep_last, train_state.iteration)
    _barrier()
    return final


def _save_failure(root, tmp: Path, exc: BaseException) -> str:
    """One message for a failed save: the directory, the cause (errno text), what survives."""
    cause = _root_cause(exc)
    if isinstance(cause, OSError) and cause.strerror:
        text = f"{cause.strerror} ({cause.filename or tmp})"
    else:
        lines = str(cause).strip().splitlines()
        text = f"{type(cause).__name__}: {lines[0][:300] if lines else ''}"
        if "unexpected pos" in text:  # torch's zip writer when a write comes up short
            text += " (a write came up short: the disk is probably full or a quota or file-size limit was hit)"
    fix = "free space (or point --save at another filesystem)"
    kept = complete_iterations(root)
    then = (f"the last good checkpoint {iteration_dir(root, kept[-1])} is untouched: {fix} and resume with "
            f"--load {root}" if kept else f"no earlier checkpoint exists: {fix} and start again")
    return f"saving checkpoint {tmp.name[:-4]} into {root} failed: {text}; the partial {tmp.name} was removed; {then}"


def _root_cause(exc: BaseException) -> BaseException:
    """The OSError behind ``exc`` if any, else the innermost other exception: the cause/context
    chain and torch DCP's per-rank ``failures`` ((exception, traceback) pairs) are searched."""
    pending, seen, last = [exc], set(), exc
    while pending:
        current = pending.pop(0)
        if isinstance(current, (tuple, list)):
            pending += [item for item in current if isinstance(item, BaseException)]
            continue
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError):
            return current
        if not hasattr(current, "failures"):
            last = current
        pending += [current.__cause__, current.__context__]
        failures = getattr(current, "failures", None)
        if isinstance(failures, dict):
            pending += list(failures.values())
    return last


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():  # re-saving an iteration: move the old one aside, then drop it
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _write_tracker(root: Path, iteration: int) -> None:
    tmp = root / (TRACKER + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(f"{iteration}\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, root / TRACKER)


def _prune(root: Path, keep_last: int, newest: int) -> None:
    found = sorted(int(p.name[5:]) for p in root.glob("iter_*") if p.name[5:].isdigit())
    for iteration in found[:-keep_last]:
        if iteration != newest:
            shutil.rmtree(iteration_dir(root, iteration), ignore_errors=True)


def resolve_load_dir(load, announce: bool = True) -> Path:
    """``--load`` may name the run directory (tracker inside) or one ``iter_*`` directory.

    Without a tracker (deleted, or lost in a copy) the newest complete ``iter_*`` is used and said
    so. The chosen directory's files are checked against its index (:func:`verify_files`).
    """
    path = Path(load)
    if (path / STATE_FILE).is_file():
        verify_files(path)
        return path
    iteration = read_tracker(path)
    if iteration is None:
        found = complete_iterations(path)
        if not found:
            raise ConfigError(f"--load {load}: no {TRACKER} and no complete iter_* checkpoint there; point "
                              f"--load at the --save directory of a run or at one of its iter_* directories")
        iteration = found[-1]
        if announce and _rank() == 0 and int(os.environ.get("RANK", "0")) == 0:
            print(f"--load {load}: {TRACKER} is missing; resuming from the newest complete checkpoint "
                  f"iter_{iteration:07d} (found {describe_iterations(found)})", flush=True)
    directory = iteration_dir(path, iteration)
    if not (directory / STATE_FILE).is_file():
        raise ConfigError(f"--load {load}: {TRACKER} names iteration {iteration} but {directory} is incomplete; "
                          f"{previous_hint(directory)}")
    verify_files(directory)
    return directory


def load_checkpoint(directory, model, optimizer=None, scheduler=None, side_optimizer=None,
                    layout: Optional[dict] = None, load_optim: bool = True) -> TrainState:
    """Restore model (any layout), and optimizer/scheduler/RNG when the layout matches."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    saved = read_train_state(directory)
    same_layout = layout is None or saved.layout == layout
    with_optim = load_optim and optimizer is not None
    if with_optim and not same_layout:
        raise ConfigError(
            f"--load {directory}: saved with parallel layout {saved.layout}, now {layout}; optimizer "
            f"state is restored only under the same layout: add --no-load-optim to continue with the "
            f"weights and a fresh optimizer, or reshard with tools/convert_checkpoint.py")
    side = side_optimizer if saved.stage == 1 else None
    state = _sharded_state(model, optimizer, scheduler, side, with_optim, True, same_layout)
    try:
        loaded = dist_checkpointing.load(state, str(directory))
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - damage the size check cannot see
        cause = _root_cause(exc)
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        raise ConfigError(f"checkpoint {directory} is damaged: it could not be read ({type(cause).__name__}: "
                          f"{first[:300]}); {previous_hint(directory)}") from exc
    unwrap(model).load_state_dict(loaded["model"])
    if with_optim:
        optimizer.load_state_dict(loaded["optimizer"])
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
        if side is not None:
            side.load_state_dict(loaded["distilled_optimizer"], saved.iteration)
    if same_layout and loaded.get("rng_state") is not None:
        _set_rng_state(loaded["rng_state"])
    return saved
