"""Saving and loading the training objects, in the format of :mod:`stablemoe_megatron.checkpoint`.

What needs the live training objects is here: the sharded state dicts of model, optimizer, LR
scheduler and RNG states, and :func:`save_checkpoint` / :func:`load_checkpoint`. File names, the
tracker, the train state and the atomic publishing of an iteration (``iter_XXXXXXX.tmp`` renamed
into place by rank 0 after every rank has written, the tracker replaced last) are the checkpoint
format's (:mod:`stablemoe_megatron.checkpoint.format`), shared with the export tools.

Contents, and what reloads under another TP / PP / EP / DP layout (``train_state.json``'s
``layout``: tp, pp, ep, dp, distributed_optimizer):

* the model: megatron's ``sharded_state_dict`` (each local tensor placed in its global tensor;
  expert weights per GLOBAL expert, so EP may change the number of local experts).
* megatron's optimizer: its ``sharded_state_dict`` maps every Adam moment (and the fp32 main
  weights where there are any) onto the model's sharded tensors, ``optimizer.state.<exp_avg |
  exp_avg_sq | param | fp32_param>.<model key>`` (``OPTIM_METADATA``: the distributed optimizer in
  megatron's ``fully_reshardable`` form, sub-optimizers without a ``chained_<i>.`` prefix, as
  Megatron-LM saves them; recorded as the checkpoint's content metadata and read back from it).
  So the moments reload under any layout, the distributed optimizer on any DP size. Switching
  between ``--use-distributed-optimizer`` and the non-distributed optimizer works too
  (:func:`_switched_optimizer`): the moments have the same keys in both; the distributed
  optimizer's ``param`` entries come from the other's ``fp32_param`` copies (``--bf16`` /
  ``--fp16``) or, in fp32 training, from the model weights themselves (the non-distributed fp32
  optimizer updates the weights in place and keeps no copy); Adam's step count and the loss
  scaler come from the checkpoint, the rest of the hyper-parameters from this run. Shape of the
  tensors: a moment of a parameter of global shape [rows, cols] (experts: [num_experts, rows,
  cols]) is stored as that global tensor; each rank reads its own slice (its DP shard, flattened,
  for the distributed optimizer). megatron 0.16's distributed optimizer cannot save or reload
  with torch's Adam as shipped; :mod:`.optim`'s ``allocate_adam_state``, ``step_placeholders``
  and ``load_optimizer_state`` work around it.
* the LR scheduler (counts samples, independent of the layout) and the distilled routers'
  optimizer in stage 1 (:class:`~.optim.DistilledRouterOptimizer`, keyed like the model too).
* each rank's RNG states: restored only under the same tp, pp, ep and dp (same ranks); under
  another layout every rank reseeds from ``--seed`` + the iteration, deterministically, and says
  so (dropout masks then differ from the uninterrupted run's; the data order and the token
  shuffle do not depend on them).

Checkpoints saved before the content metadata was recorded hold the non-distributed optimizer
with ``chained_<i>.`` prefixes (``LEGACY_OPTIM_METADATA``) and load as well. A checkpoint written
by ``tools/convert_checkpoint.py`` holds the model only: training from it needs ``--no-load-optim``.
"""
from __future__ import annotations

import random
import re
import signal
from dataclasses import replace
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
from stablemoe_megatron.runtime import barrier, global_rank, is_first_rank, world_size
from stablemoe_megatron.training.optim import allocate_adam_state, load_optimizer_state, step_placeholders

OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}
LEGACY_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}  # keys with chained_<i>.
RANK_LAYOUT = ("tp", "pp", "ep", "dp")  # the same values: the same ranks hold the same parts


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
                   with_rng: bool, metadata: Optional[dict] = None) -> dict:
    state = {"model": unwrap(model).sharded_state_dict()}
    if with_optim:
        if is_loading:
            allocate_adam_state(optimizer)
        with step_placeholders(optimizer):
            state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading,
                                                              metadata=dict(metadata or OPTIM_METADATA))
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
        _start_writer_manager_shielded()
        dist_checkpointing.save(state, str(directory), content_metadata=dict(OPTIM_METADATA))

    iteration = train_state.iteration
    try:
        final = write_iteration(root, iteration, write_payload, config_yaml, train_state)
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - a full disk, a quota, a lost mount
        raise CheckpointSaveError(_save_failure(root, staging_dir(iteration_dir(root, iteration)), exc)) from exc
    if global_rank() == 0 and keep_last:
        prune_iterations(root, keep_last, iteration)
    barrier()
    return final


