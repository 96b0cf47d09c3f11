"""Saving and loading the training objects, in the format of :mod:`stablemoe_megatron.checkpoint`.

What needs the live training objects is here: the sharded state dicts of model, optimizer, LR
scheduler and RNG states, and :func:`save_checkpoint` / :func:`load_checkpoint`. File names, the
tracker, the train state and the atomic publishing of an iteration (``iter_XXXXXXX.tmp`` renamed
into place by rank 0 after every rank has written, the tracker replaced last) are the checkpoint
format's (:mod:`stablemoe_megatron.checkpoint.format`), shared with the export tools.

Contents: model (``sharded_state_dict``, so it reloads under any TP/PP/EP layout), megatron
optimizer (the distributed optimizer in its layout-independent ``fully_sharded_model_space``
form), the LR scheduler, the distilled-router optimizer in stage 1, and each rank's RNG states.
Optimizer state and RNG states are restored only under the same parallel layout; loading a
checkpoint under another layout restores the model (and, for training, needs ``--no-load-optim``).
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from stablemoe_megatron.checkpoint import (  # noqa: F401 - CONFIG_FILE ... resolve_load_dir: re-exported
    CONFIG_FILE,
    STATE_FILE,
    TRACKER,
    TrainState,
    complete_iterations,
    iteration_dir,
    previous_hint,
    prune_iterations,
    read_tracker,
    read_train_state,
    resolve_load_dir,
    staging_dir,
    write_iteration,
)
from stablemoe_megatron.errors import CheckpointSaveError, ConfigError
from stablemoe_megatron.runtime import barrier, global_rank, world_size

OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_sharded_model_space"}


def unwrap(model):
    """The GPT model inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


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

    return ShardedObject("rng_state", state, (world_size(),), (global_rank(),), replica_id=0)


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
    """Write iteration ``train_state.iteration`` atomically (collective: every rank calls it).

    A failure (full disk, quota, lost mount) becomes one :class:`CheckpointSaveError` naming the
    cause and the last good checkpoint; the partial directory is removed by the format's writer.
    """
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    def write_payload(directory: Path) -> None:
        state = _sharded_state(model, optimizer, scheduler, side_optimizer, True, False, True)
        dist_checkpointing.save(state, str(directory))

    iteration = train_state.iteration
    try:
        final = write_iteration(root, iteration, write_payload, config_yaml, train_state)
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - a full disk, a quota, a lost mount
        raise CheckpointSaveError(_save_failure(root, staging_dir(iteration_dir(root, iteration)), exc)) from exc
    if global_rank() == 0 and keep_last:
        prune_iterations(root, keep_last, iteration)
    barrier()
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
