"""``import`` (export -> torch_dist) and ``reshard`` (torch_dist -> torch_dist), at any TP/PP/EP.

:func:`import_export` and :func:`reshard_checkpoint` check everything they can in the calling
process, then run :func:`import_rank` / :func:`reshard_rank` on a fresh CPU process group of the
target layout (:func:`_run_on_cpu_ranks`). The rank functions work in any initialised group of the target
layout (the tests call them in their own workers). See :mod:`.sharded` for what is written.
"""
from __future__ import annotations

import functools
import shutil
from pathlib import Path
from typing import Callable, Optional, Tuple

from stablemoe_megatron.errors import ConfigError
from stablemoe_megatron.export import names


def _check_output(out_root, overwrite: bool) -> None:
    out = Path(out_root)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"{out} exists and is not empty; choose a new directory or pass --overwrite")
        shutil.rmtree(out)


def _vocab_size(config, tokenizer_vocab: Optional[int], rows: int) -> int:
    """Rows of the target model's embedding: the trainer's padding of the tokenizer's vocabulary."""
    return config.model.padded_vocab_size(tokenizer_vocab or rows, config.parallel.tensor_model_parallel_size)


def _run_on_cpu_ranks(fn: Callable, world: int, sizes: Tuple[int, int, int], args: tuple) -> None:
    """Run ``fn(*args)`` on ``world`` fresh local CPU processes with megatron's parallel_state set up
    for ``sizes`` (tp, pp, ep). The tool starts them itself (no torchrun): conversion is I/O and
    copying, so it runs on a login or CPU node. A worker's ConfigError comes back as a ConfigError,
    any other failure as a RuntimeError with the worker's traceback; the other workers are stopped."""
    from stablemoe_megatron.parallel import ParallelSizes, initialize_distributed
    from stablemoe_megatron.runtime import run_world

    run_world(fn, world, functools.partial(initialize_distributed, ParallelSizes(*sizes)), args,
              what="conversion")


# -- import -------------------------------------------------------------------------------------
def _imported_run_config(export_dir):
    """(exported config, RunConfig to rebuild; tokenizer paths moved to the export's copy if gone)."""
    from stablemoe_megatron.config import RunConfig
    from stablemoe_megatron.export.schema import read_config

    exported = read_config(export_dir)
    if not exported.run_config:
        raise ConfigError(f"{export_dir}/config.json has no run_config: it was not written by this exporter")
    run = RunConfig.from_dict(exported.run_config)
    entry = exported.tokenizer
    for name in ("tokenizer_model", "vocab_file", "merge_file"):
        if entry.get(name) and not (getattr(run.data, name) and Path(getattr(run.data, name)).exists()):
            setattr(run.data, name, str((Path(export_dir) / entry[name]).resolve()))
    return exported, run


def import_rank(export_dir: str, out_root: str, tp: int, pp: int, ep: int) -> int:
    """Collective: write the export as a torch_dist checkpoint at layout (tp, pp, ep); returns shards written."""
    from stablemoe_megatron.cli_args import dump_config
    from stablemoe_megatron.export.safetensors_io import SafetensorsFile
    from stablemoe_megatron.export.schema import WEIGHTS_FILE
    from stablemoe_megatron.export.sharded import (
        build_target_state, fill_state, model_only_layout, save_model_checkpoint, target_config,
        train_state_dict)

    exported, run = _imported_run_config(export_dir)
    config = target_config(run, tp, pp, ep)
    state = build_target_state(config, _vocab_size(config, exported.tokenizer_vocab_size, exported.vocab_size))
    weights = SafetensorsFile(Path(export_dir) / WEIGHTS_FILE)
    read = names.global_reader(weights.get, exported.num_attention_heads, exported.num_query_groups,
                               exported.num_layers)
    count = fill_state(state, read, exported.tokenizer_vocab_size)
    source = exported.source
    stage = max(source.get("stage", 1), exported.moe.routing_stage if exported.moe else 1)
    train_state = train_state_dict(source.get("iteration", 0), source.get("consumed_train_samples", 0), stage,
                                   model_only_layout(config, "convert_checkpoint import"),
                                   exported.tokenizer_vocab_size)
    save_model_checkpoint(state, out_root, dump_config(config), train_state)
    return count


def import_export(export_dir, out_root, tp: int = 1, pp: int = 1, ep: int = 1, overwrite: bool = False,
                  log: Callable[[str], None] = print) -> Path:
    """Import ``export_dir`` into ``out_root`` (a run directory: iter_* + tracker) at (tp, pp, ep)."""
    from stablemoe_megatron.export.sharded import min_world_size, target_config

    exported, run = _imported_run_config(export_dir)
    target_config(run, tp, pp, ep)  # layout errors before any process starts
    _check_output(out_root, overwrite)
    world = min_world_size(tp, pp, ep)
    log(f"importing {export_dir} at TP {tp} PP {pp} EP {ep} with {world} CPU process(es) into {out_root}")
    _run_on_cpu_ranks(import_rank, world, (tp, pp, ep), (str(export_dir), str(out_root), tp, pp, ep))
    return Path(out_root)


# -- reshard ------------------------------------------------------------------------------------
def reshard_rank(src: str, out_root: str, tp: int, pp: int, ep: int) -> int:
    """Collective: rewrite checkpoint ``src`` at layout (tp, pp, ep) into ``out_root``."""
    from stablemoe_megatron.cli_args import dump_config
    from stablemoe_megatron.export.dist_reader import TorchDistCheckpoint
    from stablemoe_megatron.export.sharded import (
        build_target_state, fill_state, model_only_layout, save_model_checkpoint, target_config,
        train_state_dict)

    ckpt = TorchDistCheckpoint(src)
    config = target_config(ckpt.config, tp, pp, ep)
    rows = ckpt.model_tensors()["embedding.word_embeddings.weight"].shape[0]
    state = build_target_state(config, _vocab_size(config, ckpt.tokenizer_vocab_size(), rows))
    count = fill_state(state, ckpt.read, ckpt.tokenizer_vocab_size())
    saved = ckpt.state
    train_state = train_state_dict(saved.iteration, saved.consumed_train_samples, saved.stage,
                                   model_only_layout(config, "convert_checkpoint reshard"),
                                   ckpt.tokenizer_vocab_size())
    save_model_checkpoint(state, out_root, dump_config(config), train_state)
    return count


def reshard_checkpoint(src, out_root, tp: int = 1, pp: int = 1, ep: int = 1, overwrite: bool = False,
                       log: Callable[[str], None] = print) -> Path:
    """Reshard checkpoint ``src`` (run dir or iter dir) into run directory ``out_root``."""
    from stablemoe_megatron.export.dist_reader import TorchDistCheckpoint
    from stablemoe_megatron.export.sharded import min_world_size, target_config

    ckpt = TorchDistCheckpoint(src)
    target_config(ckpt.config, tp, pp, ep)
    if Path(out_root).resolve() == ckpt.directory.parent.resolve():
        raise ConfigError(f"{out_root}: write the resharded checkpoint to a new directory, not the source run's")
    _check_output(out_root, overwrite)
    world = min_world_size(tp, pp, ep)
    log(f"resharding {ckpt.directory} (layout {ckpt.state.layout}) to TP {tp} PP {pp} EP {ep} with {world} "
        f"CPU process(es) into {out_root}; optimizer state is not carried over (resume with --no-load-optim)")
    _run_on_cpu_ranks(reshard_rank, world, (tp, pp, ep), (str(ckpt.directory), str(out_root), tp, pp, ep))
    return Path(out_root)