def _start_writer_manager_shielded() -> None:
    """Start megatron's checkpoint-writer Manager (one spawned process, kept for the whole run) with
    SIGUSR1 and SIGTERM blocked. Slurm signals every process of a job step (the time-limit SIGUSR1,
    scancel's SIGTERM), torchrun its workers' process groups; a spawned process has default
    dispositions, so either signal would kill the Manager and the save it triggers would fail (Broken
    pipe / EOFError). The mask survives exec, so the Manager never acts on them; this process gets any
    that arrived meanwhile when the mask is restored. multiprocessing's resource tracker, spawned
    first, unblocks SIGINT/SIGTERM after its own start (it ignores them), hence the second block."""
    from multiprocessing import resource_tracker

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", True) is not None:
        return
    stop = {signal.SIGUSR1, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    try:
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, stop)
        filesystem_async._get_write_results_queue()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


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
                    layout: Optional[dict] = None, load_optim: bool = True, seed: Optional[int] = None) -> TrainState:
    """Restore the model, and with ``load_optim`` the optimizers and the LR schedule, under any layout.

    ``layout`` is this run's (``build.layout_of``); the RNG states are restored when its tp, pp,
    ep and dp equal the saved ones, else every rank reseeds from ``seed`` + the iteration (when a
    seed is given) and says so. Collective: every rank calls it.
    """
    saved = read_train_state(directory)
    with_optim = load_optim and optimizer is not None
    if with_optim and saved.layout.get("model_only"):
        raise ConfigError(
            f"--load {directory}: the checkpoint holds the model only (written by "
            f"{saved.layout.get('converted_by') or 'tools/convert_checkpoint.py'}), no optimizer state: add "
            f"--no-load-optim to continue training from its weights with a fresh optimizer")
    same_ranks = layout is None or _ranks(saved.layout) == _ranks(layout)
    switched = with_optim and layout is not None and _distributed(saved.layout) != _distributed(layout)
    side = side_optimizer if saved.stage == 1 else None
    metadata = _content_metadata(directory) if with_optim else None
    state = _sharded_state(model, optimizer, scheduler, side, with_optim, True, same_ranks, metadata)
    if switched:
        _read_other_kind(state["optimizer"], state["model"], directory)
    loaded = _load(state, directory)
    unwrap(model).load_state_dict(loaded["model"])
    if with_optim:
        optimizer_state = _switched_optimizer(state["optimizer"], loaded["optimizer"], directory) if switched \
            else loaded["optimizer"]
        load_optimizer_state(optimizer, optimizer_state)
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
        if side is not None:
            side.load_state_dict(loaded["distilled_optimizer"], saved.iteration)
        if layout is not None and saved.layout != layout:
            _say(f"resume: optimizer state saved under {_layout_text(saved.layout)} loaded under "
                 f"{_layout_text(layout)}")
    _restore_rng(loaded, same_ranks, saved, layout, seed)
    return saved


def _load(state: dict, directory) -> dict:
    """megatron's dist_checkpointing.load; an unreadable checkpoint becomes one ConfigError."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        return dist_checkpointing.load(state, str(directory))
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - damage the size check cannot see
        cause = _root_cause(exc)
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        raise ConfigError(f"checkpoint {directory} is damaged: it could not be read ({type(cause).__name__}: "
                          f"{first[:300]}); {previous_hint(directory)}") from exc


def _content_metadata(directory) -> dict:
    """The sharded-state-dict metadata the checkpoint was saved with (older ones: the legacy form)."""
    from megatron.core import dist_checkpointing

    try:
        metadata = dist_checkpointing.load_content_metadata(str(directory))
    except Exception:  # noqa: BLE001 - unreadable: the load that follows reports the damage
        return dict(OPTIM_METADATA)
    return dict(metadata) if metadata else dict(LEGACY_OPTIM_METADATA)


def _ranks(layout: dict) -> tuple:
    return tuple(layout.get(key) for key in RANK_LAYOUT)


def _distributed(layout: dict) -> bool:
    return bool(layout.get("distributed_optimizer"))


def _layout_text(layout: dict) -> str:
    ranks = " ".join(f"{key.upper()}{layout.get(key)}" for key in RANK_LAYOUT)
    return f"{ranks} ({'distributed' if _distributed(layout) else 'non-distributed'} optimizer)"


def _say(text: str) -> None:
    if is_first_rank():
        print(text, flush=True)


def _restore_rng(loaded: dict, same_ranks: bool, saved: TrainState, layout: Optional[dict],
                 seed: Optional[int]) -> None:
    """Each rank's saved RNG states under the same ranks; else a deterministic reseed (if ``seed``)."""
    if same_ranks:
        if loaded.get("rng_state") is not None:
            _set_rng_state(loaded["rng_state"])
        return
    if seed is None:
        return
    from stablemoe_megatron.parallel import seed_everything

    seed_everything(seed + saved.iteration)
    _say(f"resume: saved under {_layout_text(saved.layout)}, now {_layout_text(layout or {})}: the RNG "
         f"states are per rank and were not restored; every rank reseeded with --seed + iteration = "
         f"{seed + saved.iteration}")


