"""Everything the loop needs, built in order: checks, process groups, model, optimizers, resume, data.

:func:`prepare` validates all user input BEFORE any expensive work (config, data files, token
range, checkpoint compatibility) so a mistake costs seconds and prints one message, then builds a
:class:`Job`: the model stage of this rank, its optimizers, the train state, and the data.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

import torch

from stablemoe_megatron import data as data_lib
from stablemoe_megatron.cli_args import config_from_yaml_text, dump_config
from stablemoe_megatron.config import RunConfig
from stablemoe_megatron.errors import ConfigError
from stablemoe_megatron.training.optim import distilled_parameters
from stablemoe_megatron.training.checkpoint_files import STATE_FILE, TRACKER, complete_iterations
from stablemoe_megatron.training.save_dir import check_existing_work, claim, resumes_from
from stablemoe_megatron.training.checkpointing import (
    CONFIG_FILE,
    TrainState,
    load_checkpoint,
    read_train_state,
    resolve_load_dir,
    save_checkpoint,
)

# Settings that define the model's parameters: a checkpoint only loads into the same values.
SHAPE_FIELDS = {
    "model": ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "normalization",
              "position_embedding_type", "untie_embeddings_and_output_weights"),
    "moe": ("num_experts", "router", "layer_positions", "layer_freq", "sublayers_per_expert",
            "expert_ffn_hidden_size", "distill_router", "distill_dim", "distill_layers"),
}


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_checkpoint_compatible(config: RunConfig, saved: RunConfig, load_dir) -> None:
    """ConfigError naming every flag whose value differs from the checkpoint's model."""
    from stablemoe_megatron.cli_args import flag_name

    diffs = []
    for section, names in SHAPE_FIELDS.items():
        for name in names:
            now, then = getattr(getattr(config, section), name), getattr(getattr(saved, section), name)
            if section == "moe" and name == "distill_router":
                now, then = config.moe.effective_distill_router, saved.moe.effective_distill_router
            if now != then:
                diffs.append(f"{flag_name(section, name)} {now} (checkpoint: {then})")
    if diffs:
        raise ConfigError(f"--load {load_dir} holds a different model: " + "; ".join(diffs)
                          + ". Use the checkpoint's settings (see its run_config.yaml).")


def preflight(config: RunConfig, world_size: int):
    """All checks that need no process group; returns (tokenizer, load_dir or None, saved state)."""
    config.validate(world_size)
    data_lib.check_data_paths(config.data)
    tokenizer = data_lib.tokenizer_from_config(config.data)
    load_dir, saved_state = None, None
    ckpt = config.checkpoint
    if ckpt.save:
        check_existing_work(ckpt.save, ckpt.load, ckpt.start_fresh)
    fresh_here = ckpt.start_fresh and ckpt.save and resumes_from(ckpt.save, ckpt.load)
    if ckpt.load and not fresh_here and _has_checkpoint(ckpt.load):
        load_dir = resolve_load_dir(ckpt.load)
        saved = config_from_yaml_text((load_dir / CONFIG_FILE).read_text())
        check_checkpoint_compatible(config, saved, load_dir)
        saved_state = read_train_state(load_dir)
        if saved_state.tokenizer_vocab_size and tokenizer.vocab_size > saved_state.tokenizer_vocab_size:
            raise ConfigError(
                f"the tokenizer (--tokenizer-model {config.data.tokenizer_model}) has {tokenizer.vocab_size} "
                f"tokens, more than the {saved_state.tokenizer_vocab_size} the checkpoint's model (--load "
                f"{ckpt.load}) was built for: use the tokenizer the model was trained with")
    vocab = config.model.padded_vocab_size(tokenizer.vocab_size, config.parallel.tensor_model_parallel_size)
    data_lib.check_token_range(config.data, tokenizer.vocab_size)
    return tokenizer, vocab, load_dir, saved_state


def _has_checkpoint(load) -> bool:
    """--load of a directory without a checkpoint yet starts from scratch (Megatron-LM's behaviour,
    so recipes can pass --load and --save the same directory); a missing directory is an error.
    A directory with complete ``iter_*`` checkpoints but no tracker has a checkpoint (recovered)."""
    path = Path(load)
    if not path.is_dir():
        raise ConfigError(f"--load {load}: no such directory")
    return (path / TRACKER).is_file() or (path / STATE_FILE).is_file() or bool(complete_iterations(path))


