"""Process-group set-up at the edge of a run: torch.distributed + megatron-core parallel_state.

Library code never calls these: it receives process groups (a ``ProcessGroupCollection``) from
the caller. Entry points (train, eval, tools) and the test helper call
:func:`initialize_distributed` once, and :func:`destroy_parallel_state` when done.

Expert tensor parallelism (``--expert-tensor-parallel-size``, ETP) defaults to 1 here (Megatron-LM's
default is the TP size): experts are whole on each rank. Under TP the tensor-parallel ranks hold
different sequence chunks (sequence parallelism is required for MoE with TP) and each routes its
own chunk to whole experts; expert weights are replicated over the expert-data-parallel group,
which then includes the TP ranks. With ETP > 1 each expert's FFN is split over the ETP ranks
(megatron's expert-TP group; :mod:`stablemoe_megatron.moe.expert_tp`), and the expert layout of
the world is ETP x EP x expert-DP x PP, as in megatron's ``parallel_state``.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch

from stablemoe_megatron.errors import ConfigError
from stablemoe_megatron.runtime import global_rank, world_size_from_env


@dataclass(frozen=True)
class ParallelSizes:
    """Sizes of the parallel dimensions. Data parallel is whatever remains of the world."""

    tensor: int = 1
    pipeline: int = 1
    expert: int = 1
    expert_tensor: int = 1  # ETP: each expert's FFN split over this many ranks

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.tensor * self.pipeline)

    def validate(self, world_size: int) -> None:
        """Raise ConfigError (naming the flags) if this layout cannot tile ``world_size`` ranks."""
        tp, pp, ep, etp = self.tensor, self.pipeline, self.expert, self.expert_tensor
        for flag, size in (
            ("--tensor-model-parallel-size", tp),
            ("--pipeline-model-parallel-size", pp),
            ("--expert-model-parallel-size", ep),
            ("--expert-tensor-parallel-size", etp),
        ):
            if size < 1:
                raise ConfigError(f"{flag} must be >= 1, got {size}")
        if world_size % (tp * pp) != 0:
            raise ConfigError(
                f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} x "
                f"--pipeline-model-parallel-size {pp}; launch a multiple of {tp * pp} processes"
            )
        # The expert layout is ETP x EP x expert-DP x PP over the same world (megatron parallel_state).
        if etp == 1 and world_size % (ep * pp) != 0:
            raise ConfigError(
                f"world size {world_size} is not divisible by --expert-model-parallel-size {ep} x "
                f"--pipeline-model-parallel-size {pp}; launch a multiple of {ep * pp} processes"
            )
        if world_size % (etp * ep * pp) != 0:
            raise ConfigError(
                f"world size {world_size} is not divisible by --expert-tensor-parallel-size {etp} x "
                f"--expert-model-parallel-size {ep} x --pipeline-model-parallel-size {pp}; launch a "
                f"multiple of {etp * ep * pp} processes"
            )


def quiet_megatron_warnings() -> None:
    """Hide megatron-core's import-time notices about optional packages (TE, apex) and defaults.

    They repeat once per rank and module and say nothing a user can act on; the README documents
    the optional extras instead.
    """
    import warnings

    import logging

    for pattern in (
        r".*(Transformer Engine|Apex).*not installed.*",
        r".*full scope is deprecated.*",
        r".*CUDA_DEVICE_MAX_CONNECTIONS.*",
        r".*moe_ffn_hidden_size is not set.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)
    # Our MoE layer is not in megatron's list of known MLP classes; it builds its own groups.
    logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(
        lambda record: "Unknown MLP type" not in record.getMessage())


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def initialize_distributed(
    sizes: ParallelSizes = ParallelSizes(),
    *,
    rank: int | None = None,
    world_size: int | None = None,
    timeout_minutes: int = 30,
) -> None:
    """Initialise torch.distributed (from torchrun's environment by default) and parallel_state.

    Applies :mod:`stablemoe_megatron.cpu_compat` when CUDA is absent. Safe to call when the
    default process group already exists (it is reused).
    """
    from stablemoe_megatron import cpu_compat

    quiet_megatron_warnings()
    cpu_compat.apply()
    if not torch.distributed.is_initialized():
        rank = global_rank() if rank is None else rank  # no process group yet: torchrun's RANK
        world_size = world_size_from_env() if world_size is None else world_size
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
        torch.distributed.init_process_group(
            backend=default_backend(),
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    world_size = torch.distributed.get_world_size()
    sizes.validate(world_size)
    initialize_parallel_state(sizes, timeout_minutes=timeout_minutes)


def initialize_parallel_state(sizes: ParallelSizes, timeout_minutes: int = 30) -> None:
    """(Re)build megatron-core's parallel_state groups for ``sizes`` on the existing world."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        destroy_parallel_state()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=sizes.tensor,
        pipeline_model_parallel_size=sizes.pipeline,
        expert_model_parallel_size=sizes.expert,
        expert_tensor_parallel_size=sizes.expert_tensor,
        distributed_timeout_minutes=timeout_minutes,
    )
    _create_host_expert_parallel_group()


_HOST_EP_GROUP = None


def host_expert_parallel_group():
    """A gloo group over this rank's expert-parallel ranks, on GPU runs with EP > 1 (else None).

    The dispatcher exchanges per-expert token counts that are already on the host (hash and
    frozen StableMoE routing) over it, so no device-to-host copy is needed (see moe/dispatcher.py).
    On CPU runs the EP group itself is a gloo group and is used directly.
    """
    return _HOST_EP_GROUP


def _create_host_expert_parallel_group() -> None:
    global _HOST_EP_GROUP
    from megatron.core import parallel_state

    _HOST_EP_GROUP = None
    ep_group = parallel_state.get_expert_model_parallel_group()
    if not torch.cuda.is_available() or ep_group.size() == 1:
        return
    mine = torch.distributed.get_process_group_ranks(ep_group)
    everyone = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, mine)
    for ranks in sorted({tuple(r) for r in everyone}):  # same order on every rank: new_group is collective
        group = torch.distributed.new_group(list(ranks), backend="gloo")
        if list(ranks) == mine:
            _HOST_EP_GROUP = group


def seed_everything(seed: int) -> None:
    """Seed python, numpy, torch and megatron's tracked (tensor/expert/data-parallel) RNG streams."""
    import random

    import numpy as np
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def destroy_parallel_state() -> None:
    """Tear down parallel_state and destroy its process groups (the default group is left to its owner).

    megatron-core's ``destroy_model_parallel`` only forgets its groups; torch.distributed keeps
    them (and each gloo group keeps three threads) until ``destroy_process_group``. A process that
    rebuilds parallel_state many times (the test worker pools, a driver running several jobs)
    would otherwise accumulate thousands of gloo threads.
    """
    global _HOST_EP_GROUP
    import gc

    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    _HOST_EP_GROUP = None
    if torch.distributed.is_initialized():
        for group in _subgroups():
            torch.distributed.destroy_process_group(group)
    gc.collect()  # groups referenced from reference cycles (modules, optimizers) go now


def _subgroups() -> list:
    """Every process group of this rank except the default one."""
    from torch.distributed import distributed_c10d

    world = torch.distributed.group.WORLD
    return [group for group in list(distributed_c10d._world.pg_map) if group is not world]
