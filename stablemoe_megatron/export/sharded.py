"""Import and reshard: write a torch_dist checkpoint at a chosen TP/PP/EP layout (inside a process group).

Every rank builds its stage of the Megatron model for the TARGET layout on the meta device (no
memory), asks it for its ``sharded_state_dict`` (which says where each local tensor sits in the
global one), keeps only the shards this rank writes (megatron's main replicas: data-parallel
copies write nothing) and materialises just those, filled from a global-tensor source:

* import: the exported safetensors file (memory-mapped; a rank reads only its slices),
* reshard: the source torch_dist checkpoint (one global tensor at a time, then sliced).

So the processes together hold the model once, whatever the layouts. megatron's
``dist_checkpointing.save`` then writes the usual ``iter_XXXXXXX`` directory, with the project's
``run_config.yaml`` (parallel settings replaced by the target's) and ``train_state.json``.

The result holds the MODEL only (weights, hash tables, expert-choice thresholds; the training
position: iteration, consumed samples, stage). Optimizer, LR-scheduler and RNG state are not
converted (the trainer reshards a training checkpoint's optimizer state itself when resuming under
another layout: convert only to export or to change the layout of a model). ``train_state.json``'s
layout is marked ``model_only``, so resuming training asks for ``--no-load-optim``; evaluation loads as is.
"""
from __future__ import annotations

import math
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

from stablemoe_megatron.checkpoint import TrainState, write_iteration
from stablemoe_megatron.errors import ConfigError
from stablemoe_megatron.runtime import barrier, global_rank

VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