@dataclass
class Job:
    config: RunConfig
    model: object  # this rank's StableMoEGPTModel (unwrapped)
    ddp_model: object
    optimizer: object
    scheduler: object
    side_optimizer: object
    state: TrainState
    tokenizer: object
    num_microbatches: int
    global_batch: int
    dp_group: object
    train_iterator: Callable = None
    valid_iterator: Optional[Callable] = None
    test_iterator: Optional[Callable] = None
    preemption: object = None  # signals.StopSignals
    frozen_snapshot: List[torch.Tensor] = field(default_factory=list)
    probe: object = None
    save_lock: object = None  # save_dir.SaveDirLock held by rank 0 while the run writes --save

    def release(self) -> None:
        """Give up the --save directory (end of the run, or a failure)."""
        if self.save_lock is not None:
            self.save_lock.release()
            self.save_lock = None

    # -- stage ----------------------------------------------------------------------------------
    def model_stage(self) -> int:
        return self.state.stage

    def stage_two_due(self) -> bool:
        start = self.config.moe.stage2_start_iter
        return self.state.stage == 1 and start is not None and self.state.iteration >= start

    def enter_stage_two(self, reporter=None) -> None:
        """Freeze the distilled routers and drop their optimizer (StableMoE stage 2); logged once."""
        count = torch.tensor(float(sum(p.numel() for p in distilled_parameters(self.model))), device=device())
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)  # the MoE stage's count
        self.model.enter_stage_two()
        self.side_optimizer = None
        self.state.stage = 2
        self.frozen_snapshot = [p.detach().clone() for r in self.model.distilled_routers()
                                for p in r.distilled.parameters()]
        if reporter is not None:
            reporter.message(f"stage switch at iteration {self.state.iteration}: distilled routers frozen "
                             f"({int(count)} parameters per pipeline stage holding MoE layers, never in "
                             f"megatron's optimizer, their own optimizer dropped); "
                             f"balance and distillation losses off; routing is now a function of the token id")

    def check_frozen(self) -> None:
        """Frozen means frozen: fail loudly if a frozen distilled-router parameter ever changed."""
        params = [p for r in self.model.distilled_routers() for p in r.distilled.parameters()]
        for before, param in zip(self.frozen_snapshot, params):
            if param.requires_grad or not torch.equal(before, param.detach()):
                raise RuntimeError("a frozen distilled-router parameter changed in stage 2 (a bug)")

    # -- misc -----------------------------------------------------------------------------------
    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def save(self, reporter=None) -> None:
        config = self.config
        path = save_checkpoint(config.checkpoint.save, self.state, self.ddp_model, self.optimizer, self.scheduler,
                               self.side_optimizer, dump_config(config), config.checkpoint.keep_last)
        if reporter is not None:
            reporter.message(f"saved checkpoint {path} (stage {self.state.stage})")

    def probe_routing(self, reporter) -> None:
        if self.probe is not None:
            self.probe.maybe_run(self, reporter)

    def last_probe_summary(self):
        return self.probe.summary() if self.probe is not None else None

    def describe(self) -> str:
        from megatron.core import parallel_state as ps

        params = sum(p.numel() for p in self.model.parameters())
        c = self.config
        return (f"model stage params (this rank): {params:,} | layers {c.model.num_layers} hidden {c.model.hidden_size} "
                f"| MoE: {c.moe.router if c.moe.enabled else 'dense'}"
                f"{f' x{c.moe.num_experts}' if c.moe.enabled else ''} | TP {ps.get_tensor_model_parallel_world_size()} "
                f"PP {ps.get_pipeline_model_parallel_world_size()} EP {ps.get_expert_model_parallel_world_size()} "
                f"DP {ps.get_data_parallel_world_size()} | global batch {self.global_batch} "
                f"({self.num_microbatches} micro-batches of {c.training.micro_batch_size}) | "
                f"starting at iteration {self.state.iteration}, stage {self.state.stage}")


def layout_of(config: RunConfig) -> dict:
    from megatron.core import parallel_state as ps

    p = config.parallel
    return {"tp": p.tensor_model_parallel_size, "pp": p.pipeline_model_parallel_size,
            "ep": p.expert_model_parallel_size, "dp": ps.get_data_parallel_world_size(),
            "distributed_optimizer": p.use_distributed_optimizer}


def build_model_and_optimizers(config: RunConfig, vocab_size: int, world_size: int):
    """(model, ddp_model, optimizer, scheduler, side_optimizer) for this rank (groups initialised)."""
    from megatron.core import parallel_state as ps

    from stablemoe_megatron.model.gpt import build_model, transformer_config
    from stablemoe_megatron.parallel import host_expert_parallel_group
    from stablemoe_megatron.training.optim import (
        DistilledRouterOptimizer,
        build_optimizer,
        distilled_parameters,
        hidden_from_megatron,
        wrap_model,
    )

    p = config.parallel
    tconfig = transformer_config(config.model, config.moe, tensor_parallel=p.tensor_model_parallel_size,
                                 pipeline_parallel=p.pipeline_model_parallel_size,
                                 expert_parallel=p.expert_model_parallel_size,
                                 sequence_parallel=p.sequence_parallel, bf16=config.training.bf16)
    model = build_model(config.model, config.moe, vocab_size, tconfig, host_ep_group=host_expert_parallel_group())
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    if config.moe.enabled and config.moe.router == "hash" and config.moe.hash_table == "frequency":
        _install_frequency_hash_table(config, model, vocab_size)
    params = distilled_parameters(model)
    with hidden_from_megatron(params):  # trained by their own optimizer in stage 1, then frozen
        ddp_model = wrap_model(model, tconfig, config)
        optimizer, scheduler = build_optimizer(config, ddp_model, config.global_batch(world_size))
    tconfig.finalize_model_grads_func = _finalize_model_grads
    tconfig.no_sync_func = ddp_model.no_sync
    side = None
    if params:
        side = DistilledRouterOptimizer(params, config, ps.get_data_parallel_group(with_context_parallel=True))
    return model, ddp_model, optimizer, scheduler, side