# -- the optimizer state of the other kind (distributed <-> non-distributed) -------------------------
_MAIN_WEIGHTS = re.compile(r"((?:chained_\d+\.)?optimizer\.state\.)(param|fp32_param)\.(.+)")
_FROM_CHECKPOINT = ("grad_scaler",)  # besides Adam's step, the common entries taken from the checkpoint


def _sharded_leaves(tree):
    """(container, key, entry) for each ShardedBase entry of a nested dict/list."""
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in list(items):
        if isinstance(value, ShardedBase):
            yield tree, key, value
        else:
            yield from _sharded_leaves(value)


class _ModelWeight:
    """A request entry that is not read from the checkpoint: the model weight (loaded just before)."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight


def _read_other_kind(request: dict, model_state: dict, directory) -> None:
    """Point this run's main-weight entries at what the other optimizer kind stored (in place).

    The distributed optimizer's ``optimizer.state.param.<key>`` is the non-distributed one's
    ``optimizer.state.fp32_param.<key>`` (bf16/fp16), or in fp32 the model weight itself (a
    :class:`_ModelWeight`: the checkpoint's weight, loaded into the model); the other way round
    ``fp32_param`` is read from ``param``. The moments have the same keys in both kinds.
    """
    from megatron.core.dist_checkpointing.serialization import load_tensors_metadata

    try:
        stored = set(load_tensors_metadata(str(directory)).keys())
    except Exception:  # noqa: BLE001 - unreadable: the load that follows reports the damage
        return
    weights = {(entry.key, _offset(entry)): entry.data for _, _, entry in _sharded_leaves(model_state)}
    for container, key, entry in _sharded_leaves(request):
        match = _MAIN_WEIGHTS.fullmatch(entry.key)
        if match is None or entry.key in stored:
            continue
        prefix, kind, model_key = match.groups()
        other = f"{prefix}{'fp32_param' if kind == 'param' else 'param'}.{model_key}"
        if other in stored:
            container[key] = replace(entry, key=other)
        elif kind == "param" and (model_key, _offset(entry)) in weights:
            container[key] = _ModelWeight(weights[(model_key, _offset(entry))])


def _offset(entry) -> Optional[tuple]:
    offset = getattr(entry, "global_offset", None)
    return tuple(offset) if offset is not None else None


def _switched_optimizer(request: dict, loaded: dict, directory) -> dict:
    """This run's optimizer state dict from a checkpoint of the other kind: the request's own
    structure and hyper-parameters, the loaded tensors at its sharded entries, and from the
    checkpoint Adam's step (the non-distributed optimizer's ``common_step``, the distributed
    one's ``param_groups[i]['step']``) and the loss scaler."""
    step = _saved_step(loaded)
    if step is None:
        raise ConfigError(f"--load {directory}: the optimizer state holds no Adam step count; add "
                          f"--no-load-optim to continue with a fresh optimizer")
    state = _filled(request, loaded)
    _set_step(state, step)
    return state


def _filled(request, loaded):
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedBase

    if isinstance(request, ShardedBase):
        return loaded
    if isinstance(request, _ModelWeight):
        return request.weight.detach()
    if isinstance(request, LocalNonpersistentObject):
        return request.unwrap()
    if isinstance(request, dict):
        other = loaded if isinstance(loaded, dict) else {}
        return {k: other[k] if k in _FROM_CHECKPOINT and k in other else _filled(v, other.get(k))
                for k, v in request.items()}
    if isinstance(request, list):
        other = loaded if isinstance(loaded, list) else []
        return [_filled(v, other[i] if i < len(other) else None) for i, v in enumerate(request)]
    return request


def _saved_step(tree) -> Optional[float]:
    if isinstance(tree, dict):
        if "common_step" in tree:
            return float(tree["common_step"])
        for group in tree.get("param_groups", None) or ():
            if isinstance(group, dict) and "step" in group:
                return float(group["step"])
        values = tree.values()
    elif isinstance(tree, list):
        values = tree
    else:
        return None
    for value in values:
        step = _saved_step(value)
        if step is not None:
            return step
    return None


def _set_step(tree, step: float) -> None:
    """The non-distributed optimizer's ``state['common_step']``, the distributed one's group steps."""
    if isinstance(tree, list):
        for value in tree:
            _set_step(value, step)
        return
    if not isinstance(tree, dict):
        return
    if isinstance(tree.get("param_groups"), list):
        if "state" in tree:
            tree["state"]["common_step"] = torch.tensor(step, dtype=torch.float32)
        else:
            for group in tree["param_groups"]:
                group["step"] = step
        return
    for value in tree.values():
        _set_step(value, step)