def min_world_size(tp: int, pp: int, ep: int) -> int:
    """Fewest processes that realise the layout (megatron carves EP out of the data-parallel ranks)."""
    return pp * (tp * ep // math.gcd(tp, ep))


def target_config(run_config, tp: int, pp: int, ep: int):
    """The run's config with the target layout (sequence parallelism on when MoE and TP > 1)."""
    from stablemoe_megatron.parallel import ParallelSizes

    config = replace(run_config, parallel=replace(
        run_config.parallel, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep, sequence_parallel=run_config.parallel.sequence_parallel or tp > 1,
        expert_tensor_parallel_size=None))  # the converter writes whole experts (ETP 1); they reshard
    ParallelSizes(tp, pp, ep).validate(min_world_size(tp, pp, ep))
    config.model.validate(tp)
    if config.model.num_layers % pp:
        raise ConfigError(f"--pp {pp} does not divide the model's {config.model.num_layers} layers")
    if ep > 1 and (not config.moe.enabled or config.moe.num_experts % ep):
        raise ConfigError(f"--ep {ep} must divide the number of experts ({config.moe.num_experts or 'dense model'})")
    return config


def build_target_state(config, vocab_size: int) -> Dict[str, object]:
    """This rank's shards to write: megatron's sharded_state_dict, materialised (empty), one writer each."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from stablemoe_megatron.model.gpt import build_model, transformer_config_for

    tconfig = transformer_config_for(config)
    with torch.device("meta"):
        model = build_model(config.model, config.moe, vocab_size, tconfig)
    sharded = model.sharded_state_dict()
    writers = _elect_writers([e for e in sharded.values() if isinstance(e, ShardedTensor)])
    state = {}
    for key, entry in sharded.items():
        if not isinstance(entry, ShardedTensor):
            state[key] = entry  # _extra_state objects (None for these modules)
        elif id(entry) in writers:
            if entry.flattened_range is not None:
                raise RuntimeError(f"{entry.key}: flattened model shards are not supported")
            entry.data = torch.empty(entry.local_shape, dtype=entry.dtype)
            entry.replica_id = _zero_replica(entry.replica_id)
            state[key] = entry
    return state


def _zero_replica(replica_id):
    return tuple(0 for _ in replica_id) if isinstance(replica_id, tuple) else 0


def _elect_writers(entries) -> set:
    """ids of this rank's entries that write their (key, offset); exactly one rank per shard.

    megatron's main replica (replica id 0) is preferred; the election does not trust replica ids
    alone, because expert LayerNorms under TP x EP carry the TP rank as replica index although
    the TP ranks hold different experts (no rank would write experts' norms there).
    """
    rank = global_rank()
    mine = [(e.key, tuple(e.global_offset), _as_tuple(e.replica_id)) for e in entries]
    everyone = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, mine)
    owner = {}
    for other, items in enumerate(everyone):
        for index, (key, offset, replica) in enumerate(items):
            candidate = (replica, other, index)
            if (key, offset) not in owner or candidate < owner[(key, offset)]:
                owner[(key, offset)] = candidate
    return {id(entries[index]) for (_, other, index) in owner.values() if other == rank}


def _as_tuple(replica_id) -> tuple:
    return tuple(replica_id) if isinstance(replica_id, tuple) else (replica_id,)


def _global_index(entry) -> tuple:
    shape = (1,) * entry.prepend_axis_num + tuple(entry.local_shape)
    return tuple(slice(off, off + size) for off, size in zip(entry.global_offset, shape))


def fill_state(state: Dict[str, object], read_global: Callable[[str], torch.Tensor],
               vocab_limit: Optional[int] = None) -> int:
    """Copy each materialised shard's slice of ``read_global(key)`` into it; return the count.

    The embedding / output layer may differ in padded rows (the vocabulary is padded to a
    multiple of 128 x TP): the common rows are copied, extra target rows are zero; ``vocab_limit``
    (the tokenizer's size) must fit in both.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    entries = sorted((e for e in state.values() if isinstance(e, ShardedTensor)), key=lambda e: e.key)
    cached_key, source = None, None  # local experts share one global tensor: read it once
    with torch.no_grad():
        for entry in entries:
            if entry.key != cached_key:
                cached_key, source = None, None  # drop the previous tensor before reading the next
                source = read_global(entry.key)
                if tuple(source.shape) != tuple(entry.global_shape):
                    source = _resize_vocab(entry, source, vocab_limit)
                cached_key = entry.key
            piece = source[_global_index(entry)].reshape(entry.data.shape)
            entry.data.copy_(piece.to(entry.data.dtype))
    return len(entries)


def _resize_vocab(entry, source: torch.Tensor, vocab_limit: Optional[int]) -> torch.Tensor:
    if entry.key not in VOCAB_KEYS or tuple(source.shape[1:]) != tuple(entry.global_shape[1:]):
        raise ConfigError(f"{entry.key}: stored shape {tuple(source.shape)} does not fit the target model's "
                          f"{tuple(entry.global_shape)}")
    rows = entry.global_shape[0]
    if vocab_limit is not None and vocab_limit > min(rows, source.shape[0]):
        raise ConfigError(f"{entry.key}: the tokenizer's {vocab_limit} tokens do not fit {rows} rows")
    resized = source.new_zeros(entry.global_shape)
    keep = min(rows, source.shape[0])
    resized[:keep] = source[:keep]
    return resized


def save_model_checkpoint(state: Dict[str, object], out_root, config_yaml: str, train_state: dict) -> Path:
    """Collective: write ``out_root/iter_XXXXXXX`` and the tracker, atomically (the checkpoint
    format's protocol, the trainer's too), holding the model's shards only."""
    from megatron.core import dist_checkpointing

    def write_payload(directory: Path) -> None:
        dist_checkpointing.save({"model": state}, str(directory))

    final = write_iteration(out_root, train_state["iteration"], write_payload, config_yaml, train_state)
    barrier()
    return final


def model_only_layout(config, converted_by: str) -> dict:
    """train_state.json layout of a converted checkpoint (never equal to a training layout)."""
    p = config.parallel
    return {"tp": p.tensor_model_parallel_size, "pp": p.pipeline_model_parallel_size,
            "ep": p.expert_model_parallel_size, "model_only": True, "converted_by": converted_by}


def train_state_dict(iteration: int, consumed: int, stage: int, layout: dict, tokenizer_vocab: Optional[int]) -> dict:
    """A train_state.json body (the checkpoint format's TrainState, as a dict)."""
    return asdict(TrainState(iteration=iteration, consumed_train_samples=consumed, stage=stage, layout=layout,
                             tokenizer_vocab_size=tokenizer_vocab or 0))