def _finalize_model_grads(*args, **kwargs):
    from megatron.core.distributed import finalize_model_grads

    return finalize_model_grads(*args, **kwargs)


def _install_frequency_hash_table(config: RunConfig, model, vocab_size: int) -> None:
    """Hash layer's balanced table from the training data's token frequencies (Roller et al.)."""
    from stablemoe_megatron.routing import frequency_balanced_hash_table

    counts = data_lib.token_counts(config.data, vocab_size)
    table = frequency_balanced_hash_table(counts, config.moe.num_experts, config.moe.hash_seed)
    for layer in model.moe_layers:
        layer.router.set_table(table.to(layer.router.table.device))


def initialize_and_build(config: RunConfig, vocab_size: int, world_size: int):
    """Process groups, seeds, then :func:`build_model_and_optimizers` (after :func:`preflight`)."""
    from stablemoe_megatron.parallel import ParallelSizes, initialize_distributed, seed_everything

    p = config.parallel
    initialize_distributed(ParallelSizes(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                                         p.expert_model_parallel_size))
    seed_everything(config.training.seed)
    return build_model_and_optimizers(config, vocab_size, world_size)


def prepare(config: RunConfig) -> Job:
    """Checks, then (rank 0) the --save lock and run_config.yaml, then process groups, model,
    optimizers, resume, data: a ready :class:`Job` (call ``job.release()`` when done)."""
    world_size = world_size_from_env()
    tokenizer, vocab, load_dir, saved_state = preflight(config, world_size)
    lock = claim(config, dump_config(config), first_rank=int(os.environ.get("RANK", "0")) == 0)
    try:
        job = _build_job(config, world_size, tokenizer, vocab, load_dir, saved_state)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    job.save_lock = lock
    return job


def _build_job(config: RunConfig, world_size: int, tokenizer, vocab: int, load_dir, saved_state) -> Job:
    from megatron.core import parallel_state as ps

    model, ddp_model, optimizer, scheduler, side = initialize_and_build(config, vocab, world_size)
    state = TrainState(layout=layout_of(config), tokenizer_vocab_size=tokenizer.vocab_size)
    job = Job(config, model, ddp_model, optimizer, scheduler, side, state, tokenizer,
              config.num_microbatches(world_size), config.global_batch(world_size),
              ps.get_data_parallel_group(with_context_parallel=True))
    if load_dir is not None:
        _resume(job, load_dir, saved_state)
    _attach_data(job, world_size)
    if config.logging.routing_probe_interval and config.moe.enabled:
        from stablemoe_megatron.analysis.probe import RoutingProbe

        job.probe = RoutingProbe.for_job(job)
    return job


def _resume(job: Job, load_dir, saved_state: TrainState) -> None:
    config = job.config
    loaded = load_checkpoint(load_dir, job.ddp_model, job.optimizer, job.scheduler, job.side_optimizer,
                             layout=job.state.layout, load_optim=not config.checkpoint.no_load_optim)
    job.state.iteration = loaded.iteration
    job.state.tokenizer_vocab_size = loaded.tokenizer_vocab_size or job.state.tokenizer_vocab_size
    job.state.consumed_train_samples = loaded.consumed_train_samples
    if loaded.stage == 2 or job.stage_two_due():
        job.enter_stage_two()  # after the weights are loaded: the frozen routing tables come from them


def _attach_data(job: Job, world_size: int) -> None:
    from megatron.core import parallel_state as ps

    config = job.config
    train, valid, test = data_lib.build_datasets(config, job.tokenizer, world_size)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    micro, workers = config.training.micro_batch_size, config.data.num_workers
    job.train_iterator = lambda: data_lib.micro_batches(
        train, job.state.consumed_train_samples, micro, dp_rank, dp_size, workers)
    if valid is not None:
        job.valid_iterator = lambda: data_lib.micro_batches(valid, 0, micro, dp_rank, dp_size, workers)
    if test is not None:
        job.test_iterator = lambda: data_lib.micro_batches(test, 0, micro, dp_rank, dp_size, workers)
